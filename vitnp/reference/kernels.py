"""The reference's Numba kernels: LayerNorm, GroupNorm (one group), GELU, SiLU, QuickGELU, softmax, and Swin's cyclic
roll and window partition / reverse, each written as its formula in plain loops.

Every value is computed in float64 and rounded once to the array's dtype, so a float32 result is the formula's value
to within float32's last bit and a float64 one to within float64's. No vector intrinsics, no packing, no threads;
``cache=True`` keeps the compiled code on disk. The functions without a leading underscore take arrays of any leading
shape and return a new array of the input's dtype.
"""

import math

import numba
import numpy as np

kernel = numba.njit(cache=True)


def _rows(x):
    """``x`` as a C-contiguous (rows, C) array: the kernels loop over rows and over the last axis."""
    x = np.ascontiguousarray(x)
    return x.reshape(-1, x.shape[-1])


# ---- LayerNorm -------------------------------------------------------------------------------------------------------


@kernel
def _layer_norm_rows(x, weight, bias, eps, out):
    rows, C = x.shape
    for r in range(rows):
        mean = 0.0
        for c in range(C):
            mean += x[r, c]
        mean /= C
        var = 0.0
        for c in range(C):
            var += (x[r, c] - mean) ** 2
        var /= C  # biased, as torch
        for c in range(C):
            out[r, c] = (x[r, c] - mean) / math.sqrt(var + eps) * weight[c] + bias[c]


def layer_norm(x, weight, bias, eps):
    """``torch.nn.functional.layer_norm(x, (C,), weight, bias, eps)`` over the last axis:
    y = (x - mean) / sqrt(var + eps) * weight + bias, with the mean and the biased variance of each row."""
    rows = _rows(x)
    out = np.empty_like(rows)
    _layer_norm_rows(rows, weight, bias, eps, out)
    return out.reshape(x.shape)


# ---- GroupNorm with one group (MobileViT v2) -------------------------------------------------------------------------


@kernel
def _group_norm_samples(x, weight, bias, eps, out):
    samples, positions, C = x.shape
    count = positions * C
    for b in range(samples):
        mean = 0.0
        for i in range(positions):
            for c in range(C):
                mean += x[b, i, c]
        mean /= count
        var = 0.0
        for i in range(positions):
            for c in range(C):
                var += (x[b, i, c] - mean) ** 2
        var /= count  # biased, as torch
        for i in range(positions):
            for c in range(C):
                out[b, i, c] = (x[b, i, c] - mean) / math.sqrt(var + eps) * weight[c] + bias[c]


def group_norm(x, weight, bias, eps):
    """GroupNorm with one group (timm ``GroupNorm1``) of channels-last samples x (B, ..., C): y = (x - mean) /
    sqrt(var + eps) * weight[c] + bias[c], with the mean and the biased variance of all the values of a sample (every
    position and channel), the affine per channel. ``torch.nn.functional.group_norm(x, 1, weight, bias, eps)`` on
    the channels-first (B, C, ...) array."""
    samples = np.ascontiguousarray(x).reshape(x.shape[0], math.prod(x.shape[1:-1]), x.shape[-1])  # (B, positions, C)
    out = np.empty_like(samples)
    _group_norm_samples(samples, weight, bias, eps, out)
    return out.reshape(x.shape)


# ---- activations -----------------------------------------------------------------------------------------------------


@kernel
def _gelu(x, out):
    for i in range(x.size):
        v = np.float64(x[i])
        out[i] = 0.5 * v * (1.0 + math.erf(v / math.sqrt(2.0)))


@kernel
def _gelu_tanh(x, out):
    for i in range(x.size):
        v = np.float64(x[i])
        out[i] = 0.5 * v * (1.0 + math.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v**3)))


@kernel
def _silu(x, out):
    for i in range(x.size):
        v = np.float64(x[i])
        out[i] = v / (1.0 + math.exp(-v))  # exp(-v) = inf for v < -709 gives -0, the limit


@kernel
def _quick_gelu(x, out):
    for i in range(x.size):
        v = np.float64(x[i])
        out[i] = v / (1.0 + math.exp(-1.702 * v))  # exp(-1.702 v) = inf for v < -417 gives -0, the limit


def _elementwise(kernel_function, x):
    flat = np.ascontiguousarray(x).reshape(-1)
    out = np.empty_like(flat)
    kernel_function(flat, out)
    return out.reshape(np.shape(x))


def gelu(x, approximate="none"):
    """``torch.nn.functional.gelu(x, approximate)``: 0.5 x (1 + erf(x / sqrt(2))), or with ``approximate='tanh'``
    0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu approximate must be 'none' or 'tanh', got {approximate!r}")
    return _elementwise(_gelu if approximate == "none" else _gelu_tanh, x)


def silu(x):
    """``torch.nn.functional.silu(x)``: x * sigmoid(x) = x / (1 + exp(-x))."""
    return _elementwise(_silu, x)


def quick_gelu(x):
    """timm ``QuickGELU`` (OpenAI CLIP's activation), ``x * torch.sigmoid(1.702 * x)`` = x / (1 + exp(-1.702 x)):
    GELU's sigmoid approximation, SiLU with its input scaled by 1.702 inside the sigmoid."""
    return _elementwise(_quick_gelu, x)


# ---- softmax ---------------------------------------------------------------------------------------------------------


@kernel
def _softmax_rows(x, out):
    rows, C = x.shape
    e = np.empty(C)  # exp(x - max) of one row, in float64
    for r in range(rows):
        largest = -np.inf
        for c in range(C):
            largest = max(largest, np.float64(x[r, c]))
        total = 0.0
        for c in range(C):
            e[c] = math.exp(x[r, c] - largest)
            total += e[c]
        for c in range(C):
            out[r, c] = e[c] / total


def softmax(x):
    """``torch.softmax(x, dim=-1)``: exp(x_j - max(x)) / sum_k exp(x_k - max(x)) over the last axis (subtracting the
    row's maximum keeps exp() at most 1)."""
    rows = _rows(x)
    out = np.empty_like(rows)
    _softmax_rows(rows, out)
    return out.reshape(np.shape(x))


# ---- Swin: cyclic roll, window partition and reverse on NHWC maps (B, H, W, C) ---------------------------------------


def _check_nhwc(x, name):
    if np.ndim(x) != 4:
        raise ValueError(f"{name} expects a (B, H, W, C) map of rank 4, got shape {np.shape(x)}")


@kernel
def _roll(x, shift_h, shift_w, out):
    B, H, W, C = x.shape
    for b in range(B):
        for i in range(H):
            for j in range(W):
                for c in range(C):
                    out[b, i, j, c] = x[b, (i - shift_h) % H, (j - shift_w) % W, c]


def roll(x, shifts):
    """``torch.roll(x, shifts, dims=(1, 2))`` on a (B, H, W, C) map: out[:, i, j] = x[:, (i - s_h) mod H,
    (j - s_w) mod W]; a negative shift moves the map towards the origin."""
    _check_nhwc(x, "roll")
    x = np.ascontiguousarray(x)
    out = np.empty_like(x)
    _roll(x, shifts[0], shifts[1], out)
    return out


@kernel
def _window_partition(x, wh, ww, out):
    B, H, W, C = x.shape
    n_rows, n_cols = (H + wh - 1) // wh, (W + ww - 1) // ww
    for b in range(B):
        for wi in range(n_rows):
            for wj in range(n_cols):
                window = (b * n_rows + wi) * n_cols + wj
                for ti in range(wh):
                    for tj in range(ww):
                        i, j = wi * wh + ti, wj * ww + tj
                        for c in range(C):
                            out[window, ti * ww + tj, c] = x[b, i, j, c] if i < H and j < W else 0.0


@kernel
def _window_reverse(windows, wh, ww, out):
    B, H, W, C = out.shape
    n_rows, n_cols = (H + wh - 1) // wh, (W + ww - 1) // ww
    for b in range(B):
        for i in range(H):
            for j in range(W):
                window = (b * n_rows + i // wh) * n_cols + j // ww
                for c in range(C):
                    out[b, i, j, c] = windows[window, (i % wh) * ww + j % ww, c]


def window_partition(x, window_size, shift=(0, 0)):
    """(B, H, W, C) -> (B*nW, wh*ww, C): the map rolled by ``shift`` (``torch.roll(x, shift, dims=(1, 2))``,
    a shifted-window block's cyclic shift), zero-padded at the bottom / right to whole windows (timm pads after the
    roll), cut into wh x ww windows: out[(b*nWh + wi)*nWw + wj, ti*ww + tj] = x[b, wi*wh + ti, wj*ww + tj].

    timm's ``torch.roll`` + ``F.pad`` + ``window_partition(x, window_size).view(-1, wh*ww, C)``.
    """
    _check_nhwc(x, "window_partition")
    if any(shift):
        x = roll(x, shift)
    B, H, W, C = np.shape(x)
    wh, ww = window_size
    nW = -(-H // wh) * -(-W // ww)
    out = np.empty((B * nW, wh * ww, C), dtype=np.asarray(x).dtype)
    _window_partition(np.ascontiguousarray(x), wh, ww, out)
    return out


def window_reverse(windows, window_size, H, W, shift=(0, 0), residual=None):
    """Inverse of :func:`window_partition`: (B*nW, wh*ww, C) windows -> the (B, H, W, C) map, the padding dropped,
    rolled by ``shift`` (a shifted-window block's reverse cyclic shift), plus ``residual`` (B, H, W, C) if given.

    timm's ``window_reverse(windows, window_size, Hp, Wp)[:, :H, :W]`` + ``torch.roll`` (+ the block's shortcut).
    """
    wh, ww = window_size
    if np.ndim(windows) != 3 or np.shape(windows)[1] != wh * ww:
        raise ValueError(f"window_reverse expects (B*nW, {wh * ww}, C) windows, got shape {np.shape(windows)}")
    per_image = -(-H // wh) * -(-W // ww)
    if np.shape(windows)[0] % per_image:
        raise ValueError(f"{np.shape(windows)[0]} windows is not a whole number of {H}x{W} maps "
                         f"({per_image} windows each)")
    windows = np.ascontiguousarray(windows)
    if residual is not None and residual.dtype != windows.dtype:
        raise ValueError(f"window_reverse: residual dtype {residual.dtype} differs from the windows' {windows.dtype}")
    out = np.empty((windows.shape[0] // per_image, H, W, windows.shape[2]), dtype=windows.dtype)
    _window_reverse(windows, wh, ww, out)
    if any(shift):
        out = roll(out, shift)
    return out if residual is None else out + residual
