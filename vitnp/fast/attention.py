"""Attention: softmax((q * scale) @ k^T + bias + mask) @ v for every head, on a register-blocked micro-kernel.

One (image or window, head) pair is one item of work. Its q (scaled) and k are transposed, a square block of
vector-width rows at a time in vector registers, into q^T and k^T: the keys are the columns of q k^T, so the vectors of
the product run along k^T's rows, and q's values are broadcast from q^T's. v is copied into rows side by side. The
queries go through in tiles of a few rows: their scores, the softmax of those rows while they are in the L1 cache, then
their rows of probs @ v, written straight into ``out``. Both products are one micro-kernel, as the GEMM's: a tile of
rows x up to three vectors of columns accumulated in registers with fused multiply-adds over the depth, each value one
chain in depth order from zero.

The last N % lanes keys, when they are a few (Swin's 49 = 3 x 16 + 1), are not a vector of keys mostly padding: their
scores come a vector of queries at a time off q^T's columns (the same chains of fused multiply-adds), and their exps a
vector of a tile's rows at a time. The softmax's normalisation is the product's: the exps are multiplied by v, and each
output row by 1 / the sum of its exps. The items are shared out between threads like a GEMM's panels. Per item this is
timm's ``Attention.forward``: q * scale, q @ k^T, (+ bias, + mask), softmax, @ v; only the division by the softmax's
sum comes after the product with v instead of before it.
"""

import math

import numba
import numpy as np

from .activations import vexp_floored
from .pool import MACS_PER_COPY, MACS_PER_VALUE, run_shared
from .schedule import NO_JOB, take_chunk
from .vecmath import (
    ONE,
    VECTOR_BYTES,
    ZERO,
    fma,
    jit,
    vadd,
    vbroadcast,
    vector_lanes,
    vfill,
    vload,
    vload_first,
    vmax,
    vmul,
    vreduce_max,
    vreduce_sum,
    vstore,
    vsub,
    vtranspose,
    vzeros,
)

# The kernels a tile calls allocate nothing; compiled without the runtime's reference counts (Numba's ``_nrt`` option,
# which its documented API does not offer otherwise), a call passes its arrays without the atomic increments and
# decrements Numba would otherwise wrap around it (on every call of every tile: they cost the kernel a tenth of its
# time).
_no_refcounts = numba.njit(cache=True, nogil=True, error_model="numpy", _nrt=False)

# A tile of the products: TILE_ROWS rows x up to TILE_VECTORS vectors of columns. AVX-512's 32 vector registers hold 7
# x 3 = 21 accumulators, the 3 vectors of a row of the panel and a broadcast (Swin's windows: 49 rows = 7 tiles, 48
# keys before the last = one tile wide); AVX2's 16 hold the GEMM's 6 x 2.
TILE_ROWS = 7 if VECTOR_BYTES == 64 else 6
TILE_VECTORS = 3 if VECTOR_BYTES == 64 else 2


# ---- the micro-kernel ------------------------------------------------------------------------------------------------


@_no_refcounts
def _tile(x, x_at, x_stride, x_step, rows, w, w_at, w_stride, depth, vectors, y, y_at, y_stride, row_scale):
    # y[r, :vectors * lanes] = sum over k < depth of x[r, k] * w[k, :vectors * lanes] for the r < rows (<= TILE_ROWS)
    # rows of a tile and 1 to TILE_VECTORS vectors of columns, where x[r, k] = x[x_at + r * x_stride + k * x_step],
    # w[k, c] = w[w_at + k * w_stride + c], y[r, c] = y[y_at + r * y_stride + c] (flat arrays). Each value is one
    # chain of fused multiply-adds in k order, from zero, then times row_scale[r] (a flat array; empty: none). Rows
    # past ``rows`` are the last row again, computed and not stored.
    lanes = vector_lanes(y)
    last = rows - 1
    x0 = x_at
    x1 = x_at + min(1, last) * x_stride
    x2 = x_at + min(2, last) * x_stride
    x3 = x_at + min(3, last) * x_stride
    x4 = x_at + min(4, last) * x_stride
    x5 = x_at + min(5, last) * x_stride
    x6 = x_at + min(6, last) * x_stride
    acc00 = acc10 = acc20 = acc30 = acc40 = acc50 = acc60 = vzeros(y)  # acc<r><v>: row r, vector v of the columns
    acc01 = acc11 = acc21 = acc31 = acc41 = acc51 = acc61 = vzeros(y)
    acc02 = acc12 = acc22 = acc32 = acc42 = acc52 = acc62 = vzeros(y)
    if vectors == 3:  # (AVX-512 only, where TILE_ROWS is 7)
        for k in range(depth):
            w0 = vload(w, w_at + k * w_stride)
            w1 = vload(w, w_at + k * w_stride + lanes)
            w2 = vload(w, w_at + k * w_stride + 2 * lanes)
            a = vbroadcast(x, x0 + k * x_step)
            acc00, acc01, acc02 = fma(a, w0, acc00), fma(a, w1, acc01), fma(a, w2, acc02)
            a = vbroadcast(x, x1 + k * x_step)
            acc10, acc11, acc12 = fma(a, w0, acc10), fma(a, w1, acc11), fma(a, w2, acc12)
            a = vbroadcast(x, x2 + k * x_step)
            acc20, acc21, acc22 = fma(a, w0, acc20), fma(a, w1, acc21), fma(a, w2, acc22)
            a = vbroadcast(x, x3 + k * x_step)
            acc30, acc31, acc32 = fma(a, w0, acc30), fma(a, w1, acc31), fma(a, w2, acc32)
            a = vbroadcast(x, x4 + k * x_step)
            acc40, acc41, acc42 = fma(a, w0, acc40), fma(a, w1, acc41), fma(a, w2, acc42)
            a = vbroadcast(x, x5 + k * x_step)
            acc50, acc51, acc52 = fma(a, w0, acc50), fma(a, w1, acc51), fma(a, w2, acc52)
            a = vbroadcast(x, x6 + k * x_step)
            acc60, acc61, acc62 = fma(a, w0, acc60), fma(a, w1, acc61), fma(a, w2, acc62)
    elif vectors == 2:
        for k in range(depth):
            w0 = vload(w, w_at + k * w_stride)
            w1 = vload(w, w_at + k * w_stride + lanes)
            a = vbroadcast(x, x0 + k * x_step)
            acc00, acc01 = fma(a, w0, acc00), fma(a, w1, acc01)
            a = vbroadcast(x, x1 + k * x_step)
            acc10, acc11 = fma(a, w0, acc10), fma(a, w1, acc11)
            a = vbroadcast(x, x2 + k * x_step)
            acc20, acc21 = fma(a, w0, acc20), fma(a, w1, acc21)
            a = vbroadcast(x, x3 + k * x_step)
            acc30, acc31 = fma(a, w0, acc30), fma(a, w1, acc31)
            a = vbroadcast(x, x4 + k * x_step)
            acc40, acc41 = fma(a, w0, acc40), fma(a, w1, acc41)
            a = vbroadcast(x, x5 + k * x_step)
            acc50, acc51 = fma(a, w0, acc50), fma(a, w1, acc51)
            if TILE_ROWS == 7:
                a = vbroadcast(x, x6 + k * x_step)
                acc60, acc61 = fma(a, w0, acc60), fma(a, w1, acc61)
    else:
        for k in range(depth):
            w0 = vload(w, w_at + k * w_stride)
            acc00 = fma(vbroadcast(x, x0 + k * x_step), w0, acc00)
            acc10 = fma(vbroadcast(x, x1 + k * x_step), w0, acc10)
            acc20 = fma(vbroadcast(x, x2 + k * x_step), w0, acc20)
            acc30 = fma(vbroadcast(x, x3 + k * x_step), w0, acc30)
            acc40 = fma(vbroadcast(x, x4 + k * x_step), w0, acc40)
            acc50 = fma(vbroadcast(x, x5 + k * x_step), w0, acc50)
            if TILE_ROWS == 7:
                acc60 = fma(vbroadcast(x, x6 + k * x_step), w0, acc60)
    if row_scale.size:
        acc00, acc01, acc02 = _scaled(acc00, acc01, acc02, vbroadcast(row_scale, 0))
        acc10, acc11, acc12 = _scaled(acc10, acc11, acc12, vbroadcast(row_scale, min(1, last)))
        acc20, acc21, acc22 = _scaled(acc20, acc21, acc22, vbroadcast(row_scale, min(2, last)))
        acc30, acc31, acc32 = _scaled(acc30, acc31, acc32, vbroadcast(row_scale, min(3, last)))
        acc40, acc41, acc42 = _scaled(acc40, acc41, acc42, vbroadcast(row_scale, min(4, last)))
        acc50, acc51, acc52 = _scaled(acc50, acc51, acc52, vbroadcast(row_scale, min(5, last)))
        acc60, acc61, acc62 = _scaled(acc60, acc61, acc62, vbroadcast(row_scale, min(6, last)))
    for v in range(vectors):  # the rows' vector v, its accumulators picked by v (a select, no memory)
        at = y_at + v * lanes
        vstore(y, at, _pick(v, acc00, acc01, acc02))
        if rows > 1:
            vstore(y, at + y_stride, _pick(v, acc10, acc11, acc12))
        if rows > 2:
            vstore(y, at + 2 * y_stride, _pick(v, acc20, acc21, acc22))
        if rows > 3:
            vstore(y, at + 3 * y_stride, _pick(v, acc30, acc31, acc32))
        if rows > 4:
            vstore(y, at + 4 * y_stride, _pick(v, acc40, acc41, acc42))
        if rows > 5:
            vstore(y, at + 5 * y_stride, _pick(v, acc50, acc51, acc52))
        if TILE_ROWS == 7 and rows > 6:
            vstore(y, at + 6 * y_stride, _pick(v, acc60, acc61, acc62))


@numba.njit(cache=True, nogil=True, inline="always")
def _scaled(first, second, third, factor):
    # a row's accumulators times its factor
    return vmul(first, factor), vmul(second, factor), vmul(third, factor)


@numba.njit(cache=True, nogil=True, inline="always")
def _pick(v, first, second, third):
    # a row's accumulator of vector v
    if v == 0:
        return first
    if v == 1:
        return second
    return third


# ---- softmax rows in vector registers --------------------------------------------------------------------------------
#
# The scores' rows are short (Swin's windows: 49 keys, 3 float32 vectors and one key), so a softmax row is a few vector
# operations: the keys in whole vectors (the last one padded with -inf, which the exp makes 0) row by row, and a few
# last keys (tail keys) as columns, a vector of the tile's rows at a time.


@_no_refcounts
def _softmax_rows(scores, padded, rows, body, n, bias, bias_at, mask, mask_at, key_padding, tail, tail_at, tail_stride,
                  row_max, row_factor, tail_exp):
    # The exps of softmax(scores[i, :n] + bias[i] + mask[i]) for the first ``rows`` rows of a tile's scores (rows of
    # padded values, a flat array), in place, and row_factor[i] = 1 / their sum, the softmax's normalisation, which
    # the product with v applies to its output rows. The adds in the reference's order: bias[i, c] = bias[bias_at + i
    # * n + c], mask[i, c] likewise, each flat, or empty: none. Keys body..n - 1 (the tail keys) come in as columns,
    # tail[tail_at + t * tail_stride + i] = key body + t's score of row i, bias and mask added; their exps are stored
    # in the rows at body + t. The first ``body`` keys are padded to whole vectors, the padding's exps 0 (key_padding
    # (padded,): 0 for the n keys, -inf past them). row_max, row_factor (>= rows rounded up to whole vectors),
    # tail_exp (a vector): scratch. Each step is one pass over all the rows: a row's steps depend on one another, the
    # rows do not, and the passes leave the processor rows to overlap (one row after the other, its reductions'
    # latencies would add up).
    lanes = vector_lanes(scores)
    whole = body - body % lanes  # the keys in whole vectors; the last few in a vector of their own, read masked
    for i in range(rows):
        row = i * padded
        largest = vfill(scores, -np.inf)
        for c in range(0, whole, lanes):
            s = vload(scores, row + c)
            if bias.size:
                s = vadd(s, vload(bias, bias_at + i * n + c))
            if mask.size:
                s = vadd(s, vload(mask, mask_at + i * n + c))
            vstore(scores, row + c, s)
            largest = vmax(largest, s)
        if whole < body:  # the last keys, then the padding (-inf)
            s = vload(scores, row + whole)
            if bias.size:
                s = vadd(s, vload_first(bias, bias_at + i * n + whole, body - whole))
            if mask.size:
                s = vadd(s, vload_first(mask, mask_at + i * n + whole, body - whole))
            s = vadd(s, vload(key_padding, whole))
            vstore(scores, row + whole, s)
            largest = vmax(largest, s)
        row_max[i] = vreduce_max(largest)
    for first in range(0, rows, lanes):  # the tail keys' scores in the rows' maxima
        largest = vload(row_max, first)
        for t in range(n - body):
            largest = vmax(largest, vload(tail, tail_at + t * tail_stride + first))
        vstore(row_max, first, largest)
    end = -(-body // lanes) * lanes
    for i in range(rows):
        row = i * padded
        largest = vfill(scores, row_max[i])
        total = vzeros(scores)
        for c in range(0, end, lanes):
            e = vexp_floored(vsub(vload(scores, row + c), largest))
            vstore(scores, row + c, e)
            total = vadd(total, e)
        row_factor[i] = vreduce_sum(total)
    for first in range(0, rows, lanes):  # the tail keys' exps, added to the sums and put in the rows
        largest = vload(row_max, first)
        total = vload(row_factor, first)
        for t in range(n - body):
            e = vexp_floored(vsub(vload(tail, tail_at + t * tail_stride + first), largest))
            total = vadd(total, e)
            vstore(tail_exp, 0, e)
            for r in range(min(lanes, rows - first)):
                scores[(first + r) * padded + body + t] = tail_exp[r]
        vstore(row_factor, first, total)
    for i in range(rows):
        row_factor[i] = 1.0 / row_factor[i]


@_no_refcounts
def _tail_scores(queries_t, columns, n, qkv, key_at, head_dim, bias, bias_at, mask, mask_at, key, tail, tail_at):
    # tail[tail_at + i] = (q[i] . k + bias[i, key]) + mask[i, key] for the n rows of q, given as q^T (flat, rows of
    # ``columns``), and the key's row k of head_dim values at qkv[key_at] (flat): a vector of rows at a time, each
    # score one chain of fused multiply-adds in d order from zero, as the product's tile computes the other keys'.
    # bias and mask as _softmax_rows', over the item's rows.
    lanes = vector_lanes(tail)
    for first in range(0, n, lanes):
        products = vzeros(tail)
        for d in range(head_dim):
            products = fma(vload(queries_t, d * columns + first), vbroadcast(qkv, key_at + d), products)
        vstore(tail, tail_at + first, products)
    for i in range(n):
        if bias.size:
            tail[tail_at + i] += bias[bias_at + i * n + key]
        if mask.size:
            tail[tail_at + i] += mask[mask_at + i * n + key]


@jit
def attention_items(qkv, scale, bias, mask, out, width, schedule, job):
    # qkv (B, N, 3, heads, head_dim); bias (heads, N, N) or (0, 0, 0): none; mask (nW, N, N) or (0, 0, 0): none,
    # window b of the batch takes mask[b % nW]; out (B, N, heads, head_dim). The items b * heads + h of the chunks this
    # thread takes from ``schedule`` (another kernel calling it alone passes one_thread_schedule(B * heads)). width:
    # two vectors' worth of lanes (the GEMM's panel width).
    B, N, _, heads, head_dim = qkv.shape
    lanes = width // 2
    # The last N % lanes keys, when they are a quarter of a vector or less, are tail keys: their scores come off q^T's
    # columns, cheaper than a vector of keys that is mostly padding (and their exps a vector of rows at a time).
    tail_keys = N % lanes if N % lanes <= lanes // 4 else 0
    body = N - tail_keys
    body_padded = -(-body // lanes) * lanes
    padded_keys = -(-N // lanes) * lanes
    padded_dim = -(-head_dim // lanes) * lanes
    full_dim = head_dim - head_dim % lanes  # head_dim's values in whole vectors
    qkv_flat = qkv.reshape(-1)
    out_flat = out.reshape(-1)
    bias_flat = bias.reshape(-1)
    mask_flat = mask.reshape(-1)
    token_stride = 3 * heads * head_dim  # from a token's row of q (or k, or v) to the next token's
    out_stride = heads * head_dim
    query_columns = -(-N // lanes) * lanes
    # (q * scale)^T (padded_dim, query_columns): the dims past head_dim whatever follows a row of q (the products stop
    # at head_dim), the queries past N the last one again
    queries_t = np.empty(padded_dim * query_columns, qkv.dtype)
    # k^T (padded_dim, body_padded): the keys past ``body`` repeat the last one (the softmax makes them 0), the dims
    # past head_dim are whatever follows a row of k (the products stop at head_dim)
    keys_t = np.empty(padded_dim * body_padded, qkv.dtype)
    values = np.zeros(N * padded_dim, qkv.dtype)  # v (N, padded_dim), zero past head_dim
    rows_padded = -(-N // lanes) * lanes + lanes  # room for a vector of rows from any row
    tail = np.zeros(tail_keys * rows_padded, qkv.dtype)  # the tail keys' scores, a column of the rows each
    scores = np.zeros(TILE_ROWS * padded_keys, qkv.dtype)  # a tile's scores, then their exps, rows of padded_keys
    key_padding = np.zeros(padded_keys, qkv.dtype)  # added to the scores: 0 for the keys, -inf past them
    key_padding[body:] = -np.inf
    tile_rows_padded = -(-TILE_ROWS // lanes) * lanes
    row_max = np.zeros(tile_rows_padded, qkv.dtype)
    row_factor = np.zeros(tile_rows_padded, qkv.dtype)
    tail_exp = np.empty(lanes, qkv.dtype)
    in_place = head_dim % lanes == 0  # the output rows written where they are; else through a tile's padded rows
    head_out = np.empty(0 if in_place else TILE_ROWS * padded_dim, qkv.dtype)
    no_scale = np.empty(0, qkv.dtype)
    one = np.ones(1, qkv.dtype)[0]  # the factor of a plain transpose
    begin, end = take_chunk(schedule, job)
    while begin < end:
        for item in range(begin, end):
            b = item // heads
            h = item % heads
            q_at = b * N * token_stride + h * head_dim  # q[b, 0, h, 0] in qkv_flat; k and v heads * head_dim apart
            k_at = q_at + heads * head_dim
            v_at = k_at + heads * head_dim
            bias_at = h * N * N  # bias[h] in bias_flat
            mask_at = (b % max(mask.shape[0], 1)) * N * N  # mask[b % nW] in mask_flat
            for i in range(0, N, lanes):  # (q * scale)^T, a square block at a time
                for d in range(0, head_dim, lanes):
                    vtranspose(qkv_flat, q_at + i * token_stride + d, token_stride, N - i, scale, queries_t,
                               d * query_columns + i, query_columns)
            for j in range(N):  # v's rows side by side, their last values read masked (v may end qkv)
                row = v_at + j * token_stride
                for d in range(0, full_dim, lanes):
                    vstore(values, j * padded_dim + d, vload(qkv_flat, row + d))
                if full_dim < head_dim:
                    last_values = vload_first(qkv_flat, row + full_dim, head_dim - full_dim)
                    vstore(values, j * padded_dim + full_dim, last_values)
            for j in range(0, body, lanes):  # k^T, a square block at a time
                for d in range(0, head_dim, lanes):
                    vtranspose(qkv_flat, k_at + j * token_stride + d, token_stride, body - j, one, keys_t,
                               d * body_padded + j, body_padded)
            for t in range(tail_keys):
                key_at = k_at + (body + t) * token_stride
                _tail_scores(queries_t, query_columns, N, qkv_flat, key_at, head_dim, bias_flat, bias_at, mask_flat,
                             mask_at, body + t, tail, t * rows_padded)
            for i in range(0, N, TILE_ROWS):
                rows = min(TILE_ROWS, N - i)
                c = ZERO
                while c < body_padded:  # q k^T of the tile's rows
                    vectors = min((body_padded - c) // lanes, TILE_VECTORS)
                    _tile(queries_t, i, ONE, query_columns, rows, keys_t, c, body_padded, head_dim, vectors, scores,
                          c, padded_keys, no_scale)
                    c += vectors * lanes
                _softmax_rows(scores, padded_keys, rows, body, N, bias_flat, bias_at + i * N, mask_flat,
                              mask_at + i * N, key_padding, tail, i, rows_padded, row_max, row_factor, tail_exp)
                c = ZERO
                while c < padded_dim:  # @ v, normalised
                    vectors = min((padded_dim - c) // lanes, TILE_VECTORS)
                    if in_place:
                        _tile(scores, ZERO, padded_keys, ONE, rows, values, c, padded_dim, N, vectors, out_flat,
                              (b * N + i) * out_stride + h * head_dim + c, out_stride, row_factor)
                    else:
                        _tile(scores, ZERO, padded_keys, ONE, rows, values, c, padded_dim, N, vectors, head_out, c,
                              padded_dim, row_factor)
                    c += vectors * lanes
                if not in_place:
                    for r in range(rows):
                        at = (b * N + i + r) * out_stride + h * head_dim
                        out_flat[at : at + head_dim] = head_out[r * padded_dim : r * padded_dim + head_dim]
        begin, end = take_chunk(schedule, NO_JOB)


def attention(qkv, scale, bias=None, mask=None):
    """Multi-head self-attention of a qkv Linear's output ``qkv`` (B, N, 3, heads, head_dim): for each image (or
    window) b and head h, ``softmax((q * scale) @ k^T + bias[h] + mask[b % nW]) @ v``, as (B, N, heads, head_dim).

    ``bias`` (heads, N, N) (Swin's relative position bias) and ``mask`` (nW, N, N) (Swin's shifted-window mask) are
    optional. Each (b, h) is computed as in torch, q scaled first, except that the softmax's division by its sum
    is applied to the output rows (exps @ v, then times 1 / sum); the products on a GEMM-like micro-kernel.
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
    width = 2 * (VECTOR_BYTES // qkv.itemsize)
    arguments = (qkv, qkv.dtype.type(scale), bias, mask, out, width)
    run_shared(attention_items, arguments, B * heads, B * heads * N * N * (2 * head_dim + MACS_PER_VALUE))
    return out


@jit
def unit_qk_items(qkv, logit_scale, eps, out, schedule, job):
    # out[b, n] = (q / max(|q|, eps) * logit_scale[h], k / max(|k|, eps), v) for every head h of the tokens b * N + n
    # of the chunks this thread takes: qkv and out (B, N, 3, heads, head_dim), logit_scale (heads,). Each norm a
    # float64 sum of squares, rounded to the dtype; then the division and the product in the dtype, as the reference's.
    N, heads, head_dim = qkv.shape[1], qkv.shape[3], qkv.shape[4]
    begin, end = take_chunk(schedule, job)
    while begin < end:
        for token in range(begin, end):
            b, n = token // N, token % N
            for h in range(heads):
                for part in range(2):  # q, then k
                    row = qkv[b, n, part, h]
                    squares = 0.0
                    for d in range(head_dim):
                        squares += np.float64(row[d]) * np.float64(row[d])
                    norm = qkv.dtype.type(max(math.sqrt(squares), eps))
                    factor = logit_scale[h] if part == 0 else qkv.dtype.type(1.0)
                    for d in range(head_dim):
                        out[b, n, part, h, d] = row[d] / norm * factor
                out[b, n, 2, h] = qkv[b, n, 2, h]
        begin, end = take_chunk(schedule, NO_JOB)


def cosine_attention(qkv, logit_scale, eps, bias=None, mask=None):
    """Swin V2's scaled cosine attention of a qkv Linear's output ``qkv`` (B, N, 3, heads, head_dim), as (B, N, heads,
    head_dim): q and k made unit rows (each over max(its norm, eps)), q times ``logit_scale[h]`` (heads,), in one
    pass into a copy of qkv, then :func:`attention` of it with scale 1."""
    qkv = np.ascontiguousarray(qkv)
    B, N, _, heads, head_dim = qkv.shape
    unit = np.empty_like(qkv)
    arguments = (qkv, np.ascontiguousarray(logit_scale, qkv.dtype).reshape(heads), eps, unit)
    run_shared(unit_qk_items, arguments, B * N, qkv.size * MACS_PER_COPY)  # a copy, a few flops a value
    return attention(unit, 1.0, bias, mask)
