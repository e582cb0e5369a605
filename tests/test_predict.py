"""``vitnp predict`` on a folder with a corrupt file, against timm's model + eval transform on the same images, on
either backend."""

import csv
import json

import numpy as np
import pytest
from PIL import Image
from test_cli import break_the_fast_backend

from vitnp import cli
from vitnp.predict import class_names, expand_inputs, imagenet_classes, top_k
from vitnp.weights import save_npz

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
from timm.data import create_transform, resolve_data_config  # noqa: E402

ARCH = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("predict")
    torch.manual_seed(0)
    reference = timm.create_model("deit_tiny_patch16_224", num_classes=1000, **ARCH).eval()
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.3 * torch.randn_like(p))  # spread the logits so that the top-k order is clear
    weights = folder / "weights.npz"
    save_npz(weights, {k: v.numpy() for k, v in reference.state_dict().items()}, dict(ARCH))
    images = folder / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i, (w, h, mode) in enumerate([(40, 50, "RGB"), (33, 90, "L"), (64, 64, "RGBA"), (70, 35, "RGB"),
                                      (45, 45, "RGB")]):
        Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA").convert(mode).save(images / f"{i}.png")
    (images / "2b_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (images / "notes.txt").write_text("not an image, not picked up from a folder")
    transform = create_transform(**resolve_data_config({"input_size": (3, 32, 32)}, model=reference))  # its img_size
    expected = {}
    for i in range(5):
        with Image.open(images / f"{i}.png") as image:
            x = transform(image.convert("RGB"))[None]
        with torch.no_grad():
            expected[str(images / f"{i}.png")] = torch.softmax(reference(x).double(), -1)[0].numpy()
    return weights, images, expected


def test_predict_folder_jsonl_with_corrupt_file(setup, tmp_path, capsys):
    weights, images, expected = setup
    out = tmp_path / "out.jsonl"
    status = cli.main(["predict", str(images), "--model", "deit_tiny_patch16_224", "--weights", str(weights),
                       "--topk", "3", "--batch-size", "2", "-o", str(out)])
    captured = capsys.readouterr()
    assert status == 1  # one file could not be read
    assert "2b_corrupt.png" in captured.err and "6/6" in captured.err  # reported, progress bar to the end
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["path"].rsplit("/", 1)[1] for r in records] == ["0.png", "1.png", "2.png", "2b_corrupt.png", "3.png",
                                                            "4.png"]
    names = imagenet_classes()
    for record in records:
        if "corrupt" in record["path"]:
            assert "cannot read image" in record["error"]
            continue
        probs = expected[record["path"]]
        best = np.argsort(-probs)[:3]
        assert [t["class_index"] for t in record["top"]] == best.tolist()
        assert [t["label"] for t in record["top"]] == [names[i] for i in best]
        np.testing.assert_allclose([t["probability"] for t in record["top"]], probs[best], rtol=1e-4, atol=1e-6)


def test_predict_csv_glob_and_stdout(setup, tmp_path, capsys):
    weights, images, expected = setup
    out = tmp_path / "out.csv"
    args = ["--model", "deit_tiny_patch16_224", "--weights", str(weights), "--topk", "2"]
    assert cli.main(["predict", str(images / "[01].png"), *args, "-o", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 4 and {r["rank"] for r in rows} == {"1", "2"}
    capsys.readouterr()
    assert cli.main(["predict", str(images / "3.png"), *args]) == 0
    line = capsys.readouterr().out.strip()
    best = int(np.argmax(expected[str(images / "3.png")]))
    assert line.startswith(str(images / "3.png")) and imagenet_classes()[best] in line


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_predict_on_the_reference_backend(setup, tmp_path, monkeypatch, capsys):
    weights, images, expected = setup
    args = [str(images), "--model", "deit_tiny_patch16_224", "--weights", str(weights), "--topk", "3"]
    assert cli.main(["predict", *args, "-o", str(tmp_path / "fast.jsonl")]) == 1  # the corrupt file
    break_the_fast_backend(monkeypatch)
    assert cli.main(["predict", *args, "-o", str(tmp_path / "reference.jsonl"), "--backend", "reference"]) == 1
    fast, reference = _jsonl(tmp_path / "fast.jsonl"), _jsonl(tmp_path / "reference.jsonl")
    assert [r["path"] for r in reference] == [r["path"] for r in fast] and len(fast) == 6
    for fast_record, record in zip(fast, reference):
        assert ("error" in record) == ("error" in fast_record)
        if "error" in record:
            continue
        assert [t["class_index"] for t in record["top"]] == [t["class_index"] for t in fast_record["top"]]
        probabilities = [t["probability"] for t in record["top"]]
        np.testing.assert_allclose(probabilities, [t["probability"] for t in fast_record["top"]], rtol=1e-4)
        np.testing.assert_allclose(probabilities, expected[record["path"]][[t["class_index"] for t in record["top"]]],
                                   rtol=1e-4, atol=1e-6)
    capsys.readouterr()
    monkeypatch.setenv("VITNP_BACKEND", "reference")  # the default backend, when --backend is not given
    assert cli.main(["predict", str(images / "3.png"), *args[1:]]) == 0
    assert capsys.readouterr().out.startswith(str(images / "3.png"))


def test_predict_errors(setup, capsys):
    weights, images, _ = setup
    assert cli.main(["predict", str(images / "*.gif"), "--model", "deit_tiny_patch16_224", "--weights",
                     str(weights)]) == 1
    assert "no image files found" in capsys.readouterr().err
    assert cli.main(["predict", str(images), "--model", "deit_tiny_patch16_224", "--weights", str(weights),
                     "-o", "x.xlsx"]) == 1
    assert "--out must end" in capsys.readouterr().err


def test_class_names_and_top_k():
    names = imagenet_classes()
    assert len(names) == 1000 and names[0] == "tench" and names[999] == "toilet tissue"

    class Fake:
        labels, num_classes = None, 3

    assert class_names(Fake()) == ["class 0", "class 1", "class 2"]
    Fake.labels = ["cat", "dog", "fish"]
    assert class_names(Fake()) == ["cat", "dog", "fish"]
    logits = np.array([[0.0, 2.0, 1.0]])
    indices, probs = top_k(logits, 5)
    expected = torch.softmax(torch.tensor(logits), -1)[0].numpy()
    assert indices.tolist() == [[1, 2, 0]]
    np.testing.assert_allclose(probs[0], expected[[1, 2, 0]], rtol=1e-12)


def test_expand_inputs_keeps_missing_paths(tmp_path):
    assert expand_inputs([str(tmp_path / "missing.png")]) == [str(tmp_path / "missing.png")]
