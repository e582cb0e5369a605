"""`vitnp demo`: the shipped digits ViT classifies the shipped PNGs, without PyTorch, as timm does with those weights.

The tests that need torch / timm / torchvision / scikit-learn import them through ``pytest.importorskip`` inside
the test, so the torch-free tests still run where the oracle is not installed.
"""

import io
import os
import re
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from PIL import Image
from test_cli import break_the_fast_backend
from tolerances import assert_close

import vitnp
from vitnp.cli import main
from vitnp.demo import MODEL_NAME, SAMPLES_DIR, WEIGHTS_PATH, load_samples, run_demo, sample_paths

NAME = re.compile(r"^(\d{4})_label(\d)\.png$")


def names_and_labels():
    names = sorted(p for p in os.listdir(SAMPLES_DIR) if p.endswith(".png"))
    return names, [int(NAME.match(n).group(2)) for n in names]


def test_shipped_files():
    names, labels = names_and_labels()
    assert 30 <= len(names) <= 60 and all(NAME.match(n) for n in names)
    assert set(labels) == set(range(10))
    for name in names:
        with Image.open(SAMPLES_DIR / name) as image:
            assert (image.mode, image.size) == ("L", (32, 32))
    with zipfile.ZipFile(WEIGHTS_PATH) as archive:  # np.savez, uncompressed: load_weights memory-maps it
        assert all(info.compress_type == zipfile.ZIP_STORED for info in archive.infolist())
    weights = vitnp.load_weights(WEIGHTS_PATH)
    assert all(a.dtype == np.float32 for a in weights.values())


def test_demo_in_process(capsys):
    result = run_demo()
    out = capsys.readouterr().out
    names, labels = names_and_labels()
    assert result.files == names
    assert list(result.labels) == labels
    assert result.accuracy >= 0.9
    assert result.accuracy == np.mean(result.predictions == np.array(labels))
    for name, label, prediction in zip(names, labels, result.predictions):
        line = next(line for line in out.splitlines() if line.startswith(name))
        truth, predicted = line.split()[1:3]
        assert (int(truth), int(predicted)) == (label, prediction)
        assert line.endswith("<- wrong") == (label != prediction)
    correct = int(np.sum(result.predictions == np.array(labels)))
    assert f"accuracy: {correct}/{len(names)} = {100 * correct / len(names):.1f}%" in out
    assert re.search(r"time: \d+\.\d+ ms per image", out)
    assert result.seconds_per_image > 0
    assert "vitnp export" in out and "create_model('vit_base_patch16_224', weights=" in out


def test_demo_on_the_reference_backend_prints_the_same_predictions(monkeypatch, capsys):
    fast = run_demo(out=io.StringIO(), backend="fast")
    break_the_fast_backend(monkeypatch)
    assert main(["demo", "--backend", "reference"]) == 0
    out = capsys.readouterr().out
    assert "ms per image on the reference backend" in out
    for name, prediction, probabilities in zip(fast.files, fast.predictions, fast.probabilities):
        truth, predicted, probability = next(line for line in out.splitlines() if line.startswith(name)).split()[1:4]
        assert int(predicted) == prediction
        assert abs(float(probability) - probabilities[prediction]) <= 0.0006  # printed to 3 decimals
    assert f"accuracy: {int((fast.predictions == fast.labels).sum())}/{len(fast.files)}" in out


def test_demo_command_without_torch(tmp_path):
    """`python -m vitnp.cli demo` with torch and timm made unimportable: the demo path must not need them."""
    for module in ("torch", "timm"):
        (tmp_path / module).mkdir()
        (tmp_path / module / "__init__.py").write_text(f"raise ImportError('{module} is hidden by this test')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    run = subprocess.run(
        [sys.executable, "-m", "vitnp.cli", "demo"], capture_output=True, text=True, env=env, timeout=300
    )
    assert run.returncode == 0, run.stderr
    accuracy = re.search(r"accuracy: (\d+)/(\d+)", run.stdout)
    assert int(accuracy.group(1)) / int(accuracy.group(2)) >= 0.9
    assert "ms per image" in run.stdout


def test_shipped_weights_give_timm_logits():
    torch = pytest.importorskip("torch")
    pytest.importorskip("timm")
    transforms = pytest.importorskip("torchvision.transforms.functional")
    from timm.models.vision_transformer import VisionTransformer

    arch = dict(img_size=32, patch_size=4, in_chans=1, num_classes=10, embed_dim=64, depth=4, num_heads=4,
                mlp_ratio=2.0)
    reference = VisionTransformer(**arch).eval()
    state_dict = np.load(WEIGHTS_PATH)
    reference.load_state_dict({k: torch.from_numpy(state_dict[k]) for k in state_dict.files}, strict=True)
    paths = sample_paths()
    tensors = []
    for path in paths:
        with Image.open(path) as image:
            tensors.append(transforms.normalize(transforms.to_tensor(image), [0.5], [0.5]))
    expected_x = torch.stack(tensors)
    with torch.no_grad():
        expected = reference(expected_x).numpy()

    model = vitnp.create_model(MODEL_NAME, weights=WEIGHTS_PATH)
    x = load_samples(paths, model.data_config)
    # Same float32 operations in the same order (x / 255, then - mean, then / std): equal to the bit.
    np.testing.assert_array_equal(x, expected_x.numpy())
    assert_close(model(x), expected, "model")
    result = run_demo(out=io.StringIO())
    np.testing.assert_array_equal(result.predictions, expected.argmax(axis=1))


def test_samples_are_test_split_digits_made_as_in_training():
    pytest.importorskip("torch")
    pytest.importorskip("timm")
    datasets = pytest.importorskip("sklearn.datasets")
    from vitnp.demo.train_digits import digit_image, split

    digits = datasets.load_digits()
    _, test_idx = split(digits.target, seed=0)
    for name, label in zip(*names_and_labels()):
        index = int(NAME.match(name).group(1))
        assert index in test_idx
        assert digits.target[index] == label
        with Image.open(SAMPLES_DIR / name) as image:
            np.testing.assert_array_equal(np.asarray(image), np.asarray(digit_image(digits.images[index])))


def test_preprocess_bad_input(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        vitnp.load_image(tmp_path / "missing.png")
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ValueError, match="cannot read image"):
        vitnp.load_image(tmp_path / "text.png")
    with pytest.raises(ValueError, match="mode"):
        vitnp.load_image(sample_paths()[0], mode="CMYK")
    with pytest.raises(ValueError, match="one value per channel"):
        vitnp.normalize(np.zeros((2, 3, 4, 4), np.float32), [0.5], [0.5])
    with pytest.raises(ValueError, match="float"):
        vitnp.normalize(np.zeros((3, 4, 4), np.uint8), [0.5] * 3, [0.5] * 3)


def test_load_image_rgb_matches_pixels(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "rgb.png")
    x = vitnp.load_image(tmp_path / "rgb.png", mode="RGB")
    assert x.shape == (3, 5, 7) and x.dtype == np.float32
    np.testing.assert_array_equal(x, pixels.transpose(2, 0, 1).astype(np.float32) / 255)
    y = vitnp.normalize(x, (0.1, 0.2, 0.3), (0.5, 0.25, 2.0))
    np.testing.assert_allclose(y[2], (x[2] - 0.3) / 2.0, rtol=1e-6)
