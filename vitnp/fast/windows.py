"""Swin's window partition / reverse and cyclic roll, each in one pass over memory, the roll and the residual add
folded into the partition and the reverse.

Feature maps are NHWC, (B, H, W, C), as timm 1.x keeps them; every kernel moves whole C-vectors, so the inner loop is a
contiguous copy. Windows are ordered (batch, window row, window column) and the tokens of a window row-major, timm's
``window_partition`` order. The kernels are serial: a copy is bound by memory, not by arithmetic, and waking helper
threads costs more than the copy.
"""

import numba
import numpy as np

from .vecmath import copy, jit


def _check_nhwc(x, name):
    if x.ndim != 4:
        raise ValueError(f"{name} expects a (B, H, W, C) array of rank 4, got shape {x.shape}")


@numba.njit(cache=True, nogil=True, inline="always")
def _rolled_from(i, shift, n):
    """The index that a roll by ``shift`` (0 <= shift < n) of an axis of length n moves to index i (0 <= i < n)."""
    return i - shift if i >= shift else i - shift + n


@jit
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


@jit
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
                        copy(x[b, src_i, src_j], out[w, t])
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


@jit
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
                copy(windows[w, t], out[b, i, j])


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
