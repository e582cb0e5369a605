"""Swin Transformer v1: timm's ``SwinTransformer`` (timm 1.x, NHWC inside), forward only.

Parameters carry timm's ``state_dict`` names: ``patch_embed.proj / norm``,
``layers.{s}.downsample.norm / reduction`` (PatchMerging at the start of stages 1, 2, ...),
``layers.{s}.blocks.{b}.norm1 / attn.relative_position_bias_table / attn.qkv / attn.proj / norm2 / mlp.fc1 / mlp.fc2``,
``norm``, ``head.fc``. The relative position index and the shifted-window masks are computed, never loaded (timm keeps
them as non-persistent buffers).

Window sizes, shifts and masks are fixed when the model is built, from ``img_size``, exactly as timm fixes them:
per dimension, a stage map no larger than the window becomes a single window and is not shifted. A model therefore
takes images of its ``img_size`` only; build it with ``img_size=(H, W)`` for another size.
"""

import functools
from dataclasses import dataclass

import numpy as np

from . import layers
from .layers import Identity, LayerNorm, Linear, Mlp
from .model import Model, Module
from .preprocess_config import IMAGENET_MEAN, IMAGENET_STD, data_cfg
from .reference.ops import window_partition

MASK_VALUE = -100.0  # timm, the original Swin, torchvision and HF all mask across regions with -100, not -inf


@dataclass(frozen=True)
class SwinConfig:
    """timm ``SwinTransformer`` constructor arguments (the inference-relevant ones), timm's defaults."""

    img_size: object = (224, 224)  # int or (H, W)
    patch_size: int = 4
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 96
    depths: tuple = (2, 2, 6, 2)
    num_heads: tuple = (3, 6, 12, 24)
    window_size: object = 7  # int or (h, w) for every stage, or one int / (h, w) per stage
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    norm_eps: float = 1e-5
    downsample_bias: bool = False  # PatchMerging's reduction Linear has a bias (seed 004's layout), timm's has none


def relative_position_index(window_size):
    """(N, N) rows of the bias table, N = wh*ww: for tokens i = (hi, wi), j = (hj, wj) of one window,
    index[i, j] = (hi - hj + wh - 1) * (2*ww - 1) + (wi - wj + ww - 1).

    timm ``get_relative_position_index``; the table has (2*wh - 1) * (2*ww - 1) rows.
    """
    wh, ww = window_size
    coords = np.stack(np.meshgrid(np.arange(wh), np.arange(ww), indexing="ij")).reshape(2, -1)  # (2, N)
    relative = coords[:, :, None] - coords[:, None, :]  # (2, N, N)
    return (relative[0] + wh - 1) * (2 * ww - 1) + (relative[1] + ww - 1)


def window_and_shift(resolution, window_size, shift_size):
    """timm ``_calc_window_shift``: per dimension, a map no larger than the window is one window, never shifted."""
    window = tuple(r if r <= w else w for r, w in zip(resolution, window_size))
    shift = tuple(0 if r <= w else s for r, w, s in zip(resolution, window, shift_size))
    return window, shift


def shifted_window_mask(resolution, window_size, shift_size):
    """timm ``get_attn_mask``: (nW, N, N) with 0 between tokens of one region of the padded map, -100 across.

    After the cyclic shift, the last ``window`` rows of the padded map hold two regions that were not neighbours
    (rows [Hp - wh, Hp - sh) and the wrapped rows [Hp - sh, Hp)); likewise for columns. The region labels use timm's
    slices (0, -w), (-w, -s), (-s, None), so a dimension with shift 0 gets one label for every row.
    """
    labels = []
    for size, window, shift in zip(resolution, window_size, shift_size):
        padded = -(-size // window) * window
        label = np.zeros(padded)
        for region, part in enumerate((slice(0, -window), slice(-window, -shift), slice(-shift, None))):
            label[part] = region
        labels.append(label)
    img_mask = labels[0][:, None] * 3 + labels[1][None, :]  # (Hp, Wp) region ids
    mask_windows = window_partition(img_mask[None, :, :, None], window_size)[:, :, 0]  # (nW, N)
    different = mask_windows[:, None, :] != mask_windows[:, :, None]  # (nW, N, N)
    return np.where(different, MASK_VALUE, 0.0).astype(np.float32)  # 0 and -100 are exact in float32 and float64


class WindowAttention(Module):
    """timm ``WindowAttention``: multi-head self-attention inside each window with a learned relative position bias.

    attn = softmax(q k^T * head_dim^-0.5 + table[index] (+ mask)) v, heads joined, proj; q is scaled before the
    product, as timm's (non-fused) path does.
    """

    def __init__(self, dim, num_heads, window_size, qkv_bias=True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        wh, ww = window_size
        self.window_size = window_size
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.add_parameter("relative_position_bias_table", ((2 * wh - 1) * (2 * ww - 1), num_heads), "trunc_normal")
        self.relative_position_index = relative_position_index(window_size)  # (N, N), computed, not a parameter
        self.qkv = Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = Linear(dim, dim)

    def relative_position_bias(self):
        """(heads, N, N): bias[h, i, j] = table[index[i, j], h], gathered straight into that layout (contiguous)."""
        return np.take(self.relative_position_bias_table.T, self.relative_position_index, axis=1)

    def __call__(self, x, mask=None):
        """(B*nW, N, C) windows -> (B*nW, N, C); ``mask`` (nW, N, N) is added per window of every image."""
        B_, N, C = x.shape
        qkv = self.qkv(x).reshape(B_, N, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.transpose(2, 0, 3, 1, 4)  # each (B*nW, heads, N, head_dim)
        # softmax(q k^T * scale + relative_position_bias + mask) v; window w of each image takes mask[w]
        x = self.ops.scaled_dot_product_attention(q, k, v, self.scale, self.relative_position_bias(), mask)
        x = x.transpose(0, 2, 1, 3).reshape(B_, N, C)  # heads joined: (B*nW, N, C)
        return self.proj(x)


class SwinTransformerBlock(Module):
    """timm ``SwinTransformerBlock`` on (B, H, W, C): x = x + W-MSA / SW-MSA(norm1(x)); x = x + mlp(norm2(x)).

    Window and shift are clamped to ``input_resolution`` per dimension when the block is built (timm); the shifted
    block rolls the unpadded map, then pads to whole windows (timm's order; torchvision and HF pad first).
    """

    def __init__(self, dim, input_resolution, num_heads, window_size=(7, 7), shift_size=(0, 0), mlp_ratio=4.0,
                 qkv_bias=True, eps=1e-5):
        super().__init__()
        self.input_resolution = tuple(input_resolution)
        self.window_size, self.shift_size = window_and_shift(self.input_resolution, window_size, shift_size)
        self.norm1 = LayerNorm(dim, eps)
        self.attn = WindowAttention(dim, num_heads, self.window_size, qkv_bias)
        self.norm2 = LayerNorm(dim, eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.attn_mask = None  # (nW, N, N) for a shifted block, computed once for its fixed resolution
        if any(self.shift_size):
            self.attn_mask = shifted_window_mask(self.input_resolution, self.window_size, self.shift_size)

    def __call__(self, x):
        B, H, W, C = x.shape
        if (H, W) != self.input_resolution:
            raise ValueError(f"this block was built for {self.input_resolution} maps, got {(H, W)}")
        shortcut = x
        x = self.norm1(x)
        shift_h, shift_w = self.shift_size
        # cyclic shift (SW-MSA), pad to whole windows, partition
        x_windows = self.ops.window_partition(x, self.window_size, shift=(-shift_h, -shift_w))  # (B*nW, wh*ww, C)
        attn_windows = self.attn(x_windows, mask=self.attn_mask)  # (B*nW, wh*ww, C)
        # merge windows, drop the padding, reverse cyclic shift, add the shortcut
        x = self.ops.window_reverse(attn_windows, self.window_size, H, W, shift=(shift_h, shift_w), residual=shortcut)
        x = x.reshape(B, H * W, C)
        x = self.mlp(self.norm2(x), residual=x)  # x + mlp(norm2(x)): the add in fc2
        return x.reshape(B, H, W, C)


class PatchMerging(Module):
    """timm ``PatchMerging``: (B, H, W, C) -> (B, ceil(H/2), ceil(W/2), out_dim).

    The 2x2 neighbourhoods concatenated (:func:`merge_2x2`, 4C), then LayerNorm(4C) and Linear(4C -> out_dim).
    """

    def __init__(self, dim, out_dim, eps=1e-5, bias=False):
        super().__init__()
        self.norm = LayerNorm(4 * dim, eps)
        self.reduction = Linear(4 * dim, out_dim, bias=bias)

    def __call__(self, x):
        return self.reduction(self.norm(merge_2x2(x)))


def merge_2x2(x):
    """The 2x2 neighbourhoods of timm's PatchMerging: (B, H, W, C) -> (B, ceil(H/2), ceil(W/2), 4C).

    Odd H / W are zero-padded bottom / right; each neighbourhood is concatenated as
    [x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2], x[1::2, 1::2]].
    """
    B, H, W, C = x.shape
    if H % 2 or W % 2:
        x = np.pad(x, ((0, 0), (0, H % 2), (0, W % 2), (0, 0)))
        H, W = H + H % 2, W + W % 2
    x = x.reshape(B, H // 2, 2, W // 2, 2, C).transpose(0, 1, 3, 4, 2, 5)  # (B, H/2, W/2, w offset, h offset, C)
    return x.reshape(B, H // 2, W // 2, 4 * C)


class PatchEmbed(layers.PatchEmbed):
    """timm ``PatchEmbed(norm_layer=LayerNorm, output_fmt='NHWC')``: Conv p x p, stride p, then LayerNorm.

    (B, C, H, W) -> (B, H/p, W/p, D).
    """

    def __init__(self, patch_size, in_chans, embed_dim, eps=1e-5):
        super().__init__(patch_size, in_chans, embed_dim)
        self.norm = LayerNorm(embed_dim, eps)

    def __call__(self, x):
        B, _, H, W = x.shape
        x = super().__call__(x)  # (B, N, D)
        x = x.reshape(B, H // self.patch_size, W // self.patch_size, -1)  # (B, H/p, W/p, D)
        return self.norm(x)


class SwinTransformerStage(Module):
    """timm ``SwinTransformerStage``: PatchMerging (stages after the first), then blocks alternating W-MSA / SW-MSA.

    ``downsample`` is the stage's PatchMerging (None in the first stage); ``make_block(resolution, window_size,
    shift_size)`` builds one of its blocks (v1's or v2's).
    """

    def __init__(self, input_resolution, depth, window_size, downsample, make_block):
        super().__init__()
        self.input_resolution = tuple(input_resolution)
        if downsample is None:
            self.output_resolution = self.input_resolution
            self.downsample = Identity()
        else:
            self.output_resolution = tuple((r + 1) // 2 for r in input_resolution)
            self.downsample = downsample
        shift_size = tuple(w // 2 for w in window_size)
        self.blocks = Module()
        for i in range(depth):
            block = make_block(self.output_resolution, window_size, (0, 0) if i % 2 == 0 else shift_size)
            setattr(self.blocks, str(i), block)
        self.depth = depth

    @property
    def block_list(self):
        return [getattr(self.blocks, str(i)) for i in range(self.depth)]

    def __call__(self, x):
        x = self.downsample(x)
        for block in self.block_list:
            x = block(x)
        return x


class SwinTransformer(Model):
    """timm ``SwinTransformer``.

    ``model(x)`` maps (B, C, H, W) images to (B, num_classes) logits (or (B, num_features) when num_classes is 0);
    ``forward_features`` gives the map after the final norm, (B, H / (p * 2^(S-1)), W / (p * 2^(S-1)), C) rounded up.
    """

    Config = SwinConfig
    fixed_by_name = ()

    def __init__(self, cfg: SwinConfig):
        super().__init__()
        img_size = _pair(cfg.img_size)
        p = cfg.patch_size
        if img_size[0] % p or img_size[1] % p:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {p}")
        if len(cfg.depths) != len(cfg.num_heads):
            raise ValueError(f"depths {cfg.depths} and num_heads {cfg.num_heads} need one entry per stage each")
        num_stages = len(cfg.depths)
        window_sizes = _stage_window_sizes(cfg.window_size, num_stages)
        self.cfg = cfg
        self.img_size = img_size
        self.in_chans = cfg.in_chans
        self.patch_size = p
        self.grid_size = (img_size[0] // p, img_size[1] // p)

        self.patch_embed = PatchEmbed(p, cfg.in_chans, cfg.embed_dim, cfg.norm_eps)
        self.layers = Module()
        in_dim, resolution = cfg.embed_dim, self.grid_size
        for i in range(num_stages):
            out_dim = cfg.embed_dim * 2**i
            downsample = self.make_merging(in_dim, out_dim) if i > 0 else None
            stage = SwinTransformerStage(resolution, cfg.depths[i], window_sizes[i], downsample,
                                         functools.partial(self.make_block, i, out_dim))
            setattr(self.layers, str(i), stage)
            in_dim, resolution = out_dim, stage.output_resolution
        self.num_features = in_dim
        self.norm = LayerNorm(self.num_features, cfg.norm_eps)
        self.num_classes = cfg.num_classes
        if cfg.num_classes:
            self.head = Module()
            self.head.fc = Linear(self.num_features, cfg.num_classes)

    def make_merging(self, in_dim, out_dim):
        """The PatchMerging at the start of a stage after the first (a subclass builds its own)."""
        return PatchMerging(in_dim, out_dim, self.cfg.norm_eps, self.cfg.downsample_bias)

    def make_block(self, stage, dim, resolution, window_size, shift_size):
        """A block of stage ``stage`` on (B, *resolution, dim) maps (a subclass builds its own)."""
        cfg = self.cfg
        return SwinTransformerBlock(dim, resolution, cfg.num_heads[stage], window_size, shift_size, cfg.mlp_ratio,
                                    cfg.qkv_bias, cfg.norm_eps)

    @property
    def stage_list(self):
        return [getattr(self.layers, str(i)) for i in range(len(self.cfg.depths))]

    def check_image_size(self, height, width):
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"image height and width must be multiples of the patch size {self.patch_size}, got {height}x{width}"
            )
        super().check_image_size(height, width)

    def forward_features(self, x):
        """(B, C, H, W) -> (B, H', W', C'): patch embedding, stages, final norm (timm's NHWC output)."""
        x = self.check_input(x)
        x = self.patch_embed(x)  # (B, H/p, W/p, D)
        for stage in self.stage_list:
            x = stage(x)
        return self.norm(x)

    def forward_trace(self, x):
        """Every named intermediate of ``model(x)``, in order: {name: array}, for checking another implementation.

        Names are timm's module paths: 'patch_embed' (B, H/p, W/p, D); per stage i 'layers.{i}.downsample' (the
        patch merging, stages after the first) and 'layers.{i}.blocks.{j}' (each block's output, NHWC); 'norm'
        (forward_features); 'pre_logits' (pooled); 'logits' (only with a head). Same steps as ``model(x)``.
        """
        x = self.check_input(x)
        trace = {}
        x = trace["patch_embed"] = self.patch_embed(x)  # (B, H/p, W/p, D)
        for i, stage in enumerate(self.stage_list):
            if not isinstance(stage.downsample, Identity):
                x = trace[f"layers.{i}.downsample"] = stage.downsample(x)  # (B, H/2, W/2, 2C)
            for j, block in enumerate(stage.block_list):
                x = trace[f"layers.{i}.blocks.{j}"] = block(x)
        x = trace["norm"] = self.norm(x)
        trace["pre_logits"] = self.forward_head(x, pre_logits=True)
        if self.num_classes:
            trace["logits"] = self.forward_head(x)
        return trace

    def forward_head(self, x, pre_logits=False):
        """Average over H and W, then ``head.fc``; ``pre_logits=True`` stops after the pooling."""
        x = x.mean(axis=(1, 2))  # (B, C)
        if pre_logits or not self.num_classes:
            return x
        return self.head.fc(x)


def _pair(size):
    return (size, size) if isinstance(size, int) else tuple(size)


def _stage_window_sizes(window_size, num_stages):
    """timm ``resolve_stage_window_sizes``: an int or (h, w) for every stage, or one int / (h, w) per stage."""
    if isinstance(window_size, int):
        sizes = [window_size] * num_stages
    elif len(window_size) == 2 and all(isinstance(w, int) for w in window_size):
        sizes = [tuple(window_size)] * num_stages  # two ints are always one (h, w), as in timm
    else:
        sizes = list(window_size)
    if len(sizes) != num_stages:
        raise ValueError(f"window_size {window_size!r}: expected one window size per stage ({num_stages})")
    sizes = [_pair(w) for w in sizes]
    if any(not isinstance(w, int) or w <= 0 for size in sizes for w in size):
        raise ValueError(f"window sizes must be positive integers, got {window_size!r}")
    return sizes


_SWIN_224 = data_cfg(mean=IMAGENET_MEAN, std=IMAGENET_STD)
_SWIN_384 = data_cfg(384, crop_pct=1.0, mean=IMAGENET_MEAN, std=IMAGENET_STD)

# name -> (timm constructor kwargs, timm pretrained_cfg of the default tag), checked against timm 1.0.31
MODELS = {
    "swin_tiny_patch4_window7_224": (
        dict(patch_size=4, window_size=7, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)), _SWIN_224),
    "swin_small_patch4_window7_224": (
        dict(patch_size=4, window_size=7, embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)), _SWIN_224),
    "swin_base_patch4_window7_224": (
        dict(patch_size=4, window_size=7, embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)), _SWIN_224),
    "swin_base_patch4_window12_384": (
        dict(img_size=384, patch_size=4, window_size=12, embed_dim=128, depths=(2, 2, 18, 2),
             num_heads=(4, 8, 16, 32)), _SWIN_384),
    "swin_large_patch4_window7_224": (
        dict(patch_size=4, window_size=7, embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48)), _SWIN_224),
    "swin_large_patch4_window12_384": (
        dict(img_size=384, patch_size=4, window_size=12, embed_dim=192, depths=(2, 2, 18, 2),
             num_heads=(6, 12, 24, 48)), _SWIN_384),
}
