"""MobileViT v2 against timm and transformers: its new ops (GroupNorm with one group, separable self-attention, the
align-corners resize) against torch and between the backends, the linear transformer block and the MobileViT v2
block against timm's at Hypothesis-chosen map sizes (the unfold / fold and the resize to whole patches), whole models
in float32 and float64 on both backends, the registered names' configs, parameter counts and preprocessing against
timm, and Hugging Face MobileViTV2 folders against transformers' own output.

Every parameter and BatchNorm statistic of the torch side is drawn (``oracles.randomise_``): GroupNorm and BatchNorm
affines away from (1, 0), BatchNorm statistics away from (0, 1), every bias non-zero. Features whose absence the
comparisons must notice (the GroupNorm's whole-sample statistics, the softmax over the patches, the align-corners
resize) are each dropped once, and the output then moves far beyond the tolerance.
"""

import functools
import json
import types
from pathlib import Path

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from oracles import BACKENDS, images, in_dtype, needs, numpy_state, optional_import, randomise_, run, timm_model
from test_reference_ops import _load_from_torch
from tolerances import assert_close

import vitnp
from vitnp import layouts, mobilevitv2, registry
from vitnp.reference import ops as reference

NAMES = sorted(mobilevitv2.MODELS)
SMALL = "mobilevitv2_050"
DTYPES = st.sampled_from([np.float32, np.float64])
SEEDS = st.integers(0, 2**32 - 1)
needs_torch = needs("torch")
needs_timm = needs("torch", "timm")


@pytest.fixture(autouse=True, scope="module")
def torch_on_one_thread():
    """torch's forwards here are small: on one thread they do not wait for the other threads of its pool, which on a
    busy machine costs them seconds each (this module's torch time falls from ~30 s to ~0.5 s under a load of 8 on 2
    cores). The thread count is restored after the module."""
    torch = optional_import("torch")
    before = torch.get_num_threads() if torch else None
    if torch:
        torch.set_num_threads(1)
    yield
    if torch:
        torch.set_num_threads(before)


def _torch(x):
    import torch

    return torch.from_numpy(np.array(x))


def _channels_first(x):
    """A channels-last (B, ..., C) array as a channels-first (B, C, ...) torch tensor."""
    return _torch(np.moveaxis(x, -1, 1))


def _channels_last(t):
    return np.moveaxis(t.numpy(), 1, -1)


# ---------------------------------------------------------------------------------------------------- ops


@st.composite
def group_norm_cases(draw):
    """(x, weight, bias, eps): a channels-last (B, H, W, C) map off zero mean, an affine away from (1, 0)."""
    shape = (draw(st.integers(1, 3)), draw(st.integers(1, 9)), draw(st.integers(1, 9)), draw(st.integers(1, 40)))
    dtype, rng = draw(DTYPES), np.random.default_rng(draw(SEEDS))
    scale, offset = draw(st.sampled_from([0.1, 1.0, 5.0])), draw(st.sampled_from([0.0, 1.0, -3.0]))
    x = (rng.standard_normal(shape) * scale + offset).astype(dtype)
    weight = (1 + 0.5 * rng.standard_normal(shape[-1])).astype(dtype)
    bias = rng.standard_normal(shape[-1]).astype(dtype)
    return x, weight, bias, draw(st.sampled_from([1e-5, 1e-6, 0.1]))


@needs_torch
@given(group_norm_cases())
def test_group_norm_matches_torch(case):
    """Against torch in float64 on the same values: the reference rounds the formula's value once, where torch's
    float32 statistics of a map far from zero mean (1 + 0.1 N(0, 1)) lose a few more bits than the tolerance's."""
    import torch.nn.functional as F

    x, weight, bias, eps = case
    assume(x[0].size > 1)  # torch wants more than one value per group
    y = reference.group_norm(x, weight, bias, eps)
    assert y.dtype == x.dtype and y.shape == x.shape
    wide = [a.astype(np.float64) for a in (x, weight, bias)]
    expected = F.group_norm(_channels_first(wide[0]), 1, _torch(wide[1]), _torch(wide[2]), eps)
    assert_close(y, _channels_last(expected), "kernel", dtype=x.dtype)


@given(group_norm_cases())
def test_group_norm_normalises_each_sample_as_a_whole(case):
    """With weight 1 and bias 0 each sample (not each position) has mean 0 and variance var / (var + eps)."""
    x, _, _, eps = case
    C = x.shape[-1]
    y = reference.group_norm(x, np.ones(C, x.dtype), np.zeros(C, x.dtype), eps).astype(np.float64)
    var = x.astype(np.float64).reshape(len(x), -1).var(axis=1)
    tol = 1e-5 if x.dtype == np.float32 else 1e-12
    np.testing.assert_allclose(y.reshape(len(x), -1).mean(axis=1), 0.0, atol=tol)
    np.testing.assert_allclose(y.reshape(len(x), -1).var(axis=1), var / (var + eps), rtol=tol, atol=tol)


@st.composite
def attention_cases(draw):
    """(qkv, d): a qkv projection's output (B, P, N, 1 + 2d), query | key | value on the last axis."""
    B, P, N, d = draw(st.integers(1, 2)), draw(st.sampled_from([1, 4])), draw(st.integers(1, 40)), draw(
        st.integers(1, 24))
    dtype, rng = draw(DTYPES), np.random.default_rng(draw(SEEDS))
    qkv = rng.standard_normal((B, P, N, 1 + 2 * d)) * draw(st.sampled_from([0.3, 1.0, 4.0]))
    return qkv.astype(dtype), d


def _split(qkv, d):
    return qkv[..., 0], qkv[..., 1:1 + d], qkv[..., 1 + d:]


@needs_torch
@given(attention_cases())
def test_linear_self_attention_matches_torch(case):
    import torch.nn.functional as F

    qkv, d = case
    y = reference.linear_self_attention(*_split(qkv, d))
    assert y.dtype == qkv.dtype
    # timm's LinearSelfAttention._forward_self_attn between its projections, in its (B, 1 + 2d, P, N) layout
    query, key, value = _channels_first(qkv).split([1, d, d], dim=1)
    scores = F.softmax(query, dim=-1)
    context = (key * scores).sum(dim=-1, keepdim=True)
    assert_close(y, _channels_last(F.relu(value) * context.expand_as(value)), "kernel")


def test_linear_self_attention_refuses_shapes_that_do_not_fit():
    qkv = np.zeros((1, 4, 5, 7), np.float32)
    with pytest.raises(ValueError, match="linear_self_attention"):
        reference.linear_self_attention(qkv[..., 0], qkv[..., 1:4], qkv[..., 4:6])


@needs_torch
@pytest.mark.parametrize("backend", BACKENDS)
@given(st.integers(1, 12), st.integers(1, 12), st.integers(1, 12), st.integers(1, 12), DTYPES, SEEDS)
def test_resize_bilinear_with_align_corners_matches_torch(backend, H, W, new_h, new_w, dtype, seed):
    import torch.nn.functional as F

    x = np.random.default_rng(seed).standard_normal((2, H, W, 3)).astype(dtype)
    y = vitnp.backends.backend_ops(backend).resize_bilinear(x, (new_h, new_w), align_corners=True)
    expected = F.interpolate(_channels_first(x), size=(new_h, new_w), mode="bilinear", align_corners=True)
    assert y.dtype == dtype
    assert_close(y, _channels_last(expected), "kernel")


# ---------------------------------------------------------------------------------------------------- layers


@needs_timm
@pytest.mark.parametrize("backend", BACKENDS)
@given(st.integers(1, 2), st.sampled_from([1, 4]), st.integers(1, 30), st.sampled_from([8, 16, 24]), DTYPES, SEEDS)
def test_linear_transformer_block_matches_timm(backend, B, P, N, d, dtype, seed):
    from timm.models.mobilevit import LinearTransformerBlock

    twin = randomise_(LinearTransformerBlock(d, mlp_ratio=2.0), seed % 2**31).eval()
    twin = twin.double() if dtype == np.float64 else twin
    block = _load_from_torch(mobilevitv2.LinearTransformerBlock(d), twin, dtype).set_backend(backend)
    x = np.random.default_rng(seed).standard_normal((B, P, N, d)).astype(dtype)
    expected = _channels_last(twin(_channels_first(x)).detach())  # timm's (B, d, P, N)
    assert_close(block(x), expected, "layer")


@functools.lru_cache(maxsize=None)
def _timm_model(name, **kwargs):
    return timm_model(name, **kwargs)


@functools.lru_cache(maxsize=None)
def _pair(name=SMALL, dtype=np.float32, backend="fast", fold_bn=False, **kwargs):
    """(timm model in dtype, vitnp model with its weights), built once per set of arguments: tests do not change
    them."""
    twin = in_dtype(_timm_model(name, **kwargs), dtype)
    model = vitnp.create_model(name, weights=numpy_state(_timm_model(name, **kwargs)), dtype=dtype, backend=backend,
                               fold_bn=fold_bn, **kwargs)
    return twin, model


def _block(model, stage, index=1):
    """A vitnp block called on and returning NCHW maps, as timm's (vitnp's blocks work on NHWC maps)."""
    block = getattr(getattr(model.stages, str(stage)), str(index))
    return lambda x: np.moveaxis(block(np.ascontiguousarray(np.moveaxis(x, 1, -1))), -1, 1)


@needs_timm
@pytest.mark.parametrize("backend", BACKENDS)
@given(st.integers(1, 2), st.integers(1, 13), st.integers(1, 13), DTYPES, st.booleans())
def test_mobilevitv2_block_matches_timm_at_any_map_size(backend, B, H, W, dtype, fold_bn):
    """Whole patches are unfolded as they are; other sizes are first resized up to whole patches, which the output
    keeps (timm's shape)."""
    twin, model = _pair(dtype=dtype, backend=backend, fold_bn=fold_bn)
    x = images((B, 128, H, W), dtype, seed=H * 16 + W)
    expected = run(twin.stages[2][1], x)
    assert expected.shape == (B, 128, H + H % 2, W + W % 2)
    assert_close(_block(model, 2)(x), expected, "layer")


def _with_op(block, name, make):
    """Run ``block`` with its op ``name`` replaced by ``make(ops)``: a variant of the forward without a feature."""
    ops = block.ops
    changed = types.SimpleNamespace(**{op: getattr(ops, op) for op in ops.__all__})
    setattr(changed, name, make(ops))
    for _, module in block.named_modules():
        object.__setattr__(module, "ops", changed)


DROPPED_FEATURES = {
    # the GroupNorm's statistics of a whole sample, replaced by a LayerNorm's of each position
    "group_norm": lambda ops: lambda x, weight, bias, eps: ops.layer_norm(x, weight, bias, eps),
    # the softmax over the patches N of each pixel position, replaced by one over the pixel positions P
    "linear_self_attention": lambda ops: lambda q, k, v: ops.linear_self_attention(
        q.swapaxes(1, 2), k.swapaxes(1, 2), v.swapaxes(1, 2)).swapaxes(1, 2),
    # the resize to whole patches with align_corners=True, replaced by v1's align_corners=False
    "resize_bilinear": lambda ops: lambda x, size, align_corners=False: ops.resize_bilinear(x, size),
}


@needs_timm
@pytest.mark.parametrize("name", DROPPED_FEATURES)
def test_a_dropped_feature_moves_the_block_far_beyond_the_tolerance(name):
    twin = in_dtype(_timm_model(SMALL), np.float64)
    model = vitnp.create_model(SMALL, weights=numpy_state(twin), dtype=np.float64, backend="reference")  # its own
    x = images((1, 128, 7, 9), np.float64, seed=5)
    expected = run(twin.stages[2][1], x)
    assert_close(_block(model, 2)(x), expected, "layer")
    _with_op(getattr(model.stages, "2"), name, DROPPED_FEATURES[name])
    assert np.abs(_block(model, 2)(x) - expected).max() > 1e-3


# ---------------------------------------------------------------------------------------------------- whole models


@needs_timm
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("batch", "size", "dtype", "fold_bn"), [
    (2, (64, 64), np.float32, False),
    (2, (64, 64), np.float64, True),
    (1, (45, 70), np.float32, True),  # odd maps in stages 2-4: the resize to whole patches
    (1, (45, 70), np.float64, False),
])  # fmt: skip
def test_model_matches_timm(batch, size, dtype, fold_bn, backend):
    twin, model = _pair(dtype=dtype, backend=backend, fold_bn=fold_bn)
    x = images((batch, 3, *size), dtype)
    features = run(twin.forward_features, x)
    ours = model.forward_features(x)
    assert ours.dtype == dtype and model.num_features == 256
    np.testing.assert_array_equal(x, images((batch, 3, *size), dtype))  # the input is not written to
    assert_close(ours, features, "model")
    assert_close(model.forward_head(ours), run(twin.forward_head, features), "model")
    assert_close(model(x), run(twin, x), "model")


@needs_timm
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kwargs", [dict(num_classes=0), dict(global_pool="max")])
def test_head_options_match_timm(kwargs, backend):
    twin, model = _pair(backend=backend, **kwargs)
    assert list(model.state_dict()) == list(twin.state_dict())
    x = images((2, 3, 32, 32))
    assert_close(model(x), run(twin, x), "model")


@needs_timm
def test_forward_trace_is_at_timm_module_paths():
    twin, model = _pair(dtype=np.float64, backend="reference")
    x = images((1, 3, 64, 64), np.float64)
    trace = model.forward_trace(x)
    outputs = {}
    modules = dict(twin.named_modules())
    for name in trace:
        if name in modules:
            modules[name].register_forward_hook(
                lambda module, inputs, output, name=name: outputs.__setitem__(name, output.detach().numpy().copy()))
    run(twin, x)
    assert set(trace) - set(outputs) == {"pre_logits", "logits"}
    assert "stages.4.1" in trace and "final_conv" in trace
    for name, value in outputs.items():
        assert_close(trace[name], value, "model")
    assert_close(trace["logits"], run(twin, x), "model")


def test_a_reference_forward_runs_no_code_of_the_engine():
    from test_code_layout import FAST, REFERENCE, _python_files_run

    model = vitnp.create_model(SMALL, backend="reference")
    x = images((1, 3, 35, 35))  # odd maps: the resize too
    model(x)  # the first call compiles the kernels: the profiled call runs only the forward
    files = _python_files_run(lambda: (model(x), model.forward_trace(x)))
    assert any(Path(f).parent == REFERENCE for f in files)  # the profiler sees the reference ops it should
    assert not sorted(f for f in files if FAST in Path(f).parents)


# ---------------------------------------------------------------------------------------------------- registry


@needs_timm
@pytest.mark.parametrize("name", NAMES)
def test_registered_name_has_timm_keys_shapes_parameters_and_preprocessing(name):
    import timm
    import torch

    with torch.device("meta"):
        twin = timm.create_model(name, pretrained=False)
    arch, _ = mobilevitv2.MODELS[name]
    model = mobilevitv2.MobileViTV2(mobilevitv2.MobileViTV2Config(**arch))  # parameters zero-filled, not drawn
    own, theirs = model.state_dict(), twin.state_dict()
    assert list(own) == list(theirs)
    assert all(own[key].shape == tuple(value.shape) for key, value in theirs.items())
    assert vitnp.count_params(model) == sum(p.numel() for p in twin.parameters())
    assert model.num_features == twin.num_features
    ours = vitnp.data_config(name)
    for key in ("input_size", "crop_pct", "interpolation", "mean", "std"):
        assert ours[key] == twin.pretrained_cfg[key], (name, key)


def test_architecture_is_fixed_by_name_and_bad_configs_are_clear_errors():
    with pytest.raises(ValueError, match="unknown argument"):
        vitnp.create_model(SMALL, stage_chs=(16, 16, 16, 16, 16))
    with pytest.raises(ValueError, match="num_classes=0"):
        vitnp.create_model(SMALL, global_pool="")
    with pytest.raises(ValueError, match="transformer_depths"):
        mobilevitv2.MobileViTV2(mobilevitv2.MobileViTV2Config(transformer_depths=(2, 4)))
    model = vitnp.create_model(SMALL)
    with pytest.raises(ValueError, match="at least 1x1"):
        model(np.zeros((1, 3, 0, 8), np.float32))


# ---------------------------------------------------------------------------------------------------- Hugging Face


@needs("torch", "transformers")
@pytest.mark.parametrize("with_head", [True, False])
def test_hugging_face_folder_matches_transformers(tmp_path, with_head):
    """MobileViTV2ForImageClassification (``mobilevitv2.`` keys, a classifier) and MobileViTV2Model (bare keys, the
    pooled features) at width 0.5, mobilevitv2_050's widths, through config.json and the hf-mobilevitv2 layout."""
    import torch
    import transformers

    config = transformers.MobileViTV2Config(width_multiplier=0.5, num_labels=5, image_size=64)
    build = transformers.MobileViTV2ForImageClassification if with_head else transformers.MobileViTV2Model
    source = randomise_(build(config).eval())
    source.save_pretrained(tmp_path)
    info = layouts.describe(tmp_path, registry.family_tables)
    assert info["layout"] == "hf-mobilevitv2" and info["models"] == [SMALL]
    x = images((2, 3, 64, 64))
    for dtype in (np.float32, np.float64):
        with torch.no_grad():
            output = in_dtype(source, dtype)(pixel_values=_torch(x.astype(dtype)))
        expected = output.logits if with_head else output.pooler_output
        model = vitnp.create_model(SMALL, weights=tmp_path, dtype=dtype)
        assert model.num_classes == (5 if with_head else 0)
        for backend in BACKENDS:
            assert_close(model.set_backend(backend)(x.astype(dtype)), expected.numpy(), "model")


@needs("torch", "transformers")
def test_hugging_face_config_fields_vitnp_cannot_follow_are_refused(tmp_path):
    import transformers

    source = transformers.MobileViTV2ForImageClassification(transformers.MobileViTV2Config(width_multiplier=0.5))
    source.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "output_stride": 16}))
    with pytest.raises(ValueError, match="output_stride"):
        vitnp.create_model(SMALL, weights=tmp_path)
