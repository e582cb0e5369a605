"""The engine's kernels (vitnp.fast.*) inside: what test_fast_ops.py cannot see through the ops.

- Bit for bit: kernels that promise the same operations in the same order as a composition of others (a fused block
  and its ops one by one, conv2d and linear on im2col's matrix, the in-register activations and the in-memory ones).
- Accuracy of the float32 polynomials (exp, SiLU) in ulp against float64, over float32's whole range.
- The GEMM's edges (6-row tiles, panels cut short), exact on small integers; the kernels' own arguments (``out=``, a
  GELU's bias, a conv's scale) against the reference ops; and the errors of arguments that do not fit.

Tolerances: 'kernel' (tests/tolerances.py) where a kernel is compared with the reference ops (see test_fast_ops.py);
Winograd's against the direct conv is stated at its test.
"""

import contextlib
import functools
import math
import re

import numba
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from test_reference_ops import DTYPES, LINEAR_SHAPES, SEEDS, random_parameters
from tolerances import assert_close

import vitnp
from vitnp import layers, mobilevit
from vitnp.fast import activations, conv, fused, gemm, rows, vecmath, windows, winograd
from vitnp.fast import ops as fast_ops
from vitnp.fast.attention import attention
from vitnp.reference import ops as reference

pack = gemm.pack_linear_weight


@contextlib.contextmanager
def num_threads(n):
    """vitnp on ``n`` threads inside the ``with`` body."""
    before = vitnp.get_num_threads()
    vitnp.set_num_threads(n)
    try:
        yield
    finally:
        vitnp.set_num_threads(before)


# ---- sums, exp and SiLU in float32 -----------------------------------------------------------------------------------


@numba.njit
def _row_sums(a):
    return vecmath.sum_lanes(a), vecmath.sum_squares_lanes(a)


@given(st.integers(0, 70), DTYPES, SEEDS)
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


@numba.njit
def _exp_each(x):
    out = np.empty_like(x)
    for i in range(x.size):
        out[i] = activations.scalar_exp(x[i], x.dtype)
    return out


def test_float32_exp_is_within_two_ulp_and_rounds_subnormals_and_overflow_once():
    x = np.concatenate([np.linspace(-110, 95, 400_001), [0.0, -0.0, 88.72, 88.7228, -87.33, -103.97, -103.2]])
    x = x.astype(np.float32)
    y = _exp_each(x)
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
    specials = _exp_each(np.array([-np.inf, np.inf, np.nan, 0.0], np.float32))
    assert specials[0] == 0.0 and specials[1] == np.inf and np.isnan(specials[2]) and specials[3] == 1.0


def test_float32_silu_is_within_two_and_a_half_ulp_over_float32s_whole_range():
    # SiLU's own exp (exp_for_silu: clamped to [-87, 89], one 2^n scaling) against float64's silu: within 2.5 ulp
    # wherever 1 + exp(-v) is finite for it (v > -88.37), and below that a -0 or a value of size < 4e-37 (exact
    # silu there is v exp(v), under 3.7e-37 in size).
    x = np.concatenate([np.linspace(-120, 120, 480_001), np.geomspace(1e-38, 1, 2_000), -np.geomspace(1e-38, 1, 2_000),
                        [0.0, -0.0, 87.0, -87.0, 88.37, -88.37, -88.38, 89.0, -89.0]]).astype(np.float32)
    y = rows.silu(x)
    v = x.astype(np.float64)
    exact = v / (1.0 + np.exp(-v))
    rounded = exact.astype(np.float32)
    relative = (x > -88.37) & (np.abs(rounded) >= np.finfo(np.float32).tiny)
    ulp = np.abs(y[relative] - exact[relative]) / np.spacing(np.abs(rounded[relative])).astype(np.float64)
    assert ulp.max() <= 2.5
    assert np.abs(y[~relative] - exact[~relative]).max() < 4e-37
    assert np.all(y[x < 0] <= 0) and np.all(y[x > 0] > 0)
    specials = rows.silu(np.array([np.inf, np.nan], np.float32))
    assert specials[0] == np.inf and np.isnan(specials[1])


# ---- rows: the kernels' own arguments --------------------------------------------------------------------------------


@given(st.lists(st.integers(1, 4), min_size=1, max_size=3), st.integers(1, 200), st.sampled_from(["gelu", "gelu_tanh",
       "silu"]), st.booleans(), DTYPES, SEEDS)
def test_activation_in_place_or_not(lead, channels, act, in_place, dtype, seed):
    # gelu / silu(x, out): act(x), written to x itself or to a new array (x left alone)
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((*lead, channels)) * 5).astype(dtype)
    expected = reference.activation(x, act)
    kernel = {"gelu": rows.gelu, "gelu_tanh": functools.partial(rows.gelu, approximate="tanh"), "silu": rows.silu}[act]
    before = x.copy()
    y = kernel(x, out=x if in_place else None)
    assert np.shares_memory(y, x) == in_place
    np.testing.assert_array_equal(x, y if in_place else before)
    assert y.dtype == dtype and y.shape == x.shape
    assert_close(y, expected, "kernel")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softmax_finds_the_row_maximum_wherever_it_is(dtype):
    # The row maximum is taken in interleaved lanes plus a tail: an entry 1000 above the rest, at every position of
    # rows of every length up to 33, must get all the probability (missed by the maximum, exp(1000) would be inf).
    for n in range(1, 34):
        x = np.zeros((n, n), dtype)
        x[np.arange(n), np.arange(n)] = 1000.0
        np.testing.assert_array_equal(rows.softmax(x), np.eye(n, dtype=dtype))


def test_layer_norm_centres_float32_rows_far_from_zero_as_float64_does():
    # Rows whose mean is 10^3-10^5 times their spread: the float32 kernel subtracts the mean in two parts (its float32
    # rounding, then the rest), so the centred values carry no rounding of the mean (one float32 mean would shift a
    # row by up to half an ulp of 10^5, 4e-3, against a spread of 1e-2 to 10).
    rng = np.random.default_rng(7)
    offsets = np.array([1e3, -3e4, 1e5])[:, None]
    spreads = np.array([1e-2, 1.0, 10.0])[:, None]
    x = (offsets + spreads * rng.standard_normal((3, 384))).astype(np.float32)
    weight, bias = rng.standard_normal(384).astype(np.float32), rng.standard_normal(384).astype(np.float32)
    assert_close(rows.layer_norm(x, weight, bias, 1e-6), reference.layer_norm(x, weight, bias, 1e-6), "kernel")


@pytest.mark.parametrize("kernel", ["softmax", "gelu", "layer_norm"])
def test_in_place_on_a_strided_view(kernel):
    x = np.random.default_rng(4).standard_normal((3, 5, 4)).transpose(0, 2, 1)  # (3, 4, 5), not C-contiguous
    weight, bias = 1 + np.random.default_rng(5).standard_normal((2, 5))
    expected, y = {
        "softmax": lambda: (reference.softmax(x), rows.softmax(x, out=x)),
        "gelu": lambda: (reference.gelu(x), rows.gelu(x, out=x)),
        "layer_norm": lambda: (reference.layer_norm(x, weight, bias, 1e-6), rows.layer_norm(x, weight, bias, 1e-6,
                                                                                             out=x)),
    }[kernel]()
    assert_close(y, expected, "kernel")
    assert_close(x, expected, "kernel")


# ---- the GEMM --------------------------------------------------------------------------------------------------------


def _linear_case(draw):
    (lead, rows_, k, n), dtype = draw(LINEAR_SHAPES), draw(DTYPES)
    rng = np.random.default_rng(draw(SEEDS))
    x = rng.standard_normal((*lead, rows_, k)).astype(dtype)
    weight = (rng.standard_normal((n, k)) / math.sqrt(k)).astype(dtype)  # outputs O(1), as in a network
    bias = rng.standard_normal(n).astype(dtype) if draw(st.booleans()) else None
    return x, weight, bias, rng


@given(st.data(), st.sampled_from(activations.ACTIVATIONS), st.booleans(), st.booleans())
def test_linear_with_scale_activation_and_residual(data, act, with_scale, with_residual):
    # The GEMM's epilogue: act((x W^T) * scale + bias) + residual (a conv's BatchNorm and SiLU, fc1's bias and GELU, a
    # block's last Linear and its residual add) on every tile, the cut-short last panel and the rows past the last
    # 6-row tile included; the reference's steps one by one as the oracle
    x, weight, bias, rng = _linear_case(data.draw)
    scale = rng.uniform(0.5, 2.0, weight.shape[0]).astype(x.dtype) if with_scale else None
    residual = rng.standard_normal((*x.shape[:-1], weight.shape[0])).astype(x.dtype) if with_residual else None
    y = gemm.linear(x, pack(weight), bias, act, scale, residual)
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], weight.shape[0])
    z = reference.linear(x, weight) * (1 if scale is None else scale) + (0 if bias is None else bias)
    assert_close(y, reference.activation(z, act) + (0 if residual is None else residual), "kernel")


@given(st.data(), st.sampled_from(activations.ACTIVATIONS), st.booleans(), st.integers(1, 30))
def test_blocks_of_the_depth_change_no_bit(data, act, with_residual, k_block):
    # gemm_panels over the depth in blocks (its block_bytes, measured per CPU) keeps each output one chain of fused
    # multiply-adds in k order, the partial sums stored exactly in y between the blocks, and the epilogue (scale,
    # activation, residual, the cut-short panel's residual) after the last block only: the same bits as the whole
    # depth at once, for blocks of any depth, one k included, dividing the depth or not.
    x, weight, bias, rng = _linear_case(data.draw)
    x = x.reshape(-1, x.shape[-1])
    panels, out_features = pack(weight)
    padded_columns = panels.shape[0] * panels.shape[2]
    scale = rng.uniform(0.5, 2.0, out_features).astype(x.dtype)
    scale, shift = gemm.padded_scale_shift(padded_columns, out_features, scale, bias, x.dtype)
    residual = rng.standard_normal((len(x), out_features) if with_residual else (0, 0)).astype(x.dtype)
    code = activations.activation_code(act)
    whole = gemm.linear_rows(x, panels, scale, shift, code, residual, out_features, 0)
    block_bytes = k_block * panels.shape[2] * x.itemsize
    np.testing.assert_array_equal(gemm.linear_rows(x, panels, scale, shift, code, residual, out_features, block_bytes),
                                  whole)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_measured_depth_block_gives_linear_the_same_bits(dtype, monkeypatch):
    # The candidates the CPU's measurement chooses from, set through the environment, on a product deeper than every
    # block and with a residual: one result, whichever this machine's measurement chose.
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 13, 1100)).astype(dtype)
    packed = pack(rng.standard_normal((40, 1100)).astype(dtype))
    residual = rng.standard_normal((2, 13, 40)).astype(dtype)
    results = []
    for block_bytes in gemm.PANEL_BLOCK_CANDIDATES:
        monkeypatch.setenv("VITNP_GEMM_PANEL_BLOCK", str(block_bytes))
        monkeypatch.setattr(gemm.panel_block_bytes, "chosen", {})  # as a process that has not chosen yet
        assert gemm.panel_block_bytes(dtype) == block_bytes
        results.append(gemm.linear(x, packed, residual=residual, act="gelu"))
    for result in results[1:]:
        np.testing.assert_array_equal(result, results[0])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_packed_weights_and_gemm_outputs_start_at_a_cache_line(dtype):
    # Every vector load of a weight inside one cache line (a large NumPy array starts 16 bytes into one); the panels
    # are a plain C-contiguous array the kernels take as any other, equal to the weight's columns.
    for out_features, in_features in ((3072, 768), (768, 3072), (144, 144), (5, 3)):
        weight = np.arange(out_features * in_features, dtype=dtype).reshape(out_features, in_features)
        panels = pack(weight).panels
        assert panels.ctypes.data % vecmath.CACHE_LINE == 0 and panels.flags.c_contiguous
        width, last = panels.shape[2], out_features - 1
        np.testing.assert_array_equal(panels[0, :, 0], weight[0])
        np.testing.assert_array_equal(panels[last // width, :, last % width], weight[last])
    winograd_panels = winograd.pack_winograd_weight(np.ones((20, 24, 3, 3), dtype)).panels
    assert winograd_panels.ctypes.data % vecmath.CACHE_LINE == 0 and winograd_panels.flags.c_contiguous
    for length in (1, 7, 1000):
        assert vecmath.aligned_empty((length, 3), dtype).ctypes.data % vecmath.CACHE_LINE == 0
    # a GEMM's output (whole panels) too: the rows the next op loads as vectors (LayerNorm, attention's q, k, v)
    for rows_ in (1, 197, 1000):
        x = np.ones((rows_, 48), dtype)
        assert gemm.linear(x, pack(np.ones((64, 48), dtype))).ctypes.data % vecmath.CACHE_LINE == 0
        maps = np.ones((1, rows_, 2, 8), dtype)
        y = conv.conv2d(maps, pack(np.ones((64, 8), dtype)), 1)
        assert y.ctypes.data % vecmath.CACHE_LINE == 0


def test_the_gemm_blocks_rows_by_the_l2_cache_linux_describes(tmp_path):
    def cache(index, level, kind, size):
        folder = tmp_path / "cache" / f"index{index}"
        folder.mkdir(parents=True)
        for name, text in (("level", level), ("type", kind), ("size", size)):
            (folder / name).write_text(f"{text}\n")

    cache(0, 1, "Data", "48K")
    cache(1, 1, "Instruction", "32K")
    cache(2, 2, "Unified", "2048K")
    cache(3, 3, "Unified", "480M")
    assert gemm.l2_cache_bytes(str(tmp_path / "cache")) == 2 << 20
    (tmp_path / "cache" / "index2" / "size").write_text("4M\n")
    assert gemm.l2_cache_bytes(str(tmp_path / "cache")) == 4 << 20
    assert gemm.l2_cache_bytes(str(tmp_path / "nothing"), default=12345) == 12345
    (tmp_path / "cache" / "index2" / "size").write_text("unknown\n")
    assert gemm.l2_cache_bytes(str(tmp_path / "cache"), default=12345) == 12345
    assert gemm.L2_ROWS_BYTES == gemm.l2_cache_bytes() // 2


@given(st.data())
def test_linear_is_exact_on_small_integers(data):
    # Products and sums of small integers are exact in floating point whatever the order: the kernel must give
    # exactly the integer matrix product, every row, column and padding case (no oracle but integer arithmetic).
    x, weight, bias, _ = _linear_case(data.draw)
    x, weight = np.round(x * 4).astype(x.dtype), np.round(weight * 4).astype(x.dtype)
    bias = None if bias is None else np.round(bias * 4).astype(x.dtype)
    exact = x.astype(np.int64) @ weight.T.astype(np.int64) + (0 if bias is None else bias.astype(np.int64))
    np.testing.assert_array_equal(gemm.linear(x, pack(weight), bias), exact)


def test_linear_reads_non_contiguous_input():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((7, 40)).astype(np.float32)[:, ::2]  # (7, 20), stride 2
    weight = rng.standard_normal((19, 20)).astype(np.float32)
    assert_close(gemm.linear(x, pack(weight)), x.astype(np.float64) @ weight.T, "kernel")


def test_linear_rejects_what_does_not_fit():
    packed = pack(np.ones((4, 3), np.float32))
    x = np.ones((2, 3), np.float32)
    with pytest.raises(ValueError, match="unknown activation 'relu'"):
        gemm.linear(x, packed, act="relu")
    with pytest.raises(ValueError, match=r"residual must be \(2, 4\) float32"):
        gemm.linear(x, packed, residual=np.ones((2, 3), np.float32))
    with pytest.raises(ValueError, match="residual must be"):
        gemm.linear(x, packed, residual=np.ones((2, 4)))
    with pytest.raises(ValueError, match="dtype float64 differs"):
        gemm.linear(np.ones((2, 3)), packed)
    with pytest.raises(ValueError, match="4 features.*takes 3"):
        gemm.linear(np.ones((2, 4), np.float32), packed)
    with pytest.raises(ValueError, match="float32 or float64 weight"):
        pack(np.ones((4, 3), np.int64))


def test_gelu_tanh_keeps_its_digits_far_out_on_both_sides():
    # gelu_tanh is computed as v / (1 + exp(-2u)), not 0.5 v (1 + tanh(u)): where tanh(u) is near -1 the float32
    # result keeps its relative precision (measured 3.3e-6 at v = -5.3, where 0.5 v (1 + tanh(u)) in float32 is off by
    # 4.7 times the result). Held to the kernel tolerance's rtol against torch's formula in float64 while that keeps
    # its own digits (|v| < 5.3); beyond, on the positive side, within 4e-7 of v.
    v = np.linspace(-9.0, 9.0, 20001)
    exact = 0.5 * v * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (v + 0.044715 * v**3)))
    near = np.abs(v) < 5.3  # past it, 1 + tanh(u) underflows float64's rounding and `exact` loses its digits
    for act in (rows.gelu(v.astype(np.float32), approximate="tanh"),
                gemm.linear(v.astype(np.float32)[:, None], pack(np.ones((1, 1), np.float32)), act="gelu_tanh")[:, 0]):
        relative = np.abs(act.astype(np.float64) - exact) / np.maximum(np.abs(exact), 1e-300)
        assert relative[near].max() < 1e-5
        assert np.all(np.abs(act[~near & (v > 0)] - v[~near & (v > 0)]) <= 4e-7 * v[~near & (v > 0)])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_silu_and_gelu_of_the_gemm_epilogue_at_the_extremes(dtype):
    x = np.array([-1e4, -200.0, -88.0, -20.0, -1e-30, 0.0, 1e-30, 20.0, 88.0, 200.0, 1e4], dtype=dtype)
    identity = pack(np.ones((1, 1), dtype))
    for act in ("silu", "gelu", "gelu_tanh"):
        assert_close(gemm.linear(x[:, None], identity, act=act)[:, 0], reference.activation(x, act), "kernel")


# ---- attention -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_attention_on_every_size_up_to_two_panels(dtype):
    # Every head_dim and every number of keys from 1 to two panels and one more: whole panels, panels cut short,
    # panels whose second vector is all padding (computed on their first vector alone), against the reference.
    rng = np.random.default_rng(0)
    for size in range(1, 2 * gemm.panel_width(dtype) + 2):
        qkv = rng.standard_normal((1, size, 3, 1, size)).astype(dtype)  # N = head_dim = size
        q, k, v = qkv.transpose(2, 0, 3, 1, 4)
        expected = reference.scaled_dot_product_attention(q, k, v, 0.3)
        assert_close(attention(qkv, 0.3), expected.transpose(0, 2, 1, 3), "kernel")


def test_attention_rows_average_the_values():
    # No oracle: with every score equal (q = 0) each output row is the mean of v's rows; with one key scoring far
    # above the rest, it is that key's value row.
    qkv = np.random.default_rng(3).standard_normal((2, 23, 3, 2, 20))
    qkv[:, :, 0] = 0.0
    y = attention(qkv, 0.5)
    np.testing.assert_allclose(y, np.broadcast_to(qkv[:, :, 2].mean(axis=1, keepdims=True), y.shape), rtol=1e-12)
    bias = np.zeros((2, 23, 23))
    bias[:, :, 7] = 1e3
    np.testing.assert_array_equal(attention(qkv, 0.5, bias), np.broadcast_to(qkv[:, 7:8, 2], y.shape))


def test_attention_rejects_shapes_that_do_not_fit():
    qkv = np.zeros((2, 5, 3, 2, 4), np.float32)
    with pytest.raises(ValueError, match=r"\(B, N, 3, heads, head_dim\)"):
        attention(qkv[:, :, :2], 1.0)
    with pytest.raises(ValueError, match=r"bias must be \(2, 5, 5\)"):
        attention(qkv, 1.0, bias=np.zeros((3, 5, 5), np.float32))
    with pytest.raises(ValueError, match=r"mask must be \(nW, 5, 5\) with nW dividing 2"):
        attention(qkv, 1.0, mask=np.zeros((3, 5, 5), np.float32))


# ---- Swin's windows --------------------------------------------------------------------------------------------------


@given(st.integers(1, 3), st.integers(1, 12), st.integers(1, 12), st.integers(1, 9), st.integers(1, 6), SEEDS)
def test_window_kernels_read_non_contiguous_input(B, H, W, C, window, seed):
    x = np.asfortranarray(np.random.default_rng(seed).standard_normal((B, H, W, C)))[:, ::-1]  # negative strides
    np.testing.assert_array_equal(windows.window_partition(x, (window, window), (1, -2)),
                                  reference.window_partition(x, (window, window), (1, -2)))
    np.testing.assert_array_equal(windows.roll(x, (1, -2)), np.roll(x, (1, -2), axis=(1, 2)))


def test_window_kernels_reject_wrong_ranks_with_clear_errors():
    with pytest.raises(ValueError, match=r"\(B, H, W, C\)"):
        windows.window_partition(np.zeros((4, 4, 3), np.float32), (2, 2))
    with pytest.raises(ValueError, match=r"\(B, H, W, C\)"):
        windows.roll(np.zeros((4, 4)), (1, 1))
    with pytest.raises(ValueError, match="windows"):
        windows.window_reverse(np.zeros((4, 5, 3), np.float32), (2, 2), 4, 4)
    with pytest.raises(ValueError, match="whole number"):
        windows.window_reverse(np.zeros((3, 4, 3), np.float32), (2, 2), 4, 4)
    with pytest.raises(ValueError, match="residual must be"):
        windows.window_reverse(np.zeros((4, 4, 3), np.float32), (2, 2), 4, 4, residual=np.zeros((1, 4, 4, 2),
                                                                                                     np.float32))


# ---- convolutions ----------------------------------------------------------------------------------------------------


@given(st.integers(1, 2), st.integers(3, 12), st.integers(3, 12), st.integers(1, 150) | st.sampled_from([16, 48, 128]),
       st.integers(1, 2), st.integers(0, 1), st.sampled_from(["none", "silu"]), DTYPES, SEEDS)
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
    y = conv.depthwise_conv2d(x, weight, stride, padding, scale, shift, act)
    np.testing.assert_array_equal(y, conv.depthwise_conv2d(x, ringed, stride, padding + 1, scale, shift, act))


# Activations in registers: no oracle needed beyond rows.silu's and gelu's loops over memory, which test_fast_ops
# holds to the reference (and a test above to float64 at gelu_tanh's far ends). The edges: exp's clamps and float32
# exp's range (softmax's and SiLU's), erf's clamps (at v = +-4 sqrt(2)), +-inf, nan.
ACTIVATION_EDGES = [np.nan, np.inf, -np.inf, -1e30, -1e4, -104.5, -104.0, -89.0, -88.72, -88.38, -88.37, -87.0, -20.0,
                    -5.66, -5.65, -1e-30, 0.0, 1e-30, 5.65, 5.66, 20.0, 87.0, 88.72, 89.0, 1e4, 1e30]


def _assert_same_bits(a, b):
    np.testing.assert_array_equal(a, b)  # nan where nan
    numbers = ~np.isnan(a)
    np.testing.assert_array_equal(np.signbit(a[numbers]), np.signbit(b[numbers]))  # -0 where -0


@given(st.integers(1, 20), st.integers(1, 80), st.sampled_from([1, 3]), st.integers(1, 3), DTYPES, SEEDS)
def test_activations_in_registers_are_activations_in_memory_bit_for_bit(rows_, channels, kernel, stride, dtype, seed):
    # The GEMM applies SiLU, GELU and gelu_tanh to its output tile in the registers, the depthwise conv to its vectors
    # of channels (activations.vsilu, vgelu, vgelu_tanh); rows.silu / gelu run their loop over memory: the same
    # operations in the same order, so the same bits, over exp's and erf's whole range (clamps, +-inf, nan) and on
    # every tile row and column, every vector and scalar channel remainder.
    rng = np.random.default_rng(seed)
    pool = np.concatenate([ACTIVATION_EDGES, rng.standard_normal(40) * 30])
    signs = rng.choice([-1.0, 1.0], channels)
    weight = (signs * rng.uniform(0.5, 2.0, channels)).astype(dtype)  # no zero: 0 * inf would only give nan
    shift = rng.standard_normal(channels).astype(dtype)
    x = rng.choice(pool, (rows_, 1)).astype(dtype)
    packed = pack(weight[:, None])
    pre_activation = gemm.linear(x, packed, shift)
    _assert_same_bits(gemm.linear(x, packed, shift, act="silu"), rows.silu(pre_activation))
    _assert_same_bits(gemm.linear(x, packed, shift, act="gelu"), rows.gelu(pre_activation))
    _assert_same_bits(gemm.linear(x, packed, shift, act="gelu_tanh"), rows.gelu(pre_activation, approximate="tanh"))
    maps = rng.choice(pool, (1, rows_, 5, channels)).astype(dtype)
    taps = np.repeat(weight[:, None, None, None], kernel, axis=2).repeat(kernel, axis=3)  # (C, 1, k, k)
    conv_output = conv.depthwise_conv2d(maps, taps, stride, kernel // 2, shift=shift)
    gelu_tanh = functools.partial(rows.gelu, approximate="tanh")
    for act, in_memory in (("silu", rows.silu), ("gelu", rows.gelu), ("gelu_tanh", gelu_tanh)):
        in_registers = conv.depthwise_conv2d(maps, taps, stride, kernel // 2, shift=shift, act=act)
        _assert_same_bits(in_registers, in_memory(conv_output))


@given(st.integers(1, 2), st.integers(1, 9), st.integers(1, 9), st.lists(st.integers(1, 40), min_size=1, max_size=3),
       st.integers(1, 5), st.integers(1, 3), st.integers(0, 2), DTYPES, SEEDS)
def test_im2col_equals_the_windows_of_the_concatenated_maps(B, H, W, channels, kernel, stride, padding, dtype, seed):
    # Up to three maps of up to 40 channels (one map: whole window rows copied as one run; several: channel by map),
    # windows hanging over every edge, strides that skip pixels: value for value the reference's padded windows of
    # the concatenation, zeros in the padding included.
    assume(H + 2 * padding >= kernel and W + 2 * padding >= kernel)
    rng = np.random.default_rng(seed)
    maps = tuple(rng.standard_normal((B, H, W, c)).astype(dtype) for c in channels)
    columns = conv.im2col(maps if len(maps) > 1 else maps[0], kernel, stride, padding)
    expected = reference.conv_windows(np.concatenate(maps, axis=-1), kernel, stride, padding)  # (B, Ho, Wo, k, k, C)
    assert columns.dtype == dtype
    np.testing.assert_array_equal(columns, expected.reshape(*expected.shape[:3], -1))


@given(st.integers(1, 2), st.integers(1, 9), st.integers(1, 9), st.lists(st.integers(1, 20), min_size=1, max_size=2),
       st.sampled_from([1, 3, 5]), st.integers(1, 3), st.integers(0, 2), st.integers(1, 70),
       st.sampled_from(["none", "silu"]), st.booleans(), st.integers(1, 4000), DTYPES, SEEDS)
def test_conv2d_is_linear_on_im2col_bit_for_bit(B, H, W, channels, kernel, stride, padding, out, act, with_residual,
                                                 l2_bytes, dtype, seed):
    # conv2d builds the im2col rows a band at a time (the bands sized by the L2 budget, shrunk here down to one
    # output row) and runs the GEMM on each band, all its panels: the same products in the same order as linear on
    # the whole im2col matrix, so the same bits, scale, shift, activation and residual included.
    assume(H + 2 * padding >= kernel and W + 2 * padding >= kernel)
    rng = np.random.default_rng(seed)
    maps = tuple(rng.standard_normal((B, H, W, c)).astype(dtype) for c in channels)
    maps = maps if len(maps) > 1 else maps[0]
    columns = conv.im2col(maps, kernel, stride, padding)
    packed = pack(rng.standard_normal((out, columns.shape[-1])).astype(dtype))
    scale, shift = rng.uniform(0.5, 2, out).astype(dtype), rng.standard_normal(out).astype(dtype)
    residual = rng.standard_normal((*columns.shape[:3], out)).astype(dtype) if with_residual else None
    expected = gemm.linear(columns, packed, shift, act, scale, residual)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(conv, "L2_ROWS_BYTES", l2_bytes)
        y = conv.conv2d(maps, packed, kernel, stride, padding, shift, act, scale, residual)
    assert y.dtype == dtype
    np.testing.assert_array_equal(y, expected)


@pytest.mark.parametrize(("kernel", "stride", "padding"), [(1, 2, 2), (3, 1, 4)])
def test_im2col_rows_of_windows_wholly_in_the_padding(kernel, stride, padding):
    # A padding wider than the kernel puts whole windows in the padding along a row: they are zeros, and their taps'
    # copy must not run backwards from the end of the map (a negative length read as an index from the end did).
    # Run in a guarded buffer: whatever the kernel writes past the rows it was given lands in NaNs it must leave alone.
    x = np.arange(1.0, 2 * 5 * 6 * 4 + 1).reshape(2, 5, 6, 4)
    flat_maps, channels, B, H, W, Ho, Wo = conv.conv_maps(x, kernel, stride, padding, "im2col")
    rows_ = B * Ho * Wo
    guarded = np.full((rows_ + x.size, kernel * kernel * 4), np.nan)  # more room than any copy of x can fill
    conv._im2col_rows(flat_maps, channels, H, W, kernel, stride, padding, Ho, Wo, guarded[:rows_], 0, B * Ho)
    expected = reference.conv_windows(x, kernel, stride, padding)  # (B, Ho, Wo, k, k, C)
    np.testing.assert_array_equal(guarded[:rows_], expected.reshape(rows_, -1))
    assert np.isnan(guarded[rows_:]).all()


def _assert_image_conv2d_is_conv2d(B, C, H, W, kernel, stride, padding, out, dtype, rng):
    images = rng.standard_normal((B, C, H, W)).astype(dtype)
    packed = pack(rng.standard_normal((out, kernel * kernel * C)).astype(dtype))
    scale, shift = rng.uniform(0.5, 2, out).astype(dtype), rng.standard_normal(out).astype(dtype)
    nhwc = np.ascontiguousarray(images.transpose(0, 2, 3, 1))
    for act in activations.ACTIVATIONS:
        y = conv.image_conv2d(images, packed, kernel, stride, padding, shift, act, scale)
        assert y.dtype == dtype and y.flags.c_contiguous
        np.testing.assert_array_equal(y, conv.conv2d(nhwc, packed, kernel, stride, padding, shift, act, scale))


@given(st.integers(1, 2), st.integers(1, 5), st.integers(0, 8), st.integers(0, 30), st.sampled_from([1, 3, 5]),
       st.integers(1, 3), st.integers(0, 2), st.integers(1, 40), DTYPES, SEEDS)
def test_image_conv2d_is_conv2d_on_the_images_made_nhwc_bit_for_bit(B, C, more_rows, more_columns, kernel, stride,
                                                                      padding, out, dtype, seed):
    # image_conv2d reads NCHW images in place, eight output pixels at a time where their windows are inside the image
    # (rows up to 30 pixels wide: some with a run of eight, some with two, some pixel by pixel) and skipping the
    # padding's taps: the same products in the same order as conv2d's GEMM on the NHWC copy, so the same bits, for
    # any number of output channels (vectors cut short) and every activation.
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


def test_convs_reject_what_does_not_fit():
    x = np.zeros((1, 5, 5, 4), np.float32)
    packed = pack(np.zeros((6, 3 * 3 * 4), np.float32))
    for call, message in [
        (lambda: conv.conv2d(x, packed, 5, padding=2), r"the weight \(float32, 36 inputs\) does not fit a 5x5 conv "
                                                       r"over 4"),
        (lambda: conv.conv2d(x.astype(np.float64), packed, 3, padding=1), "does not fit a 3x3 conv over 4 float64"),
        (lambda: conv.conv2d(x, packed, 3, padding=1, residual=np.zeros((1, 5, 5, 5), np.float32)),
         r"residual must be \(1, 5, 5, 6\) float32"),
        (lambda: conv.conv2d(x, packed, 9, padding=1), "conv2d: a 9x9 kernel does not fit a 5x5 map padded by 1"),
        (lambda: conv.im2col((x, np.zeros((1, 5, 6, 4), np.float32)), 3), "NHWC maps .* of one .B, H, W. and dtype"),
        (lambda: conv.im2col((x, x.astype(np.float64)), 3), "of one .B, H, W. and dtype"),
        (lambda: conv.im2col(x[0], 3), "NHWC maps"),
        (lambda: conv.im2col(x.astype(np.float16), 3), "float32 or float64"),
        (lambda: conv.im2col(x, 9, padding=1), "does not fit a 5x5 map padded by 1"),
        (lambda: conv.depthwise_conv2d(x, np.zeros((4, 1, 7, 7), np.float32)), "does not fit a 5x5 map"),
        (lambda: conv.depthwise_conv2d(x, np.zeros((3, 1, 3, 3), np.float32)), "does not fit 4 channels"),
        (lambda: conv.depthwise_conv2d(x, np.zeros((4, 1, 3, 3))), "dtype float32 differs"),
        (lambda: conv.depthwise_conv2d(x[0], np.zeros((4, 1, 3, 3), np.float32)), "NHWC map"),
        (lambda: mobilevit.Conv2d(4, 8, 3, groups=2), "plain .groups=1. or depthwise"),
    ]:
        with pytest.raises(ValueError, match=message):
            call()


def test_image_conv2d_rejects_images_and_weights_that_do_not_fit():
    packed = pack(np.zeros((6, 3 * 3 * 3), np.float32))
    for images, message in [
        (np.zeros((3, 5, 5), np.float32), r"float32 or float64 NCHW images \(B, C, H, W\), got float32 \(3, 5, 5\)"),
        (np.zeros((1, 3, 5, 5), np.int64), "NCHW images .* got int64"),
        (np.zeros((1, 4, 5, 5), np.float32), r"the weight \(float32, 27 inputs\) does not fit a 3x3 conv over 4"),
        (np.zeros((1, 3, 5, 5)), "does not fit a 3x3 conv over 3 float64 channels"),
        (np.zeros((1, 3, 2, 5), np.float32), "image_conv2d: a 3x3 kernel does not fit a 2x5 image padded by 0"),
    ]:
        with pytest.raises(ValueError, match=message):
            conv.image_conv2d(images, packed, 3)


def _winograd_case(rng, B, H, W, maps_channels, out, dtype, integers=False):
    draw = (lambda shape: rng.integers(-3, 4, shape)) if integers else rng.standard_normal
    maps = tuple(draw((B, H, W, c)).astype(dtype) for c in maps_channels)
    C = sum(maps_channels)
    weight = (draw((out, C, 3, 3)) * (1 if integers else (9 * C) ** -0.5)).astype(dtype)
    packed = pack(weight.transpose(0, 2, 3, 1).reshape(out, -1))  # conv2d's (u, v, c) columns
    return maps if len(maps) > 1 else maps[0], weight, packed


WINOGRAD_CHANNELS = st.lists(st.integers(1, 40) | st.sampled_from([16, 32, 48]), min_size=1, max_size=2)


@given(st.integers(1, 2), st.integers(1, 12), st.integers(1, 12), WINOGRAD_CHANNELS, st.integers(1, 40),
       st.sampled_from(activations.ACTIVATIONS), DTYPES, SEEDS)
def test_winograd_conv3x3_is_conv2d_to_a_few_ulp(B, H, W, maps_channels, out, act, dtype, seed):
    # The transforms add and subtract up to nine window values and the weights' halves, rounded once each: the error
    # is a few ulp of the largest terms, as for a GEMM's reordered sums. Measured on these cases up to ~2e-6 (float32)
    # and ~4e-15 (float64) of the output's largest value; the tolerance leaves a 10x and 25x margin.
    rng = np.random.default_rng(seed)
    maps, weight, packed = _winograd_case(rng, B, H, W, maps_channels, out, dtype)
    scale, shift = rng.uniform(0.5, 2, out).astype(dtype), rng.standard_normal(out).astype(dtype)
    expected = conv.conv2d(maps, packed, 3, 1, 1, shift, act, scale)
    y = winograd.winograd_conv3x3(maps, winograd.pack_winograd_weight(weight), shift, act, scale)
    assert y.dtype == dtype and y.shape == expected.shape
    size = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(y, expected, rtol=0, atol=(2e-5 if dtype == np.float32 else 1e-13) * size)


@given(st.integers(1, 2), st.integers(1, 9), st.integers(1, 9), WINOGRAD_CHANNELS, st.integers(1, 20), DTYPES, SEEDS)
def test_winograd_conv3x3_on_small_integers_is_exact(B, H, W, maps_channels, out, dtype, seed):
    # Small integers and their halves and quarters, in sums far below 2^24: every step of both convs is exact, so any
    # wrong coefficient, window offset or edge shows as a difference, not hidden by a tolerance.
    maps, weight, packed = _winograd_case(np.random.default_rng(seed), B, H, W, maps_channels, out, dtype, True)
    np.testing.assert_array_equal(winograd.winograd_conv3x3(maps, winograd.pack_winograd_weight(weight)),
                                  conv.conv2d(maps, packed, 3, 1, 1))


@pytest.mark.parametrize("threads", [1, 2])
def test_winograd_conv3x3_split_between_threads_is_exact_on_small_integers(threads):
    # MobileViT-S's fusion conv at 256x256 (32x32 maps, 96 + 96 channels in, 96 out), shared out between threads
    maps, weight, packed = _winograd_case(np.random.default_rng(0), 1, 32, 32, (96, 96), 96, np.float32, True)
    with num_threads(threads):
        y = winograd.winograd_conv3x3(maps, winograd.pack_winograd_weight(weight), act="none")
    np.testing.assert_array_equal(y, conv.conv2d(maps, packed, 3, 1, 1))


def test_winograd_conv3x3_rejects_what_does_not_fit():
    x = np.zeros((1, 4, 4, 8), np.float32)
    packed = winograd.pack_winograd_weight(np.zeros((4, 8, 3, 3), np.float32))
    with pytest.raises(ValueError, match=r"expected a float32 or float64 3x3 conv weight \(out, C, 3, 3\), got "
                                         r"float32 \(4, 8, 5, 5\)"):
        winograd.pack_winograd_weight(np.zeros((4, 8, 5, 5), np.float32))
    with pytest.raises(ValueError, match=re.escape(f"the packed weight float32 {packed.panels.shape} does not fit 17 "
                                                   "float32 channels")):
        winograd.winograd_conv3x3(np.zeros((1, 4, 4, 17), np.float32), packed)
    with pytest.raises(ValueError, match="the packed weight float32 .* does not fit 8 float64 channels"):
        winograd.winograd_conv3x3(x.astype(np.float64), packed)
    with pytest.raises(ValueError, match="expected NHWC maps"):
        winograd.winograd_conv3x3(x[0], packed)


# ---- the fused blocks ------------------------------------------------------------------------------------------------


def _inverted_residual_case(rng, B, H, W, in_chs, mid, out_chs, kernel, dtype):
    """Random x, the depthwise weight, the packed 1x1 weights and the three convs' (scale, shift)."""
    x = rng.standard_normal((B, H, W, in_chs)).astype(dtype)
    expand_weight = (rng.standard_normal((mid, in_chs)) * in_chs**-0.5).astype(dtype)
    depthwise_weight = (rng.standard_normal((mid, 1, kernel, kernel)) / kernel).astype(dtype)
    project_weight = (rng.standard_normal((out_chs, mid)) * mid**-0.5).astype(dtype)
    scale_shifts = [
        (rng.uniform(0.5, 2, n).astype(dtype), rng.standard_normal(n).astype(dtype)) for n in (mid, mid, out_chs)
    ]
    return x, depthwise_weight, (pack(expand_weight), pack(project_weight)), scale_shifts


def _inverted_residual_one_by_one(x, depthwise_weight, packed, scale_shifts, act, stride, padding, shortcut):
    """The MV2 block as its three convs one after the other: linear, depthwise_conv2d, linear with the residual."""
    (expand, project), ((s1, t1), (s2, t2), (s3, t3)) = packed, scale_shifts
    h = gemm.linear(x, expand, t1, act, s1)
    h = conv.depthwise_conv2d(h, depthwise_weight, stride, padding, s2, t2, "silu")
    return gemm.linear(h, project, t3, "none", s3, residual=x if shortcut else None)


def _inverted_residual_fused(x, depthwise_weight, packed, scale_shifts, act, stride, padding, shortcut, tile_rows):
    (expand, project), ((s1, t1), (s2, t2), (s3, t3)) = packed, scale_shifts
    return fused.inverted_residual(x, (expand, s1, t1, act), (depthwise_weight, s2, t2, "silu"),
                                   (project, s3, t3, "none"), stride, padding, shortcut, tile_rows)


@given(st.integers(1, 3), st.integers(1, 14), st.integers(1, 14), st.integers(1, 24),
       st.integers(1, 70) | st.sampled_from([16, 32, 64]), st.integers(1, 40),
       st.sampled_from([(1, 3), (2, 3), (1, 5), (2, 5)]), st.sampled_from([None, 1, 2, 3]),
       st.sampled_from(activations.ACTIVATIONS), st.booleans(), DTYPES, SEEDS)
def test_inverted_residual_is_the_three_convs_one_by_one_bit_for_bit(B, H, W, in_chs, mid, out_chs, stride_kernel,
                                                                     tile_rows, act, shortcut, dtype, seed):
    # Tiles of 1-3 output rows make the band keep rows from the tile before (at stride 1 and 2, for 3x3 and 5x5
    # windows, at the map's top and bottom edges); mid and out_chs off the GEMM's panel width take the padding paths.
    stride, kernel = stride_kernel
    padding = (stride - 1 + kernel - 1) // 2  # timm's symmetric padding
    shortcut = shortcut and stride == 1
    out_chs = in_chs if shortcut else out_chs
    case = _inverted_residual_case(np.random.default_rng(seed), B, H, W, in_chs, mid, out_chs, kernel, dtype)
    y = _inverted_residual_fused(*case, act, stride, padding, shortcut, tile_rows)
    assert y.dtype == dtype
    np.testing.assert_array_equal(y, _inverted_residual_one_by_one(*case, act, stride, padding, shortcut))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(("B", "stride", "tile_rows"), [(1, 1, None), (1, 2, 3), (3, 1, 2)])
def test_inverted_residual_split_between_threads_is_the_three_convs_bit_for_bit(threads, B, stride, tile_rows):
    # Work enough to be shared out: each thread's run of output rows expands the rows it shares with the run before
    # again, from the input.
    case = _inverted_residual_case(np.random.default_rng(stride), B, 33, 40, 32, 128, 32, 3, np.float32)
    with num_threads(threads):
        y = _inverted_residual_fused(*case, "silu", stride, 1, stride == 1, tile_rows)
    np.testing.assert_array_equal(y, _inverted_residual_one_by_one(*case, "silu", stride, 1, stride == 1))


def test_inverted_residual_rejects_what_does_not_fit():
    x, depthwise_weight, (expand, project), ((s1, t1), (s2, t2), (s3, t3)) = _inverted_residual_case(
        np.random.default_rng(0), 1, 6, 5, 8, 32, 16, 3, np.float32
    )

    def call(x=x, expand=expand, depthwise_weight=depthwise_weight, project=project, shortcut=False, tile_rows=None):
        parts = (expand, s1, t1, "silu"), (depthwise_weight, s2, t2, "silu"), (project, s3, t3, "none")
        return fused.inverted_residual(x, *parts, 1, 1, shortcut, tile_rows)

    for arguments, message in [
        (dict(x=x[0]), r"expected an NHWC map \(B, H, W, C\), got shape \(6, 5, 8\)"),
        (dict(x=x.astype(np.float64)), "input dtype float64 differs from the expand weight's float32"),
        (dict(x=np.ascontiguousarray(x[..., :7])), "the expand weight takes 8 channels, not 7"),
        (dict(project=pack(np.zeros((16, 24), np.float32))), "the project weight takes 24 channels, not 32"),
        (dict(depthwise_weight=depthwise_weight[..., :2]),
         r"depthwise weight float32 \(32, 1, 3, 2\) does not fit 32 float32 channels"),
        (dict(depthwise_weight=depthwise_weight[:16]), r"depthwise weight float32 \(16, 1, 3, 3\) does not fit 32"),
        (dict(shortcut=True), "a shortcut needs stride 1 and out_chs = in_chs, got 1, 16"),
        (dict(tile_rows=0), "tile_rows must be at least 1, got 0"),
        (dict(x=np.ascontiguousarray(x[:, :1, :1]), depthwise_weight=np.zeros((32, 1, 5, 5), np.float32)),
         "a 5x5 kernel does not fit a 1x1 map padded by 1"),
    ]:
        with pytest.raises(ValueError, match=message):
            call(**arguments)


@given(st.integers(1, 6), st.integers(1, 70), st.integers(1, 4), st.integers(1, 40), st.sampled_from([1.0, 2.0, 2.5]),
       st.booleans(), st.sampled_from(activations.ACTIVATIONS), st.sampled_from([1, 2]), DTYPES, SEEDS)
def test_transformer_block_is_the_blocks_fast_ops_one_by_one_bit_for_bit(S, N, heads, head_dim, mlp_ratio, qkv_bias,
                                                                         act, threads, dtype, seed):
    # The fused kernel runs the block's kernels on the rows of a chunk of sequences, the chunks shared out between
    # threads (when the work is big enough: S >= 2 with ~2^23 multiply-adds): the values of the Block layer's fast ops
    # one by one (LayerNorm, the qkv GEMM, attention, the proj GEMM and its residual, ...), bit for bit.
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((S, N, heads * head_dim)).astype(dtype)
    block = layers.Block(heads * head_dim, heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, eps=1e-5, act=act)
    block = random_parameters(block, rng, dtype).set_backend("fast")
    with num_threads(threads):
        y = fast_ops.transformer_blocks(x, [block])
    assert y.dtype == dtype
    np.testing.assert_array_equal(y, block(x))
    np.testing.assert_array_equal(y, fused.transformer_block(x, **fast_ops.transformer_block_parts(block)))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("S", "N", "heads", "head_dim"), [(4, 256, 4, 36), (5, 64, 4, 48), (4, 16, 4, 60)])
def test_transformer_block_shared_between_threads_is_the_block_bit_for_bit(S, N, heads, head_dim, dtype):
    # MobileViT-S's three transformers at batch 1 (and an odd number of sequences), big enough to be shared out
    rng = np.random.default_rng(N)
    x = rng.standard_normal((S, N, heads * head_dim)).astype(dtype)
    block = layers.Block(heads * head_dim, heads, mlp_ratio=2.0, eps=1e-5, act="silu")
    block = random_parameters(block, rng, dtype).set_backend("fast")
    with num_threads(2):
        y = fused.transformer_block(x, **fast_ops.transformer_block_parts(block))
    np.testing.assert_array_equal(y, block(x))


def test_transformer_block_rejects_what_does_not_fit():
    rng = np.random.default_rng(0)
    parts = fast_ops.transformer_block_parts(random_parameters(layers.Block(8, 2, mlp_ratio=2.0), rng, np.float32))
    for x, changes, message in [
        (np.zeros((3, 8), np.float32), {}, r"expected sequences \(S, N, dim\), got shape \(3, 8\)"),
        (np.zeros((1, 3, 6), np.float32), {}, r"norm1 weight \(8,\) and bias \(8,\) do not fit dim 6"),
        (np.zeros((1, 3, 6), np.float32), dict(norm1=(np.ones(6, np.float32), np.zeros(6, np.float32), 1e-6),
                                               norm2=(np.ones(6, np.float32), np.zeros(6, np.float32), 1e-6)),
         r"qkv weight float32 \(24, 8\) does not fit float32 sequences of dim 6"),
        (np.zeros((1, 3, 8)), {}, r"qkv weight float32 \(24, 8\) does not fit float64 sequences of dim 8"),
        (np.zeros((1, 3, 8), np.float32), dict(norm1=(parts["norm1"][0][:7], parts["norm1"][1][:7], 1e-6)),
         r"norm1 weight \(7,\) and bias \(7,\) do not fit dim 8"),
        (np.zeros((1, 3, 8), np.float32), dict(num_heads=3), "dim 8 is not divisible by num_heads 3"),
    ]:
        with pytest.raises(ValueError, match=message):
            fused.transformer_block(x, **{**parts, **changes})
