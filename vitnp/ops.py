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
