"""MobileViT's convolutional ops against torch.nn.functional: Conv2d (im2col + GEMM), the 1x1 GEMM, depthwise conv
(Numba kernel and NumPy twin), BatchNorm in eval mode and its folding into the conv, SiLU, bilinear resize.

Hypothesis picks kernel size, stride, padding, groups, map size, dtype and seed; values come from a seeded NumPy
generator.
"""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from tolerances import assert_close

from vitnp import kernels, ops

torch = pytest.importorskip("torch")
F = torch.nn.functional

DTYPES = st.sampled_from([np.float32, np.float64])


def _t(a):
    return torch.from_numpy(np.ascontiguousarray(a))


@st.composite
def conv_cases(draw, depthwise=False):
    """(x, weight, bias, stride, padding, groups) for a map the kernel fits (at least one output pixel)."""
    kernel = draw(st.integers(1, 5))
    stride = draw(st.integers(1, 3))
    padding = draw(st.integers(0, 2))
    if depthwise:
        groups = channels = draw(st.integers(1, 8))
        out_channels = channels
    else:
        groups = draw(st.integers(1, 3))
        channels = groups * draw(st.integers(1, 3))
        out_channels = groups * draw(st.integers(1, 3))
    smallest = max(1, kernel - 2 * padding)
    H, W = draw(st.integers(smallest, 13)), draw(st.integers(smallest, 13))
    B = draw(st.integers(1, 2))
    dtype = draw(DTYPES)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = rng.uniform(-1, 1, (B, channels, H, W)).astype(dtype)
    weight = rng.uniform(-1, 1, (out_channels, channels // groups, kernel, kernel)).astype(dtype)
    bias = rng.uniform(-1, 1, out_channels).astype(dtype) if draw(st.booleans()) else None
    return x, weight, bias, stride, padding, groups


def _torch_conv(x, weight, bias, stride, padding, groups):
    bias = None if bias is None else _t(bias)
    return F.conv2d(_t(x), _t(weight), bias, stride=stride, padding=padding, groups=groups).numpy()


@given(conv_cases())
def test_conv2d_matches_torch(case):
    x, weight, bias, stride, padding, groups = case
    y = ops.conv2d(x, weight, bias, stride, padding, groups)
    assert y.dtype == x.dtype
    assert_close(y, _torch_conv(*case), "kernel")


@given(conv_cases(depthwise=True))
def test_depthwise_kernel_and_twin_match_torch(case):
    x, weight, bias, stride, padding, groups = case
    expected = _torch_conv(x, weight, None, stride, padding, groups)
    y = kernels.depthwise_conv2d(x, weight, stride, padding)
    assert y.dtype == x.dtype
    assert_close(y, expected, "kernel")
    assert_close(ops.depthwise_conv2d(x, weight, None, stride, padding), expected, "kernel")
    if bias is not None:
        expected_bias = _torch_conv(x, weight, bias, stride, padding, groups)
        assert_close(ops.depthwise_conv2d(x, weight, bias, stride, padding), expected_bias, "kernel")


@given(st.integers(1, 2), st.integers(1, 16), st.integers(1, 16), st.integers(1, 9), st.integers(1, 9), DTYPES,
       st.integers(0, 2**32 - 1))
def test_conv1x1_matches_torch(B, C, O, H, W, dtype, seed):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, (B, C, H, W)).astype(dtype)
    weight = rng.uniform(-1, 1, (O, C, 1, 1)).astype(dtype)
    bias = rng.uniform(-1, 1, O).astype(dtype)
    assert_close(ops.conv1x1(x, weight, bias), _torch_conv(x, weight, bias, 1, 0, 1), "kernel")


def test_conv_rejects_what_does_not_fit():
    x = np.zeros((1, 4, 5, 5), np.float32)
    with pytest.raises(ValueError, match="groups"):
        ops.conv2d(x, np.zeros((6, 3, 3, 3), np.float32), groups=2)
    with pytest.raises(ValueError, match="does not fit a 5x5 map"):
        ops.conv2d(x, np.zeros((2, 4, 7, 7), np.float32))
    with pytest.raises(ValueError, match="does not fit a 5x5 map"):
        kernels.depthwise_conv2d(x, np.zeros((4, 1, 7, 7), np.float32))
    with pytest.raises(ValueError, match="does not fit 4 channels"):
        kernels.depthwise_conv2d(x, np.zeros((3, 1, 3, 3), np.float32))


def _batch_norm_params(rng, channels, dtype):
    weight = rng.normal(1.0, 0.3, channels).astype(dtype)
    bias = rng.normal(0.0, 0.3, channels).astype(dtype)
    mean = rng.normal(0.0, 0.5, channels).astype(dtype)
    var = rng.uniform(0.2, 3.0, channels).astype(dtype)
    return weight, bias, mean, var


@given(st.integers(1, 3), st.integers(1, 12), st.integers(1, 9), st.integers(1, 9), DTYPES, st.integers(0, 2**32 - 1))
def test_batch_norm_and_channel_affine_match_torch(B, C, H, W, dtype, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 2, (B, C, H, W)).astype(dtype)
    weight, bias, mean, var = _batch_norm_params(rng, C, dtype)
    expected = F.batch_norm(_t(x), _t(mean), _t(var), _t(weight), _t(bias), training=False, eps=1e-5)
    assert_close(ops.batch_norm(x, weight, bias, mean, var, 1e-5), expected.numpy(), "kernel")
    scale, shift = ops.batch_norm_scale_shift(weight, bias, mean, var, 1e-5)
    y = kernels.channel_affine(x, scale, shift)
    assert y.dtype == x.dtype
    assert_close(y, expected.numpy(), "kernel")
    assert_close(kernels.channel_affine(x, scale, shift, act="silu"), F.silu(expected).numpy(), "kernel")


@given(conv_cases(), st.integers(0, 2**32 - 1))
def test_fold_batch_norm_equals_conv_then_batch_norm(case, seed):
    x, weight, _, stride, padding, groups = case
    rng = np.random.default_rng(seed)
    bn_weight, bn_bias, mean, var = _batch_norm_params(rng, weight.shape[0], x.dtype)
    conv = F.conv2d(_t(x), _t(weight), None, stride=stride, padding=padding, groups=groups)
    expected = F.batch_norm(conv, _t(mean), _t(var), _t(bn_weight), _t(bn_bias), training=False, eps=1e-5).numpy()
    folded_weight, folded_bias = ops.fold_batch_norm(weight, bn_weight, bn_bias, mean, var, 1e-5)
    assert folded_weight.dtype == folded_bias.dtype == x.dtype
    # the folded conv differs from conv-then-BN by rounding only: the kernel tolerance of the dtype
    assert_close(ops.conv2d(x, folded_weight, folded_bias, stride, padding, groups), expected, "kernel")


def test_fold_batch_norm_is_exact_in_float64():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 8, 9, 9))
    weight = rng.normal(size=(6, 8, 3, 3))
    bn = _batch_norm_params(rng, 6, np.float64)
    unfolded = ops.batch_norm(ops.conv2d(x, weight, padding=1), *bn, 1e-5)
    folded = ops.conv2d(x, *ops.fold_batch_norm(weight, *bn, 1e-5), padding=1)
    np.testing.assert_allclose(folded, unfolded, rtol=1e-13, atol=1e-13)


@given(st.lists(st.integers(1, 5), min_size=1, max_size=3), st.integers(1, 200), DTYPES, st.integers(0, 2**32 - 1))
def test_silu_matches_torch(lead, channels, dtype, seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((*lead, channels)) * 5).astype(dtype)
    bias = rng.standard_normal(channels).astype(dtype)
    expected = F.silu(_t(x) + _t(bias)).numpy()
    y = kernels.silu(x, bias)
    assert y.dtype == x.dtype
    assert_close(y, expected, "kernel")
    assert_close(ops.silu(x + bias), expected, "kernel")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_silu_extremes(dtype):
    x = np.array([-1e4, -200.0, -88.0, -20.0, -1e-30, 0.0, 1e-30, 20.0, 88.0, 200.0, 1e4], dtype=dtype)
    expected = F.silu(_t(x)).numpy()
    assert_close(kernels.silu(x), expected, "kernel")
    assert_close(ops.silu(x), expected, "kernel")
    assert_close(kernels.channel_affine(x.reshape(1, 1, -1), np.ones(1, dtype), np.zeros(1, dtype), "silu")[0, 0],
                 expected, "kernel")


@given(st.integers(1, 12), st.integers(1, 12), st.integers(1, 12), st.integers(1, 12), DTYPES,
       st.integers(0, 2**32 - 1))
def test_resize_bilinear_matches_torch(H, W, new_h, new_w, dtype, seed):
    x = np.random.default_rng(seed).standard_normal((2, 3, H, W)).astype(dtype)
    expected = F.interpolate(_t(x), size=(new_h, new_w), mode="bilinear", align_corners=False).numpy()
    y = ops.resize_bilinear(x, (new_h, new_w))
    assert y.dtype == x.dtype
    assert_close(y, expected, "kernel")


@given(st.integers(1, 40), st.integers(1, 40))
def test_bilinear_matrix_rows_are_convex_weights(n_in, n_out):
    matrix = ops.bilinear_matrix(n_in, n_out)
    assert matrix.shape == (n_out, n_in)
    assert (matrix >= 0).all()
    np.testing.assert_allclose(matrix.sum(axis=1), 1.0, rtol=0, atol=1e-15)
    if n_in == n_out:
        np.testing.assert_array_equal(matrix, np.eye(n_in))
