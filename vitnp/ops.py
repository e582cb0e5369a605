"""The readable NumPy definition of every op vitnp uses.

Each function is the formula written out, with the torch call it equals. The models call the ones here that are
plain NumPy already (linear, patchify, attention's matmuls); for LayerNorm, GELU and softmax the models call the
Numba kernels of :mod:`vitnp.kernels`, and the definitions here are the specification those kernels are tested
against.
"""

import math

import numpy as np
from numpy.lib.stride_tricks import as_strided

_erf = np.frompyfunc(math.erf, 1, 1)


def linear(x, weight, bias=None):
    """``torch.nn.functional.linear``: y = x @ W^T + b, with W of shape (out, in).

    The leading axes are folded into one so the product is a single GEMM whatever the rank of ``x``.
    """
    y = x.reshape(-1, x.shape[-1]) @ weight.T  # (rows, out)
    if bias is not None:
        y += bias
    return y.reshape(*x.shape[:-1], weight.shape[0])


def layer_norm(x, weight, bias, eps):
    """``torch.nn.functional.layer_norm(x, (C,), weight, bias, eps)``: (x - mean) / sqrt(var + eps) * w + b."""
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)  # biased variance, as torch
    return (x - mean) / np.sqrt(var + eps) * weight + bias


def gelu(x, approximate="none"):
    """``torch.nn.functional.gelu``: 0.5 x (1 + erf(x / sqrt 2)), or the tanh approximation."""
    if approximate == "tanh":
        return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    return (0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))).astype(x.dtype)


def softmax(x):
    """``torch.softmax(x, dim=-1)``, with the row maximum subtracted so that exp() cannot overflow."""
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def tanh(x):
    """``torch.tanh``: the activation of the pre-logits (representation) layer."""
    return np.tanh(x)


def patchify(x, patch_size):
    """Cut (B, C, H, W) images into non-overlapping p x p patches: (B, gh*gw, C*p*p).

    The patches are a strided view of ``x`` (no copy until the final reshape). Within a patch the values are ordered
    (c, kh, kw), the order of a Conv2d weight (D, C, p, p) flattened to (D, C*p*p); patches are ordered row-major
    over the grid, token ``t = i*gw + j`` as ``conv(x).flatten(2).transpose(1, 2)`` gives them.
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


def patch_embed(x, weight, bias):
    """``torch.nn.functional.conv2d(x, weight, bias, stride=p)`` with kernel = stride = p, as tokens (B, N, D).

    A convolution whose kernel equals its stride sees each patch once, so it is one Linear over the flattened
    patches with the kernel reshaped to (D, C*p*p).
    """
    patches = patchify(x, weight.shape[-1])  # (B, N, C*p*p)
    return linear(patches, weight.reshape(weight.shape[0], -1), bias)  # (B, N, D)


def scaled_dot_product_attention(q, k, v, scale, bias=None):
    """softmax(q k^T * scale + bias) v over (..., N, head_dim): ``F.scaled_dot_product_attention``.

    q is scaled before the product, as timm's non-fused path does; ``bias`` (broadcastable to (..., N, N)) carries
    a relative-position bias or a mask.
    """
    attn = (q * scale) @ k.swapaxes(-2, -1)  # (..., N, N)
    if bias is not None:
        attn = attn + bias
    return softmax(attn) @ v  # (..., N, head_dim)


def multi_head_attention(x, qkv_weight, qkv_bias, proj_weight, proj_bias, num_heads):
    """timm ``Attention.forward``: one qkv projection, heads split, attention per head, heads joined, proj."""
    B, N, C = x.shape
    head_dim = C // num_heads
    qkv = linear(x, qkv_weight, qkv_bias).reshape(B, N, 3, num_heads, head_dim)
    q, k, v = qkv.transpose(2, 0, 3, 1, 4)  # each (B, heads, N, head_dim)
    x = scaled_dot_product_attention(q, k, v, head_dim**-0.5)  # (B, heads, N, head_dim)
    x = x.transpose(0, 2, 1, 3).reshape(B, N, C)
    return linear(x, proj_weight, proj_bias)


# ---------------------------------------------------------------------------------------------------------------------
# Swin: window partition / reverse / cyclic roll (the readable definitions of the kernels of the same names)
# ---------------------------------------------------------------------------------------------------------------------


def roll(x, shifts):
    """``torch.roll(x, shifts, dims=(1, 2))`` on a (B, H, W, C) map: out[:, i, j] = x[:, i - s_h, j - s_w] (mod H, W)."""
    return np.roll(x, shifts, axis=(1, 2))


def window_partition(x, window_size):
    """(B, H, W, C) -> (B*nW, wh*ww, C): zero-pad bottom / right to whole windows, then cut the windows.

    timm's ``F.pad`` + ``window_partition`` + ``view(-1, wh*ww, C)``; windows ordered (b, window row, window column),
    tokens row-major inside a window.
    """
    B, H, W, C = x.shape
    wh, ww = window_size
    pad_h, pad_w = (wh - H % wh) % wh, (ww - W % ww) % ww
    x = np.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
    Hp, Wp = H + pad_h, W + pad_w
    x = x.reshape(B, Hp // wh, wh, Wp // ww, ww, C).transpose(0, 1, 3, 2, 4, 5)  # (B, nWh, nWw, wh, ww, C)
    return x.reshape(-1, wh * ww, C)


def window_reverse(windows, window_size, H, W):
    """Inverse of :func:`window_partition`: (B*nW, wh*ww, C) -> (B, H, W, C), the padding cropped away."""
    wh, ww = window_size
    Hp, Wp = -(-H // wh) * wh, -(-W // ww) * ww
    C = windows.shape[-1]
    x = windows.reshape(-1, Hp // wh, Wp // ww, wh, ww, C).transpose(0, 1, 3, 2, 4, 5)  # (B, nWh, wh, nWw, ww, C)
    return x.reshape(-1, Hp, Wp, C)[:, :H, :W]


# ---------------------------------------------------------------------------------------------------------------------
# MobileViT: convolution, BatchNorm (eval), SiLU, bilinear resize, on NHWC maps (B, H, W, C)
#
# MobileViT keeps its feature maps NHWC, as Swin does: a 1x1 conv is then a Linear over the channels, a kxk conv a
# Linear over the im2col rows of the windows of :func:`conv_windows` (:func:`vitnp.kernels.conv2d` builds them a band
# at a time, as :func:`vitnp.kernels.im2col` builds them all; both on the GEMM of :func:`vitnp.kernels.linear`, with the
# BatchNorm and SiLU applied as each output tile is written), and the depthwise kernel's innermost loop runs over
# contiguous channels. The model calls batch_norm_scale_shift / fold_batch_norm /
# resize_bilinear from here; the definitions of conv_windows, conv2d, depthwise_conv2d, batch_norm and silu are what
# those kernels are held to.
# ---------------------------------------------------------------------------------------------------------------------


def conv_output_size(size, kernel_size, stride, padding):
    """Output length of a convolution along one axis (dilation 1): floor((size + 2 padding - kernel) / stride) + 1."""
    return (size + 2 * padding - kernel_size) // stride + 1


def conv_windows(x, kernel_size, stride, padding):
    """The kernel_size x kernel_size windows of an NHWC map (B, H, W, C) zero-padded by ``padding`` on every side, as
    a read-only strided view (B, Ho, Wo, kh, kw, C) of the padded copy xp: windows[b, i, j, u, v] = xp[b, i*stride +
    u, j*stride + v]. Reshaped to (B, Ho, Wo, kh*kw*C) (one copy) it is the im2col matrix of a convolution.
    """
    if x.ndim != 4:
        raise ValueError(f"conv: expected an NHWC map (B, H, W, C), got shape {x.shape}")
    B, H, W, C = x.shape
    Ho, Wo = conv_output_size(H, kernel_size, stride, padding), conv_output_size(W, kernel_size, stride, padding)
    if Ho < 1 or Wo < 1:
        raise ValueError(f"conv: a {kernel_size}x{kernel_size} kernel does not fit a {H}x{W} map padded by {padding}")
    xp = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    sb, sh, sw, sc = xp.strides
    shape = (B, Ho, Wo, kernel_size, kernel_size, C)
    return as_strided(xp, shape=shape, strides=(sb, sh * stride, sw * stride, sh, sw, sc), writeable=False)


def conv2d(x, weight, bias=None, stride=1, padding=0):
    """``torch.nn.functional.conv2d(x, weight, bias, stride, padding)`` (dilation 1, groups 1) on an NHWC map, by
    im2col: (B, H, W, C) -> (B, Ho, Wo, O), ``weight`` torch's (O, C, k, k).

    out[b, i, j, o] = bias[o] + sum_{u, v, c} weight[o, c, u, v] * xp[b, i*stride + u, j*stride + v, c] with xp the
    map zero-padded by ``padding``: the windows (:func:`conv_windows`) as a (B, Ho, Wo, k*k*C) matrix times the weight
    flattened in the same (u, v, c) order.
    """
    O, C, kh, kw = weight.shape
    if kh != kw or x.ndim != 4 or x.shape[-1] != C:
        raise ValueError(f"conv2d: weight {weight.shape} does not fit an NHWC map of shape {x.shape}")
    windows = conv_windows(x, kh, stride, padding)  # (B, Ho, Wo, k, k, C)
    columns = windows.reshape(*windows.shape[:3], kh * kw * C)  # (B, Ho, Wo, k*k*C)
    out = columns @ weight.transpose(0, 2, 3, 1).reshape(O, kh * kw * C).T  # (B, Ho, Wo, O)
    if bias is not None:
        out += bias
    return out


def depthwise_conv2d(x, weight, bias=None, stride=1, padding=0):
    """``torch.nn.functional.conv2d(x, weight, bias, stride, padding, groups=C)`` on an NHWC map (B, H, W, C),
    ``weight`` torch's (C, 1, k, k): each channel filtered by its own kernel,
    out[b, i, j, c] = bias[c] + sum_{u, v} weight[c, 0, u, v] * xp[b, i*stride + u, j*stride + v, c].
    """
    windows = conv_windows(x, weight.shape[2], stride, padding)  # (B, Ho, Wo, k, k, C)
    out = np.einsum("bijuvc,cuv->bijc", windows, weight[:, 0])
    if bias is not None:
        out += bias
    return out


def batch_norm(x, weight, bias, running_mean, running_var, eps):
    """BatchNorm in eval mode, ``F.batch_norm(x, running_mean, running_var, weight, bias, training=False, eps=eps)``,
    on an NHWC map (the channels last): y = (x - running_mean) / sqrt(running_var + eps) * weight + bias per channel.
    """
    return (x - running_mean) / np.sqrt(running_var + eps) * weight + bias


def batch_norm_scale_shift(weight, bias, running_mean, running_var, eps):
    """BatchNorm in eval mode as the per-channel affine y = x * scale + shift (how torch's CPU kernel applies it).

    scale = weight / sqrt(running_var + eps), shift = bias - running_mean * scale.
    """
    scale = weight / np.sqrt(running_var + eps)
    return scale, bias - running_mean * scale


def fold_batch_norm(conv_weight, weight, bias, running_mean, running_var, eps):
    """A bias-free conv followed by eval BatchNorm, as one conv: returns (folded weight, folded bias).

    BN(conv(x, W)) = conv(x, W) * scale + shift = conv(x, W * scale[o]) + shift, per output channel o, with scale and
    shift of :func:`batch_norm_scale_shift`. Computed in float64 and rounded once to the weight's dtype, so the
    folded conv differs from conv-then-BN by rounding only.
    """
    scale, shift = batch_norm_scale_shift(
        *(np.asarray(v, dtype=np.float64) for v in (weight, bias, running_mean, running_var)), eps
    )
    folded = np.asarray(conv_weight, dtype=np.float64) * scale[:, None, None, None]
    return folded.astype(conv_weight.dtype), shift.astype(conv_weight.dtype)


def silu(x):
    """``torch.nn.functional.silu``: SiLU(x) = x * sigmoid(x) = x / (1 + exp(-x))."""
    with np.errstate(over="ignore"):  # exp(-x) = inf for x < -88 (float32): x / inf = -0, the right limit
        return x / (1 + np.exp(-x))


def bilinear_matrix(n_in, n_out):
    """(n_out, n_in) weights of bilinear resampling along one axis, ``align_corners=False``, no antialias.

    Output i reads the input at src = (i + 0.5) * n_in / n_out - 0.5, clamped below at 0, and mixes its two neighbours
    x0 = floor(src) and x1 = min(x0 + 1, n_in - 1) with weights 1 - l and l, l = src - x0: torch's
    ``upsample_bilinear2d`` index arithmetic.
    """
    src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    x0 = src.astype(np.int64)
    x1 = np.minimum(x0 + 1, n_in - 1)
    lam = src - x0
    matrix = np.zeros((n_out, n_in))
    rows = np.arange(n_out)
    np.add.at(matrix, (rows, x0), 1.0 - lam)
    np.add.at(matrix, (rows, x1), lam)  # x1 == x0 at the last input: the weights add up to 1 there
    return matrix


def resize_bilinear(x, size):
    """``F.interpolate(x, size=size, mode='bilinear', align_corners=False)`` on (B, C, H, W), separably.

    out[b, c] = M_h @ x[b, c] @ M_w^T with the 1-D weight matrices of :func:`bilinear_matrix`.
    """
    H, W = x.shape[-2:]
    m_h = bilinear_matrix(H, size[0]).astype(x.dtype)
    m_w = bilinear_matrix(W, size[1]).astype(x.dtype)
    return m_h @ x @ m_w.T  # (B, C, size[0], size[1])


# ---------------------------------------------------------------------------------------------------------------------
# Position-embedding resampling: the 1-D weight matrices of torch's bicubic interpolation (the three variants timm,
# DINO and Hugging Face use), applied separably to the (D, gh, gw) grid of a position embedding
# ---------------------------------------------------------------------------------------------------------------------


def cubic_weight(x, A):
    """Keys' cubic convolution kernel with parameter A (torch's bicubic: A = -0.75; PIL / antialias: A = -0.5)."""
    x = abs(x)
    if x <= 1:
        return ((A + 2) * x - (A + 3)) * x * x + 1
    if x < 2:
        return ((A * x - 5 * A) * x + 8 * A) * x - 4 * A
    return 0.0


def bicubic_matrix(n_in, n_out, align_corners=False, scale_factor=None, A=-0.75):
    """(n_out, n_in) weights of ``F.interpolate(mode='bicubic', antialias=False)`` along one axis.

    Output i reads the input at src = (i + 0.5) / scale - 0.5 (align_corners=False; scale = n_out / n_in, or the
    given ``scale_factor``, which torch uses as is: DINO's +0.1) or src = i (n_in - 1) / (n_out - 1)
    (align_corners=True), and mixes the four taps floor(src) - 1 .. floor(src) + 2, clamped to the border, with
    the cubic kernel's weights at their distances to src.
    """
    if align_corners:
        step = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
    else:
        step = 1.0 / scale_factor if scale_factor else n_in / n_out
    matrix = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = i * step if align_corners else (i + 0.5) * step - 0.5
        x0 = math.floor(src)
        t = src - x0
        for k, distance in zip(range(-1, 3), (1 + t, t, 1 - t, 2 - t)):
            matrix[i, min(max(x0 + k, 0), n_in - 1)] += cubic_weight(distance, A)
    return matrix


def aa_bicubic_matrix(n_in, n_out, A=-0.5):
    """(n_out, n_in) weights of ``F.interpolate(mode='bicubic', antialias=True, align_corners=False)`` on one axis.

    PIL's resampling filter: output i is centred at c = (i + 0.5) n_in / n_out; the cubic kernel (A = -0.5) is
    stretched by the scale when shrinking (support 2 * max(scale, 1)), and the weights of the taps inside the image
    are divided by their sum (a window cut by the border is renormalised).
    """
    scale = n_in / n_out
    support = 2.0 * max(scale, 1.0)
    stretch = 1.0 / scale if scale >= 1.0 else 1.0
    matrix = np.zeros((n_out, n_in))
    for i in range(n_out):
        centre = scale * (i + 0.5)
        lo = max(int(centre - support + 0.5), 0)
        hi = min(int(centre + support + 0.5), n_in)
        weights = np.array([cubic_weight((j + 0.5 - centre) * stretch, A) for j in range(lo, hi)])
        matrix[i, lo:hi] = weights / weights.sum()
    return matrix


POS_EMBED_RESAMPLERS = ("timm", "dino", "hf")


def resample_pos_embed(grid, new_size, method="timm"):
    """Resample a (D, gh, gw) position-embedding grid to (D, *new_size): out = M_h @ grid @ M_w^T per channel.

    ``method`` is the resampler of the weights' origin:

    - 'timm' (``timm.layers.resample_abs_pos_embed``): ``F.interpolate(grid.float(), size=new_size,
      mode='bicubic', antialias=True)``, computed in float32 whatever the model's dtype, then cast back;
    - 'dino' (DINO's ``interpolate_pos_encoding``): ``F.interpolate(grid, scale_factor=((gh' + 0.1) / gh,
      (gw' + 0.1) / gw), mode='bicubic')`` — the +0.1 moves the sampling positions, not only the size;
    - 'hf' (Hugging Face ``ViTEmbeddings.interpolate_pos_encoding``): ``F.interpolate(grid, size=new_size,
      mode='bicubic')``.
    """
    (gh, gw), (nh, nw) = grid.shape[-2:], new_size
    if method == "timm":
        m_h, m_w, dtype = aa_bicubic_matrix(gh, nh), aa_bicubic_matrix(gw, nw), np.float32
    elif method == "dino":
        m_h = bicubic_matrix(gh, nh, scale_factor=(nh + 0.1) / gh)
        m_w = bicubic_matrix(gw, nw, scale_factor=(nw + 0.1) / gw)
        dtype = grid.dtype
    elif method == "hf":
        m_h, m_w, dtype = bicubic_matrix(gh, nh), bicubic_matrix(gw, nw), grid.dtype
    else:
        raise ValueError(f"pos-embed resampler must be one of {POS_EMBED_RESAMPLERS}, got {method!r}")
    resampled = m_h.astype(dtype) @ grid.astype(dtype) @ m_w.T.astype(dtype)  # (D, nh, nw)
    return resampled.astype(grid.dtype)
