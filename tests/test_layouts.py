"""Foreign checkpoint layouts: each source model is built in its own library with random weights, saved the way its
users save it (state_dict .pth, save_pretrained folder, safetensors, training checkpoints), loaded through
``vitnp.create_model(name, weights=...)`` and compared with the source model's own output (fp32 'model' tolerance
of tests/tolerances.py). The real torchvision builders (vit_b_16 ... vit_h_14, swin_t / s / b) are checked on the
meta device: converted keys and shapes equal timm's, and the architecture guess names the timm model. Every parameter
and BatchNorm statistic of the source models is drawn by ``oracles.randomise_``, so that each one counts.
"""

import argparse
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from oracles import images, needs, optional_import, randomise_
from tolerances import assert_close

import vitnp
from vitnp import layouts, registry

torch = optional_import("torch")
timm = optional_import("timm")
needs_torch = needs("torch")
needs_timm = needs("torch", "timm")

TINY_VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
TINY_SWIN = dict(img_size=56, embed_dim=16, depths=(2, 2), num_heads=(2, 4))  # stage maps 14x14 (shifted) and 7x7


def _images(size, batch=2, chans=3, seed=0):
    return images((batch, chans, size, size), seed=seed)


def _run(module, x, **kwargs):
    with torch.no_grad():
        out = module(torch.from_numpy(x), **kwargs) if not kwargs else module(**kwargs)
    return out


def _check(actual, expected):
    expected = expected.detach().numpy() if hasattr(expected, "detach") else expected
    assert np.abs(expected).max() > 1e-2  # something to compare
    assert_close(actual, expected, "model", np.float32)


# ---------------------------------------------------------------------------------------------------- torchvision


@needs_torch
@settings(max_examples=4)
@given(
    heads=st.sampled_from([1, 2, 4]),
    depth=st.integers(1, 2),
    representation_size=st.sampled_from([None, 24]),
    num_classes=st.sampled_from([5, 10]),
)
def test_torchvision_vit(tmp_path_factory, heads, depth, representation_size, num_classes):
    """torchvision VisionTransformer (heads.pre_logits + Tanh -> pre_logits.fc, seed 002's representation layer)."""
    torchvision = pytest.importorskip("torchvision")
    source = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=depth, num_heads=heads,
                                                  hidden_dim=32, mlp_dim=64, num_classes=num_classes,
                                                  representation_size=representation_size).eval()
    randomise_(source)
    path = tmp_path_factory.mktemp("tv") / "vit.pth"
    torch.save(source.state_dict(), path)
    model = vitnp.create_model("vit_tiny_patch16_224", weights=path, **{**TINY_VIT, "depth": depth,
                                                                          "num_heads": heads}, mlp_ratio=2.0)
    assert model.cfg.representation_size == representation_size and model.num_classes == num_classes
    x = _images(32)
    _check(model(x), _run(source, x))


TV_VIT = {"vit_b_16": "vit_base_patch16_224", "vit_b_32": "vit_base_patch32_224", "vit_l_16": "vit_large_patch16_224",
          "vit_l_32": "vit_large_patch32_224", "vit_h_14": "vit_huge_patch14_224"}
TV_SWIN = {"swin_t": "swin_tiny_patch4_window7_224", "swin_s": "swin_small_patch4_window7_224",
           "swin_b": "swin_base_patch4_window7_224"}


def _shape_dict(module):
    """{key: zero-memory array of the key's shape} of a meta-device module's state_dict."""
    return {k: np.broadcast_to(np.float32(0), tuple(v.shape)) for k, v in module.state_dict().items()}


@needs_timm
@pytest.mark.parametrize("builder, timm_name", [*TV_VIT.items(), *TV_SWIN.items()])
def test_torchvision_builders_map_onto_timm(builder, timm_name):
    torchvision = pytest.importorskip("torchvision")
    with torch.device("meta"):
        source = getattr(torchvision.models, builder)()
        reference = timm.create_model(timm_name, num_classes=1000)
    checkpoint = layouts.from_raw(_shape_dict(source))
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert {k: v.shape for k, v in checkpoint.state_dict.items()} == expected
    assert checkpoint.config["num_classes"] == 1000
    assert timm_name in layouts.guess_models(checkpoint, registry.family_tables(checkpoint.layout.family))


@needs_torch
def test_torchvision_swin(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    source = torchvision.models.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 4],
                                                window_size=[7, 7], num_classes=5).eval()
    randomise_(source)
    torch.save(source.state_dict(), tmp_path / "swin.pth")
    model = vitnp.create_model("swin_tiny_patch4_window7_224", weights=tmp_path / "swin.pth", **TINY_SWIN)
    x = _images(56)
    _check(model(x), _run(source, x))


# ---------------------------------------------------------------------------------------------------- Hugging Face


def _hf_vit_config(transformers, cls=None, **kwargs):
    config_cls = transformers.DeiTConfig if cls == "deit" else transformers.ViTConfig
    return config_cls(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
                      patch_size=8, num_labels=5, **kwargs)


@needs_torch
def test_hf_vit_for_image_classification_hub_folder_and_5x_safetensors(tmp_path):
    """save_pretrained writes the 4.x / Hub names; state_dict() has the 5.x names (saved here as safetensors)."""
    transformers = pytest.importorskip("transformers")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    source = randomise_(transformers.ViTForImageClassification(_hf_vit_config(transformers)).eval())
    x = _images(32)
    expected = _run(source, x, pixel_values=torch.from_numpy(x)).logits
    source.save_pretrained(tmp_path / "hub")
    model = vitnp.create_model("vit_tiny_patch16_224", weights=tmp_path / "hub")
    _check(model(x), expected)
    state = source.state_dict()
    assert "vit.layers.0.attention.q_proj.weight" in state  # the 5.x names
    safetensors_torch.save_file(state, str(tmp_path / "v5.safetensors"))
    model = vitnp.create_model("vit_tiny_patch16_224", weights=tmp_path / "v5.safetensors", **TINY_VIT,
                               mlp_ratio=2.0)
    assert model.cfg.norm_eps == 1e-12  # HF ViT's default when no config.json says otherwise
    _check(model(x), expected)


@needs_torch
@pytest.mark.parametrize("pooler", [True, False])
def test_hf_vit_model(tmp_path, pooler):
    """ViTModel: pooler.dense + Tanh is the representation layer; without a pooler, the normed class token."""
    transformers = pytest.importorskip("transformers")
    source = transformers.ViTModel(_hf_vit_config(transformers), add_pooling_layer=pooler).eval()
    randomise_(source)
    source.save_pretrained(tmp_path)
    model = vitnp.create_model("vit_small_patch16_224", weights=tmp_path)
    x = _images(32)
    out = _run(source, x, pixel_values=torch.from_numpy(x))
    _check(model(x), out.pooler_output if pooler else out.last_hidden_state[:, 0])
    _check(model.forward_features(x), out.last_hidden_state)


@needs_torch
def test_hf_deit_with_teacher(tmp_path):
    transformers = pytest.importorskip("transformers")
    source = transformers.DeiTForImageClassificationWithTeacher(_hf_vit_config(transformers, "deit")).eval()
    randomise_(source)
    x = _images(32)
    expected = _run(source, x, pixel_values=torch.from_numpy(x)).logits  # mean of the two heads
    source.save_pretrained(tmp_path)
    _check(vitnp.create_model("deit_tiny_distilled_patch16_224", weights=tmp_path)(x), expected)
    model = vitnp.create_model("deit_tiny_distilled_patch16_224", weights=source.state_dict(), **TINY_VIT,
                               mlp_ratio=2.0)  # 5.x names
    _check(model(x), expected)


def _hf_swin(transformers, cls):
    config = transformers.SwinConfig(image_size=56, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 4],
                                     window_size=7, num_labels=5)
    return randomise_(getattr(transformers, cls)(config).eval())


@needs_torch
def test_hf_swin_for_image_classification(tmp_path):
    transformers = pytest.importorskip("transformers")
    source = _hf_swin(transformers, "SwinForImageClassification")
    x = _images(56)
    expected = _run(source, x, pixel_values=torch.from_numpy(x)).logits
    source.save_pretrained(tmp_path)
    _check(vitnp.create_model("swin_tiny_patch4_window7_224", weights=tmp_path)(x), expected)
    model = vitnp.create_model("swin_tiny_patch4_window7_224", weights=source.state_dict(), **TINY_SWIN)
    _check(model(x), expected)


@needs_torch
def test_hf_swin_model_headless(tmp_path):
    transformers = pytest.importorskip("transformers")
    source = _hf_swin(transformers, "SwinModel")
    source.save_pretrained(tmp_path)
    model = vitnp.create_model("swin_tiny_patch4_window7_224", weights=tmp_path)
    assert model.num_classes == 0
    x = _images(56)
    _check(model(x), _run(source, x, pixel_values=torch.from_numpy(x)).pooler_output)


@needs_torch
def test_hf_mobilevit(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.MobileViTConfig(hidden_sizes=[64, 80, 96], neck_hidden_sizes=[16, 16, 24, 48, 64, 80, 320],
                                          expand_ratio=2.0, num_labels=5, image_size=64)  # mobilevit_xxs
    source = randomise_(transformers.MobileViTForImageClassification(config).eval())
    source.save_pretrained(tmp_path)
    info = layouts.describe(tmp_path, registry.family_tables)
    assert info["layout"] == "hf-mobilevit" and info["models"] == ["mobilevit_xxs"]
    model = vitnp.create_model("mobilevit_xxs", weights=tmp_path)
    x = np.random.default_rng(0).random((2, 3, 64, 64), dtype=np.float32)
    _check(model(x), _run(source, x, pixel_values=torch.from_numpy(x)).logits)


# ------------------------------------------------------------------------------------------- DINO, original Swin


@needs_timm
def test_dino_training_checkpoint(tmp_path):
    """{'teacher': MultiCropWrapper, 'student': DDP(MultiCropWrapper), 'args', ...}: the teacher backbone loads, the
    DINO projection head is dropped, and the model is headless."""
    torch.manual_seed(0)
    backbone = timm.create_model("vit_small_patch16_224", num_classes=0, **TINY_VIT).eval()
    randomise_(backbone)
    dino_head = {"head.mlp.0.weight": torch.randn(64, 32), "head.mlp.0.bias": torch.zeros(64),
                 "head.last_layer.weight_g": torch.ones(1, 16), "head.last_layer.weight_v": torch.randn(100, 16)}
    teacher = {**{"backbone." + k: v for k, v in backbone.state_dict().items()}, **dino_head}
    student = {"module." + k: v + 1 for k, v in teacher.items()}
    torch.save({"student": student, "teacher": teacher, "epoch": 100, "args": argparse.Namespace(arch="vit_small"),
                "dino_loss": {"center": torch.zeros(1, 100)}}, tmp_path / "checkpoint.pth")
    info = layouts.describe(tmp_path / "checkpoint.pth", registry.family_tables)
    assert info["layout"] == "timm-vit" and any("DINO head" in note for note in info["notes"])
    model = vitnp.create_model("vit_small_patch16_224", weights=tmp_path / "checkpoint.pth", **TINY_VIT)
    assert model.num_classes == 0
    x = _images(32)
    _check(model(x), _run(backbone, x))


def _original_swin_state(reference):
    """The microsoft/Swin-Transformer layout of a timm model: merging at stage end, ``head``, persistent buffers."""
    state = {}
    for key, value in reference.state_dict().items():
        key = re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m[1]) - 1}.downsample", key)
        state[key.replace("head.fc.", "head.")] = value
    for name, module in reference.named_modules():
        if name.endswith(".attn") and hasattr(module, "relative_position_index"):
            state[f"{name}.relative_position_index"] = module.relative_position_index
        if getattr(module, "attn_mask", None) is not None:
            state[f"{name}.attn_mask"] = module.attn_mask
    return state


@needs_timm
def test_original_swin_checkpoint(tmp_path):
    from timm.models.swin_transformer import checkpoint_filter_fn

    reference = randomise_(timm.create_model("swin_tiny_patch4_window7_224", num_classes=5, **TINY_SWIN).eval())
    original = _original_swin_state(reference)
    assert "layers.0.downsample.reduction.weight" in original and any(k.endswith("attn_mask") for k in original)
    filtered = checkpoint_filter_fn(original, reference)  # timm's own reading of the original layout is the oracle
    assert list(filtered) == list(reference.state_dict())
    torch.save({"model": original, "epoch": 300}, tmp_path / "swin_tiny_patch4_window7_224.pth")
    model = vitnp.create_model("swin_tiny_patch4_window7_224", weights=tmp_path / "swin_tiny_patch4_window7_224.pth",
                               **TINY_SWIN)
    x = _images(56)
    _check(model(x), _run(reference, x))


# ---------------------------------------------------------------------------------------------------- errors


@needs_torch
def test_weights_of_another_architecture_fail_clearly(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    source = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2,
                                                  hidden_dim=32, mlp_dim=64, num_classes=5)
    torch.save(source.state_dict(), tmp_path / "vit.pth")
    with pytest.raises(layouts.LayoutError, match=r"torchvision VisionTransformer.*'swin_tiny_patch4_window7_224' is "
                                                  r"a SwinTransformer"):
        vitnp.create_model("swin_tiny_patch4_window7_224", weights=tmp_path / "vit.pth")
    with pytest.raises(layouts.LayoutError, match="is a LucidrainsViT"):
        vitnp.create_model("lucidrains_vit_patch32_256", weights=tmp_path / "vit.pth")


@needs_timm
def test_suggests_the_registered_names_that_fit():
    with torch.device("meta"):
        source = timm.create_model("swin_tiny_patch4_window7_224")
    with pytest.raises(layouts.LayoutError, match="try swin_tiny_patch4_window7_224"):
        layouts.check_family(layouts.from_raw(_shape_dict(source)), "VisionTransformer", "vit_base_patch16_224",
                             registry.family_tables)


def test_unknown_layout_lists_what_was_looked_for():
    state = {"encoder.weight": np.zeros((2, 2)), "decoder.weight": np.zeros((2, 2))}
    with pytest.raises(layouts.LayoutError) as error:
        vitnp.create_model("vit_tiny_patch16_224", weights=state)
    message = str(error.value)
    assert "cannot tell the layout" in message and "encoder.weight" in message
    for layout in layouts.LAYOUTS:
        assert layout.name in message and layout.sentinels[0][0] in message


@needs_timm
def test_detect_layout_names():
    with torch.device("meta"):
        vit = timm.create_model("vit_tiny_patch16_224")
    assert layouts.detect_layout(_shape_dict(vit)) == "timm-vit"
    wrapped = {"model." + k: v for k, v in _shape_dict(vit).items()}
    assert layouts.detect_layout(wrapped) == "timm-vit"
    assert list(layouts.to_timm(wrapped)) == list(vit.state_dict())
