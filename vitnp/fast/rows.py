"""LayerNorm, GELU, SiLU, QuickGELU and softmax over the last axis of any array: Numba kernels over rows; and
GroupNorm with one group, LayerNorm's statistics over a whole sample.

Each ``_<op>_rows`` kernel computes the op on a block of rows; its ``_<op>_shared`` twin runs it on the chunks of rows
this thread takes (:func:`vitnp.fast.schedule.take_chunk`), and :func:`_share_rows` hands that to the threads.
"""

import math

import numba
import numpy as np

from .activations import activate, activation_code, scalar_exp
from .pool import MACS_PER_VALUE, run_shared
from .schedule import NO_JOB, take_chunk
from .vecmath import jit, max_lanes, sum_lanes, sum_squares_lanes


def as_rows(x):
    """View ``x`` as (rows, last) without copying when it is C-contiguous."""
    x = np.ascontiguousarray(x)
    return x.reshape(-1, x.shape[-1])


def _rows_to_update(x2, out):
    """The (rows, C) array an in-place kernel works on: ``out`` holding a copy of ``x2`` (unless it is ``x2``).

    In-place kernels read and write one array, so LLVM vectorises their loops: with two arrays that may be the same
    it must check for overlap at run time, and when ``out`` is ``x`` that check sends it to the scalar loop.
    """
    if out is None or not out.flags.c_contiguous:  # a strided ``out`` is filled by :func:`_result` afterwards
        return x2.copy()
    out2 = out.reshape(x2.shape)
    if out2.ctypes.data != x2.ctypes.data or out2.strides != x2.strides:
        np.copyto(out2, x2)
    return out2


def _share_rows(shared_kernel, arguments, y2):
    """``shared_kernel(*arguments, schedule, job)`` over the rows of the (rows, C) result ``y2``, shared out between
    threads when it has enough values to pay for it (:func:`vitnp.run_shared`)."""
    run_shared(shared_kernel, arguments, y2.shape[0], y2.size * MACS_PER_VALUE)


def _result(y2, shape, out):
    """The kernel's (rows, C) result in ``shape``; a strided ``out`` (which no reshape can alias) receives a copy."""
    y = y2.reshape(shape)
    if out is not None and not out.flags.c_contiguous:
        out[...] = y
        return out
    return y


@numba.njit(cache=True, nogil=True, inline="always")
def centred_inverse_std(values, centred, eps):
    # centred = values - mean (1-D arrays; ``centred`` may be ``values``), and 1 / sqrt(var + eps) in the dtype, var
    # biased (divides by the count). Two passes over the values (mean, then centred sum of squares) as torch does: no
    # E[x^2] - E[x]^2 cancellation. The sums are float64's; the passes over the values run in their dtype (float32:
    # twice the lanes of a vector), the mean subtracted in two parts, its float32 rounding and then the rest, so that
    # centring values far from 0 loses no more than float64's mean would.
    count = values.shape[0]
    mean = sum_lanes(values) / count
    mean_high = values.dtype.type(mean)
    mean_low = values.dtype.type(mean - mean_high)  # 0 for float64
    for c in range(count):
        centred[c] = (values[c] - mean_high) - mean_low
    var = sum_squares_lanes(centred) / count
    return values.dtype.type(1.0 / math.sqrt(var + eps))


@jit
def layer_norm_rows(x, weight, bias, eps, out):
    # y = (x - mean) / sqrt(var + eps) * weight + bias, statistics per row; the centred row goes to ``out`` first, so
    # ``out`` may be ``x``.
    rows, channels = x.shape
    for r in range(rows):
        inv_std = centred_inverse_std(x[r], out[r], eps)
        for c in range(channels):
            out[r, c] = out[r, c] * inv_std * weight[c] + bias[c]


def layer_norm(x, weight, bias, eps, out=None):
    """LayerNorm over the last axis: ``torch.nn.functional.layer_norm(x, (C,), weight, bias, eps)``.

    Sums in float64 for either dtype, the values' passes in ``x.dtype`` (:func:`layer_norm_rows`).
    """
    x2 = as_rows(x)
    y2 = out.reshape(x2.shape) if out is not None and out.flags.c_contiguous else np.empty_like(x2)
    _share_rows(_layer_norm_shared, (x2, weight, bias, eps, y2), y2)
    return _result(y2, x.shape, out)


@jit
def _layer_norm_shared(x, weight, bias, eps, out, schedule, job):
    begin, end = take_chunk(schedule, job)
    while begin < end:
        layer_norm_rows(x[begin:end], weight, bias, eps, out[begin:end])
        begin, end = take_chunk(schedule, NO_JOB)


@jit
def group_norm_samples(x, weight, bias, eps, out):
    # GroupNorm with one group: y = (x - mean) / sqrt(var + eps) * weight[c] + bias[c], statistics per sample of x
    # (samples, positions, C) (every position and channel), as LayerNorm's over the sample's values in a row.
    samples, positions, channels = x.shape
    for b in range(samples):
        inv_std = centred_inverse_std(x[b].reshape(-1), out[b].reshape(-1), eps)
        for p in range(positions):
            for c in range(channels):
                out[b, p, c] = out[b, p, c] * inv_std * weight[c] + bias[c]


def group_norm(x, weight, bias, eps):
    """GroupNorm with one group over channels-last samples x (B, ..., C): ``torch.nn.functional.group_norm(x, 1,
    weight, bias, eps)`` on the channels-first array. LayerNorm's sums and passes (:func:`centred_inverse_std`) over
    each sample's values; a sample is one thread's (a batch is split between threads by samples already)."""
    samples = np.ascontiguousarray(x).reshape(x.shape[0], -1, x.shape[-1])  # (B, positions, C)
    out = np.empty_like(samples)
    group_norm_samples(samples, weight, bias, eps, out)
    return out.reshape(x.shape)


@jit
def _activation_rows(x, act):
    # In place: x = act(x), row by row
    for r in range(x.shape[0]):
        activate(x[r], act)


@jit
def _activation_shared(x, act, schedule, job):
    begin, end = take_chunk(schedule, job)
    while begin < end:
        _activation_rows(x[begin:end], act)
        begin, end = take_chunk(schedule, NO_JOB)


def _activation(name, x, out):
    y2 = _rows_to_update(as_rows(x), out)
    _share_rows(_activation_shared, (y2, activation_code(name)), y2)
    return _result(y2, x.shape, out)


def gelu(x, approximate="none", out=None):
    """GELU over any array: ``torch.nn.functional.gelu(x, approximate=approximate)``; ``out`` may be ``x`` itself for
    an in-place update. (A Linear followed by GELU applies it inside the GEMM: :func:`vitnp.fast.gemm.linear`'s
    ``act``.)"""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu approximate must be 'none' or 'tanh', got {approximate!r}")
    return _activation("gelu" if approximate == "none" else "gelu_tanh", x, out)


def silu(x, out=None):
    """SiLU over any array: ``torch.nn.functional.silu(x)``; ``out`` may be ``x`` itself."""
    return _activation("silu", x, out)


def quick_gelu(x, out=None):
    """QuickGELU over any array: timm's ``x * torch.sigmoid(1.702 * x)``, SiLU's kernel with the scale inside the
    sigmoid; ``out`` may be ``x`` itself."""
    return _activation("quick_gelu", x, out)


@numba.njit(cache=True, nogil=True, inline="always")
def softmax_row(x):
    # In place on a 1-D row: softmax(x)_j = exp(x_j - max(x)) / sum_k exp(x_k - max(x)); subtracting the row max
    # keeps exp() <= 1.
    row_max = max_lanes(x)
    for c in range(x.shape[0]):
        x[c] = scalar_exp(x[c] - row_max, x.dtype)
    inv_total = 1.0 / sum_lanes(x)
    for c in range(x.shape[0]):
        x[c] *= inv_total


@jit
def _softmax_rows(x):
    for r in range(x.shape[0]):
        softmax_row(x[r])


def softmax(x, out=None):
    """Softmax over the last axis: ``torch.softmax(x, dim=-1)``. ``out`` may be ``x`` for an in-place update."""
    x2 = as_rows(x)
    y2 = _rows_to_update(x2, out)
    _share_rows(_softmax_shared, (y2,), y2)
    return _result(y2, x.shape, out)


@jit
def _softmax_shared(x, schedule, job):
    begin, end = take_chunk(schedule, job)
    while begin < end:
        _softmax_rows(x[begin:end])
        begin, end = take_chunk(schedule, NO_JOB)
