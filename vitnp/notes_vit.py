"""The hand-built ViTs of the notes and lucidrains' ``vit_pytorch.ViT``, each with its own parameter names.

These are not timm's ViT renamed: each differs in a step (an extra Linear after the patch conv, GELU after both MLP
Linears, LayerNorms around the patch embedding, no final norm, ...), so each is its own architecture and keeps the
``state_dict`` names of the PyTorch code it mirrors; a ``torch.save(model.state_dict())`` of that code loads as is.

- :class:`PreNormViT` — seed 000 (``VIT`` of the ViT paper-notes post): Conv2d(C, patch_dim = C*p*p, kernel = stride
  = p) then Linear(patch_dim, dim), class token, position embedding, ``PreNorm`` blocks (LayerNorm, then attention with
  separate bias-free ``to_q / to_k / to_v`` and ``to_out``; LayerNorm, then an MLP with GELU after *both* Linears),
  no final norm, pooling ``'cls'`` or ``'mean'`` (over all tokens, class token included), ``mlp_head`` = LayerNorm +
  Linear. Registry names ``notes_prenorm_vit_*``.
- :class:`TorchEncoderViT` — seed 003: Conv2d patch embedding, class token, position embedding, then
  ``nn.TransformerEncoder`` of ``nn.TransformerEncoderLayer(norm_first=True, activation='gelu', batch_first=True)``
  (``self_attn.in_proj_weight / out_proj``, ``linear1 / linear2``, ``norm1 / norm2``), no final norm, ``mlp_head`` =
  LayerNorm + Linear on the class token. Registry names ``notes_torch_encoder_vit_*``.
- :class:`LucidrainsViT` — ``vit_pytorch.ViT`` (1.26.x): patches flattened channel-last, LayerNorm(patch_dim) ->
  Linear -> LayerNorm(dim), class token only for ``pool='cls'``, blocks with the LayerNorm inside attention / MLP,
  bias-free ``to_qkv``, ``transformer.norm``, ``mlp_head`` Linear; with ``num_classes=0`` the model returns every
  token, as ``vit_pytorch`` does. Registry names ``lucidrains_vit_*``.

Every LayerNorm is ``nn.LayerNorm``'s default, eps 1e-5; GELU is the exact (erf) one. The three sources scale the
logits after ``q k^T``; vitnp's one attention op scales q before it, as timm does, which moves a float32 logit by at
most its last bit (exact when head_dim is a power of 4, as 64 is).
"""

from dataclasses import dataclass

import numpy as np

from .layers import Identity, LayerNorm, Linear, split_heads
from .model import Model, Module
from .preprocess_config import data_cfg

POOLS = ("cls", "mean")


def _pair(size):
    return (size, size) if isinstance(size, int) else tuple(size)


def _grid(img_size, patch_size):
    img_size = _pair(img_size)
    if img_size[0] % patch_size or img_size[1] % patch_size:
        raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
    return img_size, (img_size[0] // patch_size, img_size[1] // patch_size)


def _split_heads(t, num_heads):
    """``rearrange(t, 'b n (h d) -> b h n d')``: (B, N, heads*head_dim) -> (B, heads, N, head_dim)."""
    B, N, inner = t.shape
    return t.reshape(B, N, num_heads, inner // num_heads).transpose(0, 2, 1, 3)


def _join_heads(t):
    """``rearrange(t, 'b h n d -> b n (h d)')``: (B, heads, N, head_dim) -> (B, N, heads*head_dim)."""
    B, heads, N, head_dim = t.shape
    return t.transpose(0, 2, 1, 3).reshape(B, N, heads * head_dim)


# ---------------------------------------------------------------------------------------------------------------------
# Seed 000: PreNorm ViT (Conv2d -> patch_dim -> Linear, to_q / to_k / to_v, GELU after both MLP Linears)
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreNormViTConfig:
    """Seed 000 ``VIT(...)`` arguments (its defaults; ``dropout`` has no effect at inference)."""

    img_size: object = 256
    patch_size: int = 32
    in_chans: int = 3
    num_classes: int = 10
    embed_dim: int = 1024
    depth: int = 6
    num_heads: int = 16
    head_dim: int = 64
    mlp_hidden_dim: int = 2048
    pool: str = "cls"
    norm_eps: float = 1e-5


class PatchConv(Module):
    """A Conv2d with kernel = stride = patch_size, weight (out, C, p, p) and bias, its output as tokens."""

    def __init__(self, in_chans, out_chans, patch_size):
        super().__init__()
        self.add_parameter("weight", (out_chans, in_chans, patch_size, patch_size), "lecun_normal")
        self.add_parameter("bias", (out_chans,), "zeros")

    def __call__(self, x):
        return self.ops.patch_embed(x, self.weight, self.bias)  # conv(x).flatten(2).transpose(1, 2): (B, N, out)


class PatchAndPosEmbedding(Module):
    """Seed 000 ``PatchAndPosEmbedding``: conv to patch_dim, Linear to dim, class token prepended, position added."""

    def __init__(self, grid_size, patch_size, in_chans, embed_dim):
        super().__init__()
        patch_dim = patch_size * patch_size * in_chans
        self.patch_embedding = PatchConv(in_chans, patch_dim, patch_size)
        self.linear = Linear(patch_dim, embed_dim)
        self.add_parameter("cls_token", (1, 1, embed_dim), "small_normal")
        self.add_parameter("pos_embedding", (1, grid_size[0] * grid_size[1] + 1, embed_dim), "trunc_normal")

    def __call__(self, img):
        x = self.patch_embedding(img)  # (B, N, patch_dim)
        x = self.linear(x)  # (B, N, D)
        B, N, D = x.shape
        cls_token = np.broadcast_to(self.cls_token, (B, 1, D))
        x = np.concatenate([cls_token, x], axis=1)  # (B, N + 1, D)
        return x + self.pos_embedding


class SeparateQKVAttention(Module):
    """Seed 000 ``Attention``: bias-free ``to_q / to_k / to_v`` (dim -> heads*head_dim), per-head softmax attention,
    ``to_out.0`` Linear back to dim (Identity when heads == 1 and head_dim == dim).

    The seed declares ``to_out`` as ``nn.Linear(dim, inner_dim)``, which runs only when inner_dim == dim; vitnp's
    ``to_out.0`` is Linear(inner_dim, dim): the same (dim, dim) weight then, and the one that works otherwise.
    """

    def __init__(self, dim, num_heads, head_dim):
        super().__init__()
        inner_dim = num_heads * head_dim
        self.num_heads = num_heads
        self.scale = head_dim**-0.5
        self.to_q = Linear(dim, inner_dim, bias=False)
        self.to_k = Linear(dim, inner_dim, bias=False)
        self.to_v = Linear(dim, inner_dim, bias=False)
        self.project_out = not (num_heads == 1 and head_dim == dim)
        self.to_out = Module()
        if self.project_out:
            setattr(self.to_out, "0", Linear(inner_dim, dim))

    def __call__(self, x):
        q, k, v = (_split_heads(t(x), self.num_heads) for t in (self.to_q, self.to_k, self.to_v))  # (B, heads, N, hd)
        out = self.ops.scaled_dot_product_attention(q, k, v, self.scale)  # softmax(q k^T * scale) v
        out = _join_heads(out)  # (B, N, inner)
        return getattr(self.to_out, "0")(out) if self.project_out else out


class GeluGeluMLP(Module):
    """Seed 000 ``MLP``: ``net`` = Linear, GELU, Dropout, Linear, GELU, Dropout (keys ``net.0``, ``net.3``)."""

    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.net = Module()
        setattr(self.net, "0", Linear(dim, hidden_dim))
        setattr(self.net, "3", Linear(hidden_dim, dim))

    def __call__(self, x):
        fc1, fc2 = getattr(self.net, "0"), getattr(self.net, "3")
        x = fc1(x, act="gelu")
        return fc2(x, act="gelu")


class PreNorm(Module):
    """Seed 000 ``PreNorm``: fn(LayerNorm(x)); the residual is added by the Transformer loop."""

    def __init__(self, dim, fn, eps):
        super().__init__()
        self.norm = LayerNorm(dim, eps)
        self.fn = fn

    def __call__(self, x):
        return self.fn(self.norm(x))


class ResidualPairs(Module):
    """``transformer.layers`` of seed 000 and of ``vit_pytorch``: a ModuleList of [attention, feed-forward] pairs
    (keys ``{i}.0``, ``{i}.1``), each branch added to its input, as their ``Transformer.forward``:
    ``for attn, ff in layers: x = attn(x) + x; x = ff(x) + x``."""

    def __init__(self, pairs):
        super().__init__()
        for i, (attn, ff) in enumerate(pairs):
            layer = Module()
            setattr(layer, "0", attn)
            setattr(layer, "1", ff)
            setattr(self, str(i), layer)
        self.depth = len(pairs)

    def __call__(self, x, trace=None, path="transformer.layers"):
        """The layers on tokens x (B, N, D); with ``trace`` (a dict), each branch's output before its add and each
        layer's output are recorded under their module paths ('{path}.{i}.0', '{path}.{i}.1', '{path}.{i}')."""
        for i in range(self.depth):
            layer = getattr(self, str(i))
            attn = getattr(layer, "0")(x)
            x = attn + x
            ff = getattr(layer, "1")(x)
            x = ff + x
            if trace is not None:
                trace.update({f"{path}.{i}.0": attn, f"{path}.{i}.1": ff, f"{path}.{i}": x})
        return x


class MlpHead(Module):
    """The notes' ``mlp_head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_classes))``: keys ``mlp_head.0`` and
    ``mlp_head.1``; ``pre_logits=True`` (or no classes) stops after the LayerNorm."""

    def __init__(self, dim, num_classes, eps):
        super().__init__()
        setattr(self, "0", LayerNorm(dim, eps))
        setattr(self, "1", Linear(dim, num_classes) if num_classes else Identity())
        self.num_classes = num_classes

    def __call__(self, x, pre_logits=False):
        x = getattr(self, "0")(x)
        if pre_logits or not self.num_classes:
            return x
        return getattr(self, "1")(x)


class PreNormViT(Model):
    """Seed 000 ``VIT``: ``model(x)`` gives (B, num_classes) logits, or the pooled (B, dim) vector when num_classes=0.

    Keys: ``patchembedding.patch_embedding / linear / cls_token / pos_embedding``,
    ``transformer.layers.{i}.0.norm``, ``transformer.layers.{i}.0.fn.to_q / to_k / to_v / to_out.0``,
    ``transformer.layers.{i}.1.norm``, ``transformer.layers.{i}.1.fn.net.0 / net.3``, ``mlp_head.0`` (LayerNorm),
    ``mlp_head.1`` (Linear).
    """

    Config = PreNormViTConfig
    fixed_by_name = ()

    def __init__(self, cfg: PreNormViTConfig):
        super().__init__()
        if cfg.pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {cfg.pool!r}")
        self.cfg = cfg
        self.img_size, self.grid_size = _grid(cfg.img_size, cfg.patch_size)
        self.in_chans = cfg.in_chans
        D = cfg.embed_dim
        self.patchembedding = PatchAndPosEmbedding(self.grid_size, cfg.patch_size, cfg.in_chans, D)
        self.transformer = Module()
        self.transformer.layers = ResidualPairs([
            (PreNorm(D, SeparateQKVAttention(D, cfg.num_heads, cfg.head_dim), cfg.norm_eps),
             PreNorm(D, GeluGeluMLP(D, cfg.mlp_hidden_dim), cfg.norm_eps))
            for _ in range(cfg.depth)
        ])
        self.num_classes = cfg.num_classes
        self.mlp_head = MlpHead(D, cfg.num_classes, cfg.norm_eps)

    def forward_features(self, x):
        """(B, C, H, W) -> (B, N + 1, D): embedding, then x = attn(x) + x; x = ff(x) + x per layer (no final norm)."""
        x = self.check_input(x)
        x = self.patchembedding(x)  # (B, N + 1, D)
        return self.transformer.layers(x)

    def forward_trace(self, x):
        """Every named intermediate of ``model(x)``, in order: {name: array}, for checking another implementation.

        Names are the module paths of seed 000's PyTorch code: 'patchembedding' (B, N + 1, D: patches, class token,
        position embedding); per layer i 'transformer.layers.{i}.0' and 'transformer.layers.{i}.1' (the attention's
        and the MLP's PreNorm outputs, before their residual adds) and 'transformer.layers.{i}' (the layer's output);
        'mlp_head.0' (the pooled token's LayerNorm, which is also 'pre_logits'); 'logits' (only with a head). Same
        steps as ``forward_features`` + ``forward_head``.
        """
        x = self.check_input(x)
        trace = {}
        x = trace["patchembedding"] = self.patchembedding(x)  # (B, N + 1, D)
        x = self.transformer.layers(x, trace)
        trace["mlp_head.0"] = trace["pre_logits"] = self.forward_head(x, pre_logits=True)
        if self.num_classes:
            trace["logits"] = self.forward_head(x)
        return trace

    def forward_head(self, x, pre_logits=False):
        """Pool (class token, or the mean of all tokens), then ``mlp_head`` (LayerNorm, Linear)."""
        x = x.mean(axis=1) if self.cfg.pool == "mean" else x[:, 0]
        return self.mlp_head(x, pre_logits)


# ---------------------------------------------------------------------------------------------------------------------
# Seed 003: ViT on nn.TransformerEncoder (norm_first=True, GELU, batch_first)
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TorchEncoderViTConfig:
    """Seed 003 ``ViT(...)`` arguments under timm-like names: image_size -> img_size, in_channels -> in_chans,
    num_encoders -> depth, expansion -> mlp_ratio (dim_feedforward = int(embed_dim * expansion)).
    Defaults: the post's example."""

    img_size: object = 28
    patch_size: int = 7
    in_chans: int = 1
    num_classes: int = 10
    embed_dim: int = 100
    depth: int = 1
    num_heads: int = 1
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-5


class ConvPatchEmbedding(Module):
    """Seed 003 ``PatchEmbedding``: ``patcher`` = Conv2d + Flatten, class token prepended, position embedding added."""

    def __init__(self, grid_size, patch_size, in_chans, embed_dim):
        super().__init__()
        self.add_parameter("cls_token", (1, 1, embed_dim), "small_normal")
        self.add_parameter("position_embedding", (1, grid_size[0] * grid_size[1] + 1, embed_dim), "trunc_normal")
        self.patcher = Module()
        setattr(self.patcher, "0", PatchConv(in_chans, embed_dim, patch_size))

    def __call__(self, x):
        x = getattr(self.patcher, "0")(x)  # (B, N, D)
        B, N, D = x.shape
        cls_tokens = np.broadcast_to(self.cls_token, (B, 1, D))
        x = np.concatenate([cls_tokens, x], axis=1)  # (B, N + 1, D)
        return self.position_embedding + x


class MultiheadAttention(Module):
    """``nn.MultiheadAttention(batch_first=True)`` as self-attention: ``in_proj_weight`` (3D, D) rows q | k | v,
    ``in_proj_bias``, ``out_proj``; q is scaled by head_dim^-0.5 before q k^T, as torch does."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads, self.head_dim, self.scale = split_heads(dim, num_heads)
        self.add_parameter("in_proj_weight", (3 * dim, dim), "trunc_normal")
        self.add_parameter("in_proj_bias", (3 * dim,), "zeros")
        self.out_proj = Linear(dim, dim)

    def __call__(self, x):
        B, N, D = x.shape
        qkv = self.ops.linear(x, self.in_proj_weight, self.in_proj_bias)  # (B, N, 3D): q | k | v
        qkv = qkv.reshape(B, N, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.transpose(2, 0, 3, 1, 4)  # each (B, heads, N, head_dim)
        x = self.ops.scaled_dot_product_attention(q, k, v, self.scale)  # softmax(q k^T * scale) v
        x = x.transpose(0, 2, 1, 3).reshape(B, N, D)  # heads joined
        return self.out_proj(x)


class TransformerEncoderLayer(Module):
    """``nn.TransformerEncoderLayer(norm_first=True, activation='gelu')``:
    x = x + self_attn(norm1(x)); x = x + linear2(gelu(linear1(norm2(x))))."""

    def __init__(self, dim, num_heads, dim_feedforward, eps):
        super().__init__()
        self.self_attn = MultiheadAttention(dim, num_heads)
        self.linear1 = Linear(dim, dim_feedforward)
        self.linear2 = Linear(dim_feedforward, dim)
        self.norm1 = LayerNorm(dim, eps)
        self.norm2 = LayerNorm(dim, eps)

    def __call__(self, x):
        x = x + self.self_attn(self.norm1(x))
        h = self.linear1(self.norm2(x), act="gelu")
        return x + self.linear2(h)


class TorchEncoderViT(Model):
    """Seed 003 ``ViT``: ``model(x)`` gives (B, num_classes) logits, or the normed class token when num_classes=0.

    Keys: ``embedding_block.cls_token / position_embedding / patcher.0``,
    ``encoder_blocks.layers.{i}.self_attn.in_proj_weight / in_proj_bias / out_proj``,
    ``encoder_blocks.layers.{i}.linear1 / linear2 / norm1 / norm2``, ``mlp_head.0`` (LayerNorm), ``mlp_head.1``.
    """

    Config = TorchEncoderViTConfig
    fixed_by_name = ()

    def __init__(self, cfg: TorchEncoderViTConfig):
        super().__init__()
        self.cfg = cfg
        self.img_size, self.grid_size = _grid(cfg.img_size, cfg.patch_size)
        self.in_chans = cfg.in_chans
        D = cfg.embed_dim
        self.embedding_block = ConvPatchEmbedding(self.grid_size, cfg.patch_size, cfg.in_chans, D)
        self.encoder_blocks = Module()
        self.encoder_blocks.layers = Module()
        for i in range(cfg.depth):
            layer = TransformerEncoderLayer(D, cfg.num_heads, int(D * cfg.mlp_ratio), cfg.norm_eps)
            setattr(self.encoder_blocks.layers, str(i), layer)
        self.num_classes = cfg.num_classes
        self.mlp_head = MlpHead(D, cfg.num_classes, cfg.norm_eps)

    def forward_features(self, x):
        """(B, C, H, W) -> (B, N + 1, D): embedding, encoder layers (the seed's TransformerEncoder has no norm)."""
        x = self.check_input(x)
        x = self.embedding_block(x)  # (B, N + 1, D)
        for i in range(self.cfg.depth):
            x = getattr(self.encoder_blocks.layers, str(i))(x)
        return x

    def forward_trace(self, x):
        """Every named intermediate of ``model(x)``, in order: {name: array}, for checking another implementation.

        Names are the module paths of seed 003's PyTorch code: 'embedding_block' (B, N + 1, D: patches, class token,
        position embedding); per layer i, with L = 'encoder_blocks.layers.{i}', 'L.self_attn' (the attention's
        output, before the residual add), 'L.linear2' (the feed-forward's output, before its residual add) and 'L'
        (the layer's output); 'mlp_head.0' (the class token's LayerNorm, which is also 'pre_logits'); 'logits' (only
        with a head). Same steps as ``forward_features`` + ``forward_head``.
        """
        x = self.check_input(x)
        trace = {}
        x = trace["embedding_block"] = self.embedding_block(x)  # (B, N + 1, D)
        for i in range(self.cfg.depth):
            layer, path = getattr(self.encoder_blocks.layers, str(i)), f"encoder_blocks.layers.{i}"
            attn = trace[f"{path}.self_attn"] = layer.self_attn(layer.norm1(x))
            x = x + attn
            feed_forward = trace[f"{path}.linear2"] = layer.linear2(layer.linear1(layer.norm2(x), act="gelu"))
            x = trace[path] = x + feed_forward
        trace["mlp_head.0"] = trace["pre_logits"] = self.forward_head(x, pre_logits=True)
        if self.num_classes:
            trace["logits"] = self.forward_head(x)
        return trace

    def forward_head(self, x, pre_logits=False):
        """``mlp_head(x[:, 0, :])``: LayerNorm, Linear on the class token."""
        return self.mlp_head(x[:, 0], pre_logits)


# ---------------------------------------------------------------------------------------------------------------------
# lucidrains vit_pytorch.ViT
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LucidrainsViTConfig:
    """``vit_pytorch.ViT(...)`` arguments under timm-like names: image_size -> img_size, channels -> in_chans,
    dim -> embed_dim, heads -> num_heads, dim_head -> head_dim. Defaults: the vit_pytorch README example."""

    img_size: object = 256
    patch_size: int = 32
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 1024
    depth: int = 6
    num_heads: int = 16
    head_dim: int = 64
    mlp_dim: int = 2048
    pool: str = "cls"
    norm_eps: float = 1e-5


class LucidrainsAttention(Module):
    """``vit_pytorch.vit.Attention``: LayerNorm, bias-free ``to_qkv`` chunked into q | k | v, softmax(q k^T * scale) v,
    ``to_out.0`` Linear(inner, dim) (Identity when heads == 1 and dim_head == dim)."""

    def __init__(self, dim, num_heads, head_dim, eps):
        super().__init__()
        inner_dim = num_heads * head_dim
        self.num_heads = num_heads
        self.scale = head_dim**-0.5
        self.norm = LayerNorm(dim, eps)
        self.to_qkv = Linear(dim, inner_dim * 3, bias=False)
        self.project_out = not (num_heads == 1 and head_dim == dim)
        self.to_out = Module()
        if self.project_out:
            setattr(self.to_out, "0", Linear(inner_dim, dim))

    def __call__(self, x):
        x = self.norm(x)
        q, k, v = (_split_heads(t, self.num_heads) for t in np.split(self.to_qkv(x), 3, axis=-1))  # (B, heads, N, hd)
        out = self.ops.scaled_dot_product_attention(q, k, v, self.scale)  # softmax(q k^T * scale) v
        out = _join_heads(out)  # (B, N, inner)
        return getattr(self.to_out, "0")(out) if self.project_out else out


class LucidrainsFeedForward(Module):
    """``vit_pytorch.vit.FeedForward``: ``net`` = LayerNorm, Linear, GELU, Dropout, Linear, Dropout (net.0, .1, .4)."""

    def __init__(self, dim, hidden_dim, eps):
        super().__init__()
        self.net = Module()
        setattr(self.net, "0", LayerNorm(dim, eps))
        setattr(self.net, "1", Linear(dim, hidden_dim))
        setattr(self.net, "4", Linear(hidden_dim, dim))

    def __call__(self, x):
        norm, fc1, fc2 = (getattr(self.net, i) for i in ("0", "1", "4"))
        x = fc1(norm(x), act="gelu")
        return fc2(x)


class LucidrainsViT(Model):
    """``vit_pytorch.ViT``: ``model(x)`` gives (B, num_classes) logits, or every token (B, tokens, dim) when
    num_classes=0 (vit_pytorch then has no ``mlp_head`` and returns the transformer output).

    Keys: ``cls_token`` (1 or 0, dim), ``pos_embedding`` (tokens, dim), ``to_patch_embedding.1`` (LayerNorm),
    ``.2`` (Linear), ``.3`` (LayerNorm), ``transformer.norm``, ``transformer.layers.{i}.0.norm / to_qkv / to_out.0``,
    ``transformer.layers.{i}.1.net.0 / net.1 / net.4``, ``mlp_head``.
    """

    Config = LucidrainsViTConfig
    fixed_by_name = ()

    def __init__(self, cfg: LucidrainsViTConfig):
        super().__init__()
        if cfg.pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {cfg.pool!r}")
        self.cfg = cfg
        self.img_size, self.grid_size = _grid(cfg.img_size, cfg.patch_size)
        self.in_chans = cfg.in_chans
        self.patch_size = cfg.patch_size
        D = cfg.embed_dim
        patch_dim = cfg.in_chans * cfg.patch_size**2
        num_cls_tokens = 1 if cfg.pool == "cls" else 0
        self.add_parameter("cls_token", (num_cls_tokens, D), "small_normal")
        self.add_parameter("pos_embedding", (self.grid_size[0] * self.grid_size[1] + num_cls_tokens, D), "trunc_normal")
        self.to_patch_embedding = Module()
        setattr(self.to_patch_embedding, "1", LayerNorm(patch_dim, cfg.norm_eps))
        setattr(self.to_patch_embedding, "2", Linear(patch_dim, D))
        setattr(self.to_patch_embedding, "3", LayerNorm(D, cfg.norm_eps))
        self.transformer = Module()
        self.transformer.norm = LayerNorm(D, cfg.norm_eps)
        self.transformer.layers = ResidualPairs([
            (LucidrainsAttention(D, cfg.num_heads, cfg.head_dim, cfg.norm_eps),
             LucidrainsFeedForward(D, cfg.mlp_dim, cfg.norm_eps))
            for _ in range(cfg.depth)
        ])
        self.num_classes = cfg.num_classes
        if cfg.num_classes:
            self.mlp_head = Linear(D, cfg.num_classes)

    def patch_tokens(self, x):
        """``Rearrange('b c (h p1) (w p2) -> b (h w) (p1 p2 c)')``: patches with the channel fastest, (B, N, p*p*C)."""
        B, C = x.shape[:2]
        p = self.patch_size
        patches = self.ops.patchify(x, p)  # (B, N, C*p*p), ordered (c, p1, p2)
        N = patches.shape[1]
        return patches.reshape(B, N, C, p, p).transpose(0, 1, 3, 4, 2).reshape(B, N, p * p * C)

    def embed_patches(self, x):
        """``to_patch_embedding``: patches with the channel fastest, LayerNorm, Linear, LayerNorm: (B, N, D)."""
        norm_in, linear, norm_out = (getattr(self.to_patch_embedding, i) for i in ("1", "2", "3"))
        return norm_out(linear(norm_in(self.patch_tokens(x))))

    def add_tokens(self, x):
        """The class token prepended (pool 'cls'), then the position embedding added: (B, N, D) -> (B, tokens, D)."""
        cls_tokens = np.broadcast_to(self.cls_token, (len(x),) + self.cls_token.shape)  # (B, 1 or 0, D)
        x = np.concatenate([cls_tokens, x], axis=1)  # (B, tokens, D)
        return x + self.pos_embedding[: x.shape[1]]

    def forward_features(self, x):
        """(B, C, H, W) -> (B, tokens, D): patch embedding, [class token], position, blocks, ``transformer.norm``."""
        x = self.check_input(x)
        x = self.embed_patches(x)  # (B, N, D)
        x = self.add_tokens(x)  # (B, tokens, D)
        x = self.transformer.layers(x)
        return self.transformer.norm(x)

    def forward_trace(self, x):
        """Every named intermediate of ``model(x)``, in order: {name: array}, for checking another implementation.

        Names are the module paths of ``vit_pytorch.ViT``: 'to_patch_embedding' (B, N, D); 'dropout' (the output of
        its embedding dropout: class token and position embedding added, (B, tokens, D)); per layer i
        'transformer.layers.{i}.0' and 'transformer.layers.{i}.1' (the attention's and the feed-forward's outputs,
        before their residual adds) and 'transformer.layers.{i}' (the layer's output); 'transformer.norm'
        (forward_features); 'pre_logits' (pooled; every token when num_classes=0); 'logits' (only with a head). Same
        steps as ``forward_features`` + ``forward_head``.
        """
        x = self.check_input(x)
        trace = {}
        x = trace["to_patch_embedding"] = self.embed_patches(x)  # (B, N, D)
        x = trace["dropout"] = self.add_tokens(x)  # (B, tokens, D)
        x = self.transformer.layers(x, trace)
        x = trace["transformer.norm"] = self.transformer.norm(x)
        trace["pre_logits"] = self.forward_head(x, pre_logits=True)
        if self.num_classes:
            trace["logits"] = self.forward_head(x)
        return trace

    def forward_head(self, x, pre_logits=False):
        """Pool (mean of all tokens, or the class token), then ``mlp_head``; every token when num_classes=0."""
        if not self.num_classes:
            return x
        x = x.mean(axis=1) if self.cfg.pool == "mean" else x[:, 0]
        return x if pre_logits else self.mlp_head(x)


# ---------------------------------------------------------------------------------------------------------------------
# Registry tables: name -> (constructor arguments, preprocessing config)
# ---------------------------------------------------------------------------------------------------------------------

# None of these has released weights, hence no preprocessing of its own: inputs normalised with mean = std = 0.5,
# resized to the model's size without cropping.
_NOTES = data_cfg(256, crop_pct=1.0)

PRENORM_MODELS = {
    # seed 000's defaults: 256x256 RGB, 32x32 patches, dim 1024, 6 layers, 16 heads of 64, MLP 2048, 10 classes
    "notes_prenorm_vit_patch32_256": (dict(), _NOTES),
}

TORCH_ENCODER_MODELS = {
    # seed 003's example: 28x28 grey (MNIST), 7x7 patches, dim 100, 1 encoder layer, 1 head, expansion 4, 10 classes
    "notes_torch_encoder_vit_patch7_28": (
        dict(), data_cfg(28, crop_pct=1.0, mean=(0.5,), std=(0.5,), interpolation="bilinear", in_chans=1)),
}

LUCIDRAINS_MODELS = {
    # the vit_pytorch README example
    "lucidrains_vit_patch32_256": (dict(), _NOTES),
    # ViT-B/16 sizes in vit_pytorch (dim_head 64 x 12 heads = 768)
    "lucidrains_vit_base_patch16_224": (
        dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, head_dim=64, mlp_dim=3072),
        data_cfg(224, crop_pct=1.0)),
}

FAMILIES = [
    (PreNormViT, PRENORM_MODELS),
    (TorchEncoderViT, TORCH_ENCODER_MODELS),
    (LucidrainsViT, LUCIDRAINS_MODELS),
]
