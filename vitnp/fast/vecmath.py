"""Vector math for the engine's kernels: SIMD registers as a Numba type and the few LLVM vector operations the kernels
need (the activations and exp built on them are :mod:`vitnp.fast.activations`).

Numba has no vector type; :class:`Vector` is LLVM's ``<lanes x float>`` (a 32-byte AVX register, 64 bytes on a CPU
with AVX-512), and the intrinsics below load, store, broadcast, add and fuse multiply-adds on it. Every kernel built on
them keeps IEEE semantics (no fastmath) and is cached on disk.
"""


import llvmlite.binding
import llvmlite.ir
import numba
import numpy as np
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

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
# Where the packed weights and the GEMM's outputs start: a cache line. A 64-byte vector loaded across two lines costs
# an Intel core two loads (every weight load of a GEMM, for panels that start 16 bytes into a line, as large NumPy
# arrays do).
CACHE_LINE = 64
# Ints the kernels pass one another, as int64s: Numba compiles a jitted function once more for each literal argument a
# jitted caller passes it (``f(x, 0)`` is typed Literal[int](0)), and the GEMM would be compiled up to four times.
ZERO = np.int64(0)
ONE = np.int64(1)


def aligned_empty(shape, dtype):
    """``np.empty(shape, dtype)`` whose data starts at a cache line (:data:`CACHE_LINE`)."""
    dtype = np.dtype(dtype)
    size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    memory = np.empty(size + CACHE_LINE, np.uint8)
    start = -memory.ctypes.data % CACHE_LINE
    return memory[start : start + size].view(dtype).reshape(shape)


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
# Whole-vector steps of a short softmax row, and prefetching
#
# A row of a few vectors (Swin's windows: 49 keys) is softmaxed a vector at a time: a constant in every lane, the
# lane-wise max, a vector's largest lane and the sum of its lanes, and exp on the row shifted by its max.
# ---------------------------------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------------------------------
# A square block transposed in vector registers; a vector's first lanes read alone
# ---------------------------------------------------------------------------------------------------------------------

def _splat(builder, value, vector_type):
    # ``value`` in every lane of a vector of ``vector_type``
    one_lane = builder.insert_element(llvmlite.ir.Constant(vector_type, None), value, I32(0))
    every_lane = llvmlite.ir.Constant(llvmlite.ir.VectorType(I32, vector_type.count), [0] * vector_type.count)
    return builder.shuffle_vector(one_lane, one_lane, every_lane)



@intrinsic
def vtranspose(typingctx, source, source_at, source_stride, source_rows, factor, destination, destination_at,
               destination_stride):
    """destination[destination_at + c * destination_stride + r] = source[source_at + min(r, source_rows - 1) *
    source_stride + c] * factor for r, c < lanes: a square block of one vector per row transposed in registers (rows
    past ``source_rows`` repeat the last one). As a matrix of 2 x 2 blocks of g x g values, g = 1, 2, 4 .. lanes / 2
    in turn, each step swaps the off-diagonal blocks: rows r and r + g (r & g = 0) exchange their values at columns
    c + g and c (c & g = 0)."""
    vector = Vector(source.dtype)
    lanes = vector.lanes
    steps = []  # (g, the upper row's lanes, the lower row's lanes) of shufflevector(upper, lower)
    g = 1
    while g < lanes:
        upper = [c if c & g == 0 else lanes + c - g for c in range(lanes)]
        lower = [c + g if c & g == 0 else lanes + c for c in range(lanes)]
        steps.append((g, upper, lower))
        g *= 2

    def codegen(context, builder, signature, args):
        source_value, at, stride, rows, factor_value, destination_value, destination_at_value, \
            destination_stride_value = args
        vector_type = context.get_value_type(vector)
        align = vector.dtype.bitwidth // 8
        last = builder.sub(rows, rows.type(1))
        factors = _splat(builder, factor_value, vector_type)
        block = []
        for r in range(lanes):
            row = builder.select(builder.icmp_signed("<", rows.type(r), last), rows.type(r), last)
            pointer = element_pointer(context, builder, signature.args[0], source_value,
                                      builder.add(at, builder.mul(row, stride)))
            loaded = builder.load(builder.bitcast(pointer, vector_type.as_pointer()), align=align)
            block.append(builder.fmul(loaded, factors))
        for g, upper, lower in steps:
            masks = [llvmlite.ir.Constant(llvmlite.ir.VectorType(I32, lanes), lanes_of) for lanes_of in (upper, lower)]
            swapped = list(block)
            for r in range(lanes):
                if r & g == 0:
                    swapped[r] = builder.shuffle_vector(block[r], block[r + g], masks[0])
                    swapped[r + g] = builder.shuffle_vector(block[r], block[r + g], masks[1])
            block = swapped
        for c in range(lanes):
            index = builder.add(destination_at_value, builder.mul(destination_at_value.type(c),
                                                                  destination_stride_value))
            pointer = element_pointer(context, builder, signature.args[5], destination_value, index)
            builder.store(block[c], builder.bitcast(pointer, vector_type.as_pointer()), align=align)
        return context.get_dummy_value()

    intp = numba.types.intp
    return numba.types.void(source, intp, intp, intp, source.dtype, destination, intp, intp), codegen


@intrinsic
def vload_first(typingctx, array, index, count):
    """The vector ``array[index : index + count]`` then zeros, for count < lanes: the lanes past ``count`` are not read
    (a masked load, which touches no memory past the array's end)."""
    vector = Vector(array.dtype)
    lanes = vector.lanes

    def codegen(context, builder, signature, args):
        array_value, index_value, count_value = args
        vector_type = context.get_value_type(vector)
        pointer = builder.bitcast(element_pointer(context, builder, signature.args[0], array_value, index_value),
                                  vector_type.as_pointer())
        lane_numbers = llvmlite.ir.Constant(llvmlite.ir.VectorType(count_value.type, lanes), list(range(lanes)))
        read = builder.icmp_signed("<", lane_numbers, _splat(builder, count_value, lane_numbers.type))  # lane < count
        function_type = llvmlite.ir.FunctionType(vector_type, [pointer.type, I32, read.type, vector_type])
        suffix = f"v{lanes}f{vector.dtype.bitwidth}.p0"
        masked_load = cgutils.get_or_insert_function(builder.module, function_type, f"llvm.masked.load.{suffix}")
        align = I32(vector.dtype.bitwidth // 8)
        return builder.call(masked_load, [pointer, align, read, llvmlite.ir.Constant(vector_type, None)])

    return vector(array, numba.types.intp, numba.types.intp), codegen


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
