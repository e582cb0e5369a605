"""The `vitnp` command: `list`, and `export` from a timm name or a checkpoint file into an .npz vitnp loads; malloc's
tuning before the commands that run a model; `attention` on the reference backend.

Export needs torch + timm; those tests get them through the ``oracle`` fixture (``pytest.importorskip``), so the
tests of `list` and of the missing-torch error still run where the oracle is not installed.
"""

import sys

import numpy as np
import pytest
from PIL import Image
from tolerances import assert_close

import vitnp
import vitnp.fast.ops as fast_ops
from vitnp import memory
from vitnp.cli import main
from vitnp.demo import MODEL_NAME as DIGITS
from vitnp.demo import WEIGHTS_PATH as DIGITS_WEIGHTS
from vitnp.demo import sample_paths

TINY = "vit_tiny_patch16_224"


@pytest.fixture(scope="module")
def oracle():
    torch = pytest.importorskip("torch")
    timm = pytest.importorskip("timm")
    return torch, timm


def export(capsys, *args):
    """Run `vitnp export ARGS`: (exit status, stdout, stderr)."""
    status = main(["export", *map(str, args)])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def assert_one_line_error(status, out, err, *fragments):
    assert status == 1 and out == ""
    assert err.startswith("vitnp export: error: ") and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err


def break_the_fast_backend(monkeypatch):
    """Make every op of the fast backend raise: a run that succeeds then ran none of them."""

    def fast_op(*args, **kwargs):
        raise AssertionError("an op of the fast backend ran")

    for name in fast_ops.__all__:
        monkeypatch.setattr(fast_ops, name, fast_op)


def timm_logits(torch, model, x):
    with torch.no_grad():
        return model.eval()(torch.from_numpy(x)).numpy()


def test_list_prints_the_registered_names(capsys):
    assert main(["list"]) == 0
    assert capsys.readouterr().out.split() == vitnp.list_models()


def test_list_filters_by_pattern(capsys):
    assert main(["list", "deit_*distilled*"]) == 0
    names = capsys.readouterr().out.split()
    assert names == [n for n in vitnp.list_models() if n.startswith("deit_") and "distilled" in n] and names


def test_no_subcommand_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
    assert "export" in capsys.readouterr().err


def test_export_timm_name_round_trips(oracle, tmp_path, capsys):
    torch, timm = oracle
    out = tmp_path / "tiny.npz"
    torch.manual_seed(0)
    status, printed, _ = export(capsys, TINY, "-o", out)
    assert status == 0
    torch.manual_seed(0)  # timm's random init draws from torch's generator: the same seed gives the same model
    reference = timm.create_model(TINY, pretrained=False)
    expected = reference.state_dict()
    weights = vitnp.load_weights(out)
    assert list(weights) == list(expected)
    for key, tensor in expected.items():
        np.testing.assert_array_equal(weights[key], tensor.numpy())
    params = sum(t.numel() for t in expected.values())
    assert printed == f"wrote {len(expected)} tensors, {params:,} parameters (timm-vit layout) to {out}\n"

    model = vitnp.create_model(TINY, weights=out)
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    assert_close(model(x), timm_logits(torch, reference, x), "model")


def test_export_of_a_batchnorm_model_keeps_its_scalar_buffers(oracle, tmp_path, capsys):
    # BatchNorm's num_batches_tracked is a 0-d tensor: it must stay 0-d in the .npz for the strict load to accept it
    out = tmp_path / "mobilevit.npz"
    status, printed, _ = export(capsys, "mobilevit_xxs", "-o", out, "--model", "mobilevit_xxs")
    assert status == 0, printed
    weights = vitnp.load_weights(out)
    assert weights["stem.bn.num_batches_tracked"].shape == ()
    vitnp.create_model("mobilevit_xxs", weights=out)


def test_export_pth_with_model_check_round_trips(oracle, tmp_path, capsys):
    torch, _ = oracle
    from timm.models.vision_transformer import VisionTransformer

    reference = VisionTransformer(img_size=32, patch_size=4, in_chans=1, num_classes=5, embed_dim=64, depth=4,
                                  num_heads=4, mlp_ratio=2.0)  # the config of vitnp's vit_digits_patch4_32
    checkpoint = tmp_path / "finetuned.pth"
    torch.save({"model": reference.state_dict(), "epoch": 7}, checkpoint)
    out = tmp_path / "finetuned"  # export adds the .npz suffix, as np.savez does
    status, printed, _ = export(capsys, checkpoint, "-o", out, "--model", "vit_digits_patch4_32")
    assert status == 0 and printed.endswith(f"to {out}.npz\n")
    model = vitnp.create_model("vit_digits_patch4_32", weights=f"{out}.npz", num_classes=5)
    x = np.random.default_rng(1).standard_normal((3, 1, 32, 32)).astype(np.float32)
    assert_close(model(x), timm_logits(torch, reference, x), "model")


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "safetensors"])
def test_export_checkpoint_layouts(oracle, tmp_path, capsys, wrap):
    torch, _ = oracle
    from timm.models.vision_transformer import VisionTransformer

    state_dict = VisionTransformer(img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2,
                                   num_classes=3).state_dict()
    state_dict["head.bias"] = state_dict["head.bias"].bfloat16()  # no NumPy bfloat16: exported as float32
    if wrap == "safetensors":
        safetensors_torch = pytest.importorskip("safetensors.torch")
        checkpoint = tmp_path / "model.safetensors"
        safetensors_torch.save_file(state_dict, checkpoint)
    else:
        checkpoint = tmp_path / "model.pt"
        torch.save(state_dict if wrap == "plain" else {wrap: state_dict, "optimizer": {}}, checkpoint)
    status, _, _ = export(capsys, checkpoint, "-o", tmp_path / "out.npz")
    assert status == 0
    weights = vitnp.load_weights(tmp_path / "out.npz")
    assert sorted(weights) == sorted(state_dict)  # safetensors stores keys sorted
    for key, tensor in state_dict.items():
        np.testing.assert_array_equal(weights[key], tensor.float().numpy())
    assert weights["head.bias"].dtype == np.float32


@pytest.mark.parametrize("hidden", ["torch", "timm"])
def test_export_without_torch_or_timm_says_what_to_install(monkeypatch, tmp_path, capsys, hidden):
    monkeypatch.setitem(sys.modules, hidden, None)  # `import torch` now raises ImportError, as when not installed
    out = tmp_path / "out.npz"
    assert_one_line_error(*export(capsys, TINY, "-o", out), "pip install torch timm")
    assert not out.exists()


def test_export_errors_are_one_line(oracle, tmp_path, capsys):
    torch, _ = oracle
    out = tmp_path / "out.npz"
    assert_one_line_error(*export(capsys, tmp_path / "missing.pth", "-o", out), "not found", "missing.pth")
    (tmp_path / "notes.txt").write_text("hello")
    assert_one_line_error(*export(capsys, tmp_path / "notes.txt", "-o", out), "unsupported weights file", ".pth")
    (tmp_path / "garbage.pth").write_bytes(b"not a torch file")
    assert_one_line_error(*export(capsys, tmp_path / "garbage.pth", "-o", out), "cannot read", "garbage.pth")
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    assert_one_line_error(*export(capsys, tmp_path / "list.pth", "-o", out), "holds no tensors")
    torch.save({"weight": torch.zeros(2), "step": 3}, tmp_path / "mixed.pth")
    assert_one_line_error(*export(capsys, tmp_path / "mixed.pth", "-o", out), "layout")
    assert_one_line_error(*export(capsys, "vit_tiny_patch16_2244", "-o", out), "neither a file nor a timm model",
                          "did you mean vit_tiny_patch16_224")
    assert_one_line_error(*export(capsys, tmp_path / "list.pth", "-o", out, "--pretrained"), "--pretrained")
    assert not out.exists()


def test_export_rejects_weights_that_do_not_fit_the_model(oracle, tmp_path, capsys):
    torch, _ = oracle
    from timm.models.vision_transformer import VisionTransformer

    small = VisionTransformer(img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=3)
    torch.save(small.state_dict(), tmp_path / "small.pth")
    out = tmp_path / "out.npz"
    assert_one_line_error(*export(capsys, tmp_path / "small.pth", "-o", out, "--model", TINY),
                          f"do not fit vitnp's {TINY}", "missing keys")
    assert not out.exists()


def test_export_pretrained_unavailable_is_one_line(oracle, monkeypatch, tmp_path, capsys):
    _, timm = oracle

    def offline(name, pretrained=False, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'\nmore detail")

    monkeypatch.setattr(timm, "create_model", offline)
    monkeypatch.setattr("vitnp.cli.check_hub_reachable", lambda name: None)  # the hub answers, the download fails
    out = tmp_path / "out.npz"
    assert_one_line_error(*export(capsys, TINY, "--pretrained", "-o", out), "pretrained weights", "couldn't connect")
    assert not out.exists()


class Tuned(Exception):
    """Raised by a stand-in for keep_freed_memory: the command got as far as tuning malloc."""


@pytest.mark.parametrize("command", [["demo"], ["predict", "x.png", "--model", TINY, "--weights", "w.npz"],
                                     ["verify", "--model", TINY, "--compare-backends"],
                                     ["attention", "x.png", "--model", TINY, "--random-weights", "-o", "x.png"],
                                     ["embed", "images", "--model", TINY, "--weights", "w.npz", "--out", "out"]])
def test_commands_that_run_a_model_tune_malloc_first(command, monkeypatch):
    def tune():
        raise Tuned

    monkeypatch.setattr(memory, "keep_freed_memory", tune)
    with pytest.raises(Tuned):
        main(command)


def test_other_commands_leave_malloc_alone(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(memory, "keep_freed_memory", lambda: calls.append(1))
    assert main(["list", "vit_tiny*"]) == 0
    assert main(["inspect", str(DIGITS_WEIGHTS)]) == 0
    assert calls == []


def test_keep_freed_memory_is_public():
    assert vitnp.keep_freed_memory is memory.keep_freed_memory and "keep_freed_memory" in vitnp.__all__


def test_attention_on_the_reference_backend_draws_the_fast_backend_figure(tmp_path, monkeypatch, capsys):
    args = ["attention", str(sample_paths()[0]), "--model", DIGITS, "--weights", str(DIGITS_WEIGHTS)]
    assert main([*args, "-o", str(tmp_path / "fast.png")]) == 0
    break_the_fast_backend(monkeypatch)
    assert main([*args, "-o", str(tmp_path / "reference.png"), "--backend", "reference"]) == 0
    fast, reference = (np.asarray(Image.open(tmp_path / f"{name}.png"), np.int16) for name in ("fast", "reference"))
    assert fast.shape == reference.shape == (2 * 32 + 4, 4 * 32 + 3 * 4, 3)  # image, mean, 4 heads; 4 columns
    assert np.abs(fast - reference).max() <= 1  # colours rounded to 8 bits from maps equal to ~1e-6


def test_the_installed_command_runs_main_then_freezes_the_heap(capsys):
    """The ``vitnp`` script is ``command_line``: main's status, then the heap frozen so that the interpreter's exit
    does not walk Numba's objects (the collections of a cached ``vitnp demo``'s exit took a third of its time)."""
    import gc
    from pathlib import Path

    from vitnp.cli import command_line

    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert '\nvitnp = "vitnp.cli:command_line"\n' in pyproject  # [project.scripts]
    gc.unfreeze()
    try:
        assert command_line(["list", "vit_tiny_patch16_224"]) == 0
        assert "vit_tiny_patch16_224" in capsys.readouterr().out
        assert gc.get_freeze_count() > 0
        gc.unfreeze()
        assert command_line(["list", "zzz"]) == 1  # frozen whatever the status
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
