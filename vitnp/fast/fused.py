"""Two of MobileViT's blocks, each as one kernel call: the MV2 (inverted residual) block, and a transformer block over
many short sequences. The same kernels, in the same order, as their layers one by one: the same bits (tested).
"""

import numpy as np

from ..threads import get_num_threads
from .activations import NO_ACTIVATION, activation_code
from .attention import attention_items
from .conv import conv_output_shape, depthwise_conv2d_rows
from .gemm import (
    L2_ROWS_BYTES,
    gemm_panels,
    l2_block_rows,
    linear_rows,
    padded_scale_shift,
    padded_vector,
    panel_block_bytes,
)
from .pool import MACS_PER_VALUE, run_shared
from .rows import layer_norm_rows
from .schedule import NO_JOB, one_thread_schedule, take_chunk
from .vecmath import ZERO, copy, copy_leading_columns, jit

# ---------------------------------------------------------------------------------------------------------------------
# The MV2 (inverted residual) block in one pass
#
# Expand 1x1 (in -> mid, SiLU), depthwise kxk at the block's stride (SiLU), project 1x1 (mid -> out) plus the
# shortcut. Run one after the other over whole maps, the expanded map and the depthwise conv's output go through
# memory between them. Here each thread computes its range of output rows a tile of a few rows at a time: the input
# rows the tile's windows cover are expanded into a band that stays in the L2 cache (the rows it shares with the tile
# before are moved to the band's top, not computed again), the depthwise conv runs on the band, and the projection on
# its output, adding the shortcut as it writes the tile's rows. At batch 1 each thread takes a run of rows (at a larger
# batch a thread is one chunk's forward).
# ---------------------------------------------------------------------------------------------------------------------


@jit
def _inverted_residual_shared(
    x, expand_panels, expand_scale, expand_shift, expand_act, taps, depthwise_scale, depthwise_shift, depthwise_act,
    stride, padding, project_panels, project_scale, project_shift, project_act, out_chs, shortcut, out, tile_rows,
    parts, block_bytes, schedule, job,
):
    # out[b, i] for the output rows b * Ho + i, cut into ``parts`` runs: a chunk of runs is one run of rows, computed
    # tile_rows at a time, whose first tile expands the rows it shares with the run before again. x (B, H, W, in); taps
    # (k, k, padded_mid), depthwise_scale and _shift (padded_mid,), zero taps and scale 1, shift 0 on the expand GEMM's
    # padding columns; project_panels (mid deep); shortcut the rows of x, or (0, 0): none; out (B, Ho, Wo, padded out).
    B, H, W, in_chs = x.shape
    _, Ho, Wo, padded_out = out.shape
    kernel_size, _, padded_mid = taps.shape
    mid = project_panels.shape[1]
    x_rows = x.reshape(B * H * W, in_chs)
    out_rows = out.reshape(B * Ho * Wo, padded_out)
    band = np.empty(((tile_rows - 1) * stride + kernel_size) * W * padded_mid, x.dtype)  # (rows, W, padded_mid)
    tile = np.empty(tile_rows * Wo * padded_mid, x.dtype)  # the depthwise conv's output, (n, Wo, padded_mid)
    compact = np.empty(tile_rows * Wo * mid if mid < padded_mid else 0, x.dtype)  # it without the padding channels
    none = np.zeros((0, 0), x.dtype)
    expand_block = l2_block_rows(in_chs, x.itemsize)
    project_block = l2_block_rows(mid, x.itemsize)
    begin, end = take_chunk(schedule, job)
    while begin < end:
        row, end_row = begin * B * Ho // parts, end * B * Ho // parts
        image = band_top = band_bottom = -1  # the band holds the expanded input rows [band_top, band_bottom) of image
        while row < end_row:
            b, i = row // Ho, row % Ho
            n = min(end_row, (b + 1) * Ho, row + tile_rows) - row  # the tile: output rows i .. i + n - 1 of image b
            top = max(0, i * stride - padding)  # the input rows their windows cover, inside the map
            bottom = min(H, (i + n - 1) * stride - padding + kernel_size)
            kept = 0
            if image == b and band_top <= top < band_bottom:  # rows the tile before expanded: to the band's top
                kept = band_bottom - top
                copy(band[(top - band_top) * W * padded_mid : (band_bottom - band_top) * W * padded_mid], band)
            rows = bottom - top
            expanded = band[: rows * W * padded_mid].reshape(rows * W, padded_mid)
            gemm_panels(  # expand 1x1: the band's new rows
                x_rows[(b * H + top + kept) * W : (b * H + bottom) * W], expand_panels, expand_scale, expand_shift,
                expand_act, none, expanded[kept * W :], ZERO, expand_panels.shape[0], expand_block, block_bytes, mid,
            )
            image, band_top, band_bottom = b, top, bottom
            depthwise_out = tile[: n * Wo * padded_mid].reshape(1, n, Wo, padded_mid)
            depthwise_conv2d_rows(  # the band's windows of output row i + t start at its row t * stride - row_padding
                expanded.reshape(1, rows, W, padded_mid), taps, depthwise_scale, depthwise_shift, depthwise_act,
                stride, padding, top - (i * stride - padding), depthwise_out, ZERO, n,
            )
            projected = depthwise_out.reshape(n * Wo, padded_mid)
            if mid < padded_mid:  # the projection's input without the padding channels
                unpadded = compact[: n * Wo * mid].reshape(n * Wo, mid)
                copy_leading_columns(projected, unpadded)
                projected = unpadded
            residual = shortcut[row * Wo : (row + n) * Wo] if shortcut.shape[0] else none
            gemm_panels(  # project 1x1 (+ shortcut)
                projected, project_panels, project_scale, project_shift, project_act, residual,
                out_rows[row * Wo : (row + n) * Wo], ZERO, project_panels.shape[0], project_block, block_bytes,
                out_chs,
            )
            row += n
        begin, end = take_chunk(schedule, NO_JOB)


def inverted_residual(x, expand, depthwise, project, stride=1, padding=1, shortcut=False, tile_rows=None):
    """MobileViT's MV2 block (timm ``BottleneckBlock``) on an NHWC map (B, H, W, in_chs), in one pass over memory:
    ``project(depthwise(expand(x))) (+ x)`` as (B, Ho, Wo, out_chs).

    ``expand`` and ``project`` are 1x1 convs as :func:`linear` takes them, ``(packed, scale, shift, act)`` with
    ``packed`` from :func:`pack_linear_weight` ((mid, in_chs) and (out_chs, mid)); ``depthwise`` is ``(weight, scale,
    shift, act)`` as :func:`depthwise_conv2d` takes them (weight (mid, 1, k, k)) with ``stride`` and ``padding``; a
    scale or shift of None is 1 or 0. ``shortcut`` adds x (stride 1, in_chs = out_chs). The same values, bit for bit,
    as ``linear``, ``depthwise_conv2d`` and ``linear`` with the residual, one after the other. ``tile_rows``, the output
    rows computed together, defaults to as many as keep their expanded rows in the L2 cache.
    """
    (expand_packed, expand_scale, expand_shift, expand_act) = expand
    (weight, depthwise_scale, depthwise_shift, depthwise_act) = depthwise
    (project_packed, project_scale, project_shift, project_act) = project
    if x.ndim != 4:
        raise ValueError(f"inverted_residual: expected an NHWC map (B, H, W, C), got shape {x.shape}")
    x = np.ascontiguousarray(x)
    B, H, W, in_chs = x.shape
    (expand_panels, mid), (project_panels, out_chs) = expand_packed, project_packed
    for name, panels, depth in (("expand", expand_panels, in_chs), ("project", project_panels, mid)):
        if panels.dtype != x.dtype:
            raise ValueError(f"inverted_residual: input dtype {x.dtype} differs from the {name} weight's "
                             f"{panels.dtype}")
        if panels.shape[1] != depth:
            raise ValueError(f"inverted_residual: the {name} weight takes {panels.shape[1]} channels, not {depth}")
    square = weight.ndim == 4 and weight.shape[2] == weight.shape[3]
    if weight.dtype != x.dtype or not square or weight.shape[:2] != (mid, 1):
        raise ValueError(
            f"inverted_residual: depthwise weight {weight.dtype} {weight.shape} does not fit {mid} {x.dtype} channels:"
            f" expected ({mid}, 1, k, k)"
        )
    if shortcut and (stride != 1 or out_chs != in_chs):
        raise ValueError(f"inverted_residual: a shortcut needs stride 1 and out_chs = in_chs, got {stride}, {out_chs}")
    if tile_rows is not None and tile_rows < 1:
        raise ValueError(f"inverted_residual: tile_rows must be at least 1, got {tile_rows}")
    kernel_size = weight.shape[2]
    Ho, Wo = conv_output_shape(H, W, kernel_size, kernel_size, stride, padding, "inverted_residual", "map")
    width = expand_panels.shape[2]
    padded_mid, padded_out = expand_panels.shape[0] * width, project_panels.shape[0] * width
    taps = np.zeros((kernel_size, kernel_size, padded_mid), x.dtype)  # (k, k, padded_mid): zero on the padding
    taps[:, :, :mid] = weight.reshape(mid, kernel_size, kernel_size).transpose(1, 2, 0)
    out = np.empty((B, Ho, Wo, padded_out), x.dtype)
    if tile_rows is None:  # a tile's band of expanded rows and its depthwise output stay in the L2 cache
        tile_rows = max(1, L2_ROWS_BYTES // (x.itemsize * padded_mid * (stride * W + Wo)))
    parts = min(max(B, get_num_threads()), B * Ho)  # at batch 1 one run of rows a thread
    arguments = (
        x, expand_panels, *padded_scale_shift(padded_mid, mid, expand_scale, expand_shift, x.dtype),
        activation_code(expand_act), taps, padded_vector(depthwise_scale, 1.0, padded_mid, mid, x.dtype),
        padded_vector(depthwise_shift, 0.0, padded_mid, mid, x.dtype), activation_code(depthwise_act), stride, padding,
        project_panels, *padded_scale_shift(padded_out, out_chs, project_scale, project_shift, x.dtype),
        activation_code(project_act), out_chs, x.reshape(-1, in_chs) if shortcut else np.zeros((0, 0), x.dtype), out,
        tile_rows, parts, panel_block_bytes(x.dtype),
    )
    activations = sum(MACS_PER_VALUE for act in (expand_act, depthwise_act, project_act) if act != "none")
    macs = B * H * W * mid * in_chs + B * Ho * Wo * mid * (kernel_size**2 + out_chs) + out.size * activations
    run_shared(_inverted_residual_shared, arguments, parts, macs)
    if padded_out != out_chs:  # the projection's last panel is cut short: drop its padding columns
        out = np.ascontiguousarray(out[..., :out_chs])
    return out

# ---------------------------------------------------------------------------------------------------------------------
# A transformer block over many short sequences, a chunk of sequences at a time
#
# MobileViT's transformers run on patch_size^2 sequences an image (4 at batch 1) of 16 to 256 tokens: ops too small to
# share out one by one; run as one chunk of sequences per thread from Python, the threads wait on each other for the
# GIL between ops. Here a chunk of whole sequences goes through the whole block in one call that holds no GIL: the
# same kernels on the same rows as layers.Block's steps on this backend, so the same bits (tested).
# ---------------------------------------------------------------------------------------------------------------------


@jit
def _transformer_block_shared(
    x, norm1_weight, norm1_bias, norm1_eps, qkv_panels, qkv_scale, qkv_shift, proj_panels, proj_scale, proj_shift,
    norm2_weight, norm2_bias, norm2_eps, fc1_panels, fc1_scale, fc1_shift, act, fc2_panels, fc2_scale, fc2_shift,
    heads, attention_scale, block_bytes, out, schedule, job,
):
    # out[s] = layers.Block's forward of sequence x[s] (N, dim) for the sequences s of the chunks this thread takes
    _, N, dim = x.shape
    head_dim = dim // heads
    none = np.zeros((0, 0), x.dtype)
    no_bias = np.zeros((0, 0, 0), x.dtype)
    begin, end = take_chunk(schedule, job)
    while begin < end:
        sequences = end - begin
        rows = sequences * N
        x_rows = x[begin:end].reshape(rows, dim)
        h = np.empty((rows, dim), x.dtype)
        layer_norm_rows(x_rows, norm1_weight, norm1_bias, norm1_eps, h)  # norm1(x)
        qkv = linear_rows(h, qkv_panels, qkv_scale, qkv_shift, NO_ACTIVATION, none, 3 * dim, block_bytes)
        attended = np.empty((sequences, N, heads, head_dim), x.dtype)  # softmax((q * scale) @ k^T) @ v per head
        qkv = qkv.reshape(sequences, N, 3, heads, head_dim)  # (sequences, N, 3, heads, head_dim), as Attention's
        items = one_thread_schedule(sequences * heads)  # the chunk's (sequence, head) pairs, all on this thread
        attention_items(qkv, attention_scale, no_bias, no_bias, attended, qkv_panels.shape[2], items, NO_JOB)
        attended_rows = attended.reshape(rows, dim)
        x_rows = linear_rows(  # x + proj(attended)
            attended_rows, proj_panels, proj_scale, proj_shift, NO_ACTIVATION, x_rows, dim, block_bytes,
        )
        layer_norm_rows(x_rows, norm2_weight, norm2_bias, norm2_eps, h)  # norm2(x)
        hidden = linear_rows(h, fc1_panels, fc1_scale, fc1_shift, act, none, fc2_panels.shape[1], block_bytes)  # fc1
        x_rows = linear_rows(  # x + fc2(act(fc1(h)))
            hidden, fc2_panels, fc2_scale, fc2_shift, NO_ACTIVATION, x_rows, dim, block_bytes,
        )
        out_rows = out[begin:end].reshape(rows, dim)
        for r in range(rows):
            copy(x_rows[r], out_rows[r])
        begin, end = take_chunk(schedule, NO_JOB)


def transformer_block(x, norm1, qkv, proj, norm2, fc1, fc2, num_heads, scale, act):
    """timm's pre-norm transformer ``Block`` (:class:`vitnp.layers.Block`) on sequences x (S, N, dim), a chunk of whole
    sequences per call, the chunks shared out between threads: x = x + proj(attention(qkv(norm1(x)))), then x = x +
    fc2(act(fc1(norm2(x)))). The same bits as the block's ops one by one.

    ``norm1``, ``norm2``: (weight, bias, eps) of the LayerNorms; ``qkv``, ``proj``, ``fc1``, ``fc2``: (packed, bias)
    of the Linears, packed by :func:`pack_linear_weight` (bias None: none); ``scale`` the attention's (q * scale);
    ``act`` fc1's activation.
    """
    if x.ndim != 3:
        raise ValueError(f"transformer_block: expected sequences (S, N, dim), got shape {x.shape}")
    x = np.ascontiguousarray(x)
    S, N, dim = x.shape
    if dim % num_heads:
        raise ValueError(f"transformer_block: dim {dim} is not divisible by num_heads {num_heads}")
    for name, (weight, bias, _) in (("norm1", norm1), ("norm2", norm2)):
        if weight.shape != (dim,) or bias.shape != (dim,):
            raise ValueError(f"transformer_block: {name} weight {weight.shape} and bias {bias.shape} do not fit dim "
                             f"{dim}")
    linears = {}
    for name, (packed, bias), (depth, out_features) in zip(
        ("qkv", "proj", "fc1", "fc2"), (qkv, proj, fc1, fc2),
        ((dim, 3 * dim), (dim, dim), (dim, fc1[0].out_features), (fc1[0].out_features, dim)),
    ):
        panels = packed.panels
        if panels.dtype != x.dtype or panels.shape[1] != depth or packed.out_features != out_features:
            raise ValueError(
                f"transformer_block: {name} weight {panels.dtype} ({packed.out_features}, {panels.shape[1]}) does not"
                f" fit {x.dtype} sequences of dim {dim}: expected ({out_features}, {depth})"
            )
        padded_columns = panels.shape[0] * panels.shape[2]
        linears[name] = (panels, *padded_scale_shift(padded_columns, out_features, None, bias, x.dtype))
    out = np.empty_like(x)
    arguments = (
        x, *norm1, *linears["qkv"], *linears["proj"], *norm2, *linears["fc1"], activation_code(act),
        *linears["fc2"], num_heads, x.dtype.type(scale), panel_block_bytes(x.dtype), out,
    )
    hidden = fc1[0].out_features
    values = num_heads * N + hidden + 2 * dim  # a token's softmax, activation and LayerNorm values
    macs = S * N * (dim * (4 * dim + 2 * hidden) + 2 * N * dim + MACS_PER_VALUE * values)
    run_shared(_transformer_block_shared, arguments, S, macs)
    return out
