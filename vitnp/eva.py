"""EVA-02: timm's ``Eva`` (timm/models/eva.py, timm 1.x) as the EVA-02 models build it, forward only.

What it adds to timm's ``VisionTransformer`` (:mod:`vitnp.vit`):

- a 2-D rotary position embedding (RoPE, timm ``RotaryEmbeddingCat``) on q and k of the patch tokens in every
  attention (the class token is left out), besides the learned absolute ``pos_embed``: channel pairs of each head
  are turned by angles that grow with the patch's row (first half of the pairs) and column (second half);
- the attention's q / v biases without a k bias (``attn.q_bias``, ``attn.v_bias`` with the bias-free fused
  ``attn.qkv``), or three separate Linears ``attn.q_proj`` / ``attn.k_proj`` (no bias) / ``attn.v_proj``
  (``qkv_fused=False``, EVA-02 Base);
- a SwiGLU MLP: silu(gate) * x, then fc2. Packed (``mlp.fc1`` makes gate and value at once, timm ``GluMlp`` /
  :class:`vitnp.layers.SwiGLUPacked`), or, with ``scale_mlp``, split (``mlp.fc1_g``, ``mlp.fc1_x``) with a LayerNorm
  over the hidden features before fc2 (``mlp.norm``, timm ``SwiGLU``);
- average pooling of the patch tokens by default, with ``fc_norm`` after it in place of the final ``norm``.

Parameters carry timm's ``state_dict`` names: ``cls_token``, ``pos_embed``, ``patch_embed.proj``,
``blocks.{i}.norm1 / attn.* / norm2 / mlp.*``, ``norm`` or ``fc_norm``, ``head``. The rotary tables are computed from
the config when the model is built (timm keeps them as non-persistent buffers, outside its ``state_dict``), as is
the zero k bias.

Image sizes as timm's: a model takes images of its ``img_size`` only, unless built with ``dynamic_img_size=True``;
then any image whose sides are multiples of the patch size (timm's Eva refuses others), the position embedding
resampled as timm does (antialiased bicubic, in float32) and the rotary table computed for the image's grid (scaled
to ``ref_feat_shape`` when given).
"""

import numbers
from dataclasses import dataclass

import numpy as np

from .layers import Identity, LayerNorm, Linear, Mlp, PatchEmbed, SwiGLUPacked, split_heads
from .model import Model, Module
from .preprocess_config import CLIP_MEAN, CLIP_STD, data_cfg
from .reference.resample import resample_pos_embed
from .vit import VisionTransformer, _pair

GLOBAL_POOLS = ("", "token", "avg", "max", "avgmax")
ROPE_TEMPERATURE = 10000.0  # timm's rope_temperature, the base of the inverse frequencies


@dataclass(frozen=True)
class EvaConfig:
    """timm ``Eva`` constructor arguments (the ones the EVA-02 models use), timm's defaults."""

    img_size: object = (224, 224)  # int or (H, W)
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    global_pool: str = "avg"
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    qkv_bias: bool = True  # q_bias and v_bias (never a k bias)
    qkv_fused: bool = True  # one qkv Linear; False: q_proj, k_proj, v_proj
    mlp_ratio: float = 4.0
    swiglu_mlp: bool = False  # SwiGLU MLP (packed fc1, or split fc1_g / fc1_x with scale_mlp); else fc1 -> GELU -> fc2
    scale_mlp: bool = False  # a LayerNorm over the MLP's hidden features (SwiGLU only)
    class_token: bool = True
    use_rot_pos_emb: bool = False  # the 2-D rotary position embedding in every attention
    ref_feat_shape: object = None  # int or (h, w): the grid the rotary coordinates are scaled to; None: the grid's own
    rope_rotate_half: bool = False  # rotate channel i with i + head_dim / 2 instead of neighbouring pairs
    use_fc_norm: object = None  # None: fc_norm (and no final norm) exactly when global_pool is 'avg', as timm
    dynamic_img_size: bool = False  # any image size (pos_embed resampled, rotary table per grid); False: img_size only
    norm_eps: float = 1e-6


def rope_bands(dim, temperature=ROPE_TEMPERATURE):
    """timm ``freq_bands(dim // 4, temperature, step=1)``: the dim // 4 inverse frequencies 1 / temperature ** (b / n),
    b = 0 .. n - 1, float32 as timm's buffer (the power in float64 rounded to float32, then its float32 reciprocal:
    timm's values, to an ulp at most)."""
    num_bands = dim // 4
    exponent = np.arange(num_bands, dtype=np.float32) / np.float32(num_bands)
    return np.float32(1.0) / (temperature ** exponent.astype(np.float64)).astype(np.float32)


def rope_table(feat_shape, dim, ref_feat_shape=None, rotate_half=False, angle_dtype=np.float32):
    """timm ``RotaryEmbeddingCat.get_embed()`` for a (gh, gw) grid of patches: the table [sin | cos], (gh*gw, 2 * dim)
    float32, of :func:`vitnp.reference.ops.apply_rot_embed_cat`, rows in the patch tokens' (row-major) order.

    Patch (i, j) sits at (i, j) ('index' grid, ``in_pixels=False``), or, with ``ref_feat_shape`` (rh, rw), at
    (i / gh * rh, j / gw * rw) in float32 (timm's EVA scheme: a model run on another grid sees the coordinates it was
    pretrained with). Its angles are coordinate * band for the dim // 4 bands of :func:`rope_bands`, the row's angles
    first, then the column's (dim / 2 angles), each angle's sin and cos repeated for the two channels it turns:
    interleaved (s0, s0, s1, s1, ...) or, ``rotate_half``, (s0, s1, ..., s0, s1, ...).

    The angles are products in ``angle_dtype``: float32 for the table timm computes when the model is built, the
    model's dtype for the tables timm's ``dynamic_img_size`` models compute at run time (their bands buffer follows
    the model's dtype). sin and cos are taken in float64 and rounded to float32 (timm's float32 sin / cos are within
    an ulp of these).
    """
    gh, gw = feat_shape
    rows, cols = np.arange(gh, dtype=np.float32), np.arange(gw, dtype=np.float32)
    if ref_feat_shape is not None:
        rows = rows / np.float32(gh) * np.float32(ref_feat_shape[0])
        cols = cols / np.float32(gw) * np.float32(ref_feat_shape[1])
    grid = np.stack(np.meshgrid(rows, cols, indexing="ij"), axis=-1)  # (gh, gw, 2): (row, column) coordinates
    angles = grid[..., None].astype(angle_dtype) * rope_bands(dim).astype(angle_dtype)  # (gh, gw, 2, dim // 4)
    angles = angles.reshape(gh * gw, -1).astype(np.float64)  # (N, dim / 2): the row's angles, then the column's
    sin, cos = np.sin(angles).astype(np.float32), np.cos(angles).astype(np.float32)
    if rotate_half:  # (N, dim): [a0, a1, ..., a0, a1, ...]
        sin, cos = np.concatenate([sin, sin], axis=-1), np.concatenate([cos, cos], axis=-1)
    else:  # (N, dim): [a0, a0, a1, a1, ...]
        sin, cos = np.repeat(sin, 2, axis=-1), np.repeat(cos, 2, axis=-1)
    return np.concatenate([sin, cos], axis=-1)  # (N, 2 * dim)


class RotaryEmbeddingCat(Module):
    """timm ``RotaryEmbeddingCat`` as ``Eva`` builds it (``in_pixels=False``): the rotary table of a grid of patches,
    computed from the config, no parameters.

    With ``feat_shape`` (a model of one image size) the table is computed once, when the model is built, as timm's
    cached buffer; without (``dynamic_img_size``), for each grid it is asked for, as timm's ``get_embed(shape)``.
    """

    def __init__(self, dim, feat_shape=None, ref_feat_shape=None, rotate_half=False):
        super().__init__()
        if dim % 4:
            raise ValueError(f"the rotary position embedding needs a head dim that is a multiple of 4, got {dim} "
                             "(embed_dim / num_heads)")
        self.dim = dim
        self.feat_shape = feat_shape
        self.ref_feat_shape = ref_feat_shape
        self.rotate_half = rotate_half
        self.pos_embed = None if feat_shape is None else rope_table(feat_shape, dim, ref_feat_shape, rotate_half)
        self._tables = {}  # (grid, dtype) -> table in that dtype: computed once each

    def get_embed(self, shape, dtype):
        """The table [sin | cos] (gh*gw, 2 * dim) for the (gh, gw) grid ``shape``, in ``dtype``."""
        key = (tuple(shape), np.dtype(dtype))
        table = self._tables.get(key)
        if table is None:
            if self.feat_shape is not None:
                table = self.pos_embed
            else:
                table = rope_table(shape, self.dim, self.ref_feat_shape, self.rotate_half, angle_dtype=dtype)
            table = self._tables[key] = table.astype(dtype)
        return table


class EvaAttention(Module):
    """timm ``EvaAttention``: multi-head self-attention, q / v biases without a k bias, the rotary embedding on q and k
    of the tokens after the ``num_prefix_tokens`` prefix (class) tokens."""

    def __init__(self, dim, num_heads, qkv_bias=True, qkv_fused=True, num_prefix_tokens=1, rotate_half=False):
        super().__init__()
        self.num_heads, self.head_dim, self.scale = split_heads(dim, num_heads)
        self.num_prefix_tokens = num_prefix_tokens
        self.rotate_half = rotate_half
        self.qkv_bias = qkv_bias
        self.qkv_fused = qkv_fused
        if qkv_fused:
            self.qkv = Linear(dim, dim * 3, bias=False)
            if qkv_bias:  # timm's k_bias is a zero buffer, not a parameter
                self.add_parameter("q_bias", (dim,), "zeros")
                self.add_parameter("v_bias", (dim,), "zeros")
        else:
            self.q_proj = Linear(dim, dim, bias=qkv_bias)
            self.k_proj = Linear(dim, dim, bias=False)
            self.v_proj = Linear(dim, dim, bias=qkv_bias)
        self.proj = Linear(dim, dim)

    def __call__(self, x, rope=None, residual=None):
        """(B, N, C) -> (B, N, C), plus ``residual`` when given (the block's shortcut); ``rope`` is the rotary table
        (N - prefix, 2 * head_dim) or None."""
        B, N, C = x.shape
        if self.qkv_fused:
            bias = np.concatenate([self.q_bias, np.zeros_like(self.q_bias), self.v_bias]) if self.qkv_bias else None
            qkv = self.ops.linear(x, self.qkv.weight, bias).reshape(B, N, 3, self.num_heads, self.head_dim)
            q, k, v = qkv.transpose(2, 0, 3, 1, 4)  # each (B, heads, N, head_dim)
        else:
            q = self.q_proj(x).reshape(B, N, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)  # (B, heads, N, hd)
            k = self.k_proj(x).reshape(B, N, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)
            v = self.v_proj(x).reshape(B, N, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)
        if rope is not None:  # the prefix tokens as they are, the patch tokens rotated
            npt = self.num_prefix_tokens
            q = np.concatenate([q[:, :, :npt], self.ops.apply_rot_embed_cat(q[:, :, npt:], rope, self.rotate_half)],
                               axis=2)
            k = np.concatenate([k[:, :, :npt], self.ops.apply_rot_embed_cat(k[:, :, npt:], rope, self.rotate_half)],
                               axis=2)
        x = self.ops.scaled_dot_product_attention(q, k, v, self.scale)  # softmax(q k^T * scale) v
        x = x.transpose(0, 2, 1, 3).reshape(B, N, C)  # heads joined: (B, N, C)
        return self.proj(x, residual=residual)


class SwiGLU(Module):
    """timm ``SwiGLU``: silu(fc1_g(x)) * fc1_x(x), a LayerNorm over the hidden features (``norm``, with
    ``scale_mlp``; else none), fc2."""

    def __init__(self, in_features, hidden_features, scale_mlp=True, eps=1e-6):
        super().__init__()
        self.fc1_g = Linear(in_features, hidden_features)
        self.fc1_x = Linear(in_features, hidden_features)
        self.norm = LayerNorm(hidden_features, eps) if scale_mlp else Identity()
        self.fc2 = Linear(hidden_features, in_features)

    def __call__(self, x, residual=None):
        """fc2(norm(silu(fc1_g(x)) * fc1_x(x))), plus ``residual`` when given (the block's shortcut)."""
        x_gate = self.fc1_g(x, act="silu")  # act(fc1_g(x))
        x = x_gate * self.fc1_x(x)
        x = self.norm(x)
        return self.fc2(x, residual=residual)


class EvaBlock(Module):
    """timm ``EvaBlock`` (pre-norm, no LayerScale): x = x + attn(norm1(x), rope); x = x + mlp(norm2(x))."""

    def __init__(self, dim, num_heads, qkv_bias=True, qkv_fused=True, mlp_ratio=4.0, swiglu_mlp=False,
                 scale_mlp=False, num_prefix_tokens=1, rotate_half=False, eps=1e-6):
        super().__init__()
        self.norm1 = LayerNorm(dim, eps)
        self.attn = EvaAttention(dim, num_heads, qkv_bias, qkv_fused, num_prefix_tokens, rotate_half)
        self.norm2 = LayerNorm(dim, eps)
        hidden_features = int(dim * mlp_ratio)
        if swiglu_mlp and scale_mlp:
            self.mlp = SwiGLU(dim, hidden_features, scale_mlp=True, eps=eps)
        elif swiglu_mlp:  # timm's GluMlp(hidden_features * 2, SiLU, gate first): fc1 makes gate and value at once
            self.mlp = SwiGLUPacked(dim, 2 * hidden_features)
        else:
            self.mlp = Mlp(dim, hidden_features, act="gelu")

    def __call__(self, x, rope=None):
        x = self.attn(self.norm1(x), rope=rope, residual=x)  # x + attn(norm1(x), rope)
        return self.mlp(self.norm2(x), residual=x)  # x + mlp(norm2(x))


class Eva(Model):
    """timm ``Eva`` (EVA-02).

    ``model(x)`` maps (B, C, H, W) images to (B, num_classes) logits (or (B, embed_dim) when num_classes is 0);
    ``forward_features`` gives the tokens after the final norm (none when fc_norm is used), (B, prefix + N, D).
    """

    Config = EvaConfig
    fixed_by_name = ()

    def __init__(self, cfg: EvaConfig):
        super().__init__()
        _check_config(cfg)
        img_size = _pair(cfg.img_size)
        p = cfg.patch_size
        if img_size[0] % p or img_size[1] % p:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {p}")
        self.cfg = cfg
        self.img_size = img_size
        self.in_chans = cfg.in_chans
        self.patch_size = p
        self.grid_size = (img_size[0] // p, img_size[1] // p)
        self.num_prefix_tokens = int(cfg.class_token)
        self.use_fc_norm = cfg.global_pool == "avg" if cfg.use_fc_norm is None else cfg.use_fc_norm
        D = cfg.embed_dim
        num_patches = self.grid_size[0] * self.grid_size[1]

        if cfg.class_token:
            self.add_parameter("cls_token", (1, 1, D), "trunc_normal")
        self.add_parameter("pos_embed", (1, self.num_prefix_tokens + num_patches, D), "trunc_normal")
        self.patch_embed = PatchEmbed(p, cfg.in_chans, D)
        self.rope = None
        if cfg.use_rot_pos_emb:
            feat_shape = None if cfg.dynamic_img_size else self.grid_size
            self.rope = RotaryEmbeddingCat(D // cfg.num_heads, feat_shape, _ref_feat_shape(cfg.ref_feat_shape),
                                           cfg.rope_rotate_half)
        self.blocks = Module()
        for i in range(cfg.depth):
            block = EvaBlock(D, cfg.num_heads, cfg.qkv_bias, cfg.qkv_fused, cfg.mlp_ratio, cfg.swiglu_mlp,
                             cfg.scale_mlp, self.num_prefix_tokens, cfg.rope_rotate_half, cfg.norm_eps)
            setattr(self.blocks, str(i), block)
        self.norm = Identity() if self.use_fc_norm else LayerNorm(D, cfg.norm_eps)
        if self.use_fc_norm:
            self.fc_norm = LayerNorm(D, cfg.norm_eps)
        self.num_features = D
        self.num_classes = cfg.num_classes
        if cfg.num_classes:
            self.head = Linear(D, cfg.num_classes)

    @property
    def block_list(self):
        return [getattr(self.blocks, str(i)) for i in range(self.cfg.depth)]

    def check_image_size(self, height, width):
        if not self.cfg.dynamic_img_size:
            if (height, width) != self.img_size:
                raise ValueError(
                    f"this model takes {self.img_size[0]}x{self.img_size[1]} images, got {height}x{width}; create it "
                    f"with img_size=({height}, {width}), or dynamic_img_size=True for any size (as timm's Eva)"
                )
        elif height % self.patch_size or width % self.patch_size or not (height and width):
            p = self.patch_size
            raise ValueError(f"with dynamic_img_size the height and width must be multiples of the patch size {p} "
                             f"(as timm's Eva asks), got {height}x{width}")

    def pos_embed_for(self, grid):
        """The position embedding for a (gh, gw) grid, (1, prefix + gh*gw, D): the stored one on the model's own grid,
        else its patch part resampled as timm's ``resample_abs_pos_embed`` (prefix positions untouched)."""
        if grid == self.grid_size:
            return self.pos_embed
        prefix, patches = self.pos_embed[:, : self.num_prefix_tokens], self.pos_embed[0, self.num_prefix_tokens :]
        D = patches.shape[-1]
        patches = resample_pos_embed(patches.T.reshape(D, *self.grid_size), grid, "timm")  # (D, gh, gw)
        return np.concatenate([prefix, patches.reshape(D, -1).T[None]], axis=1)  # (1, prefix + gh*gw, D)

    def _pos_embed(self, x, grid):
        """timm ``Eva._pos_embed``: the class token prepended, the position embedding added, and the rotary table of
        the grid: (B, N, D) -> ((B, prefix + N, D), table (N, 2 * head_dim) or None)."""
        B, _, D = x.shape
        rot_pos_embed = self.rope.get_embed(grid, x.dtype) if self.rope is not None else None
        if self.cfg.class_token:
            x = np.concatenate([np.broadcast_to(self.cls_token, (B, 1, D)), x], axis=1)  # (B, 1 + N, D)
        return x + self.pos_embed_for(grid), rot_pos_embed

    def _grid(self, x):
        return (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)

    def forward_features(self, x):
        """(B, C, H, W) -> (B, prefix + N, D): patch embedding, position embeddings, blocks, final norm."""
        x = self.check_input(x)
        grid = self._grid(x)
        x = self.patch_embed(x)  # (B, N, D)
        x, rot_pos_embed = self._pos_embed(x, grid)  # (B, prefix + N, D)
        for block in self.block_list:
            x = block(x, rope=rot_pos_embed)
        return self.norm(x)

    pool = VisionTransformer.pool  # timm's global_pool_nlc, as the ViT's: avg / max leave the prefix tokens out

    def forward_head(self, x, pre_logits=False):
        """Pool, fc_norm, head. ``pre_logits=True`` stops before the head."""
        x = self.pool(x)
        if self.use_fc_norm:
            x = self.fc_norm(x)
        if pre_logits or not self.num_classes:
            return x
        return self.head(x)

    def forward_trace(self, x):
        """Every named intermediate of ``model(x)``, in order: {name: array}, named by timm's module paths.

        'patch_embed' (B, N, D); 'pos_embed' (tokens with the class token and position embedding: timm's
        ``pos_drop``); per block i 'blocks.{i}.attn' and 'blocks.{i}.mlp' (the residual branches' outputs, before the
        addition) and 'blocks.{i}' (the block output); 'norm' (forward_features); 'pre_logits' (pooled, fc_norm
        applied); 'logits' (only with a head). Same steps as ``forward_features`` + ``forward_head``.
        """
        x = self.check_input(x)
        trace = {}
        grid = self._grid(x)
        x = trace["patch_embed"] = self.patch_embed(x)  # (B, N, D)
        x, rot_pos_embed = self._pos_embed(x, grid)
        trace["pos_embed"] = x  # (B, prefix + N, D)
        for i, block in enumerate(self.block_list):
            attn = trace[f"blocks.{i}.attn"] = block.attn(block.norm1(x), rope=rot_pos_embed)
            x = x + attn
            mlp = trace[f"blocks.{i}.mlp"] = block.mlp(block.norm2(x))
            x = trace[f"blocks.{i}"] = x + mlp
        x = trace["norm"] = self.norm(x)
        trace["pre_logits"] = self.forward_head(x, pre_logits=True)
        if self.num_classes:
            trace["logits"] = self.forward_head(x)
        return trace


def _check_config(cfg):
    """A ValueError naming the argument when the config asks for what timm's Eva refuses or vitnp does not build."""
    if cfg.global_pool not in GLOBAL_POOLS:
        raise ValueError(f"global_pool must be one of {GLOBAL_POOLS}, got {cfg.global_pool!r}")
    if cfg.global_pool == "token" and not cfg.class_token:
        raise ValueError("global_pool='token' needs class_token=True")
    if cfg.scale_mlp and not cfg.swiglu_mlp:
        raise ValueError("scale_mlp (a norm inside the MLP) is built here for the SwiGLU MLP only: set swiglu_mlp=True")
    if cfg.use_fc_norm not in (None, True, False):
        raise ValueError(f"use_fc_norm must be None, True or False, got {cfg.use_fc_norm!r:.40}")
    _ref_feat_shape(cfg.ref_feat_shape)


def _ref_feat_shape(ref):
    """``ref_feat_shape`` as None or a pair of ints (timm's ``to_2tuple``); a ValueError for anything else."""
    if ref is None:
        return None
    pair = (ref, ref) if isinstance(ref, numbers.Integral) else tuple(ref) if isinstance(ref, (list, tuple)) else ()
    if len(pair) != 2 or not all(isinstance(s, numbers.Integral) and not isinstance(s, (bool, np.bool_))
                                 and 0 < s <= 4096 for s in pair):
        raise ValueError(f"ref_feat_shape must be None, a positive integer or a pair of them, got {ref!r:.40}")
    return tuple(int(s) for s in pair)


_EVA02 = data_cfg(mean=CLIP_MEAN, std=CLIP_STD)  # the default tags (.mim_in22k): 224, crop 0.9, bicubic, CLIP mean/std
_EVA02_224 = dict(img_size=224, patch_size=14, num_classes=0, mlp_ratio=4 * 2 / 3, swiglu_mlp=True,
                  use_rot_pos_emb=True, ref_feat_shape=(16, 16))  # default tag mim_in22k: no head

# name -> (timm constructor kwargs, timm pretrained_cfg of the default tag), checked against timm 1.0.31
MODELS = {
    "eva02_tiny_patch14_224": (dict(embed_dim=192, depth=12, num_heads=3, **_EVA02_224), _EVA02),
    "eva02_small_patch14_224": (dict(embed_dim=384, depth=12, num_heads=6, **_EVA02_224), _EVA02),
    "eva02_base_patch14_224": (
        dict(embed_dim=768, depth=12, num_heads=12, qkv_fused=False, scale_mlp=True, **_EVA02_224), _EVA02),
}
