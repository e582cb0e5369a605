"""Swin Transformer V2: timm's ``SwinTransformerV2`` (timm 1.x, NHWC inside), forward only.

What changes from Swin v1 (:mod:`vitnp.swin`, whose patch embedding, window partition, shifted-window masks, stage
layout and forwards this module reuses):

- scaled cosine attention: softmax(cos(q, k) * exp(min(logit_scale, log 100)) + bias (+ mask)) v, with a learned
  ``logit_scale`` per head, and q / v biases without a k bias (``attn.q_bias``, ``attn.v_bias``);
- a continuous position bias: a small MLP (``attn.cpb_mlp``: Linear(2, 512), ReLU, Linear(512, heads) without bias)
  maps the log-spaced relative coordinates of the window to a bias per head, squashed to (0, 16) by 16 * sigmoid;
  the coordinates are scaled by the pretrained window size, so that weights trained at a small window carry over
  to a larger one;
- residual post-norm blocks: x = x + norm1(attn(x)); x = x + norm2(mlp(x));
- PatchMerging reduces first, then normalises: LayerNorm(out_dim) after Linear(4C -> out_dim).

Parameters carry timm's ``state_dict`` names: ``patch_embed.proj / norm``, ``layers.{s}.downsample.reduction / norm``
(stages 1, 2, ...), ``layers.{s}.blocks.{b}.attn.logit_scale / q_bias / v_bias / cpb_mlp.0 / cpb_mlp.2 / qkv / proj``,
``layers.{s}.blocks.{b}.norm1 / mlp.fc1 / mlp.fc2 / norm2``, ``norm``, ``head.fc``. The relative coordinates table,
the relative position index, the zero k bias and the shifted-window masks are computed, never loaded (timm keeps them
as non-persistent buffers, outside its ``state_dict``).

Window sizes, shifts and masks are fixed when the model is built, from ``img_size``, as in v1 and timm: per
dimension, a stage map no larger than the window becomes a single window and is not shifted. Any ``img_size`` that
is a multiple of the patch size works (maps are padded to whole windows); a model takes images of that size only.
"""

import math
import numbers
from dataclasses import dataclass

import numpy as np

from .layers import LayerNorm, Linear, Mlp
from .model import Module
from .preprocess_config import IMAGENET_MEAN, IMAGENET_STD, data_cfg
from .swin import (
    SwinTransformer,
    _pair,
    merge_2x2,
    relative_position_index,
    shifted_window_mask,
    window_and_shift,
)

LOGIT_SCALE_MAX = math.log(1.0 / 0.01)  # timm clamps logit_scale here: cosine logits are scaled by at most 100
LOGIT_SCALE_INIT = math.log(10.0)  # timm's initial logit_scale
CPB_HIDDEN = 512  # width of the continuous position bias MLP
CPB_RANGE = 8.0  # relative coordinates are scaled to [-8, 8] before the log
NORMALIZE_EPS = 1e-12  # F.normalize's eps: q / max(|q|, eps)


@dataclass(frozen=True)
class SwinV2Config:
    """timm ``SwinTransformerV2`` constructor arguments (the inference-relevant ones), timm's defaults."""

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
    # one int or (h, w) per stage, the window the weights were pretrained with; 0 (or None for every stage) scales
    # the relative coordinates by the stage's own window: timm's default (0, 0, 0, 0)
    pretrained_window_sizes: object = None
    norm_eps: float = 1e-5


def relative_coords_table(window_size, pretrained_window_size=(0, 0)):
    """(2*wh - 1, 2*ww - 1, 2) float32: the log-spaced relative coordinates the continuous position bias MLP reads.

    Entry [dh + wh - 1, dw + ww - 1] is the offset (dh, dw), |dh| < wh, |dw| < ww, divided per dimension by
    (reference - 1), reference the pretrained window when one is given (height > 0) else the window itself, at least 1
    (a window of 1 has the single offset 0), times 8, then t -> sign(t) * log2(|t| + 1) / log2(8). timm computes this
    buffer in float32 whatever the model's dtype, and so does this function.
    """
    reference = pretrained_window_size if pretrained_window_size[0] > 0 else window_size
    axes = [np.arange(-(w - 1), w, dtype=np.float32) / np.float32(max(r - 1, 1))
            for w, r in zip(window_size, reference)]
    table = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1) * np.float32(CPB_RANGE)  # (2wh-1, 2ww-1, 2)
    # log2 in float64, rounded to float32: equal to torch's float32 log2 on these tables (tests/test_swinv2.py), where
    # NumPy's own float32 log2 is an ulp off at some values
    log2 = np.log2(np.abs(table) + np.float32(1), dtype=np.float64).astype(np.float32)
    return np.sign(table) * log2 / np.float32(math.log2(CPB_RANGE))


class WindowAttention(Module):
    """timm v2 ``WindowAttention``: scaled cosine attention inside each window with a continuous position bias.

    attn = softmax(normalize(q) normalize(k)^T * exp(min(logit_scale, log 100)) + 16 sigmoid(cpb) (+ mask)) v, heads
    joined, proj. The qkv Linear has no bias of its own: its bias is [q_bias, 0, v_bias] (timm).
    """

    def __init__(self, dim, num_heads, window_size, qkv_bias=True, pretrained_window_size=(0, 0)):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.window_size = window_size
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.add_parameter("logit_scale", (num_heads, 1, 1), "zeros")  # Model.init_weights sets timm's log(10)
        self.qkv_bias = qkv_bias
        if qkv_bias:
            self.add_parameter("q_bias", (dim,), "zeros")
            self.add_parameter("v_bias", (dim,), "zeros")
        self.cpb_mlp = Module()  # nn.Sequential(Linear(2, 512), ReLU, Linear(512, heads, bias=False)): keys 0 and 2
        setattr(self.cpb_mlp, "0", Linear(2, CPB_HIDDEN))
        setattr(self.cpb_mlp, "2", Linear(CPB_HIDDEN, num_heads, bias=False))
        self.qkv = Linear(dim, dim * 3, bias=False)
        self.proj = Linear(dim, dim)
        # computed from the window sizes, not parameters
        self.relative_coords_table = relative_coords_table(window_size, pretrained_window_size)  # float32
        self.relative_position_index = relative_position_index(window_size)  # (N, N)

    def relative_position_bias(self, dtype):
        """(heads, N, N): 16 * sigmoid(cpb_mlp(table))[index[i, j], h], in ``dtype``.

        It depends on the cpb_mlp's weights alone: computed once for the weight arrays the module holds (a
        load_state_dict puts new ones in), its dtype and backend; the weights are then made read-only, as the fast
        backend makes the weights it packs, so that a change in place fails instead of leaving the bias stale. The
        ReLU and the sigmoid are NumPy (the backends' ops have neither); the two Linears are the backend's.
        """
        first, last = getattr(self.cpb_mlp, "0"), getattr(self.cpb_mlp, "2")
        weights = (first.weight, first.bias, last.weight)
        cached = self.__dict__.get("_cached_bias")
        if cached is not None and cached[1] == (np.dtype(dtype), self.backend) and all(
            a is b for a, b in zip(cached[0], weights)
        ):
            return cached[2]
        hidden = np.maximum(first(self.relative_coords_table.astype(dtype)), 0)  # ReLU: (2wh-1, 2ww-1, 512)
        table = last(hidden).reshape(-1, self.num_heads)  # ((2wh-1) * (2ww-1), heads)
        N = self.relative_position_index.shape[0]
        bias = table[self.relative_position_index.reshape(-1)].reshape(N, N, -1).transpose(2, 0, 1)  # (heads, N, N)
        bias = np.ascontiguousarray(16 / (1 + np.exp(-bias)))  # 16 * sigmoid: the bias lies in (0, 16)
        for weight in weights:
            weight.flags.writeable = False
        self._cached_bias = (weights, (np.dtype(dtype), self.backend), bias)
        return bias

    def __getstate__(self):  # a copy (pickle, deepcopy) computes its bias again, and makes its own weights read-only
        state = super().__getstate__()
        state.pop("_cached_bias", None)
        return state

    def __call__(self, x, mask=None):
        """(B*nW, N, C) windows -> (B*nW, N, C); ``mask`` (nW, N, N) is added per window of every image."""
        B_, N, C = x.shape
        bias = np.concatenate([self.q_bias, np.zeros_like(self.q_bias), self.v_bias]) if self.qkv_bias else None
        qkv = self.ops.linear(x, self.qkv.weight, bias).reshape(B_, N, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.transpose(2, 0, 3, 1, 4)  # each (B*nW, heads, N, head_dim)
        # softmax(normalize(q) normalize(k)^T * logit_scale + 16 sigmoid(cpb) + mask) v; window w of each image takes
        # mask[w]
        logit_scale = np.exp(np.minimum(self.logit_scale, LOGIT_SCALE_MAX))  # (heads, 1, 1)
        x = self.ops.cosine_attention(q, k, v, logit_scale, NORMALIZE_EPS, self.relative_position_bias(x.dtype), mask)
        x = x.transpose(0, 2, 1, 3).reshape(B_, N, C)  # heads joined: (B*nW, N, C)
        return self.proj(x)


class SwinTransformerV2Block(Module):
    """timm ``SwinTransformerV2Block`` on (B, H, W, C), post-norm: x = x + norm1(W-MSA / SW-MSA(x));
    x = x + norm2(mlp(x)).

    Window and shift are clamped to ``input_resolution`` per dimension when the block is built, as in v1; the shifted
    block rolls the unpadded map, then pads to whole windows (timm's order).
    """

    def __init__(self, dim, input_resolution, num_heads, window_size=(7, 7), shift_size=(0, 0), mlp_ratio=4.0,
                 qkv_bias=True, pretrained_window_size=(0, 0), eps=1e-5):
        super().__init__()
        self.input_resolution = tuple(input_resolution)
        self.window_size, self.shift_size = window_and_shift(self.input_resolution, window_size, shift_size)
        self.attn = WindowAttention(dim, num_heads, self.window_size, qkv_bias, pretrained_window_size)
        self.norm1 = LayerNorm(dim, eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.norm2 = LayerNorm(dim, eps)
        self.attn_mask = None  # (nW, N, N) for a shifted block, computed once for its fixed resolution
        if any(self.shift_size):
            self.attn_mask = shifted_window_mask(self.input_resolution, self.window_size, self.shift_size)

    def __call__(self, x):
        B, H, W, C = x.shape
        if (H, W) != self.input_resolution:
            raise ValueError(f"this block was built for {self.input_resolution} maps, got {(H, W)}")
        shift_h, shift_w = self.shift_size
        # cyclic shift (SW-MSA), pad to whole windows, partition
        x_windows = self.ops.window_partition(x, self.window_size, shift=(-shift_h, -shift_w))  # (B*nW, wh*ww, C)
        # norm1 acts per token: on the windows it gives the values it gives on the merged map
        attn_windows = self.norm1(self.attn(x_windows, mask=self.attn_mask))  # (B*nW, wh*ww, C)
        # merge windows, drop the padding, reverse cyclic shift, add the shortcut
        x = self.ops.window_reverse(attn_windows, self.window_size, H, W, shift=(shift_h, shift_w), residual=x)
        x = x.reshape(B, H * W, C)
        x = x + self.norm2(self.mlp(x))
        return x.reshape(B, H, W, C)


class PatchMerging(Module):
    """timm v2 ``PatchMerging``: (B, H, W, C) -> (B, ceil(H/2), ceil(W/2), out_dim).

    The 2x2 neighbourhoods concatenated as v1 does (:func:`vitnp.swin.merge_2x2`, 4C), then Linear(4C -> out_dim)
    without bias and LayerNorm(out_dim): v2 reduces first, then normalises.
    """

    def __init__(self, dim, out_dim, eps=1e-5):
        super().__init__()
        self.reduction = Linear(4 * dim, out_dim, bias=False)
        self.norm = LayerNorm(out_dim, eps)

    def __call__(self, x):
        return self.norm(self.reduction(merge_2x2(x)))


class SwinTransformerV2(SwinTransformer):
    """timm ``SwinTransformerV2``.

    ``model(x)`` maps (B, C, H, W) images to (B, num_classes) logits (or (B, num_features) when num_classes is 0);
    ``forward_features`` gives the map after the final norm, (B, H / (p * 2^(S-1)), W / (p * 2^(S-1)), C) rounded up.
    Patch embedding, final norm, average-pool head and the forwards (``forward_features``, ``forward_head``,
    ``forward_trace`` at timm's module paths) are v1's; the merging and the blocks in the stages are v2's
    (:meth:`make_merging`, :meth:`make_block`).
    """

    Config = SwinV2Config
    fixed_by_name = ()

    def make_merging(self, in_dim, out_dim):
        return PatchMerging(in_dim, out_dim, self.cfg.norm_eps)

    def make_block(self, stage, dim, resolution, window_size, shift_size):
        """A v2 block, with its stage's pretrained window size."""
        cfg = self.cfg
        pretrained_window_size = _stage_pretrained_window_sizes(cfg.pretrained_window_sizes, len(cfg.depths))[stage]
        return SwinTransformerV2Block(dim, resolution, cfg.num_heads[stage], window_size, shift_size, cfg.mlp_ratio,
                                      cfg.qkv_bias, pretrained_window_size, cfg.norm_eps)

    def init_weights(self, seed=0, dtype=np.float32):
        """Seeded random values as :meth:`Model.init_weights`, with timm's initial logit_scale, log(10), in every
        attention (so that the cosine logits start scaled by 10)."""
        super().init_weights(seed, dtype)
        for _, module in self.named_modules():
            if isinstance(module, WindowAttention):
                module._parameters["logit_scale"] = np.full_like(module.logit_scale, LOGIT_SCALE_INIT)


def _stage_pretrained_window_sizes(sizes, num_stages):
    """timm's ``pretrained_window_sizes``: one int or (h, w) per stage, 0 for none; None is 0 for every stage."""
    if sizes is None:
        return [(0, 0)] * num_stages
    if not isinstance(sizes, (list, tuple)) or len(sizes) != num_stages:
        raise ValueError(f"pretrained_window_sizes {sizes!r}: expected one window size per stage ({num_stages})")
    pairs = [_pair(size) if isinstance(size, (numbers.Integral, list, tuple)) else None for size in sizes]
    if any(pair is None or len(pair) != 2 or not all(isinstance(w, numbers.Integral) and w >= 0 for w in pair)
           for pair in pairs):
        raise ValueError(f"pretrained window sizes must be integers >= 0 or (h, w) pairs of them, got {sizes!r}")
    return pairs


_SWINV2_256 = data_cfg(256, mean=IMAGENET_MEAN, std=IMAGENET_STD)
_SWINV2_192 = data_cfg(192, mean=IMAGENET_MEAN, std=IMAGENET_STD)
_SWINV2_384 = data_cfg(384, crop_pct=1.0, mean=IMAGENET_MEAN, std=IMAGENET_STD)
_PRETRAINED_AT_12 = (12, 12, 12, 6)  # the window of each stage of the models pretrained at 192x192, window 12

# name -> (timm constructor kwargs, timm pretrained_cfg of the default tag), checked against timm 1.0.31
MODELS = {
    "swinv2_tiny_window8_256": (
        dict(img_size=256, window_size=8, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)), _SWINV2_256),
    "swinv2_tiny_window16_256": (
        dict(img_size=256, window_size=16, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)), _SWINV2_256),
    "swinv2_small_window8_256": (
        dict(img_size=256, window_size=8, embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)), _SWINV2_256),
    "swinv2_small_window16_256": (
        dict(img_size=256, window_size=16, embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
        _SWINV2_256),
    "swinv2_base_window8_256": (
        dict(img_size=256, window_size=8, embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)), _SWINV2_256),
    "swinv2_base_window16_256": (
        dict(img_size=256, window_size=16, embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
        _SWINV2_256),
    "swinv2_base_window12_192": (  # default tag ms_in22k: the 21841-class ImageNet-22k head
        dict(img_size=192, num_classes=21841, window_size=12, embed_dim=128, depths=(2, 2, 18, 2),
             num_heads=(4, 8, 16, 32)), _SWINV2_192),
    "swinv2_base_window12to16_192to256": (
        dict(img_size=256, window_size=16, embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32),
             pretrained_window_sizes=_PRETRAINED_AT_12), _SWINV2_256),
    "swinv2_base_window12to24_192to384": (
        dict(img_size=384, window_size=24, embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32),
             pretrained_window_sizes=_PRETRAINED_AT_12), _SWINV2_384),
    "swinv2_large_window12_192": (  # default tag ms_in22k: the 21841-class ImageNet-22k head
        dict(img_size=192, num_classes=21841, window_size=12, embed_dim=192, depths=(2, 2, 18, 2),
             num_heads=(6, 12, 24, 48)), _SWINV2_192),
    "swinv2_large_window12to16_192to256": (
        dict(img_size=256, window_size=16, embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48),
             pretrained_window_sizes=_PRETRAINED_AT_12), _SWINV2_256),
    "swinv2_large_window12to24_192to384": (
        dict(img_size=384, window_size=24, embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48),
             pretrained_window_sizes=_PRETRAINED_AT_12), _SWINV2_384),
}
