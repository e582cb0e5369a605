"""The Swin kernels (window partition / reverse, cyclic roll) against torch reference code, against NumPy and
against each other.

These kernels only move values, so every comparison is exact equality. Hypothesis picks the map size (including
sizes that are not multiples of the window, which the partition zero-pads), the window, the shift and the dtype.
"""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from vitnp import kernels, ops

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # the properties below still run; the torch comparisons skip
    torch = None
needs_torch = pytest.mark.skipif(torch is None, reason="torch is not installed (pip install -e .[test])")

DTYPES = st.sampled_from([np.float32, np.float64])


@st.composite
def maps(draw, max_side=20):
    """(x, window): a (B, H, W, C) map of a chosen dtype and an (h, w) window, window sides up to 8."""
    B, H, W, C = draw(st.integers(1, 3)), draw(st.integers(1, max_side)), draw(st.integers(1, max_side)), draw(
        st.integers(1, 9)
    )
    window = (draw(st.integers(1, 8)), draw(st.integers(1, 8)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return rng.standard_normal((B, H, W, C)).astype(draw(DTYPES)), window


# Reference code in torch, written here from the definitions (timm's order: pad bottom / right, then cut windows).


def torch_window_partition(x, window):
    wh, ww = window
    B, H, W, C = x.shape
    pad_h, pad_w = (wh - H % wh) % wh, (ww - W % ww) % ww
    x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    Hp, Wp = H + pad_h, W + pad_w
    x = x.view(B, Hp // wh, wh, Wp // ww, ww, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, wh * ww, C)


def torch_window_reverse(windows, window, H, W):
    wh, ww = window
    Hp, Wp = -(-H // wh) * wh, -(-W // ww) * ww
    C = windows.shape[-1]
    x = windows.view(-1, Hp // wh, Wp // ww, wh, ww, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, Hp, Wp, C)[:, :H, :W]


@given(maps())
def test_partition_then_reverse_is_identity(xw):
    x, window = xw
    windows = kernels.window_partition(x, window)
    B, H, W, C = x.shape
    assert windows.dtype == x.dtype
    assert windows.shape == (B * -(-H // window[0]) * -(-W // window[1]), window[0] * window[1], C)
    np.testing.assert_array_equal(kernels.window_reverse(windows, window, H, W), x)


@given(maps())
def test_reverse_then_partition_is_identity_on_zero_padded_windows(xw):
    """Windows whose padding positions hold zeros come back unchanged from reverse + partition."""
    x, window = xw
    windows = ops.window_partition(x, window)  # zeros in the padding
    B, H, W, C = x.shape
    round_trip = kernels.window_partition(kernels.window_reverse(windows, window, H, W), window)
    np.testing.assert_array_equal(round_trip, windows)


@given(maps())
def test_partition_pads_with_zeros_and_keeps_token_order(xw):
    """Window w, token t holds x[b, wi*wh + ti, wj*ww + tj] (0 in the padding): checked element by element."""
    x, (wh, ww) = xw
    B, H, W, C = x.shape
    windows = kernels.window_partition(x, (wh, ww))
    n_rows, n_cols = -(-H // wh), -(-W // ww)
    for w in range(windows.shape[0]):
        b, rest = divmod(w, n_rows * n_cols)
        wi, wj = divmod(rest, n_cols)
        for t in range(wh * ww):
            i, j = wi * wh + t // ww, wj * ww + t % ww
            expected = x[b, i, j] if i < H and j < W else np.zeros(C)
            np.testing.assert_array_equal(windows[w, t], expected)


@needs_torch
@given(maps())
def test_partition_and_reverse_match_torch_reference_and_numpy_twin(xw):
    x, window = xw
    B, H, W, C = x.shape
    windows = kernels.window_partition(x, window)
    np.testing.assert_array_equal(windows, torch_window_partition(torch.from_numpy(x), window).numpy())
    np.testing.assert_array_equal(windows, ops.window_partition(x, window))
    scrambled = np.random.default_rng(0).standard_normal(windows.shape).astype(x.dtype)  # padding not zero
    reversed_map = kernels.window_reverse(scrambled, window, H, W)
    assert reversed_map.dtype == x.dtype
    np.testing.assert_array_equal(reversed_map, torch_window_reverse(torch.from_numpy(scrambled), window, H, W).numpy())
    np.testing.assert_array_equal(reversed_map, ops.window_reverse(scrambled, window, H, W))


@needs_torch
@given(maps(), st.integers(-25, 25), st.integers(-25, 25))
def test_roll_matches_torch_and_numpy(xw, shift_h, shift_w):
    x, _ = xw
    rolled = kernels.roll(x, (shift_h, shift_w))
    assert rolled.dtype == x.dtype
    np.testing.assert_array_equal(rolled, np.roll(x, (shift_h, shift_w), axis=(1, 2)))
    np.testing.assert_array_equal(rolled, torch.roll(torch.from_numpy(x), (shift_h, shift_w), dims=(1, 2)).numpy())
    np.testing.assert_array_equal(rolled, ops.roll(x, (shift_h, shift_w)))
    np.testing.assert_array_equal(kernels.roll(rolled, (-shift_h, -shift_w)), x)


@needs_torch
@given(maps(), st.integers(-25, 25), st.integers(-25, 25), st.booleans())
def test_shifted_partition_and_reverse_with_residual_match_torch(xw, shift_h, shift_w, with_residual):
    # A shifted-window block's steps in one pass each: partition(roll(x, shift)) (rolled, then padded, as timm), and
    # roll(reverse(windows), shift) + residual; timm's sequence written out in torch as the reference.
    x, window = xw
    _, H, W, _ = x.shape
    xt = torch.from_numpy(x)
    windows = kernels.window_partition(x, window, shift=(shift_h, shift_w))
    expected = torch_window_partition(torch.roll(xt, (shift_h, shift_w), dims=(1, 2)), window)
    np.testing.assert_array_equal(windows, expected.numpy())
    scrambled = np.random.default_rng(1).standard_normal(windows.shape).astype(x.dtype)  # padding not zero
    residual = np.random.default_rng(2).standard_normal(x.shape).astype(x.dtype) if with_residual else None
    merged = kernels.window_reverse(scrambled, window, H, W, shift=(shift_h, shift_w), residual=residual)
    expected = torch.roll(torch_window_reverse(torch.from_numpy(scrambled), window, H, W), (shift_h, shift_w), (1, 2))
    if with_residual:
        expected = expected + torch.from_numpy(residual)
    assert merged.dtype == x.dtype
    np.testing.assert_array_equal(merged, expected.numpy())


@given(maps())
def test_kernels_accept_non_contiguous_input(xw):
    x, window = xw
    view = np.asfortranarray(x)[:, ::-1]  # neither C-contiguous nor positively strided
    np.testing.assert_array_equal(kernels.window_partition(view, window), ops.window_partition(view, window))
    np.testing.assert_array_equal(kernels.roll(view, (1, -2)), np.roll(view, (1, -2), axis=(1, 2)))


def test_kernels_reject_wrong_ranks_with_clear_errors():
    with pytest.raises(ValueError, match=r"\(B, H, W, C\)"):
        kernels.window_partition(np.zeros((4, 4, 3), np.float32), (2, 2))
    with pytest.raises(ValueError, match=r"\(B, H, W, C\)"):
        kernels.roll(np.zeros((4, 4)), (1, 1))
    with pytest.raises(ValueError, match="windows"):
        kernels.window_reverse(np.zeros((4, 5, 3), np.float32), (2, 2), 4, 4)
    with pytest.raises(ValueError, match="whole number"):
        kernels.window_reverse(np.zeros((3, 4, 3), np.float32), (2, 2), 4, 4)
    with pytest.raises(ValueError, match="residual must be"):
        residual = np.zeros((1, 4, 4, 2), np.float32)  # the map has 3 channels
        kernels.window_reverse(np.zeros((4, 4, 3), np.float32), (2, 2), 4, 4, residual=residual)
