"""The reference ops (vitnp.reference) against their torch twins, the properties that hold without any oracle, and
the layers built on the ops against timm's, on both backends.

Hypothesis picks the shapes, the dtype (float32 / float64), a value scale and a seed; the values come from a seeded
NumPy generator, so that big arrays stay cheap to draw. A test that needs torch (or timm) skips on its own without
it; the properties run anyway.

Tolerances (tests/tolerances.py):
- 'kernel' for one op against torch: each output is a few roundings of O(1) values, or a sum of at most a few hundred
  products in another order. The reference computes every element-wise value in float64 and rounds it once, so in
  float32 it may be closer to the exact value than torch is: float32's 'kernel' tolerance (rtol 1e-5, ~80 ulp) bounds
  torch's own rounding plus the reordered sums, float64's (rtol 1e-12) the same at 2^-53.
- 'layer' for a whole layer (a MobileViT MV2 block, transformer blocks): every step adds a GEMM's rounding.
- exact equality for the ops that only move values (patchify, roll, window partition and reverse).
"""

import functools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from tolerances import assert_close

from vitnp import layers, mobilevit
from vitnp.backends import BACKENDS, backend_ops
from vitnp.reference import ops, resample

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # the properties below still run; the torch comparisons skip
    torch = None
try:
    import timm
    from timm.models.swin_transformer import window_partition as timm_window_partition
    from timm.models.swin_transformer import window_reverse as timm_window_reverse
    from timm.models.vision_transformer import Block as TimmBlock
except ImportError:
    timm = None
needs_torch = pytest.mark.skipif(torch is None, reason="torch is not installed (pip install -e .[test])")
needs_timm = pytest.mark.skipif(timm is None, reason="timm is not installed (pip install -e .[test])")
on_both_backends = pytest.mark.parametrize("backend", BACKENDS)

DTYPES = st.sampled_from([np.float32, np.float64])
SEEDS = st.integers(0, 2**32 - 1)
SHAPES = st.tuples(st.lists(st.integers(1, 4), min_size=1, max_size=4), st.integers(1, 300)).map(
    lambda s: (*s[0], s[1])
)


@st.composite
def arrays(draw, scales=(0.1, 1.0, 3.0, 10.0), shapes=SHAPES):
    """(x, rng): a random array of a Hypothesis-chosen shape, dtype and scale, and the generator that drew it."""
    shape, dtype = draw(shapes), draw(DTYPES)
    rng = np.random.default_rng(draw(SEEDS))
    return (rng.standard_normal(shape) * draw(st.sampled_from(scales))).astype(dtype), rng


def _t(a):
    return torch.from_numpy(np.array(a))  # a copy: the fast backend makes the weights it packs read-only


def _nchw(x):
    """An NHWC array as an NCHW torch tensor."""
    return _t(x).permute(0, 3, 1, 2)


def _nhwc(t):
    """An NCHW torch tensor as an NHWC array."""
    return t.permute(0, 2, 3, 1).numpy()


def _torch_activation(act):
    return {"none": lambda t: t, "gelu": F.gelu, "gelu_tanh": functools.partial(F.gelu, approximate="tanh"),
            "silu": F.silu, "quick_gelu": lambda t: t * torch.sigmoid(1.702 * t)}[act]


def _norm_params(rng, channels, dtype):
    """LayerNorm weight and bias away from (1, 0), so that a dropped affine shows."""
    weight, bias = 1.0 + 0.5 * rng.standard_normal(channels), 0.5 * rng.standard_normal(channels)
    return weight.astype(dtype), bias.astype(dtype)


def random_conv_norm_act(rng, in_chs, out_chs, kernel_size, stride=1, depthwise=False, act="silu", dtype=np.float32):
    """A mobilevit.ConvNormAct with random values in its conv weight and in all four BatchNorm arrays (the defaults,
    weight 1, bias 0, mean 0, variance 1, would let a dropped BatchNorm pass)."""
    layer = mobilevit.ConvNormAct(in_chs, out_chs, kernel_size, stride, groups=in_chs if depthwise else 1, act=act)
    shape = layer.conv.weight.shape
    layer.conv._parameters["weight"] = (rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(dtype)
    layer.bn._parameters["weight"] = rng.uniform(0.5, 1.5, out_chs).astype(dtype)
    layer.bn._parameters["bias"] = (0.3 * rng.standard_normal(out_chs)).astype(dtype)
    layer.bn._buffers["running_mean"] = (0.3 * rng.standard_normal(out_chs)).astype(dtype)
    layer.bn._buffers["running_var"] = rng.uniform(0.5, 2.0, out_chs).astype(dtype)
    return layer


def random_parameters(module, rng, dtype):
    """Random values for every parameter of a vitnp module: weights of std 1 / sqrt(fan_in), norm weights around 1,
    biases around 0 (never the zero biases and unit norms of an init, which would let a dropped one pass)."""
    modules = dict(module.named_modules())
    for key, value in list(module.named_parameters()):
        prefix, _, name = key.rpartition(".")
        scale = value.shape[-1] ** -0.5 if value.ndim >= 2 else 0.3
        offset = 1.0 if name == "weight" and value.ndim == 1 else 0.0
        modules[prefix + "." if prefix else ""]._parameters[name] = (
            rng.standard_normal(value.shape) * scale + offset
        ).astype(dtype)
    return module


# ---- LayerNorm, activations, softmax ---------------------------------------------------------------------------------


@needs_torch
@given(arrays(), st.sampled_from([1e-6, 1e-5, 1e-12]))
def test_layer_norm_matches_torch(xr, eps):
    x, rng = xr
    weight, bias = _norm_params(rng, x.shape[-1], x.dtype)
    y = ops.layer_norm(x, weight, bias, eps)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert_close(y, F.layer_norm(_t(x), (x.shape[-1],), _t(weight), _t(bias), eps).numpy(), "kernel")


ELEMENTWISE = {  # the reference op and its torch twin (looked up when called: torch may be missing)
    "gelu": (ops.gelu, lambda t: F.gelu(t)),
    "gelu_tanh": (functools.partial(ops.gelu, approximate="tanh"), lambda t: F.gelu(t, approximate="tanh")),
    "silu": (ops.silu, lambda t: F.silu(t)),
    "tanh": (ops.tanh, lambda t: torch.tanh(t)),
}


@needs_torch
@pytest.mark.parametrize("name", ELEMENTWISE)
@given(xr=arrays(scales=(0.1, 1.0, 10.0, 100.0)))
def test_elementwise_ops_match_torch(name, xr):
    x, _ = xr
    op, twin = ELEMENTWISE[name]
    y = op(x)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert_close(y, twin(_t(x)).numpy(), "kernel")


@needs_torch
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", ELEMENTWISE)
def test_elementwise_ops_match_torch_at_the_extremes(name, dtype):
    # exp(-v) overflows for v < -709 (float64) and the float32 value underflows below -88: the limits, not nan
    x = np.array([-1e30, -1e4, -800.0, -200.0, -88.5, -88.0, -20.0, -1e-30, 0.0, 1e-30, 20.0, 88.0, 200.0, 1e4, 1e30],
                 dtype)
    op, twin = ELEMENTWISE[name]
    assert_close(op(x), twin(_t(x)).numpy(), "kernel")


@needs_torch
@given(arrays(scales=(0.1, 1.0, 10.0, 1e4)))
def test_softmax_matches_torch(xr):
    x, _ = xr
    y = ops.softmax(x)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert_close(y, torch.softmax(_t(x), dim=-1).numpy(), "kernel")


@on_both_backends
@given(arrays(shapes=SHAPES.filter(lambda s: s[-1] >= 2)))
def test_layer_norm_normalises_each_row(backend, xr):
    """With weight 1 and bias 0 every row has mean 0 and variance var / (var + eps) (1 up to eps)."""
    x, _ = xr
    channels, eps = x.shape[-1], 1e-6
    y = backend_ops(backend).layer_norm(x, np.ones(channels, x.dtype), np.zeros(channels, x.dtype), eps)
    assert y.dtype == x.dtype
    var_x = x.astype(np.float64).var(axis=-1)
    tol = 1e-5 if x.dtype == np.float32 else 1e-12  # a row's values each within an ulp or so of O(1)
    np.testing.assert_allclose(y.mean(axis=-1, dtype=np.float64), 0.0, atol=tol)
    np.testing.assert_allclose(y.astype(np.float64).var(axis=-1), var_x / (var_x + eps), rtol=tol, atol=tol)


@on_both_backends
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_layer_norm_of_a_constant_row_is_the_bias(backend, dtype):
    """A constant row has variance 0: the output is the bias, not nan (eps keeps the division finite)."""
    bias = np.arange(5, dtype=dtype)
    y = backend_ops(backend).layer_norm(np.full((2, 5), 3.25, dtype), np.ones(5, dtype), bias, 1e-6)
    np.testing.assert_array_equal(y, np.broadcast_to(bias, (2, 5)))


@on_both_backends
@given(arrays(), st.sampled_from(["none", "tanh"]))
def test_gelu_odd_part_is_identity(backend, xr, approximate):
    """gelu(x) - gelu(-x) = x for both forms: Phi(x) + Phi(-x) = 1, and 1 + tanh(u) + 1 - tanh(u) = 2."""
    x, _ = xr
    gelu = backend_ops(backend).gelu
    difference = gelu(x, approximate) - gelu(-x, approximate)
    eps = np.finfo(x.dtype).eps  # a rounding of each gelu and of the difference, relative to |x|
    np.testing.assert_allclose(difference, x, rtol=8 * eps, atol=8 * eps)


@on_both_backends
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_known_values(backend, dtype, approximate):
    y = backend_ops(backend).gelu(np.array([[0.0, -0.0, 1.0, -1.0, 40.0, -40.0]], dtype=dtype), approximate)
    assert y.dtype == dtype
    assert y[0, 0] == 0.0 and y[0, 1] == 0.0
    assert y[0, 4] == 40.0  # Phi(40) rounds to 1 in either dtype
    assert y[0, 5] == 0.0  # -40 * Phi(-40) ~ -1e-348 underflows in either dtype
    phi_1 = 0.5 * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * 1.044715)) if approximate == "tanh" else 0.8413447460685429
    np.testing.assert_allclose(y[0, 2:4], [phi_1, phi_1 - 1.0], rtol=1e-6 if dtype == np.float32 else 1e-15)


@on_both_backends
@given(arrays(scales=(0.1, 1.0, 30.0, 1e4)))
def test_softmax_rows_are_probabilities(backend, xr):
    """Rows sum to 1, entries in [0, 1], the largest input gets the largest probability, no overflow at |x| ~ 1e4
    (exp(1e4) is inf in either dtype)."""
    x, _ = xr
    y = backend_ops(backend).softmax(x)
    assert y.dtype == x.dtype and np.isfinite(y).all()
    assert (y >= 0).all() and (y <= 1).all()
    np.testing.assert_allclose(y.sum(axis=-1, dtype=np.float64), 1.0, rtol=0, atol=x.shape[-1] * np.finfo(x.dtype).eps)
    np.testing.assert_array_equal(np.take_along_axis(y, x.argmax(axis=-1)[..., None], -1)[..., 0], y.max(axis=-1))


@on_both_backends
def test_softmax_is_shift_invariant_and_uniform_on_constant_rows(backend):
    softmax = backend_ops(backend).softmax
    x = np.random.default_rng(3).standard_normal((5, 17))
    np.testing.assert_allclose(softmax(x + 1e3), softmax(x), rtol=1e-12)
    for dtype in (np.float32, np.float64):
        np.testing.assert_allclose(softmax(np.full((3, 7), 1e4, dtype)), 1.0 / 7, rtol=4 * np.finfo(dtype).eps)


# ---- Linear and patches ----------------------------------------------------------------------------------------------

LINEAR_SHAPES = st.tuples(  # (leading axes, rows, in_features, out_features); test_fast_ops and test_fast_kernels too
    st.lists(st.integers(1, 3), min_size=0, max_size=2),  # leading axes
    st.integers(1, 40),  # rows of the last leading axis: the fast GEMM's tiles of 6 rows and their remainder
    st.integers(1, 70),  # in_features
    st.integers(1, 70),  # out_features: the fast GEMM's panels of 16 or 32 float32 columns, a cut-short last one
)


@needs_torch
@given(LINEAR_SHAPES, st.sampled_from(ops.ACTIVATIONS), st.booleans(), st.booleans(), DTYPES, SEEDS)
def test_linear_matches_torch(shapes, act, with_bias, with_residual, dtype, seed):
    (lead, rows, k, n), rng = shapes, np.random.default_rng(seed)
    x = rng.standard_normal((*lead, rows, k)).astype(dtype)
    weight = (rng.standard_normal((n, k)) / np.sqrt(k)).astype(dtype)  # outputs O(1), as in a network
    bias = rng.standard_normal(n).astype(dtype) if with_bias else None
    residual = rng.standard_normal((*lead, rows, n)).astype(dtype) if with_residual else None
    y = ops.linear(x, weight, bias, act, residual)
    assert y.dtype == dtype and y.shape == (*lead, rows, n)
    expected = _torch_activation(act)(F.linear(_t(x), _t(weight), None if bias is None else _t(bias)))
    assert_close(y, (expected + (0.0 if residual is None else _t(residual))).numpy(), "kernel")


def test_linear_folds_leading_axes():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 3, 4, 5))
    weight, bias = rng.standard_normal((6, 5)), rng.standard_normal(6)
    np.testing.assert_allclose(ops.linear(x, weight, bias), np.einsum("abcd,ed->abce", x, weight) + bias, rtol=1e-12)


GRIDS = st.fixed_dictionaries(
    dict(B=st.integers(1, 3), C=st.integers(1, 4), p=st.integers(1, 8), gh=st.integers(1, 5), gw=st.integers(1, 5))
)


@given(GRIDS, DTYPES, SEEDS)
def test_patchify_round_trip_and_token_order(g, dtype, seed):
    B, C, p, gh, gw = g["B"], g["C"], g["p"], g["gh"], g["gw"]
    x = np.random.default_rng(seed).standard_normal((B, C, gh * p, gw * p)).astype(dtype)
    patches = ops.patchify(x, p)
    assert patches.shape == (B, gh * gw, C * p * p) and patches.dtype == dtype
    # token t = i*gw + j holds x[:, :, i*p:(i+1)*p, j*p:(j+1)*p] flattened in (c, kh, kw) order
    for t in {0, gh * gw - 1, (gh // 2) * gw + gw // 2}:
        i, j = divmod(t, gw)
        np.testing.assert_array_equal(patches[:, t], x[:, :, i * p : (i + 1) * p, j * p : (j + 1) * p].reshape(B, -1))
    np.testing.assert_array_equal(ops.unpatchify(patches, p, (gh, gw), C), x)


def test_patchify_of_a_strided_view():
    """Images that are a transposed NHWC buffer (not C-contiguous) give the same patches as a contiguous copy."""
    x = np.random.default_rng(0).standard_normal((2, 12, 8, 3)).transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(ops.patchify(x, 4), ops.patchify(np.ascontiguousarray(x), 4))


@needs_torch
@given(GRIDS, st.integers(0, 7), st.integers(0, 7), DTYPES, SEEDS)
def test_patchify_matches_torch_unfold(g, more_rows, more_columns, dtype, seed):
    # rows and columns past the last whole patch (fewer than p) are left out, as by a stride-p unfold
    B, C, p, gh, gw = g["B"], g["C"], g["p"], g["gh"], g["gw"]
    x = np.random.default_rng(seed).standard_normal((B, C, gh * p + more_rows % p, gw * p + more_columns % p))
    x = x.astype(dtype)
    expected = F.unfold(_t(x), kernel_size=p, stride=p).transpose(1, 2).numpy()  # (B, N, C*p*p)
    np.testing.assert_array_equal(ops.patchify(x, p), expected)


@needs_torch
@on_both_backends
@given(GRIDS, st.integers(1, 12), st.booleans(), DTYPES, SEEDS)
def test_patch_embed_op_and_layer_match_torch_conv2d(backend, g, embed_dim, with_bias, dtype, seed):
    # timm's PatchEmbed: conv(x).flatten(2).transpose(1, 2) for a conv with kernel = stride = p; the layer takes
    # timm's parameter names (proj.weight, proj.bias)
    B, C, p, gh, gw = g["B"], g["C"], g["p"], g["gh"], g["gw"]
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, C, gh * p, gw * p)).astype(dtype)
    weight = (rng.standard_normal((embed_dim, C, p, p)) / np.sqrt(C * p * p)).astype(dtype)
    bias = rng.standard_normal(embed_dim).astype(dtype) if with_bias else None
    expected = F.conv2d(_t(x), _t(weight), None if bias is None else _t(bias), stride=p).flatten(2).transpose(1, 2)
    assert_close(backend_ops(backend).patch_embed(x, weight, bias), expected.numpy(), "kernel")
    embed = layers.PatchEmbed(p, C, embed_dim, bias=with_bias).set_backend(backend)
    embed.proj._parameters.update(weight=weight, **({"bias": bias} if with_bias else {}))
    y = embed(x)
    assert y.dtype == dtype
    assert_close(y, expected.numpy(), "kernel")


@given(GRIDS, st.integers(1, 12), DTYPES, SEEDS)
def test_patch_embed_is_the_conv2d_with_kernel_and_stride_p(g, embed_dim, dtype, seed):
    # two ways of the reference to one value: a Linear over the flattened patches, an im2col conv over NHWC windows
    B, C, p, gh, gw = g["B"], g["C"], g["p"], g["gh"], g["gw"]
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, C, gh * p, gw * p)).astype(dtype)
    weight, bias = rng.standard_normal((embed_dim, C, p, p)).astype(dtype), rng.standard_normal(embed_dim).astype(dtype)
    conv = ops.conv2d(x.transpose(0, 2, 3, 1), weight, bias, stride=p)  # (B, gh, gw, D)
    assert_close(ops.patch_embed(x, weight, bias), conv.reshape(B, gh * gw, embed_dim), "kernel")


# ---- attention -------------------------------------------------------------------------------------------------------


@st.composite
def attention_cases(draw, masked=None):
    """(q, k, v, scale, bias, mask): q, k, v (B, heads, N, head_dim); bias (heads, N, N) or None; mask (nW, N, N) or
    None (``masked``: always a mask, else drawn), Swin's 0 / -100 mask with B a multiple of nW (the windows of one or
    two images)."""
    nW, with_mask = draw(st.integers(1, 3)), draw(st.booleans()) if masked is None else masked
    B = draw(st.integers(1, 2)) * nW if with_mask else draw(st.integers(1, 4))
    N, heads, head_dim = draw(st.integers(1, 24)), draw(st.integers(1, 4)), draw(st.integers(1, 16))
    dtype = draw(DTYPES)
    rng = np.random.default_rng(draw(SEEDS))
    q, k, v = (rng.standard_normal((B, heads, N, head_dim)).astype(dtype) for _ in range(3))
    bias = rng.standard_normal((heads, N, N)).astype(dtype) if draw(st.booleans()) else None
    mask = np.where(rng.random((nW, N, N)) < 0.3, -100.0, 0.0).astype(dtype) if with_mask else None
    return q, k, v, head_dim**-0.5, bias, mask


def _torch_attention_mask(B, bias, mask, dtype):
    """bias (heads, N, N) + mask (nW, N, N), window b taking mask[b % nW], as one torch attn_mask; None for neither."""
    if bias is None and mask is None:
        return None
    added = np.zeros((), dtype) if bias is None else bias
    if mask is not None:
        added = added + mask[np.arange(B) % len(mask), None]  # (B, 1, N, N)
    return _t(added.astype(dtype))


@needs_torch
@given(attention_cases())
def test_attention_probs_and_scaled_dot_product_attention_match_torch(case):
    q, k, v, scale, bias, mask = case
    attn_mask = _torch_attention_mask(q.shape[0], bias, mask, q.dtype)
    scores = (_t(q) * scale) @ _t(k).transpose(-2, -1)
    probs = ops.attention_probs(q, k, scale, bias, mask)
    assert probs.dtype == q.dtype and probs.shape == q.shape[:3] + (q.shape[2],)
    assert_close(probs, (scores if attn_mask is None else scores + attn_mask).softmax(dim=-1).numpy(), "kernel")
    y = ops.scaled_dot_product_attention(q, k, v, scale, bias, mask)
    assert y.dtype == q.dtype and y.shape == q.shape
    expected = F.scaled_dot_product_attention(_t(q), _t(k), _t(v), attn_mask=attn_mask, scale=scale)
    assert_close(y, expected.numpy(), "kernel")


def random_logit_scale(rng, heads, dtype):
    """Swin V2's per-head multiplier of the cosines, (heads, 1, 1): exp of a logit scale in [0, log 100]."""
    return np.exp(rng.uniform(0.0, np.log(100.0), (heads, 1, 1))).astype(dtype)


def cosine_kind(dtype):
    """The tolerance of cosine attention: float32's 'layer', as the logit scale (up to 100) multiplies the cosines'
    rounding (~2^-24 each) into the scores, ~1e-5 of a score, and so of the softmax's weights; float64's 'kernel'."""
    return "layer" if dtype == np.float32 else "kernel"


@needs_torch
@given(attention_cases(), st.booleans(), SEEDS)
def test_cosine_attention_matches_timms_steps_in_torch(case, zero_rows, seed):
    # timm's WindowAttention (v2): (F.normalize(q) @ F.normalize(k)^T) * logit_scale + bias (+ mask), softmax, @ v.
    # Some rows of q and k all zero (zero_rows): F.normalize's eps keeps them 0, the scores then 0, not NaN.
    q, k, v, _, bias, mask = case
    rng = np.random.default_rng(seed)
    if zero_rows:
        q[rng.random(q.shape[:3]) < 0.2] = 0
        k[rng.random(k.shape[:3]) < 0.2] = 0
    logit_scale = random_logit_scale(rng, q.shape[1], q.dtype)
    y = ops.cosine_attention(q, k, v, logit_scale, 1e-12, bias, mask)
    assert y.dtype == q.dtype and y.shape == q.shape
    scores = F.normalize(_t(q), dim=-1) @ F.normalize(_t(k), dim=-1).transpose(-2, -1) * _t(logit_scale)
    attn_mask = _torch_attention_mask(q.shape[0], bias, mask, q.dtype)
    probs = (scores if attn_mask is None else scores + attn_mask).softmax(dim=-1)
    assert_close(y, (probs @ _t(v)).numpy(), cosine_kind(q.dtype))


@on_both_backends
@given(attention_cases(), SEEDS)
def test_cosine_attention_ignores_the_length_of_q_and_k_rows(backend, case, seed):
    # No oracle: only the directions of q's and k's rows count, so scaling each row by its own positive factor
    # changes nothing beyond rounding; at logit scale 0 every key weighs the same.
    q, k, v, _, bias, mask = case
    rng = np.random.default_rng(seed)
    attention = backend_ops(backend).cosine_attention
    logit_scale = random_logit_scale(rng, q.shape[1], q.dtype)
    y = attention(q, k, v, logit_scale, 1e-12, bias, mask)
    stretched_q = q * rng.uniform(0.01, 100.0, (*q.shape[:3], 1)).astype(q.dtype)
    stretched_k = k * rng.uniform(0.01, 100.0, (*k.shape[:3], 1)).astype(k.dtype)
    assert_close(attention(stretched_q, stretched_k, v, logit_scale, 1e-12, bias, mask), y, cosine_kind(q.dtype))
    flat = attention(q, k, v, logit_scale * 0, 1e-12)  # every score 0: each row the mean of v's rows
    assert_close(flat, np.broadcast_to(v.mean(axis=2, keepdims=True), y.shape), "kernel")


@on_both_backends
def test_cosine_attention_at_a_huge_logit_scale_takes_the_value_of_the_most_similar_key(backend):
    # No oracle: at logit scale 1e6 the softmax puts all its weight on the key of the largest cosine with the query
    rng = np.random.default_rng(5)
    q, k, v = rng.standard_normal((3, 2, 3, 10, 8))
    cosines = np.einsum("bhnd,bhmd->bhnm", q, k) / np.linalg.norm(q, axis=-1)[..., None] / np.linalg.norm(k, axis=-1)[
        :, :, None]  # (B, heads, N, N)
    nearest = cosines.argmax(axis=-1)  # (B, heads, N)
    expected = np.take_along_axis(v, nearest[..., None], axis=2)  # (B, heads, N, head_dim)
    y = backend_ops(backend).cosine_attention(q, k, v, np.full((3, 1, 1), 1e6), 1e-12)
    assert_close(y, expected, "kernel")


def test_cosine_attention_names_a_logit_scale_of_the_wrong_shape():
    q = np.zeros((1, 3, 4, 8), np.float32)
    for backend in BACKENDS:
        with pytest.raises(ValueError, match=r"logit_scale must be \(3, 1, 1\)"):
            backend_ops(backend).cosine_attention(q, q, q, np.ones(3, np.float32), 1e-12)


@given(attention_cases(masked=True))
def test_the_mask_of_window_w_goes_to_every_nw_th_window(case):
    # No oracle but the op itself: window b of a batch with masks (nW, N, N) is that window alone with the one mask
    # mask[b % nW] (a mask given to the wrong windows, or the same mask to all, changes the outputs by O(1): entries
    # of -100)
    q, k, v, scale, bias, mask = case
    y = ops.scaled_dot_product_attention(q, k, v, scale, bias, mask)
    for b in range(q.shape[0]):
        window_mask = mask[b % len(mask)][None]  # (1, N, N)
        alone = ops.scaled_dot_product_attention(q[b : b + 1], k[b : b + 1], v[b : b + 1], scale, bias, window_mask)
        assert_close(y[b : b + 1], alone, "kernel")


@on_both_backends
@given(st.integers(1, 2), st.integers(2, 16), st.integers(1, 3), st.integers(1, 8), DTYPES, SEEDS)
def test_attention_and_block_are_permutation_equivariant(backend, B, N, heads, head_dim, dtype, seed):
    """Without position embeddings, permuting the tokens permutes the outputs: f(x[:, P]) = f(x)[:, P]."""
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((B, heads, N, head_dim)).astype(dtype) for _ in range(3))
    perm = rng.permutation(N)
    sdpa = backend_ops(backend).scaled_dot_product_attention
    y = sdpa(q, k, v, 0.5)
    assert_close(sdpa(q[:, :, perm], k[:, :, perm], v[:, :, perm], 0.5), y[:, :, perm], "kernel")
    changed = v.copy()
    changed[:, :, 0] += 1.0  # and the tokens interact: each output depends on the other tokens' values
    assert not np.allclose(sdpa(q, k, changed, 0.5)[:, :, 1:], y[:, :, 1:])
    C = heads * head_dim
    block = random_parameters(layers.Block(C, heads, mlp_ratio=2.0), rng, dtype).set_backend(backend)
    x = rng.standard_normal((B, N, C)).astype(dtype)
    assert_close(block(x[:, perm]), block(x)[:, perm], "layer")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_attention_rows_average_the_values(dtype):
    # No oracle: with every score equal (q = 0) each output row is the mean of v's rows; with one key scoring far
    # above the rest, it is that key's value row.
    rng = np.random.default_rng(3)
    k, v = rng.standard_normal((2, 2, 2, 23, 20)).astype(dtype)
    q = np.zeros_like(k)
    y = ops.scaled_dot_product_attention(q, k, v, 0.5)
    assert_close(y, np.broadcast_to(v.mean(axis=2, keepdims=True), y.shape), "kernel")
    bias = np.zeros((2, 23, 23), dtype)
    bias[:, :, 7] = 1e3
    y = ops.scaled_dot_product_attention(q, k, v, 0.5, bias)
    np.testing.assert_array_equal(y, np.broadcast_to(v[:, :, 7:8], y.shape))


# ---- Swin's roll and windows -----------------------------------------------------------------------------------------


@st.composite
def maps(draw, max_side=20):
    """(x, window): a (B, H, W, C) map (sides that are not multiples of the window included) and an (h, w) window."""
    B, H, W, C = draw(st.integers(1, 3)), draw(st.integers(1, max_side)), draw(st.integers(1, max_side)), draw(
        st.integers(1, 9)
    )
    window = (draw(st.integers(1, 8)), draw(st.integers(1, 8)))
    rng = np.random.default_rng(draw(SEEDS))
    return rng.standard_normal((B, H, W, C)).astype(draw(DTYPES)), window


SHIFTS = st.tuples(st.integers(-25, 25), st.integers(-25, 25))


@needs_torch
@given(maps(), SHIFTS)
def test_roll_matches_torch(xw, shifts):
    x, _ = xw
    rolled = ops.roll(x, shifts)
    assert rolled.dtype == x.dtype
    np.testing.assert_array_equal(rolled, torch.roll(_t(x), shifts, dims=(1, 2)).numpy())


@given(maps(), SHIFTS, SHIFTS)
def test_roll_composes_and_rolls_back(xw, first, second):
    x, _ = xw
    rolled = ops.roll(x, first)
    np.testing.assert_array_equal(ops.roll(rolled, (-first[0], -first[1])), x)
    np.testing.assert_array_equal(ops.roll(rolled, second), ops.roll(x, (first[0] + second[0], first[1] + second[1])))
    np.testing.assert_array_equal(ops.roll(x, (x.shape[1], -2 * x.shape[2])), x)


@needs_timm
@given(maps(), SHIFTS, st.booleans())
def test_window_partition_and_reverse_match_timm(xw, shift, with_residual):
    # timm's shifted-window block: roll, pad to whole windows, window_partition; window_reverse, crop, roll back,
    # plus the shortcut; the reversed windows are random, their padding positions included
    x, (wh, ww) = xw
    B, H, W, C = x.shape
    pad_h, pad_w = -H % wh, -W % ww
    padded = F.pad(torch.roll(_t(x), shift, dims=(1, 2)), (0, 0, 0, pad_w, 0, pad_h))
    windows = ops.window_partition(x, (wh, ww), shift)
    assert windows.dtype == x.dtype
    np.testing.assert_array_equal(windows, timm_window_partition(padded, (wh, ww)).reshape(-1, wh * ww, C).numpy())
    rng = np.random.default_rng(1)
    scrambled = rng.standard_normal(windows.shape).astype(x.dtype)
    residual = rng.standard_normal(x.shape).astype(x.dtype) if with_residual else None
    merged = ops.window_reverse(scrambled, (wh, ww), H, W, shift, residual)
    expected = timm_window_reverse(_t(scrambled).view(-1, wh, ww, C), (wh, ww), H + pad_h, W + pad_w)[:, :H, :W]
    expected = torch.roll(expected, shift, dims=(1, 2)) + (0 if residual is None else _t(residual))
    assert merged.dtype == x.dtype
    np.testing.assert_array_equal(merged, expected.numpy())


@given(maps(), SHIFTS)
def test_window_partition_then_reverse_with_the_opposite_shift_is_the_identity(xw, shift):
    x, window = xw
    B, H, W, C = x.shape
    windows = ops.window_partition(x, window, shift)
    assert windows.shape == (B * -(-H // window[0]) * -(-W // window[1]), window[0] * window[1], C)
    np.testing.assert_array_equal(ops.window_reverse(windows, window, H, W, (-shift[0], -shift[1])), x)


@given(maps())
def test_window_reverse_then_partition_is_the_identity_on_zero_padded_windows(xw):
    x, window = xw
    windows = ops.window_partition(x, window)  # zeros in the padding
    np.testing.assert_array_equal(ops.window_partition(ops.window_reverse(windows, window, *x.shape[1:3]), window),
                                  windows)


@given(maps(), SHIFTS)
def test_window_partition_pads_with_zeros_and_keeps_token_order(xw, shift):
    """Window w, token t holds the rolled map's pixel (wi*wh + ti, wj*ww + tj), 0 in the padding: element by element
    from the formula, x[b, (i - shift_h) mod H, (j - shift_w) mod W]."""
    x, (wh, ww) = xw
    B, H, W, C = x.shape
    windows = ops.window_partition(x, (wh, ww), shift)
    n_rows, n_cols = -(-H // wh), -(-W // ww)
    for w in range(windows.shape[0]):
        b, rest = divmod(w, n_rows * n_cols)
        wi, wj = divmod(rest, n_cols)
        for t in range(wh * ww):
            i, j = wi * wh + t // ww, wj * ww + t % ww
            expected = x[b, (i - shift[0]) % H, (j - shift[1]) % W] if i < H and j < W else np.zeros(C)
            np.testing.assert_array_equal(windows[w, t], expected)


# ---- convolution on NHWC maps ----------------------------------------------------------------------------------------


@st.composite
def conv_cases(draw):
    """Keyword arguments of a conv2d the kernel fits (at least one output pixel): plain or depthwise, kernel 1-5,
    stride 1-3, padding 0-2, with or without scale, bias, activation and residual."""
    depthwise = draw(st.booleans())
    kernel, stride, padding = draw(st.integers(1, 5)), draw(st.integers(1, 3)), draw(st.integers(0, 2))
    C = draw(st.integers(1, 20))
    out = C if depthwise else draw(st.integers(1, 24))
    smallest = max(1, kernel - 2 * padding)
    B, H, W = draw(st.integers(1, 2)), draw(st.integers(smallest, 11)), draw(st.integers(smallest, 11))
    dtype, rng = draw(DTYPES), np.random.default_rng(draw(SEEDS))
    fan_in = (1 if depthwise else C) * kernel * kernel
    Ho, Wo = (ops.conv_output_size(n, kernel, stride, padding) for n in (H, W))
    return dict(
        x=rng.uniform(-1, 1, (B, H, W, C)).astype(dtype),
        weight=(rng.uniform(-1, 1, (out, 1 if depthwise else C, kernel, kernel)) / np.sqrt(fan_in)).astype(dtype),
        bias=rng.uniform(-1, 1, out).astype(dtype) if draw(st.booleans()) else None,
        stride=stride,
        padding=padding,
        groups=C if depthwise else 1,
        scale=rng.uniform(0.5, 2, out).astype(dtype) if draw(st.booleans()) else None,
        act=draw(st.sampled_from(ops.ACTIVATIONS)),
        residual=rng.standard_normal((B, Ho, Wo, out)).astype(dtype) if draw(st.booleans()) else None,
    )


def _torch_conv2d(x, weight, bias=None, stride=1, padding=0, groups=1, scale=None, act="none", residual=None):
    """act(conv(x) * scale + bias) + residual by torch, on and to NHWC arrays."""
    y = F.conv2d(_nchw(x), _t(weight), None, stride, padding, groups=groups)
    y = y * (1.0 if scale is None else _t(scale)[:, None, None]) + (0.0 if bias is None else _t(bias)[:, None, None])
    return _nhwc(_torch_activation(act)(y)) + (0.0 if residual is None else residual)


@needs_torch
@given(conv_cases(), st.booleans())
def test_conv2d_matches_torch(case, as_two_maps):
    x, C = case["x"], case["x"].shape[-1]
    maps = (x[..., : C // 2], x[..., C // 2 :]) if as_two_maps and case["groups"] == 1 and C > 1 else x
    y = ops.conv2d(maps, **{name: value for name, value in case.items() if name != "x"})
    assert y.dtype == x.dtype
    assert_close(y, _torch_conv2d(**case), "kernel")


@given(st.integers(1, 2), st.integers(1, 9), st.integers(1, 9), st.integers(1, 20), st.integers(1, 20), DTYPES, SEEDS)
def test_conv2d_of_a_1x1_kernel_is_linear(B, H, W, C, out, dtype, seed):
    rng = np.random.default_rng(seed)
    x, weight = rng.standard_normal((B, H, W, C)).astype(dtype), rng.standard_normal((out, C, 1, 1)).astype(dtype)
    bias = rng.standard_normal(out).astype(dtype)
    assert_close(ops.conv2d(x, weight, bias), ops.linear(x, weight[:, :, 0, 0], bias), "kernel")


@given(st.integers(1, 9), st.integers(1, 9), st.integers(1, 12), st.sampled_from([1, 3, 5]), st.integers(1, 3),
       st.integers(0, 2), st.data(), DTYPES, SEEDS)
def test_depthwise_conv2d_of_a_unit_tap_moves_the_map(H, W, C, kernel, stride, padding, data, dtype, seed):
    # A depthwise kernel that is 1 at tap (u, v) and 0 elsewhere picks pixel (i*stride + u, j*stride + v) of the
    # zero-padded map for output (i, j): exactly (a transposed kernel or a window off by one tap moves the map).
    if H + 2 * padding < kernel or W + 2 * padding < kernel:
        return
    u, v = data.draw(st.integers(0, kernel - 1)), data.draw(st.integers(0, kernel - 1))
    x = np.random.default_rng(seed).standard_normal((2, H, W, C)).astype(dtype)
    weight = np.zeros((C, 1, kernel, kernel), dtype)
    weight[:, 0, u, v] = 1.0
    y = ops.conv2d(x, weight, stride=stride, padding=padding, groups=C)
    padded = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    Ho, Wo = y.shape[1:3]
    rows, columns = slice(u, u + (Ho - 1) * stride + 1, stride), slice(v, v + (Wo - 1) * stride + 1, stride)
    np.testing.assert_array_equal(y, padded[:, rows, columns])


@needs_torch
@given(st.integers(1, 12), st.integers(1, 12), st.integers(1, 12), st.integers(1, 12), DTYPES, SEEDS)
def test_resize_bilinear_matches_torch(H, W, new_h, new_w, dtype, seed):
    x = np.random.default_rng(seed).standard_normal((2, H, W, 3)).astype(dtype)
    expected = _nhwc(F.interpolate(_nchw(x), size=(new_h, new_w), mode="bilinear", align_corners=False))
    y = ops.resize_bilinear(x, (new_h, new_w))
    assert y.dtype == x.dtype
    assert_close(y, expected, "kernel")


@given(st.integers(1, 40), st.integers(1, 40))
def test_bilinear_matrix_rows_are_convex_weights(n_in, n_out):
    matrix = resample.bilinear_matrix(n_in, n_out)
    assert matrix.shape == (n_out, n_in)
    assert (matrix >= 0).all()
    np.testing.assert_allclose(matrix.sum(axis=1), 1.0, rtol=0, atol=1e-15)
    if n_in == n_out:
        np.testing.assert_array_equal(matrix, np.eye(n_in))


def _batch_norm_params(rng, channels, dtype):
    weight, bias = rng.normal(1.0, 0.3, channels).astype(dtype), rng.normal(0.0, 0.3, channels).astype(dtype)
    return weight, bias, rng.normal(0.0, 0.5, channels).astype(dtype), rng.uniform(0.2, 3.0, channels).astype(dtype)


@needs_torch
@given(st.integers(1, 3), st.integers(1, 12), st.integers(1, 9), st.integers(1, 9), DTYPES, SEEDS)
def test_batch_norm_scale_shift_matches_torch(B, C, H, W, dtype, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 2, (B, H, W, C)).astype(dtype)
    weight, bias, mean, var = _batch_norm_params(rng, C, dtype)
    expected = F.batch_norm(_nchw(x), _t(mean), _t(var), _t(weight), _t(bias), training=False, eps=1e-5)
    scale, shift = mobilevit.batch_norm_scale_shift(weight, bias, mean, var, 1e-5)
    assert scale.dtype == shift.dtype == x.dtype
    assert_close(x * scale + shift, _nhwc(expected), "kernel")


@needs_torch
@given(conv_cases(), SEEDS)
def test_fold_batch_norm_equals_conv_then_batch_norm(case, seed):
    x, weight, stride, padding, groups = (case[name] for name in ("x", "weight", "stride", "padding", "groups"))
    bn_weight, bn_bias, mean, var = _batch_norm_params(np.random.default_rng(seed), weight.shape[0], x.dtype)
    conv = F.conv2d(_nchw(x), _t(weight), None, stride, padding, groups=groups)
    expected = F.batch_norm(conv, _t(mean), _t(var), _t(bn_weight), _t(bn_bias), training=False, eps=1e-5)
    folded_weight, folded_bias = mobilevit.fold_batch_norm(weight, bn_weight, bn_bias, mean, var, 1e-5)
    assert folded_weight.dtype == folded_bias.dtype == x.dtype
    # the folded conv differs from conv-then-BN by rounding only: the kernel tolerance of the dtype
    assert_close(ops.conv2d(x, folded_weight, folded_bias, stride, padding, groups), _nhwc(expected), "kernel")


# ---- whole blocks: the reference's and the fast backend's against torch / timm ---------------------------------------


def _torch_conv_norm_act(x, layer):
    """timm's ConvNormAct in eval mode on an NCHW tensor: conv, BatchNorm of the running statistics, activation."""
    conv, bn = layer.conv, layer.bn
    y = F.conv2d(x, _t(conv.weight), None, conv.stride, conv.padding, groups=conv.groups)
    y = F.batch_norm(y, _t(bn.running_mean), _t(bn.running_var), _t(bn.weight), _t(bn.bias), False, 0.0, bn.eps)
    return _torch_activation(bn.act)(y)


@needs_torch
@on_both_backends
@given(st.integers(1, 2), st.integers(1, 9), st.integers(1, 9), st.integers(1, 16), st.integers(1, 40),
       st.integers(1, 16), st.sampled_from([(1, 3), (2, 3), (1, 5), (2, 5)]), st.booleans(), st.booleans(), DTYPES,
       SEEDS)
def test_inverted_residual_matches_torch(backend, B, H, W, in_chs, mid, out_chs, stride_kernel, shortcut, fold, dtype,
                                         seed):
    # MobileViT's MV2 block: expand 1x1 + BN + SiLU, depthwise k x k + BN + SiLU, project 1x1 + BN, plus x; the
    # BatchNorms applied after the conv or folded into it (rounding only)
    stride, kernel = stride_kernel
    shortcut = shortcut and stride == 1
    out_chs = in_chs if shortcut else out_chs
    rng = np.random.default_rng(seed)
    expand = random_conv_norm_act(rng, in_chs, mid, 1, dtype=dtype)
    depthwise = random_conv_norm_act(rng, mid, mid, kernel, stride, depthwise=True, dtype=dtype)
    project = random_conv_norm_act(rng, mid, out_chs, 1, act="none", dtype=dtype)
    x = rng.standard_normal((B, H, W, in_chs)).astype(dtype)
    expected = _torch_conv_norm_act(_torch_conv_norm_act(_torch_conv_norm_act(_nchw(x), expand), depthwise), project)
    expected = _nhwc(expected) + (x if shortcut else 0.0)
    for layer in (expand, depthwise, project):
        layer.set_backend(backend)
        if fold:
            layer.fold()
    y = backend_ops(backend).inverted_residual(x, expand, depthwise, project, shortcut)
    assert y.dtype == dtype
    assert_close(y, expected, "layer")


def _randomise_torch(module, seed):
    """Random values for every parameter of a torch module, biases and norms included (see random_parameters)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=generator, dtype=p.dtype)
            if p.ndim >= 2:
                p.copy_(noise / p[0].numel() ** 0.5)
            else:
                p.copy_((1.0 if "norm" in name and name.endswith("weight") else 0.0) + 0.3 * noise)
    return module


def _load_from_torch(module, torch_module, dtype):
    """Copy a torch module's parameters into the vitnp module of the same parameter names (timm's), in ``dtype``."""
    state = {key: value.detach().numpy().astype(dtype) for key, value in torch_module.state_dict().items()}
    assert sorted(state) == sorted(key for key, _ in module.named_parameters()), "parameter names differ from timm's"
    modules = dict(module.named_modules())
    for key, value in state.items():
        prefix, _, name = key.rpartition(".")
        modules[prefix + "." if prefix else ""]._parameters[name] = value
    return module


def _torch_dtype(dtype):
    return torch.float64 if dtype == np.float64 else torch.float32


@needs_timm
@on_both_backends
@given(st.integers(1, 3), st.integers(1, 20), st.integers(1, 4), st.integers(1, 12), st.booleans(), DTYPES, SEEDS)
def test_attention_layer_matches_timm(backend, B, N, heads, head_dim, qkv_bias, dtype, seed):
    C = heads * head_dim
    x = np.random.default_rng(seed).standard_normal((B, N, C)).astype(dtype)
    reference = _randomise_torch(timm.layers.Attention(C, num_heads=heads, qkv_bias=qkv_bias), seed)
    reference = reference.to(_torch_dtype(dtype)).eval()
    with torch.no_grad():
        expected = reference(_t(x)).numpy()
    attention = _load_from_torch(layers.Attention(C, heads, qkv_bias=qkv_bias), reference, dtype).set_backend(backend)
    y = attention(x)
    assert y.dtype == dtype
    assert_close(y, expected, "layer")


def test_attention_layer_rejects_heads_not_dividing_dim():
    with pytest.raises(ValueError, match="embed_dim 10 is not divisible by num_heads 3"):
        layers.Attention(10, 3)


@needs_timm
@on_both_backends
@given(st.integers(1, 3), st.integers(1, 20), st.integers(1, 4), st.integers(1, 12), st.sampled_from([1.0, 2.0, 2.5]),
       st.booleans(), st.sampled_from([("gelu", 1e-6), ("silu", 1e-5)]), st.integers(1, 2), DTYPES, SEEDS)
def test_transformer_blocks_and_block_layers_match_timm(backend, S, N, heads, head_dim, mlp_ratio, qkv_bias, act_eps,
                                                        depth, dtype, seed):
    # ViT's blocks (GELU, eps 1e-6) and MobileViT's (SiLU, eps 1e-5), one after the other: through the backend's
    # transformer_blocks op (the fast backend's fused kernel) and through each Block layer's own forward
    act, eps = act_eps
    C = heads * head_dim
    x = np.random.default_rng(seed).standard_normal((S, N, C)).astype(dtype)
    torch_blocks, blocks = [], []
    for index in range(depth):
        reference = TimmBlock(C, heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, act_layer=torch.nn.SiLU if act == "silu"
                              else torch.nn.GELU, norm_layer=functools.partial(torch.nn.LayerNorm, eps=eps))
        torch_blocks.append(_randomise_torch(reference, seed + index).to(_torch_dtype(dtype)).eval())
        block = layers.Block(C, heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, eps=eps, act=act)
        blocks.append(_load_from_torch(block, torch_blocks[-1], dtype).set_backend(backend))
    with torch.no_grad():
        expected = torch.nn.Sequential(*torch_blocks)(_t(x)).numpy()
    x_before = x.copy()
    y = backend_ops(backend).transformer_blocks(x, blocks)
    assert y.dtype == dtype
    assert_close(y, expected, "layer")
    one_by_one = x
    for block in blocks:
        one_by_one = block(one_by_one)
    assert_close(one_by_one, expected, "layer")
    np.testing.assert_array_equal(x, x_before)  # the ops' in-place steps never reach the caller's array
