"""Numba kernels: the only module of vitnp that imports numba.

Each kernel works on float32 and float64 alike (Numba compiles one specialisation per dtype), keeps IEEE semantics
(no fastmath) and is cached on disk. Each has a readable NumPy twin in :mod:`vitnp.ops`; the tests hold the kernels
to those twins and to torch.

The public functions here take arrays of any leading shape and work over the last axis; the ``_``-prefixed
functions are the jitted loops over rows of a 2-D array.
"""

import math

import numba
import numpy as np

_SQRT_HALF = 1.0 / math.sqrt(2.0)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)

_jit = numba.njit(cache=True, nogil=True)
_jit_parallel = numba.njit(cache=True, nogil=True, parallel=True)


def _rows(x):
    """View ``x`` as (rows, last) without copying when it is C-contiguous."""
    x = np.ascontiguousarray(x)
    return x.reshape(-1, x.shape[-1])


@_jit_parallel
def _layer_norm_rows(x, weight, bias, eps, out):
    # y = (x - mean) / sqrt(var + eps) * weight + bias, statistics per row, var biased (divides by C).
    # Two passes over the row (mean, then centred sum of squares) as torch does: no E[x^2] - E[x]^2 cancellation.
    rows, channels = x.shape
    for r in numba.prange(rows):
        mean = 0.0
        for c in range(channels):
            mean += x[r, c]
        mean /= channels
        var = 0.0
        for c in range(channels):
            d = x[r, c] - mean
            var += d * d
        var /= channels
        inv_std = 1.0 / math.sqrt(var + eps)
        for c in range(channels):
            out[r, c] = (x[r, c] - mean) * inv_std * weight[c] + bias[c]


def layer_norm(x, weight, bias, eps, out=None):
    """LayerNorm over the last axis: ``torch.nn.functional.layer_norm(x, (C,), weight, bias, eps)``.

    Accumulates in float64 for either dtype (Numba promotes the scalar sums), then writes in ``x.dtype``.
    """
    x2 = _rows(x)
    if out is None:
        out = np.empty_like(x2)
    _layer_norm_rows(x2, weight, bias, eps, out.reshape(x2.shape))
    return out.reshape(x.shape)


@_jit_parallel
def _gelu_erf_rows(x, bias, out):
    # GELU(x) = x * Phi(x) = 0.5 * x * (1 + erf(x / sqrt(2))), with the bias of the preceding Linear added first.
    rows, channels = x.shape
    for r in numba.prange(rows):
        for c in range(channels):
            v = x[r, c] + bias[c]
            out[r, c] = 0.5 * v * (1.0 + math.erf(v * _SQRT_HALF))


@_jit_parallel
def _gelu_tanh_rows(x, bias, out):
    # GELU(x) ~ 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3))): torch's approximate='tanh'.
    rows, channels = x.shape
    for r in numba.prange(rows):
        for c in range(channels):
            v = x[r, c] + bias[c]
            out[r, c] = 0.5 * v * (1.0 + math.tanh(_SQRT_2_OVER_PI * (v + 0.044715 * v * v * v)))


def gelu(x, approximate="none", bias=None, out=None):
    """GELU over any array: ``torch.nn.functional.gelu(x + bias, approximate=approximate)``.

    ``bias`` (shape (C,), optional) is added first, so a Linear's bias add and the activation are one pass over
    memory. ``out`` may be ``x`` itself for an in-place update.
    """
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu approximate must be 'none' or 'tanh', got {approximate!r}")
    x2 = _rows(x)
    if bias is None:
        bias = np.zeros(x2.shape[1], dtype=x2.dtype)
    if out is None:
        out = np.empty_like(x2)
    kernel = _gelu_erf_rows if approximate == "none" else _gelu_tanh_rows
    kernel(x2, bias, out.reshape(x2.shape))
    return out.reshape(x.shape)


@_jit_parallel
def _softmax_rows(x, out):
    # softmax(x)_j = exp(x_j - max(x)) / sum_k exp(x_k - max(x)): subtracting the row max keeps exp() <= 1.
    rows, channels = x.shape
    for r in numba.prange(rows):
        row_max = x[r, 0]
        for c in range(1, channels):
            if x[r, c] > row_max:
                row_max = x[r, c]
        total = 0.0
        for c in range(channels):
            e = math.exp(x[r, c] - row_max)
            out[r, c] = e
            total += e
        inv_total = 1.0 / total
        for c in range(channels):
            out[r, c] *= inv_total


def softmax(x, out=None):
    """Softmax over the last axis: ``torch.softmax(x, dim=-1)``. ``out`` may be ``x`` for an in-place update."""
    x2 = _rows(x)
    if out is None:
        out = np.empty_like(x2)
    _softmax_rows(x2, out.reshape(x2.shape))
    return out.reshape(x.shape)
