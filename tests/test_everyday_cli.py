"""Everyday use, as a new user meets it: commands that show a model's output refuse to run random weights unless
asked (--random-weights, said loudly), `vitnp list WORD` and `vitnp.list_models(filter)` match words and globs and say
when nothing matches, `vitnp.preprocess` takes the uint8 arrays OpenCV / imageio give, and `predict`'s skipped-file
messages get their own lines under the progress bar.
"""

import numpy as np
import pytest
from PIL import Image

import vitnp
from vitnp.cli import main
from vitnp.demo import MODEL_NAME as DIGITS
from vitnp.demo import WEIGHTS_PATH as DIGITS_WEIGHTS
from vitnp.demo import sample_paths

TINY = "vit_tiny_patch16_224"


def run(capsys, *args):
    """`vitnp ARGS`: (exit status, stdout, stderr)."""
    status = main([str(a) for a in args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


# ---- weights or, on purpose, --random-weights -----------------------------------------------------------------------


@pytest.mark.parametrize("command", ["predict", "attention"])
def test_a_command_showing_a_models_output_refuses_without_weights(command, tmp_path, capsys):
    out = tmp_path / ("out.png" if command == "attention" else "out.csv")
    status, stdout, stderr = run(capsys, command, sample_paths()[0], "--model", "dino_vits16", "-o", out)
    assert status == 1 and stdout == "" and stderr.count("\n") == 1, stderr
    assert stderr.startswith(f"vitnp {command}: error: no weights for dino_vits16: pass --weights FILE")
    assert "--random-weights" in stderr
    assert not out.exists()


def test_attention_with_random_weights_runs_and_says_so(tmp_path, capsys):
    out = tmp_path / "map.png"
    status, stdout, stderr = run(capsys, "attention", sample_paths()[0], "--model", DIGITS, "--random-weights",
                                 "-o", out)
    assert status == 0 and stdout == f"wrote {out}\n"
    assert "RANDOM weights" in stderr and "means nothing" in stderr
    assert Image.open(out).size[0] > 0


def test_predict_with_random_weights_runs_and_says_so(capsys):
    status, stdout, stderr = run(capsys, "predict", *sample_paths()[:2], "--model", DIGITS, "--random-weights")
    assert status == 0 and len(stdout.splitlines()) == 2
    assert stderr.startswith(f"vitnp predict: warning: {DIGITS} runs with RANDOM weights")


def test_weights_and_random_weights_exclude_each_other(capsys):
    status, stdout, stderr = run(capsys, "predict", sample_paths()[0], "--model", DIGITS, "--weights", DIGITS_WEIGHTS,
                                 "--random-weights")
    assert status == 1 and stdout == "" and "exclude each other" in stderr and "RANDOM" not in stderr


def test_predict_with_weights_says_nothing_of_random_weights(capsys):
    status, stdout, stderr = run(capsys, "predict", sample_paths()[0], "--model", DIGITS, "--weights", DIGITS_WEIGHTS)
    assert status == 0 and stdout.startswith(str(sample_paths()[0])) and stderr == ""


def test_verify_against_a_reference_needs_the_weights_it_was_computed_with(tmp_path, capsys):
    status, stdout, stderr = run(capsys, "verify", "--model", TINY, "--reference", tmp_path / "ref.npz")
    assert status == 1 and stdout == "" and "pass those with --weights FILE" in stderr


# ---- vitnp list / vitnp.list_models ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("word", "count"), [("swin_", 6), ("SWIN_", 6), ("Window7", 4)])
def test_list_a_word_matches_anywhere_in_the_name(word, count, capsys):
    status, stdout, stderr = run(capsys, "list", word)
    names = stdout.split()
    assert status == 0 and stderr == ""
    assert names == [n for n in vitnp.list_models() if word.lower() in n] and len(names) == count


def test_list_a_glob_matches_the_whole_name(capsys):
    status, stdout, _ = run(capsys, "list", "vit_small*")
    assert status == 0 and stdout.split() == [n for n in vitnp.list_models() if n.startswith("vit_small")]
    assert "deit_small_patch16_224" not in stdout  # a glob is not a substring


def test_list_without_a_match_says_so(capsys):
    status, stdout, stderr = run(capsys, "list", "zzz")
    assert status == 1 and stdout == ""
    assert stderr == "vitnp list: error: no model matches 'zzz'; vitnp list shows them all\n"
    status, _, stderr = run(capsys, "list", "vit_smal_patch16")
    assert status == 1 and "did you mean vit_small_patch16_224" in stderr


def test_list_models_takes_the_same_filter():
    every = vitnp.list_models()
    assert vitnp.list_models("") == every and vitnp.list_models(filter="*") == every
    assert vitnp.list_models("vit_*") == [n for n in every if n.startswith("vit_")]
    assert vitnp.list_models("Distilled") == [n for n in every if "distilled" in n] != []
    assert vitnp.list_models(["mobilevit", "swin_t*"]) == sorted(
        n for n in every if "mobilevit" in n or n.startswith("swin_t"))
    assert vitnp.list_models("zzz") == []


# ---- vitnp.preprocess on arrays --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def photo():
    """An RGB picture with detail to resize (a digit image blown up, with noise and a gradient)."""
    rng = np.random.default_rng(0)
    base = np.asarray(Image.open(sample_paths()[0]).convert("RGB").resize((173, 131)), dtype=np.int16)
    pixels = base + rng.integers(-40, 40, base.shape) + np.arange(173)[None, :, None] // 2
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA"])
@pytest.mark.parametrize("model", [TINY, DIGITS])
def test_preprocess_of_an_array_equals_preprocess_of_the_pil_image(photo, mode, model):
    image = photo.convert(mode)
    pixels = np.asarray(image)
    assert pixels.dtype == np.uint8 and pixels.ndim == (2 if mode == "L" else 3)
    np.testing.assert_array_equal(vitnp.preprocess(pixels, model), vitnp.preprocess(image, model))


def test_preprocess_takes_one_channel_and_strided_arrays(photo):
    grey = np.asarray(photo.convert("L"))
    np.testing.assert_array_equal(vitnp.preprocess(grey[:, :, None], TINY), vitnp.preprocess(grey, TINY))
    bgr = np.ascontiguousarray(np.asarray(photo)[:, :, ::-1])  # what OpenCV reads
    np.testing.assert_array_equal(vitnp.preprocess(bgr[:, :, ::-1], TINY), vitnp.preprocess(photo, TINY))


@pytest.mark.parametrize("image", [np.zeros((32, 32, 3), np.float32), np.zeros((32, 32, 2), np.uint8),
                                   np.zeros((3, 32, 32, 3), np.uint8), np.zeros((0, 32), np.uint8), 7, [[0, 1]]],
                         ids=["float", "2 channels", "batch", "empty", "int", "list"])
def test_preprocess_names_what_it_takes(image):
    with pytest.raises(TypeError, match=r"expected an image file path, .* uint8 NumPy array of RGB pixels"):
        vitnp.preprocess(image, TINY)


# ---- predict's progress bar and skipped files ------------------------------------------------------------------------


def test_a_skipped_file_gets_its_own_line_beside_the_progress_bar(tmp_path, capsys):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    images = [sample_paths()[0], corrupt, sample_paths()[1]]
    status, _, stderr = run(capsys, "predict", *images, "--model", DIGITS, "--weights", DIGITS_WEIGHTS,
                            "-o", tmp_path / "out.jsonl")
    assert status == 1
    skipped = [line for line in stderr.split("\r") if "skipped" in line]
    assert len(skipped) == 1 and skipped[0].strip().startswith(f"vitnp predict: skipped {corrupt}: ")
    assert skipped[0].endswith("\n") and "[" not in skipped[0]  # the message alone on its line
    assert stderr.endswith("] 3/3\n")
