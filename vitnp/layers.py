"""Layers shared by the model families, named and shaped as timm's so that their parameters load unchanged.

Each ``__call__`` is the forward of the timm / PyTorch module of the same name, step for step, on the ops of the
layer's backend (``self.ops``). A Linear's ``act`` and ``residual`` are the steps that follow it in timm's forward
(``fc1`` then the activation; ``proj`` / ``fc2`` then the block's residual add), which the fast backend applies as it
writes the product.
"""

import numpy as np

from .model import Identity, Module


class Linear(Module):
    """``nn.Linear(in_features, out_features, bias)``: y = x W^T + b, weight (out, in)."""

    def __init__(self, in_features, out_features, bias=True):
        super().__init__()
        self.add_parameter("weight", (out_features, in_features), "trunc_normal")
        if bias:
            self.add_parameter("bias", (out_features,), "zeros")
        self.has_bias = bias

    def __call__(self, x, act="none", residual=None):
        """act(x W^T + b) + residual: the activation ('none', 'gelu', 'gelu_tanh', 'silu', 'quick_gelu') and a residual
        connection's add (``residual`` shaped as the output) that follow the Linear."""
        return self.ops.linear(x, self.weight, self.bias if self.has_bias else None, act=act, residual=residual)


class LayerNorm(Module):
    """``nn.LayerNorm(dim, eps)`` over the last axis."""

    def __init__(self, dim, eps):
        super().__init__()
        self.add_parameter("weight", (dim,), "ones")
        self.add_parameter("bias", (dim,), "zeros")
        self.eps = eps

    def __call__(self, x):
        return self.ops.layer_norm(x, self.weight, self.bias, self.eps)


class PatchEmbed(Module):
    """timm ``PatchEmbed``: ``proj`` = Conv2d(in_chans, embed_dim, kernel = stride = patch), flattened to tokens:
    (B, C, H, W) -> (B, N, D)."""

    def __init__(self, patch_size, in_chans, embed_dim, bias=True):
        super().__init__()
        self.proj = Module()
        self.proj.add_parameter("weight", (embed_dim, in_chans, patch_size, patch_size), "lecun_normal")
        if bias:
            self.proj.add_parameter("bias", (embed_dim,), "zeros")
        self.has_bias = bias
        self.patch_size = patch_size

    def __call__(self, x):
        bias = self.proj.bias if self.has_bias else None
        return self.ops.patch_embed(x, self.proj.weight, bias)  # proj(x).flatten(2).transpose(1, 2): (B, N, D)


def split_heads(dim, num_heads):
    """(num_heads, head_dim, scale = head_dim^-0.5) of an attention over ``dim`` channels; a ValueError when the heads
    do not divide the channels."""
    if dim % num_heads:
        raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
    head_dim = dim // num_heads
    return num_heads, head_dim, head_dim**-0.5


class Attention(Module):
    """timm ``Attention``: multi-head self-attention with one fused qkv projection; with ``qk_norm``, q and k of each
    head go through their own LayerNorm over head_dim (``q_norm``, ``k_norm``) before the product."""

    def __init__(self, dim, num_heads, qkv_bias=True, qk_norm=False, eps=1e-6):
        super().__init__()
        self.num_heads, self.head_dim, self.scale = split_heads(dim, num_heads)
        self.qkv = Linear(dim, dim * 3, bias=qkv_bias)
        self.qk_norm = qk_norm
        if qk_norm:
            self.q_norm = LayerNorm(self.head_dim, eps)
            self.k_norm = LayerNorm(self.head_dim, eps)
        self.proj = Linear(dim, dim)

    def qkv_heads(self, x):
        """q, k, v of every head, each (B, heads, N, head_dim), from tokens x (B, N, C); q and k normed (qk_norm)."""
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.transpose(2, 0, 3, 1, 4)  # each (B, heads, N, head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def attention_probs(self, x):
        """softmax(q k^T * scale) of every head: (B, heads, N, N) (DINO's last self-attention)."""
        q, k, _ = self.qkv_heads(x)
        return self.ops.attention_probs(q, k, self.scale)

    def __call__(self, x, residual=None):
        """The attention's output (B, N, C), plus ``residual`` when given (the block's shortcut)."""
        B, N, C = x.shape
        q, k, v = self.qkv_heads(x)  # each (B, heads, N, head_dim)
        x = self.ops.scaled_dot_product_attention(q, k, v, self.scale)  # softmax(q k^T * scale) v
        x = x.transpose(0, 2, 1, 3).reshape(B, N, C)  # heads joined: (B, N, C)
        return self.proj(x, residual=residual)


class Mlp(Module):
    """timm ``Mlp``: fc1 -> activation -> fc2."""

    def __init__(self, in_features, hidden_features, act="gelu"):
        super().__init__()
        self.fc1 = Linear(in_features, hidden_features)
        self.fc2 = Linear(hidden_features, in_features)
        self.act = act

    def __call__(self, x, residual=None):
        """fc2(act(fc1(x))), plus ``residual`` when given (the block's shortcut)."""
        x = self.fc1(x, act=self.act)
        return self.fc2(x, residual=residual)


class LayerScale(Module):
    """timm ``LayerScale``: x * gamma, one learned factor per channel (``gamma`` (dim,), starting at init_values)."""

    def __init__(self, dim, init_values):
        super().__init__()
        self.add_parameter("gamma", (dim,), float(init_values))

    def __call__(self, x):
        return x * self.gamma


class Block(Module):
    """timm ViT ``Block`` (pre-norm): x = x + ls1(attn(norm1(x))); x = x + ls2(mlp(norm2(x))).

    ``ls1`` / ``ls2`` are LayerScales when ``init_values`` is set (DINOv2, DeiT III), else identities;
    ``mlp_layer`` is 'mlp' (:class:`Mlp`, fc1 -> act -> fc2) or 'swiglu_packed' (:class:`SwiGLUPacked`, whose gate is
    SiLU: DINOv2 giant).
    """

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, eps=1e-6, act="gelu", qk_norm=False,
                 init_values=None, mlp_layer="mlp"):
        super().__init__()
        self.norm1 = LayerNorm(dim, eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, qk_norm=qk_norm, eps=eps)
        self.ls1 = LayerScale(dim, init_values) if init_values else Identity()
        self.norm2 = LayerNorm(dim, eps)
        hidden = int(dim * mlp_ratio)
        self.mlp = SwiGLUPacked(dim, hidden) if mlp_layer == "swiglu_packed" else Mlp(dim, hidden, act=act)
        self.ls2 = LayerScale(dim, init_values) if init_values else Identity()

    def __call__(self, x):
        if isinstance(self.ls1, Identity):  # the residual add is the last step of proj / fc2 (fused on the engine)
            x = self.attn(self.norm1(x), residual=x)  # x + attn(norm1(x))
            return self.mlp(self.norm2(x), residual=x)  # x + mlp(norm2(x))
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class SwiGLUPacked(Module):
    """timm ``SwiGLUPacked`` (``GluMlp`` with SiLU, gate first; DINOv2 giant's MLP): fc1 makes both halves at once,
    the first half gated by SiLU times the second, then fc2."""

    def __init__(self, in_features, hidden_features):
        super().__init__()
        if hidden_features % 2:
            raise ValueError(f"SwiGLUPacked: hidden_features {hidden_features} must be even (fc1 makes two halves)")
        self.fc1 = Linear(in_features, hidden_features)
        self.fc2 = Linear(hidden_features // 2, in_features)

    def __call__(self, x, residual=None):
        """fc2(silu(x1) * x2) with x1, x2 = fc1(x).chunk(2, dim=-1), plus ``residual`` when given (the block's
        shortcut)."""
        x = self.fc1(x)  # (..., hidden)
        half = x.shape[-1] // 2
        gate, value = x[..., :half], x[..., half:]  # (..., hidden / 2) each
        return self.fc2(self.ops.silu(gate) * value, residual=residual)


class AttentionPoolLatent(Module):
    """timm ``AttentionPoolLatent`` (``global_pool='map'``, SigLIP's head): learned latent queries attend to the tokens
    (q from the latent, k and v from the tokens), then x = x + mlp(norm(x)); the first latent is the pooled feature
    (timm's pool_type 'token')."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, qk_norm=False, eps=1e-6, act="gelu",
                 latent_len=1):
        super().__init__()
        self.num_heads, self.head_dim, self.scale = split_heads(dim, num_heads)
        self.latent_len = latent_len
        self.add_parameter("latent", (1, latent_len, dim), "trunc_normal")
        self.q = Linear(dim, dim, bias=qkv_bias)
        self.kv = Linear(dim, dim * 2, bias=qkv_bias)
        self.q_norm = LayerNorm(self.head_dim, eps) if qk_norm else Identity()
        self.k_norm = LayerNorm(self.head_dim, eps) if qk_norm else Identity()
        self.proj = Linear(dim, dim)
        self.norm = LayerNorm(dim, eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act=act)

    def __call__(self, x):
        """The pooled features (B, C) of tokens x (B, N, C)."""
        B, N, C = x.shape
        heads, head_dim, latent_len = self.num_heads, self.head_dim, self.latent_len
        q = self.q(self.latent).reshape(1, latent_len, heads, head_dim).transpose(0, 2, 1, 3)  # (1, heads, L, head_dim)
        q = np.broadcast_to(self.q_norm(q), (B, heads, latent_len, head_dim))  # one query for every image
        kv = self.kv(x).reshape(B, N, 2, heads, head_dim).transpose(2, 0, 3, 1, 4)  # (2, B, heads, N, head_dim)
        k, v = self.k_norm(kv[0]), kv[1]
        x = self.ops.scaled_dot_product_attention(q, k, v, self.scale)  # (B, heads, L, head_dim)
        x = x.transpose(0, 2, 1, 3).reshape(B, latent_len, C)  # heads joined: (B, L, C)
        x = self.proj(x)
        x = self.mlp(self.norm(x), residual=x)  # x + mlp(norm(x))
        return x[:, 0]  # the first latent: (B, C)


__all__ = [
    "Attention", "AttentionPoolLatent", "Block", "Identity", "LayerNorm", "LayerScale", "Linear", "Mlp", "PatchEmbed",
    "SwiGLUPacked", "split_heads",
]
