"""Attention: softmax((q * scale) @ k^T + bias + mask) @ v for every head, on the GEMM's micro-kernel.

One (image or window, head) pair is one item of work: its q (scaled), k and v are gathered out of the qkv Linear's
output, k into panels (k's rows are the output columns of q k^T) and v into panels (v's columns are the output columns
of attn v); the scores' rows are padded with zero columns to whole panels, which attn v then multiplies by zero rows of
v's panels. The items are shared out between threads like a GEMM's panels. Per item this is the sequence of timm's
``Attention.forward``: q * scale, q @ k^T, (+ bias, + mask), softmax, @ v.
"""

import numpy as np

from .gemm import gemm_panels, l2_block_rows, panel_width
from .pool import MACS_PER_VALUE, run_shared
from .rows import softmax_row
from .schedule import NO_JOB, take_chunk
from .vecmath import NO_ACTIVATION, ZERO, copy, jit


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
    value_panels = np.zeros((value_panels_count, padded_keys, width), qkv.dtype)  # [p, j, c] = v[j, p * width + c]
    attn = np.empty((N, padded_keys), qkv.dtype)
    head_out = np.empty((N, value_panels_count * width), qkv.dtype)
    ones = np.ones(max(padded_keys, value_panels_count * width), qkv.dtype)  # the products' scale and shift: none
    zeros = np.zeros(max(padded_keys, value_panels_count * width), qkv.dtype)
    none = np.zeros((0, 0), qkv.dtype)  # no residual
    q_block_rows = l2_block_rows(head_dim, qkv.itemsize)
    attn_block_rows = l2_block_rows(padded_keys, qkv.itemsize)
    begin, end = take_chunk(schedule, job)
    while begin < end:
        for item in range(begin, end):
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
                    copy(v_i[p * width : (p + 1) * width], value_panels[p, i])
            gemm_panels(  # q k^T, 0 past N
                q, key_panels, ones, zeros, NO_ACTIVATION, none, attn, ZERO, key_panels_count, q_block_rows, N
            )
            for i in range(N):
                scores = attn[i, :N]  # contiguous: the loops below vectorise
                if bias.shape[0]:
                    scores += bias[h, i]
                if mask.shape[0]:
                    scores += mask[b % mask.shape[0], i]
                softmax_row(scores)
            gemm_panels(  # @ v
                attn, value_panels, ones, zeros, NO_ACTIVATION, none, head_out, ZERO, value_panels_count,
                attn_block_rows, head_dim,
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
