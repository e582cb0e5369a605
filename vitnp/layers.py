"""Layers shared by the model families, named and shaped as timm's so that their parameters load unchanged.

Each ``__call__`` is the forward of the timm / PyTorch module of the same name, step for step, on the ops of the
layer's backend (``self.ops``). A Linear's ``act`` and ``residual`` are the steps that follow it in timm's forward
(``fc1`` then the activation; ``proj`` / ``fc2`` then the block's residual add), which the fast backend applies as it
writes the product.
"""

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
        """act(x W^T + b) + residual: the activation ('none', 'gelu', 'gelu_tanh', 'silu') and a residual connection's
        add (``residual`` shaped as the output) that follow the Linear."""
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

    def qkv_heads(self, x):
        """q, k, v of every head, each (B, heads, N, head_dim), from tokens x (B, N, C)."""
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)
        return qkv.transpose(2, 0, 3, 1, 4)  # (3, B, heads, N, head_dim)

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


class Block(Module):
    """timm ViT ``Block`` (pre-norm): x = x + attn(norm1(x)); x = x + mlp(norm2(x))."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, eps=1e-6, act="gelu"):
        super().__init__()
        self.norm1 = LayerNorm(dim, eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias)
        self.norm2 = LayerNorm(dim, eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act=act)

    def __call__(self, x):
        x = self.attn(self.norm1(x), residual=x)  # x + attn(norm1(x))
        return self.mlp(self.norm2(x), residual=x)  # x + mlp(norm2(x))


__all__ = ["Attention", "Block", "Identity", "LayerNorm", "Linear", "Mlp", "PatchEmbed"]
