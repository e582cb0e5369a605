"""MobileViT v2: timm's ``ByobNet`` built from the ``mobilevitv2_*`` configs, forward only.

The network of MobileViT v1 (:mod:`vitnp.mobilevit`: conv stem, MV2 inverted-residual blocks, a transformer block
ending stages 2-4, NHWC maps inside, NCHW in and out) with v2's block, ``MobileVitV2Block``: a depthwise 3x3 conv,
a 1x1 conv to the transformer width, the map unfolded into 2x2 patches, linear transformer blocks, a GroupNorm, the
map folded back and a 1x1 projection; no fusion conv and no shortcut. Its transformer blocks replace multi-head
attention by separable self-attention (``LinearSelfAttention``): one query value per token gives context scores
(softmax over the patches), whose weighted sum of the keys is one context vector per pixel position of a patch, which
scales relu(value) of every token, in time linear in the number of patches. Its norms are GroupNorms with one group
(timm's ``GroupNorm1``), which normalise over a whole image's map (every position and channel) and not per token.

Where v2 differs from v1 in the unfold: a map that is not whole patches is resized before the block's first conv,
with ``align_corners=True``, and the block's output keeps that size (v1 resizes after its 1x1 conv, with
``align_corners=False``, and back at the end); the order of tokens within the unfolded (B, P, N, d) map is v1's.

Widths follow timm's ``_mobilevitv2_cfg(multiplier)``: stem int(32 m), stages int(c m) for c in (64, 128, 256, 384,
512), transformer width make_divisible(0.5 * stage width), MV2 expansion 2, MLP ratio 2, no final 1x1 conv (the head
pools the last stage's map). Parameters carry timm's names: ``stages.{s}.1.conv_kxk / conv_1x1 / transformer.{j}.
norm1 / attn.qkv_proj / attn.out_proj / norm2 / mlp.fc1 / mlp.fc2 / norm / conv_proj`` besides v1's stem, MV2 blocks
and ``head.fc``; the attention's and the MLP's projections are biased 1x1 convs, weights (out, in, 1, 1).
"""

from dataclasses import dataclass

from .layers import LayerNorm
from .mobilevit import Conv2d, ConvNormAct, MobileViT, fold_patches, make_divisible, unfold_patches
from .model import Module
from .preprocess_config import data_cfg


@dataclass(frozen=True)
class MobileViTV2Config:
    """timm ``ByobNet`` arguments for MobileViT v2 and the architecture of its ``mobilevitv2_*`` configs.

    The defaults are ``mobilevitv2_100``. Only ``in_chans``, ``num_classes``, ``global_pool``, ``img_size``,
    ``norm_eps`` and vitnp's ``fold_bn`` may be overridden by name; the rest is fixed by the registry name, as in timm.
    """

    in_chans: int = 3
    num_classes: int = 1000
    global_pool: str = "avg"
    img_size: object = (256, 256)  # the nominal size (data config); the network takes any size of at least 1x1
    stem_chs: int = 32
    stage_chs: tuple = (64, 128, 256, 384, 512)
    transformer_depths: tuple = (2, 4, 3)  # stages 2, 3, 4
    bottle_ratio: float = 2.0  # MV2 expansion: mid channels = make_divisible(in_chs * bottle_ratio)
    transformer_ratio: float = 0.5  # transformer width = make_divisible(transformer_ratio * stage width)
    patch_size: int = 2
    mlp_ratio: float = 2.0
    norm_eps: float = 1e-5  # the GroupNorms'
    fold_bn: bool = False  # vitnp: fold each BatchNorm into its conv at load time
    num_features = 0  # not a field: timm's ByoModelCfg.num_features, 0 for no final 1x1 conv


class PointwiseConv(Conv2d):
    """``nn.Conv2d(in_chs, out_chs, 1)`` with its bias, on channels-last maps: a Linear over the channels of every
    position, weight (out, in, 1, 1)."""

    def __init__(self, in_chs, out_chs):
        super().__init__(in_chs, out_chs, 1)
        self.add_parameter("bias", (out_chs,), "zeros")

    def __call__(self, x, act="none", residual=None):
        """act(conv(x) + bias) + residual."""
        return super().__call__(x, shift=self.bias, act=act, residual=residual)


class GroupNorm1(LayerNorm):
    """timm ``GroupNorm1``: ``nn.GroupNorm(1, dim, eps)``, LayerNorm's parameters, but the statistics of a whole
    sample (every position and channel of a channels-last (B, ..., dim) array), the affine per channel."""

    def __call__(self, x):
        return self.ops.group_norm(x, self.weight, self.bias, self.eps)


class LinearSelfAttention(Module):
    """timm ``LinearSelfAttention``: qkv 1x1 conv to 1 + 2 dim channels (query | key | value), separable
    self-attention over the patches, output 1x1 conv."""

    def __init__(self, dim):
        super().__init__()
        self.qkv_proj = PointwiseConv(dim, 1 + 2 * dim)
        self.out_proj = PointwiseConv(dim, dim)
        self.dim = dim

    def __call__(self, x, residual=None):
        """x (B, P, N, dim) -> (B, P, N, dim), plus ``residual`` when given (the block's shortcut)."""
        d = self.dim
        qkv = self.qkv_proj(x)  # (B, P, N, 1 + 2d)
        query, key, value = qkv[..., 0], qkv[..., 1:1 + d], qkv[..., 1 + d:]  # (B, P, N), (B, P, N, d), (B, P, N, d)
        x = self.ops.linear_self_attention(query, key, value)  # softmax over the N patches of each pixel position p
        return self.out_proj(x, residual=residual)


class ConvMlp(Module):
    """timm ``ConvMlp``: fc1 (1x1 conv) -> SiLU -> fc2 (1x1 conv)."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = PointwiseConv(dim, hidden)
        self.fc2 = PointwiseConv(hidden, dim)

    def __call__(self, x, residual=None):
        """fc2(silu(fc1(x))), plus ``residual`` when given."""
        return self.fc2(self.fc1(x, act="silu"), residual=residual)


class LinearTransformerBlock(Module):
    """timm ``LinearTransformerBlock`` (pre-norm): x = x + attn(norm1(x)); x = x + mlp(norm2(x))."""

    def __init__(self, dim, mlp_ratio=2.0, eps=1e-5):
        super().__init__()
        self.norm1 = GroupNorm1(dim, eps)
        self.attn = LinearSelfAttention(dim)
        self.norm2 = GroupNorm1(dim, eps)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio))

    def __call__(self, x):
        x = self.attn(self.norm1(x), residual=x)  # x + attn(norm1(x))
        return self.mlp(self.norm2(x), residual=x)  # x + mlp(norm2(x))


class MobileVitV2Block(Module):
    """timm ``MobileVitV2Block``: resize to whole patches, depthwise conv, 1x1 conv, unfold, linear transformer,
    GroupNorm, fold, 1x1 projection."""

    def __init__(self, chs, transformer_dim, transformer_depth, patch_size=2, mlp_ratio=2.0, eps=1e-5):
        super().__init__()
        self.conv_kxk = ConvNormAct(chs, chs, 3, groups=chs)  # timm's group_size 1: depthwise
        self.conv_1x1 = Conv2d(chs, transformer_dim, 1)
        self.transformer = Module()
        for j in range(transformer_depth):
            setattr(self.transformer, str(j), LinearTransformerBlock(transformer_dim, mlp_ratio, eps))
        self.norm = GroupNorm1(transformer_dim, eps)
        self.conv_proj = ConvNormAct(transformer_dim, chs, 1, act="none")
        self.patch_size = patch_size
        self.transformer_blocks = [getattr(self.transformer, str(j)) for j in range(transformer_depth)]

    def __call__(self, x):
        """(B, H, W, C) -> (B, H', W', C), H' and W' the sizes rounded up to whole patches."""
        p = self.patch_size
        H, W = x.shape[1:3]
        new_h, new_w = -(-H // p) * p, -(-W // p) * p
        if (new_h, new_w) != (H, W):  # timm resizes the input to whole patches; the output keeps that size
            x = self.ops.resize_bilinear(x, (new_h, new_w), align_corners=True)

        x = self.conv_kxk(x)  # (B, H', W', C): local representation
        x = self.conv_1x1(x)  # (B, H', W', d)

        x = unfold_patches(x, p)  # (B, P, N, d): sequence p holds pixel position p of every patch
        for block in self.transformer_blocks:
            x = block(x)
        x = self.norm(x)
        x = fold_patches(x, p, (new_h, new_w))  # (B, H', W', d)

        return self.conv_proj(x)  # (B, H', W', C)


class MobileViTV2(MobileViT):
    """timm ``ByobNet`` with a MobileViT v2 config (``mobilevitv2_050`` ... ``mobilevitv2_200``).

    ``model(x)`` maps (B, C, H, W) images with pixels in [0, 1] (no mean / std) to (B, num_classes) logits, or
    (B, num_features) when num_classes is 0 (num_features: the last stage's width); ``forward_features`` gives the
    last stage's map (B, num_features, h, w) (timm's ``final_conv`` is an identity here). Any image size of at least
    1x1 is accepted, as by timm.
    """

    Config = MobileViTV2Config
    mv2_depths = (1, 2, 1, 1, 1)  # MV2 blocks per stage
    fixed_by_name = (
        "stem_chs",
        "stage_chs",
        "transformer_depths",
        "bottle_ratio",
        "transformer_ratio",
        "patch_size",
        "mlp_ratio",
    )

    def check_transformer_config(self, cfg):
        """Nothing to check: the transformer widths follow from the stage widths."""

    def make_transformer_block(self, index, chs):
        """The MobileViT v2 block that ends transformer stage ``index`` (0 for stage 2), on ``chs`` channels."""
        cfg = self.cfg
        dim = make_divisible(cfg.transformer_ratio * chs)
        return MobileVitV2Block(chs, dim, cfg.transformer_depths[index], cfg.patch_size, cfg.mlp_ratio, cfg.norm_eps)


def _widths(multiplier):
    """timm's ``_mobilevitv2_cfg(multiplier)`` widths: the stem's and each stage's, scaled and truncated to ints."""
    return dict(stem_chs=int(32 * multiplier), stage_chs=tuple(int(c * multiplier) for c in (64, 128, 256, 384, 512)))


# timm's pretrained_cfg of the default tag .cvnets_in1k (timm 1.0.31): pixels in [0, 1], bicubic, crop 0.888
_MOBILEVITV2 = data_cfg(256, crop_pct=0.888, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))

# name -> (architecture, preprocessing config)
MODELS = {
    f"mobilevitv2_{round(multiplier * 100):03d}": (_widths(multiplier), _MOBILEVITV2)
    for multiplier in (0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0)
}
