"""The engine's attention on Swin's windows: 49 keys, the relative position bias and the shifted-window mask added to
the scores, a softmax row of a few vectors (vitnp.fast.attention), against the reference backend.

- Swin's own shapes (7x7 windows, head_dim 32, the masks of timm's shifted windows) in float32 and float64, and every
  number of keys around the vectors' and panels' edges with a bias and a mask (their last keys added one by one).
- The softmax's exp: within 2 ulp of exp over [-80, 0], 0 below -80 (no subnormal number reaches the product with v),
  NaN kept; scores far apart (a key masked off, a row dominated by one key) and NaN inputs, as the reference gives them.
- The kernel's paths: the last keys as tail keys or a padded vector, head_dims that are not a whole number of vectors,
  NaN in a tail key; its vector primitives (a square block transposed in registers, a masked load) against NumPy.

Tolerance: 'kernel' (tests/tolerances.py), as test_fast_ops.py compares attention.
"""

import math

import numba
import numpy as np
import pytest
from tolerances import assert_close

from vitnp import swin
from vitnp.fast import gemm, vecmath
from vitnp.fast.activations import EXP_FLOOR, vexp_floored
from vitnp.fast.attention import attention
from vitnp.fast.vecmath import vload_first, vtranspose
from vitnp.reference import ops as reference


def _expected(qkv, scale, bias=None, mask=None):
    """The reference's attention of a (B, N, 3, heads, head_dim) qkv, as (B, N, heads, head_dim) like the kernel's."""
    q, k, v = qkv.transpose(2, 0, 3, 1, 4)  # each (B, heads, N, head_dim)
    return reference.scaled_dot_product_attention(q, k, v, scale, bias, mask).transpose(0, 2, 1, 3)


def _swin_inputs(side, heads, dtype, seed):
    """qkv of a (side x side) map's 7x7 windows (head_dim 32), a relative position bias gathered from a random table
    as WindowAttention gathers it, and timm's shifted-window mask of that map (shift 3)."""
    rng = np.random.default_rng(seed)
    windows = (side // 7) ** 2
    qkv = rng.standard_normal((windows, 49, 3, heads, 32)).astype(dtype)
    table = rng.standard_normal((13 * 13, heads)).astype(dtype)
    bias = table[swin.relative_position_index((7, 7))].transpose(2, 0, 1)  # (heads, 49, 49)
    mask = swin.shifted_window_mask((side, side), (7, 7), (3, 3)).astype(dtype)  # (windows, 49, 49)
    return qkv, bias, mask


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("side, heads", [(28, 3), (14, 12), (7, 24)])
def test_swin_windows_with_bias_and_shifted_mask(side, heads, dtype):
    qkv, bias, mask = _swin_inputs(side, heads, dtype, seed=side)
    scale = 32**-0.5
    for b, m in ((None, None), (bias, None), (bias, mask)):
        y = attention(qkv, scale, b, m)
        assert y.dtype == dtype
        assert_close(y, _expected(qkv, scale, b, m), "kernel")
    two_images = np.concatenate([qkv, qkv[::-1]])  # window w of each image takes mask[w]
    assert_close(attention(two_images, scale, bias, mask), _expected(two_images, scale, bias, mask), "kernel")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_number_of_keys_around_the_vector_edges_with_bias_and_mask(dtype):
    # The bias and the mask are added a whole vector at a time, the last N % lanes keys one by one, and the keys past
    # N up to a whole panel are padding: N from 1 to two panels and one more, a bias and a 0 / -100 mask each.
    rng = np.random.default_rng(1)
    for n in range(1, 2 * gemm.panel_width(dtype) + 2):
        qkv = rng.standard_normal((2, n, 3, 2, 8)).astype(dtype)
        bias = rng.standard_normal((2, n, n)).astype(dtype)
        mask = np.where(rng.random((2, n, n)) < 0.3, -100.0, 0.0).astype(dtype)
        assert_close(attention(qkv, 0.4, bias, mask), _expected(qkv, 0.4, bias, mask), "kernel")


@numba.njit
def _vexp_each(x):
    # vexp_floored over x (a whole number of vectors), a vector at a time
    out = np.empty_like(x)
    lanes = vecmath.vector_lanes(x)
    for c in range(0, x.size, lanes):
        vecmath.vstore(out, c, vexp_floored(vecmath.vload(x, c)))
    return out


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softmax_exp_is_exp_above_the_floor_and_zero_below(dtype):
    lanes = vecmath.VECTOR_BYTES // np.dtype(dtype).itemsize
    x = np.concatenate([np.linspace(-120, 0, 240_000), [0.0, -0.0, EXP_FLOOR, -87.33, -103.97, -np.inf]])
    x = np.concatenate([x, np.zeros(-len(x) % lanes)]).astype(dtype)
    y = _vexp_each(x)
    assert y.dtype == dtype
    kept = x >= EXP_FLOOR
    exact = np.exp(x[kept].astype(np.float64))
    if dtype == np.float32:
        ulp = np.abs(y[kept] - exact) / np.spacing(exact.astype(np.float32)).astype(np.float64)
        assert ulp.max() <= 2.0
    else:
        np.testing.assert_allclose(y[kept], exact, rtol=1e-15, atol=0)
    assert np.all(y[~kept] == 0.0)
    assert y[kept].min() >= np.finfo(dtype).tiny  # no subnormal number: exp(-80) is a normal one
    nan = np.full(lanes, np.nan, dtype)
    assert np.isnan(_vexp_each(nan)).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_scores_far_apart_and_nan_inputs(dtype):
    rng = np.random.default_rng(2)
    qkv = rng.standard_normal((1, 49, 3, 2, 32)).astype(dtype)
    v = qkv[0, :, 2]  # (49, heads, head_dim)
    # Every key but one masked off (-100): each query's output is that key's value row.
    mask = np.full((1, 49, 49), -100.0, dtype)
    mask[:, :, 5] = 0.0
    y = attention(qkv, 32**-0.5, None, mask)
    assert_close(y, _expected(qkv, 32**-0.5, None, mask), "kernel")
    assert_close(y[0], np.broadcast_to(v[5], y[0].shape), "kernel")
    # Scores hundreds apart: most of each row's exps are below the floor, the rest as the reference's.
    assert_close(attention(qkv, 30.0), _expected(qkv, 30.0), "kernel")
    # A NaN in one query gives that query's rows NaN; a NaN in one key, every row of its head.
    broken = qkv.copy()
    broken[0, 3, 0, 0, 7] = np.nan
    y = attention(broken, 0.2)
    assert np.isnan(y[0, 3, 0]).all() and not np.isnan(np.delete(y[0, :, 0], 3, axis=0)).any()
    assert not np.isnan(y[0, :, 1]).any()
    broken = qkv.copy()
    broken[0, 11, 1, 1, 0] = np.nan
    y = attention(broken, 0.2)
    assert np.isnan(y[0, :, 1]).all() and not np.isnan(y[0, :, 0]).any()
    assert math.isnan(_expected(broken, 0.2)[0, 0, 1, 0])


# ---- the kernel's own paths: tail keys, head_dim not a whole number of vectors, the transpose, the masked load -------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_tail_keys_and_head_dims_around_the_vector_edges(dtype):
    # N % lanes up to a quarter of a vector are tail keys (scores off q^T's columns, exps a vector of rows), more are a
    # padded vector; head_dim not a whole number of vectors goes through padded copies of v and the output rows. Each
    # with a bias and a 0 / -100 mask, several windows and heads (the last head's v ends the array).
    lanes = vecmath.VECTOR_BYTES // np.dtype(dtype).itemsize
    rng = np.random.default_rng(3)
    for n in sorted({lanes + 1, lanes + lanes // 4, lanes + lanes // 4 + 1, 3 * lanes + 1, 49}):
        for head_dim in (lanes, lanes + 4, 2 * lanes + 3, 8):
            qkv = rng.standard_normal((4, n, 3, 3, head_dim)).astype(dtype)
            bias = rng.standard_normal((3, n, n)).astype(dtype)
            mask = np.where(rng.random((2, n, n)) < 0.3, -100.0, 0.0).astype(dtype)
            y = attention(qkv, head_dim**-0.5, bias, mask)
            assert y.dtype == dtype
            assert_close(y, _expected(qkv, head_dim**-0.5, bias, mask), "kernel")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nan_in_a_tail_key_or_its_query(dtype):
    # Swin's key 48 is a tail key: a NaN in its k makes every row of its head NaN, a NaN in query 48 its own row only
    rng = np.random.default_rng(4)
    qkv = rng.standard_normal((2, 49, 3, 2, 32)).astype(dtype)
    broken = qkv.copy()
    broken[1, 48, 1, 0, 3] = np.nan
    y = attention(broken, 0.2)
    assert np.isnan(y[1, :, 0]).all() and not np.isnan(y[1, :, 1]).any() and not np.isnan(y[0]).any()
    broken = qkv.copy()
    broken[0, 48, 0, 1, 30] = np.nan
    y = attention(broken, 0.2)
    assert np.isnan(y[0, 48, 1]).all() and not np.isnan(np.delete(y[0, :, 1], 48, axis=0)).any()


@numba.njit
def _transpose_blocks(source, stride, rows, factor, destination, columns):
    # every lanes x lanes block of source's rows (a flat array, rows of ``stride``), the rows past ``rows`` repeating
    # the last, transposed into destination (flat, rows of ``columns``)
    lanes = vecmath.vector_lanes(source)
    for r in range(0, rows, lanes):
        for c in range(0, stride, lanes):
            vtranspose(source, r * stride + c, stride, rows - r, factor, destination, c * columns + r, columns)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_vtranspose_against_numpy(dtype):
    lanes = vecmath.VECTOR_BYTES // np.dtype(dtype).itemsize
    rng = np.random.default_rng(5)
    for rows in (1, lanes - 1, lanes, 2 * lanes + 3):
        padded = -(-rows // lanes) * lanes
        source = rng.standard_normal((rows, 2 * lanes)).astype(dtype)
        destination = np.full((2 * lanes, padded), np.nan, dtype)
        _transpose_blocks(source.reshape(-1), 2 * lanes, rows, dtype(0.5), destination.reshape(-1), padded)
        expected = np.concatenate([source, np.repeat(source[-1:], padded - rows, axis=0)]) * dtype(0.5)
        np.testing.assert_array_equal(destination, expected.T)


@numba.njit
def _first_lanes(array, index, count):
    out = np.empty(vecmath.vector_lanes(array), array.dtype)
    vecmath.vstore(out, 0, vload_first(array, index, count))
    return out


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_vload_first_reads_count_lanes_and_zeros(dtype):
    lanes = vecmath.VECTOR_BYTES // np.dtype(dtype).itemsize
    values = np.arange(1, 3 * lanes + 1, dtype=dtype)
    for count in range(lanes):
        for index in (0, 5, values.size - count):  # the last: the lanes past count would be past the array's end
            expected = np.zeros(lanes, dtype)
            expected[:count] = values[index : index + count]
            np.testing.assert_array_equal(_first_lanes(values, index, count), expected)
