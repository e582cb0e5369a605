"""MobileViT's convolutions on NHWC maps (B, H, W, C): depthwise, k x k by im2col rows on the GEMM, and the network's
first conv reading its NCHW input images in place.

An output pixel's channels are contiguous, and so are the channels of each input pixel a tap reads, whatever the
stride, so the sums over the taps run on the GEMM's vectors of channels, and each conv applies its BatchNorm's scale
and shift and its activation as it writes an output pixel. The output rows (or bands of them) are shared out between
threads.
"""

import numba
import numpy as np

from ..reference.ops import conv_output_size
from .activations import activate, activation_code, vactivate
from .gemm import L2_ROWS_BYTES, gemm_panels, l2_block_rows, padded_scale_shift, panel_block_bytes, residual_rows
from .pool import MACS_PER_COPY, MACS_PER_VALUE, run_shared
from .schedule import NO_JOB, take_chunk
from .vecmath import aligned_empty, copy, fma, jit, vbroadcast, vector_lanes, vload, vstore, vzeros

# ---------------------------------------------------------------------------------------------------------------------
# Depthwise convolution with its BatchNorm and activation
# ---------------------------------------------------------------------------------------------------------------------


@numba.njit(cache=True, nogil=True, inline="always")
def taps_inside(position, stride, padding, kernel_size, size):
    # The taps [first, end) of the window of output position ``position`` (along one axis) that fall inside the map
    # of ``size`` pixels, not in its padding: the window starts at input pixel position * stride - padding. A window
    # wholly in the padding (padding wider than the kernel) has none: end = first, never below it.
    start = position * stride - padding
    first = max(0, -start)
    return first, max(first, min(kernel_size, size - start))


@numba.njit(cache=True, nogil=True, inline="always")
def _depthwise_3x3_four_pixels(x_flat, taps, scale, shift, act, out_flat, corner, at, W, C, c):
    # One vector of channels from c of four output pixels side by side along a row at stride 1, their 3x3 windows
    # inside the map: the pixel at ``at`` in out_flat, whose window's corner is ``corner`` in x_flat, and the three
    # after it. Each tap is loaded once for the four, and each input pixel once for the windows that overlap on it
    # (six columns of three rows instead of 36 reads): 27 loads for 36 fused multiply-adds instead of 72. Each sum runs
    # over the taps in (u, v) order from zero, as the pixel-by-pixel loop does: bit for bit the same.
    acc0 = acc1 = acc2 = acc3 = vzeros(out_flat)
    for u in range(3):
        for v in range(3):
            tap = vload(taps, (u * 3 + v) * C + c)  # weight[u, v, c : c + lanes]
            source = corner + (u * W + v) * C + c
            acc0 = fma(tap, vload(x_flat, source), acc0)
            acc1 = fma(tap, vload(x_flat, source + C), acc1)
            acc2 = fma(tap, vload(x_flat, source + 2 * C), acc2)
            acc3 = fma(tap, vload(x_flat, source + 3 * C), acc3)
    channel_scale, channel_shift = vload(scale, c), vload(shift, c)
    vstore(out_flat, at + c, vactivate(fma(acc0, channel_scale, channel_shift), act))
    vstore(out_flat, at + C + c, vactivate(fma(acc1, channel_scale, channel_shift), act))
    vstore(out_flat, at + 2 * C + c, vactivate(fma(acc2, channel_scale, channel_shift), act))
    vstore(out_flat, at + 3 * C + c, vactivate(fma(acc3, channel_scale, channel_shift), act))


@jit
def depthwise_conv2d_rows(x, weight, scale, shift, act, stride, padding, row_padding, out, first_row, end_row):
    # out[b, i, j, c] = act(scale[c] * sum_{u, v} weight[u, v, c] * x[b, i*stride + u - padding, j*stride + v - padding,
    # c] + shift[c]), taps outside the map reading zero padding, for the output rows b * Ho + i in [first, end).
    # The sum runs in tap order (u, v) with fused multiply-adds from zero, in registers: four vectors of channels at a
    # time (four independent chains, so that each FMA need not wait for the one before), then one vector, then the
    # channels past the last whole vector one by one. The activation is applied in the registers (to those last
    # channels in memory). A 3x3 window inside the map (all but MobileViT's edge
    # pixels) runs its nine taps as one loop of constant length, which LLVM unrolls (bit for bit the same sums as the
    # two loops over the taps inside, tested). At stride 1, with C whole vectors, four pixels side by side whose
    # windows are inside go together (_depthwise_3x3_four_pixels), sharing the loads of the taps and of the input
    # pixels their windows overlap on; at stride 2 the windows overlap less and the pixels go one at a time, which
    # was faster there. x may be a band of a taller map's rows (inverted_residual's): the windows of output row i
    # start at x's row i * stride - row_padding, which is ``padding`` for a whole map; the rows outside x read zero
    # padding.
    _, H, W, C = x.shape
    Ho, Wo = out.shape[1], out.shape[2]
    kh, kw = weight.shape[0], weight.shape[1]
    lanes = vector_lanes(out)
    four_at_a_time = stride == 1 and kh == kw == 3 and C % lanes == 0
    x_flat = x.reshape(-1)
    taps = weight.reshape(-1)  # taps[(u * kw + v) * C + c] = weight[u, v, c]
    out_flat = out.reshape(-1)
    for row in range(first_row, end_row):
        b = row // Ho
        i = row % Ho
        first_u, end_u = taps_inside(i, stride, row_padding, kh, H)
        j = 0
        while j < Wo:
            first_v, end_v = taps_inside(j, stride, padding, kw, W)
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
                acc0 = acc1 = acc2 = acc3 = vzeros(out)
                if inside_3x3:  # a 3x3 window inside the map: the nine taps in one loop of known length, unrolled
                    for uv in range(9):
                        tap = uv * C + c
                        source = corner + ((uv // 3) * W + uv % 3) * C + c
                        acc0 = fma(vload(taps, tap), vload(x_flat, source), acc0)
                        acc1 = fma(vload(taps, tap + lanes), vload(x_flat, source + lanes), acc1)
                        acc2 = fma(vload(taps, tap + 2 * lanes), vload(x_flat, source + 2 * lanes), acc2)
                        acc3 = fma(vload(taps, tap + 3 * lanes), vload(x_flat, source + 3 * lanes), acc3)
                else:
                    for u in range(first_u, end_u):
                        for v in range(first_v, end_v):
                            tap = (u * kw + v) * C + c
                            source = corner + (u * W + v) * C + c
                            acc0 = fma(vload(taps, tap), vload(x_flat, source), acc0)
                            acc1 = fma(vload(taps, tap + lanes), vload(x_flat, source + lanes), acc1)
                            acc2 = fma(vload(taps, tap + 2 * lanes), vload(x_flat, source + 2 * lanes), acc2)
                            acc3 = fma(vload(taps, tap + 3 * lanes), vload(x_flat, source + 3 * lanes), acc3)
                for k, acc in enumerate((acc0, acc1, acc2, acc3)):
                    channel = c + k * lanes
                    y = fma(acc, vload(scale, channel), vload(shift, channel))
                    vstore(out_flat, at + channel, vactivate(y, act))
                c += 4 * lanes
            while c + lanes <= C:
                acc = vzeros(out)
                for u in range(first_u, end_u):
                    for v in range(first_v, end_v):
                        source = corner + (u * W + v) * C + c
                        acc = fma(vload(taps, (u * kw + v) * C + c), vload(x_flat, source), acc)
                vstore(out_flat, at + c, vactivate(fma(acc, vload(scale, c), vload(shift, c)), act))
                c += lanes
            last_channels = c
            while c < C:
                total = out_flat.dtype.type(0.0)
                for u in range(first_u, end_u):
                    for v in range(first_v, end_v):
                        total = fma(taps[(u * kw + v) * C + c], x_flat[corner + (u * W + v) * C + c], total)
                out_flat[at + c] = fma(total, scale[c], shift[c])
                c += 1
            if act and last_channels < C:
                activate(out_flat[at + last_channels : at + C], act)
            j += 1


@jit
def _depthwise_conv2d_shared(x, weight, scale, shift, act, stride, padding, out, schedule, job):
    begin, end = take_chunk(schedule, job)
    while begin < end:
        depthwise_conv2d_rows(x, weight, scale, shift, act, stride, padding, padding, out, begin, end)
        begin, end = take_chunk(schedule, NO_JOB)


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
    Ho, Wo = conv_output_shape(H, W, kh, kw, stride, padding, "depthwise_conv2d", "map")
    taps = np.ascontiguousarray(weight.reshape(C, kh, kw).transpose(1, 2, 0))  # (kh, kw, C)
    scale = np.ones(C, x.dtype) if scale is None else np.ascontiguousarray(scale, x.dtype)
    shift = np.zeros(C, x.dtype) if shift is None else np.ascontiguousarray(shift, x.dtype)
    out = np.empty((B, Ho, Wo, C), dtype=x.dtype)
    arguments = (x, taps, scale, shift, activation_code(act), stride, padding, out)
    macs = out.size * (kh * kw + (MACS_PER_VALUE if act != "none" else 1))
    run_shared(_depthwise_conv2d_shared, arguments, B * Ho, macs)
    return out

# The im2col matrix of a k x k conv (MobileViT's 3x3 convs run as a GEMM over it): each output pixel's row holds the
# k*k input pixels its window covers, zeros where the window hangs over the map's edge, so the padded map is never
# built; the channels of several maps side by side, so a conv on their concatenation (MobileViT's fusion conv on
# cat(shortcut, x)) never builds that either. The output rows are shared out between threads like the depthwise
# conv's.
#
# conv2d runs the same conv without the whole matrix: a band of output rows at a time, its im2col rows written to a
# scratch that stays in the L2 cache and the GEMM run on them right away, so that the matrix (megabytes for the fusion
# conv of MobileViT's larger maps) never goes through memory. The bands are shared out between threads.


@jit
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
        first_u, end_u = taps_inside(i, stride, padding, k, H)
        for j in range(Wo):
            first_v, end_v = taps_inside(j, stride, padding, k, W)
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
                        copy(x_flat[source : source + (end_v - first_v) * C], columns_flat[at:])
                    else:
                        for v in range(first_v, end_v):
                            at = window + (u * k + v) * C + channel
                            source = corner + v * Cm
                            copy(x_flat[source : source + Cm], columns_flat[at:])
                channel += Cm


@jit
def _im2col_shared(maps, channels, H, W, kernel_size, stride, padding, Ho, Wo, columns, schedule, job):
    begin, end = take_chunk(schedule, job)
    while begin < end:
        _im2col_rows(maps, channels, H, W, kernel_size, stride, padding, Ho, Wo, columns[begin * Wo :], begin, end)
        begin, end = take_chunk(schedule, NO_JOB)


@jit
def _conv2d_shared(maps, channels, H, W, kernel_size, stride, padding, Ho, Wo, panels, scale, shift, act, residual, y,
                   band_rows, block_bytes, n_columns, schedule, job):
    # The items are (band, panel) pairs, band by band, a band being band_rows output rows (b * Ho + i): for a run of
    # panels over a band, the band's im2col rows go to this thread's scratch (once for its panels), then gemm_panels
    # computes those panels of the band's rows of y (B * Ho * Wo, padded columns) from them.
    n_panels, row_length, _ = panels.shape
    columns = np.empty((band_rows * Wo, row_length), y.dtype)
    block_rows = l2_block_rows(row_length, y.itemsize)
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
            gemm_panels(
                columns[: bottom - top], panels, scale, shift, act, band_residual, y[top:bottom], first_panel,
                end_panel, block_rows, block_bytes, n_columns,
            )
        begin, end = take_chunk(schedule, NO_JOB)


def conv_output_shape(H, W, kh, kw, stride, padding, name, what):
    """(Ho, Wo) of a kh x kw conv over an H x W ``what`` (map or image); a clear error when the kernel does not fit."""
    Ho, Wo = conv_output_size(H, kh, stride, padding), conv_output_size(W, kw, stride, padding)
    if Ho < 1 or Wo < 1:
        raise ValueError(f"{name}: a {kh}x{kw} kernel does not fit a {H}x{W} {what} padded by {padding}")
    return Ho, Wo


def _check_conv_weight(panels, kernel_size, C, dtype, name):
    """A packed conv weight's panels must be ``dtype`` and take the k*k*C values of a window."""
    if panels.dtype != dtype or panels.shape[1] != kernel_size * kernel_size * C:
        raise ValueError(f"{name}: the weight ({panels.dtype}, {panels.shape[1]} inputs) does not fit a "
                         f"{kernel_size}x{kernel_size} conv over {C} {dtype} channels")


def conv_maps(maps, kernel_size, stride, padding, name):
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
    Ho, Wo = conv_output_shape(H, W, kernel_size, kernel_size, stride, padding, name, "map")
    channels = np.array([x.shape[3] for x in maps], np.int64)
    flat_maps = tuple(np.ascontiguousarray(x).reshape(-1) for x in maps)
    return flat_maps, channels, B, H, W, Ho, Wo


def im2col(maps, kernel_size, stride=1, padding=0):
    """The im2col matrix of a ``kernel_size`` x ``kernel_size`` conv with ``stride`` and zero ``padding`` over the
    channel concatenation of NHWC maps (B, H, W, C_m) (``torch.cat(maps, dim=1)`` in NCHW terms, never built):
    (B, Ho, Wo, k*k*C), each row one output pixel's window in (u, v, c) order, as ``ops.conv_windows`` of the
    concatenation reshaped; the padding is never materialised. ``maps`` is one map or a tuple of maps.
    """
    flat_maps, channels, B, H, W, Ho, Wo = conv_maps(maps, kernel_size, stride, padding, "im2col")
    columns = np.empty((B * Ho * Wo, kernel_size * kernel_size * int(channels.sum())), flat_maps[0].dtype)
    arguments = (flat_maps, channels, H, W, kernel_size, stride, padding, Ho, Wo, columns)
    run_shared(_im2col_shared, arguments, B * Ho, columns.size * MACS_PER_COPY)
    return columns.reshape(B, Ho, Wo, -1)


def conv2d(maps, packed, kernel_size, stride=1, padding=0, bias=None, act="none", scale=None, residual=None):
    """``linear(im2col(maps, kernel_size, stride, padding), packed, bias, act, scale, residual)``, the same values bit
    for bit, without the im2col matrix: a band of output rows at a time, its im2col rows in an L2-sized scratch.

    A conv with weight W (out, C, k, k) over the channel concatenation of ``maps`` (one NHWC map or a tuple), packed
    with its columns in (u, v, c) order (``pack_linear_weight`` of W as (out, k, k, C) flattened): (B, Ho, Wo, out).
    """
    flat_maps, channels, B, H, W, Ho, Wo = conv_maps(maps, kernel_size, stride, padding, "conv2d")
    dtype = flat_maps[0].dtype
    panels, out_features = packed
    C = int(channels.sum())
    row_length = kernel_size * kernel_size * C
    _check_conv_weight(panels, kernel_size, C, dtype, "conv2d")
    n_panels, _, width = panels.shape
    padded_scale, padded_shift = padded_scale_shift(n_panels * width, out_features, scale, bias, dtype)
    residual2 = residual_rows(residual, (B, Ho, Wo, out_features), dtype, "conv2d")
    y = aligned_empty((B * Ho * Wo, n_panels * width), dtype)
    band_rows = max(1, L2_ROWS_BYTES // (Wo * row_length * y.itemsize))  # its im2col rows stay in the L2 cache
    code = activation_code(act)
    arguments = (flat_maps, channels, H, W, kernel_size, stride, padding, Ho, Wo, panels, padded_scale, padded_shift,
                 code, residual2, y, band_rows, panel_block_bytes(dtype), out_features)
    macs = B * Ho * Wo * (out_features * (row_length + (MACS_PER_VALUE if code else 0)) + row_length * MACS_PER_COPY)
    run_shared(_conv2d_shared, arguments, -(-(B * Ho) // band_rows) * n_panels, macs)
    if y.shape[1] != out_features:  # the last panel is cut short: drop its padding columns
        y = np.ascontiguousarray(y[:, :out_features])
    return y.reshape(B, Ho, Wo, out_features)


# A network's first conv, on its NCHW input images (MobileViT's stem: 3x3, stride 2, 3 channels in, 16 out), read where
# they are: the sums of conv2d on the images made NHWC, in the same order, so the same values bit for bit. Each output
# vector of channels (one half of a packed weight's panel) sums the window's taps in (u, v, c) order, each pixel value
# broadcast from its channel plane; eight pixels side by side whose windows are inside the image share each weight
# load. It saves the NHWC copy of the images, and conv2d's im2col rows of 27 values on a panel that is half padding.


@jit
def _image_conv2d_pixel(x_flat, weights, depth, width, C, H, W, kernel_size, channel_plane, top, left, vector, taps):
    # The sum over the taps inside the image, taps = (first_u, end_u, first_v, end_v), for output vector ``vector`` of
    # the pixel whose window starts at image row ``top`` and column ``left`` (either may be negative: padding);
    # channel_plane = b * C, the image's first channel plane.
    first_u, end_u, first_v, end_v = taps
    lanes = width // 2
    panel_at = (vector // 2) * depth * width + (vector % 2) * lanes
    acc = vzeros(weights)
    for u in range(first_u, end_u):
        for v in range(first_v, end_v):
            for c in range(C):
                w = vload(weights, panel_at + ((u * kernel_size + v) * C + c) * width)
                acc = fma(vbroadcast(x_flat, ((channel_plane + c) * H + top + u) * W + left + v), w, acc)
    return acc


@jit
def _image_conv2d_shared(images, panels, scale, shift, act, kernel_size, stride, padding, y, Ho, Wo, schedule, job):
    # y[(b * Ho + i) * Wo + j, o] = act(scale[o] * sum_{u, v, c} W[o, c, u, v] * images[b, c, i*stride + u - padding,
    # j*stride + v - padding] + shift[o]) for the output rows b * Ho + i of the chunks this thread takes, y's columns
    # whole vectors (the padding columns from the panels' zero weights). act in the registers.
    _, C, H, W = images.shape
    _, depth, width = panels.shape
    lanes = width // 2
    columns = y.shape[1]
    x_flat = images.reshape(-1)
    weights = panels.reshape(-1)
    y_flat = y.reshape(-1)
    k = kernel_size
    begin, end = take_chunk(schedule, job)
    while begin < end:
        for row in range(begin, end):
            b = row // Ho
            i = row % Ho
            top = i * stride - padding
            first_u, end_u = taps_inside(i, stride, padding, k, H)
            j = 0
            while j < Wo:
                first_v, end_v = taps_inside(j, stride, padding, k, W)
                left = j * stride - padding
                at = (row * Wo + j) * columns
                eight_windows_inside_image = end_u - first_u == k and first_v == 0 and left + 7 * stride + k <= W
                if eight_windows_inside_image:
                    for vector in range(columns // lanes):
                        panel_at = (vector // 2) * depth * width + (vector % 2) * lanes
                        acc0 = acc1 = acc2 = acc3 = acc4 = acc5 = acc6 = acc7 = vzeros(y)
                        for u in range(k):
                            for v in range(k):
                                for c in range(C):
                                    w = vload(weights, panel_at + ((u * k + v) * C + c) * width)  # W[o..., c, u, v]
                                    source = ((b * C + c) * H + top + u) * W + left + v  # images[b, c, top+u, left+v]
                                    acc0 = fma(vbroadcast(x_flat, source), w, acc0)
                                    acc1 = fma(vbroadcast(x_flat, source + stride), w, acc1)
                                    acc2 = fma(vbroadcast(x_flat, source + 2 * stride), w, acc2)
                                    acc3 = fma(vbroadcast(x_flat, source + 3 * stride), w, acc3)
                                    acc4 = fma(vbroadcast(x_flat, source + 4 * stride), w, acc4)
                                    acc5 = fma(vbroadcast(x_flat, source + 5 * stride), w, acc5)
                                    acc6 = fma(vbroadcast(x_flat, source + 6 * stride), w, acc6)
                                    acc7 = fma(vbroadcast(x_flat, source + 7 * stride), w, acc7)
                        o = vector * lanes
                        vector_scale, vector_shift = vload(scale, o), vload(shift, o)
                        for p, acc in enumerate((acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7)):
                            vstore(y_flat, at + p * columns + o, vactivate(fma(acc, vector_scale, vector_shift), act))
                    j += 8
                else:
                    taps = (first_u, end_u, first_v, end_v)
                    for vector in range(columns // lanes):
                        acc = _image_conv2d_pixel(
                            x_flat, weights, depth, width, C, H, W, k, b * C, top, left, vector, taps
                        )
                        o = vector * lanes
                        vstore(y_flat, at + o, vactivate(fma(acc, vload(scale, o), vload(shift, o)), act))
                    j += 1
        begin, end = take_chunk(schedule, NO_JOB)


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
    Ho, Wo = conv_output_shape(H, W, kernel_size, kernel_size, stride, padding, "image_conv2d", "image")
    n_panels, _, width = panels.shape
    lanes = width // 2
    padded_scale, padded_shift = padded_scale_shift(n_panels * width, out_features, scale, bias, images.dtype)
    y = np.empty((B * Ho * Wo, -(-out_features // lanes) * lanes), images.dtype)  # whole vectors of channels
    code = activation_code(act)
    arguments = (images, panels, padded_scale, padded_shift, code, kernel_size, stride, padding, y, Ho, Wo)
    macs = y.size * (panels.shape[1] + (MACS_PER_VALUE if code else 0))
    run_shared(_image_conv2d_shared, arguments, B * Ho, macs)
    if y.shape[1] != out_features:  # the last vector is cut short: drop its padding columns
        y = np.ascontiguousarray(y[:, :out_features])
    return y.reshape(B, Ho, Wo, out_features)
