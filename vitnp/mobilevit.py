"""MobileViT v1: timm's ``ByobNet`` built from the ``mobilevit_xxs / xs / s`` configs, forward only.

A conv stem, MobileNetV2 inverted-residual (MV2) blocks, and in stages 2-4 a MobileViT block: local 3x3 conv, 1x1 to
the transformer width, the map cut into 2x2 patches and a transformer run across the patches once for each of the 4
pixel positions, folded back, projected and fused with the block input by a 3x3 conv (seed 004). The model takes and
gives NCHW arrays, as timm's; inside, the feature maps are NHWC (B, H, W, C), so that a 1x1 conv is a Linear over the
channels, the unfold to patches moves whole channel vectors, and the transformer's tokens are rows. The stem takes an
NHWC view of the NCHW images (no copy); the blocks (``model.stages[s][b]``) take and give NHWC maps.

Parameters carry timm's ``state_dict`` names: ``stem.conv / stem.bn``, ``stages.{s}.{b}.conv1_1x1 / conv2_kxk /
conv3_1x1`` (MV2), ``stages.{s}.{b}.conv_kxk / conv_1x1 / transformer.{j} / norm / conv_proj / conv_fusion``
(MobileViT block), ``final_conv``, ``head.fc``. Every conv is bias-free and followed by a BatchNorm (eps 1e-5, with
its running statistics and ``num_batches_tracked`` buffers) and SiLU, except the MV2 projection (no activation) and
``conv_1x1`` (bare conv).

BatchNorm runs in eval mode, as the per-channel affine of its running statistics after the conv, then the activation:
act(conv(x) * scale + shift) (the fast backend applies both as it writes each output tile). ``fold_bn=True`` instead
folds each BatchNorm into its conv whenever weights are loaded or initialised (weights scaled per output channel, the
shift becoming a bias), equal to the unfolded path up to rounding. The state_dict keeps timm's keys and values either
way.
"""

import operator
from dataclasses import dataclass

import numpy as np

from .layers import Block, LayerNorm, Linear
from .model import Identity, Model, Module
from .preprocess_config import data_cfg

GLOBAL_POOLS = ("avg", "max", "avgmax", "")

# The MobileViT v1 layout, the same for every size: MV2 blocks per stage and the stride of each stage's first block;
# stages 2, 3 and 4 end with a MobileViT block (timm's ``_mobilevit_block``).
_MV2_DEPTHS = (1, 3, 1, 1, 1)
_STAGE_STRIDES = (1, 2, 2, 2, 2)
_FIRST_TRANSFORMER_STAGE = 2


@dataclass(frozen=True)
class MobileViTConfig:
    """timm ``ByobNet`` arguments for MobileViT v1 and the architecture of its ``mobilevit_*`` configs.

    The defaults are ``mobilevit_s``. Only ``in_chans``, ``num_classes``, ``global_pool``, ``img_size`` and vitnp's
    ``fold_bn`` may be overridden by name; the rest is fixed by the registry name, as in timm.
    """

    in_chans: int = 3
    num_classes: int = 1000
    global_pool: str = "avg"
    img_size: object = (256, 256)  # the nominal size (data config); the network takes any size of at least 1x1
    stem_chs: int = 16
    stage_chs: tuple = (32, 64, 96, 128, 160)
    transformer_dims: tuple = (144, 192, 240)  # stages 2, 3, 4
    transformer_depths: tuple = (2, 4, 3)
    bottle_ratio: float = 4.0  # MV2 expansion: mid channels = make_divisible(in_chs * bottle_ratio)
    num_features: int = 640  # final 1x1 conv width
    patch_size: int = 2
    num_heads: int = 4
    mlp_ratio: float = 2.0
    fold_bn: bool = False  # vitnp: fold each BatchNorm into its conv at load time


def batch_norm_scale_shift(weight, bias, running_mean, running_var, eps):
    """BatchNorm in eval mode as the per-channel affine y = x * scale + shift (how torch's CPU kernel applies it).

    scale = weight / sqrt(running_var + eps), shift = bias - running_mean * scale.
    """
    scale = weight / np.sqrt(running_var + eps)
    return scale, bias - running_mean * scale


def fold_batch_norm(conv_weight, weight, bias, running_mean, running_var, eps):
    """A bias-free conv followed by eval BatchNorm, as one conv: returns (folded weight, folded bias).

    BN(conv(x, W)) = conv(x, W) * scale + shift = conv(x, W * scale[o]) + shift, per output channel o, with scale and
    shift of :func:`batch_norm_scale_shift`. Computed in float64 and rounded once to the weight's dtype, so the
    folded conv differs from conv-then-BN by rounding only.
    """
    scale, shift = batch_norm_scale_shift(
        *(np.asarray(v, dtype=np.float64) for v in (weight, bias, running_mean, running_var)), eps
    )
    folded = np.asarray(conv_weight, dtype=np.float64) * scale[:, None, None, None]
    return folded.astype(conv_weight.dtype), shift.astype(conv_weight.dtype)


def make_divisible(value, divisor=8, round_limit=0.9):
    """timm's ``make_divisible``: ``value`` rounded to the nearest multiple of ``divisor``, never below 90% of it."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < round_limit * value else rounded


class Conv2d(Module):
    """``nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding, groups=groups, bias=False)`` on NHWC maps.

    Padding is timm's symmetric default ((stride - 1) + (kernel_size - 1)) // 2: 1 for 3x3 (stride 1 or 2), 0 for 1x1.
    MobileViT's convs are plain (groups 1) or depthwise (groups = in_chs = out_chs).
    """

    def __init__(self, in_chs, out_chs, kernel_size, stride=1, groups=1):
        super().__init__()
        if groups != 1 and not groups == in_chs == out_chs:
            raise ValueError(f"groups={groups} with in_chs={in_chs}, out_chs={out_chs}: MobileViT's convs are plain "
                             "(groups=1) or depthwise (groups = in_chs = out_chs)")
        self.add_parameter("weight", (out_chs, in_chs // groups, kernel_size, kernel_size), "lecun_normal")
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = ((stride - 1) + (kernel_size - 1)) // 2
        self.groups = groups

    def __call__(self, x, weight=None, scale=None, shift=None, act="none", residual=None):
        """act(conv(x) * scale + shift) + residual, per output channel: (B, H, W, in_chs) -> (B, Ho, Wo, out_chs).

        ``x`` may be a tuple of maps, read as their channel concatenation (timm's ``torch.cat`` before the conv);
        ``weight`` replaces the conv's own by a BatchNorm-folded copy of it; scale and shift default to 1 and 0 (a
        BatchNorm in eval mode after the conv, and its activation); ``residual`` has the output's shape.
        """
        weight = self.weight if weight is None else weight
        return self.ops.conv2d(x, weight, shift, self.stride, self.padding, self.groups, scale=scale, act=act,
                               residual=residual)


class BatchNormAct2d(Module):
    """timm ``BatchNormAct2d`` in eval mode: act((x - running_mean) / sqrt(running_var + eps) * weight + bias).

    Its parameters and buffers; the conv before it applies it (:class:`ConvNormAct`) as the per-channel affine x *
    scale + shift of :meth:`scale_shift`, then the activation.
    """

    def __init__(self, num_features, act="silu", eps=1e-5):
        super().__init__()
        self.add_parameter("weight", (num_features,), "ones")
        self.add_parameter("bias", (num_features,), "zeros")
        self.add_buffer("running_mean", (num_features,), "zeros")
        self.add_buffer("running_var", (num_features,), "ones")
        self.add_buffer("num_batches_tracked", (), "zeros", dtype=np.int64)
        self.act = act
        self.eps = eps

    def scale_shift(self):
        """(scale, shift) per channel, :func:`batch_norm_scale_shift` of the current parameters: computed once and kept
        while the four arrays are the same (``load_state_dict`` and ``init_weights`` bring new ones), which are made
        read-only, so that an in-place change, which the kept values would not see, fails loudly."""
        arrays = (self.weight, self.bias, self.running_mean, self.running_var)
        kept = self.__dict__.get("_scale_shift")
        if kept is None or kept[1] != self.eps or not all(map(operator.is_, kept[0], arrays)):
            for array in arrays:
                array.flags.writeable = False
            kept = (arrays, self.eps, batch_norm_scale_shift(*arrays, self.eps))
            object.__setattr__(self, "_scale_shift", kept)
        return kept[2]


class ConvNormAct(Module):
    """timm ``ConvNormAct``: bias-free conv -> BatchNorm -> activation ('silu' or 'none').

    After :meth:`fold` the BatchNorm lives in the conv: conv(x, weight * scale) + shift, then the activation.
    """

    def __init__(self, in_chs, out_chs, kernel_size, stride=1, groups=1, act="silu"):
        super().__init__()
        self.conv = Conv2d(in_chs, out_chs, kernel_size, stride, groups)
        self.bn = BatchNormAct2d(out_chs, act)
        self.folded = None

    def fold(self):
        """Fold the BatchNorm into the conv, from the current parameters (:func:`fold_batch_norm`)."""
        bn = self.bn
        self.folded = fold_batch_norm(self.conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps)

    def parts(self):
        """(weight, scale, shift, act) with act(bn(conv(x))) = act(conv(x, weight) * scale + shift) per output channel:
        the conv's own weight and the BatchNorm's scale and shift, or after :meth:`fold` the folded weight, no scale
        (None) and the folded bias."""
        if self.folded is None:
            weight, (scale, shift) = self.conv.weight, self.bn.scale_shift()
        else:
            (weight, shift), scale = self.folded, None
        return weight, scale, shift, self.bn.act

    def __call__(self, x, residual=None):
        """act(bn(conv(x))) + residual (``residual`` optional: a block's shortcut)."""
        weight, scale, shift, act = self.parts()
        return self.conv(x, weight, scale, shift, act, residual)


class BottleneckBlock(Module):
    """timm ``BottleneckBlock`` as MobileViT's MV2 (inverted residual) block.

    Expand 1x1 (in -> mid, SiLU), depthwise kxk with the block's stride (SiLU), project 1x1 (mid -> out, no
    activation), plus the input when stride is 1 and in == out channels (timm builds no shortcut otherwise).
    """

    def __init__(self, in_chs, out_chs, stride=1, bottle_ratio=4.0, kernel_size=3):
        super().__init__()
        mid_chs = make_divisible(in_chs * bottle_ratio)
        self.conv1_1x1 = ConvNormAct(in_chs, mid_chs, 1)
        self.conv2_kxk = ConvNormAct(mid_chs, mid_chs, kernel_size, stride=stride, groups=mid_chs)
        self.conv3_1x1 = ConvNormAct(mid_chs, out_chs, 1, act="none")
        self.has_shortcut = stride == 1 and in_chs == out_chs

    def __call__(self, x):
        # conv3_1x1(conv2_kxk(conv1_1x1(x))) (+ x): (B, H, W, in) -> (B, H / stride, W / stride, out)
        return self.ops.inverted_residual(x, self.conv1_1x1, self.conv2_kxk, self.conv3_1x1, self.has_shortcut)


class MobileVitBlock(Module):
    """timm ``MobileVitBlock``: local conv, unfold into patches, transformer, fold, project, fuse with the input."""

    def __init__(self, chs, transformer_dim, transformer_depth, patch_size=2, num_heads=4, mlp_ratio=2.0):
        super().__init__()
        self.conv_kxk = ConvNormAct(chs, chs, 3)
        self.conv_1x1 = Conv2d(chs, transformer_dim, 1)
        self.transformer = Module()
        for j in range(transformer_depth):
            block = Block(transformer_dim, num_heads, mlp_ratio, qkv_bias=True, eps=1e-5, act="silu")
            setattr(self.transformer, str(j), block)
        self.norm = LayerNorm(transformer_dim, 1e-5)
        self.conv_proj = ConvNormAct(transformer_dim, chs, 1)
        self.conv_fusion = ConvNormAct(2 * chs, chs, 3)
        self.patch_size = patch_size
        self.transformer_blocks = [getattr(self.transformer, str(j)) for j in range(transformer_depth)]

    def __call__(self, x):
        shortcut = x
        x = self.conv_kxk(x)  # (B, H, W, C): local representation
        x = self.conv_1x1(x)  # (B, H, W, d)

        p = self.patch_size
        B, H, W, d = x.shape
        new_h, new_w = -(-H // p) * p, -(-W // p) * p
        resized = (new_h, new_w) != (H, W)
        if resized:  # timm resizes a map that is not whole patches (padding would need masking in attention)
            x = self.ops.resize_bilinear(x, (new_h, new_w))
        x = unfold_patches(x, p)  # (B, P, N, d)
        x = x.reshape(B * p * p, -1, d)  # (B*P, N, d): each sequence on its own

        x = self.ops.transformer_blocks(x, self.transformer_blocks)
        x = self.norm(x)

        x = fold_patches(x.reshape(B, p * p, -1, d), p, (new_h, new_w))  # (B, new_h, new_w, d)
        if resized:
            x = self.ops.resize_bilinear(x, (H, W))

        x = self.conv_proj(x)  # (B, H, W, C)
        return self.conv_fusion((shortcut, x))  # on cat(shortcut, x), (B, H, W, 2C) -> (B, H, W, C)


def unfold_patches(x, patch_size):
    """timm's unfold of a MobileViT block, channels last: (B, H, W, d) -> (B, P, N, d), P = p*p, N = (H/p)(W/p).

    Token n = i*nw + j of sequence ph*p + pw is pixel (i*p + ph, j*p + pw), so each of the P sequences of an image
    holds one pixel position of every patch. H and W are multiples of p.
    """
    B, H, W, d = x.shape
    p = patch_size
    nh, nw = H // p, W // p
    x = x.reshape(B, nh, p, nw, p, d).transpose(0, 2, 4, 1, 3, 5)  # (B, ph, pw, nh, nw, d)
    return x.reshape(B, p * p, nh * nw, d)


def fold_patches(x, patch_size, size):
    """The inverse of :func:`unfold_patches`: (B, P, N, d) -> the (B, H, W, d) map, ``size`` = (H, W)."""
    B, _, _, d = x.shape
    p = patch_size
    H, W = size
    x = x.reshape(B, p, p, H // p, W // p, d).transpose(0, 3, 1, 4, 2, 5)  # (B, nh, ph, nw, pw, d)
    return x.reshape(B, H, W, d)



class MobileViT(Model):
    """timm ``ByobNet`` with a MobileViT v1 config (``mobilevit_xxs / xs / s``).

    ``model(x)`` maps (B, C, H, W) images with pixels in [0, 1] (no mean / std) to (B, num_classes) logits, or
    (B, num_features) when num_classes is 0; ``forward_features`` gives the final conv's map (B, num_features, h, w),
    h = W / 32 rounded up at each stride-2 conv. Any image size of at least 1x1 is accepted, as by timm.
    """

    Config = MobileViTConfig
    mv2_depths = _MV2_DEPTHS
    fixed_by_name = (
        "stem_chs",
        "stage_chs",
        "transformer_dims",
        "transformer_depths",
        "bottle_ratio",
        "num_features",
        "patch_size",
        "num_heads",
        "mlp_ratio",
    )

    def __init__(self, cfg: MobileViTConfig):
        super().__init__()
        if cfg.global_pool not in GLOBAL_POOLS:
            raise ValueError(f"global_pool must be one of {GLOBAL_POOLS}, got {cfg.global_pool!r}")
        if cfg.global_pool == "" and cfg.num_classes:
            raise ValueError("global_pool='' keeps the (B, C, h, w) map, which has no classifier: set num_classes=0")
        if len(cfg.stage_chs) != len(self.mv2_depths):
            raise ValueError(f"stage_chs needs {len(self.mv2_depths)} entries, got {cfg.stage_chs}")
        if len(cfg.transformer_depths) != len(self.mv2_depths) - _FIRST_TRANSFORMER_STAGE:
            raise ValueError(f"transformer_depths needs {len(self.mv2_depths) - _FIRST_TRANSFORMER_STAGE} entries")
        self.check_transformer_config(cfg)
        self.cfg = cfg
        self.img_size = (cfg.img_size, cfg.img_size) if isinstance(cfg.img_size, int) else tuple(cfg.img_size)
        self.in_chans = cfg.in_chans
        self.num_classes = cfg.num_classes
        self.num_features = cfg.num_features or cfg.stage_chs[-1]  # timm: no final conv when num_features is 0

        self.stem = ConvNormAct(cfg.in_chans, cfg.stem_chs, 3, stride=2)
        self.stages = Module()
        self.block_list = []
        in_chs = cfg.stem_chs
        for s, (chs, depth, stride) in enumerate(zip(cfg.stage_chs, self.mv2_depths, _STAGE_STRIDES)):
            stage = Module()
            for b in range(depth):
                setattr(stage, str(b), BottleneckBlock(in_chs, chs, stride if b == 0 else 1, cfg.bottle_ratio))
                in_chs = chs
            if s >= _FIRST_TRANSFORMER_STAGE:
                setattr(stage, str(depth), self.make_transformer_block(s - _FIRST_TRANSFORMER_STAGE, chs))
            setattr(self.stages, str(s), stage)
            self.block_list += list(stage._modules.values())
        self.final_conv = ConvNormAct(in_chs, cfg.num_features, 1) if cfg.num_features else Identity()
        self.head = Module()
        if cfg.num_classes:
            self.head.fc = Linear(self.num_features, cfg.num_classes)

    def check_transformer_config(self, cfg):
        """The checks of the transformer stages' arguments (MobileViT v1: a width per stage, divisible by the heads)."""
        if len(cfg.transformer_dims) != len(cfg.transformer_depths):
            raise ValueError(f"transformer_dims needs {len(cfg.transformer_depths)} entries (one per transformer "
                             f"stage), got {cfg.transformer_dims}")
        for dim in cfg.transformer_dims:
            if dim % cfg.num_heads:
                raise ValueError(f"transformer dim {dim} is not divisible by num_heads {cfg.num_heads}")

    def make_transformer_block(self, index, chs):
        """The MobileViT block that ends transformer stage ``index`` (0 for stage 2), on ``chs`` channels."""
        cfg = self.cfg
        return MobileVitBlock(chs, cfg.transformer_dims[index], cfg.transformer_depths[index], cfg.patch_size,
                              cfg.num_heads, cfg.mlp_ratio)

    def check_image_size(self, height, width):
        if height < 1 or width < 1:
            raise ValueError(f"expected images of at least 1x1 pixels, got {height}x{width}")

    def fold_batch_norms(self):
        """Fold every BatchNorm into its conv from the current parameters (done at load when ``fold_bn``)."""
        for _, module in self.named_modules():
            if isinstance(module, ConvNormAct):
                module.fold()

    def init_weights(self, seed=0, dtype=np.float32):
        super().init_weights(seed=seed, dtype=dtype)
        if self.cfg.fold_bn:
            self.fold_batch_norms()

    def load_state_dict(self, state_dict, strict=True, copy=True):
        result = super().load_state_dict(state_dict, strict=strict, copy=copy)
        if self.cfg.fold_bn:
            self.fold_batch_norms()
        return result

    def forward_features(self, x):
        """(B, C, H, W) -> (B, num_features, h, w): stem, MV2 and MobileViT blocks, final 1x1 conv."""
        x = self.check_input(x).transpose(0, 2, 3, 1)  # an NHWC view of the images: the layers work on NHWC maps
        x = self.stem(x)  # (B, H / 2, W / 2, stem_chs)
        for block in self.block_list:
            x = block(x)
        return _to_nchw(self.final_conv(x))  # (B, num_features, h, w)

    def forward_trace(self, x):
        """Every named intermediate of ``model(x)``, in order: {name: array}, for checking another implementation.

        Names are timm's module paths: 'stem' (B, stem_chs, H/2, W/2); 'stages.{s}.{b}' (each MV2 or MobileViT
        block's output, NCHW); 'final_conv' (forward_features); 'pre_logits' (pooled); 'logits' (with a head).
        """
        trace = {}
        x = self.stem(self.check_input(x).transpose(0, 2, 3, 1))
        trace["stem"] = _to_nchw(x)
        for s, stage in enumerate(self.stages._modules.values()):
            for b, block in stage._modules.items():
                x = block(x)
                trace[f"stages.{s}.{b}"] = _to_nchw(x)
        x = trace["final_conv"] = _to_nchw(self.final_conv(x))
        trace["pre_logits"] = self.forward_head(x, pre_logits=True)
        if self.cfg.num_classes:
            trace["logits"] = self.forward_head(x)
        return trace

    def forward_head(self, x, pre_logits=False):
        """Global pool over (h, w) and the classifier ``head.fc``; ``pre_logits=True`` stops after the pool."""
        pool = self.cfg.global_pool
        if pool == "avg":
            x = x.mean(axis=(2, 3))
        elif pool == "max":
            x = x.max(axis=(2, 3))
        elif pool == "avgmax":
            x = 0.5 * (x.mean(axis=(2, 3)) + x.max(axis=(2, 3)))
        if pre_logits or not self.num_classes:
            return x
        return self.head.fc(x)


def _to_nchw(x):
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))  # (B, H, W, C) -> (B, C, H, W)


_MOBILEVIT = data_cfg(256, crop_pct=0.9, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # pixels in [0, 1], bicubic

# name -> (architecture, timm pretrained_cfg of the default tag .cvnets_in1k), checked against timm 1.0.31
MODELS = {
    "mobilevit_xxs": (
        dict(
            stem_chs=16,
            stage_chs=(16, 24, 48, 64, 80),
            transformer_dims=(64, 80, 96),
            transformer_depths=(2, 4, 3),
            bottle_ratio=2.0,
            num_features=320,
        ),
        _MOBILEVIT,
    ),
    "mobilevit_xs": (
        dict(
            stem_chs=16,
            stage_chs=(32, 48, 64, 80, 96),
            transformer_dims=(96, 120, 144),
            transformer_depths=(2, 4, 3),
            bottle_ratio=4.0,
            num_features=384,
        ),
        _MOBILEVIT,
    ),
    "mobilevit_s": (
        dict(
            stem_chs=16,
            stage_chs=(32, 64, 96, 128, 160),
            transformer_dims=(144, 192, 240),
            transformer_depths=(2, 4, 3),
            bottle_ratio=4.0,
            num_features=640,
        ),
        _MOBILEVIT,
    ),
}
