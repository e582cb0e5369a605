"""Numba kernels: the only module of vitnp that imports numba.

Each kernel works on float32 and float64 alike (Numba compiles one specialisation per dtype), keeps IEEE semantics
(no fastmath) and is cached on disk. Each has a readable NumPy twin in :mod:`vitnp.ops`; the tests hold the kernels
to those twins and to torch.

The public functions here take arrays of any leading shape and work over the last axis; the ``_``-prefixed
functions are the jitted loops over rows of a 2-D array.
"""

import functools
import math
from typing import NamedTuple

import llvmlite.binding
import llvmlite.ir
import numba
import numpy as np
from numba.core import cgutils
from numba.extending import intrinsic, models, overload, register_model

from . import ops, threads

_SQRT_HALF = 1.0 / math.sqrt(2.0)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
# float32 exp: log2(e); ln 2 as a short part (exact in any product with an integer below 2^15) plus the rest; 1/k!;
# the clamp range (exp(-104) is below half the smallest float32 subnormal, exp(89) above the largest float32).
_LOG2E_F32 = np.float32(1.0 / math.log(2.0))
_LN2_HI = np.float32(0.693359375)
_LN2_LO = np.float32(math.log(2.0) - 0.693359375)
_INV_FACT = tuple(np.float32(1.0 / math.factorial(k)) for k in range(8))
_EXP_MIN = np.float32(-104.0)
_EXP_MAX = np.float32(89.0)
# SiLU's exp: its clamp range (exp(-87) is a normal float32; from 88.38 up 2^n is inf); 1.5 * 2^23, whose ulp is 1, so
# that a float32 added to it is rounded to an integer by the adder itself.
_SILU_EXP_MIN = np.float32(-87.0)
_SILU_EXP_MAX = np.float32(89.0)
_ROUND_TO_INTEGER = np.float32(1.5 * 2**23)

# error_model="numpy": x / 0 gives inf or nan as in NumPy (IEEE) instead of raising, which also lets LLVM vectorise
# loops that divide (Python's error model branches on every divisor).
_jit = numba.njit(cache=True, nogil=True, error_model="numpy")
# One value of LayerNorm, GELU or softmax costs about as much time as this many multiply-adds of a GEMM (for
# vitnp.threads.run_shared's decision whether a kernel is worth sharing out between threads).
MACS_PER_VALUE = 128
MACS_PER_COPY = 32  # and one value copied (im2col), as this many


def set_num_threads(n):
    """Numba's thread count (capped at the threads it started with). vitnp's kernels use vitnp.threads' helpers, not
    Numba's threads; this is for :func:`vitnp.set_num_threads`, which sets every thread pool together."""
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))


# ---------------------------------------------------------------------------------------------------------------------
# Scalar helpers that vectorise
#
# ``math.exp`` / ``math.erf`` are scalar libm calls that LLVM cannot vectorise (and strict IEEE order forbids it to
# vectorise a running sum), which made exp / erf / row sums the bulk of softmax, GELU and LayerNorm. For float32
# kernels the helpers below compute in float64 with plain arithmetic that vectorises, to well under float32's
# rounding; float64 kernels keep ``math``'s functions.
# ---------------------------------------------------------------------------------------------------------------------

_LANES = 8  # partial sums of _sum_lanes: independent chains in one vector register, no one sum reordered

# erf(z) ~ z P(z^2) / Q(z^2) for |z| < 4, coefficients lowest order first: a minimax fit on [0, 4] (Lawson-weighted
# least squares against mpmath's erf), max |error| 1.5e-9 in float64. For |z| >= 4, 1 - |erf(z)| < 1.6e-8: erf = +-1,
# as in float32 arithmetic (and gelu(-40) is exactly 0, as torch's).
_ERF_P = (
    1.1283791821107005, 0.18471037769748402, 0.05433259899168645, 0.0038395299091625546, 0.00038269220699212094,
    4.780538919443161e-06, -1.366678534231447e-08,
)  # fmt: skip
_ERF_Q = (1.0, 0.49702885564164656, 0.11382631912782507, 0.015453517669389634, 0.0013095791310779193, 6.400926125020492e-05)


@intrinsic
def _float32_from_bits(typingctx, bits):
    """The float32 whose IEEE-754 bit pattern is the int32 ``bits`` (a reinterpretation, not a conversion)."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], llvmlite.ir.FloatType())

    return numba.types.float32(numba.types.int32), codegen


@intrinsic
def _fma(typingctx, a, b, c):
    """``a * b + c`` rounded once (IEEE fused multiply-add), for three floats or three vectors (lane by lane, the
    GEMM's :class:`_Vector`) of one type. On floats in a loop LLVM vectorises it to the vector FMA instruction;
    without it, strict IEEE order keeps a multiply and an add apart."""
    if not (a == b == c and isinstance(a, (numba.types.Float, _Vector))):
        return None
    suffix = f"v{a.lanes}f{a.dtype.bitwidth}" if isinstance(a, _Vector) else f"f{a.bitwidth}"

    def codegen(context, builder, signature, args):
        value_type = args[0].type
        fma = cgutils.get_or_insert_function(
            builder.module, llvmlite.ir.FunctionType(value_type, [value_type] * 3), f"llvm.fma.{suffix}"
        )
        return builder.call(fma, list(args))

    return a(a, b, c), codegen


@numba.njit(cache=True, nogil=True, inline="always")
def _exp_reduced(x, n):
    # exp(x - n ln 2) for float32 x and integral float32 n with |x - n ln 2| <= ln(2) / 2: r = x - n ln 2 with ln 2
    # split in two (n * _LN2_HI is exact, so r carries no rounding from the reduction), then exp(r) by its Taylor
    # series to r^7 (Horner, fused multiply-adds) in float32 arithmetic, 8 or 16 lanes to a vector in a loop.
    r = _fma(-n, _LN2_HI, x)
    r = _fma(-n, _LN2_LO, r)
    c0, c1, c2, c3, c4, c5, c6, c7 = _INV_FACT
    return _fma(_fma(_fma(_fma(_fma(_fma(_fma(c7, r, c6), r, c5), r, c4), r, c3), r, c2), r, c1), r, c0)


def _exp(x, dtype):
    """exp(x) to the precision of ``dtype``, inside a kernel (Numba compiles the overload below)."""
    return math.exp(x)


@overload(_exp)
def _exp_for_dtype(x, dtype):
    if dtype.dtype == numba.types.float64:
        return lambda x, dtype: math.exp(x)

    def exp_for_float32(x, dtype):
        # exp(x) = 2^n exp(x - n ln 2), n = round(x / ln 2), the second factor by _exp_reduced: within 2 ulp of exp.
        # 2^n is applied as 2^n1 * 2^n2, both normal numbers built from their exponent bits, so a result in float32's
        # subnormal range or beyond its largest value rounds once, to the subnormal or to inf, as exp does. x is
        # clamped to where float32 exp is 0 or inf anyway.
        x = np.float32(x)
        if x < _EXP_MIN:
            x = _EXP_MIN
        elif x > _EXP_MAX:
            x = _EXP_MAX
        n = np.floor(x * _LOG2E_F32 + np.float32(0.5))
        exp_r = _exp_reduced(x, n)
        n1 = np.int32(n) >> 1
        n2 = np.int32(n) - n1
        return exp_r * _float32_from_bits((n1 + 127) << 23) * _float32_from_bits((n2 + 127) << 23)

    return exp_for_float32


def _exp_for_silu(x, dtype):
    """exp(x) for SiLU's v / (1 + exp(-v)), inside a kernel (Numba compiles the overload below)."""
    return math.exp(x)


@overload(_exp_for_silu)
def _exp_for_silu_for_dtype(x, dtype):
    if dtype.dtype == numba.types.float64:
        return lambda x, dtype: math.exp(x)

    def exp_for_silu_float32(x, dtype):
        # exp_for_float32 in fewer steps around the same _exp_reduced, exact where 1 + exp(x) can tell (measured: SiLU
        # 0.25 ns a value instead of 0.36 on one core). x is clamped to [-87, 89]: below, exp(x) is under half an ulp
        # of 1; from 88.38 up n = 128, whose 2^n is inf, so 1 + exp(x) is inf as from 88.73 up for exp itself, and
        # SiLU gives -0 for v <= -88.38 (exactly, |silu(v)| < 4e-37 there). n = round(x / ln 2) by one fused
        # multiply-add onto _ROUND_TO_INTEGER (ties to even); 2^n in one scaling, a normal float32 or inf for n in
        # [-126, 128]. Within 2 ulp of exp on [-87, 88.37] (tested through SiLU).
        x = np.float32(x)
        x = x if x > _SILU_EXP_MIN else _SILU_EXP_MIN  # nan -> the minimum: silu(nan) is v / (...), nan anyway
        x = x if x < _SILU_EXP_MAX else _SILU_EXP_MAX
        n = _fma(x, _LOG2E_F32, _ROUND_TO_INTEGER) - _ROUND_TO_INTEGER
        return _exp_reduced(x, n) * _float32_from_bits((np.int32(n) + 127) << 23)

    return exp_for_silu_float32


def _one(dtype):
    """1 in ``dtype`` inside a kernel: ``v / (_one(x.dtype) + e)`` stays in float32 for float32 (a ``1.0`` literal is
    float64 and would send the division, the slowest step of SiLU, to float64 at half the vector width)."""
    return 1.0


@overload(_one)
def _one_for_dtype(dtype):
    if dtype.dtype == numba.types.float32:
        return lambda dtype: np.float32(1.0)
    return lambda dtype: 1.0


def _erf(z, dtype):
    """erf(z) to the precision of ``dtype``, inside a kernel (Numba compiles the overload below)."""
    return math.erf(z)


@overload(_erf)
def _erf_for_dtype(z, dtype):
    if dtype.dtype == numba.types.float64:
        return lambda z, dtype: math.erf(z)

    def erf_for_float32(z, dtype):
        z = np.float64(z)  # (not float(): Numba's float() of a float32 stays a float32)
        t = z * z
        p0, p1, p2, p3, p4, p5, p6 = _ERF_P
        q0, q1, q2, q3, q4, q5 = _ERF_Q
        p = _fma(_fma(_fma(_fma(_fma(_fma(p6, t, p5), t, p4), t, p3), t, p2), t, p1), t, p0)  # Horner, fused
        q = _fma(_fma(_fma(_fma(_fma(q5, t, q4), t, q3), t, q2), t, q1), t, q0)
        erf = z * p / q
        if z >= 4.0:
            erf = 1.0
        elif z <= -4.0:
            erf = -1.0
        return erf

    return erf_for_float32


# The activations a kernel can apply to the values it writes (a GEMM's output tile, a conv's output pixel), by index
# into ACTIVATIONS: act(x) is applied where the values are still in the L1 cache, instead of in a pass of its own.
ACTIVATIONS = ("none", "silu", "gelu", "gelu_tanh")
_SILU = ACTIVATIONS.index("silu")
_GELU = ACTIVATIONS.index("gelu")
_IN_REGISTERS = (_SILU, _GELU)  # the activations the GEMM and the depthwise conv apply in registers (_vactivate)


def activation_code(name):
    """The index of activation ``name`` in :data:`ACTIVATIONS`, for a kernel's ``act`` argument."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}: expected one of {ACTIVATIONS}")
    return ACTIVATIONS.index(name)


@numba.njit(cache=True, nogil=True, inline="always")
def _activate(y, act):
    # In place on a 1-D array y, act an index into ACTIVATIONS (each loop runs from 0 to y.size: an index that is
    # known not to be negative needs no wraparound, and the loop vectorises):
    #   silu: v * sigmoid(v) = v / (1 + exp(-v)) (exp(-v) = inf for very negative v gives -0, the right limit)
    #   gelu: v * Phi(v) = 0.5 * v * (1 + erf(v / sqrt(2)))
    #   gelu_tanh: 0.5 * v * (1 + tanh(sqrt(2/pi) * (v + 0.044715 v^3))), torch's approximate='tanh'
    if act == 1:
        for c in range(y.size):
            v = y[c]
            y[c] = v / (_one(y.dtype) + _exp_for_silu(-v, y.dtype))
    elif act == 2:
        for c in range(y.size):
            v = y[c]
            y[c] = 0.5 * v * (1.0 + _erf(v * _SQRT_HALF, y.dtype))
    elif act == 3:
        for c in range(y.size):
            v = y[c]
            y[c] = 0.5 * v * (1.0 + math.tanh(_SQRT_2_OVER_PI * (v + 0.044715 * v * v * v)))


@numba.njit(cache=True, nogil=True, inline="always")
def _sum_lanes(a):
    """sum(a) of a 1-D array in float64, as _LANES interleaved partial sums added at the end. The partial sums are
    the lanes of one float64 vector register (:func:`_vload_float64`), one vector add per _LANES values: kept in an
    array, each store might change ``a`` for all LLVM knows, and the loop stayed scalar (256-value rows, one thread:
    0.33-0.41 ns per value that way, ~0.1 this way)."""
    n = a.shape[0]
    partial = _vzeros_float64()
    body = n - n % _LANES
    for c in range(0, body, _LANES):
        partial = _vadd(partial, _vload_float64(a, c))
    total = 0.0
    for lane in range(_LANES):
        total += _vlane(partial, lane)
    for c in range(body, n):
        total += a[c]
    return total


@numba.njit(cache=True, nogil=True, inline="always")
def _max_lanes(a):
    """max(a) of a non-empty 1-D array, as 8 interleaved running maxima compared at the end: one running maximum is a
    chain of compare-and-selects, 8 independent ones vectorise (kept in variables: in an array, each store might
    change ``a`` for all LLVM knows, and the loop stayed scalar, 3x slower). A NaN may be missed (a softmax row with a
    NaN is NaN whatever its maximum)."""
    n = a.shape[0]
    m0 = m1 = m2 = m3 = m4 = m5 = m6 = m7 = a[0]
    body = n - n % 8
    for c in range(0, body, 8):
        m0 = a[c] if a[c] > m0 else m0
        m1 = a[c + 1] if a[c + 1] > m1 else m1
        m2 = a[c + 2] if a[c + 2] > m2 else m2
        m3 = a[c + 3] if a[c + 3] > m3 else m3
        m4 = a[c + 4] if a[c + 4] > m4 else m4
        m5 = a[c + 5] if a[c + 5] > m5 else m5
        m6 = a[c + 6] if a[c + 6] > m6 else m6
        m7 = a[c + 7] if a[c + 7] > m7 else m7
    largest = max(max(max(m0, m1), max(m2, m3)), max(max(m4, m5), max(m6, m7)))
    for c in range(body, n):
        largest = a[c] if a[c] > largest else largest
    return largest


@numba.njit(cache=True, nogil=True, inline="always")
def _sum_squares_lanes(a):
    """sum(a * a) of a 1-D array in float64, as :func:`_sum_lanes`."""
    n = a.shape[0]
    partial = _vzeros_float64()
    body = n - n % _LANES
    for c in range(0, body, _LANES):
        values = _vload_float64(a, c)
        partial = _vadd(partial, _vmul(values, values))
    total = 0.0
    for lane in range(_LANES):
        total += _vlane(partial, lane)
    for c in range(body, n):
        v = np.float64(a[c])
        total += v * v
    return total


@numba.njit(cache=True, nogil=True, inline="always")
def _copy(source, destination):
    # destination[:n] = source for a 1-D source of n values (an index from 0 needs no wraparound: the loop vectorises)
    for c in range(source.size):
        destination[c] = source[c]


@numba.njit(cache=True, nogil=True, inline="always")
def _copy_leading_columns(source, destination):
    # destination (rows, n) = source[:, :n] for a 2-D source with its rows padded past n columns
    n = destination.shape[1]
    for r in range(destination.shape[0]):
        _copy(source[r, :n], destination[r])


# ---------------------------------------------------------------------------------------------------------------------
# A kernel's work shared between threads, without the GIL (vitnp.threads starts and wakes the threads)
#
# A shared kernel is a loop over chunks of its rows (or GEMM panels) that it takes from a schedule until none is left:
# the calling thread and vitnp.threads' helper threads run the same kernel on the same arrays at once, and a chunk goes
# to whichever thread asks first. The schedule is a small int64 array the threads read and update atomically; its
# slots are named below. The calling thread announces the job from inside the kernel, where it no longer holds the
# GIL, and a helper marks a job finished from inside its waiting loop, where it no longer holds it either: so no
# thread ever waits for the GIL in a hand-off. (Handed over through the GIL, a chunk per Python call, a 1.2 ms GELU
# took 1.1-1.3 ms on two threads instead of 0.6-0.8: a thread that waits for the GIL sleeps, and waking a sleeping
# thread costs 0.1-0.5 ms on this 2-core virtual machine.)
# ---------------------------------------------------------------------------------------------------------------------

JOB = 0  # schedule[JOB]: the number of the job being run (announced by the calling thread)
NEXT = 1  # schedule[NEXT]: the first item no thread has taken yet
TOTAL = 2  # schedule[TOTAL]: the number of items
THREADS = 3  # schedule[THREADS]: how many threads take part
FINISHED = 4  # schedule[FINISHED + i]: the last job helper i has finished


def _element_pointer(context, builder, array_type, array, index):
    """Address of element ``index`` of a 1-D C-contiguous array (no bounds check, no negative wrap-around)."""
    return builder.gep(context.make_array(array_type)(context, builder, array).data, [index])


@intrinsic
def _load_acquire(typingctx, array, index):
    """``array[index]`` read from memory on every call (an atomic acquire load): another thread may change it."""

    def codegen(context, builder, signature, args):
        pointer = _element_pointer(context, builder, signature.args[0], *args)
        return builder.load_atomic(pointer, "acquire", array.dtype.bitwidth // 8)

    return array.dtype(array, index), codegen


@intrinsic
def _store_release(typingctx, array, index, value):
    """``array[index] = value`` as an atomic release store: what this thread wrote before is visible with it."""

    def codegen(context, builder, signature, args):
        array_value, index_value, value_value = args
        pointer = _element_pointer(context, builder, signature.args[0], array_value, index_value)
        builder.store_atomic(value_value, pointer, "release", array.dtype.bitwidth // 8)
        return context.get_dummy_value()

    return numba.types.void(array, index, array.dtype), codegen


@intrinsic
def _compare_exchange(typingctx, array, index, expected, new):
    """Atomically: if ``array[index] == expected``, set it to ``new`` and return True; else change nothing, False."""

    def codegen(context, builder, signature, args):
        array_value, index_value, expected_value, new_value = args
        pointer = _element_pointer(context, builder, signature.args[0], array_value, index_value)
        swapped = builder.extract_value(builder.cmpxchg(pointer, expected_value, new_value, "acq_rel", "acquire"), 1)
        return context.cast(builder, swapped, numba.types.boolean, numba.types.boolean)

    return numba.types.boolean(array, index, array.dtype, array.dtype), codegen


@numba.njit(cache=True, nogil=True)
def take_chunk(schedule, job):
    """The next chunk (begin, end) of the schedule's items for this thread; (total, total) when none is left. A
    nonzero ``job`` is announced first (the calling thread's first chunk of a job it has not announced yet).

    Each chunk is a 1 / (2 * threads) share of what is left, at least one item: big at first (few claims), small at
    the end (no thread waits long for another's last chunk), and a thread the machine slows down takes fewer of them.
    With one thread it is the whole range at once.
    """
    if job:
        _store_release(schedule, JOB, job)
    total = schedule[TOTAL]
    parts = 2 * schedule[THREADS]
    while True:
        begin = _load_acquire(schedule, NEXT)
        if begin >= total:
            return total, total
        end = total if parts <= 2 else min(total, begin + max(1, (total - begin) // parts))
        if _compare_exchange(schedule, NEXT, begin, end):
            return begin, end


@_jit
def finish_and_wait(schedule, helper, job, spins):
    """For helper ``helper``: mark ``job`` finished, then spin (without the GIL) until another job is announced; False
    after ``spins`` reads without one. Spinning for a fraction of a millisecond costs less than sleeping and being
    woken on a virtual machine, and the ops of a forward come that close together."""
    _store_release(schedule, FINISHED + helper, job)
    for _ in range(spins):
        if _load_acquire(schedule, JOB) != job:
            return True
    return False


@_jit
def wait_finished(schedule, helpers, job, spins):
    """For the calling thread: spin (without the GIL) until helpers 0 .. ``helpers`` - 1 have finished ``job``; False
    after ``spins`` rounds of reads without it."""
    for _ in range(spins):
        finished = True
        for helper in range(helpers):
            if _load_acquire(schedule, FINISHED + helper) != job:
                finished = False
        if finished:
            return True
    return False


# ---------------------------------------------------------------------------------------------------------------------
# ViT: LayerNorm, GELU, softmax
#
# Each ``_<op>_rows`` kernel computes the op on a block of rows; its ``_<op>_shared`` twin runs it on the chunks of
# rows this thread takes (:func:`take_chunk`), and :func:`_share_rows` hands that to the threads.
# ---------------------------------------------------------------------------------------------------------------------


def _rows(x):
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
    threads when it has enough values to pay for it (:func:`vitnp.threads.run_shared`)."""
    threads.run_shared(shared_kernel, arguments, y2.shape[0], y2.size * MACS_PER_VALUE)


def _result(y2, shape, out):
    """The kernel's (rows, C) result in ``shape``; a strided ``out`` (which no reshape can alias) receives a copy."""
    y = y2.reshape(shape)
    if out is not None and not out.flags.c_contiguous:
        out[...] = y
        return out
    return y


@_jit
def _layer_norm_rows(x, weight, bias, eps, out):
    # y = (x - mean) / sqrt(var + eps) * weight + bias, statistics per row, var biased (divides by C).
    # Two passes over the row (mean, then centred sum of squares) as torch does: no E[x^2] - E[x]^2 cancellation.
    # The centred row goes to ``out`` first, so ``out`` may be ``x``.
    rows, channels = x.shape
    for r in range(rows):
        mean = _sum_lanes(x[r]) / channels
        for c in range(channels):
            out[r, c] = x[r, c] - mean
        var = _sum_squares_lanes(out[r]) / channels
        inv_std = 1.0 / math.sqrt(var + eps)
        for c in range(channels):
            out[r, c] = out[r, c] * inv_std * weight[c] + bias[c]


def layer_norm(x, weight, bias, eps, out=None):
    """LayerNorm over the last axis: ``torch.nn.functional.layer_norm(x, (C,), weight, bias, eps)``.

    Accumulates in float64 for either dtype (Numba promotes the scalar sums), then writes in ``x.dtype``.
    """
    x2 = _rows(x)
    y2 = out.reshape(x2.shape) if out is not None and out.flags.c_contiguous else np.empty_like(x2)
    _share_rows(_layer_norm_shared, (x2, weight, bias, eps, y2), y2)
    return _result(y2, x.shape, out)


@_jit
def _layer_norm_shared(x, weight, bias, eps, out, schedule, job):
    begin, end = take_chunk(schedule, job)
    while begin < end:
        _layer_norm_rows(x[begin:end], weight, bias, eps, out[begin:end])
        begin, end = take_chunk(schedule, 0)


@_jit
def _activation_rows(x, bias, act):
    # In place: x = act(x + bias), the bias (C,) of the preceding Linear added first, row by row.
    rows, channels = x.shape
    for r in range(rows):
        row = x[r]
        for c in range(channels):
            row[c] += bias[c]
        _activate(row, act)


@_jit
def _activation_shared(x, bias, act, schedule, job):
    begin, end = take_chunk(schedule, job)
    while begin < end:
        _activation_rows(x[begin:end], bias, act)
        begin, end = take_chunk(schedule, 0)


def _activation(name, x, bias, out):
    x2 = _rows(x)
    if bias is None:
        bias = np.zeros(x2.shape[1], dtype=x2.dtype)
    y2 = _rows_to_update(x2, out)
    _share_rows(_activation_shared, (y2, bias, activation_code(name)), y2)
    return _result(y2, x.shape, out)


def gelu(x, approximate="none", bias=None, out=None):
    """GELU over any array: ``torch.nn.functional.gelu(x + bias, approximate=approximate)``.

    ``bias`` (shape (C,), optional) is added first, so a Linear's bias add and the activation are one pass over
    memory. ``out`` may be ``x`` itself for an in-place update. (vitnp's own Linears apply the activation inside the
    GEMM: :func:`linear`'s ``act``.)
    """
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu approximate must be 'none' or 'tanh', got {approximate!r}")
    return _activation("gelu" if approximate == "none" else "gelu_tanh", x, bias, out)


def silu(x, bias=None, out=None):
    """SiLU over any array: ``torch.nn.functional.silu(x + bias)``, the bias (C,) over the last axis.

    As :func:`gelu`: the bias add of a Linear and the activation in one pass; ``out`` may be ``x`` itself.
    """
    return _activation("silu", x, bias, out)


@numba.njit(cache=True, nogil=True, inline="always")
def _softmax_row(x):
    # In place on a 1-D row: softmax(x)_j = exp(x_j - max(x)) / sum_k exp(x_k - max(x)); subtracting the row max
    # keeps exp() <= 1.
    row_max = _max_lanes(x)
    for c in range(x.shape[0]):
        x[c] = _exp(x[c] - row_max, x.dtype)
    inv_total = 1.0 / _sum_lanes(x)
    for c in range(x.shape[0]):
        x[c] *= inv_total


@_jit
def _softmax_rows(x):
    for r in range(x.shape[0]):
        _softmax_row(x[r])


def softmax(x, out=None):
    """Softmax over the last axis: ``torch.softmax(x, dim=-1)``. ``out`` may be ``x`` for an in-place update."""
    x2 = _rows(x)
    y2 = _rows_to_update(x2, out)
    _share_rows(_softmax_shared, (y2,), y2)
    return _result(y2, x.shape, out)


@_jit
def _softmax_shared(x, schedule, job):
    begin, end = take_chunk(schedule, job)
    while begin < end:
        _softmax_rows(x[begin:end])
        begin, end = take_chunk(schedule, 0)


# ---------------------------------------------------------------------------------------------------------------------
# Swin: window partition / reverse / cyclic roll
#
# Feature maps are NHWC, (B, H, W, C), as timm 1.x keeps them; every kernel moves whole C-vectors, so the inner loop
# is a contiguous copy. Windows are ordered (batch, window row, window column) and the tokens of a window row-major,
# timm's ``window_partition`` order. The kernels are serial: a copy is bound by memory, not by arithmetic, and waking
# the thread pool between two BLAS calls costs more than the copy (measured on 2 cores: ~3 ms vs ~0.1 ms at 56x56x96).
# ---------------------------------------------------------------------------------------------------------------------


def _check_nhwc(x, name):
    if x.ndim != 4:
        raise ValueError(f"{name} expects a (B, H, W, C) array of rank 4, got shape {x.shape}")


@numba.njit(cache=True, nogil=True, inline="always")
def _rolled_from(i, shift, n):
    """The index that a roll by ``shift`` (0 <= shift < n) of an axis of length n moves to index i (0 <= i < n)."""
    return i - shift if i >= shift else i - shift + n


@_jit
def _roll_hw(x, shift_h, shift_w, out):
    # out[b, i, j] = x[b, (i - shift_h) mod H, (j - shift_w) mod W], with 0 <= shift_h < H and 0 <= shift_w < W.
    B, H, W, C = x.shape
    for row in range(B * H):
        b = row // H
        i = row % H
        src_i = _rolled_from(i, shift_h, H)
        for j in range(W):
            src_j = _rolled_from(j, shift_w, W)
            for c in range(C):
                out[b, i, j, c] = x[b, src_i, src_j, c]


def roll(x, shifts, out=None):
    """Cyclic shift of a (B, H, W, C) map over H and W: ``torch.roll(x, shifts, dims=(1, 2))``.

    out[b, i, j] = x[b, (i - shifts[0]) mod H, (j - shifts[1]) mod W]; negative shifts move towards the origin.
    """
    x = np.ascontiguousarray(x)
    _check_nhwc(x, "roll")
    B, H, W, C = x.shape
    if out is None:
        out = np.empty_like(x)
    _roll_hw(x, shifts[0] % H, shifts[1] % W, out)
    return out


@_jit
def _window_partition(x, window_h, window_w, shift_h, shift_w, out):
    # The windows of the map rolled by (shift_h, shift_w) (0 <= shift < H, W), zero-padded at the bottom / right:
    # out[(b*nWh + wi)*nWw + wj, ti*window_w + tj] = x[b, (i - shift_h) mod H, (j - shift_w) mod W] with
    # i = wi*window_h + ti, j = wj*window_w + tj, or 0 for i >= H or j >= W.
    B, H, W, _ = x.shape
    n_rows = (H + window_h - 1) // window_h
    n_cols = (W + window_w - 1) // window_w
    for strip in range(B * n_rows):  # strip = b * n_rows + wi: one row of windows of one image
        b = strip // n_rows
        wi = strip % n_rows
        for ti in range(window_h):
            i = wi * window_h + ti
            src_i = _rolled_from(i, shift_h, H)
            for wj in range(n_cols):
                w = strip * n_cols + wj
                for tj in range(window_w):
                    j = wj * window_w + tj
                    src_j = _rolled_from(j, shift_w, W)
                    t = ti * window_w + tj
                    if i < H and j < W:
                        _copy(x[b, src_i, src_j], out[w, t])
                    else:
                        out[w, t] = 0.0


def window_partition(x, window_size, shift=(0, 0), out=None):
    """(B, H, W, C) -> (B*nW, wh*ww, C) windows, zero-padding H and W at the bottom / right to whole windows.

    Equals timm's ``F.pad(x, (0, 0, 0, pad_w, 0, pad_h))`` then ``window_partition(x, window_size).view(-1, wh*ww, C)``,
    in one pass: nW = ceil(H / wh) * ceil(W / ww) windows per image. With a ``shift``, the windows of
    ``torch.roll(x, shift, dims=(1, 2))`` (a shifted-window block's cyclic shift, padded after the roll as in timm),
    still in one pass.
    """
    x = np.ascontiguousarray(x)
    _check_nhwc(x, "window_partition")
    B, H, W, C = x.shape
    window_h, window_w = window_size
    num_windows = B * -(-H // window_h) * -(-W // window_w)
    if out is None:
        out = np.empty((num_windows, window_h * window_w, C), dtype=x.dtype)
    _window_partition(x, window_h, window_w, shift[0] % H, shift[1] % W, out)
    return out


@_jit
def _window_reverse(windows, window_h, window_w, shift_h, shift_w, residual, out):
    # The map of the windows, padding dropped, rolled by (shift_h, shift_w) (0 <= shift < H, W), plus the residual
    # (B, H, W, C) (or (0, 0, 0, 0): none): out[b, i, j] = windows[(b*nWh + i' // window_h)*nWw + j' // window_w,
    # (i' % window_h)*window_w + j' % window_w] + residual[b, i, j] with i' = (i - shift_h) mod H, j' likewise.
    B, H, W, C = out.shape
    n_rows = (H + window_h - 1) // window_h
    n_cols = (W + window_w - 1) // window_w
    add = residual.shape[0] > 0
    for row in range(B * H):
        b = row // H
        i = row % H
        src_i = _rolled_from(i, shift_h, H)
        wi = src_i // window_h
        ti = src_i % window_h
        for j in range(W):
            src_j = _rolled_from(j, shift_w, W)
            w = (b * n_rows + wi) * n_cols + src_j // window_w
            t = ti * window_w + src_j % window_w
            if add:
                pixel, window_pixel, shortcut = out[b, i, j], windows[w, t], residual[b, i, j]  # (C,) each
                for c in range(C):
                    pixel[c] = window_pixel[c] + shortcut[c]
            else:
                _copy(windows[w, t], out[b, i, j])


def window_reverse(windows, window_size, H, W, shift=(0, 0), residual=None, out=None):
    """Inverse of :func:`window_partition`: (B*nW, wh*ww, C) -> (B, H, W, C), dropping the padding.

    Equals timm's ``window_reverse(windows.view(-1, wh, ww, C), window_size, Hp, Wp)[:, :H, :W]``; with a ``shift``,
    that map rolled (``torch.roll(map, shift, dims=(1, 2))``: a shifted-window block's reverse cyclic shift), and with
    a ``residual`` (B, H, W, C), that plus the residual (the block's shortcut), all in one pass.
    """
    windows = np.ascontiguousarray(windows)
    window_h, window_w = window_size
    if windows.ndim != 3 or windows.shape[1] != window_h * window_w:
        raise ValueError(f"window_reverse expects (B*nW, {window_h * window_w}, C) windows, got shape {windows.shape}")
    per_image = -(-H // window_h) * -(-W // window_w)
    if windows.shape[0] % per_image:
        raise ValueError(f"{windows.shape[0]} windows is not a whole number of {H}x{W} maps ({per_image} windows each)")
    shape = (windows.shape[0] // per_image, H, W, windows.shape[2])
    if residual is None:
        residual = np.zeros((0, 0, 0, 0), windows.dtype)
    elif residual.shape != shape or residual.dtype != windows.dtype:
        expected = f"{shape} {windows.dtype}"
        raise ValueError(f"window_reverse: residual must be {expected}, got {residual.shape} {residual.dtype}")
    else:
        residual = np.ascontiguousarray(residual)
    if out is None:
        out = np.empty(shape, dtype=windows.dtype)
    _window_reverse(windows, window_h, window_w, shift[0] % H, shift[1] % W, residual, out)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Linear: y = x W^T + b, a GEMM on weights packed once
#
# NumPy's BLAS packs the weight matrix again on every call and splits a product of 197 rows poorly across two
# threads: at batch 1 ViT-B's four Linears ran at two thirds of the machine's GEMM peak (benchmarks/README.md).
# Here each weight matrix is packed once into panels of two vectors' worth of output columns, the panel's weights for
# one k side by side, and a register-blocked micro-kernel computes a tile of 6 rows x 1 panel of y: for every k it
# loads the panel's two weight vectors, broadcasts the 6 inputs x[i, k] in turn and accumulates their products in 12
# vector registers with fused multiply-adds, from zero, in k order. The accumulators stay in registers over the whole
# depth and are stored once, after one more fused multiply-add each, acc * scale + bias (scale 1 for a Linear; a
# BatchNorm's scale for a conv), then the activation and the residual's add, still in the registers (fc1 + GELU, or
# fc2 + the block's shortcut, in one pass over memory). The panels are shared out between threads
# (:func:`take_chunk`); inside a chunk of a batch split across threads the product is serial.
# Blocking k as well (the panel's block in L1) measured slower here: the partial sums' extra passes cost more.
#
# Numba has no vector type; the few LLVM vector operations the micro-kernel needs are intrinsics over a type of our
# own: a 32-byte register (8 float32 or 4 float64 lanes: AVX), 64 bytes on a CPU with AVX-512.
# ---------------------------------------------------------------------------------------------------------------------

_VECTOR_BYTES = 64 if llvmlite.binding.get_host_cpu_features().get("avx512f", False) else 32
_I32 = llvmlite.ir.IntType(32)
_L2_ROWS_BYTES = 1 << 19  # a block of rows of x that stays in the L2 cache (512 KiB; measured against 256 KiB, 1 MiB)
_FEW_PANELS = 16  # a product of fewer panels is shared out by blocks of rows too (measured: 6 panels 0.89 of the time,
# 24 and 48 panels 1.07 and 1.20: there each thread's panels reuse the rows better)


def _panel_width(dtype):
    """Output columns per GEMM panel: two vectors' worth of ``dtype`` lanes."""
    return 2 * (_VECTOR_BYTES // np.dtype(dtype).itemsize)


@numba.njit(cache=True, inline="always")
def _l2_block_rows(depth, itemsize):
    """Rows of a (rows, depth) GEMM input per block that stays in the L2 cache, a multiple of the 6-row tile."""
    return max(6, _L2_ROWS_BYTES // (depth * itemsize) // 6 * 6)


class _Vector(numba.types.Type):
    """A SIMD register of float32 or float64 lanes, LLVM's ``<lanes x float>``."""

    def __init__(self, dtype, lanes=None):
        self.dtype = dtype
        self.lanes = lanes or _VECTOR_BYTES * 8 // dtype.bitwidth  # a whole register unless told
        super().__init__(name=f"vector({dtype} x {self.lanes})")


@register_model(_Vector)
class _VectorModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        element = llvmlite.ir.FloatType() if fe_type.dtype == numba.types.float32 else llvmlite.ir.DoubleType()
        super().__init__(dmm, fe_type, llvmlite.ir.VectorType(element, fe_type.lanes))


@intrinsic
def _vload(typingctx, array, index):
    """The vector ``array[index : index + lanes]``."""
    vector = _Vector(array.dtype)

    def codegen(context, builder, signature, args):
        pointer = _element_pointer(context, builder, signature.args[0], *args)
        vector_pointer = builder.bitcast(pointer, context.get_value_type(vector).as_pointer())
        return builder.load(vector_pointer, align=vector.dtype.bitwidth // 8)

    return vector(array, index), codegen


@intrinsic
def _vbroadcast(typingctx, array, index):
    """``array[index]`` in every lane."""
    vector = _Vector(array.dtype)

    def codegen(context, builder, signature, args):
        scalar = builder.load(_element_pointer(context, builder, signature.args[0], *args))
        vector_type = context.get_value_type(vector)
        one_lane = builder.insert_element(llvmlite.ir.Constant(vector_type, None), scalar, _I32(0))
        every_lane = llvmlite.ir.Constant(llvmlite.ir.VectorType(_I32, vector.lanes), [0] * vector.lanes)
        return builder.shuffle_vector(one_lane, one_lane, every_lane)

    return vector(array, index), codegen


@intrinsic
def _vadd(typingctx, a, b):
    """``a + b`` lane by lane, for two vectors of one type."""
    if not (a == b and isinstance(a, _Vector)):
        return None

    def codegen(context, builder, signature, args):
        return builder.fadd(*args)

    return a(a, b), codegen


@intrinsic
def _vsub(typingctx, a, b):
    """``a - b`` lane by lane, for two vectors of one type."""
    if not (a == b and isinstance(a, _Vector)):
        return None

    def codegen(context, builder, signature, args):
        return builder.fsub(*args)

    return a(a, b), codegen


@intrinsic
def _lanes(typingctx, array):
    """The number of lanes of a vector of ``array``'s dtype (a compile-time constant)."""
    lanes = _Vector(array.dtype).lanes

    def codegen(context, builder, signature, args):
        return context.get_constant(numba.types.intp, lanes)

    return numba.types.intp(array), codegen


@intrinsic
def _vzeros(typingctx, array):
    """A vector of zeros of ``array``'s dtype."""
    vector = _Vector(array.dtype)

    def codegen(context, builder, signature, args):
        return llvmlite.ir.Constant(context.get_value_type(vector), None)

    return vector(array), codegen


@intrinsic
def _vstore(typingctx, array, index, vector):
    """``array[index : index + lanes] = vector``."""

    def codegen(context, builder, signature, args):
        array_value, index_value, vector_value = args
        pointer = _element_pointer(context, builder, signature.args[0], array_value, index_value)
        vector_pointer = builder.bitcast(pointer, vector_value.type.as_pointer())
        builder.store(vector_value, vector_pointer, align=vector.dtype.bitwidth // 8)
        return context.get_dummy_value()

    return numba.types.void(array, index, vector), codegen


@intrinsic
def _vmul(typingctx, a, b):
    """``a * b`` lane by lane, for two vectors of one type."""
    if not (a == b and isinstance(a, _Vector)):
        return None

    def codegen(context, builder, signature, args):
        return builder.fmul(*args)

    return a(a, b), codegen


# _sum_lanes' partial sums: _LANES float64 lanes, whatever the register width (LLVM splits or joins registers).
_PARTIAL_SUMS = _Vector(numba.types.float64, _LANES)


@intrinsic
def _vload_float64(typingctx, array, index):
    """``array[index : index + _LANES]`` as float64 lanes (float32 values widened, which is exact)."""

    def codegen(context, builder, signature, args):
        pointer = _element_pointer(context, builder, signature.args[0], *args)
        stored = llvmlite.ir.VectorType(context.get_value_type(array.dtype), _LANES)
        values = builder.load(builder.bitcast(pointer, stored.as_pointer()), align=array.dtype.bitwidth // 8)
        if array.dtype == numba.types.float64:
            return values
        return builder.fpext(values, context.get_value_type(_PARTIAL_SUMS))

    return _PARTIAL_SUMS(array, index), codegen


@intrinsic
def _vzeros_float64(typingctx):
    """_LANES float64 zeros, the start of _sum_lanes' partial sums."""

    def codegen(context, builder, signature, args):
        return llvmlite.ir.Constant(context.get_value_type(_PARTIAL_SUMS), None)

    return _PARTIAL_SUMS(), codegen


@intrinsic
def _vlane(typingctx, vector, lane):
    """Lane ``lane`` of ``vector``, a scalar."""

    def codegen(context, builder, signature, args):
        return builder.extract_element(*args)

    return vector.dtype(vector, lane), codegen


class _LaneMath:
    """LLVM IR on vectors of one type, for the activations below: a constant in every lane, an LLVM intrinsic
    (``fma``, ``exp``) on whole vectors, a libm function lane by lane."""

    def __init__(self, builder, vector_type):
        self.builder = builder
        self.type = vector_type
        self.lanes = vector_type.count
        self.suffix = f"v{self.lanes}{'f32' if isinstance(vector_type.element, llvmlite.ir.FloatType) else 'f64'}"

    def splat(self, constant, lane_type=None):
        return llvmlite.ir.Constant(lane_type or self.type, [constant] * self.lanes)

    def call(self, name, *operands):
        function_type = llvmlite.ir.FunctionType(self.type, [self.type] * len(operands))
        function = cgutils.get_or_insert_function(self.builder.module, function_type, f"llvm.{name}.{self.suffix}")
        return self.builder.call(function, list(operands))

    def call_each_lane(self, name, operand):
        element = self.type.element
        function = cgutils.get_or_insert_function(
            self.builder.module, llvmlite.ir.FunctionType(element, [element]), name
        )
        result = self.splat(0.0)
        for lane in range(self.lanes):
            value = self.builder.call(function, [self.builder.extract_element(operand, _I32(lane))])
            result = self.builder.insert_element(result, value, _I32(lane))
        return result


# The activations a GEMM applies to its output tile in the registers (and the depthwise conv to its vectors of
# channels), with the operations of :func:`_activate` on one value in the same order, so that a tile activated in
# its registers equals the tile activated in memory bit for bit (tested), without the tile's trip through memory.
# Measured on one thread: SiLU on the GEMM of MobileViT's expanding 1x1 convs 0.37-0.54 ns per value against
# 0.75-1.27 through memory; ViT's and Swin's fc1 with GELU 0.83-0.97 of the time (float64 0.94-1.0).


@intrinsic
def _vsilu(typingctx, v):
    """SiLU lane by lane, v / (1 + exp(-v)): for float32 ``exp_for_silu_float32``'s clamp, rounding, Horner
    polynomial and 2^n scaling, for float64 LLVM's exp (libm's, lane by lane, as ``math.exp``)."""
    if not isinstance(v, _Vector):
        return None

    def codegen(context, builder, signature, args):
        (value,) = args
        lane = _LaneMath(builder, value.type)
        x = builder.fneg(value)
        if v.dtype == numba.types.float64:
            exp = lane.call("exp", x)
        else:  # exp_for_silu_float32, step by step
            x = builder.select(builder.fcmp_ordered(">", x, lane.splat(_SILU_EXP_MIN)), x, lane.splat(_SILU_EXP_MIN))
            x = builder.select(builder.fcmp_ordered("<", x, lane.splat(_SILU_EXP_MAX)), x, lane.splat(_SILU_EXP_MAX))
            rounding = lane.splat(_ROUND_TO_INTEGER)
            n = builder.fsub(lane.call("fma", x, lane.splat(_LOG2E_F32), rounding), rounding)
            r = lane.call("fma", builder.fneg(n), lane.splat(_LN2_HI), x)
            r = lane.call("fma", builder.fneg(n), lane.splat(_LN2_LO), r)
            exp_r = lane.splat(_INV_FACT[7])
            for k in range(6, -1, -1):  # Horner, fused
                exp_r = lane.call("fma", exp_r, r, lane.splat(_INV_FACT[k]))
            int_type = llvmlite.ir.VectorType(_I32, lane.lanes)
            exponent = builder.add(builder.fptosi(n, int_type), lane.splat(127, int_type))
            power_of_two = builder.bitcast(builder.shl(exponent, lane.splat(23, int_type)), value.type)  # 2^n
            exp = builder.fmul(exp_r, power_of_two)
        return builder.fdiv(value, builder.fadd(lane.splat(1.0), exp))

    return v(v), codegen


@intrinsic
def _vgelu(typingctx, v):
    """GELU lane by lane, 0.5 * v * (1 + erf(v / sqrt(2))), in float64 (float32 lanes widened, the result rounded
    back): for float32 ``erf_for_float32``'s rational function and clamps, for float64 libm's erf lane by lane."""
    if not isinstance(v, _Vector):
        return None

    def codegen(context, builder, signature, args):
        (value,) = args
        lane = _LaneMath(builder, llvmlite.ir.VectorType(llvmlite.ir.DoubleType(), value.type.count))
        wide = value if v.dtype == numba.types.float64 else builder.fpext(value, lane.type)
        z = builder.fmul(wide, lane.splat(_SQRT_HALF))
        if v.dtype == numba.types.float64:
            erf = lane.call_each_lane("erf", z)
        else:  # erf_for_float32, step by step
            t = builder.fmul(z, z)
            p = lane.splat(_ERF_P[-1])
            for coefficient in _ERF_P[-2::-1]:  # Horner, fused
                p = lane.call("fma", p, t, lane.splat(coefficient))
            q = lane.splat(_ERF_Q[-1])
            for coefficient in _ERF_Q[-2::-1]:
                q = lane.call("fma", q, t, lane.splat(coefficient))
            erf = builder.fdiv(builder.fmul(z, p), q)
            erf = builder.select(builder.fcmp_ordered(">=", z, lane.splat(4.0)), lane.splat(1.0), erf)
            erf = builder.select(builder.fcmp_ordered("<=", z, lane.splat(-4.0)), lane.splat(-1.0), erf)
        gelu = builder.fmul(builder.fmul(lane.splat(0.5), wide), builder.fadd(lane.splat(1.0), erf))
        return gelu if v.dtype == numba.types.float64 else builder.fptrunc(gelu, value.type)

    return v(v), codegen


@numba.njit(cache=True, nogil=True, inline="always")
def _vactivate(v, act):
    # act(v) for the activations applied in registers (_IN_REGISTERS), v itself for any other
    if act == _SILU:
        return _vsilu(v)
    if act == _GELU:
        return _vgelu(v)
    return v


@_jit
def _gemm_panels(x, panels, scale, shift, act, residual, y, first_panel, end_panel, block_rows, n_columns):
    # y[:, panel columns] = act((x @ W[panel columns]^T) * scale + shift) + residual for the panels in [first_panel,
    # end_panel). x (rows, depth) C-contiguous; panels (n_panels, depth, width = 2 lanes): panels[p, k, c] = W[p *
    # width + c, k], zero past the last of W's n_columns columns (a panel that is half padding is computed on its first
    # vector alone: measured 0.90-0.94 of the time on MobileViT's 144-column and head_dim-36 products, ViT's attention
    # with its 197 keys); scale, shift and the rows of y padded to n_panels * width columns; act an index into
    # ACTIVATIONS; residual (rows, out_features), or (0, 0): none. The rows go in blocks of block_rows that stay in the
    # L2 cache while the panels pass over them. SiLU, GELU and the residual's add are applied to the tile in its
    # registers; gelu_tanh (and the residual after it, and on the cut-short last panel) by _tile_epilogue. (Measured,
    # one thread: the residual's add on MobileViT's and Swin's proj / fc2 shapes took 1.3-2.5 ns per value through the
    # tile in memory, 0.6-1.1 in the registers.)
    rows, depth = x.shape
    width = panels.shape[2]
    lanes = width // 2
    padded_columns = y.shape[1]
    x_flat = x.reshape(-1)
    weights = panels.reshape(-1)
    y_flat = y.reshape(-1)
    tile = np.empty(6 * width, y.dtype)  # scratch for _tile_epilogue
    tile_act = 0 if act in _IN_REGISTERS else act  # SiLU, GELU on the tile's registers, gelu_tanh on its memory
    out_features = residual.shape[1]
    residual_flat = residual.reshape(-1)
    for block in range(0, rows, block_rows):
        for p in range(first_panel, end_panel):
            column = p * width
            scale0 = _vload(scale, column)
            scale1 = _vload(scale, column + lanes)
            shift0 = _vload(shift, column)
            shift1 = _vload(shift, column + lanes)
            residual_in_registers = residual.shape[0] > 0 and tile_act == 0 and column + width <= out_features
            for i in range(block, min(block + block_rows, rows), 6):
                # Where the tile's 6 rows of x start; past the last row, the last row again (computed, not stored).
                x0 = i * depth
                x1 = min(i + 1, rows - 1) * depth
                x2 = min(i + 2, rows - 1) * depth
                x3 = min(i + 3, rows - 1) * depth
                x4 = min(i + 4, rows - 1) * depth
                x5 = min(i + 5, rows - 1) * depth
                acc00 = acc10 = acc20 = acc30 = acc40 = acc50 = _vzeros(y)  # acc<r><h>: row i + r, half h of the panel
                acc01 = acc11 = acc21 = acc31 = acc41 = acc51 = _vzeros(y)
                w = p * depth * width
                if column + lanes < n_columns:  # both vectors of the panel hold output columns
                    for k in range(depth):
                        w0 = _vload(weights, w)  # W[column : column + lanes, k]
                        w1 = _vload(weights, w + lanes)  # W[column + lanes : column + width, k]
                        w += width
                        a = _vbroadcast(x_flat, x0 + k)
                        acc00 = _fma(a, w0, acc00)
                        acc01 = _fma(a, w1, acc01)
                        a = _vbroadcast(x_flat, x1 + k)
                        acc10 = _fma(a, w0, acc10)
                        acc11 = _fma(a, w1, acc11)
                        a = _vbroadcast(x_flat, x2 + k)
                        acc20 = _fma(a, w0, acc20)
                        acc21 = _fma(a, w1, acc21)
                        a = _vbroadcast(x_flat, x3 + k)
                        acc30 = _fma(a, w0, acc30)
                        acc31 = _fma(a, w1, acc31)
                        a = _vbroadcast(x_flat, x4 + k)
                        acc40 = _fma(a, w0, acc40)
                        acc41 = _fma(a, w1, acc41)
                        a = _vbroadcast(x_flat, x5 + k)
                        acc50 = _fma(a, w0, acc50)
                        acc51 = _fma(a, w1, acc51)
                else:  # the panel's second vector is all padding: its accumulators stay zero
                    for k in range(depth):
                        w0 = _vload(weights, w)
                        w += width
                        acc00 = _fma(_vbroadcast(x_flat, x0 + k), w0, acc00)
                        acc10 = _fma(_vbroadcast(x_flat, x1 + k), w0, acc10)
                        acc20 = _fma(_vbroadcast(x_flat, x2 + k), w0, acc20)
                        acc30 = _fma(_vbroadcast(x_flat, x3 + k), w0, acc30)
                        acc40 = _fma(_vbroadcast(x_flat, x4 + k), w0, acc40)
                        acc50 = _fma(_vbroadcast(x_flat, x5 + k), w0, acc50)
                acc00, acc01 = _fma(acc00, scale0, shift0), _fma(acc01, scale1, shift1)
                acc10, acc11 = _fma(acc10, scale0, shift0), _fma(acc11, scale1, shift1)
                acc20, acc21 = _fma(acc20, scale0, shift0), _fma(acc21, scale1, shift1)
                acc30, acc31 = _fma(acc30, scale0, shift0), _fma(acc31, scale1, shift1)
                acc40, acc41 = _fma(acc40, scale0, shift0), _fma(acc41, scale1, shift1)
                acc50, acc51 = _fma(acc50, scale0, shift0), _fma(acc51, scale1, shift1)
                if act in _IN_REGISTERS:
                    acc00, acc01 = _vactivate(acc00, act), _vactivate(acc01, act)
                    acc10, acc11 = _vactivate(acc10, act), _vactivate(acc11, act)
                    acc20, acc21 = _vactivate(acc20, act), _vactivate(acc21, act)
                    acc30, acc31 = _vactivate(acc30, act), _vactivate(acc31, act)
                    acc40, acc41 = _vactivate(acc40, act), _vactivate(acc41, act)
                    acc50, acc51 = _vactivate(acc50, act), _vactivate(acc51, act)
                if residual_in_registers:  # rows past the last are the last row again, as for x
                    r0 = i * out_features + column
                    r1 = min(i + 1, rows - 1) * out_features + column
                    r2 = min(i + 2, rows - 1) * out_features + column
                    r3 = min(i + 3, rows - 1) * out_features + column
                    r4 = min(i + 4, rows - 1) * out_features + column
                    r5 = min(i + 5, rows - 1) * out_features + column
                    acc00 = _vadd(acc00, _vload(residual_flat, r0))
                    acc01 = _vadd(acc01, _vload(residual_flat, r0 + lanes))
                    acc10 = _vadd(acc10, _vload(residual_flat, r1))
                    acc11 = _vadd(acc11, _vload(residual_flat, r1 + lanes))
                    acc20 = _vadd(acc20, _vload(residual_flat, r2))
                    acc21 = _vadd(acc21, _vload(residual_flat, r2 + lanes))
                    acc30 = _vadd(acc30, _vload(residual_flat, r3))
                    acc31 = _vadd(acc31, _vload(residual_flat, r3 + lanes))
                    acc40 = _vadd(acc40, _vload(residual_flat, r4))
                    acc41 = _vadd(acc41, _vload(residual_flat, r4 + lanes))
                    acc50 = _vadd(acc50, _vload(residual_flat, r5))
                    acc51 = _vadd(acc51, _vload(residual_flat, r5 + lanes))
                at = i * padded_columns + column
                _vstore(y_flat, at, acc00)
                _vstore(y_flat, at + lanes, acc01)
                if i + 1 < rows:
                    _vstore(y_flat, at + padded_columns, acc10)
                    _vstore(y_flat, at + padded_columns + lanes, acc11)
                if i + 2 < rows:
                    _vstore(y_flat, at + 2 * padded_columns, acc20)
                    _vstore(y_flat, at + 2 * padded_columns + lanes, acc21)
                if i + 3 < rows:
                    _vstore(y_flat, at + 3 * padded_columns, acc30)
                    _vstore(y_flat, at + 3 * padded_columns + lanes, acc31)
                if i + 4 < rows:
                    _vstore(y_flat, at + 4 * padded_columns, acc40)
                    _vstore(y_flat, at + 4 * padded_columns + lanes, acc41)
                if i + 5 < rows:
                    _vstore(y_flat, at + 5 * padded_columns, acc50)
                    _vstore(y_flat, at + 5 * padded_columns + lanes, acc51)
                if tile_act or (residual.shape[0] and not residual_in_registers):
                    tile_rows = min(6, rows - i)
                    _tile_epilogue(y_flat, at, padded_columns, tile_rows, width, tile_act, tile, residual, i, column)


@_jit
def _tile_epilogue(y_flat, at, padded_columns, tile_rows, width, act, tile, residual, i, column):
    # The activation (gelu_tanh: SiLU and GELU are applied in the tile's registers) and the residual add after it
    # (or on the cut-short last panel) of _gemm_panels' tile of tile_rows rows x width columns at y_flat[at], while it
    # is in the L1 cache; a function of its own, so that its code stays out of the micro-kernel's loops (inlined
    # there, it cost the plain product 6-13%). The activation runs on a contiguous copy of the tile, where its loop
    # vectorises (over a 16-column run of y it would not); then the residual (rows, out_features) is added.
    lanes = width // 2
    if act:
        for r in range(tile_rows):
            _vstore(tile, r * width, _vload(y_flat, at + r * padded_columns))
            _vstore(tile, r * width + lanes, _vload(y_flat, at + r * padded_columns + lanes))
        _activate(tile[: tile_rows * width], act)
        for r in range(tile_rows):
            _vstore(y_flat, at + r * padded_columns, _vload(tile, r * width))
            _vstore(y_flat, at + r * padded_columns + lanes, _vload(tile, r * width + lanes))
    if residual.shape[0]:
        out_features = residual.shape[1]
        residual_flat = residual.reshape(-1)
        for r in range(tile_rows):
            row_at = at + r * padded_columns
            residual_at = (i + r) * out_features + column
            if column + width <= out_features:
                y0 = _vadd(_vload(y_flat, row_at), _vload(residual_flat, residual_at))
                y1 = _vadd(_vload(y_flat, row_at + lanes), _vload(residual_flat, residual_at + lanes))
                _vstore(y_flat, row_at, y0)
                _vstore(y_flat, row_at + lanes, y1)
            else:  # the cut-short last panel
                for c in range(out_features - column):
                    y_flat[row_at + c] += residual_flat[residual_at + c]


@_jit
def _gemm_shared(x, panels, scale, shift, act, residual, y, block_rows, item_rows, n_columns, schedule, job):
    # The items shared out are (item_rows rows, panel) pairs, row group by row group: a chunk is a run of panels over
    # one group of rows or more. item_rows is all the rows, or (for a product with few panels) an L2 block of them.
    n_panels = panels.shape[0]
    begin, end = take_chunk(schedule, job)
    while begin < end:
        for group in range(begin // n_panels, (end - 1) // n_panels + 1):
            first_panel = max(begin - group * n_panels, 0)
            end_panel = min(end - group * n_panels, n_panels)
            top, bottom = group * item_rows, min((group + 1) * item_rows, x.shape[0])
            group_residual = residual[top:bottom] if residual.shape[0] else residual
            _gemm_panels(
                x[top:bottom], panels, scale, shift, act, group_residual, y[top:bottom], first_panel, end_panel,
                block_rows, n_columns,
            )
        begin, end = take_chunk(schedule, 0)


class PackedWeight(NamedTuple):
    """A Linear weight (out, in) in the panel layout :func:`linear` reads, made by :func:`pack_linear_weight`."""

    panels: np.ndarray  # (n_panels, in_features, width): panels[p, k, c] = W[p * width + c, k], 0 past the last row
    out_features: int


def pack_linear_weight(weight):
    """Pack a Linear weight (out_features, in_features) of dtype float32 or float64 for :func:`linear`."""
    weight = np.asarray(weight)
    if weight.ndim != 2 or weight.dtype not in (np.float32, np.float64):
        raise ValueError(f"expected a float32 or float64 weight of shape (out, in), got {weight.dtype} {weight.shape}")
    out_features, in_features = weight.shape
    width = _panel_width(weight.dtype)
    n_panels = -(-out_features // width)
    padded = np.zeros((n_panels * width, in_features), weight.dtype)
    padded[:out_features] = weight
    panels = padded.reshape(n_panels, width, in_features).transpose(0, 2, 1)  # (n_panels, in, width) view
    return PackedWeight(np.ascontiguousarray(panels), out_features)


def _padded_scale_shift(padded_columns, out_features, scale, bias, dtype):
    """A GEMM's per-column scale and shift padded to whole panels: (1 or ``scale``, 0 or ``bias``) then (1, 0)."""
    padded_scale = _padded(scale, 1.0, padded_columns, out_features, dtype)
    return padded_scale, _padded(bias, 0.0, padded_columns, out_features, dtype)


def _padded(values, fill, padded_columns, out_features, dtype):
    # ``values`` (out_features,) then ``fill`` up to padded_columns, or ``fill`` throughout for None. The kernels only
    # read them: a constant vector is made once, and a given one that needs no padding is used as it is when it is a
    # contiguous, writable array of ``dtype`` (a read-only one would make Numba compile the kernels again, for
    # read-only arrays). Copying them on every call cost ~1.7 microseconds a GEMM.
    if values is None:
        return _constant_vector(fill, padded_columns, np.dtype(dtype))
    values = np.asarray(values)
    flags = values.flags
    if out_features == padded_columns and values.dtype == dtype and flags.c_contiguous and flags.writeable:
        return values
    padded = np.full(padded_columns, fill, dtype)
    padded[:out_features] = values
    return padded


@functools.lru_cache(maxsize=256)
def _constant_vector(fill, length, dtype):
    return np.full(length, fill, dtype)


def _residual_rows(residual, shape, dtype, name):
    """A GEMM's residual as rows (rows, out_features), checked against the output's ``shape``; (0, 0) for none."""
    if residual is None:
        return np.zeros((0, 0), dtype)
    if residual.shape != shape or residual.dtype != dtype:
        got = f"{residual.shape} {residual.dtype}"
        raise ValueError(f"{name}: residual must be {shape} {dtype} like the output, got {got}")
    return _rows(residual)


def linear(x, packed, bias=None, act="none", scale=None, residual=None):
    """``torch.nn.functional.linear(x, W, bias)`` = x W^T + b over the last axis, with W packed by
    :func:`pack_linear_weight`; then, optionally, a per-output scale, an activation and a residual connection's add:
    act((x W^T) * scale + bias) + residual.

    Each output is one chain of fused multiply-adds in k order, then scaled and shifted by one more. ``act`` (one of
    ``ACTIVATIONS``) and the add of ``residual`` (the output's shape) are applied to each tile of the output while it
    is in the L1 cache (a Linear then GELU / SiLU, or a block's last Linear and its residual add, in one pass over
    memory); ``scale`` and ``bias`` (out_features,) carry an eval-mode BatchNorm after a bias-free conv. The panels
    are shared out between threads when the product is big enough to pay for it.
    """
    panels, out_features = packed
    if x.dtype != panels.dtype:
        raise ValueError(f"linear: input dtype {x.dtype} differs from the weight's {panels.dtype}")
    if x.shape[-1] != panels.shape[1]:
        raise ValueError(
            f"linear: input has {x.shape[-1]} features on its last axis, the weight takes {panels.shape[1]}"
        )
    x2 = _rows(x)
    rows, depth = x2.shape
    residual2 = _residual_rows(residual, (*x.shape[:-1], out_features), x.dtype, "linear")
    n_panels, _, width = panels.shape
    padded_scale, padded_shift = _padded_scale_shift(n_panels * width, out_features, scale, bias, x.dtype)
    y = np.empty((rows, n_panels * width), x.dtype)
    block_rows = _l2_block_rows(depth, x.itemsize)

    code = activation_code(act)
    macs = rows * out_features * (depth + (MACS_PER_VALUE if code else 0))
    # Shared out by panels; a tall product with few panels (Swin's fc2 in its first stage: 3136 rows, 6 panels) by
    # blocks of rows too, so that the threads split the rows instead of each streaming all of x for its panel or two.
    item_rows = block_rows if n_panels < _FEW_PANELS else rows
    arguments = (x2, panels, padded_scale, padded_shift, code, residual2, y, block_rows, item_rows, out_features)
    threads.run_shared(_gemm_shared, arguments, -(-rows // item_rows) * n_panels, macs)
    if y.shape[1] != out_features:  # the last panel is cut short: drop its padding columns
        y = np.ascontiguousarray(y[:, :out_features])
    return y.reshape(*x.shape[:-1], out_features)


# ---------------------------------------------------------------------------------------------------------------------
# MobileViT: depthwise convolution with its BatchNorm and activation
#
# Feature maps are NHWC, (B, H, W, C), as for Swin: an output pixel's channels are contiguous, and so are the channels
# of each input pixel a tap reads, whatever the stride, so the sum over the taps runs on the GEMM's vectors of channels
# (measured on a 56x56x256 map, one thread: 0.76 ms summed in the output pixel in memory, 0.55 in registers). The
# output rows are shared out between threads (:func:`take_chunk`).
# ---------------------------------------------------------------------------------------------------------------------


@numba.njit(cache=True, nogil=True, inline="always")
def _taps_inside(position, stride, padding, kernel_size, size):
    # The taps [first, end) of the window of output position ``position`` (along one axis) that fall inside the map
    # of ``size`` pixels, not in its padding: the window starts at input pixel position * stride - padding.
    start = position * stride - padding
    return max(0, -start), min(kernel_size, size - start)


@numba.njit(cache=True, nogil=True, inline="always")
def _depthwise_3x3_four_pixels(x_flat, taps, scale, shift, act, out_flat, corner, at, W, C, c):
    # One vector of channels from c of four output pixels side by side along a row at stride 1, their 3x3 windows
    # inside the map: the pixel at ``at`` in out_flat, whose window's corner is ``corner`` in x_flat, and the three
    # after it. Each tap is loaded once for the four, and each input pixel once for the windows that overlap on it
    # (six columns of three rows instead of 36 reads): 27 loads for 36 fused multiply-adds instead of 72. Each sum runs
    # over the taps in (u, v) order from zero, as the pixel-by-pixel loop does: bit for bit the same.
    acc0 = acc1 = acc2 = acc3 = _vzeros(out_flat)
    for u in range(3):
        for v in range(3):
            tap = _vload(taps, (u * 3 + v) * C + c)  # weight[u, v, c : c + lanes]
            source = corner + (u * W + v) * C + c
            acc0 = _fma(tap, _vload(x_flat, source), acc0)
            acc1 = _fma(tap, _vload(x_flat, source + C), acc1)
            acc2 = _fma(tap, _vload(x_flat, source + 2 * C), acc2)
            acc3 = _fma(tap, _vload(x_flat, source + 3 * C), acc3)
    channel_scale, channel_shift = _vload(scale, c), _vload(shift, c)
    _vstore(out_flat, at + c, _vactivate(_fma(acc0, channel_scale, channel_shift), act))
    _vstore(out_flat, at + C + c, _vactivate(_fma(acc1, channel_scale, channel_shift), act))
    _vstore(out_flat, at + 2 * C + c, _vactivate(_fma(acc2, channel_scale, channel_shift), act))
    _vstore(out_flat, at + 3 * C + c, _vactivate(_fma(acc3, channel_scale, channel_shift), act))


@_jit
def _depthwise_conv2d_rows(x, weight, scale, shift, act, stride, padding, row_padding, out, first_row, end_row):
    # out[b, i, j, c] = act(scale[c] * sum_{u, v} weight[u, v, c] * x[b, i*stride + u - padding, j*stride + v - padding,
    # c] + shift[c]), taps outside the map reading zero padding, for the output rows b * Ho + i in [first, end).
    # The sum runs in tap order (u, v) with fused multiply-adds from zero, in registers: four vectors of channels at a
    # time (four independent chains, so that each FMA need not wait for the one before), then one vector, then the
    # channels past the last whole vector one by one. SiLU and GELU are applied in the registers (to those last
    # channels in memory), gelu_tanh over the output row. A 3x3 window inside the map (all but MobileViT's edge
    # pixels) runs its nine taps as one loop of constant length, which LLVM unrolls: 0.87-0.96 of the time of the
    # two loops over the taps inside, on MobileViT's maps (bit for bit the same sums, tested). At stride 1, with C
    # whole vectors, four pixels side by side whose windows are inside go together (_depthwise_3x3_four_pixels:
    # 0.78-0.84 of the time on MobileViT's stride-1 maps in its forward, one thread; at stride 2 four at a time was
    # 1.3x slower on the 128x128x128 map, so there the pixels stay one at a time). x may be a band of a taller map's
    # rows (inverted_residual's): the windows of output row i start at x's row i * stride - row_padding, which is
    # ``padding`` for a whole map; the rows outside x read zero padding.
    _, H, W, C = x.shape
    Ho, Wo = out.shape[1], out.shape[2]
    kh, kw = weight.shape[0], weight.shape[1]
    lanes = _lanes(out)
    four_at_a_time = stride == 1 and kh == kw == 3 and C % lanes == 0
    x_flat = x.reshape(-1)
    taps = weight.reshape(-1)  # taps[(u * kw + v) * C + c] = weight[u, v, c]
    out_flat = out.reshape(-1)
    for row in range(first_row, end_row):
        b = row // Ho
        i = row % Ho
        first_u, end_u = _taps_inside(i, stride, row_padding, kh, H)
        j = 0
        while j < Wo:
            first_v, end_v = _taps_inside(j, stride, padding, kw, W)
            at = (row * Wo + j) * C
            corner = ((b * H + i * stride - row_padding) * W + j * stride - padding) * C  # x[b, i*s - rpad, j*s - pad]
            # the four 3x3 windows from j on inside the map: the first starts inside, the fourth ends inside
            if four_at_a_time and end_u - first_u == 3 and first_v == 0 and j - padding + 6 <= W:
                for c in range(0, C, lanes):
                    _depthwise_3x3_four_pixels(x_flat, taps, scale, shift, act, out_flat, corner, at, W, C, c)
                j += 4
                continue
            c = 0
            inside_3x3 = kh == 3 and kw == 3 and end_u - first_u == 3 and end_v - first_v == 3
            while c + 4 * lanes <= C:
                acc0 = acc1 = acc2 = acc3 = _vzeros(out)
                if inside_3x3:  # a 3x3 window inside the map: the nine taps in one loop of known length, unrolled
                    for uv in range(9):
                        tap = uv * C + c
                        source = corner + ((uv // 3) * W + uv % 3) * C + c
                        acc0 = _fma(_vload(taps, tap), _vload(x_flat, source), acc0)
                        acc1 = _fma(_vload(taps, tap + lanes), _vload(x_flat, source + lanes), acc1)
                        acc2 = _fma(_vload(taps, tap + 2 * lanes), _vload(x_flat, source + 2 * lanes), acc2)
                        acc3 = _fma(_vload(taps, tap + 3 * lanes), _vload(x_flat, source + 3 * lanes), acc3)
                else:
                    for u in range(first_u, end_u):
                        for v in range(first_v, end_v):
                            tap = (u * kw + v) * C + c
                            source = corner + (u * W + v) * C + c
                            acc0 = _fma(_vload(taps, tap), _vload(x_flat, source), acc0)
                            acc1 = _fma(_vload(taps, tap + lanes), _vload(x_flat, source + lanes), acc1)
                            acc2 = _fma(_vload(taps, tap + 2 * lanes), _vload(x_flat, source + 2 * lanes), acc2)
                            acc3 = _fma(_vload(taps, tap + 3 * lanes), _vload(x_flat, source + 3 * lanes), acc3)
                for k, acc in enumerate((acc0, acc1, acc2, acc3)):
                    channel = c + k * lanes
                    y = _fma(acc, _vload(scale, channel), _vload(shift, channel))
                    _vstore(out_flat, at + channel, _vactivate(y, act))
                c += 4 * lanes
            while c + lanes <= C:
                acc = _vzeros(out)
                for u in range(first_u, end_u):
                    for v in range(first_v, end_v):
                        source = corner + (u * W + v) * C + c
                        acc = _fma(_vload(taps, (u * kw + v) * C + c), _vload(x_flat, source), acc)
                _vstore(out_flat, at + c, _vactivate(_fma(acc, _vload(scale, c), _vload(shift, c)), act))
                c += lanes
            last_channels = c
            while c < C:
                total = out_flat.dtype.type(0.0)
                for u in range(first_u, end_u):
                    for v in range(first_v, end_v):
                        total = _fma(taps[(u * kw + v) * C + c], x_flat[corner + (u * W + v) * C + c], total)
                out_flat[at + c] = _fma(total, scale[c], shift[c])
                c += 1
            if act in _IN_REGISTERS and last_channels < C:
                _activate(out_flat[at + last_channels : at + C], act)
            j += 1
        if act not in _IN_REGISTERS:
            _activate(out_flat[row * Wo * C : (row + 1) * Wo * C], act)


@_jit
def _depthwise_conv2d_shared(x, weight, scale, shift, act, stride, padding, out, schedule, job):
    begin, end = take_chunk(schedule, job)
    while begin < end:
        _depthwise_conv2d_rows(x, weight, scale, shift, act, stride, padding, padding, out, begin, end)
        begin, end = take_chunk(schedule, 0)


def depthwise_conv2d(x, weight, stride=1, padding=0, scale=None, shift=None, act="none"):
    """Depthwise conv of an NHWC map (B, H, W, C), then a per-channel affine and an activation:
    ``act(F.conv2d(x, weight, None, stride, padding, groups=C) * scale + shift)`` in NCHW terms, as (B, Ho, Wo, C).

    ``weight`` is torch's (C, 1, kh, kw); ``scale`` / ``shift`` (C,) default to 1 / 0 (a BatchNorm in eval mode as
    :func:`vitnp.ops.batch_norm_scale_shift` gives them, or a folded conv's bias); ``act`` one of ``ACTIVATIONS``.
    The padding is never materialised.
    """
    if x.ndim != 4:
        raise ValueError(f"depthwise_conv2d: expected an NHWC map (B, H, W, C), got shape {x.shape}")
    x = np.ascontiguousarray(x)
    B, H, W, C = x.shape
    if weight.ndim != 4 or weight.shape[0] != C or weight.shape[1] != 1:
        expected = f"({C}, 1, kh, kw)"
        raise ValueError(f"depthwise_conv2d: weight {weight.shape} does not fit {C} channels: expected {expected}")
    if weight.dtype != x.dtype:
        raise ValueError(f"depthwise_conv2d: input dtype {x.dtype} differs from the weight's {weight.dtype}")
    kh, kw = weight.shape[2], weight.shape[3]
    Ho, Wo = _conv_output_size(H, W, kh, kw, stride, padding, "depthwise_conv2d", "map")
    taps = np.ascontiguousarray(weight.reshape(C, kh, kw).transpose(1, 2, 0))  # (kh, kw, C)
    scale = np.ones(C, x.dtype) if scale is None else np.ascontiguousarray(scale, x.dtype)
    shift = np.zeros(C, x.dtype) if shift is None else np.ascontiguousarray(shift, x.dtype)
    out = np.empty((B, Ho, Wo, C), dtype=x.dtype)
    arguments = (x, taps, scale, shift, activation_code(act), stride, padding, out)
    macs = out.size * (kh * kw + (MACS_PER_VALUE if act != "none" else 1))
    threads.run_shared(_depthwise_conv2d_shared, arguments, B * Ho, macs)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# MobileViT: the MV2 (inverted residual) block in one pass
#
# Expand 1x1 (in -> mid, SiLU), depthwise kxk at the block's stride (SiLU), project 1x1 (mid -> out) plus the
# shortcut. Run one after the other over whole maps, the expanded map (4 MiB on MobileViT-S's 64x64x256) and the
# depthwise conv's output go through memory between them. Here each thread computes its range of output rows a tile of
# a few rows at a time: the input rows the tile's windows cover are expanded into a band that stays in the L2 cache
# (the rows it shares with the tile before are moved to the band's top, not computed again), the depthwise conv runs on
# the band, and the projection on its output, adding the shortcut as it writes the tile's rows. Every value comes from
# the same kernels, in the same order, as from the three convs one by one: the same bits (tested). Measured on one
# thread, MobileViT-S's seven MV2 blocks at 256x256, each on its own: 0.63-0.67 of the time of the three convs; the
# whole forward 0.92-0.94. At batch 1 the two threads take a run of rows each (at batch 8 a thread is one image's
# forward); four runs, for balance, measured no better.
# ---------------------------------------------------------------------------------------------------------------------


@_jit
def _inverted_residual_rows(
    x, expand_panels, expand_scale, expand_shift, expand_act, taps, depthwise_scale, depthwise_shift, depthwise_act,
    stride, padding, project_panels, project_scale, project_shift, project_act, out_chs, shortcut, out, tile_rows,
    first_row, end_row,
):
    # out[b, i] for the output rows b * Ho + i in [first_row, end_row), tile_rows at a time. x (B, H, W, in); taps
    # (k, k, padded_mid), depthwise_scale and _shift (padded_mid,), zero taps and scale 1, shift 0 on the expand GEMM's
    # padding columns; project_panels (mid deep); shortcut the rows of x, or (0, 0): none; out (B, Ho, Wo, padded out).
    B, H, W, in_chs = x.shape
    _, Ho, Wo, padded_out = out.shape
    kernel_size, _, padded_mid = taps.shape
    mid = project_panels.shape[1]
    x_rows = x.reshape(B * H * W, in_chs)
    out_rows = out.reshape(B * Ho * Wo, padded_out)
    band = np.empty(((tile_rows - 1) * stride + kernel_size) * W * padded_mid, x.dtype)  # (rows, W, padded_mid)
    tile = np.empty(tile_rows * Wo * padded_mid, x.dtype)  # the depthwise conv's output, (n, Wo, padded_mid)
    compact = np.empty(tile_rows * Wo * mid if mid < padded_mid else 0, x.dtype)  # it without the padding channels
    none = np.zeros((0, 0), x.dtype)
    expand_block = _l2_block_rows(in_chs, x.itemsize)
    project_block = _l2_block_rows(mid, x.itemsize)
    image = band_top = band_bottom = -1  # the band holds the expanded input rows [band_top, band_bottom) of image
    row = first_row
    while row < end_row:
        b, i = row // Ho, row % Ho
        n = min(end_row, (b + 1) * Ho, row + tile_rows) - row  # the tile: output rows i .. i + n - 1 of image b
        top = max(0, i * stride - padding)  # the input rows their windows cover, inside the map
        bottom = min(H, (i + n - 1) * stride - padding + kernel_size)
        kept = 0
        if image == b and band_top <= top < band_bottom:  # rows the tile before expanded: to the band's top
            kept = band_bottom - top
            _copy(band[(top - band_top) * W * padded_mid : (band_bottom - band_top) * W * padded_mid], band)
        rows = bottom - top
        expanded = band[: rows * W * padded_mid].reshape(rows * W, padded_mid)
        _gemm_panels(  # expand 1x1: the band's new rows
            x_rows[(b * H + top + kept) * W : (b * H + bottom) * W], expand_panels, expand_scale, expand_shift,
            expand_act, none, expanded[kept * W :], 0, expand_panels.shape[0], expand_block, mid,
        )
        image, band_top, band_bottom = b, top, bottom
        depthwise_out = tile[: n * Wo * padded_mid].reshape(1, n, Wo, padded_mid)
        _depthwise_conv2d_rows(  # the band's windows of output row i + t start at its row t * stride - row_padding
            expanded.reshape(1, rows, W, padded_mid), taps, depthwise_scale, depthwise_shift, depthwise_act, stride,
            padding, top - (i * stride - padding), depthwise_out, 0, n,
        )
        projected = depthwise_out.reshape(n * Wo, padded_mid)
        if mid < padded_mid:  # the projection's input without the padding channels
            unpadded = compact[: n * Wo * mid].reshape(n * Wo, mid)
            _copy_leading_columns(projected, unpadded)
            projected = unpadded
        residual = shortcut[row * Wo : (row + n) * Wo] if shortcut.shape[0] else none
        _gemm_panels(  # project 1x1 (+ shortcut)
            projected, project_panels, project_scale, project_shift, project_act, residual,
            out_rows[row * Wo : (row + n) * Wo], 0, project_panels.shape[0], project_block, out_chs,
        )
        row += n


@_jit
def _inverted_residual_shared(
    x, expand_panels, expand_scale, expand_shift, expand_act, taps, depthwise_scale, depthwise_shift, depthwise_act,
    stride, padding, project_panels, project_scale, project_shift, project_act, out_chs, shortcut, out, tile_rows,
    parts, schedule, job,
):
    # The output rows of the batch cut into ``parts`` runs of rows; a chunk of runs is one run of rows, whose first
    # tile expands the rows it shares with the run before again.
    rows = out.shape[0] * out.shape[1]
    begin, end = take_chunk(schedule, job)
    while begin < end:
        _inverted_residual_rows(
            x, expand_panels, expand_scale, expand_shift, expand_act, taps, depthwise_scale, depthwise_shift,
            depthwise_act, stride, padding, project_panels, project_scale, project_shift, project_act, out_chs,
            shortcut, out, tile_rows, begin * rows // parts, end * rows // parts,
        )
        begin, end = take_chunk(schedule, 0)


def inverted_residual(x, expand, depthwise, project, stride=1, padding=1, shortcut=False, tile_rows=None):
    """MobileViT's MV2 block (timm ``BottleneckBlock``) on an NHWC map (B, H, W, in_chs), in one pass over memory:
    ``project(depthwise(expand(x))) (+ x)`` as (B, Ho, Wo, out_chs).

    ``expand`` and ``project`` are 1x1 convs as :func:`linear` takes them, ``(packed, scale, shift, act)`` with
    ``packed`` from :func:`pack_linear_weight` ((mid, in_chs) and (out_chs, mid)); ``depthwise`` is ``(weight, scale,
    shift, act)`` as :func:`depthwise_conv2d` takes them (weight (mid, 1, k, k)) with ``stride`` and ``padding``; a
    scale or shift of None is 1 or 0. ``shortcut`` adds x (stride 1, in_chs = out_chs). The same values, bit for bit,
    as ``linear``, ``depthwise_conv2d`` and ``linear`` with the residual, one after the other. ``tile_rows``, the output
    rows computed together, defaults to as many as keep their expanded rows in the L2 cache.
    """
    (expand_packed, expand_scale, expand_shift, expand_act) = expand
    (weight, depthwise_scale, depthwise_shift, depthwise_act) = depthwise
    (project_packed, project_scale, project_shift, project_act) = project
    if x.ndim != 4:
        raise ValueError(f"inverted_residual: expected an NHWC map (B, H, W, C), got shape {x.shape}")
    x = np.ascontiguousarray(x)
    B, H, W, in_chs = x.shape
    (expand_panels, mid), (project_panels, out_chs) = expand_packed, project_packed
    for name, panels, depth in (("expand", expand_panels, in_chs), ("project", project_panels, mid)):
        if panels.dtype != x.dtype:
            raise ValueError(f"inverted_residual: input dtype {x.dtype} differs from the {name} weight's "
                             f"{panels.dtype}")
        if panels.shape[1] != depth:
            raise ValueError(f"inverted_residual: the {name} weight takes {panels.shape[1]} channels, not {depth}")
    square = weight.ndim == 4 and weight.shape[2] == weight.shape[3]
    if weight.dtype != x.dtype or not square or weight.shape[:2] != (mid, 1):
        raise ValueError(
            f"inverted_residual: depthwise weight {weight.dtype} {weight.shape} does not fit {mid} {x.dtype} channels:"
            f" expected ({mid}, 1, k, k)"
        )
    if shortcut and (stride != 1 or out_chs != in_chs):
        raise ValueError(f"inverted_residual: a shortcut needs stride 1 and out_chs = in_chs, got {stride}, {out_chs}")
    if tile_rows is not None and tile_rows < 1:
        raise ValueError(f"inverted_residual: tile_rows must be at least 1, got {tile_rows}")
    kernel_size = weight.shape[2]
    Ho, Wo = _conv_output_size(H, W, kernel_size, kernel_size, stride, padding, "inverted_residual", "map")
    width = expand_panels.shape[2]
    padded_mid, padded_out = expand_panels.shape[0] * width, project_panels.shape[0] * width
    taps = np.zeros((kernel_size, kernel_size, padded_mid), x.dtype)  # (k, k, padded_mid): zero on the padding
    taps[:, :, :mid] = weight.reshape(mid, kernel_size, kernel_size).transpose(1, 2, 0)
    out = np.empty((B, Ho, Wo, padded_out), x.dtype)
    if tile_rows is None:  # a tile's band of expanded rows and its depthwise output stay in the L2 cache
        tile_rows = max(1, _L2_ROWS_BYTES // (x.itemsize * padded_mid * (stride * W + Wo)))
    parts = min(max(B, threads.get_num_threads()), B * Ho)  # at batch 1 one run of rows a thread
    arguments = (
        x, expand_panels, *_padded_scale_shift(padded_mid, mid, expand_scale, expand_shift, x.dtype),
        activation_code(expand_act), taps, _padded(depthwise_scale, 1.0, padded_mid, mid, x.dtype),
        _padded(depthwise_shift, 0.0, padded_mid, mid, x.dtype), activation_code(depthwise_act), stride, padding,
        project_panels, *_padded_scale_shift(padded_out, out_chs, project_scale, project_shift, x.dtype),
        activation_code(project_act), out_chs, x.reshape(-1, in_chs) if shortcut else np.zeros((0, 0), x.dtype), out,
        tile_rows, parts,
    )
    activations = sum(MACS_PER_VALUE for act in (expand_act, depthwise_act, project_act) if act != "none")
    macs = B * H * W * mid * in_chs + B * Ho * Wo * mid * (kernel_size**2 + out_chs) + out.size * activations
    threads.run_shared(_inverted_residual_shared, arguments, parts, macs)
    if padded_out != out_chs:  # the projection's last panel is cut short: drop its padding columns
        out = np.ascontiguousarray(out[..., :out_chs])
    return out


# The im2col matrix of a k x k conv (MobileViT's 3x3 convs run as a GEMM over it): each output pixel's row holds the
# k*k input pixels its window covers, zeros where the window hangs over the map's edge, so the padded map is never
# built; the channels of several maps side by side, so a conv on their concatenation (MobileViT's fusion conv on
# cat(shortcut, x)) never builds that either. The output rows are shared out between threads like the depthwise
# conv's. Measured on the fusion conv's 28x28 maps (96 + 96 channels), one thread: 0.18-0.26 ms against 0.24-0.37 for
# NumPy's concatenate, pad and windows copy.
#
# conv2d runs the same conv without the whole matrix: a band of output rows at a time, its im2col rows written to a
# scratch that stays in the L2 cache and the GEMM run on them right away, so that the matrix (7 MiB for the fusion conv
# of MobileViT's 32x32 maps) never goes through memory. The bands are shared out between threads.


@_jit
def _im2col_rows(maps, channels, H, W, kernel_size, stride, padding, Ho, Wo, columns, first_row, end_row):
    # columns[(row - first_row) * Wo + j, (u * k + v) * C + c] = x[b, i*stride + u - padding, j*stride + v - padding,
    # c], or 0 where that pixel is in the padding, for the output rows row = b * Ho + i in [first_row, end_row); x is
    # the maps (a tuple of (B, H, W, channels[m]) maps, each flattened) with their channels concatenated, C in all.
    # The taps (u, v), ..., (u, v + n) of one map are n consecutive pixels: with one map, one run of memory in x and in
    # the window's row.
    row_length = columns.shape[1]
    k = kernel_size
    C = row_length // (k * k)
    columns_flat = columns.reshape(-1)
    for row in range(first_row, end_row):
        b = row // Ho
        i = row % Ho
        first_u, end_u = _taps_inside(i, stride, padding, k, H)
        for j in range(Wo):
            first_v, end_v = _taps_inside(j, stride, padding, k, W)
            window = ((row - first_row) * Wo + j) * row_length
            if first_u > 0 or end_u < k or first_v > 0 or end_v < k:
                columns_flat[window : window + row_length] = 0
            channel = 0  # of the concatenation, where this map's channels start
            for m, x_flat in enumerate(maps):
                Cm = channels[m]
                for u in range(first_u, end_u):
                    corner = ((b * H + i * stride + u - padding) * W + j * stride - padding) * Cm  # x[b, h, j*s - pad]
                    if Cm == C:
                        at = window + (u * k + first_v) * C
                        source = corner + first_v * C
                        _copy(x_flat[source : source + (end_v - first_v) * C], columns_flat[at:])
                    else:
                        for v in range(first_v, end_v):
                            at = window + (u * k + v) * C + channel
                            source = corner + v * Cm
                            _copy(x_flat[source : source + Cm], columns_flat[at:])
                channel += Cm


@_jit
def _im2col_shared(maps, channels, H, W, kernel_size, stride, padding, Ho, Wo, columns, schedule, job):
    begin, end = take_chunk(schedule, job)
    while begin < end:
        _im2col_rows(maps, channels, H, W, kernel_size, stride, padding, Ho, Wo, columns[begin * Wo :], begin, end)
        begin, end = take_chunk(schedule, 0)


@_jit
def _conv2d_shared(maps, channels, H, W, kernel_size, stride, padding, Ho, Wo, panels, scale, shift, act, residual, y,
                   band_rows, n_columns, schedule, job):
    # The items are (band, panel) pairs, band by band, a band being band_rows output rows (b * Ho + i): for a run of
    # panels over a band, the band's im2col rows go to this thread's scratch (once for its panels), then _gemm_panels
    # computes those panels of the band's rows of y (B * Ho * Wo, padded columns) from them.
    n_panels, row_length, _ = panels.shape
    columns = np.empty((band_rows * Wo, row_length), y.dtype)
    block_rows = _l2_block_rows(row_length, y.itemsize)
    total_rows = y.shape[0] // Wo
    built = -1  # the band whose rows are in the scratch
    begin, end = take_chunk(schedule, job)
    while begin < end:
        for band in range(begin // n_panels, (end - 1) // n_panels + 1):
            first_row = band * band_rows
            end_row = min(first_row + band_rows, total_rows)
            top, bottom = first_row * Wo, end_row * Wo  # the band's output pixels
            if band != built:
                _im2col_rows(maps, channels, H, W, kernel_size, stride, padding, Ho, Wo, columns, first_row, end_row)
                built = band
            band_residual = residual[top:bottom] if residual.shape[0] else residual
            first_panel = max(begin - band * n_panels, 0)
            end_panel = min(end - band * n_panels, n_panels)
            _gemm_panels(
                columns[: bottom - top], panels, scale, shift, act, band_residual, y[top:bottom], first_panel,
                end_panel, block_rows, n_columns,
            )
        begin, end = take_chunk(schedule, 0)


def _conv_output_size(H, W, kh, kw, stride, padding, name, what):
    """(Ho, Wo) of a kh x kw conv over an H x W ``what`` (map or image); a clear error when the kernel does not fit."""
    Ho, Wo = ops.conv_output_size(H, kh, stride, padding), ops.conv_output_size(W, kw, stride, padding)
    if Ho < 1 or Wo < 1:
        raise ValueError(f"{name}: a {kh}x{kw} kernel does not fit a {H}x{W} {what} padded by {padding}")
    return Ho, Wo


def _check_conv_weight(panels, kernel_size, C, dtype, name):
    """A packed conv weight's panels must be ``dtype`` and take the k*k*C values of a window."""
    if panels.dtype != dtype or panels.shape[1] != kernel_size * kernel_size * C:
        raise ValueError(f"{name}: the weight ({panels.dtype}, {panels.shape[1]} inputs) does not fit a "
                         f"{kernel_size}x{kernel_size} conv over {C} {dtype} channels")


def _conv_maps(maps, kernel_size, stride, padding, name):
    """Check ``maps`` (one NHWC map or a tuple of them) for a k x k conv: (flat maps, channels per map, B, H, W, Ho,
    Wo)."""
    maps = maps if isinstance(maps, tuple) else (maps,)
    first = maps[0]
    for x in maps:
        if x.ndim != 4 or x.shape[:3] != first.shape[:3] or x.dtype != first.dtype:
            shapes = ", ".join(f"{m.dtype} {m.shape}" for m in maps)
            raise ValueError(f"{name}: expected NHWC maps (B, H, W, C) of one (B, H, W) and dtype, got {shapes}")
    if first.dtype not in (np.float32, np.float64):
        raise ValueError(f"{name}: expected float32 or float64 maps, got {first.dtype}")
    B, H, W = first.shape[:3]
    Ho, Wo = _conv_output_size(H, W, kernel_size, kernel_size, stride, padding, name, "map")
    channels = np.array([x.shape[3] for x in maps], np.int64)
    flat_maps = tuple(np.ascontiguousarray(x).reshape(-1) for x in maps)
    return flat_maps, channels, B, H, W, Ho, Wo


def im2col(maps, kernel_size, stride=1, padding=0):
    """The im2col matrix of a ``kernel_size`` x ``kernel_size`` conv with ``stride`` and zero ``padding`` over the
    channel concatenation of NHWC maps (B, H, W, C_m) (``torch.cat(maps, dim=1)`` in NCHW terms, never built):
    (B, Ho, Wo, k*k*C), each row one output pixel's window in (u, v, c) order, as ``ops.conv_windows`` of the
    concatenation reshaped; the padding is never materialised. ``maps`` is one map or a tuple of maps.
    """
    flat_maps, channels, B, H, W, Ho, Wo = _conv_maps(maps, kernel_size, stride, padding, "im2col")
    columns = np.empty((B * Ho * Wo, kernel_size * kernel_size * int(channels.sum())), flat_maps[0].dtype)
    arguments = (flat_maps, channels, H, W, kernel_size, stride, padding, Ho, Wo, columns)
    threads.run_shared(_im2col_shared, arguments, B * Ho, columns.size * MACS_PER_COPY)
    return columns.reshape(B, Ho, Wo, -1)


def conv2d(maps, packed, kernel_size, stride=1, padding=0, bias=None, act="none", scale=None, residual=None):
    """``linear(im2col(maps, kernel_size, stride, padding), packed, bias, act, scale, residual)``, the same values bit
    for bit, without the im2col matrix: a band of output rows at a time, its im2col rows in an L2-sized scratch.

    A conv with weight W (out, C, k, k) over the channel concatenation of ``maps`` (one NHWC map or a tuple), packed
    with its columns in (u, v, c) order (``pack_linear_weight`` of W as (out, k, k, C) flattened): (B, Ho, Wo, out).
    """
    flat_maps, channels, B, H, W, Ho, Wo = _conv_maps(maps, kernel_size, stride, padding, "conv2d")
    dtype = flat_maps[0].dtype
    panels, out_features = packed
    C = int(channels.sum())
    row_length = kernel_size * kernel_size * C
    _check_conv_weight(panels, kernel_size, C, dtype, "conv2d")
    n_panels, _, width = panels.shape
    padded_scale, padded_shift = _padded_scale_shift(n_panels * width, out_features, scale, bias, dtype)
    residual2 = _residual_rows(residual, (B, Ho, Wo, out_features), dtype, "conv2d")
    y = np.empty((B * Ho * Wo, n_panels * width), dtype)
    band_rows = max(1, _L2_ROWS_BYTES // (Wo * row_length * y.itemsize))  # its im2col rows stay in the L2 cache
    code = activation_code(act)
    arguments = (flat_maps, channels, H, W, kernel_size, stride, padding, Ho, Wo, panels, padded_scale, padded_shift,
                 code, residual2, y, band_rows, out_features)
    macs = B * Ho * Wo * (out_features * (row_length + (MACS_PER_VALUE if code else 0)) + row_length * MACS_PER_COPY)
    threads.run_shared(_conv2d_shared, arguments, -(-(B * Ho) // band_rows) * n_panels, macs)
    if y.shape[1] != out_features:  # the last panel is cut short: drop its padding columns
        y = np.ascontiguousarray(y[:, :out_features])
    return y.reshape(B, Ho, Wo, out_features)


# A network's first conv, on its NCHW input images (MobileViT's stem: 3x3, stride 2, 3 channels in, 16 out), read where
# they are: the sums of conv2d on the images made NHWC, in the same order, so the same values bit for bit. Each output
# vector of channels (one half of a packed weight's panel) sums the window's taps in (u, v, c) order, each pixel value
# broadcast from its channel plane; eight pixels side by side whose windows are inside the image share each weight
# load. Measured on mobilevit_s's stem, one thread: 0.28 ms against 0.98 for the NHWC copy and conv2d, whose im2col
# rows are 27 values long and whose one panel is half padding.


@_jit
def _image_conv2d_pixel(x_flat, weights, depth, width, C, H, W, kernel_size, channel_plane, top, left, vector, taps):
    # The sum over the taps inside the image, taps = (first_u, end_u, first_v, end_v), for output vector ``vector`` of
    # the pixel whose window starts at image row ``top`` and column ``left`` (either may be negative: padding);
    # channel_plane = b * C, the image's first channel plane.
    first_u, end_u, first_v, end_v = taps
    lanes = width // 2
    panel_at = (vector // 2) * depth * width + (vector % 2) * lanes
    acc = _vzeros(weights)
    for u in range(first_u, end_u):
        for v in range(first_v, end_v):
            for c in range(C):
                w = _vload(weights, panel_at + ((u * kernel_size + v) * C + c) * width)
                acc = _fma(_vbroadcast(x_flat, ((channel_plane + c) * H + top + u) * W + left + v), w, acc)
    return acc


@_jit
def _image_conv2d_rows(images, panels, scale, shift, act, kernel_size, stride, padding, y, Ho, Wo, first_row, end_row):
    # y[(b * Ho + i) * Wo + j, o] = act(scale[o] * sum_{u, v, c} W[o, c, u, v] * images[b, c, i*stride + u - padding,
    # j*stride + v - padding] + shift[o]) for the output rows b * Ho + i in [first_row, end_row), y's columns whole
    # vectors (the padding columns from the panels' zero weights). act in the registers, gelu_tanh over each row after.
    _, C, H, W = images.shape
    _, depth, width = panels.shape
    lanes = width // 2
    columns = y.shape[1]
    x_flat = images.reshape(-1)
    weights = panels.reshape(-1)
    y_flat = y.reshape(-1)
    k = kernel_size
    for row in range(first_row, end_row):
        b = row // Ho
        i = row % Ho
        top = i * stride - padding
        first_u, end_u = _taps_inside(i, stride, padding, k, H)
        j = 0
        while j < Wo:
            first_v, end_v = _taps_inside(j, stride, padding, k, W)
            left = j * stride - padding
            at = (row * Wo + j) * columns
            if end_u - first_u == k and first_v == 0 and left + 7 * stride + k <= W:  # eight windows inside the image
                for vector in range(columns // lanes):
                    panel_at = (vector // 2) * depth * width + (vector % 2) * lanes
                    acc0 = acc1 = acc2 = acc3 = acc4 = acc5 = acc6 = acc7 = _vzeros(y)
                    for u in range(k):
                        for v in range(k):
                            for c in range(C):
                                w = _vload(weights, panel_at + ((u * k + v) * C + c) * width)  # W[o..., c, u, v]
                                source = ((b * C + c) * H + top + u) * W + left + v  # images[b, c, top + u, left + v]
                                acc0 = _fma(_vbroadcast(x_flat, source), w, acc0)
                                acc1 = _fma(_vbroadcast(x_flat, source + stride), w, acc1)
                                acc2 = _fma(_vbroadcast(x_flat, source + 2 * stride), w, acc2)
                                acc3 = _fma(_vbroadcast(x_flat, source + 3 * stride), w, acc3)
                                acc4 = _fma(_vbroadcast(x_flat, source + 4 * stride), w, acc4)
                                acc5 = _fma(_vbroadcast(x_flat, source + 5 * stride), w, acc5)
                                acc6 = _fma(_vbroadcast(x_flat, source + 6 * stride), w, acc6)
                                acc7 = _fma(_vbroadcast(x_flat, source + 7 * stride), w, acc7)
                    o = vector * lanes
                    vector_scale, vector_shift = _vload(scale, o), _vload(shift, o)
                    for p, acc in enumerate((acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7)):
                        _vstore(y_flat, at + p * columns + o, _vactivate(_fma(acc, vector_scale, vector_shift), act))
                j += 8
            else:
                taps = (first_u, end_u, first_v, end_v)
                for vector in range(columns // lanes):
                    acc = _image_conv2d_pixel(x_flat, weights, depth, width, C, H, W, k, b * C, top, left, vector, taps)
                    o = vector * lanes
                    _vstore(y_flat, at + o, _vactivate(_fma(acc, _vload(scale, o), _vload(shift, o)), act))
                j += 1
        if act not in _IN_REGISTERS:
            _activate(y_flat[row * Wo * columns : (row + 1) * Wo * columns], act)


@_jit
def _image_conv2d_shared(images, panels, scale, shift, act, kernel_size, stride, padding, y, Ho, Wo, schedule, job):
    begin, end = take_chunk(schedule, job)
    while begin < end:
        _image_conv2d_rows(images, panels, scale, shift, act, kernel_size, stride, padding, y, Ho, Wo, begin, end)
        begin, end = take_chunk(schedule, 0)


def image_conv2d(images, packed, kernel_size, stride=1, padding=0, bias=None, act="none", scale=None):
    """:func:`conv2d` on NCHW images (B, C, H, W), read in place: ``conv2d(images.transpose(0, 2, 3, 1), packed, ...)``,
    the same values bit for bit, as (B, Ho, Wo, out) NHWC, without the NHWC copy of the images. For a network's first
    conv, on its input (few channels, each read from its own plane).
    """
    if images.ndim != 4 or images.dtype not in (np.float32, np.float64):
        raise ValueError(f"image_conv2d: expected float32 or float64 NCHW images (B, C, H, W), got {images.dtype} "
                         f"{images.shape}")
    images = np.ascontiguousarray(images)
    B, C, H, W = images.shape
    panels, out_features = packed
    _check_conv_weight(panels, kernel_size, C, images.dtype, "image_conv2d")
    Ho, Wo = _conv_output_size(H, W, kernel_size, kernel_size, stride, padding, "image_conv2d", "image")
    n_panels, _, width = panels.shape
    lanes = width // 2
    padded_scale, padded_shift = _padded_scale_shift(n_panels * width, out_features, scale, bias, images.dtype)
    y = np.empty((B * Ho * Wo, -(-out_features // lanes) * lanes), images.dtype)  # whole vectors of channels
    code = activation_code(act)
    arguments = (images, panels, padded_scale, padded_shift, code, kernel_size, stride, padding, y, Ho, Wo)
    macs = y.size * (panels.shape[1] + (MACS_PER_VALUE if code else 0))
    threads.run_shared(_image_conv2d_shared, arguments, B * Ho, macs)
    if y.shape[1] != out_features:  # the last vector is cut short: drop its padding columns
        y = np.ascontiguousarray(y[:, :out_features])
    return y.reshape(B, Ho, Wo, out_features)


# ---------------------------------------------------------------------------------------------------------------------
# Attention: softmax(q k^T + bias + mask) v for every head, on the GEMM above
#
# One (image or window, head) pair is one item of work: its q (scaled), k and v are gathered out of the qkv Linear's
# output, k into panels (k's rows are the output columns of q k^T) and v into panels (v's columns are the output
# columns of attn v); the scores' rows are padded with zero columns to whole panels, which attn v then multiplies by
# zero rows of v's panels. The items are shared out between threads like a GEMM's panels. Per item this is the
# sequence of the seeds' Attention.forward: q * scale, q @ k^T, (+ bias, + mask), softmax, @ v.
# ---------------------------------------------------------------------------------------------------------------------


@_jit
def _attention_items(qkv, scale, bias, mask, out, width, first_item, end_item):
    # qkv (B, N, 3, heads, head_dim); bias (heads, N, N) or (0, 0, 0): none; mask (nW, N, N) or (0, 0, 0): none,
    # window b of the batch takes mask[b % nW]; out (B, N, heads, head_dim). Items b * heads + h in [first, end).
    B, N, _, heads, head_dim = qkv.shape
    key_panels_count = -(-N // width)
    padded_keys = key_panels_count * width
    value_panels_count = -(-head_dim // width)
    q = np.empty((N, head_dim), qkv.dtype)
    key_panels = np.zeros((key_panels_count, head_dim, width), qkv.dtype)  # [p, d, c] = k[p * width + c, d]
    value_panels = np.zeros((value_panels_count, padded_keys, width), qkv.dtype)  # [p, j, c] = v[j, p * width + c]
    attn = np.empty((N, padded_keys), qkv.dtype)
    head_out = np.empty((N, value_panels_count * width), qkv.dtype)
    ones = np.ones(max(padded_keys, value_panels_count * width), qkv.dtype)  # the products' scale and shift: none
    zeros = np.zeros(max(padded_keys, value_panels_count * width), qkv.dtype)
    none = np.zeros((0, 0), qkv.dtype)  # no residual
    q_block_rows = _l2_block_rows(head_dim, qkv.itemsize)
    attn_block_rows = _l2_block_rows(padded_keys, qkv.itemsize)
    for item in range(first_item, end_item):
        b = item // heads
        h = item % heads
        for i in range(N):  # (1-D rows, loops from 0: the copies vectorise)
            q_i, k_i, v_i = qkv[b, i, 0, h], qkv[b, i, 1, h], qkv[b, i, 2, h]  # (head_dim,) each
            q_row = q[i]
            for d in range(head_dim):
                q_row[d] = q_i[d] * scale
            key_column = key_panels[i // width, :, i % width]
            for d in range(head_dim):
                key_column[d] = k_i[d]
            for p in range(value_panels_count):
                _copy(v_i[p * width : (p + 1) * width], value_panels[p, i])
        _gemm_panels(q, key_panels, ones, zeros, 0, none, attn, 0, key_panels_count, q_block_rows, N)  # q k^T, 0 past N
        for i in range(N):
            scores = attn[i, :N]  # contiguous: the loops below vectorise
            if bias.shape[0]:
                scores += bias[h, i]
            if mask.shape[0]:
                scores += mask[b % mask.shape[0], i]
            _softmax_row(scores)
        _gemm_panels(  # @ v
            attn, value_panels, ones, zeros, 0, none, head_out, 0, value_panels_count, attn_block_rows, head_dim
        )
        for i in range(N):
            _copy(head_out[i, :head_dim], out[b, i, h])


@_jit
def _attention_shared(qkv, scale, bias, mask, out, width, schedule, job):
    begin, end = take_chunk(schedule, job)
    while begin < end:
        _attention_items(qkv, scale, bias, mask, out, width, begin, end)
        begin, end = take_chunk(schedule, 0)


def attention(qkv, scale, bias=None, mask=None):
    """Multi-head self-attention of a qkv Linear's output ``qkv`` (B, N, 3, heads, head_dim): for each image (or
    window) b and head h, ``softmax((q * scale) @ k^T + bias[h] + mask[b % nW]) @ v``, as (B, N, heads, head_dim).

    ``bias`` (heads, N, N) (Swin's relative position bias) and ``mask`` (nW, N, N) (Swin's shifted-window mask) are
    optional. Each (b, h) is computed as in torch, q scaled first; the products on :func:`linear`'s GEMM.
    """
    qkv = np.ascontiguousarray(qkv)
    if qkv.ndim != 5 or qkv.shape[2] != 3:
        raise ValueError(f"attention: expected qkv of shape (B, N, 3, heads, head_dim), got {qkv.shape}")
    B, N, _, heads, head_dim = qkv.shape
    none = np.zeros((0, 0, 0), qkv.dtype)
    bias = none if bias is None else np.ascontiguousarray(bias, qkv.dtype)
    mask = none if mask is None else np.ascontiguousarray(mask, qkv.dtype)
    if bias.shape[0] and bias.shape != (heads, N, N):
        raise ValueError(f"attention: bias must be ({heads}, {N}, {N}), got {bias.shape}")
    if mask.shape[0] and (mask.shape[1:] != (N, N) or B % mask.shape[0]):
        raise ValueError(f"attention: mask must be (nW, {N}, {N}) with nW dividing {B}, got {mask.shape}")
    out = np.empty((B, N, heads, head_dim), qkv.dtype)
    width = _panel_width(qkv.dtype)
    arguments = (qkv, qkv.dtype.type(scale), bias, mask, out, width)
    threads.run_shared(_attention_shared, arguments, B * heads, B * heads * N * N * (2 * head_dim + MACS_PER_VALUE))
    return out


# ---------------------------------------------------------------------------------------------------------------------
# MobileViT: a transformer block over many short sequences, a chunk of sequences at a time
#
# MobileViT's transformers run on patch_size^2 sequences an image (4 at batch 1) of 16 to 256 tokens: ops of tens to
# hundreds of microseconds, too small to share out one by one; run as one chunk of sequences per thread, from Python,
# the two threads waited on each other for the GIL between ops (stage 4's transformer was no faster on two threads than
# on one). Here a chunk of whole sequences goes through the whole block in one call that holds no GIL: the same
# kernels on the same rows as layers.Block's steps, so the same bits (tested).
# ---------------------------------------------------------------------------------------------------------------------


@_jit
def _linear_rows(x, panels, scale, shift, act, residual, out_features):
    # linear()'s product of rows x (rows, depth) on this thread alone, as (rows, out_features)
    rows, depth = x.shape
    y = np.empty((rows, panels.shape[0] * panels.shape[2]), x.dtype)
    _gemm_panels(x, panels, scale, shift, act, residual, y, 0, panels.shape[0], _l2_block_rows(depth, x.itemsize),
                 out_features)
    if y.shape[1] == out_features:
        return y
    unpadded = np.empty((rows, out_features), x.dtype)  # the last panel is cut short: drop its padding columns
    _copy_leading_columns(y, unpadded)
    return unpadded


@_jit
def _transformer_block_sequences(
    x, norm1_weight, norm1_bias, norm1_eps, qkv_panels, qkv_scale, qkv_shift, proj_panels, proj_scale, proj_shift,
    norm2_weight, norm2_bias, norm2_eps, fc1_panels, fc1_scale, fc1_shift, act, fc2_panels, fc2_scale, fc2_shift,
    heads, attention_scale, out, first, end,
):
    # out[s] = layers.Block's forward of sequence x[s] (N, dim) for s in [first, end)
    _, N, dim = x.shape
    head_dim = dim // heads
    sequences = end - first
    rows = sequences * N
    none = np.zeros((0, 0), x.dtype)
    x_rows = x[first:end].reshape(rows, dim)
    h = np.empty((rows, dim), x.dtype)
    _layer_norm_rows(x_rows, norm1_weight, norm1_bias, norm1_eps, h)  # norm1(x)
    qkv = _linear_rows(h, qkv_panels, qkv_scale, qkv_shift, 0, none, 3 * dim)
    attended = np.empty((sequences, N, heads, head_dim), x.dtype)  # softmax((q * scale) @ k^T) @ v per head
    no_bias = np.zeros((0, 0, 0), x.dtype)
    qkv = qkv.reshape(sequences, N, 3, heads, head_dim)  # (sequences, N, 3, heads, head_dim), as Attention's
    _attention_items(qkv, attention_scale, no_bias, no_bias, attended, qkv_panels.shape[2], 0, sequences * heads)
    x_rows = _linear_rows(attended.reshape(rows, dim), proj_panels, proj_scale, proj_shift, 0, x_rows, dim)  # x + attn
    _layer_norm_rows(x_rows, norm2_weight, norm2_bias, norm2_eps, h)  # norm2(x)
    hidden = _linear_rows(h, fc1_panels, fc1_scale, fc1_shift, act, none, fc2_panels.shape[1])  # act(fc1(.))
    x_rows = _linear_rows(hidden, fc2_panels, fc2_scale, fc2_shift, 0, x_rows, dim)  # x + fc2(.)
    out_rows = out[first:end].reshape(rows, dim)
    for r in range(rows):
        _copy(x_rows[r], out_rows[r])


@_jit
def _transformer_block_shared(
    x, norm1_weight, norm1_bias, norm1_eps, qkv_panels, qkv_scale, qkv_shift, proj_panels, proj_scale, proj_shift,
    norm2_weight, norm2_bias, norm2_eps, fc1_panels, fc1_scale, fc1_shift, act, fc2_panels, fc2_scale, fc2_shift,
    heads, attention_scale, out, schedule, job,
):
    begin, end = take_chunk(schedule, job)
    while begin < end:
        _transformer_block_sequences(
            x, norm1_weight, norm1_bias, norm1_eps, qkv_panels, qkv_scale, qkv_shift, proj_panels, proj_scale,
            proj_shift, norm2_weight, norm2_bias, norm2_eps, fc1_panels, fc1_scale, fc1_shift, act, fc2_panels,
            fc2_scale, fc2_shift, heads, attention_scale, out, begin, end,
        )
        begin, end = take_chunk(schedule, 0)


def transformer_block(x, norm1, qkv, proj, norm2, fc1, fc2, num_heads, scale, act):
    """timm's pre-norm transformer ``Block`` (:class:`vitnp.layers.Block`) on sequences x (S, N, dim), a chunk of whole
    sequences per call, the chunks shared out between threads: x = x + proj(attention(qkv(norm1(x)))), then x = x +
    fc2(act(fc1(norm2(x)))). The same bits as the block's ops one by one.

    ``norm1``, ``norm2``: (weight, bias, eps) of the LayerNorms; ``qkv``, ``proj``, ``fc1``, ``fc2``: (packed, bias)
    of the Linears, packed by :func:`pack_linear_weight` (bias None: none); ``scale`` the attention's (q * scale);
    ``act`` fc1's activation.
    """
    if x.ndim != 3:
        raise ValueError(f"transformer_block: expected sequences (S, N, dim), got shape {x.shape}")
    x = np.ascontiguousarray(x)
    S, N, dim = x.shape
    if dim % num_heads:
        raise ValueError(f"transformer_block: dim {dim} is not divisible by num_heads {num_heads}")
    for name, (weight, bias, _) in (("norm1", norm1), ("norm2", norm2)):
        if weight.shape != (dim,) or bias.shape != (dim,):
            raise ValueError(f"transformer_block: {name} weight {weight.shape} and bias {bias.shape} do not fit dim "
                             f"{dim}")
    linears = {}
    for name, (packed, bias), (depth, out_features) in zip(
        ("qkv", "proj", "fc1", "fc2"), (qkv, proj, fc1, fc2),
        ((dim, 3 * dim), (dim, dim), (dim, fc1[0].out_features), (fc1[0].out_features, dim)),
    ):
        panels = packed.panels
        if panels.dtype != x.dtype or panels.shape[1] != depth or packed.out_features != out_features:
            raise ValueError(
                f"transformer_block: {name} weight {panels.dtype} ({packed.out_features}, {panels.shape[1]}) does not"
                f" fit {x.dtype} sequences of dim {dim}: expected ({out_features}, {depth})"
            )
        padded_columns = panels.shape[0] * panels.shape[2]
        linears[name] = (panels, *_padded_scale_shift(padded_columns, out_features, None, bias, x.dtype))
    out = np.empty_like(x)
    arguments = (
        x, *norm1, *linears["qkv"], *linears["proj"], *norm2, *linears["fc1"], activation_code(act),
        *linears["fc2"], num_heads, x.dtype.type(scale), out,
    )
    hidden = fc1[0].out_features
    values = num_heads * N + hidden + 2 * dim  # a token's softmax, activation and LayerNorm values
    macs = S * N * (dim * (4 * dim + 2 * hidden) + 2 * N * dim + MACS_PER_VALUE * values)
    threads.run_shared(_transformer_block_shared, arguments, S, macs)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# MobileViT: 3x3 convs at stride 1 by Winograd's F(2x2, 3x3)
#
# Each 2x2 block of output pixels is A^T [(G g G^T) . (B^T d B)] A for its 4x4 input window d (Lavin and Gray, 2016):
# the window's 16 transformed values per channel, times the 16 transformed weights, summed over the channels, then
# the output transform. The 16 sums over the channels are 16 GEMMs (tiles x C) @ (C x out) on linear()'s kernel, 16
# products a 2x2 block where the direct conv has 36: 2.25x fewer multiply-adds for the same adds of the transforms.
# Not the direct conv's bits: the transforms add and subtract window values (exact for the weights' factors 1/2 and
# 1, rounded once each as values of the input's size), so the error is a few ulp of the largest input, as a GEMM's
# reordered sums; measured ~2e-6 of the output's size in float32 against the direct conv. Measured on one thread,
# MobileViT-S's six 3x3 convs (32x32 to 8x8 maps, 96 to 320 channels): 0.50-0.59 of the direct conv's time.
# ---------------------------------------------------------------------------------------------------------------------

_WINOGRAD_G = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]])  # 4x3


def pack_winograd_weight(weight):
    """A 3x3 conv weight (out, C, 3, 3) for :func:`winograd_conv3x3`: its 16 transformed matrices G g G^T (computed in
    float64, rounded once), each packed as a Linear weight (out, C) with C padded to whole vectors by zero columns."""
    weight = np.asarray(weight)
    if weight.ndim != 4 or weight.shape[2:] != (3, 3) or weight.dtype not in (np.float32, np.float64):
        raise ValueError(f"expected a float32 or float64 3x3 conv weight (out, C, 3, 3), got {weight.dtype} "
                         f"{weight.shape}")
    out_features, C = weight.shape[:2]
    lanes = _panel_width(weight.dtype) // 2
    padded_C = -(-C // lanes) * lanes
    transformed = np.zeros((4, 4, out_features, padded_C))
    transformed[..., :C] = np.einsum("ij,ocjk,lk->iloc", _WINOGRAD_G, weight.astype(np.float64), _WINOGRAD_G)
    transformed = transformed.astype(weight.dtype)
    panels = np.stack([pack_linear_weight(transformed[i, l]).panels for i in range(4) for l in range(4)])
    return PackedWeight(panels, out_features)  # panels (16, n_panels, padded_C, width)


@numba.njit(cache=True, nogil=True, inline="always")
def _window_vector(x_flat, b, r, q, H, W, Cm, c):
    # channels c .. c + lanes of pixel (r, q) of image b of a map of Cm channels (flattened), zeros in the padding
    if r < 0 or r >= H or q < 0 or q >= W:
        return _vzeros(x_flat)
    return _vload(x_flat, ((b * H + r) * W + q) * Cm + c)


@numba.njit(cache=True, nogil=True, inline="always")
def _times_bt(d0, d1, d2, d3):
    # B^T (d0, d1, d2, d3) for B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], lane by lane
    return _vsub(d0, d2), _vadd(d1, d2), _vsub(d2, d1), _vsub(d1, d3)


@_jit
def _winograd_input_rows(maps, channels, H, W, V, first_tile_row, end_tile_row):
    # V[k, t, c] = (B^T d B)[k // 4, k % 4] for tile t's 4x4 window d of channel c (the maps' channels concatenated,
    # each map whole vectors of channels), for the tile rows b * th + ty in [first, end): the window of tile (ty, tx)
    # starts at pixel (2 ty - 1, 2 tx - 1), zero outside the map. B^T goes over the window's columns, then B over the
    # rows of that, a vector of channels at a time, in registers.
    th, tw = (H + 1) // 2, (W + 1) // 2
    tiles, padded_C = V.shape[1], V.shape[2]
    plane = tiles * padded_C  # from V[k] to V[k + 1]
    V_flat = V.reshape(-1)
    lanes = _lanes(V)
    for tile_row in range(first_tile_row, end_tile_row):
        b, ty = tile_row // th, tile_row % th
        r = 2 * ty - 1  # the window's first row and column
        for tx in range(tw):
            q = 2 * tx - 1
            channel = 0  # of the concatenation, where this map's channels start
            for m, x_flat in enumerate(maps):
                Cm = channels[m]
                for c in range(0, Cm, lanes):
                    t00, t10, t20, t30 = _times_bt(  # B^T d, column by column
                        _window_vector(x_flat, b, r, q, H, W, Cm, c),
                        _window_vector(x_flat, b, r + 1, q, H, W, Cm, c),
                        _window_vector(x_flat, b, r + 2, q, H, W, Cm, c),
                        _window_vector(x_flat, b, r + 3, q, H, W, Cm, c),
                    )
                    t01, t11, t21, t31 = _times_bt(
                        _window_vector(x_flat, b, r, q + 1, H, W, Cm, c),
                        _window_vector(x_flat, b, r + 1, q + 1, H, W, Cm, c),
                        _window_vector(x_flat, b, r + 2, q + 1, H, W, Cm, c),
                        _window_vector(x_flat, b, r + 3, q + 1, H, W, Cm, c),
                    )
                    t02, t12, t22, t32 = _times_bt(
                        _window_vector(x_flat, b, r, q + 2, H, W, Cm, c),
                        _window_vector(x_flat, b, r + 1, q + 2, H, W, Cm, c),
                        _window_vector(x_flat, b, r + 2, q + 2, H, W, Cm, c),
                        _window_vector(x_flat, b, r + 3, q + 2, H, W, Cm, c),
                    )
                    t03, t13, t23, t33 = _times_bt(
                        _window_vector(x_flat, b, r, q + 3, H, W, Cm, c),
                        _window_vector(x_flat, b, r + 1, q + 3, H, W, Cm, c),
                        _window_vector(x_flat, b, r + 2, q + 3, H, W, Cm, c),
                        _window_vector(x_flat, b, r + 3, q + 3, H, W, Cm, c),
                    )
                    at = (tile_row * tw + tx) * padded_C + channel + c
                    for i, (e0, e1, e2, e3) in enumerate(((t00, t01, t02, t03), (t10, t11, t12, t13),
                                                          (t20, t21, t22, t23), (t30, t31, t32, t33))):
                        v0, v1, v2, v3 = _times_bt(e0, e1, e2, e3)  # (B^T d) B, row i
                        _vstore(V_flat, at + (4 * i) * plane, v0)
                        _vstore(V_flat, at + (4 * i + 1) * plane, v1)
                        _vstore(V_flat, at + (4 * i + 2) * plane, v2)
                        _vstore(V_flat, at + (4 * i + 3) * plane, v3)
                channel += Cm


@_jit
def _winograd_input_shared(maps, channels, H, W, V, schedule, job):
    begin, end = take_chunk(schedule, job)
    while begin < end:
        _winograd_input_rows(maps, channels, H, W, V, begin, end)
        begin, end = take_chunk(schedule, 0)


@_jit
def _winograd_products_shared(V, panels, ones, zeros, M, out_features, schedule, job):
    # M[k] = V[k] @ U[k]^T for the items k * n_panels + p (panel p of product k)
    n_panels = panels.shape[1]
    none = np.zeros((0, 0), V.dtype)
    block_rows = _l2_block_rows(V.shape[2], V.itemsize)
    begin, end = take_chunk(schedule, job)
    while begin < end:
        for k in range(begin // n_panels, (end - 1) // n_panels + 1):
            first_panel, end_panel = max(begin - k * n_panels, 0), min(end - k * n_panels, n_panels)
            _gemm_panels(V[k], panels[k], ones, zeros, 0, none, M[k], first_panel, end_panel, block_rows, out_features)
        begin, end = take_chunk(schedule, 0)


@_jit
def _winograd_output_rows(M, scale, shift, act, out, first_tile_row, end_tile_row):
    # out's 2x2 block of tile (ty, tx) = act((A^T m A) * scale + shift) for its 16 products m (4x4), A^T = [[1, 1, 1,
    # 0], [0, 1, -1, -1]]; the block's pixels past the map's last row or column are not written.
    _, H, W, padded_out = out.shape
    th, tw = (H + 1) // 2, (W + 1) // 2
    plane = M.shape[1] * padded_out
    M_flat = M.reshape(-1)
    out_flat = out.reshape(-1)
    lanes = _lanes(out)
    m = np.empty(16 * lanes, out.dtype)
    for tile_row in range(first_tile_row, end_tile_row):
        b, ty = tile_row // th, tile_row % th
        for tx in range(tw):
            t = tile_row * tw + tx
            for o in range(0, padded_out, lanes):
                for k in range(16):
                    _vstore(m, k * lanes, _vload(M_flat, k * plane + t * padded_out + o))
                for j in range(4):  # A^T m: rows 0 + 1 + 2 and 1 - 2 - 3 of each column, into rows 0 and 1
                    m0, m1 = _vload(m, j * lanes), _vload(m, (4 + j) * lanes)
                    m2, m3 = _vload(m, (8 + j) * lanes), _vload(m, (12 + j) * lanes)
                    _vstore(m, j * lanes, _vadd(_vadd(m0, m1), m2))
                    _vstore(m, (4 + j) * lanes, _vsub(_vsub(m1, m2), m3))
                channel_scale, channel_shift = _vload(scale, o), _vload(shift, o)
                for i in range(2):  # (A^T m) A on rows 0 and 1: out pixel (2 ty + i, 2 tx + j)
                    r = 2 * ty + i
                    if r < H:
                        s0, s1 = _vload(m, i * 4 * lanes), _vload(m, (i * 4 + 1) * lanes)
                        s2, s3 = _vload(m, (i * 4 + 2) * lanes), _vload(m, (i * 4 + 3) * lanes)
                        at = ((b * H + r) * W + 2 * tx) * padded_out + o
                        y = _fma(_vadd(_vadd(s0, s1), s2), channel_scale, channel_shift)
                        _vstore(out_flat, at, _vactivate(y, act))
                        if 2 * tx + 1 < W:
                            y = _fma(_vsub(_vsub(s1, s2), s3), channel_scale, channel_shift)
                            _vstore(out_flat, at + padded_out, _vactivate(y, act))
            if act not in _IN_REGISTERS:
                for i in range(2):
                    r = 2 * ty + i
                    if r < H:
                        at = ((b * H + r) * W + 2 * tx) * padded_out
                        _activate(out_flat[at : at + min(2, W - 2 * tx) * padded_out], act)


@_jit
def _winograd_output_shared(M, scale, shift, act, out, schedule, job):
    begin, end = take_chunk(schedule, job)
    while begin < end:
        _winograd_output_rows(M, scale, shift, act, out, begin, end)
        begin, end = take_chunk(schedule, 0)


def winograd_conv3x3(maps, packed, bias=None, act="none", scale=None):
    """A 3x3 conv at stride 1 with padding 1 on the channel concatenation of ``maps`` (one NHWC map or a tuple), then
    a per-output-channel scale and shift (``bias``) and an activation, by Winograd's F(2x2, 3x3): the values of
    :func:`conv2d` to a few ulp of the inputs' size (not bit for bit), in 4/9 of its multiply-adds. ``packed`` from
    :func:`pack_winograd_weight`. (B, H, W, out).
    """
    flat_maps, channels, B, H, W, _, _ = _conv_maps(maps, 3, 1, 1, "winograd_conv3x3")
    dtype = flat_maps[0].dtype
    panels, out_features = packed
    C = int(channels.sum())
    lanes = _panel_width(dtype) // 2
    padded_C = -(-C // lanes) * lanes
    if np.any(channels % lanes):  # the kernel reads whole vectors of a map's channels: one map, zeros up to padded_C
        padded = np.zeros((B, H, W, padded_C), dtype)
        padded[..., :C] = np.concatenate([m.reshape(B, H, W, -1) for m in flat_maps], axis=-1)
        flat_maps, channels = (padded.reshape(-1),), np.array([padded_C], np.int64)
    if panels.ndim != 4 or panels.shape[0] != 16 or panels.dtype != dtype or panels.shape[2] != padded_C:
        raise ValueError(f"winograd_conv3x3: the packed weight {panels.dtype} {panels.shape} does not fit {C} {dtype} "
                         f"channels (pack_winograd_weight of a (out, {C}, 3, 3) weight)")
    th, tw = (H + 1) // 2, (W + 1) // 2
    tiles = B * th * tw
    n_panels, _, width = panels.shape[1:]
    padded_out = n_panels * width
    V = np.empty((16, tiles, padded_C), dtype)
    threads.run_shared(_winograd_input_shared, (flat_maps, channels, H, W, V), B * th, V.size * MACS_PER_COPY)
    M = np.empty((16, tiles, padded_out), dtype)
    ones, zeros = _constant_vector(1.0, padded_out, np.dtype(dtype)), _constant_vector(0.0, padded_out, np.dtype(dtype))
    macs = 16 * tiles * padded_C * out_features
    threads.run_shared(_winograd_products_shared, (V, panels, ones, zeros, M, out_features), 16 * n_panels, macs)
    out = np.empty((B, H, W, padded_out), dtype)
    padded_scale, padded_shift = _padded_scale_shift(padded_out, out_features, scale, bias, dtype)
    code = activation_code(act)
    arguments = (M, padded_scale, padded_shift, code, out)
    threads.run_shared(_winograd_output_shared, arguments, B * th, out.size * (4 + (MACS_PER_VALUE if code else 0)))
    if padded_out != out_features:  # the last panel is cut short: drop its padding columns
        out = np.ascontiguousarray(out[..., :out_features])
    return out
