"""The engine's attention on Swin's windows: 49 keys, the relative position bias and the shifted-window mask added to
the scores, a softmax row of a few vectors (vitnp.fast.attention), against the reference backend.

- Swin's own shapes (7x7 windows, head_dim 32, the masks of timm's shifted windows) in float32 and float64, and every
  number of keys around the vectors' and panels' edges with a bias and a mask (their last keys added one by one).
- The softmax's exp: within 2 ulp of exp over [-80, 0], 0 below -80 (no subnormal number reaches the product with v),
  NaN kept; scores far apart (a key masked off, a row dominated by one key) and NaN inputs, as the reference gives them.

Tolerance: 'kernel' (tests/tolerances.py), as test_fast_ops.py compares attention.
"""

import math

import numba
import numpy as np
import pytest
from tolerances import assert_close

from vitnp import swin
from vitnp.fast import gemm, vecmath
from vitnp.fast.attention import attention
from vitnp.fast.vecmath import EXP_FLOOR, vexp_floored
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
