"""The registry contract: every name, its architecture, class count, parameter count and preprocessing config are
timm's; overrides use timm's constructor names and build what timm's constructor builds.

timm models are built on the meta device (shapes, no memory, no forward). vitnp models are built with random
initialisation switched off (``shapes_only``): filling vit_huge's 632M parameters with random numbers takes tens of
seconds and ~5 GB, and the keys, shapes and counts checked here do not depend on the values (initialisation itself
is tested on a small model below). The checks against timm skip where timm is not installed; the others need no
torch.
"""

import functools

import numpy as np
import pytest
from oracles import DIGITS_TIMM_KWARGS, needs, optional_import

import vitnp
from vitnp import model as vitnp_model

torch = optional_import("torch")
timm = optional_import("timm")
needs_timm = needs("torch", "timm")

NAMES = vitnp.list_models()
DEMO = "vit_digits_patch4_32"
# The notes' own ViTs and lucidrains' ViT are no timm models: tests/test_notes_vit.py and tests/test_models.py compare
# them with their PyTorch code.
NOT_TIMM = {name for _, table in vitnp.notes_vit.FAMILIES for name in table}
# DINO's hubconf names are not timm names either: tests/test_models.py compares them with timm's ViTs of their size,
# tests/test_dino.py with DINO's code.
NOT_TIMM |= set(vitnp.vit.DINO_MODELS)
TIMM_NAMES = [n for n in NAMES if n != DEMO and n not in NOT_TIMM]


@pytest.fixture
def shapes_only(monkeypatch):
    """vitnp.create_model without filling the parameters (they stay lazily allocated zeros)."""
    monkeypatch.setattr(vitnp_model.Model, "init_weights", lambda self, seed=0, dtype=np.float32: None)


def _timm_meta(name, **kwargs):
    """timm's model of a registered name on the meta device; the demo model is its config of timm's ViT (the
    contract its shipped .npz is written against)."""
    from timm.models.vision_transformer import VisionTransformer

    with torch.device("meta"):
        if name == DEMO:
            return VisionTransformer(**{**DIGITS_TIMM_KWARGS, **kwargs})
        return timm.create_model(name, pretrained=False, **kwargs)


@functools.lru_cache(maxsize=None)
def _timm_default(name):
    return _timm_meta(name)


def _shapes(state_dict):
    return [(k, tuple(v.shape)) for k, v in state_dict.items()]


def test_list_models_is_sorted_and_complete():
    assert NAMES == sorted(NAMES)
    required = {
        "vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224", "vit_large_patch16_224",
        "vit_small_patch32_224", "vit_base_patch32_224", "vit_large_patch32_224", "vit_huge_patch14_224",
        "vit_base_patch16_384", "deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224",
        "deit_tiny_distilled_patch16_224", "deit_small_distilled_patch16_224", "deit_base_distilled_patch16_224",
    }  # fmt: skip
    assert required <= set(NAMES), f"missing from the registry: {sorted(required - set(NAMES))}"


@needs_timm
@pytest.mark.parametrize("name", TIMM_NAMES)
def test_name_exists_in_timm(name):
    assert timm.is_model(name), f"{name} is not a timm model name"


@needs_timm
@pytest.mark.parametrize("name", [n for n in NAMES if n not in NOT_TIMM])
def test_architecture_matches_timm(name, shapes_only):
    """Same state_dict keys, in the same order, with the same shapes; same class count; same parameter counts."""
    reference = _timm_default(name)
    model = vitnp.create_model(name)
    assert _shapes(model.state_dict()) == _shapes(reference.state_dict())
    assert model.num_classes == reference.num_classes
    timm_count = sum(p.numel() for p in reference.parameters())
    assert vitnp.count_params(model) == timm_count
    # torchsummary's per-layer hooks never see the parameters the root module holds itself (tokens, pos_embed)
    root_params = sum(p.numel() for p in reference.parameters(recurse=False))
    assert vitnp.count_params(model, "torchsummary") == timm_count - root_params


@needs_timm
@pytest.mark.parametrize("name", TIMM_NAMES)
def test_data_config_matches_timm_pretrained_cfg(name):
    expected = _timm_default(name).pretrained_cfg
    config = vitnp.data_config(name)
    for field in ("input_size", "crop_pct", "interpolation"):
        assert config[field] == expected[field], field
    for field in ("mean", "std"):
        np.testing.assert_allclose(config[field], expected[field], rtol=0, err_msg=field)


@pytest.mark.parametrize("name", NAMES)
def test_data_config_fits_the_model(name, shapes_only):
    model = vitnp.create_model(name)
    config = vitnp.data_config(name)
    assert config["input_size"] == (model.in_chans, *model.img_size)
    assert len(config["mean"]) == len(config["std"]) == model.in_chans


@needs_timm
def test_vit_base_five_classes_parameter_counts(shapes_only):
    """Seed 002 prints 85,650,437 (torchsummary) for this model; timm counts 85,802,501, the difference being the
    class token and the position embedding, which torchsummary does not see."""
    reference = _timm_meta("vit_base_patch16_224", num_classes=5)
    timm_count = sum(p.numel() for p in reference.parameters())
    assert timm_count == 85_802_501
    model = vitnp.create_model("vit_base_patch16_224", num_classes=5)
    assert vitnp.count_params(model) == timm_count
    state = reference.state_dict()
    torchsummary_count = timm_count - state["pos_embed"].numel() - state["cls_token"].numel()
    assert torchsummary_count == 85_650_437
    assert vitnp.count_params(model, "torchsummary") == torchsummary_count
    with pytest.raises(ValueError, match="convention"):
        vitnp.count_params(model, "keras")


# ---------------------------------------------------------------------------------------------------- overrides

OVERRIDES = [
    dict(img_size=64),
    dict(img_size=(64, 96)),
    dict(patch_size=8),
    dict(patch_size=32, img_size=96),
    dict(in_chans=1),
    dict(in_chans=4),
    dict(num_classes=10),
    dict(num_classes=0),
    dict(embed_dim=96),
    dict(depth=3),
    dict(num_heads=4),
    dict(mlp_ratio=2.5),
    dict(qkv_bias=False),
    dict(global_pool="avg"),
    dict(global_pool="avg", fc_norm=False),
    dict(global_pool="max"),
    dict(global_pool=""),
    dict(class_token=False, global_pool="avg"),
    dict(img_size=48, patch_size=8, in_chans=2, num_classes=7, embed_dim=32, depth=2, num_heads=2, mlp_ratio=3.0),
]


@needs_timm
@pytest.mark.parametrize("overrides", OVERRIDES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"])
def test_overrides_build_what_timm_builds(name, overrides, shapes_only):
    if name.startswith("deit") and (overrides.get("global_pool", "token") != "token" or "class_token" in overrides):
        with pytest.raises(ValueError, match="distill|token"):  # timm: DeiT distilled pools its two tokens only
            vitnp.create_model(name, **overrides)
        return
    model = vitnp.create_model(name, **overrides)
    assert _shapes(model.state_dict()) == _shapes(_timm_meta(name, **overrides).state_dict())


def test_num_classes_argument_and_override_agree(shapes_only):
    model = vitnp.create_model("vit_tiny_patch16_224", num_classes=3)
    assert model.num_classes == 3
    assert model.state_dict()["head.weight"].shape == (3, 192)


@needs_timm
@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "vit_small_patch32_224"])
def test_representation_size_adds_the_pre_logits_layer(name, shapes_only):
    """timm 1.x dropped the representation layer: vitnp adds pre_logits.fc (D -> size) before the head."""
    size = 16
    model = vitnp.create_model(name, representation_size=size, num_classes=5)
    expected = _shapes(_timm_meta(name, num_classes=5).state_dict())
    embed_dim = dict(expected)["cls_token"][-1]
    head = expected.index(("head.weight", (5, embed_dim)))
    expected[head] = ("head.weight", (5, size))
    expected[head:head] = [("pre_logits.fc.weight", (size, embed_dim)), ("pre_logits.fc.bias", (size,))]
    assert _shapes(model.state_dict()) == expected


# ---------------------------------------------------------------------------------------------------- errors


def test_unknown_name_suggests_close_names():
    with pytest.raises(ValueError, match="vit_tiny_patch16_224") as error:
        vitnp.create_model("vit_tiny_patch16_22")
    assert "vit_tiny_patch16_22'" in str(error.value)
    with pytest.raises(ValueError, match="list_models"):
        vitnp.create_model("resnet50")
    with pytest.raises(ValueError, match="unknown model name"):
        vitnp.data_config("deit_huge")


def test_unknown_override_is_named():
    with pytest.raises(ValueError, match="embed_dims") as error:
        vitnp.create_model("vit_tiny_patch16_224", embed_dims=96)
    assert "embed_dim" in str(error.value).split("accepted", 1)[1]  # the message lists the accepted names
    with pytest.raises(ValueError, match="distilled"):  # a registry name fixes the DeiT distillation token
        vitnp.create_model("vit_tiny_patch16_224", distilled=True)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(class_token=False), "class_token"),
        (dict(global_pool="mean"), "global_pool"),
        (dict(img_size=100), "multiple of patch_size"),
        (dict(num_heads=5), "divisible"),
        (dict(dtype=np.float16), "float32 or float64"),
    ],
)
def test_impossible_configurations_are_rejected(overrides, message, shapes_only):
    with pytest.raises(ValueError, match=message):
        vitnp.create_model("vit_tiny_patch16_224", **overrides)


# ---------------------------------------------------------------------------------------------------- init


def test_random_init_is_seeded():
    a = vitnp.create_model("vit_tiny_patch16_224", depth=2, seed=1)
    b = vitnp.create_model("vit_tiny_patch16_224", depth=2, seed=1)
    c = vitnp.create_model("vit_tiny_patch16_224", depth=2, seed=2)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(np.array_equal(sa[k], sb[k]) for k in sa)
    assert not np.array_equal(sa["blocks.0.attn.qkv.weight"], sc["blocks.0.attn.qkv.weight"])
    assert all(v.dtype == np.float32 for v in sa.values())
    np.testing.assert_array_equal(sa["blocks.0.norm1.weight"], 1.0)  # as timm: LayerNorm (1, 0), Linear bias 0
    np.testing.assert_array_equal(sa["blocks.0.norm1.bias"], 0.0)
    np.testing.assert_array_equal(sa["blocks.0.attn.qkv.bias"], 0.0)
    assert vitnp.create_model("vit_tiny_patch16_224", depth=1, dtype=np.float64).state_dict()["pos_embed"].dtype == (
        np.float64
    )


@needs_timm
def test_random_init_spread_matches_timm():
    """Linear weights and pos_embed: timm draws trunc_normal_(std=.02) with bounds a=-2, b=2 (absolute values)."""
    model = vitnp.create_model("vit_tiny_patch16_224", depth=1).state_dict()
    reference = timm.create_model("vit_tiny_patch16_224", depth=1, pretrained=False).state_dict()
    for key in ("blocks.0.attn.qkv.weight", "blocks.0.mlp.fc1.weight", "pos_embed"):
        expected = float(reference[key].std())
        assert abs(float(model[key].std()) - expected) < 0.03 * expected, key
