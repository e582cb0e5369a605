"""Linear: y = act((x W^T) * scale + b) + residual, a GEMM on weights packed once.

NumPy's BLAS packs the weight matrix again on every call and splits a product of a few hundred rows poorly across
threads. Here each weight matrix is packed once into panels of two vectors' worth of output columns, the panel's
weights for one k side by side, and a register-blocked micro-kernel computes a tile of 6 rows x 1 panel of y: for every
k it loads the panel's two weight vectors, broadcasts the 6 inputs x[i, k] in turn and accumulates their products in
12 vector registers with fused multiply-adds, from zero, in k order. The accumulators stay in registers over the whole
depth and are stored once, after one more fused multiply-add each, acc * scale + bias (scale 1 for a Linear; a
BatchNorm's scale for a conv), then the activation and the residual's add, still in the registers (fc1 + GELU, or fc2
+ the block's shortcut, in one pass over memory). The panels are shared out between threads; inside a chunk of a batch
split across threads the product is serial.

A panel is deeper than the L1 cache holds (ViT-Base's fc1: 96 KiB), so each tile reads its weights from the L2: 128
bytes per 12 fused multiply-adds. A core with one 512-bit FMA a cycle (Zen 4) is not held back by that, and there
blocking the depth too, a panel's block staying in the L1 while the tiles pass over it, measured 2-12% slower; a core
with two may be, and then the blocks pay for the partial sums' trips through the cache between them. So the depth of
the blocks is measured on the CPU once (:data:`panel_block_bytes`); it changes no bit of the output. The panels and
the output start at a cache line, so that no vector load or store spans two.
"""

import functools
import os
import time
from typing import NamedTuple

import numba
import numpy as np

from .activations import NO_ACTIVATION, activation_code, vactivate
from .pool import MACS_PER_VALUE, run_shared
from .rows import as_rows
from .schedule import NO_JOB, take_chunk
from .tuning import MeasuredSetting
from .vecmath import (
    VECTOR_BYTES,
    ZERO,
    aligned_empty,
    copy_leading_columns,
    fma,
    jit,
    vadd,
    vbroadcast,
    vload,
    vstore,
    vzeros,
)


def l2_cache_bytes(folder="/sys/devices/system/cpu/cpu0/cache", default=1 << 20):
    """One core's L2 cache in bytes as Linux describes it (``folder``/index*/level, type, size: '1024K', '2M'), or
    ``default`` where that cannot be read."""
    try:
        for index in sorted(os.listdir(folder)):
            with open(os.path.join(folder, index, "level")) as level, open(os.path.join(folder, index, "type")) as kind:
                if level.read().strip() != "2" or kind.read().strip() not in ("Unified", "Data"):
                    continue
            with open(os.path.join(folder, index, "size")) as size:
                text = size.read().strip().upper()
            multiple = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
            return int(text.rstrip("KMG")) * multiple
    except (OSError, ValueError):
        pass
    return default


# A block of rows of x that stays in the L2 cache while the panels stream past it: half the L2 (on Zen 4's 1 MiB, 512
# KiB was faster than 256 KiB or 1 MiB), the other half for the panels and the output rows.
L2_ROWS_BYTES = l2_cache_bytes() // 2
# A product of fewer panels than this is shared out by blocks of rows too, so that the threads split the rows instead of
# each streaming all of x for its panel or two; with more panels, each thread's panels reuse the rows better.
_FEW_PANELS = 16


def panel_width(dtype):
    """Output columns per GEMM panel: two vectors' worth of ``dtype`` lanes."""
    return 2 * (VECTOR_BYTES // np.dtype(dtype).itemsize)


@numba.njit(cache=True, inline="always")
def l2_block_rows(depth, itemsize):
    """Rows of a (rows, depth) GEMM input per block that stays in the L2 cache, a multiple of the 6-row tile."""
    return max(6, L2_ROWS_BYTES // (depth * itemsize) // 6 * 6)

@jit
def gemm_panels(x, panels, scale, shift, act, residual, y, first_panel, end_panel, block_rows, block_bytes,
                n_columns):
    # y[:, panel columns] = act((x @ W[panel columns]^T) * scale + shift) + residual for the panels in [first_panel,
    # end_panel). x (rows, depth) C-contiguous; panels (n_panels, depth, width = 2 lanes): panels[p, k, c] = W[p *
    # width + c, k], zero past the last of W's n_columns columns (a panel that is half padding is computed on its first
    # vector alone: MobileViT's 144-column and head_dim-36 products, attention over 197 keys); scale, shift and the
    # rows of y padded to n_panels * width columns; act an index into ACTIVATIONS; residual (rows, out_features), or
    # (0, 0): none. The rows go in blocks of block_rows that stay in the L2 cache while the panels pass over them;
    # the depth in blocks of block_bytes of a panel (all of it for 0) that stay in the L1 cache while the block's tiles
    # pass over them, each tile's partial sums kept in y between the blocks: still one chain of fused multiply-adds
    # in k order for each output, so the same bits for any block_bytes.
    # The activation and the residual's add are applied to the tile in its registers, which saves the tile a trip
    # through memory; the residual of the cut-short last panel by _cut_short_residual.
    rows, depth = x.shape
    width = panels.shape[2]
    lanes = width // 2
    padded_columns = y.shape[1]
    x_flat = x.reshape(-1)
    weights = panels.reshape(-1)
    y_flat = y.reshape(-1)
    out_features = residual.shape[1]
    residual_flat = residual.reshape(-1)
    k_block = depth if block_bytes == 0 else max(1, block_bytes // (width * panels.itemsize))
    for block in range(0, rows, block_rows):
        for p in range(first_panel, end_panel):
            column = p * width
            scale0 = vload(scale, column)
            scale1 = vload(scale, column + lanes)
            shift0 = vload(shift, column)
            shift1 = vload(shift, column + lanes)
            residual_in_registers = residual.shape[0] > 0 and column + width <= out_features
            for k_begin in range(0, depth, k_block):
                k_end = min(k_begin + k_block, depth)
                last = k_end == depth
                for i in range(block, min(block + block_rows, rows), 6):
                    # The tile's 6 rows i, row1 .. row5 (past the last row, the last row again: computed, not stored)
                    # and where they start in x
                    row1, row2, row3 = min(i + 1, rows - 1), min(i + 2, rows - 1), min(i + 3, rows - 1)
                    row4, row5 = min(i + 4, rows - 1), min(i + 5, rows - 1)
                    x0, x1, x2 = i * depth, row1 * depth, row2 * depth
                    x3, x4, x5 = row3 * depth, row4 * depth, row5 * depth
                    at = i * padded_columns + column
                    if k_begin == 0:  # acc<r><h>: row i + r, half h of the panel
                        acc00 = acc10 = acc20 = acc30 = acc40 = acc50 = vzeros(y)
                        acc01 = acc11 = acc21 = acc31 = acc41 = acc51 = vzeros(y)
                    else:  # the sums over the blocks before, from y
                        y1 = row1 * padded_columns + column
                        y2 = row2 * padded_columns + column
                        y3 = row3 * padded_columns + column
                        y4 = row4 * padded_columns + column
                        y5 = row5 * padded_columns + column
                        acc00, acc01 = vload(y_flat, at), vload(y_flat, at + lanes)
                        acc10, acc11 = vload(y_flat, y1), vload(y_flat, y1 + lanes)
                        acc20, acc21 = vload(y_flat, y2), vload(y_flat, y2 + lanes)
                        acc30, acc31 = vload(y_flat, y3), vload(y_flat, y3 + lanes)
                        acc40, acc41 = vload(y_flat, y4), vload(y_flat, y4 + lanes)
                        acc50, acc51 = vload(y_flat, y5), vload(y_flat, y5 + lanes)
                    w = (p * depth + k_begin) * width
                    if column + lanes < n_columns:  # both vectors of the panel hold output columns
                        for k in range(k_begin, k_end):
                            w0 = vload(weights, w)  # W[column : column + lanes, k]
                            w1 = vload(weights, w + lanes)  # W[column + lanes : column + width, k]
                            w += width
                            a = vbroadcast(x_flat, x0 + k)
                            acc00 = fma(a, w0, acc00)
                            acc01 = fma(a, w1, acc01)
                            a = vbroadcast(x_flat, x1 + k)
                            acc10 = fma(a, w0, acc10)
                            acc11 = fma(a, w1, acc11)
                            a = vbroadcast(x_flat, x2 + k)
                            acc20 = fma(a, w0, acc20)
                            acc21 = fma(a, w1, acc21)
                            a = vbroadcast(x_flat, x3 + k)
                            acc30 = fma(a, w0, acc30)
                            acc31 = fma(a, w1, acc31)
                            a = vbroadcast(x_flat, x4 + k)
                            acc40 = fma(a, w0, acc40)
                            acc41 = fma(a, w1, acc41)
                            a = vbroadcast(x_flat, x5 + k)
                            acc50 = fma(a, w0, acc50)
                            acc51 = fma(a, w1, acc51)
                    else:  # the panel's second vector is all padding: its accumulators stay zero
                        for k in range(k_begin, k_end):
                            w0 = vload(weights, w)
                            w += width
                            acc00 = fma(vbroadcast(x_flat, x0 + k), w0, acc00)
                            acc10 = fma(vbroadcast(x_flat, x1 + k), w0, acc10)
                            acc20 = fma(vbroadcast(x_flat, x2 + k), w0, acc20)
                            acc30 = fma(vbroadcast(x_flat, x3 + k), w0, acc30)
                            acc40 = fma(vbroadcast(x_flat, x4 + k), w0, acc40)
                            acc50 = fma(vbroadcast(x_flat, x5 + k), w0, acc50)
                    if last:  # the whole depth is summed: scale, shift, activation and residual
                        acc00, acc01 = fma(acc00, scale0, shift0), fma(acc01, scale1, shift1)
                        acc10, acc11 = fma(acc10, scale0, shift0), fma(acc11, scale1, shift1)
                        acc20, acc21 = fma(acc20, scale0, shift0), fma(acc21, scale1, shift1)
                        acc30, acc31 = fma(acc30, scale0, shift0), fma(acc31, scale1, shift1)
                        acc40, acc41 = fma(acc40, scale0, shift0), fma(acc41, scale1, shift1)
                        acc50, acc51 = fma(acc50, scale0, shift0), fma(acc51, scale1, shift1)
                        if act:
                            acc00, acc01 = vactivate(acc00, act), vactivate(acc01, act)
                            acc10, acc11 = vactivate(acc10, act), vactivate(acc11, act)
                            acc20, acc21 = vactivate(acc20, act), vactivate(acc21, act)
                            acc30, acc31 = vactivate(acc30, act), vactivate(acc31, act)
                            acc40, acc41 = vactivate(acc40, act), vactivate(acc41, act)
                            acc50, acc51 = vactivate(acc50, act), vactivate(acc51, act)
                        if residual_in_registers:
                            r0 = i * out_features + column
                            r1 = row1 * out_features + column
                            r2 = row2 * out_features + column
                            r3 = row3 * out_features + column
                            r4 = row4 * out_features + column
                            r5 = row5 * out_features + column
                            acc00 = vadd(acc00, vload(residual_flat, r0))
                            acc01 = vadd(acc01, vload(residual_flat, r0 + lanes))
                            acc10 = vadd(acc10, vload(residual_flat, r1))
                            acc11 = vadd(acc11, vload(residual_flat, r1 + lanes))
                            acc20 = vadd(acc20, vload(residual_flat, r2))
                            acc21 = vadd(acc21, vload(residual_flat, r2 + lanes))
                            acc30 = vadd(acc30, vload(residual_flat, r3))
                            acc31 = vadd(acc31, vload(residual_flat, r3 + lanes))
                            acc40 = vadd(acc40, vload(residual_flat, r4))
                            acc41 = vadd(acc41, vload(residual_flat, r4 + lanes))
                            acc50 = vadd(acc50, vload(residual_flat, r5))
                            acc51 = vadd(acc51, vload(residual_flat, r5 + lanes))
                    vstore(y_flat, at, acc00)
                    vstore(y_flat, at + lanes, acc01)
                    if i + 1 < rows:
                        vstore(y_flat, at + padded_columns, acc10)
                        vstore(y_flat, at + padded_columns + lanes, acc11)
                    if i + 2 < rows:
                        vstore(y_flat, at + 2 * padded_columns, acc20)
                        vstore(y_flat, at + 2 * padded_columns + lanes, acc21)
                    if i + 3 < rows:
                        vstore(y_flat, at + 3 * padded_columns, acc30)
                        vstore(y_flat, at + 3 * padded_columns + lanes, acc31)
                    if i + 4 < rows:
                        vstore(y_flat, at + 4 * padded_columns, acc40)
                        vstore(y_flat, at + 4 * padded_columns + lanes, acc41)
                    if i + 5 < rows:
                        vstore(y_flat, at + 5 * padded_columns, acc50)
                        vstore(y_flat, at + 5 * padded_columns + lanes, acc51)
                    if last and residual.shape[0] and not residual_in_registers:
                        _cut_short_residual(y_flat, at, padded_columns, min(6, rows - i), residual, i, column)


@jit
def _cut_short_residual(y_flat, at, padded_columns, tile_rows, residual, i, column):
    # The residual's add on gemm_panels' tile of tile_rows rows of the cut-short last panel at y_flat[at] (its columns
    # past out_features are padding), while the tile is in the L1 cache; a function of its own, so that its code stays
    # out of the micro-kernel's loops (inlined there, such an epilogue cost the plain product 6-13%).
    out_features = residual.shape[1]
    residual_flat = residual.reshape(-1)
    for r in range(tile_rows):
        row_at = at + r * padded_columns
        residual_at = (i + r) * out_features + column
        for c in range(out_features - column):
            y_flat[row_at + c] += residual_flat[residual_at + c]


@jit
def _gemm_shared(x, panels, scale, shift, act, residual, y, block_rows, block_bytes, item_rows, n_columns, schedule,
                 job):
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
            gemm_panels(
                x[top:bottom], panels, scale, shift, act, group_residual, y[top:bottom], first_panel, end_panel,
                block_rows, block_bytes, n_columns,
            )
        begin, end = take_chunk(schedule, NO_JOB)


# The depths of a panel's blocks gemm_panels may run in, in bytes of the panel (0: the whole depth at once, the
# default): 16 and 32 KiB are a half and all of the L1 cache of Zen 4, a third and two thirds of a recent Xeon's.
PANEL_BLOCK_CANDIDATES = (0, 16 << 10, 32 << 10)


def _panel_block_timer(dtype):
    # seconds(block_bytes) of one product of 120 rows by an fc1-like weight (768 deep, 96 KiB panels in float32); the
    # values do not change the kernel's time
    x = np.full((120, 768), 0.5, dtype)
    panels, out_features = pack_linear_weight(np.full((1024, 768), 0.25, dtype))
    scale, shift = padded_scale_shift(out_features, out_features, None, None, dtype)
    y = np.empty((120, out_features), dtype)
    none = np.zeros((0, 0), dtype)
    block_rows = l2_block_rows(768, dtype.itemsize)

    def seconds(block_bytes):
        start = time.perf_counter()
        gemm_panels(x, panels, scale, shift, NO_ACTIVATION, none, y, ZERO, panels.shape[0], block_rows, block_bytes,
                    out_features)
        return time.perf_counter() - start

    return seconds



# panel_block_bytes(dtype): the depth of a panel's blocks in gemm_panels (``block_bytes``) on this CPU for ``dtype``,
# the fastest of PANEL_BLOCK_CANDIDATES on a product of ViT-Base's shapes on one thread, measured the first time a GEMM
# runs (a few tens of milliseconds) and kept with the kernel cache
panel_block_bytes = MeasuredSetting(
    "gemm_panel_block", PANEL_BLOCK_CANDIDATES, _panel_block_timer, lambda: gemm_panels._cache.cache_path
)


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
    width = panel_width(weight.dtype)
    n_panels = -(-out_features // width)
    padded = np.zeros((n_panels * width, in_features), weight.dtype)
    padded[:out_features] = weight
    panels = aligned_empty((n_panels, in_features, width), weight.dtype)  # at a cache line: no load splits across two
    panels[...] = padded.reshape(n_panels, width, in_features).transpose(0, 2, 1)
    return PackedWeight(panels, out_features)


def padded_scale_shift(padded_columns, out_features, scale, bias, dtype):
    """A GEMM's per-column scale and shift padded to whole panels: (1 or ``scale``, 0 or ``bias``) then (1, 0)."""
    padded_scale = padded_vector(scale, 1.0, padded_columns, out_features, dtype)
    return padded_scale, padded_vector(bias, 0.0, padded_columns, out_features, dtype)


def padded_vector(values, fill, padded_columns, out_features, dtype):
    # ``values`` (out_features,) then ``fill`` up to padded_columns, or ``fill`` throughout for None. The kernels only
    # read them: a constant vector is made once, and a given one that needs no padding is used as it is when it is a
    # contiguous, writable array of ``dtype`` (a read-only one would make Numba compile the kernels again, for
    # read-only arrays): a copy on every call would cost more than a small GEMM's arithmetic.
    if values is None:
        return constant_vector(fill, padded_columns, np.dtype(dtype))
    values = np.asarray(values)
    flags = values.flags
    if out_features == padded_columns and values.dtype == dtype and flags.c_contiguous and flags.writeable:
        return values
    padded = np.full(padded_columns, fill, dtype)
    padded[:out_features] = values
    return padded


@functools.lru_cache(maxsize=256)
def constant_vector(fill, length, dtype):
    return np.full(length, fill, dtype)


def residual_rows(residual, shape, dtype, name):
    """A GEMM's residual as rows (rows, out_features), checked against the output's ``shape``; (0, 0) for none."""
    if residual is None:
        return np.zeros((0, 0), dtype)
    if residual.shape != shape or residual.dtype != dtype:
        got = f"{residual.shape} {residual.dtype}"
        raise ValueError(f"{name}: residual must be {shape} {dtype} like the output, got {got}")
    return as_rows(residual)


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
    x2 = as_rows(x)
    if not x2.flags.writeable:  # a parameter as the input (an attention pool's latent queries, loaded from a file):
        x2 = x2.copy()  # Numba would compile the GEMM again for a read-only x; a copy of such an input costs less
    rows, depth = x2.shape
    residual2 = residual_rows(residual, (*x.shape[:-1], out_features), x.dtype, "linear")
    n_panels, _, width = panels.shape
    padded_scale, padded_shift = padded_scale_shift(n_panels * width, out_features, scale, bias, x.dtype)
    y = aligned_empty((rows, n_panels * width), x.dtype)  # its rows are the vectors the next ops load
    block_rows = l2_block_rows(depth, x.itemsize)

    code = activation_code(act)
    macs = rows * out_features * (depth + (MACS_PER_VALUE if code else 0))
    # Shared out by panels; a tall product with few panels (Swin's fc2 in its first stage: 3136 rows, 6 panels) by
    # blocks of rows too, so that the threads split the rows instead of each streaming all of x for its panel or two.
    item_rows = block_rows if n_panels < _FEW_PANELS else rows
    arguments = (x2, panels, padded_scale, padded_shift, code, residual2, y, block_rows, panel_block_bytes(x.dtype),
                 item_rows, out_features)
    run_shared(_gemm_shared, arguments, -(-rows // item_rows) * n_panels, macs)
    if y.shape[1] != out_features:  # the last panel is cut short: drop its padding columns
        y = np.ascontiguousarray(y[:, :out_features])
    return y.reshape(*x.shape[:-1], out_features)

@jit
def linear_rows(x, panels, scale, shift, act, residual, out_features, block_bytes):
    # linear()'s product of rows x (rows, depth) on this thread alone, as (rows, out_features); block_bytes as
    # gemm_panels'
    rows, depth = x.shape
    y = np.empty((rows, panels.shape[0] * panels.shape[2]), x.dtype)
    gemm_panels(x, panels, scale, shift, act, residual, y, ZERO, panels.shape[0], l2_block_rows(depth, x.itemsize),
                block_bytes, out_features)
    if y.shape[1] == out_features:
        return y
    unpadded = np.empty((rows, out_features), x.dtype)  # the last panel is cut short: drop its padding columns
    copy_leading_columns(y, unpadded)
    return unpadded
