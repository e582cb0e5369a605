"""Hostile and broken configs: a Hugging Face config.json, an export's stored config or create_model's arguments
with wrong types, zero or negative sizes, NaN or negative eps, sizes that do not divide, or absurd sizes are refused
with a ValueError naming the file (or the argument) and the field, before anything is built or allocated. And an empty
batch gives an empty result of the right shape on every family and both backends.

Everything here runs without torch; the files are written by the tests (a few bytes each).
"""

import json
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
from oracles import BACKENDS
from test_models import SMALL  # one small configuration of each model family

import vitnp
from vitnp.cli import main

TINY = "vit_tiny_patch16_224"
SMALL_TINY = dict(img_size=32, patch_size=8, depth=2)


def write_safetensors(path, tensors):
    """A .safetensors file as the format defines it: header length, JSON header padded to 8 bytes, float32 data."""
    header, blobs, offset = {}, [], 0
    for key, value in tensors.items():
        data = np.ascontiguousarray(value, "<f4").tobytes()
        header[key] = {"dtype": "F32", "shape": list(value.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


@pytest.fixture
def hf_folder(tmp_path):
    """A Hugging Face ViT folder: one tensor in HF's names (enough to tell the layout) and a config.json to set."""
    folder = tmp_path / "hf-vit"
    folder.mkdir()
    write_safetensors(folder / "model.safetensors",
                      {"vit.encoder.layer.0.attention.attention.query.weight": np.zeros((4, 4), np.float32)})

    def with_config(config):
        (folder / "config.json").write_text(json.dumps(config))
        return folder

    return with_config


# ---------------------------------------------------------------------------------------------------- config.json


@pytest.mark.parametrize("config, field", [
    ([], "config.json"),
    ("a string", "config.json"),
    ({"hidden_size": 0}, "hidden_size"),
    ({"hidden_size": -768}, "hidden_size"),
    ({"hidden_size": [768]}, "hidden_size"),
    ({"hidden_size": "768"}, "hidden_size"),
    ({"num_attention_heads": 0}, "num_attention_heads"),
    ({"patch_size": 0}, "patch_size"),
    ({"patch_size": -16}, "patch_size"),
    ({"patch_size": True}, "patch_size"),
    ({"layer_norm_eps": "x"}, "layer_norm_eps"),
    ({"layer_norm_eps": -1e-6}, "layer_norm_eps"),
    ({"layer_norm_eps": 0}, "layer_norm_eps"),
    ({"num_hidden_layers": 1e9}, "num_hidden_layers"),
    ({"num_hidden_layers": 10**9}, "depth"),
    ({"image_size": 10**6}, "img_size"),
    ({"intermediate_size": 0}, "intermediate_size"),
    ({"hidden_size": 192, "num_attention_heads": 5}, "num_heads"),
    ({"image_size": 100, "patch_size": 16}, "patch_size"),
    ({"id2label": ["cat", "dog"]}, "id2label"),
    ({"qkv_bias": "yes"}, "qkv_bias"),
    ({"hidden_act": ["gelu"]}, "hidden_act"),
])  # fmt: skip
def test_a_bad_config_json_is_refused_naming_the_folder_and_the_field(hf_folder, config, field):
    folder = hf_folder(config)
    start = time.perf_counter()
    with pytest.raises(ValueError) as caught:
        vitnp.create_model(TINY, weights=folder)
    message = str(caught.value)
    assert str(folder) in message and field in message, message
    assert time.perf_counter() - start < 2  # refused before anything is allocated


@pytest.mark.parametrize("config, field", [([], "config.json"), ({"hidden_size": 0}, "hidden_size"),
                                           ({"layer_norm_eps": "x"}, "layer_norm_eps")])
def test_inspect_of_a_bad_config_json_prints_one_line(hf_folder, capsys, config, field):
    folder = hf_folder(config)
    status = main(["inspect", str(folder)])
    err = capsys.readouterr().err
    assert status == 1 and err.startswith("vitnp inspect: error: ") and err.count("\n") == 1, err
    assert str(folder) in err and field in err


# ---------------------------------------------------------------------------------------------------- exported .npz


@pytest.mark.parametrize("config, field", [
    ([], "__config__"),
    ({"labels": "cat"}, "labels"),
    ({"depth": 10**9}, "depth"),
    ({"norm_eps": float("nan")}, "norm_eps"),
    ({"num_heads": 5}, "num_heads"),
    ({"embed_dim": [192]}, "embed_dim"),
])  # fmt: skip
def test_a_bad_stored_config_in_an_npz_is_refused_naming_the_file(tmp_path, config, field):
    path = tmp_path / "exported.npz"
    state = vitnp.create_model(TINY, **SMALL_TINY).state_dict()
    np.savez(path, **state, __config__=np.array(json.dumps(config)))
    with pytest.raises(ValueError) as caught:
        vitnp.create_model(TINY, weights=path)
    assert str(path) in str(caught.value) and field in str(caught.value), str(caught.value)


# ---------------------------------------------------------------------------------------------------- arguments


@pytest.mark.parametrize("name, arguments, field", [
    (TINY, dict(embed_dim=0), "embed_dim"),
    (TINY, dict(num_heads=0), "num_heads"),
    (TINY, dict(num_heads=-3), "num_heads"),
    (TINY, dict(patch_size=0), "patch_size"),
    (TINY, dict(depth=10**9), "depth"),
    (TINY, dict(depth=[12]), "depth"),
    (TINY, dict(depth=12.0), "depth"),
    (TINY, dict(img_size=(0, 224)), "img_size"),
    (TINY, dict(img_size="224"), "img_size"),
    (TINY, dict(norm_eps=float("nan")), "norm_eps"),
    (TINY, dict(norm_eps=-1e-6), "norm_eps"),
    (TINY, dict(norm_eps="x"), "norm_eps"),
    (TINY, dict(mlp_ratio=0), "mlp_ratio"),
    (TINY, dict(qkv_bias="no"), "qkv_bias"),
    (TINY, dict(num_classes=-1), "num_classes"),
    (TINY, dict(num_heads=5), "num_heads"),  # 192 is not a multiple of 5
    ("swin_tiny_patch4_window7_224", dict(depths=(2, 2, 10**9, 2)), "depths"),
    ("swin_tiny_patch4_window7_224", dict(num_heads=(3, 0, 12, 24)), "num_heads"),
    ("swin_tiny_patch4_window7_224", dict(window_size=0), "window_size"),
    ("swin_tiny_patch4_window7_224", dict(window_size="7"), "window_size"),
    ("mobilevit_xxs", dict(in_chans=0), "in_chans"),
    ("mobilevit_xxs", dict(img_size=-256), "img_size"),
    ("notes_prenorm_vit_patch32_256", dict(head_dim=0), "head_dim"),
    ("notes_torch_encoder_vit_patch7_28", dict(num_heads=0), "num_heads"),
    ("lucidrains_vit_patch32_256", dict(mlp_dim=-1), "mlp_dim"),
])  # fmt: skip
def test_bad_arguments_are_refused_naming_the_argument(name, arguments, field):
    with pytest.raises(ValueError, match=field):
        vitnp.create_model(name, **arguments)


def test_a_model_beyond_the_parameter_bound_is_refused_before_it_is_allocated():
    """In a child process limited to 2 GiB of address space: the refusal allocates nothing."""
    script = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))\n"
        "import vitnp\n"
        "try:\n"
        "    vitnp.create_model('vit_tiny_patch16_224', embed_dim=16384, depth=256, num_heads=16)\n"
        "except ValueError as error:\n"
        "    print(error)\n"
        "    sys.exit(3)\n"
    )
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 3, result.stderr[-2000:]
    assert "vit_tiny_patch16_224 with these arguments" in result.stdout
    assert time.perf_counter() - start < 30


@pytest.mark.parametrize("name", vitnp.list_models())
def test_every_registered_model_is_within_the_bounds(name):
    family, arguments, _ = vitnp.registry._lookup(name)
    vitnp.registry.check_arguments(family.Config, arguments)
    model = family(family.Config(**arguments))  # built, not initialised: its parameters are untouched zero pages
    assert vitnp.count_params(model) < vitnp.registry.MAX_PARAMETERS


# ---------------------------------------------------------------------------------------------------- empty batch


@pytest.mark.parametrize("num_classes", [None, 0])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(SMALL))
def test_an_empty_batch_gives_an_empty_result(name, backend, num_classes):
    model = vitnp.create_model(name, backend=backend, num_classes=num_classes, **SMALL[name])
    one = model(np.zeros((1, model.in_chans, *model.img_size), np.float32))
    empty = model(np.zeros((0, model.in_chans, *model.img_size), np.float32))
    assert empty.shape == (0, *one.shape[1:]) and empty.dtype == one.dtype
