"""Weight readers: .safetensors without torch (f32 / f16 / bf16 / integers), Hugging Face folders (config.json,
safetensors, pytorch_model.bin, shards), PyTorch pickles with wrappers, the .npz export, and their errors.

Files are written by the libraries that users write them with (safetensors, torch, transformers); the values read
back are compared with what those libraries hold. The broken-file checks need no torch.
"""

import argparse
import json
import struct
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from oracles import images, needs, optional_import, randomise_, run, timm_model
from tolerances import assert_close

import vitnp
from vitnp import layouts, registry, weights
from vitnp.weights import WeightsFileError

torch = optional_import("torch")
safetensors_torch = optional_import("safetensors.torch")
needs_torch = needs("torch", "safetensors.torch")

TORCH_DTYPES = ["bfloat16", "bool", "float16", "float32", "float64", "int32", "int64", "uint8"]  # torch.<name>


@needs_torch
@settings(max_examples=15)
@given(
    dtypes=st.lists(st.sampled_from(TORCH_DTYPES), min_size=1, max_size=4),
    shape=st.lists(st.integers(0, 5), min_size=0, max_size=3),
    seed=st.integers(0, 2**16),
)
def test_safetensors_reader_matches_torch(tmp_path_factory, dtypes, shape, seed):
    """Every tensor reads back bit-exactly; bfloat16 arrives as float32 equal to ``tensor.float()``."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for i, name in enumerate(dtypes):
        values = torch.randn(shape, generator=generator, dtype=torch.float64) * 100
        tensors[f"t{i}.{name}"] = values.to(getattr(torch, name))
    path = tmp_path_factory.mktemp("st") / "w.safetensors"
    safetensors_torch.save_file(tensors, str(path))
    state_dict, stored = weights.read_safetensors(path)
    assert set(state_dict) == set(tensors)
    for key, tensor in tensors.items():
        expected = (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()
        assert stored[key] == key.split(".")[1]
        assert state_dict[key].dtype == expected.dtype and state_dict[key].shape == expected.shape
        np.testing.assert_array_equal(state_dict[key], expected)


@needs_torch
def test_bfloat16_widening_is_exact_for_every_bit_pattern():
    bits = np.arange(2**16, dtype=np.uint16)
    expected = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).float().numpy()
    actual = weights.bfloat16_to_float32(bits)
    np.testing.assert_array_equal(actual.view(np.uint32), expected.view(np.uint32))  # nan payloads included


@needs_torch
def test_safetensors_arrays_are_read_into_read_only_memory(tmp_path):
    path = tmp_path / "w.safetensors"
    safetensors_torch.save_file({"a": torch.arange(1000, dtype=torch.float32)}, str(path))
    array = vitnp.load_weights(path)["a"]
    assert array.flags.owndata and not array.flags.writeable
    np.testing.assert_array_equal(array, np.arange(1000, dtype=np.float32))


def _hf_vit(transformers, **kwargs):
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                                    image_size=32, patch_size=8, num_labels=3, **kwargs)
    config.id2label = {0: "cat", 1: "dog", 2: "fish"}
    config.label2id = {v: k for k, v in config.id2label.items()}
    return randomise_(transformers.ViTForImageClassification(config)).eval()


def _images(batch=2, size=32):
    return images((batch, 3, size, size))


def _logits(model, x):
    with torch.no_grad():
        return model(pixel_values=torch.from_numpy(x)).logits.numpy()


@needs_torch
def test_hf_folder_config_facts(tmp_path):
    """config.json gives heads, LayerNorm eps (HF's default 1e-12 when unset), image / patch size and labels."""
    transformers = pytest.importorskip("transformers")
    hf = _hf_vit(transformers)
    hf.save_pretrained(tmp_path)
    raw = weights.read_checkpoint(tmp_path)
    assert raw.hf_config["num_attention_heads"] == 4 and raw.hf_config["layer_norm_eps"] == 1e-12
    model = vitnp.create_model("vit_base_patch16_224", weights=tmp_path)  # every size comes from the folder
    cfg = model.cfg
    assert (cfg.num_heads, cfg.norm_eps, cfg.embed_dim, cfg.depth, cfg.patch_size, cfg.num_classes) == (
        4, 1e-12, 32, 2, 8, 3)
    assert model.img_size == (32, 32) and cfg.mlp_ratio == 1.5
    assert model.labels == ["cat", "dog", "fish"]
    x = _images()
    assert_close(model(x), _logits(hf, x), "model")


@needs_torch
def test_hf_folder_pytorch_model_bin_and_shards(tmp_path):
    """The other folder forms: pytorch_model.bin (4.x names, torch pickle) and a sharded safetensors index."""
    transformers = pytest.importorskip("transformers")
    hf = _hf_vit(transformers, layer_norm_eps=1e-6)
    x = _images()
    expected = _logits(hf, x)
    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").exists()
    assert len(list(sharded.glob("model-*.safetensors"))) > 1
    assert any(".attention.attention." in k for k in vitnp.load_weights(sharded))  # the 4.x / Hub names
    binary = tmp_path / "bin"
    binary.mkdir()
    (binary / "config.json").write_text((sharded / "config.json").read_text())
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in vitnp.load_weights(sharded).items()},
               binary / "pytorch_model.bin")
    for folder in (sharded, binary):
        model = vitnp.create_model("vit_tiny_patch16_224", weights=folder)
        assert model.cfg.norm_eps == 1e-6
        assert_close(model(x), expected, "model")


@needs_torch
def test_bf16_safetensors_checkpoint(tmp_path):
    """A bfloat16 save_pretrained folder: vitnp widens exactly, so it equals the torch model run in float32 on the
    bf16-rounded weights."""
    transformers = pytest.importorskip("transformers")
    hf = _hf_vit(transformers).to(torch.bfloat16)
    hf.save_pretrained(tmp_path)
    assert set(layouts.describe(tmp_path, registry.family_tables)["dtypes"]) == {"bfloat16"}
    hf = hf.float()
    model = vitnp.create_model("vit_tiny_patch16_224", weights=tmp_path)
    for key, value in model.state_dict().items():
        assert value.dtype == np.float32
    x = _images()
    assert_close(model(x), _logits(hf, x), "model")


@needs("torch", "timm")
def test_torch_pickle_with_wrappers_and_namespace(tmp_path):
    """{'model': ..., 'epoch': ..., 'args': Namespace} with a 'module.' prefix, as training scripts save."""
    reference = timm_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2,
                           num_classes=4)
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": {"module." + k: v for k, v in reference.state_dict().items()}, "epoch": 7,
                "args": argparse.Namespace(lr=0.1), "optimizer": {"param_groups": [{"lr": 0.1}]}}, path)
    raw = weights.read_checkpoint(path)
    assert all(k.startswith("model.module.") for k in raw.state_dict)
    model = vitnp.create_model("vit_tiny_patch16_224", weights=path, img_size=32, patch_size=8, embed_dim=32,
                               depth=1, num_heads=2)
    assert model.num_classes == 4
    x = _images()
    assert_close(model(x), run(reference, x), "model")


@needs_torch
def test_export_npz_round_trip_keeps_config_and_labels(tmp_path):
    """HF folder -> .npz in timm names with the config: loads without torch into the same model."""
    transformers = pytest.importorskip("transformers")
    hf = _hf_vit(transformers)
    hf.save_pretrained(tmp_path / "hf")
    layouts.export_npz(tmp_path / "hf", tmp_path / "vit.npz")
    raw = weights.read_checkpoint(tmp_path / "vit.npz")
    assert "blocks.0.attn.qkv.weight" in raw.state_dict and weights.CONFIG_KEY not in raw.state_dict
    assert raw.saved_config["norm_eps"] == 1e-12 and raw.saved_config["labels"] == ["cat", "dog", "fish"]
    model = vitnp.create_model("vit_tiny_patch16_224", weights=tmp_path / "vit.npz")
    assert model.cfg.num_heads == 4 and model.labels == ["cat", "dog", "fish"]
    x = _images()
    assert_close(model(x), _logits(hf, x), "model")


@needs_torch
def test_describe_reports_layout_architecture_and_counts(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    source = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                  hidden_dim=32, mlp_dim=128, num_classes=5)
    path = tmp_path / "tv.pth"
    torch.save(source.state_dict(), path)
    info = layouts.describe(path, registry.family_tables)
    assert info["layout"] == "torchvision-vit" and info["family"] == "VisionTransformer"
    assert info["num_params"] == sum(p.numel() for p in source.parameters())
    assert info["dtypes"] == {"float32": len(source.state_dict())}
    assert info["architecture"]["embed_dim"] == 32 and info["architecture"]["depth"] == 2
    assert info["config"] == {"num_classes": 5}


# ---------------------------------------------------------------------------------------------------- errors


def _header_file(path, header, data=b""):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


@pytest.mark.parametrize(
    "content, message",
    [
        (b"\x01\x02", "too short"),
        (struct.pack("<Q", 10**9) + b"{}", "runs past the end"),
        (struct.pack("<Q", 4) + b"nope", "not valid JSON"),
    ],
)
def test_safetensors_broken_headers(tmp_path, content, message):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(WeightsFileError, match=message):
        vitnp.load_weights(path)


def test_safetensors_bad_entries(tmp_path):
    fp8 = {"a": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}}
    with pytest.raises(WeightsFileError, match="F8_E4M3"):
        vitnp.load_weights(_header_file(tmp_path / "a.safetensors", fp8, b"\0\0"))
    wrong_size = {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}
    with pytest.raises(WeightsFileError, match="needs 12"):
        vitnp.load_weights(_header_file(tmp_path / "b.safetensors", wrong_size, b"\0" * 8))
    truncated = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}
    with pytest.raises(WeightsFileError, match="truncated"):
        vitnp.load_weights(_header_file(tmp_path / "c.safetensors", truncated, b"\0" * 8))


def test_unreadable_inputs(tmp_path):
    with pytest.raises(WeightsFileError, match="not found"):
        vitnp.load_weights(tmp_path / "missing.safetensors")
    (tmp_path / "w.onnx").write_bytes(b"x")
    with pytest.raises(WeightsFileError, match="unsupported weights file"):
        vitnp.load_weights(tmp_path / "w.onnx")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsFileError, match="model.safetensors"):
        vitnp.load_weights(tmp_path / "empty")


def test_a_torch_file_without_torch_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # ``import torch`` raises ImportError, as where it is missing
    (tmp_path / "model.pth").write_bytes(b"any bytes")
    with pytest.raises(WeightsFileError, match=r"model\.pth is a PyTorch pickle; reading it needs torch.*vitnp export"):
        vitnp.load_weights(tmp_path / "model.pth")


@needs_torch
def test_unreadable_torch_files(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"not a pickle")
    with pytest.raises(WeightsFileError, match="cannot read"):
        vitnp.load_weights(tmp_path / "junk.pth")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pth")  # a whole module, not a state_dict
    with pytest.raises(WeightsFileError, match="state_dict"):
        vitnp.load_weights(tmp_path / "module.pth")


@needs("torch", "safetensors.torch", "timm")
def test_cli_inspect(tmp_path, capsys):
    import timm

    from vitnp import cli

    with torch.device("meta"):
        shapes = timm.create_model("deit_tiny_distilled_patch16_224").state_dict()
    state = {k: torch.zeros(v.shape, dtype=torch.float16) for k, v in shapes.items()}
    safetensors_torch.save_file(state, str(tmp_path / "deit.safetensors"))
    assert cli.main(["inspect", str(tmp_path / "deit.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "timm-vit" in out and "deit_tiny_distilled_patch16_224" in out and "float16: 155" in out
    assert f"{sum(v.numel() for v in shapes.values()):,}" in out
    np.savez(tmp_path / "other.npz", a=np.zeros(2))
    assert cli.main(["inspect", str(tmp_path / "other.npz")]) == 1
    assert "looked for these sentinel keys" in capsys.readouterr().err
