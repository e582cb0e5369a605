"""The reference backend's ops: each the formula of the torch call it equals, written to be read.

Patches by NumPy stride tricks, Linear as ``x @ W.T + b``, attention as batched matmul over (B, heads, N, head_dim),
convolutions as im2col + matmul; LayerNorm, GELU, SiLU, QuickGELU, softmax and Swin's window partition / reverse and
cyclic roll are the Numba kernels of :mod:`vitnp.reference.kernels`. Model files call these through their backend
(``self.ops``), so that the same forward runs here or on the engine (:mod:`vitnp.fast.ops`, which has the same names,
arguments and results and is tested against these op by op).

An op's arrays share one dtype, float32 or float64, which its result keeps. The optional ``act`` and ``residual``
arguments of the products are the steps that follow them in the seeds' forwards (``fc1`` then GELU, a block's last
Linear then its residual add): y = act(product) + residual.
"""

import numpy as np
from numpy.lib.stride_tricks import as_strided

from .kernels import gelu, group_norm, layer_norm, quick_gelu, roll, silu, softmax, window_partition, window_reverse
from .resample import bilinear_matrix

ACTIVATIONS = ("none", "gelu", "gelu_tanh", "silu", "quick_gelu")

__all__ = [
    "ACTIVATIONS", "apply_rot_embed_cat",
    "attention_probs", "conv2d", "cosine_attention", "gelu", "group_norm", "inverted_residual", "layer_norm", "linear",
    "linear_self_attention", "map_batch",
    "patch_embed", "patchify", "resize_bilinear", "roll", "scaled_dot_product_attention", "silu", "softmax", "tanh",
    "transformer_blocks", "window_partition", "window_reverse",
]


def activation(x, act):
    """``act`` of :data:`ACTIVATIONS` applied to x: 'none' (x itself), 'gelu', 'gelu_tanh' (its tanh form), 'silu',
    'quick_gelu' (x * sigmoid(1.702 x), timm ``QuickGELU``)."""
    if act == "none":
        return x
    if act == "gelu":
        return gelu(x)
    if act == "gelu_tanh":
        return gelu(x, approximate="tanh")
    if act == "silu":
        return silu(x)
    if act == "quick_gelu":
        return quick_gelu(x)
    raise ValueError(f"unknown activation {act!r}: expected one of {ACTIVATIONS}")


def check_dtypes(name, x, *arrays):
    """A ValueError naming the op when an array (None: absent) has another dtype than the input ``x``."""
    for array in arrays:
        if array is not None and np.asarray(array).dtype != x.dtype:
            raise ValueError(f"{name}: input dtype {x.dtype} differs from a parameter's {np.asarray(array).dtype}")


def tanh(x):
    """``torch.tanh``: the activation of ViT's representation (pre-logits) layer."""
    return np.tanh(x)


# ---- Linear and patches ----------------------------------------------------------------------------------------------


def linear(x, weight, bias=None, act="none", residual=None):
    """``torch.nn.functional.linear(x, weight, bias)``: y = x @ W^T + b over the last axis, W (out, in); then
    act(y) + residual."""
    check_dtypes("linear", x, weight, bias, residual)
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear: input has {x.shape[-1]} features on its last axis, the weight takes "
                         f"{weight.shape[1]}")
    y = x.reshape(-1, x.shape[-1]) @ weight.T  # (rows, out): the leading axes as one, so that it is a single GEMM
    y = y.reshape(*x.shape[:-1], weight.shape[0])  # (..., out)
    if bias is not None:
        y = y + bias
    y = activation(y, act)
    return y if residual is None else y + residual


def patchify(x, patch_size):
    """Cut (B, C, H, W) images into non-overlapping p x p patches: (B, gh*gw, C*p*p), gh = H // p, gw = W // p.

    The patches are a strided view of ``x`` (no copy until the final reshape); rows and columns past the last whole
    patch are left out, as a stride-p convolution leaves them. Within a patch the values are ordered (c, kh, kw), the
    order of a Conv2d weight (D, C, p, p) flattened to (D, C*p*p); patches are ordered row-major over the grid, token
    ``t = i*gw + j``, as ``conv(x).flatten(2).transpose(1, 2)`` gives them.
    """
    B, C, H, W = x.shape
    p = patch_size
    gh, gw = H // p, W // p
    sb, sc, sh, sw = x.strides
    patches = as_strided(x, shape=(B, gh, gw, C, p, p), strides=(sb, sh * p, sw * p, sc, sh, sw), writeable=False)
    return patches.reshape(B, gh * gw, C * p * p)


def unpatchify(patches, patch_size, grid_size, in_chans):
    """Inverse of :func:`patchify`: (B, gh*gw, C*p*p) -> (B, C, gh*p, gw*p)."""
    B = patches.shape[0]
    p = patch_size
    gh, gw = grid_size
    x = patches.reshape(B, gh, gw, in_chans, p, p)
    return x.transpose(0, 3, 1, 4, 2, 5).reshape(B, in_chans, gh * p, gw * p)


def patch_embed(x, weight, bias=None):
    """timm ``PatchEmbed``: ``conv(x).flatten(2).transpose(1, 2)`` for a Conv2d with kernel = stride = p, weight
    (D, C, p, p): (B, C, H, W) -> (B, N, D). A convolution whose kernel equals its stride sees each patch once, so it
    is one Linear over the flattened patches, the kernel reshaped to (D, C*p*p)."""
    patches = patchify(x, weight.shape[-1])  # (B, N, C*p*p)
    return linear(patches, weight.reshape(weight.shape[0], -1), bias)  # (B, N, D)


# ---- attention -------------------------------------------------------------------------------------------------------


def attention_probs(q, k, scale, bias=None, mask=None):
    """softmax((q * scale) @ k^T + bias + mask) over the keys, q and k (B, heads, N, head_dim): (B, heads, N, N);
    ``torch.softmax((q * scale) @ k.transpose(-2, -1) + bias, dim=-1)``.

    q is scaled before the product, as timm's non-fused path does. ``bias`` (heads, N, N) is Swin's relative position
    bias; ``mask`` (nW, N, N) Swin's shifted-window mask, window w of each image taking mask[w] (timm's
    ``attn.view(-1, nW, heads, N, N) + mask.unsqueeze(1)``).
    """
    check_dtypes("attention", q, k, bias)
    attn = (q * scale) @ k.swapaxes(-2, -1)  # (B, heads, N, N)
    if bias is not None:
        attn = attn + bias
    if mask is not None:
        nW = mask.shape[0]
        windows = attn.reshape(-1, nW, *attn.shape[1:])  # (images, nW, heads, N, N)
        attn = (windows + mask[:, None].astype(attn.dtype)).reshape(attn.shape)
    return softmax(attn)


def scaled_dot_product_attention(q, k, v, scale, bias=None, mask=None):
    """``F.scaled_dot_product_attention(q, k, v, attn_mask=bias (+ mask), scale=scale)``: softmax((q * scale) @ k^T
    + bias + mask) @ v for q, k, v (B, heads, N, head_dim), as (B, heads, N, head_dim); ``bias`` and ``mask`` as
    :func:`attention_probs` takes them. The queries may be fewer or more than the keys (an attention pool's latent
    queries, q (B, heads, Nq, head_dim) over k and v (B, heads, N, head_dim)): the result is then (B, heads, Nq,
    head_dim), and a ``bias`` (heads, Nq, N)."""
    check_dtypes("attention", q, v)
    check_attention_shapes(q, k, v)
    return attention_probs(q, k, scale, bias, mask) @ v  # (B, heads, Nq, head_dim)


def cosine_attention(q, k, v, logit_scale, eps, bias=None, mask=None):
    """Swin V2's scaled cosine attention: softmax(normalize(q) normalize(k)^T * logit_scale + bias + mask) @ v, with
    ``F.normalize(t, dim=-1, eps=eps)``'s unit rows (each row over max(its norm, eps)) and ``logit_scale`` (heads, 1,
    1) the multiplier of head h's cosines (timm's clamped ``logit_scale.exp()``), folded into q. q, k, v (B, heads, N,
    head_dim); ``bias`` and ``mask`` as :func:`attention_probs` takes them."""
    check_dtypes("cosine_attention", q, k, v, logit_scale)
    check_attention_shapes(q, k, v)
    check_logit_scale(logit_scale, q.shape[1])
    q = q / np.maximum(np.linalg.norm(q, axis=-1, keepdims=True), eps)  # unit rows: (B, heads, N, head_dim)
    k = k / np.maximum(np.linalg.norm(k, axis=-1, keepdims=True), eps)
    return scaled_dot_product_attention(q * logit_scale, k, v, 1.0, bias, mask)


def check_logit_scale(logit_scale, heads):
    """A ValueError unless ``logit_scale`` is (heads, 1, 1), one multiplier per head."""
    if np.shape(logit_scale) != (heads, 1, 1):
        raise ValueError(f"cosine_attention: logit_scale must be ({heads}, 1, 1), one per head, got "
                         f"{np.shape(logit_scale)}")


def check_attention_shapes(q, k, v):
    """A ValueError unless q (B, heads, Nq, head_dim), k and v (B, heads, N, head_dim) fit one another."""
    shapes = f"q {q.shape}, k {k.shape}, v {v.shape}"
    if not q.ndim == k.ndim == v.ndim == 4:
        raise ValueError(f"attention: expected q, k, v of shape (B, heads, N, head_dim), got {shapes}")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"attention: q (B, heads, Nq, head_dim) and k, v (B, heads, N, head_dim) must agree in B, "
                         f"heads and head_dim, and k with v in N; got {shapes}")


def apply_rot_embed_cat(x, emb, half=False):
    """timm ``apply_rot_embed_cat(x, emb, half)``: the rotary position embedding of x (..., N, D) by the table emb
    (N, 2D) = [sin | cos] of its N positions: ``x * cos + rot(x) * sin``.

    rot(x) turns each pair of channels by 90 degrees: with ``half=False`` the pairs are neighbours, (x0, x1), (x2, x3),
    ... -> (-x1, x0, -x3, x2, ...) (timm ``rot``, the table's sin / cos interleaved: s0, s0, s1, s1, ...); with
    ``half=True`` channel i pairs with i + D/2, x -> (-x[D/2:], x[:D/2]) (timm ``rope_rotate_half``, the table
    s0, s1, ..., s0, s1, ...). Each product and the sum rounded in x's dtype, as torch's.
    """
    check_dtypes("apply_rot_embed_cat", x, emb)
    D = x.shape[-1]
    if D % 2 or emb.shape != (x.shape[-2], 2 * D):
        raise ValueError(f"apply_rot_embed_cat: a table of shape {emb.shape} does not fit x of shape {x.shape}: "
                         "expected (positions, 2 * channels), channels even")
    sin, cos = emb[:, :D], emb[:, D:]  # each (N, D)
    if half:
        rotated = np.concatenate([-x[..., D // 2 :], x[..., : D // 2]], axis=-1)
    else:
        pairs = x.reshape(*x.shape[:-1], D // 2, 2)  # (..., N, D/2, 2)
        rotated = np.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
    return x * cos + rotated * sin


def check_linear_self_attention(query, key, value):
    """A ValueError unless query (..., N), key and value (..., N, d) fit together, in one dtype."""
    check_dtypes("linear_self_attention", query, key, value)
    if key.shape != value.shape or key.shape[:-1] != query.shape:
        raise ValueError(f"linear_self_attention: query {query.shape} must be key's and value's shape without the "
                         f"last axis; got key {key.shape}, value {value.shape}")


def linear_self_attention(query, key, value):
    """MobileViT v2's separable self-attention between its two projections (timm ``LinearSelfAttention``), over
    sequences of N tokens that are independent of each other: the context scores are softmax(query) over a
    sequence's tokens, the context vector the keys' sum weighted by them, and each token's output its relu(value)
    times the context vector, channel by channel. query (..., N), key and value (..., N, d) -> (..., N, d):

    out[..., n, c] = relu(value[..., n, c]) * sum_m softmax(query)[..., m] * key[..., m, c]

    torch, in timm's (B, d, P, N) layout (a sequence is one pixel position of every patch): ``scores =
    F.softmax(query, dim=-1); context = (key * scores).sum(dim=-1, keepdim=True); F.relu(value) * context``.
    """
    check_linear_self_attention(query, key, value)
    scores = softmax(query)  # (..., N)
    context = scores[..., None, :] @ key  # (..., 1, d): the scores' weighted sum of the keys
    return np.maximum(value, 0) * context  # (..., N, d)


# ---- convolution on NHWC maps (B, H, W, C) (MobileViT) ---------------------------------------------------------------


def conv_output_size(size, kernel_size, stride, padding):
    """Output length of a convolution along one axis (dilation 1): floor((size + 2 padding - kernel) / stride) + 1."""
    return (size + 2 * padding - kernel_size) // stride + 1


def conv_windows(x, kernel_size, stride, padding):
    """The kernel_size x kernel_size windows of an NHWC map (B, H, W, C) zero-padded by ``padding`` on every side, as
    a read-only strided view (B, Ho, Wo, kh, kw, C) of the padded copy xp: windows[b, i, j, u, v] = xp[b, i*stride +
    u, j*stride + v]. Reshaped to (B, Ho, Wo, kh*kw*C) (one copy) it is the im2col matrix of a convolution.
    """
    B, H, W, C = x.shape
    Ho, Wo = conv_output_size(H, kernel_size, stride, padding), conv_output_size(W, kernel_size, stride, padding)
    if Ho < 1 or Wo < 1:
        raise ValueError(f"conv: a {kernel_size}x{kernel_size} kernel does not fit a {H}x{W} map padded by {padding}")
    xp = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    sb, sh, sw, sc = xp.strides
    shape = (B, Ho, Wo, kernel_size, kernel_size, C)
    return as_strided(xp, shape=shape, strides=(sb, sh * stride, sw * stride, sh, sw, sc), writeable=False)


def conv2d(x, weight, bias=None, stride=1, padding=0, groups=1, scale=None, act="none", residual=None):
    """``torch.nn.functional.conv2d(x, weight, bias, stride, padding, groups=groups)`` (dilation 1) on NHWC maps,
    then a per-channel scale, an activation and a residual: y = act(conv(x, weight) * scale + bias) + residual, as
    (B, Ho, Wo, O). ``weight`` is torch's (O, C / groups, k, k); a BatchNorm in eval mode after a bias-free conv is
    ``scale`` and ``bias``.

    ``x`` is an NHWC map (B, H, W, C), or a tuple of maps read as their channel concatenation (``torch.cat(maps,
    dim=1)`` in NCHW terms). ``groups`` is 1 or C (depthwise). groups=1 is im2col + matmul:
    out[b, i, j, o] = sum_{u, v, c} weight[o, c, u, v] * xp[b, i*stride + u, j*stride + v, c], the windows of
    :func:`conv_windows` as a (B, Ho, Wo, k*k*C) matrix times the weight flattened in the same (u, v, c) order;
    depthwise, each channel filtered by its own kernel: out[b, i, j, c] = sum_{u, v} weight[c, 0, u, v] * xp[b,
    i*stride + u, j*stride + v, c].
    """
    if isinstance(x, tuple):
        x = np.concatenate(x, axis=-1)  # torch.cat(maps, dim=1)
    if x.ndim != 4:
        raise ValueError(f"conv2d: expected an NHWC map (B, H, W, C), got shape {x.shape}")
    check_dtypes("conv2d", x, weight, bias, scale, residual)
    out_chs, C_per_group, kh, kw = weight.shape
    C = x.shape[-1]
    if kh != kw or C_per_group * groups != C or groups not in (1, C) or (groups != 1 and out_chs != C):
        raise ValueError(f"conv2d: weight {weight.shape} with groups={groups} does not fit an NHWC map of shape "
                         f"{x.shape} (plain convs have groups 1, depthwise ones groups = channels)")
    windows = conv_windows(x, kh, stride, padding)  # (B, Ho, Wo, k, k, C)
    if groups == 1:
        columns = windows.reshape(*windows.shape[:3], kh * kw * C)  # (B, Ho, Wo, k*k*C)
        y = columns @ weight.transpose(0, 2, 3, 1).reshape(out_chs, kh * kw * C).T  # (B, Ho, Wo, out_chs)
    else:
        y = np.zeros(windows.shape[:3] + (C,), x.dtype)  # (B, Ho, Wo, C)
        for u in range(kh):
            for v in range(kw):
                y += windows[:, :, :, u, v, :] * weight[:, 0, u, v]
    if scale is not None:
        y = y * scale
    if bias is not None:
        y = y + bias
    y = activation(y, act)
    return y if residual is None else y + residual


def resize_bilinear(x, size, align_corners=False):
    """``F.interpolate(x, size=size, mode='bilinear', align_corners=align_corners)`` of an NHWC map (B, H, W, C),
    separably: out[b, :, :, c] = M_h @ x[b, :, :, c] @ M_w^T with the 1-D weights of :func:`vitnp.reference.resample.
    bilinear_matrix` (MobileViT v1 resizes with align_corners=False, v2 with True)."""
    H, W = x.shape[1:3]
    m_h = bilinear_matrix(H, size[0], align_corners).astype(x.dtype)
    m_w = bilinear_matrix(W, size[1], align_corners).astype(x.dtype)
    resized = m_h @ x.transpose(0, 3, 1, 2) @ m_w.T  # (B, C, size[0], size[1])
    return np.ascontiguousarray(resized.transpose(0, 2, 3, 1))


# ---- whole blocks, which the fast backend runs as one kernel each ----------------------------------------------------


def inverted_residual(x, expand, depthwise, project, shortcut=False):
    """timm ``BottleneckBlock.forward`` as MobileViT's MV2 (MobileNetV2 inverted residual) block, from its three
    ConvNormAct layers: project(depthwise(expand(x))), plus x with ``shortcut``."""
    h = expand(x)  # (B, H, W, mid): 1x1, BatchNorm, SiLU
    h = depthwise(h)  # (B, H / stride, W / stride, mid): depthwise k x k, BatchNorm, SiLU
    return project(h, residual=x if shortcut else None)  # (B, H / stride, W / stride, out): 1x1, BatchNorm (+ x)


def transformer_blocks(x, blocks):
    """timm transformer ``Block``s applied in turn to sequences x (S, N, C) that are independent of each other
    (MobileViT's patch sequences): ``for block in blocks: x = block(x)``."""
    for block in blocks:
        x = block(x)
    return x


def map_batch(forward, x):
    """``forward(x)`` on the whole batch at once."""
    return forward(x)
