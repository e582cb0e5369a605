"""MobileViT's convolutional ops against torch.nn.functional: conv2d on NHWC maps (im2col + GEMM, NumPy twin and the
model's Conv2d with its BatchNorm and activation applied by the GEMM), depthwise conv (Numba kernel and NumPy twin),
BatchNorm in eval mode and its folding into the conv, SiLU, bilinear resize.

Hypothesis picks kernel size, stride, padding, map size, dtype and seed; values come from a seeded NumPy generator.
torch works on NCHW maps, vitnp's convs on NHWC ones: inputs are drawn NCHW and moved to NHWC for vitnp.
"""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from tolerances import assert_close

from vitnp import kernels, ops
from vitnp.mobilevit import Conv2d

torch = pytest.importorskip("torch")
F = torch.nn.functional

DTYPES = st.sampled_from([np.float32, np.float64])
ACTIVATIONS = {"none": lambda v: v, "silu": F.silu}


def _t(a):
    return torch.from_numpy(np.array(a))  # a copy: the model marks the weights it has packed read-only


def _nhwc(x):
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


@st.composite
def conv_cases(draw, depthwise=False):
    """(x NCHW, weight, bias, stride, padding) for a map the kernel fits (at least one output pixel)."""
    kernel = draw(st.integers(1, 5))
    stride = draw(st.integers(1, 3))
    padding = draw(st.integers(0, 2))
    # up to 80 channels for the depthwise kernel, which sums 4 vectors of channels at a time (64 float32 lanes with
    # AVX-512), then single vectors, then the rest one by one: every path on every machine
    channels = draw(st.integers(1, 80 if depthwise else 20))
    out_channels = channels if depthwise else draw(st.integers(1, 40))
    smallest = max(1, kernel - 2 * padding)
    H, W = draw(st.integers(smallest, 13)), draw(st.integers(smallest, 13))
    B = draw(st.integers(1, 2))
    dtype = draw(DTYPES)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = rng.uniform(-1, 1, (B, channels, H, W)).astype(dtype)
    fan_in = (1 if depthwise else channels) * kernel * kernel
    weight = rng.uniform(-1, 1, (out_channels, fan_in // kernel**2, kernel, kernel)) / np.sqrt(fan_in)
    weight = weight.astype(dtype)  # outputs O(1), as in a network (the tolerances are for values O(1))
    bias = rng.uniform(-1, 1, out_channels).astype(dtype) if draw(st.booleans()) else None
    return x, weight, bias, stride, padding


def _torch_conv(x, weight, bias, stride, padding):
    """torch's conv of the NCHW x, as an NHWC array."""
    groups = x.shape[1] if weight.shape[1] == 1 and weight.shape[0] == x.shape[1] else 1
    bias = None if bias is None else _t(bias)
    return _nhwc(F.conv2d(_t(x), _t(weight), bias, stride=stride, padding=padding, groups=groups).numpy())


@given(conv_cases())
def test_conv2d_twin_matches_torch(case):
    x, weight, bias, stride, padding = case
    y = ops.conv2d(_nhwc(x), weight, bias, stride, padding)
    assert y.dtype == x.dtype
    assert_close(y, _torch_conv(*case), "kernel")


@given(st.sampled_from([(1, 1), (3, 1), (3, 2), (5, 2)]), st.booleans(), st.integers(1, 20), st.integers(1, 40),
       st.integers(1, 11), st.integers(1, 11), st.sampled_from(list(ACTIVATIONS)), DTYPES, st.integers(0, 2**32 - 1))
def test_model_conv_with_scale_shift_and_activation_matches_torch(kernel_stride, depthwise, C, O, H, W, act, dtype,
                                                                  seed):
    # MobileViT's Conv2d (timm's padding (stride - 1 + kernel - 1) // 2): a 1x1 conv as a Linear, a kxk one as
    # im2col + Linear, a depthwise one as the Numba kernel, each ending in act(conv * scale + shift).
    kernel, stride = kernel_stride
    O = C if depthwise else O
    conv = Conv2d(C, O, kernel, stride, groups=C if depthwise else 1)
    rng = np.random.default_rng(seed)
    fan_in = np.prod(conv.weight.shape[1:])
    conv._parameters["weight"] = (rng.uniform(-1, 1, conv.weight.shape) / np.sqrt(fan_in)).astype(dtype)
    scale, shift = rng.uniform(0.5, 2, O).astype(dtype), rng.uniform(-1, 1, O).astype(dtype)
    x = rng.uniform(-1, 1, (2, C, H, W)).astype(dtype)
    y = conv(_nhwc(x), scale=scale, shift=shift, act=act)
    assert y.dtype == x.dtype
    expected = ACTIVATIONS[act](_t(_torch_conv(x, conv.weight, None, stride, conv.padding)) * _t(scale) + _t(shift))
    assert_close(y, expected.numpy(), "kernel")


@given(st.integers(1, 24), st.integers(1, 24), st.integers(1, 9), st.integers(1, 9), st.sampled_from([1, 3]), DTYPES,
       st.integers(0, 2**32 - 1))
def test_model_conv_on_two_maps_is_the_conv_on_their_concatenation(C1, C2, H, W, kernel, dtype, seed):
    # MobileViT's fusion conv, conv(cat(shortcut, x)), reads the two maps side by side without building the
    # concatenation (a 1x1 conv too, through the same im2col).
    conv = Conv2d(C1 + C2, 5, kernel)
    rng = np.random.default_rng(seed)
    conv._parameters["weight"] = rng.uniform(-0.5, 0.5, conv.weight.shape).astype(dtype)
    a, b = rng.uniform(-1, 1, (2, C1, H, W)).astype(dtype), rng.uniform(-1, 1, (2, C2, H, W)).astype(dtype)
    y = conv((_nhwc(a), _nhwc(b)))
    assert y.dtype == dtype
    assert_close(y, _torch_conv(np.concatenate([a, b], axis=1), conv.weight, None, 1, conv.padding), "kernel")


@given(conv_cases(depthwise=True), st.sampled_from(list(ACTIVATIONS)), st.integers(0, 2**32 - 1))
def test_depthwise_kernel_and_twin_match_torch(case, act, seed):
    x, weight, bias, stride, padding = case
    expected = _torch_conv(x, weight, None, stride, padding)
    y = kernels.depthwise_conv2d(_nhwc(x), weight, stride, padding)
    assert y.dtype == x.dtype
    assert_close(y, expected, "kernel")
    assert_close(ops.depthwise_conv2d(_nhwc(x), weight, None, stride, padding), expected, "kernel")
    if bias is not None:
        assert_close(ops.depthwise_conv2d(_nhwc(x), weight, bias, stride, padding), _torch_conv(*case), "kernel")
    scale = np.random.default_rng(seed).uniform(0.5, 2, x.shape[1]).astype(x.dtype)
    shift = np.zeros_like(scale) if bias is None else bias
    y = kernels.depthwise_conv2d(_nhwc(x), weight, stride, padding, scale, shift, act)
    assert_close(y, ACTIVATIONS[act](_t(expected) * _t(scale) + _t(shift)).numpy(), "kernel")


def test_conv_rejects_what_does_not_fit():
    x = np.zeros((1, 5, 5, 4), np.float32)
    with pytest.raises(ValueError, match="does not fit an NHWC map"):
        ops.conv2d(x, np.zeros((6, 3, 3, 3), np.float32))
    with pytest.raises(ValueError, match="does not fit a 5x5 map"):
        ops.conv2d(x, np.zeros((2, 4, 7, 7), np.float32))
    with pytest.raises(ValueError, match="does not fit a 5x5 map"):
        kernels.depthwise_conv2d(x, np.zeros((4, 1, 7, 7), np.float32))
    with pytest.raises(ValueError, match="does not fit 4 channels"):
        kernels.depthwise_conv2d(x, np.zeros((3, 1, 3, 3), np.float32))
    with pytest.raises(ValueError, match="dtype float32 differs"):
        kernels.depthwise_conv2d(x, np.zeros((4, 1, 3, 3)))
    with pytest.raises(ValueError, match="NHWC map"):
        kernels.depthwise_conv2d(x[0], np.zeros((4, 1, 3, 3), np.float32))
    with pytest.raises(ValueError, match="plain .groups=1. or depthwise"):
        Conv2d(4, 8, 3, groups=2)
    with pytest.raises(ValueError, match="depthwise conv takes one map and no residual"):
        Conv2d(4, 4, 3, groups=4)((x, x))


def _batch_norm_params(rng, channels, dtype):
    weight = rng.normal(1.0, 0.3, channels).astype(dtype)
    bias = rng.normal(0.0, 0.3, channels).astype(dtype)
    mean = rng.normal(0.0, 0.5, channels).astype(dtype)
    var = rng.uniform(0.2, 3.0, channels).astype(dtype)
    return weight, bias, mean, var


@given(st.integers(1, 3), st.integers(1, 12), st.integers(1, 9), st.integers(1, 9), DTYPES, st.integers(0, 2**32 - 1))
def test_batch_norm_twin_and_scale_shift_match_torch(B, C, H, W, dtype, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 2, (B, C, H, W)).astype(dtype)
    weight, bias, mean, var = _batch_norm_params(rng, C, dtype)
    expected = _nhwc(F.batch_norm(_t(x), _t(mean), _t(var), _t(weight), _t(bias), training=False, eps=1e-5).numpy())
    assert_close(ops.batch_norm(_nhwc(x), weight, bias, mean, var, 1e-5), expected, "kernel")
    scale, shift = ops.batch_norm_scale_shift(weight, bias, mean, var, 1e-5)
    assert scale.dtype == shift.dtype == x.dtype
    assert_close(_nhwc(x) * scale + shift, expected, "kernel")


@given(conv_cases(), st.integers(0, 2**32 - 1))
def test_fold_batch_norm_equals_conv_then_batch_norm(case, seed):
    x, weight, _, stride, padding = case
    rng = np.random.default_rng(seed)
    bn_weight, bn_bias, mean, var = _batch_norm_params(rng, weight.shape[0], x.dtype)
    conv = F.conv2d(_t(x), _t(weight), None, stride=stride, padding=padding)
    expected = F.batch_norm(conv, _t(mean), _t(var), _t(bn_weight), _t(bn_bias), training=False, eps=1e-5).numpy()
    folded_weight, folded_bias = ops.fold_batch_norm(weight, bn_weight, bn_bias, mean, var, 1e-5)
    assert folded_weight.dtype == folded_bias.dtype == x.dtype
    # the folded conv differs from conv-then-BN by rounding only: the kernel tolerance of the dtype
    assert_close(ops.conv2d(_nhwc(x), folded_weight, folded_bias, stride, padding), _nhwc(expected), "kernel")


def test_fold_batch_norm_is_exact_in_float64():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 9, 9, 8))
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
    identity = kernels.pack_linear_weight(np.ones((1, 1), dtype))
    assert_close(kernels.linear(x[:, None], identity, act="silu")[:, 0], expected, "kernel")  # the GEMM's epilogue


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
