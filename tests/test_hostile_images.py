"""Hostile images, as a user meets them through `vitnp predict` and `vitnp attention`: tiny files that ask for
gigabytes (a 1 x 20000 PNG resized to a shorter side of 248 is 248 x 4,960,000 pixels), Pillow's decompression
bombs, and the `predict` options that used to fail late or with a traceback (an -o that cannot be written, a labels
list shorter than the head). Each hostile file is built here, a few hundred bytes; where memory is the point the
command runs in a subprocess under an address-space limit (``resource.setrlimit``).
"""

import csv
import json
import resource
import struct
import subprocess
import sys
import zlib
from contextlib import contextmanager

import numpy as np
import pytest
from PIL import Image

import vitnp
import vitnp.predict
from vitnp.cli import main
from vitnp.demo import MODEL_NAME as DIGITS
from vitnp.demo import WEIGHTS_PATH as DIGITS_WEIGHTS
from vitnp.demo import sample_paths
from vitnp.preprocess import MAX_RESIZED_PIXELS, check_resize, open_image

MEMORY_LIMIT = 2 * 2**30  # the address space of a command under test: ~0.65 GiB used, the 1 x 20000 PNG asks 5 GiB
TINY = "vit_tiny_patch16_224"  # resizes the shorter side to 248, as most registered models


def sliver_png(path, length):
    """A valid, all-black greyscale PNG of 1 x ``length`` pixels: a few hundred bytes."""
    Image.new("L", (1, length)).save(path, format="PNG")
    return path


def _chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(path, width=20000, height=10000):
    """A PNG whose header claims width x height pixels (200 M: beyond Pillow's limit of 2 x 89.5 M), 68 bytes."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(bytes(16)))
                     + _chunk(b"IEND", b""))
    return path


@pytest.fixture
def hostile(tmp_path):
    """Two good digit images and the three hostile files, by name."""
    good = [tmp_path / f"good{i}.png" for i in range(2)]
    for source, target in zip(sample_paths(), good):
        target.write_bytes(source.read_bytes())
    return {"good": good, "sliver": sliver_png(tmp_path / "sliver.png", 20000),
            "long_sliver": sliver_png(tmp_path / "long_sliver.png", 100000), "bomb": bomb_png(tmp_path / "bomb.png")}


def run_limited(args, cwd):
    """`vitnp ARGS` in a subprocess whose address space is limited to MEMORY_LIMIT: (exit status, stdout, stderr)."""

    def limit_memory():
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))

    result = subprocess.run([sys.executable, "-m", "vitnp.cli", *map(str, args)], cwd=cwd, capture_output=True,
                            text=True, timeout=120, preexec_fn=limit_memory, check=False)
    return result.returncode, result.stdout, result.stderr


@contextmanager
def address_space_limited(extra=2**30):
    """Limit this process's address space to what it uses now plus ``extra`` bytes, for the block's duration."""
    with open("/proc/self/status") as status:
        used = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (used + extra, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@pytest.mark.parametrize("name", ["sliver", "long_sliver"])
def test_an_image_that_asks_a_resize_for_gigabytes_is_refused(hostile, name):
    path = hostile[name]
    assert path.stat().st_size < 400
    pixels = np.zeros((Image.open(path).height, 1), np.uint8)
    with address_space_limited():
        with pytest.raises(ValueError, match="refusing image") as error:
            vitnp.preprocess(path, TINY)
        with pytest.raises(ValueError, match="refusing image array of shape"):  # the same pixels as an array
            vitnp.preprocess(pixels, TINY)
    assert str(path) in str(error.value) and "248 x" in str(error.value)


def test_the_bound_leaves_normal_pictures_alone(tmp_path):
    panorama = np.random.default_rng(0).integers(0, 256, (60, 3000, 3), dtype=np.uint8)  # 1:50
    assert vitnp.preprocess(panorama, "vit_base_patch16_384").shape == (3, 384, 384)
    check_resize((1, 4), (4096, 4096))  # exactly the bound
    with pytest.raises(ValueError, match=f"{MAX_RESIZED_PIXELS:,}"):
        check_resize((1, 4), (4097, 4096))


def test_predict_under_a_memory_limit_skips_the_hostile_files_and_writes_the_good(hostile, tmp_path):
    out = tmp_path / "out.csv"
    files = [hostile["good"][0], hostile["sliver"], hostile["long_sliver"], hostile["bomb"], hostile["good"][1]]
    status, stdout, stderr = run_limited(["predict", *files, "--model", TINY, "--random-weights", "-o", out], tmp_path)
    assert status == 1, stderr  # as for any unreadable file
    assert "Traceback" not in stderr and "MemoryError" not in stderr
    assert "wrote 2 predictions" in stdout and "(3 unreadable)" in stdout
    for name in ("sliver", "long_sliver", "bomb"):
        assert f"skipped {hostile[name]}: " in stderr
    rows = list(csv.DictReader(out.open()))
    errors = {row["path"]: row["error"] for row in rows if row["error"]}
    assert errors.keys() == {str(hostile[name]) for name in ("sliver", "long_sliver", "bomb")}
    assert "refusing image" in errors[str(hostile["sliver"])]
    assert "decompression bomb" in errors[str(hostile["bomb"])]
    assert {row["path"] for row in rows if row["rank"] == "1"} == {str(path) for path in hostile["good"]}


@pytest.mark.parametrize("name", ["sliver", "bomb"])
def test_attention_refuses_a_hostile_image_in_one_line(hostile, name, tmp_path):
    out = tmp_path / "map.png"
    status, stdout, stderr = run_limited(["attention", hostile[name], "--model", TINY, "--random-weights", "-o", out],
                                         tmp_path)
    error = stderr.splitlines()[-1]  # after the warning that the weights are random
    assert status == 1 and stdout == "" and stderr.count("\n") == 2, stderr
    assert error.startswith("vitnp attention: error: ") and str(hostile[name]) in error
    assert not out.exists()


def test_attention_bounds_its_own_resize_too(hostile, tmp_path, capsys):
    status = main(["attention", str(hostile["good"][0]), "--model", DIGITS, "--weights", str(DIGITS_WEIGHTS),
                   "-o", str(tmp_path / "map.png"), "--image-size", "100000"])
    assert status == 1 and "refusing image" in capsys.readouterr().err


def test_a_decompression_bomb_is_an_unreadable_file_for_every_reader(hostile):
    bomb = hostile["bomb"]
    for read in (vitnp.load_image, open_image, lambda source: vitnp.preprocess(source, DIGITS)):
        with pytest.raises(ValueError, match=f"cannot read image {bomb}: .*decompression bomb"):
            read(bomb)
    with bomb.open("rb") as file, pytest.raises(ValueError, match=f"cannot read image {bomb}: .*decompression bomb"):
        vitnp.preprocess(file, DIGITS)  # an open file is named by its file name


def test_predict_checks_its_output_file_before_computing(hostile, tmp_path, monkeypatch, capsys):
    def read(*args, **kwargs):
        raise AssertionError("an image was read")

    monkeypatch.setattr(vitnp.predict, "preprocess_files", read)
    folder = tmp_path / "taken.csv"
    folder.mkdir()
    for out in (tmp_path / "no such folder" / "out.csv", folder):
        status = main(["predict", str(hostile["good"][0]), "--model", DIGITS, "--weights", str(DIGITS_WEIGHTS),
                       "-o", str(out)])
        captured = capsys.readouterr()
        assert status == 1 and captured.out == "" and captured.err.count("\n") == 1, captured.err
        assert captured.err.startswith(f"vitnp predict: error: cannot write {out}: ")


def test_predict_refuses_a_labels_list_shorter_than_the_head(tmp_path, capsys):
    weights = dict(np.load(DIGITS_WEIGHTS))
    weights["__config__"] = np.array(json.dumps({"labels": ["zero", "one", "two"]}))  # the head has 10 classes
    path = tmp_path / "short_labels.npz"
    np.savez(path, **weights)
    out = tmp_path / "out.csv"
    out.write_text("the results of an earlier run\n")
    status = main(["predict", str(sample_paths()[0]), "--model", DIGITS, "--weights", str(path), "-o", str(out)])
    captured = capsys.readouterr()
    assert status == 1 and captured.out == "" and captured.err.count("\n") == 1, captured.err
    assert "3 names" in captured.err and "10 classes" in captured.err and "IndexError" not in captured.err
    assert out.read_text() == "the results of an earlier run\n"  # refused before the output was opened
