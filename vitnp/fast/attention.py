"""Attention: softmax((q * scale) @ k^T + bias + mask) @ v for every head, on the GEMM's micro-kernel.

One (image or window, head) pair is one item of work: its q (scaled), k and v are gathered out of the qkv Linear's
output, k into panels (k's rows are the output columns of q k^T) and v into panels (v's columns are the output columns
of probs @ v). The scores' rows are padded with zero columns to whole panels; the softmax works on them a whole vector
at a time, the padding set to -inf (whose exp is 0), and stores the probabilities as rows of N, the depth of the
product with v. The items are shared out between threads like a GEMM's panels. Per item this is the sequence of timm's
``Attention.forward``: q * scale, q @ k^T, (+ bias, + mask), softmax, @ v.
"""

import numba
import numpy as np

from .gemm import gemm_panels, l2_block_rows, panel_width
from .pool import MACS_PER_VALUE, run_shared
from .schedule import NO_JOB, take_chunk
from .vecmath import (
    NO_ACTIVATION,
    ZERO,
    copy,
    jit,
    prefetch_to_read,
    prefetch_to_write,
    vadd,
    vector_lanes,
    vexp_floored,
    vfill,
    vload,
    vmax,
    vmul,
    vreduce_max,
    vreduce_sum,
    vstore,
    vsub,
    vzeros,
)

# ---- softmax rows in vector registers --------------------------------------------------------------------------------
#
# The scores' rows are short (Swin's windows: 49 keys, 4 float32 vectors), so a softmax row is a few vector operations:
# each step below works on whole vectors of the row padded to whole panels, the padding -inf, which the exp makes 0.


@numba.njit(cache=True, nogil=True, inline="always")
def _softmax_rows(scores, bias, mask, key_padding, probs_flat, row_factors):
    # probs_flat[i * n : (i + 1) * n] = softmax(scores[i, :n] + bias[i] + mask[i]) for the n rows of scores (n, padded)
    # (the adds in that order, as the reference's; bias, mask (n, n), or (0, 0): none); the rows of scores are padded
    # to whole vectors, and overwritten. key_padding (padded,): 0 for the n keys, -inf past them. The probabilities are
    # stored as whole vectors, so that row i writes up to padded - n values past its end (into the rows after it,
    # which are written later, or spare room past the last). row_factors (n,): scratch, each row's max, then its sum
    # of exps. Each step is one pass over all the rows: a row's steps depend on one another, the rows do not, and the
    # passes leave the processor rows to overlap (one row after the other, its reductions' latencies would add up).
    n, padded = scores.shape
    lanes = vector_lanes(scores)
    body = n - n % lanes  # the keys in whole vectors; the last few are added one by one
    for i in range(n):
        row = scores[i]
        for c in range(body, n):
            if bias.shape[0]:
                row[c] += bias[i, c]
            if mask.shape[0]:
                row[c] += mask[i, c]
        largest = vfill(row, -np.inf)
        for c in range(0, body, lanes):
            s = vload(row, c)
            if bias.shape[0]:
                s = vadd(s, vload(bias[i], c))
            if mask.shape[0]:
                s = vadd(s, vload(mask[i], c))
            vstore(row, c, s)
            largest = vmax(largest, s)
        for c in range(body, padded, lanes):  # the last keys and the padding (-inf)
            s = vadd(vload(row, c), vload(key_padding, c))
            vstore(row, c, s)
            largest = vmax(largest, s)
        row_factors[i] = vreduce_max(largest)
    for i in range(n):
        row = scores[i]
        row_max = vfill(row, row_factors[i])
        total = vzeros(row)
        for c in range(0, padded, lanes):
            e = vexp_floored(vsub(vload(row, c), row_max))
            vstore(row, c, e)
            total = vadd(total, e)
        row_factors[i] = vreduce_sum(total)
    for i in range(n):
        row = scores[i]
        inv_total = vfill(row, 1.0 / row_factors[i])
        for c in range(0, padded, lanes):
            vstore(probs_flat, i * n + c, vmul(vload(row, c), inv_total))


@numba.njit(cache=True, nogil=True, inline="always")
def _prefetch_item(qkv, out, b, h):
    # The cache lines of item (b, h)'s rows of q, k and v and of out, asked for one item ahead: an item's rows are
    # head_dim values every 3 * heads * head_dim through the qkv Linear's output (and every heads * head_dim through
    # out), a stride the hardware's prefetchers do not follow, and its products leave the time to fetch them. A row is
    # asked for every 64 bytes and at its last value: every line it touches, aligned or not.
    N, head_dim = qkv.shape[1], qkv.shape[4]
    line = 64 // qkv.itemsize
    for i in range(N):
        for c in range(0, head_dim + line - 1, line):
            at = min(c, head_dim - 1)
            prefetch_to_read(qkv[b, i, 0, h], at)
            prefetch_to_read(qkv[b, i, 1, h], at)
            prefetch_to_read(qkv[b, i, 2, h], at)
            prefetch_to_write(out[b, i, h], at)


@jit
def attention_items(qkv, scale, bias, mask, out, width, schedule, job):
    # qkv (B, N, 3, heads, head_dim); bias (heads, N, N) or (0, 0, 0): none; mask (nW, N, N) or (0, 0, 0): none,
    # window b of the batch takes mask[b % nW]; out (B, N, heads, head_dim). The items b * heads + h of the chunks this
    # thread takes from ``schedule`` (another kernel calling it alone passes one_thread_schedule(B * heads)).
    B, N, _, heads, head_dim = qkv.shape
    key_panels_count = -(-N // width)
    padded_keys = key_panels_count * width
    value_panels_count = -(-head_dim // width)
    q = np.empty((N, head_dim), qkv.dtype)
    key_panels = np.zeros((key_panels_count, head_dim, width), qkv.dtype)  # [p, d, c] = k[p * width + c, d]
    value_panels = np.zeros((value_panels_count, N, width), qkv.dtype)  # [p, j, c] = v[j, p * width + c]
    scores = np.empty((N, padded_keys), qkv.dtype)  # q k^T (+ bias + mask), rows padded to whole panels
    # their softmax, rows of N (the depth of the product with v), and room for the last row's padding (_softmax_rows)
    probs_flat = np.empty(N * N + padded_keys, qkv.dtype)
    probs = probs_flat[: N * N].reshape(N, N)
    key_padding = np.zeros(padded_keys, qkv.dtype)  # added to the scores: 0 for the N keys, -inf past them
    key_padding[N:] = -np.inf
    row_factors = np.empty(N, qkv.dtype)
    head_out = np.empty((N, value_panels_count * width), qkv.dtype)
    ones = np.ones(max(padded_keys, value_panels_count * width), qkv.dtype)  # the products' scale and shift: none
    zeros = np.zeros(max(padded_keys, value_panels_count * width), qkv.dtype)
    none = np.zeros((0, 0), qkv.dtype)  # no residual for the products; no bias or mask for the softmax
    q_block_rows = l2_block_rows(head_dim, qkv.itemsize)
    probs_block_rows = l2_block_rows(N, qkv.itemsize)
    begin, end = take_chunk(schedule, job)
    while begin < end:
        for item in range(begin, end):
            b = item // heads
            h = item % heads
            if item + 1 < end:
                _prefetch_item(qkv, out, (item + 1) // heads, (item + 1) % heads)
            for i in range(N):  # (1-D rows, loops from 0: the copies vectorise)
                q_i, k_i, v_i = qkv[b, i, 0, h], qkv[b, i, 1, h], qkv[b, i, 2, h]  # (head_dim,) each
                q_row = q[i]
                for d in range(head_dim):
                    q_row[d] = q_i[d] * scale
                key_column = key_panels[i // width, :, i % width]
                for d in range(head_dim):
                    key_column[d] = k_i[d]
                for p in range(value_panels_count):
                    copy(v_i[p * width : (p + 1) * width], value_panels[p, i])
            gemm_panels(  # q k^T, 0 past N
                q, key_panels, ones, zeros, NO_ACTIVATION, none, scores, ZERO, key_panels_count, q_block_rows, N
            )
            head_bias = bias[h] if bias.shape[0] else none
            window_mask = mask[b % mask.shape[0]] if mask.shape[0] else none
            _softmax_rows(scores, head_bias, window_mask, key_padding, probs_flat, row_factors)
            gemm_panels(  # @ v
                probs, value_panels, ones, zeros, NO_ACTIVATION, none, head_out, ZERO, value_panels_count,
                probs_block_rows, head_dim,
            )
            for i in range(N):
                copy(head_out[i, :head_dim], out[b, i, h])
        begin, end = take_chunk(schedule, NO_JOB)


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
    width = panel_width(qkv.dtype)
    arguments = (qkv, qkv.dtype.type(scale), bias, mask, out, width)
    run_shared(attention_items, arguments, B * heads, B * heads * N * N * (2 * head_dim + MACS_PER_VALUE))
    return out
