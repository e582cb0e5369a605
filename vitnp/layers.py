"""Layers shared by the model families, named and shaped as timm's so that their parameters load unchanged.

Each ``__call__`` is the forward of the timm / PyTorch module of the same name, step for step.
"""

import threading

from . import kernels, ops, threads
from .model import Identity, Module
from .weights import release_mapped_pages

_packing_lock = threading.Lock()


def packed_weight(module, name="weight", weight=None, channels_last=False, winograd=False):
    """``module``'s parameter ``name`` as a (out, in) matrix packed for :func:`vitnp.kernels.linear`, or with
    ``winograd`` a 3x3 conv weight transformed and packed for :func:`vitnp.kernels.winograd_conv3x3`.

    ``weight`` replaces the parameter by an array made from it (a BatchNorm-folded conv weight). A conv weight (out,
    C, kh, kw) is flattened in torch's (C, kh, kw) order, or in (kh, kw, C) order with ``channels_last`` (the order of
    an NHWC map's im2col columns). Packed on first use and kept while the array is the same; a new array
    (``load_state_dict``, ``init_weights``) is packed again. The array is marked read-only, so that an in-place
    change, which the packed copy would not see, fails loudly; the pages of a memory-mapped weight are released once
    it is packed.
    """
    weight = module._parameters[name] if weight is None else weight
    slot = f"_packed_{name}" + ("_winograd" if winograd else "")
    cached = module.__dict__.get(slot)
    if cached is None or cached[0] is not weight:
        with _packing_lock:  # a batch's chunks reach a new weight together: pack it once
            cached = module.__dict__.get(slot)
            if cached is None or cached[0] is not weight:
                weight.flags.writeable = False
                if winograd:
                    packed = kernels.pack_winograd_weight(weight)
                else:
                    matrix = weight.transpose(0, 2, 3, 1) if channels_last else weight  # (out, kh, kw, C) or as stored
                    packed = kernels.pack_linear_weight(matrix.reshape(weight.shape[0], -1))
                cached = (weight, packed)
                release_mapped_pages(weight)
                object.__setattr__(module, slot, cached)
    return cached[1]


class Linear(Module):
    """``nn.Linear(in_features, out_features, bias)``: y = x W^T + b, weight (out, in)."""

    def __init__(self, in_features, out_features, bias=True):
        super().__init__()
        self.add_parameter("weight", (out_features, in_features), "trunc_normal")
        if bias:
            self.add_parameter("bias", (out_features,), "zeros")
        self.has_bias = bias

    def __call__(self, x, act="none", residual=None):
        """act(x W^T + b) + residual: the activation ('none', 'gelu', 'gelu_tanh', 'silu') and a residual connection's
        add (``residual`` shaped as the output) in the same pass over memory as the product."""
        return kernels.linear(x, *self.parts(), act, residual=residual)

    def parts(self):
        """(packed weight, bias or None), as the kernels take a Linear."""
        return packed_weight(self), self.bias if self.has_bias else None


class LayerNorm(Module):
    """``nn.LayerNorm(dim, eps)`` over the last axis."""

    def __init__(self, dim, eps):
        super().__init__()
        self.add_parameter("weight", (dim,), "ones")
        self.add_parameter("bias", (dim,), "zeros")
        self.eps = eps

    def __call__(self, x):
        return kernels.layer_norm(x, *self.parts())

    def parts(self):
        """(weight, bias, eps), as the kernels take a LayerNorm."""
        return self.weight, self.bias, self.eps


class PatchEmbed(Module):
    """timm ``PatchEmbed``: Conv2d(in_chans, embed_dim, kernel=stride=patch) as patchify + one GEMM -> (B, N, D)."""

    def __init__(self, patch_size, in_chans, embed_dim, bias=True):
        super().__init__()
        self.proj = Module()
        self.proj.add_parameter("weight", (embed_dim, in_chans, patch_size, patch_size), "lecun_normal")
        if bias:
            self.proj.add_parameter("bias", (embed_dim,), "zeros")
        self.has_bias = bias
        self.patch_size = patch_size

    def __call__(self, x):
        patches = ops.patchify(x, self.patch_size)  # (B, N, C*p*p)
        return kernels.linear(patches, packed_weight(self.proj), self.proj.bias if self.has_bias else None)  # (B, N, D)


class Attention(Module):
    """timm ``Attention``: multi-head self-attention with one fused qkv projection."""

    def __init__(self, dim, num_heads, qkv_bias=True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = Linear(dim, dim)

    def attention_probs(self, x):
        """softmax(q k^T * scale) for every head: (B, heads, N, N), with v (B, heads, N, head_dim)."""
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.transpose(2, 0, 3, 1, 4)  # each (B, heads, N, head_dim), strided views of qkv
        q = q * self.scale
        with threads.single_threaded():  # B * heads small products: see vitnp/threads.py
            attn = q @ k.swapaxes(-2, -1)  # (B, heads, N, N)
        return kernels.softmax(attn, out=attn), v

    def __call__(self, x, residual=None):
        """The attention's output, plus ``residual`` when given (added by proj's GEMM)."""
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)
        x = kernels.attention(qkv, self.scale)  # softmax((q * scale) @ k^T) @ v per head: (B, N, heads, head_dim)
        return self.proj(x.reshape(B, N, C), residual=residual)


class Mlp(Module):
    """timm ``Mlp``: fc1 -> activation -> fc2."""

    def __init__(self, in_features, hidden_features, act="gelu"):
        super().__init__()
        self.fc1 = Linear(in_features, hidden_features)
        self.fc2 = Linear(hidden_features, in_features)
        self.act = act

    def __call__(self, x, residual=None):
        """fc2(act(fc1(x))), plus ``residual`` when given (added by fc2's GEMM)."""
        x = self.fc1(x, act=self.act)  # fc1, then the activation on each tile of its output as it is written
        return self.fc2(x, residual=residual)


class Block(Module):
    """timm ViT ``Block`` (pre-norm): x = x + attn(norm1(x)); x = x + mlp(norm2(x))."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, eps=1e-6, act="gelu"):
        super().__init__()
        self.norm1 = LayerNorm(dim, eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias)
        self.norm2 = LayerNorm(dim, eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act=act)

    def __call__(self, x):
        x = self.attn(self.norm1(x), residual=x)  # x + attn(norm1(x)): proj adds x to each tile it writes
        return self.mlp(self.norm2(x), residual=x)  # x + mlp(norm2(x)): the add in fc2

    def forward_sequences(self, x):
        """``self(x)`` for many short sequences x (S, N, C) (MobileViT's): each thread takes whole sequences through
        the whole block in one kernel call that holds no GIL (``kernels.transformer_block``), instead of each op being
        shared out between threads or run from Python on a chunk of the sequences. The same bits as ``self(x)``."""
        attn, mlp = self.attn, self.mlp
        return kernels.transformer_block(
            x,
            norm1=self.norm1.parts(),
            qkv=attn.qkv.parts(),
            proj=attn.proj.parts(),
            norm2=self.norm2.parts(),
            fc1=mlp.fc1.parts(),
            fc2=mlp.fc2.parts(),
            num_heads=attn.num_heads,
            scale=attn.scale,
            act=mlp.act,
        )


__all__ = ["Attention", "Block", "Identity", "LayerNorm", "Linear", "Mlp", "PatchEmbed"]
