"""MobileViT's 3x3 convs at stride 1 by Winograd's F(2x2, 3x3): 4/9 of the direct conv's multiply-adds.

Each 2x2 block of output pixels is A^T [(G g G^T) . (B^T d B)] A for its 4x4 input window d (Lavin and Gray, 2016):
the window's 16 transformed values per channel, times the 16 transformed weights, summed over the channels, then the
output transform. The 16 sums over the channels are 16 GEMMs (tiles x C) @ (C x out) on the GEMM's micro-kernel, 16
products a 2x2 block where the direct conv has 36. Not the direct conv's bits: the transforms add and subtract window
values (exact for the weights' factors 1/2 and 1, rounded once each as values of the input's size), so the error is a
few ulp of the largest input, as a GEMM's reordered sums (tested against the reference conv with a stated tolerance).
"""

import numba
import numpy as np

from .activations import NO_ACTIVATION, activation_code, vactivate
from .conv import conv_maps
from .gemm import (
    PackedWeight,
    constant_vector,
    gemm_panels,
    l2_block_rows,
    pack_linear_weight,
    padded_scale_shift,
    panel_block_bytes,
    panel_width,
)
from .pool import MACS_PER_COPY, MACS_PER_VALUE, run_shared
from .schedule import NO_JOB, take_chunk
from .vecmath import aligned_empty, fma, jit, vadd, vector_lanes, vload, vstore, vsub, vzeros

_WINOGRAD_G = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]])  # 4x3


def pack_winograd_weight(weight):
    """A 3x3 conv weight (out, C, 3, 3) for :func:`winograd_conv3x3`: its 16 transformed matrices G g G^T (computed in
    float64, rounded once), each packed as a Linear weight (out, C) with C padded to whole vectors by zero columns."""
    weight = np.asarray(weight)
    if weight.ndim != 4 or weight.shape[2:] != (3, 3) or weight.dtype not in (np.float32, np.float64):
        raise ValueError(f"expected a float32 or float64 3x3 conv weight (out, C, 3, 3), got {weight.dtype} "
                         f"{weight.shape}")
    out_features, C = weight.shape[:2]
    lanes = panel_width(weight.dtype) // 2
    padded_C = -(-C // lanes) * lanes
    transformed = np.zeros((4, 4, out_features, padded_C))
    transformed[..., :C] = np.einsum("ij,ocjk,lk->iloc", _WINOGRAD_G, weight.astype(np.float64), _WINOGRAD_G)
    transformed = transformed.astype(weight.dtype)
    products = [pack_linear_weight(transformed[i, j]).panels for i in range(4) for j in range(4)]
    panels = aligned_empty((16, *products[0].shape), weight.dtype)  # (16, n_panels, padded_C, width), at a cache line
    panels[...] = products
    return PackedWeight(panels, out_features)


@numba.njit(cache=True, nogil=True, inline="always")
def _window_vector(x_flat, b, r, q, H, W, Cm, c):
    # channels c .. c + lanes of pixel (r, q) of image b of a map of Cm channels (flattened), zeros in the padding
    if r < 0 or r >= H or q < 0 or q >= W:
        return vzeros(x_flat)
    return vload(x_flat, ((b * H + r) * W + q) * Cm + c)


@numba.njit(cache=True, nogil=True, inline="always")
def _times_bt(d0, d1, d2, d3):
    # B^T (d0, d1, d2, d3) for B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], lane by lane
    return vsub(d0, d2), vadd(d1, d2), vsub(d2, d1), vsub(d1, d3)


@jit
def _winograd_input_shared(maps, channels, H, W, V, schedule, job):
    # V[k, t, c] = (B^T d B)[k // 4, k % 4] for tile t's 4x4 window d of channel c (the maps' channels concatenated,
    # each map whole vectors of channels), for the tile rows b * th + ty of the chunks this thread takes: the window of
    # tile (ty, tx) starts at pixel (2 ty - 1, 2 tx - 1), zero outside the map. B^T goes over the window's columns, then
    # B over the rows of that, a vector of channels at a time, in registers.
    th, tw = (H + 1) // 2, (W + 1) // 2
    tiles, padded_C = V.shape[1], V.shape[2]
    plane = tiles * padded_C  # from V[k] to V[k + 1]
    V_flat = V.reshape(-1)
    lanes = vector_lanes(V)
    begin, end = take_chunk(schedule, job)
    while begin < end:
        for tile_row in range(begin, end):
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
                            vstore(V_flat, at + (4 * i) * plane, v0)
                            vstore(V_flat, at + (4 * i + 1) * plane, v1)
                            vstore(V_flat, at + (4 * i + 2) * plane, v2)
                            vstore(V_flat, at + (4 * i + 3) * plane, v3)
                    channel += Cm
        begin, end = take_chunk(schedule, NO_JOB)


@jit
def _winograd_products_shared(V, panels, ones, zeros, M, out_features, block_bytes, schedule, job):
    # M[k] = V[k] @ U[k]^T for the items k * n_panels + p (panel p of product k)
    n_panels = panels.shape[1]
    none = np.zeros((0, 0), V.dtype)
    block_rows = l2_block_rows(V.shape[2], V.itemsize)
    begin, end = take_chunk(schedule, job)
    while begin < end:
        for k in range(begin // n_panels, (end - 1) // n_panels + 1):
            first_panel, end_panel = max(begin - k * n_panels, 0), min(end - k * n_panels, n_panels)
            gemm_panels(
                V[k], panels[k], ones, zeros, NO_ACTIVATION, none, M[k], first_panel, end_panel, block_rows,
                block_bytes, out_features,
            )
        begin, end = take_chunk(schedule, NO_JOB)


@jit
def _winograd_output_shared(M, scale, shift, act, out, schedule, job):
    # out's 2x2 block of tile (ty, tx) = act((A^T m A) * scale + shift) for its 16 products m (4x4), A^T = [[1, 1, 1,
    # 0], [0, 1, -1, -1]]; the block's pixels past the map's last row or column are not written.
    _, H, W, padded_out = out.shape
    th, tw = (H + 1) // 2, (W + 1) // 2
    plane = M.shape[1] * padded_out
    M_flat = M.reshape(-1)
    out_flat = out.reshape(-1)
    lanes = vector_lanes(out)
    m = np.empty(16 * lanes, out.dtype)
    begin, end = take_chunk(schedule, job)
    while begin < end:
        for tile_row in range(begin, end):
            b, ty = tile_row // th, tile_row % th
            for tx in range(tw):
                t = tile_row * tw + tx
                for o in range(0, padded_out, lanes):
                    for k in range(16):
                        vstore(m, k * lanes, vload(M_flat, k * plane + t * padded_out + o))
                    for j in range(4):  # A^T m: rows 0 + 1 + 2 and 1 - 2 - 3 of each column, into rows 0 and 1
                        m0, m1 = vload(m, j * lanes), vload(m, (4 + j) * lanes)
                        m2, m3 = vload(m, (8 + j) * lanes), vload(m, (12 + j) * lanes)
                        vstore(m, j * lanes, vadd(vadd(m0, m1), m2))
                        vstore(m, (4 + j) * lanes, vsub(vsub(m1, m2), m3))
                    channel_scale, channel_shift = vload(scale, o), vload(shift, o)
                    for i in range(2):  # (A^T m) A on rows 0 and 1: out pixel (2 ty + i, 2 tx + j)
                        r = 2 * ty + i
                        if r < H:
                            s0, s1 = vload(m, i * 4 * lanes), vload(m, (i * 4 + 1) * lanes)
                            s2, s3 = vload(m, (i * 4 + 2) * lanes), vload(m, (i * 4 + 3) * lanes)
                            at = ((b * H + r) * W + 2 * tx) * padded_out + o
                            y = fma(vadd(vadd(s0, s1), s2), channel_scale, channel_shift)
                            vstore(out_flat, at, vactivate(y, act))
                            if 2 * tx + 1 < W:
                                y = fma(vsub(vsub(s1, s2), s3), channel_scale, channel_shift)
                                vstore(out_flat, at + padded_out, vactivate(y, act))
        begin, end = take_chunk(schedule, NO_JOB)


def winograd_conv3x3(maps, packed, bias=None, act="none", scale=None):
    """A 3x3 conv at stride 1 with padding 1 on the channel concatenation of ``maps`` (one NHWC map or a tuple), then
    a per-output-channel scale and shift (``bias``) and an activation, by Winograd's F(2x2, 3x3): the values of
    :func:`conv2d` to a few ulp of the inputs' size (not bit for bit), in 4/9 of its multiply-adds. ``packed`` from
    :func:`pack_winograd_weight`. (B, H, W, out).
    """
    flat_maps, channels, B, H, W, _, _ = conv_maps(maps, 3, 1, 1, "winograd_conv3x3")
    dtype = flat_maps[0].dtype
    panels, out_features = packed
    C = int(channels.sum())
    lanes = panel_width(dtype) // 2
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
    run_shared(_winograd_input_shared, (flat_maps, channels, H, W, V), B * th, V.size * MACS_PER_COPY)
    M = np.empty((16, tiles, padded_out), dtype)
    ones, zeros = constant_vector(1.0, padded_out, np.dtype(dtype)), constant_vector(0.0, padded_out, np.dtype(dtype))
    macs = 16 * tiles * padded_C * out_features
    arguments = (V, panels, ones, zeros, M, out_features, panel_block_bytes(dtype))
    run_shared(_winograd_products_shared, arguments, 16 * n_panels, macs)
    out = np.empty((B, H, W, padded_out), dtype)
    padded_scale, padded_shift = padded_scale_shift(padded_out, out_features, scale, bias, dtype)
    code = activation_code(act)
    arguments = (M, padded_scale, padded_shift, code, out)
    run_shared(_winograd_output_shared, arguments, B * th, out.size * (4 + (MACS_PER_VALUE if code else 0)))
    if padded_out != out_features:  # the last panel is cut short: drop its padding columns
        out = np.ascontiguousarray(out[..., :out_features])
    return out
