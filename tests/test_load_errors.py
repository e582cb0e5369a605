"""Weights that do not fit, as a user meets them: a short error naming the likely cause (weights of another size,
another classifier), the full lists on the exception; ``num_classes=0`` leaving the classifier out; loads that neither
share nor freeze the caller's arrays; `vitnp export` that never destroys its source or target, refuses a folder
silently turned into a file name, and fails at once without network.

Everything here runs without torch.
"""

import errno
import os
import pickle
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from oracles import BACKENDS, images
from PIL import Image

import vitnp
from vitnp import cli
from vitnp.cli import main

TINY = "vit_tiny_patch16_224"
SMALL_VIT = "vit_small_patch16_224"

# One small configuration with a classifier per model family (names as in tests/test_models.py).
FAMILIES = {
    "vit_tiny_patch16_224": dict(img_size=32, patch_size=8, depth=2, num_classes=5),
    "deit_tiny_distilled_patch16_224": dict(img_size=32, patch_size=8, depth=2, num_classes=5),
    "swin_tiny_patch4_window7_224": dict(img_size=32, embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=4,
                                         num_classes=5),
    "mobilevit_xxs": dict(img_size=32, num_classes=5),
    "notes_prenorm_vit_patch32_256": dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, head_dim=16,
                                          mlp_hidden_dim=48, num_classes=5),
    "notes_torch_encoder_vit_patch7_28": dict(depth=2, num_heads=2, num_classes=5),
    "lucidrains_vit_patch32_256": dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, head_dim=16,
                                       mlp_dim=48, num_classes=5),
}  # fmt: skip


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    """vit_tiny_patch16_224's random init written as a user's .npz (what `vitnp export` or np.savez gives)."""
    path = tmp_path_factory.mktemp("weights") / "vit_tiny.npz"
    np.savez(path, **vitnp.create_model(TINY, backend="reference").state_dict())
    return path


def _small_state(name):
    return vitnp.create_model(name, seed=3, **FAMILIES[name]).state_dict()


# ---------------------------------------------------------------------------------------------------- another size


def test_weights_of_another_size_give_a_short_message_with_the_cause(tiny_weights):
    with pytest.raises(vitnp.WeightsError) as caught:
        vitnp.create_model(SMALL_VIT, weights=tiny_weights)
    error = caught.value
    message = str(error)
    assert len(message) < 700 and message.count("\n") <= 4, message
    assert "mis-shaped keys (151)" in message and "and 148 more" in message
    assert "cls_token: weights (1, 1, 192), model (1, 1, 384)" in message
    assert "these weights look like vit_tiny_patch16_224" in message and "embed_dim 192, not 384" in message
    # the full lists are on the exception, and survive pickling (a Dask worker's error reaches the client)
    assert len(error.mis_shaped) == 151 and error.missing == [] and error.unexpected == []
    assert ("blocks.11.mlp.fc2.bias", (192,), (384,)) in error.mis_shaped
    copy = pickle.loads(pickle.dumps(error))
    assert str(copy) == message and copy.mis_shaped == error.mis_shaped and copy.cause == error.cause


def test_a_failed_load_changes_nothing(tiny_weights):
    model = vitnp.create_model(SMALL_VIT, backend="reference", img_size=32, depth=1)
    before = {k: v.copy() for k, v in model.state_dict().items()}
    wrong = {**before, "blocks.0.attn.qkv.weight": np.zeros((3, 384), np.float32)}
    del wrong["norm.bias"]
    with pytest.raises(vitnp.WeightsError) as caught:
        model.load_state_dict(wrong)
    assert caught.value.missing == ["norm.bias"]
    assert caught.value.mis_shaped == [("blocks.0.attn.qkv.weight", (3, 384), (1152, 384))]
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(value, before[key])


def test_many_missing_and_unexpected_keys_are_counted_not_listed():
    model = vitnp.create_model(TINY, backend="reference", img_size=32, depth=4)
    renamed = {"encoder." + k: v for k, v in model.state_dict().items()}
    with pytest.raises(vitnp.WeightsError) as caught:
        model.load_state_dict(renamed)
    error = caught.value
    assert error.missing == list(model.state_dict()) and error.unexpected == list(renamed)
    assert f"missing keys ({len(error.missing)})" in str(error) and f"unexpected keys ({len(renamed)})" in str(error)
    assert len(str(error)) < 700, str(error)


def test_predict_with_weights_of_another_size_prints_one_short_line(tiny_weights, tmp_path, capsys):
    image = tmp_path / "cat.png"
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(image)
    status = main(["predict", str(image), "--model", SMALL_VIT, "--weights", str(tiny_weights)])
    err = capsys.readouterr().err
    assert status == 1
    assert err.startswith("vitnp predict: error: ") and err.count("\n") == 1 and len(err) < 800, err
    assert "vit_tiny_patch16_224" in err and "embed_dim 192, not 384" in err


def test_export_with_a_model_the_weights_do_not_fit_prints_one_short_line(tiny_weights, tmp_path, capsys):
    out = tmp_path / "out.npz"
    status = main(["export", str(tiny_weights), "-o", str(out), "--model", SMALL_VIT])
    err = capsys.readouterr().err
    assert status == 1
    assert err.startswith("vitnp export: error: ") and err.count("\n") == 1 and len(err) < 800, err
    assert "embed_dim 192, not 384" in err
    assert os.listdir(tmp_path) == []  # neither the file nor a temporary one


# ---------------------------------------------------------------------------------------------------- classifier


@pytest.mark.parametrize("name", list(FAMILIES))
def test_num_classes_0_leaves_the_weights_classifier_out(name, tmp_path):
    state = _small_state(name)
    path = tmp_path / "with_head.npz"
    np.savez(path, **state)
    arguments = {k: v for k, v in FAMILIES[name].items() if k != "num_classes"}
    full = vitnp.create_model(name, weights=path, backend="reference", **arguments)
    features = vitnp.create_model(name, weights=path, num_classes=0, backend="reference", **arguments)
    assert features.num_classes == 0 and len(features.state_dict()) < len(state)
    x = images((2, full.in_chans, *full.img_size))
    tokens = full.forward_features(x)
    # vit_pytorch without a head returns every token; the others their pooled features
    expected = tokens if name.startswith("lucidrains") else full.forward_head(tokens, pre_logits=True)
    np.testing.assert_array_equal(features(x), expected)


def test_another_nonzero_num_classes_still_fails_and_says_why(tmp_path):
    path = tmp_path / "five_classes.npz"
    np.savez(path, **_small_state(TINY))
    arguments = {k: v for k, v in FAMILIES[TINY].items() if k != "num_classes"}
    with pytest.raises(vitnp.WeightsError) as caught:
        vitnp.create_model(TINY, weights=path, num_classes=10, **arguments)
    assert [key for key, _, _ in caught.value.mis_shaped] == ["head.weight", "head.bias"]
    assert "classifier has 5 classes, the model 10" in str(caught.value) and "num_classes=0" in str(caught.value)


# ---------------------------------------------------------------------------------------------------- caller's arrays


@pytest.mark.parametrize("backend", BACKENDS)
def test_load_state_dict_neither_shares_nor_freezes_the_callers_arrays(backend):
    model = vitnp.create_model(TINY, backend=backend, **FAMILIES[TINY])
    state = {k: v.copy() for k, v in _small_state(TINY).items()}
    model.load_state_dict(state)
    x = images((2, 3, 32, 32))
    before = model(x)  # the fast backend packs its weights and makes them read-only
    assert all(value.flags.writeable for value in state.values())
    for value in state.values():
        value[...] = 0  # the caller reuses its arrays: the model does not change
    np.testing.assert_array_equal(model(x), before)


# ---------------------------------------------------------------------------------------------------- intermediates


@pytest.mark.parametrize("indices", [[99], [-99], [0, 4], 99, 0, -1, []])
def test_forward_intermediates_refuses_indices_beyond_the_blocks(indices):
    model = vitnp.create_model(TINY, backend="reference", **{**FAMILIES[TINY], "depth": 4})
    with pytest.raises(ValueError, match="do not name blocks of a depth-4 model"):
        model.forward_intermediates(images((1, 3, 32, 32)), indices=indices)


def test_forward_intermediates_takes_negative_indices_from_the_end():
    model = vitnp.create_model(TINY, backend="reference", **{**FAMILIES[TINY], "depth": 4})
    x = images((1, 3, 32, 32))
    _, last = model.forward_intermediates(x, indices=[-1, -4])
    _, named = model.forward_intermediates(x, indices=[0, 3])
    for a, b in zip(last, named):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------------------------------- export's files


def _export(capsys, *args):
    status = main(["export", *map(str, args)])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.fixture
def small_npz(tmp_path):
    """A user's weights file (np.savez of a small ViT) in a folder of its own, with its model's logits."""
    folder = tmp_path / "weights"
    folder.mkdir()
    path = folder / "w.npz"
    state = _small_state(TINY)
    np.savez(path, **state)
    arguments = {k: v for k, v in FAMILIES[TINY].items() if k != "num_classes"}
    model = vitnp.create_model(TINY, weights=state, backend="reference", **arguments)
    return path, arguments, model(images((2, 3, 32, 32)))


def _logits(path, arguments):
    return vitnp.create_model(TINY, weights=path, backend="reference", **arguments)(images((2, 3, 32, 32)))


@pytest.mark.parametrize("spelling", ["same", "no suffix", "relative", "symlink"])
def test_export_onto_its_own_source_keeps_the_weights(small_npz, capsys, monkeypatch, spelling):
    path, arguments, expected = small_npz
    before = path.read_bytes()
    monkeypatch.chdir(path.parent)
    out = {"same": path, "no suffix": path.with_suffix(""), "relative": "./w.npz", "symlink": "link.npz"}[spelling]
    if spelling == "symlink":
        os.symlink("w.npz", "link.npz")
    status, _, err = _export(capsys, path, "-o", out)
    assert status == 0, err
    np.testing.assert_array_equal(_logits(path, arguments), expected)
    if spelling == "symlink":  # the link is replaced by the exported file; the file it named is untouched
        assert path.read_bytes() == before and not os.path.islink("link.npz")
        np.testing.assert_array_equal(_logits("link.npz", arguments), expected)
        assert sorted(os.listdir()) == ["link.npz", "w.npz"]
    else:
        assert os.listdir() == ["w.npz"]  # converted in place, no temporary file left


def test_a_failed_export_onto_its_source_leaves_it_as_it_was(small_npz, capsys):
    path, _, _ = small_npz
    before = path.read_bytes()
    status, _, err = _export(capsys, path, "-o", path, "--model", SMALL_VIT)
    assert status == 1 and "do not fit" in err
    assert path.read_bytes() == before and os.listdir(path.parent) == ["w.npz"]


def test_export_into_an_existing_folder_writes_the_file_inside_it(small_npz, capsys, tmp_path):
    path, arguments, expected = small_npz
    folder = tmp_path / "exports"
    folder.mkdir()
    status, out, err = _export(capsys, path, "-o", folder)
    assert status == 0, err
    assert os.listdir(folder) == ["w.npz"] and not (tmp_path / "exports.npz").exists()
    assert str(folder / "w.npz") in out
    np.testing.assert_array_equal(_logits(folder / "w.npz", arguments), expected)


def test_a_disk_full_during_export_leaves_the_target_and_no_temporary_file(small_npz, capsys, monkeypatch):
    path, _, _ = small_npz
    target = path.parent / "target.npz"
    target.write_bytes(b"the user's previous export")

    def disk_full(file, arrays):
        with open(file, "wb") as f:
            f.write(b"PK half an archive")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(vitnp.weights, "_write_npz", disk_full)
    status, _, err = _export(capsys, path, "-o", target)
    assert status == 1 and err == f"vitnp export: error: cannot write {target}: No space left on device\n"
    assert target.read_bytes() == b"the user's previous export"
    assert sorted(os.listdir(path.parent)) == ["target.npz", "w.npz"]


# ---------------------------------------------------------------------------------------------------- offline


def test_export_pretrained_without_network_fails_at_once(monkeypatch, tmp_path, capsys):
    def unreachable(address, timeout=None, **kwargs):
        raise OSError(errno.ENETUNREACH, "Network is unreachable")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(socket, "create_connection", unreachable)
    monkeypatch.setattr(cli, "timm_state_dict", lambda *args: pytest.fail("timm was asked to download"))
    status, out, err = _export(capsys, TINY, "--pretrained", "-o", tmp_path / "t.npz")
    assert status == 1 and out == "" and err.count("\n") == 1
    assert "cannot reach huggingface.co:443" in err and "Network is unreachable" in err
    assert f"vitnp export {TINY} --pretrained -o {TINY}.npz" in err
    assert os.listdir(tmp_path) == []


def test_export_pretrained_gives_up_on_a_name_lookup_that_hangs(monkeypatch, tmp_path, capsys):
    released = threading.Event()

    def hangs(address, timeout=None, **kwargs):  # getaddrinfo has no timeout of its own
        released.wait(60)
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(socket, "create_connection", hangs)
    monkeypatch.setattr(cli, "HUB_TIMEOUT", 0.5)
    start = time.perf_counter()
    try:
        status, _, err = _export(capsys, TINY, "--pretrained", "-o", tmp_path / "t.npz")
        elapsed = time.perf_counter() - start
    finally:
        released.set()
    assert status == 1 and "cannot reach huggingface.co:443" in err and "timed out" in err
    assert elapsed < 5


def test_export_pretrained_through_a_dead_proxy_fails_within_seconds(tmp_path):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()  # a port nothing listens on: the connection is refused
    env = {**os.environ, "HTTPS_PROXY": f"http://127.0.0.1:{port}"}
    env.pop("HF_HUB_OFFLINE", None)
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "vitnp.cli", "export", TINY, "--pretrained", "-o",
                             str(tmp_path / "t.npz")], env=env, capture_output=True, text=True, timeout=60, check=False)
    elapsed = time.perf_counter() - start
    assert result.returncode == 1 and f"cannot reach 127.0.0.1:{port}" in result.stderr, result.stderr
    assert elapsed < 10, f"{elapsed:.1f} s"
    assert os.listdir(tmp_path) == []
