"""Vector math for the engine's kernels: SIMD registers as a Numba type, the few LLVM vector operations the kernels
need, and float32 exp / erf that vectorise.

Numba has no vector type; :class:`Vector` is LLVM's ``<lanes x float>`` (a 32-byte AVX register, 64 bytes on a CPU
with AVX-512), and the intrinsics below load, store, broadcast, add and fuse multiply-adds on it. ``math.exp`` /
``math.erf`` are scalar libm calls that LLVM cannot vectorise; the float32 kernels use the polynomials here instead,
within 2 ulp of exp and 1.5e-9 of erf. Every kernel built on them keeps IEEE semantics (no fastmath) and is cached on
disk.
"""

import math

import llvmlite.binding
import llvmlite.ir
import numba
import numpy as np
from numba.core import cgutils
from numba.extending import intrinsic, models, overload, register_model

from .schedule import element_pointer

# error_model="numpy": x / 0 gives inf or nan as in NumPy (IEEE) instead of raising, which also lets LLVM vectorise
# loops that divide (Python's error model branches on every divisor).
jit = numba.njit(cache=True, nogil=True, error_model="numpy")


# ---------------------------------------------------------------------------------------------------------------------
# SIMD registers
#
# A vector of float32 or float64 lanes as a Numba type, and the LLVM operations on it the kernels use; fma also on
# plain floats (one rounding, which strict IEEE order would otherwise keep as a multiply and an add).
# ---------------------------------------------------------------------------------------------------------------------

VECTOR_BYTES = 64 if llvmlite.binding.get_host_cpu_features().get("avx512f", False) else 32
I32 = llvmlite.ir.IntType(32)


class Vector(numba.types.Type):
    """A SIMD register of float32 or float64 lanes, LLVM's ``<lanes x float>``."""

    def __init__(self, dtype, lanes=None):
        self.dtype = dtype
        self.lanes = lanes or VECTOR_BYTES * 8 // dtype.bitwidth  # a whole register unless told
        super().__init__(name=f"vector({dtype} x {self.lanes})")


@register_model(Vector)
class _VectorModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        element = llvmlite.ir.FloatType() if fe_type.dtype == numba.types.float32 else llvmlite.ir.DoubleType()
        super().__init__(dmm, fe_type, llvmlite.ir.VectorType(element, fe_type.lanes))


@intrinsic
def vload(typingctx, array, index):
    """The vector ``array[index : index + lanes]``."""
    vector = Vector(array.dtype)

    def codegen(context, builder, signature, args):
        pointer = element_pointer(context, builder, signature.args[0], *args)
        vector_pointer = builder.bitcast(pointer, context.get_value_type(vector).as_pointer())
        return builder.load(vector_pointer, align=vector.dtype.bitwidth // 8)

    return vector(array, index), codegen


@intrinsic
def vbroadcast(typingctx, array, index):
    """``array[index]`` in every lane."""
    vector = Vector(array.dtype)

    def codegen(context, builder, signature, args):
        scalar = builder.load(element_pointer(context, builder, signature.args[0], *args))
        vector_type = context.get_value_type(vector)
        one_lane = builder.insert_element(llvmlite.ir.Constant(vector_type, None), scalar, I32(0))
        every_lane = llvmlite.ir.Constant(llvmlite.ir.VectorType(I32, vector.lanes), [0] * vector.lanes)
        return builder.shuffle_vector(one_lane, one_lane, every_lane)

    return vector(array, index), codegen


@intrinsic
def vadd(typingctx, a, b):
    """``a + b`` lane by lane, for two vectors of one type."""
    if not (a == b and isinstance(a, Vector)):
        return None

    def codegen(context, builder, signature, args):
        return builder.fadd(*args)

    return a(a, b), codegen


@intrinsic
def vsub(typingctx, a, b):
    """``a - b`` lane by lane, for two vectors of one type."""
    if not (a == b and isinstance(a, Vector)):
        return None

    def codegen(context, builder, signature, args):
        return builder.fsub(*args)

    return a(a, b), codegen


@intrinsic
def vector_lanes(typingctx, array):
    """The number of lanes of a vector of ``array``'s dtype (a compile-time constant)."""
    lanes = Vector(array.dtype).lanes

    def codegen(context, builder, signature, args):
        return context.get_constant(numba.types.intp, lanes)

    return numba.types.intp(array), codegen


@intrinsic
def vzeros(typingctx, array):
    """A vector of zeros of ``array``'s dtype."""
    vector = Vector(array.dtype)

    def codegen(context, builder, signature, args):
        return llvmlite.ir.Constant(context.get_value_type(vector), None)

    return vector(array), codegen


@intrinsic
def vstore(typingctx, array, index, vector):
    """``array[index : index + lanes] = vector``."""

    def codegen(context, builder, signature, args):
        array_value, index_value, vector_value = args
        pointer = element_pointer(context, builder, signature.args[0], array_value, index_value)
        vector_pointer = builder.bitcast(pointer, vector_value.type.as_pointer())
        builder.store(vector_value, vector_pointer, align=vector.dtype.bitwidth // 8)
        return context.get_dummy_value()

    return numba.types.void(array, index, vector), codegen


@intrinsic
def vmul(typingctx, a, b):
    """``a * b`` lane by lane, for two vectors of one type."""
    if not (a == b and isinstance(a, Vector)):
        return None

    def codegen(context, builder, signature, args):
        return builder.fmul(*args)

    return a(a, b), codegen


@intrinsic
def _float32_from_bits(typingctx, bits):
    """The float32 whose IEEE-754 bit pattern is the int32 ``bits`` (a reinterpretation, not a conversion)."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], llvmlite.ir.FloatType())

    return numba.types.float32(numba.types.int32), codegen


@intrinsic
def fma(typingctx, a, b, c):
    """``a * b + c`` rounded once (IEEE fused multiply-add), for three floats or three vectors (lane by lane, the
    GEMM's :class:`Vector`) of one type. On floats in a loop LLVM vectorises it to the vector FMA instruction;
    without it, strict IEEE order keeps a multiply and an add apart."""
    if not (a == b == c and isinstance(a, (numba.types.Float, Vector))):
        return None
    suffix = f"v{a.lanes}f{a.dtype.bitwidth}" if isinstance(a, Vector) else f"f{a.bitwidth}"

    def codegen(context, builder, signature, args):
        value_type = args[0].type
        fma = cgutils.get_or_insert_function(
            builder.module, llvmlite.ir.FunctionType(value_type, [value_type] * 3), f"llvm.fma.{suffix}"
        )
        return builder.call(fma, list(args))

    return a(a, b, c), codegen


# ---------------------------------------------------------------------------------------------------------------------
# exp and erf to the precision of the dtype
#
# ``math.exp`` / ``math.erf`` are scalar libm calls that LLVM cannot vectorise. For float32 the helpers below compute
# with plain arithmetic that vectorises, to well under float32's rounding; float64 keeps ``math``'s functions.
# ---------------------------------------------------------------------------------------------------------------------

SQRT_HALF = 1.0 / math.sqrt(2.0)
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
# QuickGELU (timm's, OpenAI CLIP's): x * sigmoid(1.702 x), SiLU with this scale inside the sigmoid; float32 kernels
# multiply by its float32 rounding, as torch's ``1.702 * x`` on a float32 tensor does.
QUICK_GELU_SCALE = 1.702
_QUICK_GELU_SCALE_F32 = np.float32(QUICK_GELU_SCALE)
# gelu_tanh, 0.5 v (1 + tanh(u)) with u = sqrt(2/pi) (v + 0.044715 v^3), is v sigmoid(2u) = v / (1 + exp(-2u)) (since
# 1 + tanh(u) = 2 sigmoid(2u)): SiLU's steps with 2u = v (a + b v^2) in place of v, a = 2 sqrt(2/pi), b = 0.044715 a.
# No 1 + tanh(u) near tanh = -1, where float32 would lose the digits of a small result, and no libm tanh per value.
GELU_TANH_LINEAR = 2.0 * math.sqrt(2.0 / math.pi)
GELU_TANH_CUBIC = 0.044715 * GELU_TANH_LINEAR
_GELU_TANH_F32 = (np.float32(GELU_TANH_LINEAR), np.float32(GELU_TANH_CUBIC))

# erf(z) ~ z P(z^2) / Q(z^2) for |z| < 4, coefficients lowest order first: a minimax fit on [0, 4] (Lawson-weighted
# least squares against mpmath's erf), max |error| 1.5e-9 in float64. For |z| >= 4, 1 - |erf(z)| < 1.6e-8: erf = +-1,
# as in float32 arithmetic (and gelu(-40) is exactly 0, as torch's).
_ERF_P = (
    1.1283791821107005, 0.18471037769748402, 0.05433259899168645, 0.0038395299091625546, 0.00038269220699212094,
    4.780538919443161e-06, -1.366678534231447e-08,
)  # fmt: skip
_ERF_Q = (
    1.0, 0.49702885564164656, 0.11382631912782507, 0.015453517669389634, 0.0013095791310779193, 6.400926125020492e-05,
)  # fmt: skip


@numba.njit(cache=True, nogil=True, inline="always")
def _exp_reduced(x, n):
    # exp(x - n ln 2) for float32 x and integral float32 n with |x - n ln 2| <= ln(2) / 2: r = x - n ln 2 with ln 2
    # split in two (n * _LN2_HI is exact, so r carries no rounding from the reduction), then exp(r) by its Taylor
    # series to r^7 (Horner, fused multiply-adds) in float32 arithmetic, 8 or 16 lanes to a vector in a loop.
    r = fma(-n, _LN2_HI, x)
    r = fma(-n, _LN2_LO, r)
    c0, c1, c2, c3, c4, c5, c6, c7 = _INV_FACT
    return fma(fma(fma(fma(fma(fma(fma(c7, r, c6), r, c5), r, c4), r, c3), r, c2), r, c1), r, c0)


def scalar_exp(x, dtype):
    """exp(x) to the precision of ``dtype``, inside a kernel (Numba compiles the overload below)."""
    return math.exp(x)


@overload(scalar_exp)
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


def exp_for_silu(x, dtype):
    """exp(x) for SiLU's v / (1 + exp(-v)), inside a kernel (Numba compiles the overload below)."""
    return math.exp(x)


@overload(exp_for_silu)
def _exp_for_silu_for_dtype(x, dtype):
    if dtype.dtype == numba.types.float64:
        return lambda x, dtype: math.exp(x)

    def exp_for_silu_float32(x, dtype):
        # exp_for_float32 in fewer steps around the same _exp_reduced, exact where 1 + exp(x) can tell (SiLU is that
        # much faster). x is clamped to [-87, 89]: below, exp(x) is under half an ulp
        # of 1; from 88.38 up n = 128, whose 2^n is inf, so 1 + exp(x) is inf as from 88.73 up for exp itself, and
        # SiLU gives -0 for v <= -88.38 (exactly, |silu(v)| < 4e-37 there). n = round(x / ln 2) by one fused
        # multiply-add onto _ROUND_TO_INTEGER (ties to even); 2^n in one scaling, a normal float32 or inf for n in
        # [-126, 128]. Within 2 ulp of exp on [-87, 88.37] (tested through SiLU).
        x = np.float32(x)
        x = x if x > _SILU_EXP_MIN else _SILU_EXP_MIN  # nan -> the minimum: silu(nan) is v / (...), nan anyway
        x = x if x < _SILU_EXP_MAX else _SILU_EXP_MAX
        n = fma(x, _LOG2E_F32, _ROUND_TO_INTEGER) - _ROUND_TO_INTEGER
        return _exp_reduced(x, n) * _float32_from_bits((np.int32(n) + 127) << 23)

    return exp_for_silu_float32


def one_of(dtype):
    """1 in ``dtype`` inside a kernel: ``v / (one_of(x.dtype) + e)`` stays in float32 for float32 (a ``1.0`` literal is
    float64 and would send the division, the slowest step of SiLU, to float64 at half the vector width)."""
    return 1.0


@overload(one_of)
def _one_for_dtype(dtype):
    if dtype.dtype == numba.types.float32:
        return lambda dtype: np.float32(1.0)
    return lambda dtype: 1.0


def quick_gelu_scale(dtype):
    """QuickGELU's 1.702 in ``dtype`` inside a kernel, as :func:`one_of` gives 1 (its product with a float32 stays in
    float32)."""
    return QUICK_GELU_SCALE


@overload(quick_gelu_scale)
def _quick_gelu_scale_for_dtype(dtype):
    if dtype.dtype == numba.types.float32:
        return lambda dtype: _QUICK_GELU_SCALE_F32
    return lambda dtype: QUICK_GELU_SCALE


def gelu_tanh_coefficients(dtype):
    """gelu_tanh's (a, b) in ``dtype`` inside a kernel, as :func:`one_of` gives 1."""
    return GELU_TANH_LINEAR, GELU_TANH_CUBIC


@overload(gelu_tanh_coefficients)
def _gelu_tanh_coefficients_for_dtype(dtype):
    if dtype.dtype == numba.types.float32:
        return lambda dtype: _GELU_TANH_F32
    return lambda dtype: (GELU_TANH_LINEAR, GELU_TANH_CUBIC)


def scalar_erf(z, dtype):
    """erf(z) to the precision of ``dtype``, inside a kernel (Numba compiles the overload below)."""
    return math.erf(z)


@overload(scalar_erf)
def _erf_for_dtype(z, dtype):
    if dtype.dtype == numba.types.float64:
        return lambda z, dtype: math.erf(z)

    def erf_for_float32(z, dtype):
        z = np.float64(z)  # (not float(): Numba's float() of a float32 stays a float32)
        t = z * z
        p0, p1, p2, p3, p4, p5, p6 = _ERF_P
        q0, q1, q2, q3, q4, q5 = _ERF_Q
        p = fma(fma(fma(fma(fma(fma(p6, t, p5), t, p4), t, p3), t, p2), t, p1), t, p0)  # Horner, fused
        q = fma(fma(fma(fma(fma(q5, t, q4), t, q3), t, q2), t, q1), t, q0)
        erf = z * p / q
        if z >= 4.0:
            erf = 1.0
        elif z <= -4.0:
            erf = -1.0
        return erf

    return erf_for_float32


# ---------------------------------------------------------------------------------------------------------------------
# Sums and copies
#
# Strict IEEE order forbids LLVM to vectorise a running sum: the sums here keep _LANES independent partial sums in
# one register instead, and the copies index from 0 so that their loops need no wraparound and vectorise.
# ---------------------------------------------------------------------------------------------------------------------

_LANES = 8  # partial sums of sum_lanes: independent chains in one vector register, no one sum reordered
# sum_lanes' partial sums: _LANES float64 lanes, whatever the register width (LLVM splits or joins registers).
_PARTIAL_SUMS = Vector(numba.types.float64, _LANES)


@intrinsic
def _vload_float64(typingctx, array, index):
    """``array[index : index + _LANES]`` as float64 lanes (float32 values widened, which is exact)."""

    def codegen(context, builder, signature, args):
        pointer = element_pointer(context, builder, signature.args[0], *args)
        stored = llvmlite.ir.VectorType(context.get_value_type(array.dtype), _LANES)
        values = builder.load(builder.bitcast(pointer, stored.as_pointer()), align=array.dtype.bitwidth // 8)
        if array.dtype == numba.types.float64:
            return values
        return builder.fpext(values, context.get_value_type(_PARTIAL_SUMS))

    return _PARTIAL_SUMS(array, index), codegen


@intrinsic
def _vzeros_float64(typingctx):
    """_LANES float64 zeros, the start of sum_lanes' partial sums."""

    def codegen(context, builder, signature, args):
        return llvmlite.ir.Constant(context.get_value_type(_PARTIAL_SUMS), None)

    return _PARTIAL_SUMS(), codegen


@intrinsic
def _vlane(typingctx, vector, lane):
    """Lane ``lane`` of ``vector``, a scalar."""

    def codegen(context, builder, signature, args):
        return builder.extract_element(*args)

    return vector.dtype(vector, lane), codegen


@numba.njit(cache=True, nogil=True, inline="always")
def sum_lanes(a):
    """sum(a) of a 1-D array in float64, as _LANES interleaved partial sums added at the end. The partial sums are
    the lanes of one float64 vector register (:func:`_vload_float64`), one vector add per _LANES values: kept in an
    array, each store might change ``a`` for all LLVM knows, and the loop would stay scalar."""
    n = a.shape[0]
    partial = _vzeros_float64()
    body = n - n % _LANES
    for c in range(0, body, _LANES):
        partial = vadd(partial, _vload_float64(a, c))
    total = 0.0
    for lane in range(_LANES):
        total += _vlane(partial, lane)
    for c in range(body, n):
        total += a[c]
    return total


@numba.njit(cache=True, nogil=True, inline="always")
def max_lanes(a):
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
def sum_squares_lanes(a):
    """sum(a * a) of a 1-D array in float64, as :func:`sum_lanes`."""
    n = a.shape[0]
    partial = _vzeros_float64()
    body = n - n % _LANES
    for c in range(0, body, _LANES):
        values = _vload_float64(a, c)
        partial = vadd(partial, vmul(values, values))
    total = 0.0
    for lane in range(_LANES):
        total += _vlane(partial, lane)
    for c in range(body, n):
        v = np.float64(a[c])
        total += v * v
    return total


@numba.njit(cache=True, nogil=True, inline="always")
def copy(source, destination):
    # destination[:n] = source for a 1-D source of n values (an index from 0 needs no wraparound: the loop vectorises)
    for c in range(source.size):
        destination[c] = source[c]


@numba.njit(cache=True, nogil=True, inline="always")
def copy_leading_columns(source, destination):
    # destination (rows, n) = source[:, :n] for a 2-D source with its rows padded past n columns
    n = destination.shape[1]
    for r in range(destination.shape[0]):
        copy(source[r, :n], destination[r])


# ---------------------------------------------------------------------------------------------------------------------
# Activations
#
# The activations a kernel applies to the values it writes (a GEMM's output tile, a conv's output pixel), by index
# into ACTIVATIONS, where the values are still in the L1 cache or in registers.
# ---------------------------------------------------------------------------------------------------------------------

ACTIVATIONS = ("none", "silu", "gelu", "gelu_tanh", "quick_gelu")
_SILU = ACTIVATIONS.index("silu")
_GELU = ACTIVATIONS.index("gelu")
_GELU_TANH = ACTIVATIONS.index("gelu_tanh")
_QUICK_GELU = ACTIVATIONS.index("quick_gelu")
# Ints the kernels pass one another, as int64s: Numba compiles a jitted function once more for each literal argument a
# jitted caller passes it (``f(x, 0)`` is typed Literal[int](0)), and the GEMM would be compiled up to four times.
NO_ACTIVATION = np.int64(ACTIVATIONS.index("none"))
ZERO = np.int64(0)


def activation_code(name):
    """The index of activation ``name`` in :data:`ACTIVATIONS`, for a kernel's ``act`` argument."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}: expected one of {ACTIVATIONS}")
    return ACTIVATIONS.index(name)


@numba.njit(cache=True, nogil=True, inline="always")
def activate(y, act):
    # In place on a 1-D array y, act an index into ACTIVATIONS (each loop runs from 0 to y.size: an index that is
    # known not to be negative needs no wraparound, and the loop vectorises):
    #   silu: v * sigmoid(v) = v / (1 + exp(-v)) (exp(-v) = inf for very negative v gives -0, the right limit)
    #   gelu: v * Phi(v) = 0.5 * v * (1 + erf(v / sqrt(2)))
    #   gelu_tanh: 0.5 * v * (1 + tanh(sqrt(2/pi) * (v + 0.044715 v^3))), torch's approximate='tanh', computed as
    #     v / (1 + exp(-v (a + b v^2))) (GELU_TANH_LINEAR, _CUBIC above), SiLU's loop with that gate inside the sigmoid
    #   quick_gelu: v * sigmoid(1.702 v) = v / (1 + exp(-(1.702 v))), SiLU's loop with the scale inside the sigmoid
    if act == _SILU:
        for c in range(y.size):
            v = y[c]
            y[c] = v / (one_of(y.dtype) + exp_for_silu(-v, y.dtype))
    elif act == _GELU:
        for c in range(y.size):
            v = y[c]
            y[c] = 0.5 * v * (1.0 + scalar_erf(v * SQRT_HALF, y.dtype))
    elif act == _GELU_TANH:
        linear, cubic = gelu_tanh_coefficients(y.dtype)
        for c in range(y.size):
            v = y[c]
            y[c] = v / (one_of(y.dtype) + exp_for_silu(-(v * (linear + cubic * (v * v))), y.dtype))
    elif act == _QUICK_GELU:
        scale = quick_gelu_scale(y.dtype)
        for c in range(y.size):
            v = y[c]
            y[c] = v / (one_of(y.dtype) + exp_for_silu(-(scale * v), y.dtype))


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
            value = self.builder.call(function, [self.builder.extract_element(operand, I32(lane))])
            result = self.builder.insert_element(result, value, I32(lane))
        return result


# The activations a GEMM applies to its output tile in the registers (and the depthwise conv to its vectors of
# channels), with the operations of :func:`activate` on one value in the same order, so that a tile activated in
# its registers equals the tile activated in memory bit for bit (tested), without the tile's trip through memory.


def _float32_exp_lanes(builder, lane, x):
    # exp_for_silu_float32's steps after its clamp, on float32 lanes x for which 2^round(x / ln 2) is a normal number
    # or inf: n = round(x / ln 2) by one fused multiply-add onto _ROUND_TO_INTEGER, x - n ln 2 in two parts, the Horner
    # polynomial of exp on it, times 2^n made from n's bits
    rounding = lane.splat(_ROUND_TO_INTEGER)
    n = builder.fsub(lane.call("fma", x, lane.splat(_LOG2E_F32), rounding), rounding)
    r = lane.call("fma", builder.fneg(n), lane.splat(_LN2_HI), x)
    r = lane.call("fma", builder.fneg(n), lane.splat(_LN2_LO), r)
    exp_r = lane.splat(_INV_FACT[7])
    for k in range(6, -1, -1):  # Horner, fused
        exp_r = lane.call("fma", exp_r, r, lane.splat(_INV_FACT[k]))
    int_type = llvmlite.ir.VectorType(I32, lane.lanes)
    exponent = builder.add(builder.fptosi(n, int_type), lane.splat(127, int_type))
    power_of_two = builder.bitcast(builder.shl(exponent, lane.splat(23, int_type)), x.type)  # 2^n
    return builder.fmul(exp_r, power_of_two)


def _sigmoid_gated_lanes(builder, lane, value, gate, dtype):
    # v / (1 + exp(-gate)) on a vector of lanes (SiLU: gate v, QuickGELU: 1.702 v, gelu_tanh: v (a + b v^2)): for
    # float32 exp_for_silu_float32's clamp, rounding, Horner polynomial and 2^n scaling, for float64 LLVM's exp (libm's,
    # lane by lane, as ``math.exp``); the steps of activate's loops in their order.
    x = builder.fneg(gate)
    if dtype == numba.types.float64:
        exp = lane.call("exp", x)
    else:  # exp_for_silu_float32, step by step
        x = builder.select(builder.fcmp_ordered(">", x, lane.splat(_SILU_EXP_MIN)), x, lane.splat(_SILU_EXP_MIN))
        x = builder.select(builder.fcmp_ordered("<", x, lane.splat(_SILU_EXP_MAX)), x, lane.splat(_SILU_EXP_MAX))
        exp = _float32_exp_lanes(builder, lane, x)
    return builder.fdiv(value, builder.fadd(lane.splat(1.0), exp))


@intrinsic
def vsilu(typingctx, v):
    """SiLU lane by lane, v / (1 + exp(-v)) (:func:`_sigmoid_gated_lanes`)."""
    if not isinstance(v, Vector):
        return None

    def codegen(context, builder, signature, args):
        (value,) = args
        return _sigmoid_gated_lanes(builder, _LaneMath(builder, value.type), value, value, v.dtype)

    return v(v), codegen


@intrinsic
def vquick_gelu(typingctx, v):
    """QuickGELU lane by lane, v / (1 + exp(-(1.702 v))) (:func:`_sigmoid_gated_lanes`, 1.702 in the lanes' dtype)."""
    if not isinstance(v, Vector):
        return None
    scale = _QUICK_GELU_SCALE_F32 if v.dtype == numba.types.float32 else QUICK_GELU_SCALE

    def codegen(context, builder, signature, args):
        (value,) = args
        lane = _LaneMath(builder, value.type)
        return _sigmoid_gated_lanes(builder, lane, value, builder.fmul(lane.splat(scale), value), v.dtype)

    return v(v), codegen


@intrinsic
def vgelu_tanh(typingctx, v):
    """gelu_tanh lane by lane, v / (1 + exp(-v (a + b v^2))) (:func:`_sigmoid_gated_lanes`, a and b in the lanes'
    dtype)."""
    if not isinstance(v, Vector):
        return None
    linear, cubic = _GELU_TANH_F32 if v.dtype == numba.types.float32 else (GELU_TANH_LINEAR, GELU_TANH_CUBIC)

    def codegen(context, builder, signature, args):
        (value,) = args
        lane = _LaneMath(builder, value.type)
        square = builder.fmul(value, value)
        gate = builder.fmul(value, builder.fadd(lane.splat(linear), builder.fmul(lane.splat(cubic), square)))
        return _sigmoid_gated_lanes(builder, lane, value, gate, v.dtype)

    return v(v), codegen


@intrinsic
def vgelu(typingctx, v):
    """GELU lane by lane, 0.5 * v * (1 + erf(v / sqrt(2))), in float64 (float32 lanes widened, the result rounded
    back): for float32 ``erf_for_float32``'s rational function and clamps, for float64 libm's erf lane by lane."""
    if not isinstance(v, Vector):
        return None

    def codegen(context, builder, signature, args):
        (value,) = args
        lane = _LaneMath(builder, llvmlite.ir.VectorType(llvmlite.ir.DoubleType(), value.type.count))
        wide = value if v.dtype == numba.types.float64 else builder.fpext(value, lane.type)
        z = builder.fmul(wide, lane.splat(SQRT_HALF))
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
def vactivate(v, act):
    # act(v), an activation of ACTIVATIONS by its index (v itself for none)
    if act == _SILU:
        return vsilu(v)
    if act == _GELU:
        return vgelu(v)
    if act == _GELU_TANH:
        return vgelu_tanh(v)
    if act == _QUICK_GELU:
        return vquick_gelu(v)
    return v


# ---------------------------------------------------------------------------------------------------------------------
# Whole-vector steps of a short softmax row, and prefetching
#
# A row of a few vectors (Swin's windows: 49 keys) is softmaxed a vector at a time: a constant in every lane, the
# lane-wise max, a vector's largest lane and the sum of its lanes, and exp on the row shifted by its max.
# ---------------------------------------------------------------------------------------------------------------------

# vexp_floored takes exp(x) below this as 0: its share of a probability is under 1e-34, far below any rounding of the
# result, and the subnormal numbers that exp(-100) and the like are (Swin's masked scores) would make the CPU take slow
# microcode assists, in the exp, the normalisation and the product with v.
EXP_FLOOR = -80.0


@intrinsic
def vfill(typingctx, array, value):
    """``value`` in every lane of a vector of ``array``'s dtype."""
    vector = Vector(array.dtype)

    def codegen(context, builder, signature, args):
        scalar = context.cast(builder, args[1], signature.args[1], array.dtype)
        one_lane = builder.insert_element(llvmlite.ir.Constant(context.get_value_type(vector), None), scalar, I32(0))
        every_lane = llvmlite.ir.Constant(llvmlite.ir.VectorType(I32, vector.lanes), [0] * vector.lanes)
        return builder.shuffle_vector(one_lane, one_lane, every_lane)

    return vector(array, value), codegen


def _larger(builder, a, b):
    # max(a, b) lane by lane: a where a > b, else b (a NaN in a is dropped here; the exp of the row brings it back)
    return builder.select(builder.fcmp_ordered(">", a, b), a, b)


@intrinsic
def vmax(typingctx, a, b):
    """max(a, b) lane by lane, for two vectors of one type."""
    if not (a == b and isinstance(a, Vector)):
        return None

    def codegen(context, builder, signature, args):
        return _larger(builder, *args)

    return a(a, b), codegen


def _fold_halves(builder, vector, combine):
    # the lanes of ``vector`` combined pairwise, halving the vector until one lane is left: a tree of lanes - 1 steps
    lanes = vector.type.count
    while lanes > 1:
        lanes //= 2
        half = llvmlite.ir.VectorType(I32, lanes)
        low = builder.shuffle_vector(vector, vector, llvmlite.ir.Constant(half, list(range(lanes))))
        high = builder.shuffle_vector(vector, vector, llvmlite.ir.Constant(half, list(range(lanes, 2 * lanes))))
        vector = combine(low, high)
    return builder.extract_element(vector, I32(0))


@intrinsic
def vreduce_max(typingctx, v):
    """The largest lane of ``v``."""

    def codegen(context, builder, signature, args):
        return _fold_halves(builder, args[0], lambda a, b: _larger(builder, a, b))

    return v.dtype(v), codegen


@intrinsic
def vreduce_sum(typingctx, v):
    """The sum of the lanes of ``v``, added pairwise."""

    def codegen(context, builder, signature, args):
        return _fold_halves(builder, args[0], builder.fadd)

    return v.dtype(v), codegen


@intrinsic
def vexp_floored(typingctx, v):
    """exp(x) lane by lane for x <= 0 (a softmax's scores less their max), 0 for x below :data:`EXP_FLOOR`. float32:
    exp_for_silu's steps (:func:`_float32_exp_lanes`; its 2^n is a normal number for x in [EXP_FLOOR, 0]), within 2
    ulp of exp; float64: libm's exp lane by lane. A NaN stays NaN."""
    if not isinstance(v, Vector):
        return None

    def codegen(context, builder, signature, args):
        (x,) = args
        lane = _LaneMath(builder, x.type)
        floor = lane.splat(EXP_FLOOR)
        below = builder.fcmp_ordered("<", x, floor)
        clamped = builder.select(below, floor, x)
        if v.dtype == numba.types.float64:
            exp = lane.call("exp", clamped)
        else:
            exp = _float32_exp_lanes(builder, lane, clamped)
        return builder.select(below, lane.splat(0.0), exp)

    return v(v), codegen


_BYTE_POINTER = llvmlite.ir.IntType(8).as_pointer()


def _prefetch_codegen(for_writing):
    # LLVM's prefetch of the address of args = (array, index): to be read or written, kept in every cache level, data
    def codegen(context, builder, signature, args):
        address = builder.bitcast(element_pointer(context, builder, signature.args[0], *args), _BYTE_POINTER)
        function_type = llvmlite.ir.FunctionType(llvmlite.ir.VoidType(), [_BYTE_POINTER, I32, I32, I32])
        prefetch = cgutils.get_or_insert_function(builder.module, function_type, "llvm.prefetch.p0")
        builder.call(prefetch, [address, I32(1 if for_writing else 0), I32(3), I32(1)])
        return context.get_dummy_value()

    return codegen


@intrinsic
def prefetch_to_read(typingctx, array, index):
    """Ask the CPU to bring the cache line of ``array[index]`` (a 1-D array with unit stride) in, to be read: a hint,
    which changes no value and never faults."""
    return numba.types.void(array, index), _prefetch_codegen(False)


@intrinsic
def prefetch_to_write(typingctx, array, index):
    """As :func:`prefetch_to_read`, for a line about to be written."""
    return numba.types.void(array, index), _prefetch_codegen(True)
