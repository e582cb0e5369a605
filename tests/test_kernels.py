"""The Numba kernels (vitnp.kernels) against torch.nn.functional, against their NumPy twins (vitnp.ops) and against
properties that need no oracle at all.

Hypothesis picks the shape (1-4 leading axes, last axis 1..300), the dtype (float32 / float64), a value scale and a
seed; the values themselves come from a seeded NumPy generator so that big arrays stay cheap to draw.
"""

import math

import numba
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from tolerances import assert_close

import vitnp
from vitnp import kernels, ops

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # the properties below still run; the torch comparisons skip
    torch = None
needs_torch = pytest.mark.skipif(torch is None, reason="torch is not installed (pip install -e .[test])")

DTYPES = st.sampled_from([np.float32, np.float64])
SHAPES = st.tuples(
    st.lists(st.integers(1, 4), min_size=1, max_size=4),
    st.integers(1, 300),
).map(lambda s: (*s[0], s[1]))


@st.composite
def arrays(draw, scales=(0.1, 1.0, 3.0, 10.0), shapes=SHAPES):
    """(x, rng): a random array of a Hypothesis-chosen shape, dtype and scale, and the generator that drew it."""
    shape, dtype = draw(shapes), draw(DTYPES)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = draw(st.sampled_from(scales))
    return (rng.standard_normal(shape) * scale).astype(dtype), rng


def _t(a):
    return torch.from_numpy(np.ascontiguousarray(a))


def _norm_params(rng, channels, dtype):
    weight = (1.0 + 0.5 * rng.standard_normal(channels)).astype(dtype)
    bias = (0.5 * rng.standard_normal(channels)).astype(dtype)
    return weight, bias


# ---------------------------------------------------------------------------------------------------- LayerNorm


@numba.njit
def _row_sums(a):
    return kernels._sum_lanes(a), kernels._sum_squares_lanes(a)


@given(st.integers(0, 70), DTYPES, st.integers(0, 2**32 - 1))
def test_row_sums_are_float64_sums_in_lane_order(n, dtype, seed):
    # LayerNorm's mean and variance and softmax's total: float64 sums of the row's values (of their squares: each
    # square exact in float64 for float32 values) in 8 interleaved partial sums, lane by lane, then the rest, with the
    # same bits as that order of additions written out here.
    row = (np.random.default_rng(seed).standard_normal(n) * 1e3).astype(dtype)
    sums = _row_sums(row)
    values = [float(v) for v in row]  # float64, exactly
    body = n - n % 8
    for square in (False, True):
        terms = [v * v for v in values] if square else values
        partial = [0.0] * 8
        for c in range(body):
            partial[c % 8] += terms[c]
        total = 0.0
        for p in partial + terms[body:]:
            total += p
        assert sums[square] == total


@needs_torch
@given(arrays(), st.sampled_from([1e-6, 1e-5, 1e-12]))
def test_layer_norm_matches_torch_and_numpy_twin(xr, eps):
    x, rng = xr
    weight, bias = _norm_params(rng, x.shape[-1], x.dtype)
    y = kernels.layer_norm(x, weight, bias, eps)
    assert y.dtype == x.dtype and y.shape == x.shape
    expected = F.layer_norm(_t(x), (x.shape[-1],), _t(weight), _t(bias), eps).numpy()
    assert_close(y, expected, "kernel")
    assert_close(y, ops.layer_norm(x, weight, bias, eps), "kernel")


@given(arrays(shapes=SHAPES.filter(lambda s: s[-1] >= 2)))
def test_layer_norm_normalises_each_row(xr):
    """With weight 1 and bias 0 every row has mean 0 and variance var / (var + eps) (exactly 1 when eps = 0)."""
    x, _ = xr
    channels, eps = x.shape[-1], 1e-6
    y = kernels.layer_norm(x, np.ones(channels, x.dtype), np.zeros(channels, x.dtype), eps)
    assert y.dtype == x.dtype
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    var_x = x64.var(axis=-1)
    tol = 1e-5 if x.dtype == np.float32 else 1e-12
    np.testing.assert_allclose(y64.mean(axis=-1), 0.0, atol=tol)
    np.testing.assert_allclose(y64.var(axis=-1), var_x / (var_x + eps), rtol=tol, atol=tol)


def test_layer_norm_constant_row_gives_bias():
    """A constant row has variance 0: the output is the bias, not NaN (eps keeps the division finite)."""
    for dtype in (np.float32, np.float64):
        x = np.full((2, 5), 3.25, dtype=dtype)
        bias = np.arange(5, dtype=dtype)
        y = kernels.layer_norm(x, np.ones(5, dtype), bias, 1e-6)
        np.testing.assert_array_equal(y, np.broadcast_to(bias, (2, 5)))


def test_layer_norm_reads_non_contiguous_input():
    x = np.random.default_rng(1).standard_normal((4, 6, 8)).transpose(0, 2, 1)  # a strided view
    weight, bias = _norm_params(np.random.default_rng(2), 6, np.float64)
    assert_close(kernels.layer_norm(x, weight, bias, 1e-6), ops.layer_norm(x, weight, bias, 1e-6), "kernel")


# ---------------------------------------------------------------------------------------------------- GELU


@needs_torch
@given(arrays(), st.sampled_from(["none", "tanh"]), st.booleans(), st.booleans())
def test_gelu_matches_torch_and_numpy_twin(xr, approximate, with_bias, in_place):
    x, rng = xr
    bias = (0.5 * rng.standard_normal(x.shape[-1])).astype(x.dtype) if with_bias else None
    shifted = x + bias if with_bias else x.copy()
    expected = F.gelu(_t(shifted), approximate=approximate).numpy()
    twin = ops.gelu(shifted, approximate=approximate)
    if in_place:
        x_in = x.copy()
        y = kernels.gelu(x_in, approximate=approximate, bias=bias, out=x_in)
        assert np.shares_memory(y, x_in)
        np.testing.assert_array_equal(x_in, y)
    else:
        x_before = x.copy()
        y = kernels.gelu(x, approximate=approximate, bias=bias)
        np.testing.assert_array_equal(x, x_before)  # the input is left alone
    assert y.dtype == x.dtype and y.shape == x.shape
    assert_close(y, expected, "kernel")
    assert_close(y, twin, "kernel")


@given(arrays(), st.sampled_from(["none", "tanh"]))
def test_gelu_odd_part_is_identity(xr, approximate):
    """gelu(x) - gelu(-x) = x for both forms: Phi(x) + Phi(-x) = 1 and 1 + tanh(u) + 1 - tanh(u) = 2."""
    x, _ = xr
    difference = kernels.gelu(x, approximate) - kernels.gelu(-x, approximate)
    assert difference.dtype == x.dtype
    eps = np.finfo(x.dtype).eps
    np.testing.assert_allclose(difference, x, rtol=8 * eps, atol=8 * eps)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_known_values(dtype, approximate):
    x = np.array([[0.0, -0.0, 1.0, -1.0, 40.0, -40.0]], dtype=dtype)
    y = kernels.gelu(x, approximate)
    assert y.dtype == dtype
    assert y[0, 0] == 0.0 and y[0, 1] == 0.0
    assert y[0, 4] == 40.0  # Phi(40) rounds to 1 in either dtype
    assert y[0, 5] == 0.0  # -40 * Phi(-40) ~ -1e-348 underflows in either dtype
    phi_1 = 0.5 * (1.0 + math.erf(1.0 / math.sqrt(2.0)))  # Phi(1) = 0.8413447...
    if approximate == "tanh":
        phi_1 = 0.5 * (1.0 + math.tanh(math.sqrt(2.0 / math.pi) * (1.0 + 0.044715)))
    rtol = 1e-6 if dtype == np.float32 else 1e-15
    np.testing.assert_allclose(y[0, 2:4], [phi_1, phi_1 - 1.0], rtol=rtol)


def test_gelu_bias_is_added_first():
    """gelu(x, bias=b) is gelu(x + b), the Linear's bias fused into the activation, not gelu(x) + b."""
    x = np.zeros((2, 3))
    bias = np.array([1.0, -1.0, 2.0])
    np.testing.assert_allclose(kernels.gelu(x, bias=bias), kernels.gelu(np.broadcast_to(bias, (2, 3))), rtol=0)


def test_gelu_rejects_unknown_approximation():
    with pytest.raises(ValueError, match="approximate"):
        kernels.gelu(np.zeros((1, 2)), approximate="sigmoid")


# ---------------------------------------------------------------------------------------------------- softmax


@needs_torch
@given(arrays(scales=(0.1, 1.0, 10.0, 1e4)), st.booleans())
def test_softmax_matches_torch_and_numpy_twin(xr, in_place):
    x, _ = xr
    expected = torch.softmax(_t(x), dim=-1).numpy()
    twin = ops.softmax(x)
    if in_place:
        x_in = x.copy()
        y = kernels.softmax(x_in, out=x_in)
        assert np.shares_memory(y, x_in)
    else:
        y = kernels.softmax(x)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert_close(y, expected, "kernel")
    assert_close(y, twin, "kernel")


@given(arrays(scales=(0.1, 1.0, 30.0, 1e4)))
def test_softmax_rows_are_probabilities(xr):
    """Rows sum to 1, entries in [0, 1], no overflow even at |x| ~ 1e4 (exp(1e4) is inf in either dtype)."""
    x, _ = xr
    y = kernels.softmax(x)
    assert y.dtype == x.dtype
    assert np.isfinite(y).all()
    assert (y >= 0).all() and (y <= 1).all()
    np.testing.assert_allclose(y.sum(axis=-1, dtype=np.float64), 1.0, rtol=0, atol=x.shape[-1] * np.finfo(x.dtype).eps)
    # the largest entry of each row gets the largest probability
    np.testing.assert_array_equal(
        np.take_along_axis(y, x.argmax(axis=-1)[..., None], -1)[..., 0], y.max(axis=-1)
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softmax_finds_the_row_maximum_wherever_it_is(dtype):
    # The row maximum is taken in interleaved lanes plus a tail: an entry 1000 above the rest, at every position of
    # rows of every length up to 33, must get all the probability (missed by the maximum, exp(1000) would be inf).
    for n in range(1, 34):
        x = np.zeros((n, n), dtype)
        x[np.arange(n), np.arange(n)] = 1000.0
        np.testing.assert_array_equal(kernels.softmax(x), np.eye(n, dtype=dtype))


def test_softmax_is_shift_invariant_and_uniform_on_constant_rows():
    x = np.random.default_rng(3).standard_normal((5, 17))
    np.testing.assert_allclose(kernels.softmax(x + 1e3), kernels.softmax(x), rtol=1e-12)
    for dtype in (np.float32, np.float64):
        y = kernels.softmax(np.full((3, 7), 1e4, dtype=dtype))
        np.testing.assert_allclose(y, 1.0 / 7, rtol=4 * np.finfo(dtype).eps)


@pytest.mark.parametrize("kernel", ["softmax", "gelu", "layer_norm"])
def test_in_place_on_a_strided_view(kernel):
    x = np.random.default_rng(4).standard_normal((3, 5, 4)).transpose(0, 2, 1)  # (3, 4, 5), not C-contiguous
    weight, bias = _norm_params(np.random.default_rng(5), 5, np.float64)
    expected, y = {
        "softmax": lambda: (ops.softmax(x), kernels.softmax(x, out=x)),
        "gelu": lambda: (ops.gelu(x), kernels.gelu(x, out=x)),
        "layer_norm": lambda: (ops.layer_norm(x, weight, bias, 1e-6), kernels.layer_norm(x, weight, bias, 1e-6, out=x)),
    }[kernel]()
    np.testing.assert_allclose(y, expected, rtol=1e-12)
    np.testing.assert_allclose(x, expected, rtol=1e-12)


# ---- the float32 exp inside softmax / SiLU: accuracy over float32's whole range, no oracle but float64 ---------------


def _exp32_over(values):
    numba = pytest.importorskip("numba")

    @numba.njit
    def exp_each(x):
        out = np.empty_like(x)
        for i in range(x.size):
            out[i] = kernels._exp(x[i], x.dtype)
        return out

    return exp_each(values)


def test_float32_exp_is_within_two_ulp_and_rounds_subnormals_and_overflow_once():
    x = np.concatenate([np.linspace(-110, 95, 400_001), [0.0, -0.0, 88.72, 88.7228, -87.33, -103.97, -103.2]])
    x = x.astype(np.float32)
    y = _exp32_over(x)
    assert y.dtype == np.float32
    exact = np.exp(x.astype(np.float64))
    with np.errstate(over="ignore"):
        rounded = exact.astype(np.float32)  # exp correctly rounded to float32 (inf past the largest float32)
    normal = np.isfinite(rounded) & (rounded >= np.finfo(np.float32).tiny)
    ulp = np.abs(y[normal].astype(np.float64) - exact[normal]) / np.spacing(rounded[normal]).astype(np.float64)
    assert ulp.max() <= 2.0
    tiny = ~normal & np.isfinite(rounded)  # subnormal results and zeros: within one subnormal step
    assert np.abs(y[tiny].astype(np.float64) - rounded[tiny]).max() <= np.finfo(np.float32).smallest_subnormal
    assert np.array_equal(np.isinf(y), np.isinf(rounded))
    specials = _exp32_over(np.array([-np.inf, np.inf, np.nan, 0.0], np.float32))
    assert specials[0] == 0.0 and specials[1] == np.inf and np.isnan(specials[2]) and specials[3] == 1.0


def test_float32_silu_is_within_two_and_a_half_ulp_over_float32s_whole_range():
    # SiLU's own exp (exp_for_silu_float32: clamped to [-87, 89], one 2^n scaling) against float64's silu: within 2.5
    # ulp wherever 1 + exp(-v) is finite for it (v > -88.37), and below that a -0 or a value of size < 4e-37 (exact
    # silu there is v exp(v), under 3.7e-37 in size).
    x = np.concatenate([np.linspace(-120, 120, 480_001), np.geomspace(1e-38, 1, 2_000), -np.geomspace(1e-38, 1, 2_000),
                        [0.0, -0.0, 87.0, -87.0, 88.37, -88.37, -88.38, 89.0, -89.0]]).astype(np.float32)
    y = kernels.silu(x)
    v = x.astype(np.float64)
    exact = v / (1.0 + np.exp(-v))
    rounded = exact.astype(np.float32)
    relative = (x > -88.37) & (np.abs(rounded) >= np.finfo(np.float32).tiny)
    ulp = np.abs(y[relative] - exact[relative]) / np.spacing(np.abs(rounded[relative])).astype(np.float64)
    assert ulp.max() <= 2.5
    assert np.abs(y[~relative] - exact[~relative]).max() < 4e-37
    assert np.all(y[x < 0] <= 0) and np.all(y[x > 0] > 0)
    specials = kernels.silu(np.array([np.inf, np.nan], np.float32))
    assert specials[0] == np.inf and np.isnan(specials[1])


# ---------------------------------------------------------------------------------------------------- Linear (GEMM)

LINEAR_SHAPES = st.tuples(
    st.lists(st.integers(1, 3), min_size=0, max_size=2),  # leading axes
    st.integers(1, 40),  # rows of the last leading axis: tiles of 6 rows and their remainder
    st.integers(1, 70),  # in_features
    st.integers(1, 70),  # out_features: panels of 16 or 32 float32 columns (AVX2 / AVX-512), a cut-short last one
)


def _linear_case(draw):
    (lead, rows, k, n), dtype = draw(LINEAR_SHAPES), draw(DTYPES)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = rng.standard_normal((*lead, rows, k)).astype(dtype)
    weight = (rng.standard_normal((n, k)) / math.sqrt(k)).astype(dtype)  # outputs O(1), as in a network
    bias = rng.standard_normal(n).astype(dtype) if draw(st.booleans()) else None
    return x, weight, bias


@needs_torch
@given(st.data())
def test_linear_matches_torch_and_numpy_twin(data):
    x, weight, bias = _linear_case(data.draw)
    y = kernels.linear(x, kernels.pack_linear_weight(weight), bias)
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], weight.shape[0])
    expected = F.linear(_t(x), _t(weight), None if bias is None else _t(bias)).numpy()
    assert_close(y, expected, "kernel")
    assert_close(y, ops.linear(x, weight, bias), "kernel")


@needs_torch
@given(st.data(), st.sampled_from(["none", "silu", "gelu", "gelu_tanh"]), st.booleans(), st.booleans())
def test_linear_with_scale_activation_and_residual_matches_torch(data, act, with_scale, with_residual):
    # The GEMM's epilogue: act((x W^T) * scale + bias) + residual, a conv's BatchNorm and SiLU, fc1's bias and GELU,
    # a block's last Linear and its residual add; every tile, including the cut-short last panel and the rows past
    # the last 6-row tile.
    x, weight, bias = _linear_case(data.draw)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    scale = rng.uniform(0.5, 2.0, weight.shape[0]).astype(x.dtype) if with_scale else None
    residual = rng.standard_normal((*x.shape[:-1], weight.shape[0])).astype(x.dtype) if with_residual else None
    y = kernels.linear(x, kernels.pack_linear_weight(weight), bias, act, scale, residual)
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], weight.shape[0])
    z = F.linear(_t(x), _t(weight))
    z = z * (1.0 if scale is None else _t(scale)) + (0.0 if bias is None else _t(bias))
    activations = {"none": lambda v: v, "silu": F.silu, "gelu": F.gelu,
                   "gelu_tanh": lambda v: F.gelu(v, approximate="tanh")}
    expected = activations[act](z) + (0.0 if residual is None else _t(residual))
    assert_close(y, expected.numpy(), "kernel")


def test_linear_rejects_an_unknown_activation_or_a_residual_that_does_not_fit():
    packed = kernels.pack_linear_weight(np.ones((4, 3), np.float32))
    with pytest.raises(ValueError, match="unknown activation 'relu'"):
        kernels.linear(np.ones((2, 3), np.float32), packed, act="relu")
    with pytest.raises(ValueError, match=r"residual must be \(2, 4\) float32"):
        kernels.linear(np.ones((2, 3), np.float32), packed, residual=np.ones((2, 3), np.float32))
    with pytest.raises(ValueError, match="residual must be"):
        kernels.linear(np.ones((2, 3), np.float32), packed, residual=np.ones((2, 4)))


@given(st.data())
def test_linear_is_exact_on_small_integers(data):
    # Products and sums of small integers are exact in floating point whatever the order: the kernel must give
    # exactly the integer matrix product, every row, column and padding case (no oracle but integer arithmetic).
    x, weight, bias = _linear_case(data.draw)
    x, weight = np.round(x * 4).astype(x.dtype), np.round(weight * 4).astype(x.dtype)
    bias = None if bias is None else np.round(bias * 4).astype(x.dtype)
    exact = x.astype(np.int64) @ weight.T.astype(np.int64) + (0 if bias is None else bias.astype(np.int64))
    np.testing.assert_array_equal(kernels.linear(x, kernels.pack_linear_weight(weight), bias), exact)


def test_linear_reads_non_contiguous_input():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((7, 40)).astype(np.float32)[:, ::2]  # (7, 20), stride 2
    weight = rng.standard_normal((19, 20)).astype(np.float32)
    assert_close(kernels.linear(x, kernels.pack_linear_weight(weight)), x.astype(np.float64) @ weight.T, "kernel")


def test_linear_rejects_a_dtype_or_width_that_does_not_fit():
    packed = kernels.pack_linear_weight(np.ones((4, 3), np.float32))
    with pytest.raises(ValueError, match="dtype float64 differs"):
        kernels.linear(np.ones((2, 3)), packed)
    with pytest.raises(ValueError, match="4 features.*takes 3"):
        kernels.linear(np.ones((2, 4), np.float32), packed)
    with pytest.raises(ValueError, match="float32 or float64 weight"):
        kernels.pack_linear_weight(np.ones((4, 3), np.int64))


# ---------------------------------------------------------------------------------------------------- attention

ATTENTION_SHAPES = st.tuples(
    st.integers(1, 4),  # images or windows
    st.integers(1, 60),  # tokens: score rows padded to whole panels of keys (16 or 32 float32 columns)
    st.integers(1, 4),  # heads
    st.integers(1, 40),  # head_dim: value panels and a cut-short last one
)


def _attention_case(draw):
    (B, N, heads, head_dim), dtype = draw(ATTENTION_SHAPES), draw(DTYPES)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    qkv = rng.standard_normal((B, N, 3, heads, head_dim)).astype(dtype)
    bias = rng.standard_normal((heads, N, N)).astype(dtype) if draw(st.booleans()) else None
    mask = None
    if draw(st.booleans()):
        nW = draw(st.sampled_from([w for w in (1, 2, 4) if B % w == 0]))
        mask = np.where(rng.random((nW, N, N)) < 0.3, -100.0, 0.0).astype(dtype)  # Swin's 0 / -100 mask
    return qkv, head_dim**-0.5, bias, mask


@needs_torch
@given(st.data())
def test_attention_matches_torch_and_numpy_twin(data):
    qkv, scale, bias, mask = _attention_case(data.draw)
    B, N, _, heads, head_dim = qkv.shape
    y = kernels.attention(qkv, scale, bias, mask)
    assert y.dtype == qkv.dtype and y.shape == (B, N, heads, head_dim)
    q, k, v = _t(qkv).permute(2, 0, 3, 1, 4)  # each (B, heads, N, head_dim)
    attn = (q * scale) @ k.transpose(-2, -1)
    added = 0.0 if bias is None else bias
    if mask is not None:
        added = added + mask[np.arange(B) % len(mask), None]  # (B, 1, N, N): window b takes mask b % nW
    attn = attn + torch.as_tensor(added, dtype=attn.dtype)
    expected = (attn.softmax(dim=-1) @ v).permute(0, 2, 1, 3).numpy()
    assert_close(y, expected, "kernel")
    q, k, v = qkv.transpose(2, 0, 3, 1, 4)
    twin = ops.scaled_dot_product_attention(q, k, v, qkv.dtype.type(scale), np.asarray(added, qkv.dtype))
    assert_close(y, twin.transpose(0, 2, 1, 3), "kernel")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_attention_on_every_size_up_to_two_panels(dtype):
    # Every head_dim and every number of keys from 1 to two panels and one more: whole panels, panels cut short,
    # panels whose second vector is all padding (computed on their first vector alone), against the NumPy twin.
    width = kernels._panel_width(dtype)
    rng = np.random.default_rng(0)
    for size in range(1, 2 * width + 2):
        qkv = rng.standard_normal((1, size, 3, 1, size)).astype(dtype)  # N = head_dim = size
        q, k, v = qkv.transpose(2, 0, 3, 1, 4)
        twin = ops.scaled_dot_product_attention(q, k, v, dtype(0.3), np.zeros((), dtype))
        assert_close(kernels.attention(qkv, 0.3), twin.transpose(0, 2, 1, 3), "kernel")


def test_attention_rows_average_the_values():
    # No oracle: with every score equal (q = 0) each output row is the mean of v's rows; with one key scoring far
    # above the rest, it is that key's value row.
    rng = np.random.default_rng(3)
    qkv = rng.standard_normal((2, 23, 3, 2, 20))
    qkv[:, :, 0] = 0.0
    y = kernels.attention(qkv, 0.5)
    np.testing.assert_allclose(y, np.broadcast_to(qkv[:, :, 2].mean(axis=1, keepdims=True), y.shape), rtol=1e-12)
    bias = np.zeros((2, 23, 23))
    bias[:, :, 7] = 1e3
    y = kernels.attention(qkv, 0.5, bias)
    np.testing.assert_array_equal(y, np.broadcast_to(qkv[:, 7:8, 2], y.shape))


def test_attention_rejects_shapes_that_do_not_fit():
    qkv = np.zeros((2, 5, 3, 2, 4), np.float32)
    with pytest.raises(ValueError, match=r"\(B, N, 3, heads, head_dim\)"):
        kernels.attention(qkv[:, :, :2], 1.0)
    with pytest.raises(ValueError, match=r"bias must be \(2, 5, 5\)"):
        kernels.attention(qkv, 1.0, bias=np.zeros((3, 5, 5), np.float32))
    with pytest.raises(ValueError, match=r"mask must be \(nW, 5, 5\) with nW dividing 2"):
        kernels.attention(qkv, 1.0, mask=np.zeros((3, 5, 5), np.float32))


@given(st.integers(1, 2), st.integers(3, 12), st.integers(3, 12), st.integers(1, 150) | st.sampled_from([16, 48, 128]),
       st.integers(1, 2), st.integers(0, 1), st.sampled_from(["none", "silu"]), DTYPES, st.integers(0, 2**32 - 1))
def test_depthwise_3x3_inside_the_map_is_the_general_sum_bit_for_bit(B, H, W, C, stride, padding, act, dtype, seed):
    # A 3x3 window inside the map runs its nine taps as one unrolled loop, and at stride 1 with whole vectors of
    # channels (C a multiple of 16: drawn often) four such windows side by side run together; the same weights
    # ringed with zeros as a 5x5 kernel (padding one more) take the general loops over the taps inside, adding exact
    # zeros in between: the same sums in the same order, so the same bits, over every channel path (4 vectors,
    # 1 vector, one by one) and every place along a row.
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, H, W, C)).astype(dtype)
    weight = rng.standard_normal((C, 1, 3, 3)).astype(dtype)
    ringed = np.zeros((C, 1, 5, 5), dtype)
    ringed[:, :, 1:4, 1:4] = weight
    scale, shift = rng.uniform(0.5, 2, C).astype(dtype), rng.standard_normal(C).astype(dtype)
    y = kernels.depthwise_conv2d(x, weight, stride, padding, scale, shift, act)
    np.testing.assert_array_equal(y, kernels.depthwise_conv2d(x, ringed, stride, padding + 1, scale, shift, act))


def _inverted_residual_case(rng, B, H, W, in_chs, mid, out_chs, kernel, dtype):
    """Random x, the three convs' (weight, scale, shift) and their packed 1x1 weights, for inverted_residual."""
    x = rng.standard_normal((B, H, W, in_chs)).astype(dtype)
    expand_weight = (rng.standard_normal((mid, in_chs)) * in_chs**-0.5).astype(dtype)
    depthwise_weight = (rng.standard_normal((mid, 1, kernel, kernel)) / kernel).astype(dtype)
    project_weight = (rng.standard_normal((out_chs, mid)) * mid**-0.5).astype(dtype)
    scale_shifts = [
        (rng.uniform(0.5, 2, n).astype(dtype), rng.standard_normal(n).astype(dtype)) for n in (mid, mid, out_chs)
    ]
    packed = kernels.pack_linear_weight(expand_weight), kernels.pack_linear_weight(project_weight)
    return x, depthwise_weight, packed, scale_shifts


@given(st.integers(1, 3), st.integers(1, 14), st.integers(1, 14), st.integers(1, 24),
       st.integers(1, 70) | st.sampled_from([16, 32, 64]), st.integers(1, 40),
       st.sampled_from([(1, 3), (2, 3), (1, 5), (2, 5)]),
       st.sampled_from([None, 1, 2, 3]), st.sampled_from(kernels.ACTIVATIONS), st.booleans(), DTYPES,
       st.integers(0, 2**32 - 1))
def test_inverted_residual_is_the_three_convs_one_by_one_bit_for_bit(
    B, H, W, in_chs, mid, out_chs, stride_kernel, tile_rows, act, shortcut, dtype, seed
):
    # Tiles of 1-3 output rows make the band keep rows from the tile before (at stride 1 and 2, for 3x3 and 5x5 windows,
    # at the map's top and bottom edges); mid and out_chs off the GEMM's panel width take the padding paths.
    stride, kernel = stride_kernel
    padding = (stride - 1 + kernel - 1) // 2  # timm's symmetric padding
    shortcut = shortcut and stride == 1
    out_chs = in_chs if shortcut else out_chs
    x, depthwise_weight, (expand, project), ((s1, t1), (s2, t2), (s3, t3)) = _inverted_residual_case(
        np.random.default_rng(seed), B, H, W, in_chs, mid, out_chs, kernel, dtype
    )
    expected = kernels.linear(x, expand, t1, act, s1)
    expected = kernels.depthwise_conv2d(expected, depthwise_weight, stride, padding, s2, t2, "silu")
    expected = kernels.linear(expected, project, t3, "none", s3, residual=x if shortcut else None)
    y = kernels.inverted_residual(
        x, (expand, s1, t1, act), (depthwise_weight, s2, t2, "silu"), (project, s3, t3, "none"), stride, padding,
        shortcut, tile_rows,
    )
    assert y.dtype == dtype
    np.testing.assert_array_equal(y, expected)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(("B", "stride", "tile_rows"), [(1, 1, None), (1, 2, 3), (3, 1, 2)])
def test_inverted_residual_split_between_threads_is_the_three_convs_bit_for_bit(threads, B, stride, tile_rows):
    # Work enough to be shared out: each thread's run of output rows expands the rows it shares with the run before
    # again, from the input.
    before = vitnp.get_num_threads()
    vitnp.set_num_threads(threads)
    try:
        x, depthwise_weight, (expand, project), ((s1, t1), (s2, t2), (s3, t3)) = _inverted_residual_case(
            np.random.default_rng(stride), B, 33, 40, 32, 128, 32, 3, np.float32
        )
        expected = kernels.linear(x, expand, t1, "silu", s1)
        expected = kernels.depthwise_conv2d(expected, depthwise_weight, stride, 1, s2, t2, "silu")
        expected = kernels.linear(expected, project, t3, "none", s3, residual=x if stride == 1 else None)
        y = kernels.inverted_residual(
            x, (expand, s1, t1, "silu"), (depthwise_weight, s2, t2, "silu"), (project, s3, t3, "none"), stride, 1,
            stride == 1, tile_rows,
        )
    finally:
        vitnp.set_num_threads(before)
    np.testing.assert_array_equal(y, expected)


def test_inverted_residual_rejects_what_does_not_fit():
    rng = np.random.default_rng(0)
    x, depthwise_weight, (expand, project), ((s1, t1), (s2, t2), (s3, t3)) = _inverted_residual_case(
        rng, 1, 6, 5, 8, 32, 16, 3, np.float32
    )

    def call(x=x, expand=expand, depthwise_weight=depthwise_weight, project=project, stride=1, shortcut=False,
             tile_rows=None):
        parts = (expand, s1, t1, "silu"), (depthwise_weight, s2, t2, "silu"), (project, s3, t3, "none")
        return kernels.inverted_residual(x, *parts, stride, 1, shortcut, tile_rows)

    with pytest.raises(ValueError, match=r"expected an NHWC map \(B, H, W, C\), got shape \(6, 5, 8\)"):
        call(x=x[0])
    with pytest.raises(ValueError, match="input dtype float64 differs from the expand weight's float32"):
        call(x=x.astype(np.float64))
    with pytest.raises(ValueError, match="the expand weight takes 8 channels, not 7"):
        call(x=np.ascontiguousarray(x[..., :7]))
    with pytest.raises(ValueError, match="the project weight takes 24 channels, not 32"):
        call(project=kernels.pack_linear_weight(np.zeros((16, 24), np.float32)))
    with pytest.raises(ValueError, match=r"depthwise weight float32 \(32, 1, 3, 2\) does not fit 32 float32 channels"):
        call(depthwise_weight=depthwise_weight[..., :2])
    with pytest.raises(ValueError, match=r"depthwise weight float32 \(16, 1, 3, 3\) does not fit 32"):
        call(depthwise_weight=depthwise_weight[:16])
    with pytest.raises(ValueError, match="a shortcut needs stride 1 and out_chs = in_chs, got 1, 16"):
        call(shortcut=True)
    with pytest.raises(ValueError, match="tile_rows must be at least 1, got 0"):
        call(tile_rows=0)
    with pytest.raises(ValueError, match="a 5x5 kernel does not fit a 1x1 map padded by 1"):
        call(x=np.ascontiguousarray(x[:, :1, :1]), depthwise_weight=np.zeros((32, 1, 5, 5), np.float32))


def _winograd_case(rng, B, H, W, maps_channels, O, dtype, integers=False):
    draw = (lambda shape: rng.integers(-3, 4, shape)) if integers else rng.standard_normal
    maps = tuple(draw((B, H, W, c)).astype(dtype) for c in maps_channels)
    C = sum(maps_channels)
    weight = (draw((O, C, 3, 3)) * (1 if integers else (9 * C) ** -0.5)).astype(dtype)
    packed = kernels.pack_linear_weight(weight.transpose(0, 2, 3, 1).reshape(O, -1))  # conv2d's (u, v, c) columns
    return maps if len(maps) > 1 else maps[0], weight, packed


CHANNELS = st.lists(st.integers(1, 40) | st.sampled_from([16, 32, 48]), min_size=1, max_size=2)


@given(st.integers(1, 2), st.integers(1, 12), st.integers(1, 12), CHANNELS, st.integers(1, 40),
       st.sampled_from(kernels.ACTIVATIONS), DTYPES, st.integers(0, 2**32 - 1))
def test_winograd_conv3x3_is_conv2d_to_a_few_ulp(B, H, W, maps_channels, O, act, dtype, seed):
    # The transforms add and subtract up to nine window values and the weights' halves, rounded once each: the error
    # is a few ulp of the largest terms, as for a GEMM's reordered sums. Measured on these cases up to ~2e-6 (float32)
    # and ~4e-15 (float64) of the output's largest value; the tolerance leaves a 10x and 25x margin.
    rng = np.random.default_rng(seed)
    maps, weight, packed = _winograd_case(rng, B, H, W, maps_channels, O, dtype)
    scale, shift = rng.uniform(0.5, 2, O).astype(dtype), rng.standard_normal(O).astype(dtype)
    expected = kernels.conv2d(maps, packed, 3, 1, 1, shift, act, scale)
    y = kernels.winograd_conv3x3(maps, kernels.pack_winograd_weight(weight), shift, act, scale)
    assert y.dtype == dtype and y.shape == expected.shape
    size = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(y, expected, rtol=0, atol=(2e-5 if dtype == np.float32 else 1e-13) * size)


@given(st.integers(1, 2), st.integers(1, 9), st.integers(1, 9), CHANNELS, st.integers(1, 20), DTYPES,
       st.integers(0, 2**32 - 1))
def test_winograd_conv3x3_on_small_integers_is_exact(B, H, W, maps_channels, O, dtype, seed):
    # Small integers and their halves and quarters, in sums far below 2^24: every step of both convs is exact, so any
    # wrong coefficient, window offset or edge shows as a difference, not hidden by a tolerance.
    maps, weight, packed = _winograd_case(np.random.default_rng(seed), B, H, W, maps_channels, O, dtype, True)
    np.testing.assert_array_equal(kernels.winograd_conv3x3(maps, kernels.pack_winograd_weight(weight)),
                                  kernels.conv2d(maps, packed, 3, 1, 1))


@pytest.mark.parametrize("threads", [1, 2])
def test_winograd_conv3x3_split_between_threads_is_exact_on_small_integers(threads):
    # MobileViT-S's fusion conv at 256x256 (32x32 maps, 96 + 96 channels in, 96 out), shared out between threads
    before = vitnp.get_num_threads()
    vitnp.set_num_threads(threads)
    try:
        maps, weight, packed = _winograd_case(np.random.default_rng(0), 1, 32, 32, (96, 96), 96, np.float32, True)
        y = kernels.winograd_conv3x3(maps, kernels.pack_winograd_weight(weight), act="none")
    finally:
        vitnp.set_num_threads(before)
    np.testing.assert_array_equal(y, kernels.conv2d(maps, packed, 3, 1, 1))


def test_winograd_conv3x3_rejects_what_does_not_fit():
    x = np.zeros((1, 4, 4, 8), np.float32)
    with pytest.raises(ValueError, match=r"expected a float32 or float64 3x3 conv weight \(out, C, 3, 3\), got "
                                         r"float32 \(4, 8, 5, 5\)"):
        kernels.pack_winograd_weight(np.zeros((4, 8, 5, 5), np.float32))
    with pytest.raises(ValueError, match=r"the packed weight float32 \(16, 1, 16, 32\) does not fit 17 float32 "
                                         r"channels"):
        kernels.winograd_conv3x3(np.zeros((1, 4, 4, 17), np.float32),
                                 kernels.pack_winograd_weight(np.zeros((4, 8, 3, 3), np.float32)))
    with pytest.raises(ValueError, match="the packed weight float32 .* does not fit 8 float64 channels"):
        kernels.winograd_conv3x3(x.astype(np.float64), kernels.pack_winograd_weight(np.zeros((4, 8, 3, 3), np.float32)))
    with pytest.raises(ValueError, match="expected NHWC maps"):
        kernels.winograd_conv3x3(x[0], kernels.pack_winograd_weight(np.zeros((4, 8, 3, 3), np.float32)))


# im2col: no oracle needed beyond the NumPy windows view, which test_conv holds to torch's conv2d; conv2d: none
# beyond linear on im2col's matrix.


@given(st.integers(1, 2), st.integers(1, 9), st.integers(1, 9), st.lists(st.integers(1, 40), min_size=1, max_size=3),
       st.integers(1, 5), st.integers(1, 3), st.integers(0, 2), DTYPES, st.integers(0, 2**32 - 1))
def test_im2col_equals_the_windows_of_the_concatenated_maps(B, H, W, channels, kernel, stride, padding, dtype, seed):
    # Up to three maps of up to 40 channels (one map: whole window rows copied as one run; several: channel by map),
    # windows hanging over every edge, strides that skip pixels: value for value the padded windows of the
    # concatenation, zeros in the padding included.
    if H + 2 * padding < kernel or W + 2 * padding < kernel:
        return
    rng = np.random.default_rng(seed)
    maps = tuple(rng.standard_normal((B, H, W, c)).astype(dtype) for c in channels)
    columns = kernels.im2col(maps if len(maps) > 1 else maps[0], kernel, stride, padding)
    windows = ops.conv_windows(np.concatenate(maps, axis=-1), kernel, stride, padding)
    assert columns.dtype == dtype
    np.testing.assert_array_equal(columns, windows.reshape(*windows.shape[:3], -1))


@given(st.integers(1, 2), st.integers(1, 9), st.integers(1, 9), st.lists(st.integers(1, 20), min_size=1, max_size=2),
       st.sampled_from([1, 3, 5]), st.integers(1, 3), st.integers(0, 2), st.integers(1, 70),
       st.sampled_from(["none", "silu"]), st.booleans(), st.integers(1, 4000), DTYPES, st.integers(0, 2**32 - 1))
def test_conv2d_is_linear_on_im2col_bit_for_bit(B, H, W, channels, kernel, stride, padding, out, act, with_residual,
                                                 l2_bytes, dtype, seed):
    # conv2d builds the im2col rows a band at a time (the bands sized by the L2 budget, shrunk here down to one
    # output row) and runs the GEMM on each band, all its panels: the same products in the same order as linear on
    # the whole im2col matrix, so the same bits, scale, shift, activation and residual included.
    if H + 2 * padding < kernel or W + 2 * padding < kernel:
        return
    rng = np.random.default_rng(seed)
    maps = tuple(rng.standard_normal((B, H, W, c)).astype(dtype) for c in channels)
    maps = maps if len(maps) > 1 else maps[0]
    columns = kernels.im2col(maps, kernel, stride, padding)
    packed = kernels.pack_linear_weight(rng.standard_normal((out, columns.shape[-1])).astype(dtype))
    scale, shift = rng.uniform(0.5, 2, out).astype(dtype), rng.standard_normal(out).astype(dtype)
    residual = rng.standard_normal((*columns.shape[:3], out)).astype(dtype) if with_residual else None
    expected = kernels.linear(columns, packed, shift, act, scale, residual)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kernels, "_L2_ROWS_BYTES", l2_bytes)
        y = kernels.conv2d(maps, packed, kernel, stride, padding, shift, act, scale, residual)
    assert y.dtype == dtype
    np.testing.assert_array_equal(y, expected)


def test_conv2d_rejects_a_weight_that_does_not_fit():
    x = np.zeros((1, 5, 5, 4), np.float32)
    packed = kernels.pack_linear_weight(np.zeros((6, 3 * 3 * 4), np.float32))
    with pytest.raises(ValueError, match=r"the weight \(float32, 36 inputs\) does not fit a 5x5 conv over 4"):
        kernels.conv2d(x, packed, 5, padding=2)
    with pytest.raises(ValueError, match="does not fit a 3x3 conv over 4 float64 channels"):
        kernels.conv2d(x.astype(np.float64), packed, 3, padding=1)
    with pytest.raises(ValueError, match=r"residual must be \(1, 5, 5, 6\) float32"):
        kernels.conv2d(x, packed, 3, padding=1, residual=np.zeros((1, 5, 5, 5), np.float32))
    with pytest.raises(ValueError, match="conv2d: a 9x9 kernel does not fit a 5x5 map padded by 1"):
        kernels.conv2d(x, packed, 9, padding=1)


def _assert_image_conv2d_is_conv2d(B, C, H, W, kernel, stride, padding, out, dtype, rng):
    images = rng.standard_normal((B, C, H, W)).astype(dtype)
    packed = kernels.pack_linear_weight(rng.standard_normal((out, kernel * kernel * C)).astype(dtype))
    scale, shift = rng.uniform(0.5, 2, out).astype(dtype), rng.standard_normal(out).astype(dtype)
    nhwc = np.ascontiguousarray(images.transpose(0, 2, 3, 1))
    for act in kernels.ACTIVATIONS:
        y = kernels.image_conv2d(images, packed, kernel, stride, padding, shift, act, scale)
        assert y.dtype == dtype and y.flags.c_contiguous
        np.testing.assert_array_equal(y, kernels.conv2d(nhwc, packed, kernel, stride, padding, shift, act, scale))


@given(st.integers(1, 2), st.integers(1, 5), st.integers(0, 8), st.integers(0, 30), st.sampled_from([1, 3, 5]),
       st.integers(1, 3), st.integers(0, 2), st.integers(1, 40), DTYPES, st.integers(0, 2**32 - 1))
def test_image_conv2d_is_conv2d_on_the_images_made_nhwc_bit_for_bit(B, C, more_rows, more_columns, kernel, stride,
                                                                      padding, out, dtype, seed):
    # image_conv2d reads NCHW images in place, eight output pixels at a time where their windows are inside the image
    # (rows up to 30 pixels wide: some with a run of eight, some with two, some pixel by pixel) and skipping the
    # padding's taps: the same products in the same order as conv2d's GEMM on the NHWC copy, so the same bits, for
    # any number of output channels (vectors cut short) and every activation (gelu_tanh over each row after).
    smallest = max(1, kernel - 2 * padding)  # the kernel fits the padded image
    H, W = smallest + more_rows, smallest + more_columns
    _assert_image_conv2d_is_conv2d(B, C, H, W, kernel, stride, padding, out, dtype, np.random.default_rng(seed))


@pytest.mark.parametrize(("kernel", "stride", "padding"), [(3, 2, 1), (3, 1, 1), (3, 1, 0), (5, 2, 2), (1, 1, 0)])
def test_image_conv2d_runs_of_eight_end_inside_the_image_at_every_width(kernel, stride, padding):
    # Whether a run of eight windows may go together depends on where the eighth ends: every width from the
    # smallest up to three runs' worth, so that a run ends just inside, at and just past the image's edge.
    rng = np.random.default_rng(kernel * 10 + stride)
    for W in range(max(1, kernel - 2 * padding), 24 * stride + kernel):
        _assert_image_conv2d_is_conv2d(1, 3, kernel + 1, W, kernel, stride, padding, 16, np.float32, rng)


def test_image_conv2d_rejects_images_and_weights_that_do_not_fit():
    packed = kernels.pack_linear_weight(np.zeros((6, 3 * 3 * 3), np.float32))
    with pytest.raises(ValueError, match=r"float32 or float64 NCHW images \(B, C, H, W\), got float32 \(3, 5, 5\)"):
        kernels.image_conv2d(np.zeros((3, 5, 5), np.float32), packed, 3)
    with pytest.raises(ValueError, match="NCHW images .* got int64"):
        kernels.image_conv2d(np.zeros((1, 3, 5, 5), np.int64), packed, 3)
    with pytest.raises(ValueError, match=r"the weight \(float32, 27 inputs\) does not fit a 3x3 conv over 4 float32"):
        kernels.image_conv2d(np.zeros((1, 4, 5, 5), np.float32), packed, 3)
    with pytest.raises(ValueError, match="does not fit a 3x3 conv over 3 float64 channels"):
        kernels.image_conv2d(np.zeros((1, 3, 5, 5)), packed, 3)
    with pytest.raises(ValueError, match="image_conv2d: a 3x3 kernel does not fit a 2x5 image padded by 0"):
        kernels.image_conv2d(np.zeros((1, 3, 2, 5), np.float32), packed, 3)


def test_im2col_rejects_maps_that_do_not_fit():
    x = np.zeros((1, 5, 5, 4), np.float32)
    with pytest.raises(ValueError, match="NHWC maps .* of one .B, H, W. and dtype"):
        kernels.im2col((x, np.zeros((1, 5, 6, 4), np.float32)), 3)
    with pytest.raises(ValueError, match="of one .B, H, W. and dtype"):
        kernels.im2col((x, x.astype(np.float64)), 3)
    with pytest.raises(ValueError, match="NHWC maps"):
        kernels.im2col(x[0], 3)
    with pytest.raises(ValueError, match="float32 or float64"):
        kernels.im2col(x.astype(np.float16), 3)
    with pytest.raises(ValueError, match="does not fit a 5x5 map padded by 1"):
        kernels.im2col(x, 9, padding=1)


# Activations in registers: no oracle needed beyond kernels.silu's and gelu's loops over memory, which test_conv
# and the tests above hold to torch.

# exp's clamps and the edges of float32 exp's range (softmax's and SiLU's), erf's clamps (at v = +-4 sqrt(2)),
# +-inf, nan
ACTIVATION_EDGES = [np.nan, np.inf, -np.inf, -1e30, -1e4, -104.5, -104.0, -89.0, -88.72, -88.38, -88.37, -87.0, -20.0,
                    -5.66, -5.65, -1e-30, 0.0, 1e-30, 5.65, 5.66, 20.0, 87.0, 88.72, 89.0, 1e4, 1e30]


def _assert_same_bits(a, b):
    np.testing.assert_array_equal(a, b)  # nan where nan
    numbers = ~np.isnan(a)
    np.testing.assert_array_equal(np.signbit(a[numbers]), np.signbit(b[numbers]))  # -0 where -0


@given(st.integers(1, 20), st.integers(1, 80), st.sampled_from([1, 3]), st.integers(1, 3), DTYPES,
       st.integers(0, 2**32 - 1))
def test_activations_in_registers_are_activations_in_memory_bit_for_bit(rows, channels, kernel, stride, dtype, seed):
    # The GEMM applies SiLU and GELU to its output tile in the registers, the depthwise conv to its vectors of
    # channels (kernels._vsilu, _vgelu); kernels.silu / gelu run their loop over memory: the same operations in the
    # same order, so the same bits, over exp's and erf's whole range (clamps, +-inf, nan) and on every tile row and
    # column, every vector and scalar channel remainder.
    rng = np.random.default_rng(seed)
    pool = np.concatenate([ACTIVATION_EDGES, rng.standard_normal(40) * 30])
    signs = rng.choice([-1.0, 1.0], channels)
    weight = (signs * rng.uniform(0.5, 2.0, channels)).astype(dtype)  # no zero: 0 * inf would only give nan
    shift = rng.standard_normal(channels).astype(dtype)
    x = rng.choice(pool, (rows, 1)).astype(dtype)
    packed = kernels.pack_linear_weight(weight[:, None])
    pre_activation = kernels.linear(x, packed, shift)
    _assert_same_bits(kernels.linear(x, packed, shift, act="silu"), kernels.silu(pre_activation))
    _assert_same_bits(kernels.linear(x, packed, shift, act="gelu"), kernels.gelu(pre_activation))
    maps = rng.choice(pool, (1, rows, 5, channels)).astype(dtype)
    taps = np.repeat(weight[:, None, None, None], kernel, axis=2).repeat(kernel, axis=3)  # (C, 1, k, k)
    conv = kernels.depthwise_conv2d(maps, taps, stride, kernel // 2, shift=shift)
    for act, in_memory in (("silu", kernels.silu), ("gelu", kernels.gelu)):
        in_registers = kernels.depthwise_conv2d(maps, taps, stride, kernel // 2, shift=shift, act=act)
        _assert_same_bits(in_registers, in_memory(conv))
