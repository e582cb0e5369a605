"""Activations and exp for the engine's kernels, on scalars and on vectors of lanes.

``math.exp`` / ``math.erf`` are scalar libm calls that LLVM cannot vectorise; the float32 kernels use the polynomials
here instead, within 2 ulp of exp and 1.5e-9 of erf. An activation is applied by index into :data:`ACTIVATIONS`, to a
row in memory (:func:`activate`) or to a vector in registers (:func:`vactivate`, the same operations in the same order,
so the same bits). float64 keeps libm's exp and erf.
"""

import math

import llvmlite.ir
import numba
import numpy as np
from numba.core import cgutils
from numba.extending import intrinsic, overload

from .vecmath import I32, Vector, fma


@intrinsic
def _float32_from_bits(typingctx, bits):
    """The float32 whose IEEE-754 bit pattern is the int32 ``bits`` (a reinterpretation, not a conversion)."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], llvmlite.ir.FloatType())

    return numba.types.float32(numba.types.int32), codegen


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
# An int the kernels pass one another, as an int64 (see vecmath.ZERO).
NO_ACTIVATION = np.int64(ACTIVATIONS.index("none"))


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
# exp of a softmax's shifted scores, a vector at a time
# ---------------------------------------------------------------------------------------------------------------------

# vexp_floored takes exp(x) below this as 0: its share of a probability is under 1e-34, far below any rounding of the
# result, and the subnormal numbers that exp(-100) and the like are (Swin's masked scores) would make the CPU take slow
# microcode assists, in the exp, the normalisation and the product with v.
EXP_FLOOR = -80.0


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
