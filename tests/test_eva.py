"""EVA-02 against timm's ``Eva`` (timm 1.0.31): the rotary tables and their application, small models on random
weights, float32 and float64, both backends, other image sizes, the registered names' configs, the layout.

Every parameter of the timm models is drawn by ``oracles.randomise_`` (LayerNorm affines around 1, the q / v biases,
the SwiGLU's inner norm, class token and position embedding non-zero). The small configurations cover what the
three registered names use: fused qkv with q / v biases and the packed SwiGLU (Tiny, Small), separate q / k / v
Linears and the split SwiGLU with its inner LayerNorm (Base), the rotary grid scaled to ``ref_feat_shape`` (16, 16)
as the names set it; and, beyond them, the half-rotation layout, GELU MLP, class-token pooling, a non-square image
with another reference grid.

The rotary tables are float32 values in timm (computed once, cast with the model): vitnp's sin / cos are the float64
ones rounded, within an ulp of torch's float32 ones. In float64 the timm twin gets vitnp's table
(``oracles.with_vitnp_rope_table``), so that those ulps (~1e-8 on the logits) do not hide the rest of the model's
2^-53 agreement; the tables are compared on their own, with the 'kernel' tolerance. Tolerances: tests/tolerances.py.
"""

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from oracles import (
    BACKENDS,
    images,
    in_dtype,
    needs,
    numpy_state,
    optional_import,
    random_state,
    randomise_,
    run,
    with_vitnp_rope_table,
)
from tolerances import assert_close

import vitnp
from vitnp import cli, eva, layouts
from vitnp.fast import ops as fast_ops
from vitnp.reference import ops as reference_ops
from vitnp.weights import save_npz

torch = optional_import("torch")
timm = optional_import("timm")
timm_rope = optional_import("timm.layers.pos_embed_sincos")
needs_timm = needs("torch", "timm")

DTYPES = [np.float32, np.float64]
FEW = min(6, settings().max_examples)  # models per Hypothesis test: each builds a timm and a vitnp model
TINY, SMALL_NAME, BASE = "eva02_tiny_patch14_224", "eva02_small_patch14_224", "eva02_base_patch14_224"

# name -> (registered name, overrides: timm's constructor arguments, the same on both sides)
SMALL = {
    "tiny": (TINY, dict(img_size=56, embed_dim=64, depth=2, num_heads=4, num_classes=5)),
    "base": (BASE, dict(img_size=42, patch_size=7, embed_dim=64, depth=2, num_heads=2, num_classes=5)),
    "other": (TINY, dict(img_size=(56, 28), patch_size=7, embed_dim=48, depth=2, num_heads=3, num_classes=4,
                         swiglu_mlp=False, mlp_ratio=2.0, global_pool="token", rope_rotate_half=True,
                         ref_feat_shape=(3, 5))),
}  # (timm.create_model drops None arguments: the grid's own coordinates, ref_feat_shape=None, are compared with
# timm in the table tests)


def _timm_small(kind, seed=0, **changes):
    name, overrides = SMALL[kind]
    return randomise_(timm.create_model(name, pretrained=False, **{**overrides, **changes}), seed).eval()


def _twin(reference, dtype):
    """The timm model in ``dtype``; in float64 with vitnp's rotary table (the module docstring says why)."""
    reference = in_dtype(reference, dtype)
    if np.dtype(dtype) == np.float64 and reference.rope is not None and reference.rope.pos_embed is not None:
        with_vitnp_rope_table(reference)
    return reference


def _vitnp_small(kind, state, dtype=np.float32, backend="fast", **changes):
    name, overrides = SMALL[kind]
    return vitnp.create_model(name, weights=state, dtype=dtype, backend=backend, **{**overrides, **changes})


# ----------------------------------------------------------------------------------------------- rotary tables


@needs_timm
@given(grid=st.tuples(st.integers(1, 24), st.integers(1, 24)), dim=st.sampled_from([4, 8, 16, 32, 64, 128]),
       ref=st.one_of(st.none(), st.tuples(st.integers(1, 32), st.integers(1, 32))), half=st.booleans())
def test_rope_table_equals_timms_cached_table(grid, dim, ref, half):
    """timm's RotaryEmbeddingCat as Eva builds it for one image size (in_pixels=False): the same float32 table."""
    reference = timm_rope.RotaryEmbeddingCat(dim, in_pixels=False, feat_shape=list(grid), ref_feat_shape=ref,
                                             rotate_half=half)
    expected = reference.get_embed().numpy()
    table = eva.rope_table(grid, dim, ref, half)
    assert table.dtype == np.float32 and table.shape == expected.shape == (grid[0] * grid[1], 2 * dim)
    assert_close(table, expected, "kernel")
    if dim in (16, 32, 64):  # the EVA-02 head dims (elsewhere a band may be an ulp off: the power's rounding)
        np.testing.assert_array_equal(eva.rope_bands(dim), reference.bands.numpy())


@needs_timm
@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_table_of_a_dynamic_size_model_equals_timms(dtype):
    """Without a fixed grid timm computes the table per call from its bands buffer, which follows the model's dtype:
    float64 angles in a float64 model, their sin / cos rounded to float32 (equal to vitnp's here, bit for bit)."""
    reference = timm_rope.RotaryEmbeddingCat(16, in_pixels=False, feat_shape=None, ref_feat_shape=(16, 16))
    reference = in_dtype(reference, dtype)
    for grid in [(4, 4), (5, 3), (16, 16), (23, 7)]:
        expected = reference.get_embed(list(grid)).numpy()
        table = eva.rope_table(grid, 16, (16, 16), angle_dtype=dtype)
        if dtype == np.float64:
            np.testing.assert_array_equal(table, expected)
        else:
            assert_close(table, expected, "kernel")


@needs_timm
@given(shape=st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 20), st.sampled_from([2, 4, 8, 16, 64])),
       half=st.booleans(), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_apply_rot_embed_cat_equals_timms(shape, half, dtype, seed):
    """The reference op against timm's own function, on any table (the fast backend's op is the same function)."""
    from timm.layers import apply_rot_embed_cat

    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(dtype)
    emb = rng.standard_normal((shape[-2], 2 * shape[-1])).astype(dtype)
    expected = apply_rot_embed_cat(torch.from_numpy(x), torch.from_numpy(emb), half=half).numpy()
    out = reference_ops.apply_rot_embed_cat(x, emb, half)
    assert out.dtype == dtype
    assert_close(out, expected, "kernel")


@pytest.mark.parametrize("ops", [reference_ops, fast_ops])
def test_a_rotation_keeps_each_pairs_length_and_a_bad_table_is_refused(ops):
    x = images((2, 3, 6, 8), np.float64)
    table = eva.rope_table((2, 3), 8, (16, 16)).astype(np.float64)
    for half, pairs in ((False, lambda a: a.reshape(2, 3, 6, 4, 2)), (True, lambda a: np.stack([a[..., :4],
                                                                                                a[..., 4:]], -1))):
        rotated = ops.apply_rot_embed_cat(x, eva.rope_table((2, 3), 8, (16, 16), half).astype(np.float64), half)
        lengths = np.linalg.norm(pairs(rotated), axis=-1)
        np.testing.assert_allclose(lengths, np.linalg.norm(pairs(x), axis=-1), rtol=1e-6)  # float32 sin / cos
    with pytest.raises(ValueError, match="does not fit"):
        ops.apply_rot_embed_cat(x, table[:5], False)
    with pytest.raises(ValueError, match="dtype"):
        ops.apply_rot_embed_cat(x, table.astype(np.float32), False)


# ------------------------------------------------------------------------------------------------ whole models


@needs_timm
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", SMALL)
def test_small_model_matches_timm(kind, dtype, backend):
    reference = _twin(_timm_small(kind), dtype)
    model = _vitnp_small(kind, numpy_state(reference), dtype, backend)
    x = images((2, 3, *model.img_size), dtype, seed=1)
    out = model(x)
    assert out.dtype == dtype
    assert np.abs(out).max() > 0.1
    assert_close(out, run(reference, x), "model")
    assert_close(model.forward_features(x), run(reference.forward_features, x), "model")


@needs_timm
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["tiny", "other"])
def test_dropping_or_changing_the_rotary_embedding_changes_the_output(kind, backend):
    """The same weights without RoPE, with the other rotation layout, or with the grid's own coordinates in place of
    the reference grid's give other outputs: the comparison above would see a RoPE left out or built wrong."""
    reference = _timm_small(kind)
    state = numpy_state(reference)
    x = images((1, 3, *_vitnp_small(kind, state).img_size), np.float32, seed=2)
    expected = run(reference, x)
    assert_close(_vitnp_small(kind, state, backend=backend)(x), expected, "model")
    overrides = SMALL[kind][1]
    wrong = [dict(use_rot_pos_emb=False), dict(rope_rotate_half=not overrides.get("rope_rotate_half", False)),
             dict(ref_feat_shape=None)]
    for changes in wrong:
        assert np.abs(_vitnp_small(kind, state, backend=backend, **changes)(x) - expected).max() > 1e-2, changes


@needs_timm
@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=FEW)
@given(grid=st.tuples(st.integers(1, 6), st.integers(1, 6)) | st.just((4, 4)), dtype=st.sampled_from(DTYPES))
def test_dynamic_img_size_matches_timm_at_any_size(grid, dtype, backend):
    """timm's dynamic_img_size: the conv's floor, pos_embed resampled (antialiased bicubic), RoPE per grid.

    timm resamples the position embedding in float32 even for a float64 model (as vitnp does): off the trained grid
    the float64 outputs are compared at float32 precision, on it at float64's.
    """
    reference = in_dtype(_timm_small("tiny", dynamic_img_size=True), dtype)
    model = _vitnp_small("tiny", numpy_state(reference), dtype, backend, dynamic_img_size=True)
    x = images((1, 3, 14 * grid[0], 14 * grid[1]), dtype, seed=3)
    resampled = grid != model.grid_size
    assert_close(model(x), run(reference, x), "model", np.float32 if resampled else dtype)


def test_an_image_of_another_size_is_refused_unless_dynamic():
    model = vitnp.create_model(TINY, **SMALL["tiny"][1])
    with pytest.raises(ValueError, match=r"takes 56x56 images, got 70x56.*dynamic_img_size=True"):
        model(images((1, 3, 70, 56)))
    dynamic = vitnp.create_model(TINY, dynamic_img_size=True, **SMALL["tiny"][1])
    assert dynamic(images((1, 3, 70, 56))).shape == (1, 5)
    for size in [(13, 56), (56, 62)]:  # timm: "should be divisible by patch size"
        with pytest.raises(ValueError, match="multiples of the patch size 14"):
            dynamic(images((1, 3, *size)))


@pytest.mark.parametrize("overrides, message", [
    (dict(scale_mlp=True, swiglu_mlp=False), "swiglu_mlp=True"),
    (dict(embed_dim=60, num_heads=6), "multiple of 4"),
    (dict(embed_dim=64, num_heads=5), "not divisible"),
    (dict(ref_feat_shape=(16, 0)), "ref_feat_shape"),
    (dict(ref_feat_shape="16"), "ref_feat_shape"),
    (dict(global_pool="map"), "global_pool"),
    (dict(global_pool="token", class_token=False), "class_token"),
    (dict(use_fc_norm="yes"), "use_fc_norm"),
    (dict(img_size=50), "multiple of patch_size"),
])  # fmt: skip
def test_configurations_timm_refuses_or_vitnp_does_not_build_are_a_value_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        vitnp.create_model(TINY, **{**SMALL["tiny"][1], **overrides})


# ------------------------------------------------------------------------------------------ registered names


@needs_timm
@pytest.mark.parametrize("name", sorted(eva.MODELS))
def test_registered_config_counts_and_preprocessing_equal_timms(name, monkeypatch):
    """What timm builds for the name (on the meta device): blocks, heads, MLP, qkv, rotary grid, pooling and norms,
    parameter count; the default tag's (.mim_in22k) preprocessing. Full-size forwards: tests/test_models.py."""
    monkeypatch.setattr(vitnp.model.Model, "init_weights", lambda self, seed=0, dtype=np.float32: None)
    with torch.device("meta"):
        reference = timm.create_model(name, pretrained=False)
    model = vitnp.create_model(name)
    assert vitnp.count_params(model) == sum(p.numel() for p in reference.parameters())
    assert [(k, v.shape) for k, v in model.state_dict().items()] == [
        (k, tuple(v.shape)) for k, v in reference.state_dict().items()]
    block, timm_block = model.block_list[0], reference.blocks[0]
    assert (model.cfg.depth, model.num_classes, model.patch_size) == (len(reference.blocks), reference.num_classes, 14)
    assert (block.attn.num_heads, block.attn.qkv_fused) == (timm_block.attn.num_heads, timm_block.attn.qkv is not None)
    assert type(block.mlp).__name__ == {"GluMlp": "SwiGLUPacked", "SwiGLU": "SwiGLU"}[type(timm_block.mlp).__name__]
    rope = reference.rope
    assert (model.rope.dim, model.rope.feat_shape, model.rope.ref_feat_shape, model.rope.rotate_half) == (
        rope.dim, tuple(rope.feat_shape), tuple(rope.ref_feat_shape), rope.rotate_half)
    assert model.cfg.global_pool == reference.global_pool and model.use_fc_norm
    config, expected = vitnp.data_config(name), reference.pretrained_cfg
    assert expected["tag"] == "mim_in22k"
    for field in ("input_size", "crop_pct", "interpolation", "mean", "std"):
        assert config[field] == expected[field], field


# ------------------------------------------------------------------------------------- layout, trace, verify


def test_timm_eva_weights_are_recognised_and_refused_by_the_vit():
    for kind in ("tiny", "base"):
        state = _vitnp_small(kind, None).state_dict()
        assert layouts.detect_layout(state) == "timm-eva"
    with pytest.raises(ValueError, match="timm-eva.*'vit_tiny_patch16_224' is a VisionTransformer"):
        vitnp.create_model("vit_tiny_patch16_224", weights=state)
    vit_state = vitnp.create_model("vit_tiny_patch16_224", depth=1).state_dict()
    with pytest.raises(ValueError, match=f"timm-vit.*'{TINY}' is a Eva"):
        vitnp.create_model(TINY, weights=vit_state)
    headless = _vitnp_small("base", state, num_classes=0)  # the weights' classifier is left out
    assert headless(images((1, 3, 42, 42))).shape == (1, 64)


def test_weights_of_a_registered_size_are_told_by_name(monkeypatch):
    monkeypatch.setattr(vitnp.model.Model, "init_weights", lambda self, seed=0, dtype=np.float32: None)
    states = {name: vitnp.create_model(name).state_dict() for name in sorted(eva.MODELS)}
    for name, state in states.items():
        assert layouts.guess_models(layouts.prepare(state), vitnp.registry.family_tables("Eva")) == [name]
    with pytest.raises(vitnp.WeightsError, match="look like eva02_base_patch14_224: embed_dim 768, not 384; "
                                                 "qkv_fused False, not True; scale_mlp True, not False"):
        vitnp.create_model(SMALL_NAME, weights=states[BASE])  # strict: nothing loaded


def test_forward_trace_names_are_timms_module_paths_and_end_in_the_logits():
    model = _vitnp_small("tiny", None)
    x = images((1, 3, 56, 56))
    trace = model.forward_trace(x)
    blocks = [f"blocks.{i}{part}" for i in range(2) for part in (".attn", ".mlp", "")]
    assert list(trace) == ["patch_embed", "pos_embed", *blocks, "norm", "pre_logits", "logits"]
    np.testing.assert_array_equal(trace["logits"], model(x))
    np.testing.assert_array_equal(trace["norm"], model.forward_features(x))


@needs_timm
def test_vitnp_verify_torch_compares_every_layer_with_timm(tmp_path, capsys):
    arch = dict(SMALL["base"][1])
    weights = tmp_path / "eva.npz"
    save_npz(weights, random_state(vitnp.create_model(BASE, **arch).state_dict(), seed=5), arch)
    assert cli.main(["verify", "--model", BASE, "--weights", str(weights), "--torch"]) == 0
    out = capsys.readouterr().out
    assert "blocks.1.attn" in out and "logits" in out and "FAIL" not in out


def test_vitnp_verify_compares_the_backends_layer_by_layer():
    from vitnp.verify import compare_backends

    rows = compare_backends(_vitnp_small("base", None))
    assert [r["name"] for r in rows][-2:] == ["pre_logits", "logits"] and all(r["ok"] for r in rows)


@pytest.mark.parametrize("kind", ["tiny", "base"])
def test_a_reference_forward_runs_no_code_of_the_engine(kind):
    from test_code_layout import FAST, _python_files_run

    model = _vitnp_small(kind, None, backend="reference")
    x = images((2, 3, *model.img_size))
    model(x)  # the first call compiles the kernels: the profiled call runs only the forward
    files = _python_files_run(lambda: (model(x), model.forward_trace(x)))
    engine = sorted(f for f in files if FAST in Path(f).parents)
    assert not engine, f"a reference forward of EVA-02 ran {engine}"
