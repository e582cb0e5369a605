"""timm's ``VisionTransformer`` constructor options of the ViTs people run today, against timm 1.0.31: register tokens,
``no_embed_class``, ``norm_pre`` (``pre_norm``), LayerScale (``init_values``), ``qk_norm``, SwiGLUPacked, QuickGELU and
the attention-pool head (``global_pool='map'``), on random weights, float32 and float64, both backends; the DINOv2
position-embedding resamplers against the torch calls of DINOv2's and Hugging Face's code; the registered DINOv2,
CLIP, SigLIP and DeiT III names against timm's configs and parameter counts.

Every parameter of the timm models is drawn by ``oracles.randomise_``: LayerScale gammas, q / k norms, registers, the
attention pool's latent and norms are all far from their init, so that a feature left out or applied in the wrong
place changes the numbers. Each feature is also shown to matter: the same weights without it give other outputs.
"""

import functools
import math
from functools import partial

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from oracles import BACKENDS, images, in_dtype, materialise, needs, numpy_state, optional_import, random_state
from tolerances import TOLERANCES, assert_close

import vitnp
from vitnp import vit
from vitnp.model import count_params
from vitnp.reference import resample

torch = optional_import("torch")
timm = optional_import("timm")
needs_timm = needs("torch", "timm")
DTYPES = (np.float32, np.float64)
FEW = min(6, settings().max_examples)  # Hypothesis examples per backend: each builds a timm model and a vitnp one

# A small model (img 32, patch 8: a 4x4 grid; 4 heads of 8 channels); each case adds options to it
SMALL = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, mlp_ratio=2.0, num_classes=5)
CASES = {
    "dinov2_registers": dict(reg_tokens=4, no_embed_class=True, init_values=1e-5),
    "registers_with_positions": dict(reg_tokens=2),  # pos_embed covers cls and the registers
    "registers_without_class_token": dict(class_token=False, reg_tokens=3, global_pool="avg"),
    "clip_quickgelu": dict(pre_norm=True, norm_eps=1e-5, act="quick_gelu"),
    "siglip_map": dict(class_token=False, global_pool="map"),
    "map_after_prefix_tokens": dict(reg_tokens=1, global_pool="map", act="gelu_tanh"),
    "qk_norm": dict(qk_norm=True, qkv_bias=False),
    "dinov2_giant_swiglu": dict(init_values=1e-5, mlp_layer="swiglu_packed", act="silu", mlp_ratio=2.66667 * 2),
    "deit3": dict(no_embed_class=True, init_values=1e-6),
}
# Everything at once, for the intermediate outputs and the trace
ALL_AT_ONCE = dict(reg_tokens=2, no_embed_class=True, init_values=0.1, qk_norm=True, pre_norm=True, norm_eps=1e-5,
                   act="quick_gelu")


def _timm_kwargs(options):
    """timm's constructor arguments for vitnp's config ``options`` (vitnp names timm's layer choices by strings)."""
    kwargs = {**SMALL, **options}
    kwargs["norm_layer"] = partial(timm.layers.LayerNorm, eps=kwargs.pop("norm_eps", 1e-6))
    act = kwargs.pop("act", "gelu")
    if act != "gelu":
        kwargs["act_layer"] = act  # timm's names: 'quick_gelu', 'gelu_tanh', 'silu'
    if kwargs.pop("mlp_layer", "mlp") == "swiglu_packed":
        kwargs["mlp_layer"] = timm.layers.SwiGLUPacked
    return kwargs


@functools.lru_cache(maxsize=1)  # the dtypes and backends of a case share its timm model
def _timm_vit(options_items, dynamic=False, seed=0):
    from timm.models.vision_transformer import VisionTransformer

    with torch.device("meta"):
        model = VisionTransformer(**_timm_kwargs(dict(options_items)), dynamic_img_size=dynamic, weight_init="skip")
    return materialise(model, seed)


def _vitnp_vit(state, dtype, backend, **options):
    model = vit.VisionTransformer(vit.ViTConfig(**{**SMALL, **options})).set_backend(backend)
    model.dtype = np.dtype(dtype)
    model.load_state_dict(state)
    return model


def _torch_outputs(reference, x):
    """timm's forward_features, pre-logits and logits of the NumPy batch x."""
    with torch.no_grad():
        features = reference.forward_features(torch.from_numpy(x))
        pre_logits = reference.forward_head(features, pre_logits=True)
        return features.numpy(), pre_logits.numpy(), reference.forward_head(features).numpy()


def _assert_matches_timm(options, dtype, backend, size=(32, 32), batch=2, seed=0):
    dynamic = tuple(size) != (32, 32)
    reference = in_dtype(_timm_vit(tuple(sorted(options.items())), dynamic, seed), dtype)
    model = _vitnp_vit(numpy_state(reference), dtype, backend, **options)
    x = images((batch, 3, *size), dtype, seed=seed)
    features_t, pre_logits_t, logits_t = _torch_outputs(reference, x)
    features = model.forward_features(x)
    assert features.dtype == dtype
    # timm resamples the position embedding in float32 even for a float64 model: there, float32 precision
    precision = np.float32 if dynamic else dtype
    assert_close(features, features_t, "model", precision)
    assert np.abs(logits_t).max() > 1e-2  # the comparison has something to compare
    assert_close(model.forward_head(features, pre_logits=True), pre_logits_t, "model", precision)
    assert_close(model(x), logits_t, "model", precision)


# ---- each option against timm ----------------------------------------------------------------------------------------


@needs_timm
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_option_matches_timm(case, dtype, backend):
    _assert_matches_timm(CASES[case], dtype, backend)


@needs_timm
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["dinov2_registers", "registers_with_positions", "siglip_map"])
def test_other_image_size_matches_timm_dynamic_img_size(case, dtype, backend):
    """A 40x24 image (grid 5x3 from the trained 4x4): timm's resampler, over the patches' positions only."""
    _assert_matches_timm(CASES[case], dtype, backend, size=(40, 24))


@st.composite
def option_cases(draw):
    """Any combination of the options, any image size (the position embedding resampled), one or two images."""
    class_token = draw(st.booleans())
    mlp_layer = draw(st.sampled_from(["mlp", "swiglu_packed"]))
    act = "silu" if mlp_layer == "swiglu_packed" else draw(st.sampled_from(["gelu", "quick_gelu", "gelu_tanh"]))
    options = dict(
        class_token=class_token, reg_tokens=draw(st.integers(0, 3)), no_embed_class=draw(st.booleans()),
        pre_norm=draw(st.booleans()), init_values=draw(st.sampled_from([None, 1e-5, 0.5])),
        qk_norm=draw(st.booleans()), global_pool=draw(st.sampled_from(["avg", "map", ""] + ["token"] * class_token)),
        mlp_layer=mlp_layer, act=act, norm_eps=draw(st.sampled_from([1e-6, 1e-5])),
        num_heads=draw(st.sampled_from([2, 4])),
    )  # fmt: skip
    # whole patches (timm's dynamic_img_size asserts it), 2 or more a side: torch's antialiased bicubic is off for an
    # output of width 1 (tests/test_dino.py)
    size = (8 * draw(st.integers(2, 5)), 8 * draw(st.integers(2, 5)))
    return options, size, draw(st.integers(1, 2)), draw(st.sampled_from(DTYPES)), draw(st.integers(0, 2**16))


@needs_timm
@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=FEW)
@given(case=option_cases())
def test_any_combination_of_options_matches_timm(case, backend):
    options, size, batch, dtype, seed = case
    _assert_matches_timm(options, dtype, backend, size=size, batch=batch, seed=seed)


# ---- the intermediate outputs with registers, LayerScale, qk_norm and norm_pre ---------------------------------------


def _last_attention_probs(reference, x):
    """softmax(q k^T * scale) of timm's last block, q and k through its q_norm / k_norm: (B, heads, N, N)."""
    with torch.no_grad():
        tokens = reference.norm_pre(reference._pos_embed(reference.patch_embed(torch.from_numpy(x))))
        for block in reference.blocks[:-1]:
            tokens = block(tokens)
        last = reference.blocks[-1]
        attn = last.attn
        B, N, _ = tokens.shape
        qkv = attn.qkv(last.norm1(tokens)).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
        return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1).numpy()


@needs_timm
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_intermediate_outputs_match_timm(dtype, backend):
    reference = in_dtype(_timm_vit(tuple(sorted(ALL_AT_ONCE.items()))), dtype)
    model = _vitnp_vit(numpy_state(reference), dtype, backend, **ALL_AT_ONCE)
    x = images((2, 3, 32, 32), dtype)
    assert model.num_prefix_tokens == reference.num_prefix_tokens == 3  # cls and two registers
    with torch.no_grad():
        final_t, intermediates_t = reference.forward_intermediates(torch.from_numpy(x), indices=2, norm=True,
                                                                   return_prefix_tokens=True)
        normed_t = reference.forward_intermediates(torch.from_numpy(x), indices=2, norm=True, output_fmt="NLC",
                                                   return_prefix_tokens=True, intermediates_only=True)
    final, intermediates = model.forward_intermediates(x, indices=2, norm=True, return_prefix_tokens=True)
    assert_close(final, final_t.numpy(), "model")
    for (patches, prefix), (patches_t, prefix_t) in zip(intermediates, intermediates_t, strict=True):
        assert patches.shape == (2, 32, 4, 4)  # (B, D, gh, gw)
        assert_close(patches, patches_t.numpy(), "model")
        assert_close(prefix, prefix_t.numpy(), "model")
    # DINO's get_intermediate_layers: normed block outputs with their prefix tokens, [cls, reg, reg, patches]
    for layer, (patches_t, prefix_t) in zip(model.get_intermediate_layers(x, n=2), normed_t, strict=True):
        assert_close(layer, torch.cat([prefix_t, patches_t], dim=1).numpy(), "model")
    probs = model.get_last_selfattention(x)
    assert probs.shape == (2, 4, 3 + 16, 3 + 16)
    assert_close(probs, _last_attention_probs(reference, x), "model")


@needs_timm
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_trace_matches_timms_modules(backend):
    """Each named step is the output of timm's module of that path: norm_pre, each attention and MLP branch (before
    its LayerScale), each block."""
    reference = _timm_vit(tuple(sorted(ALL_AT_ONCE.items())))
    model = _vitnp_vit(numpy_state(reference), np.float32, backend, **ALL_AT_ONCE)
    x = images((1, 3, 32, 32))
    outputs = {}
    modules = dict(reference.named_modules())
    paths = ["norm_pre", "blocks.1.attn", "blocks.1.mlp", "blocks.1"]
    hooks = [modules[path].register_forward_hook(lambda m, i, o, path=path: outputs.__setitem__(path, o.numpy()))
             for path in paths]
    try:
        features_t, pre_logits_t, logits_t = _torch_outputs(reference, x)
    finally:
        for hook in hooks:
            hook.remove()
    trace = model.forward_trace(x)
    for path in paths:
        assert_close(trace[path], outputs[path], "model")
    assert_close(trace["norm"], features_t, "model")
    assert_close(trace["pre_logits"], pre_logits_t, "model")
    assert_close(trace["logits"], logits_t, "model")


# ---- each feature matters: the same weights without it give another output ------------------------------------------

# (options with the feature, options without it, keys the model without it does not have)
FEATURES = {
    "registers": (dict(reg_tokens=4, no_embed_class=True), dict(no_embed_class=True), ["reg_token"]),
    "layer_scale": (dict(init_values=1e-5), {}, ["ls1.gamma", "ls2.gamma"]),
    "qk_norm": (dict(qk_norm=True), {}, ["q_norm.", "k_norm."]),
    "norm_pre": (dict(pre_norm=True), {}, ["norm_pre."]),
    "map_pool": (dict(global_pool="map"), dict(global_pool="token"), ["attn_pool."]),
    "quick_gelu": (dict(act="quick_gelu"), {}, []),
}


@pytest.mark.parametrize("feature", FEATURES)
def test_dropping_a_feature_changes_the_output(feature):
    with_it, without_it, its_keys = FEATURES[feature]
    model = vit.VisionTransformer(vit.ViTConfig(**{**SMALL, **with_it})).set_backend("reference")
    model.init_weights()
    state = random_state(model.state_dict(), seed=3)
    model.load_state_dict(state)
    other = vit.VisionTransformer(vit.ViTConfig(**{**SMALL, **without_it})).set_backend("reference")
    other.init_weights()
    kept = {k: v for k, v in state.items() if not any(key in k for key in its_keys)}
    if feature == "norm_pre":  # a ViT without norm_pre has a patch-embedding bias: zeros, the same linear map
        kept["patch_embed.proj.bias"] = np.zeros(SMALL["embed_dim"], np.float32)
    other.load_state_dict(kept)
    x = images((2, 3, 32, 32))
    pooled = model.forward_head(model.forward_features(x), pre_logits=True)
    pooled_without = other.forward_head(other.forward_features(x), pre_logits=True)
    # at least 100 times the float32 tolerance of the comparisons with timm (QuickGELU is close to GELU: ~2e-2)
    assert np.abs(pooled - pooled_without).max() > 100 * TOLERANCES[("model", np.float32)]["atol"]


# ---- DINOv2's and Hugging Face's position-embedding resamplers -------------------------------------------------------
# DINOv2's and HF Dinov2's resampling runs in float32. torch's float32 bicubic kernel is itself a few 1e-6 off the
# exact result of its float32 weights (its float32 sums of 16 taps with cancelling signs), so the float32 results are
# compared with the 'layer' tolerance; the float32 detour itself is checked bit for bit below.


def _interpolate(grid, dtype, **kwargs):
    """``F.interpolate(grid.to(dtype), mode='bicubic', **kwargs)`` of a (D, gh, gw) NumPy grid, as NumPy."""
    tensor = torch.from_numpy(grid)[None].to(dtype)
    return torch.nn.functional.interpolate(tensor, mode="bicubic", **kwargs)[0].numpy()


sizes = st.integers(1, 24)


@needs("torch")
@given(sizes, sizes, sizes, sizes, st.sampled_from(DTYPES))
def test_dinov2_resampler_is_dinov2s_float32_interpolate(gh, gw, nh, nw, dtype):
    """DINOv2: ``F.interpolate(pos.float(), scale_factor=((h0 + 0.1) / M, (w0 + 0.1) / M), mode='bicubic',
    antialias=False)``, cast back."""
    grid = np.random.default_rng(gh * 31 + gw).standard_normal((3, gh, gw)).astype(dtype)
    expected = _interpolate(grid, torch.float32, scale_factor=((nh + 0.1) / gh, (nw + 0.1) / gw), antialias=False)
    actual = resample.resample_pos_embed(grid, (nh, nw), "dinov2")
    assert actual.dtype == dtype
    assert_close(actual, expected, "layer", np.float32)


@needs("torch")
@given(sizes, sizes, sizes, sizes, st.sampled_from(DTYPES))
def test_hf_dinov2_resampler_is_hfs_float32_interpolate(gh, gw, nh, nw, dtype):
    """Hugging Face Dinov2: ``F.interpolate(pos.to(torch.float32), size=(h, w), mode='bicubic', align_corners=False)``,
    cast back."""
    grid = np.random.default_rng(gh * 31 + gw).standard_normal((3, gh, gw)).astype(dtype)
    expected = _interpolate(grid, torch.float32, size=(nh, nw), align_corners=False)
    actual = resample.resample_pos_embed(grid, (nh, nw), "hf-dinov2")
    assert actual.dtype == dtype
    assert_close(actual, expected, "layer", np.float32)


@needs("torch")
def test_dinov2_resamplers_compute_in_float32():
    """In a float64 model the float32 detour of DINOv2 and HF Dinov2 shows (DINO's and HF ViT's have none)."""
    grid = np.random.default_rng(0).standard_normal((4, 14, 14))
    for float32_method, float64_method in (("dinov2", "dino"), ("hf-dinov2", "hf")):
        in_float32 = resample.resample_pos_embed(grid, (20, 9), float32_method)
        in_float64 = resample.resample_pos_embed(grid, (20, 9), float64_method)
        assert in_float32.dtype == np.float64
        assert 1e-12 < np.abs(in_float32 - in_float64).max() < 1e-5


def _dinov2_interpolate_pos_encoding(pos_embed, patch_size, height, width):
    """DINOv2's ``interpolate_pos_encoding`` (hub models without registers: offset 0.1, no antialias) on a
    (1, 1 + M*M, D) tensor for a height x width image, as its published code computes it."""
    num_positions = pos_embed.shape[1] - 1
    M = int(math.sqrt(num_positions))
    h0, w0 = height // patch_size, width // patch_size
    if h0 * w0 == num_positions and height == width:
        return pos_embed
    pos = pos_embed.float()  # the whole embedding, the class position too
    dim = pos.shape[-1]
    patches = torch.nn.functional.interpolate(
        pos[:, 1:].reshape(1, M, M, dim).permute(0, 3, 1, 2), mode="bicubic", antialias=False,
        scale_factor=((h0 + 0.1) / M, (w0 + 0.1) / M),
    )  # fmt: skip
    patches = patches.permute(0, 2, 3, 1).reshape(1, -1, dim)
    return torch.cat([pos[:, :1], patches], dim=1).to(pos_embed.dtype)


def _hf_embeddings(module_name, class_name, config_name, pos_embed, patch_size, **config):
    """A Hugging Face DINOv2 embeddings module holding ``pos_embed`` as its position embeddings."""
    import importlib

    module = importlib.import_module(f"transformers.models.{module_name}.modeling_{module_name}")
    configuration = getattr(importlib.import_module("transformers"), config_name)
    M = int(math.sqrt(pos_embed.shape[1] - 1))
    embeddings = getattr(module, class_name)(configuration(hidden_size=pos_embed.shape[-1], patch_size=patch_size,
                                                           image_size=M * patch_size, **config))
    embeddings.position_embeddings.data = torch.from_numpy(pos_embed)
    return embeddings.to(torch.from_numpy(pos_embed).dtype)


def _hf_dinov2(pos_embed, height, width, patch_size):
    embeddings = _hf_embeddings("dinov2", "Dinov2Embeddings", "Dinov2Config", pos_embed, patch_size)
    n = (height // patch_size) * (width // patch_size)
    tokens = torch.zeros(1, 1 + n, pos_embed.shape[-1])
    return embeddings.interpolate_pos_encoding(tokens, height, width)


def _hf_dinov2_registers(pos_embed, height, width, patch_size):
    embeddings = _hf_embeddings("dinov2_with_registers", "Dinov2WithRegistersEmbeddings", "Dinov2WithRegistersConfig",
                                pos_embed, patch_size, num_register_tokens=4)
    n = (height // patch_size) * (width // patch_size)
    tokens = torch.zeros(1, 1 + n, pos_embed.shape[-1])
    return embeddings.interpolate_pos_encoding(tokens, height, width)


def _dinov2_original(pos_embed, height, width, patch_size):
    return _dinov2_interpolate_pos_encoding(torch.from_numpy(pos_embed), patch_size, height, width)


ORIGINALS = {"dinov2": _dinov2_original, "hf-dinov2": _hf_dinov2, "dinov2-reg": _hf_dinov2_registers}


@needs("torch", "transformers")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ORIGINALS)
@pytest.mark.parametrize("size", [(32, 32), (32, 35), (40, 24), (56, 56), (16, 64)])
def test_model_position_embedding_is_the_originals(method, size, dtype):
    """The whole position embedding of a model (class position and patches) at other image sizes, the early-outs
    included (DINOv2 and HF keep the stored one only when the image is also square: 32x35 resamples to the same
    grid, through float32)."""
    model = vit.VisionTransformer(vit.ViTConfig(**SMALL, pos_embed_resample=method))
    model.init_weights(dtype=dtype)
    model.load_state_dict(random_state(model.state_dict(), seed=5))
    expected = ORIGINALS[method](model.pos_embed.copy(), *size, SMALL["patch_size"]).detach().numpy()
    actual = model.pos_embed_for(*size)
    assert actual.dtype == dtype
    if size == (32, 32):
        np.testing.assert_array_equal(actual, expected)
    else:
        assert_close(actual, expected, "layer", np.float32)
    if dtype == np.float64:  # where the originals round to float32, vitnp does too (a float64 model sees it)
        np.testing.assert_array_equal(actual.astype(np.float32) == actual, expected.astype(np.float32) == expected)


# ---- registered names: configs and parameter counts against timm -------------------------------------------------

NEW_NAMES = [
    *(f"vit_{size}_patch14_{kind}dinov2" for size in ("small", "base", "large", "giant") for kind in ("", "reg4_")),
    "vit_base_patch16_clip_224", "vit_base_patch32_clip_224", "vit_large_patch14_clip_224",
    "vit_base_patch16_clip_quickgelu_224", "vit_base_patch32_clip_quickgelu_224",
    "vit_large_patch14_clip_quickgelu_224",
    "vit_base_patch16_siglip_224", "vit_base_patch16_siglip_256", "vit_base_patch16_siglip_384",
    "vit_so400m_patch14_siglip_224",
    *(f"deit3_{size}_patch16_{px}" for size in ("small", "base", "large") for px in (224, 384)),
]  # fmt: skip


@pytest.fixture
def shapes_only(monkeypatch):
    """vitnp.create_model without filling the parameters (they stay lazily allocated zeros: giant has 1.1e9)."""
    monkeypatch.setattr(vitnp.model.Model, "init_weights", lambda self, seed=0, dtype=np.float32: None)


def _timm_config(reference):
    """The ViTConfig fields a timm VisionTransformer was built with, read off its modules."""
    block = reference.blocks[0]
    mlp_act = type(block.mlp.act).__name__
    return dict(
        img_size=tuple(reference.patch_embed.img_size), patch_size=reference.patch_embed.patch_size[0],
        embed_dim=reference.embed_dim, depth=len(reference.blocks), num_heads=block.attn.num_heads,
        num_classes=reference.num_classes, class_token=reference.has_class_token, reg_tokens=reference.num_reg_tokens,
        no_embed_class=reference.no_embed_class, global_pool=reference.global_pool,
        pre_norm=isinstance(reference.norm_pre, torch.nn.LayerNorm), norm_eps=reference.norm.eps,
        init_values=getattr(block.ls1, "init_values", None), qk_norm=isinstance(block.attn.q_norm, torch.nn.LayerNorm),
        mlp_layer={"Mlp": "mlp", "GluMlp": "swiglu_packed"}[type(block.mlp).__name__],
        act={"GELU": "gelu", "QuickGELU": "quick_gelu", "SiLU": "silu"}[mlp_act],
    )  # fmt: skip


@needs_timm
@pytest.mark.parametrize("name", NEW_NAMES)
def test_registered_name_is_timms_config(name, shapes_only):
    with torch.device("meta"):  # shapes only: no init
        reference = timm.create_model(name, pretrained=False, weight_init="skip")
    model = vitnp.create_model(name)
    expected_config = _timm_config(reference)
    config = {field: getattr(model.cfg, field) for field in expected_config}
    config["img_size"] = vit._pair(config["img_size"])
    assert config == expected_config
    assert model.cfg.pos_embed_resample == "timm"  # timm-layout weights: timm's own resampler
    assert count_params(model) == sum(p.numel() for p in reference.parameters())
    assert [(k, v.shape) for k, v in model.state_dict().items()] == [
        (k, tuple(v.shape)) for k, v in reference.state_dict().items()]
    expected = reference.pretrained_cfg
    data = vitnp.data_config(name)
    assert data["input_size"] == expected["input_size"] and data["crop_pct"] == expected["crop_pct"]
    assert data["interpolation"] == expected["interpolation"]
    np.testing.assert_array_equal(data["mean"], expected["mean"])
    np.testing.assert_array_equal(data["std"], expected["std"])
    assert model.num_classes == expected["num_classes"]


def test_every_new_name_is_registered():
    assert set(NEW_NAMES) <= set(vitnp.list_models())
    assert vitnp.list_models("*dinov2") == sorted(n for n in NEW_NAMES if n.endswith("dinov2"))


# The registered names built small, from timm's state_dict of the same name (the weights path users take)
_NARROW = dict(depth=2, embed_dim=48, num_heads=4)
SMALL_NAMED = {
    "vit_small_patch14_reg4_dinov2": dict(img_size=56, **_NARROW),
    "vit_giant_patch14_dinov2": dict(img_size=28, **_NARROW),
    "vit_base_patch16_clip_quickgelu_224": dict(img_size=48, **_NARROW),
    "vit_base_patch16_siglip_224": dict(img_size=48, **_NARROW),
    "deit3_small_patch16_224": dict(img_size=48, **_NARROW),
}


@functools.lru_cache(maxsize=1)
def _timm_named(name):
    from oracles import timm_model

    return timm_model(name, **SMALL_NAMED[name])


@needs_timm
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", SMALL_NAMED)
def test_registered_name_from_timms_weights(name, dtype, backend):
    reference = in_dtype(_timm_named(name), dtype)
    model = vitnp.create_model(name, weights=numpy_state(reference), dtype=dtype, backend=backend, **SMALL_NAMED[name])
    size = SMALL_NAMED[name]["img_size"]
    x = images((2, 3, size, size), dtype)
    features_t, _, logits_t = _torch_outputs(reference, x)
    assert_close(model.forward_features(x), features_t, "model")
    assert_close(model(x), logits_t, "model")


# ---- configurations timm cannot build, or that make no sense, are refused --------------------------------------------


@pytest.mark.parametrize("options, message", [
    (dict(act="relu"), "act must be one of"),
    (dict(mlp_layer="swiglu"), "mlp_layer must be one of"),
    (dict(mlp_layer="swiglu_packed", act="gelu"), "gates with SiLU"),
    (dict(init_values="1e-5"), "init_values"),
    (dict(init_values=float("nan")), "init_values"),
    (dict(reg_tokens=-1), "reg_tokens"),
    (dict(distilled=True, reg_tokens=4), "distilled"),
    (dict(distilled=True, no_embed_class=True), "distilled"),
    (dict(global_pool="mean"), "global_pool"),
    (dict(pos_embed_resample="dinov3"), "pos_embed_resample"),
])  # fmt: skip
def test_impossible_configurations_are_value_errors(options, message):
    with pytest.raises(ValueError, match=message):
        vit.VisionTransformer(vit.ViTConfig(**{**SMALL, **options}))


def test_new_options_are_create_model_overrides():
    model = vitnp.create_model("vit_small_patch14_reg4_dinov2", img_size=28, depth=1, reg_tokens=0, qk_norm=True,
                               init_values=None)
    assert model.num_prefix_tokens == 1 and "blocks.0.attn.q_norm.weight" in model.state_dict()
    assert "blocks.0.ls1.gamma" not in model.state_dict()
    deit3 = vitnp.create_model("deit3_small_patch16_224", depth=1, dtype=np.float64)  # random init: gamma as timm's
    np.testing.assert_array_equal(deit3.state_dict()["blocks.0.ls2.gamma"], np.full(384, 1e-6))
    with pytest.raises(ValueError, match="reg_tokens"):
        vitnp.create_model("vit_small_patch14_reg4_dinov2", reg_tokens=-2)
