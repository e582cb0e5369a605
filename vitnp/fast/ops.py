"""The fast backend's ops: :mod:`vitnp.reference.ops`' names, arguments and results, run on the engine's kernels.

Each op equals its reference twin to the rounding of a reordered sum (tested op by op, with the tolerances of
tests/tolerances.py); the engine's ways of running them are its own: weights packed once for its GEMM (:func:`packed`),
an activation or a residual add applied to each output tile as it is written, attention gathered straight out of the
qkv Linear's output, Swin's roll folded into its window partition and reverse, MobileViT's 3x3 convs by Winograd's
F(2x2, 3x3), its MV2 blocks and its transformer blocks each as one kernel call, and the work shared between threads
(:mod:`vitnp.fast.pool`).
"""

import functools
import threading
import weakref

import numpy as np

from .. import threads
from ..reference import ops as reference
from ..reference.ops import ACTIVATIONS, check_dtypes, patchify, resize_bilinear, tanh  # noqa: F401 (the same op on both)
from ..weights import release_mapped_pages
from . import attention as attention_kernel
from . import conv, fused, gemm, pool, rows, winograd
from . import windows as window_kernels

__all__ = reference.__all__

_packed = {}  # (id(weight), layout) -> (weak reference to the weight, its packed copy)
_packing_lock = threading.Lock()


def packed(weight, layout="rows"):
    """``weight`` in the layout the engine's kernels read, packed on first use and kept while the array lives.

    ``layout``: 'rows', the (out, in) matrix of a Linear, or a weight flattened to (out, -1) in its own order (a patch
    embedding's (D, C, p, p), as torch's conv sees a patch); 'channels_last', a conv weight (out, C, k, k) flattened
    in (k, k, C) order, the order of an NHWC map's im2col columns; 'winograd', a 3x3 conv weight transformed for
    :func:`vitnp.fast.winograd.winograd_conv3x3`. The array is made read-only, so that an in-place change, which the
    packed copy would not see, fails loudly; the pages of a memory-mapped weight are released once it is packed.
    """
    key = (id(weight), layout)
    entry = _packed.get(key)
    if entry is None or entry[0]() is not weight:
        with _packing_lock:  # a batch's chunks reach a new weight together: pack it once
            entry = _packed.get(key)
            if entry is None or entry[0]() is not weight:
                weight.flags.writeable = False
                if layout == "winograd":
                    panels = winograd.pack_winograd_weight(weight)
                else:
                    matrix = weight.transpose(0, 2, 3, 1) if layout == "channels_last" else weight
                    panels = gemm.pack_linear_weight(matrix.reshape(weight.shape[0], -1))
                entry = (weakref.ref(weight, functools.partial(_forget, key)), panels)
                _packed[key] = entry
                release_mapped_pages(weight)
    return entry[1]


def _forget(key, reference_to_weight):
    """Drop a packed copy once its weight is gone (unless a new weight has taken the id already)."""
    entry = _packed.get(key)
    if entry is not None and entry[0] is reference_to_weight:
        del _packed[key]


# ---- Linear, norms, activations --------------------------------------------------------------------------------------


def linear(x, weight, bias=None, act="none", residual=None):
    """act(x @ W^T + b) + residual on the packed GEMM, the activation and the residual applied to each output tile as
    it is written (:func:`vitnp.reference.ops.linear`)."""
    check_dtypes("linear", x, weight, bias, residual)
    return gemm.linear(x, packed(weight), bias, act, residual=residual)


def layer_norm(x, weight, bias, eps):
    """:func:`vitnp.reference.ops.layer_norm`, rows shared out between threads, sums in float64 vector lanes."""
    return rows.layer_norm(x, weight, bias, eps)


def group_norm(x, weight, bias, eps):
    """:func:`vitnp.reference.ops.group_norm` (MobileViT v2's GroupNorm1): LayerNorm's kernel over each sample's
    values, sums in float64 vector lanes."""
    check_dtypes("group_norm", x, weight, bias)
    return rows.group_norm(x, weight, bias, eps)


def gelu(x, approximate="none"):
    """:func:`vitnp.reference.ops.gelu`, erf by a rational function in float64 for float32 arrays."""
    return rows.gelu(x, approximate)


def silu(x):
    """:func:`vitnp.reference.ops.silu`, exp by a polynomial in float32 for float32 arrays."""
    return rows.silu(x)


def softmax(x):
    """:func:`vitnp.reference.ops.softmax`, exp by a polynomial in float32 for float32 arrays."""
    return rows.softmax(x)


def patch_embed(x, weight, bias=None):
    """:func:`vitnp.reference.ops.patch_embed`: the strided patches as rows of the packed GEMM."""
    check_dtypes("patch_embed", x, weight, bias)
    return gemm.linear(patchify(x, weight.shape[-1]), packed(weight), bias)  # (B, N, D)


# ---- attention -------------------------------------------------------------------------------------------------------


def attention_probs(q, k, scale, bias=None, mask=None):
    """:func:`vitnp.reference.ops.attention_probs` with the BLAS on one thread."""
    with threads.single_threaded():  # B * heads small products: waking the BLAS's threads costs more than they bring
        return reference.attention_probs(q, k, scale, bias, mask)


def scaled_dot_product_attention(q, k, v, scale, bias=None, mask=None):
    """:func:`vitnp.reference.ops.scaled_dot_product_attention`, each (image or window, head) pair on the GEMM's
    micro-kernel, the pairs shared out between threads; q, k and v read out of the qkv Linear's output they are
    views of. Queries of another length than the keys (an attention pool's latent queries: a few rows, a tiny part of
    a model's compute) are the reference's batched matmul, with the BLAS on one thread."""
    check_dtypes("attention", q, k, v, bias)
    reference.check_attention_shapes(q, k, v)
    if q.shape != k.shape:  # the kernel reads q, k, v of one shape, (B, N, 3, heads, head_dim)
        with threads.single_threaded():
            return reference.scaled_dot_product_attention(q, k, v, scale, bias, mask)
    qkv = _qkv_of(q, k, v)  # (B, N, 3, heads, head_dim)
    out = attention_kernel.attention(qkv, scale, bias, mask)  # (B, N, heads, head_dim)
    return out.transpose(0, 2, 1, 3)  # (B, heads, N, head_dim), a view


def cosine_attention(q, k, v, logit_scale, eps, bias=None, mask=None):
    """:func:`vitnp.reference.ops.cosine_attention`: q and k made unit rows (q times its head's logit scale) in one
    pass over the qkv Linear's output they are views of, into a copy that the attention kernel reads."""
    check_dtypes("cosine_attention", q, k, v, logit_scale)
    reference.check_attention_shapes(q, k, v)
    reference.check_logit_scale(logit_scale, q.shape[1])
    if q.shape != k.shape:
        with threads.single_threaded():
            return reference.cosine_attention(q, k, v, logit_scale, eps, bias, mask)
    out = attention_kernel.cosine_attention(_qkv_of(q, k, v), logit_scale, eps, bias, mask)  # (B, N, heads, head_dim)
    return out.transpose(0, 2, 1, 3)  # (B, heads, N, head_dim), a view


# The rotary position embedding is the reference's op itself: a few element-wise passes over q and k (4 flops a
# value, against the 4 * N flops a value of the attention that follows), which NumPy's vector loops run at memory
# speed; a kernel of its own would save only the temporaries.
apply_rot_embed_cat = reference.apply_rot_embed_cat


def _qkv_of(q, k, v):
    """The (B, N, 3, heads, head_dim) array whose [:, :, 0 / 1 / 2] transposed are q, k, v (B, heads, N, head_dim):
    a view when they are the split of one fused qkv Linear's output (timm's ``qkv.reshape(B, N, 3, heads,
    head_dim).permute(2, 0, 3, 1, 4)``), else a copy in that layout."""
    B, heads, N, head_dim = q.shape
    item = q.itemsize
    channels = heads * head_dim * item  # bytes from q's values of a token to k's
    strides = (N * 3 * channels, head_dim * item, 3 * channels, item)  # of q, k and v inside such an output
    if (
        q.shape == k.shape == v.shape
        and q.strides == k.strides == v.strides == strides
        and q.base is not None
        and q.base is k.base is v.base
        and k.ctypes.data == q.ctypes.data + channels
        and v.ctypes.data == q.ctypes.data + 2 * channels
    ):
        return np.lib.stride_tricks.as_strided(q, (B, N, 3, heads, head_dim), (strides[0], strides[2], channels,
                                                                               strides[1], item))
    qkv = np.empty((B, N, 3, heads, head_dim), q.dtype)
    for index, t in enumerate((q, k, v)):
        qkv[:, :, index] = t.transpose(0, 2, 1, 3)
    return qkv


def linear_self_attention(query, key, value):
    """:func:`vitnp.reference.ops.linear_self_attention` with the engine's softmax: one softmax row and one
    vector-matrix product per sequence, linear in the tokens, a small part of MobileViT v2's block next to its qkv
    and output 1x1 convs, so no kernel of its own."""
    reference.check_linear_self_attention(query, key, value)
    scores = softmax(query)  # (..., N)
    context = scores[..., None, :] @ key  # (..., 1, d): the scores' weighted sum of the keys
    return np.maximum(value, 0) * context  # (..., N, d)


# ---- Swin's windows --------------------------------------------------------------------------------------------------


def roll(x, shifts):
    """:func:`vitnp.reference.ops.roll`, a channel vector at a time."""
    return window_kernels.roll(x, shifts)


def window_partition(x, window_size, shift=(0, 0)):
    """:func:`vitnp.reference.ops.window_partition`: roll, padding and partition in one pass."""
    return window_kernels.window_partition(x, window_size, shift)


def window_reverse(windows, window_size, H, W, shift=(0, 0), residual=None):
    """:func:`vitnp.reference.ops.window_reverse`: reverse, crop, roll and the residual's add in one pass."""
    return window_kernels.window_reverse(windows, window_size, H, W, shift, residual)


# ---- convolution on NHWC maps (MobileViT) ----------------------------------------------------------------------------


def conv2d(x, weight, bias=None, stride=1, padding=0, groups=1, scale=None, act="none", residual=None):
    """:func:`vitnp.reference.ops.conv2d`: depthwise by its own kernel; NCHW input images (an NHWC view of them)
    read in place unless a residual is added; 3x3 at stride 1 by Winograd's F(2x2, 3x3); 1x1 as a Linear over the
    channels; any other as a Linear over the im2col rows, a band of rows at a time. The scale, bias, activation and
    residual are applied as each output tile is written (a depthwise conv's residual, which MobileViT has none of, is
    added after it)."""
    check_dtypes("conv2d", x[0] if isinstance(x, tuple) else x, weight, bias, scale, residual)
    kernel_size = weight.shape[-1]
    if groups != 1:
        maps = np.concatenate(x, axis=-1) if isinstance(x, tuple) else x  # torch.cat(maps, dim=1)
        if not (groups == maps.shape[-1] == weight.shape[0]):
            raise ValueError(f"conv2d: a grouped conv here is depthwise (groups = channels); got groups={groups}, "
                             f"weight {weight.shape}")
        y = conv.depthwise_conv2d(maps, weight, stride, padding, scale, bias, act)
        return y if residual is None else y + residual
    if not isinstance(x, tuple) and residual is None and _nhwc_view_of_nchw(x):  # input images: read where they are
        return conv.image_conv2d(x.transpose(0, 3, 1, 2), packed(weight, "channels_last"), kernel_size, stride, padding,
                                 bias, act, scale)
    if kernel_size == 3 and stride == 1 and padding == 1 and residual is None:
        return winograd.winograd_conv3x3(x, packed(weight, "winograd"), bias, act, scale)
    if kernel_size == 1 and stride == 1 and padding == 0 and not isinstance(x, tuple):
        return gemm.linear(x, packed(weight, "channels_last"), bias, act, scale, residual)  # a Linear over channels
    return conv.conv2d(x, packed(weight, "channels_last"), kernel_size, stride, padding, bias, act, scale, residual)


def _nhwc_view_of_nchw(x):
    """Whether the (B, H, W, C) map ``x`` is a transposed view of C-contiguous (B, C, H, W) images."""
    return x.ndim == 4 and not x.flags.c_contiguous and x.transpose(0, 3, 1, 2).flags.c_contiguous


# ---- whole blocks as one kernel call each ----------------------------------------------------------------------------


def inverted_residual(x, expand, depthwise, project, shortcut=False):
    """:func:`vitnp.reference.ops.inverted_residual` as one kernel call, a few output rows at a time so that the
    expanded rows stay in the cache: the same values as the three convs one by one. ``expand``, ``depthwise`` and
    ``project`` are ConvNormAct layers (``parts()``: weight, BatchNorm scale and shift, activation)."""
    return fused.inverted_residual(
        x,
        expand=_packed_conv(expand),
        depthwise=depthwise.parts(),
        project=_packed_conv(project),
        stride=depthwise.conv.stride,
        padding=depthwise.conv.padding,
        shortcut=shortcut,
    )


def _packed_conv(layer):
    """A ConvNormAct's (weight, BatchNorm scale, shift, activation), the weight packed as a 1x1 conv's."""
    weight, scale, shift, act = layer.parts()
    return packed(weight, "channels_last"), scale, shift, act


# The parameters of a timm pre-norm Block (qkv's bias optional), which fused.transformer_block runs
_BLOCK_PARAMETERS = {
    "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.proj.weight", "attn.proj.bias", "norm2.weight",
    "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
}


def transformer_blocks(x, blocks):
    """:func:`vitnp.reference.ops.transformer_blocks` with each timm pre-norm Block as one kernel call that takes a
    chunk of whole sequences through the whole block, the chunks shared out between threads: the same values as the
    block's ops one by one. A block with other parameters runs its own forward."""
    for block in blocks:
        parts = transformer_block_parts(block)
        x = block(x) if parts is None else fused.transformer_block(x, **parts)
    return x


def transformer_block_parts(block):
    """:func:`vitnp.fast.fused.transformer_block`'s arguments for a timm pre-norm Block (its norms, its Linears
    packed), or None for a block with other parameters than that Block's, or another MLP under the same names (a
    SwiGLUPacked's fc2 takes half of fc1's outputs)."""
    names = {name for name, _ in block.named_parameters()}
    if names - {"attn.qkv.bias"} != _BLOCK_PARAMETERS:
        return None
    attn, mlp = block.attn, block.mlp
    if mlp.fc2.weight.shape[1] != mlp.fc1.weight.shape[0]:
        return None
    return dict(
        norm1=(block.norm1.weight, block.norm1.bias, block.norm1.eps),
        qkv=(packed(attn.qkv.weight), attn.qkv.bias if "attn.qkv.bias" in names else None),
        proj=(packed(attn.proj.weight), attn.proj.bias),
        norm2=(block.norm2.weight, block.norm2.bias, block.norm2.eps),
        fc1=(packed(mlp.fc1.weight), mlp.fc1.bias),
        fc2=(packed(mlp.fc2.weight), mlp.fc2.bias),
        num_heads=attn.num_heads,
        scale=attn.scale,
        act=mlp.act,
    )


map_batch = pool.map_batch
