"""The Vision Transformer family: timm's ``VisionTransformer`` and DeiT (distillation token), forward only.

Parameters carry timm's ``state_dict`` names: ``cls_token``, ``pos_embed``, ``dist_token``, ``patch_embed.proj``,
``blocks.{i}.norm1 / attn.qkv / attn.proj / norm2 / mlp.fc1 / mlp.fc2``, ``norm``, ``fc_norm``,
``pre_logits.fc`` (the representation layer of the original ViT, seed 002), ``head``, ``head_dist``.
"""

from dataclasses import dataclass

import numpy as np

from . import ops
from .layers import Block, Identity, LayerNorm, Linear, PatchEmbed
from .model import Model, Module
from .preprocess_config import IMAGENET_MEAN, IMAGENET_STD, data_cfg

GLOBAL_POOLS = ("", "token", "avg", "max", "avgmax")


@dataclass(frozen=True)
class ViTConfig:
    """timm ``VisionTransformer`` constructor arguments (the inference-relevant ones), timm's defaults."""

    img_size: tuple = (224, 224)
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    global_pool: str = "token"
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    class_token: bool = True
    fc_norm: object = None  # None: use fc_norm exactly when global_pool is 'avg', 'max' or 'avgmax', as timm
    representation_size: object = None  # int: pre-logits Linear(embed_dim, size) + Tanh before the head
    distilled: bool = False  # DeiT: a distillation token and a second head, outputs averaged at inference
    norm_eps: float = 1e-6
    act: str = "gelu"


class VisionTransformer(Model):
    """timm ``VisionTransformer`` / ``VisionTransformerDistilled``.

    ``model(x)`` maps (B, C, H, W) images to (B, num_classes) logits (or (B, num_features) when num_classes is 0);
    ``forward_features`` gives the tokens after the final norm, (B, prefix + N, D).
    """

    Config = ViTConfig
    fixed_by_name = ("distilled",)  # a registry name says whether the model is DeiT-distilled

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        if cfg.global_pool not in GLOBAL_POOLS:
            raise ValueError(f"global_pool must be one of {GLOBAL_POOLS}, got {cfg.global_pool!r}")
        if cfg.global_pool == "token" and not cfg.class_token:
            raise ValueError("global_pool='token' needs class_token=True")
        if cfg.distilled and (cfg.global_pool != "token" or not cfg.class_token):
            raise ValueError("a distilled (DeiT) model pools its class and distillation tokens: global_pool='token'")
        if cfg.distilled and cfg.representation_size:
            raise ValueError("a distilled (DeiT) model has no representation (pre-logits) layer: drop representation_size")
        img_size = _pair(cfg.img_size)
        if img_size[0] % cfg.patch_size or img_size[1] % cfg.patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {cfg.patch_size}")
        self.cfg = cfg
        self.img_size = img_size
        self.in_chans = cfg.in_chans
        self.patch_size = cfg.patch_size
        self.grid_size = (img_size[0] // cfg.patch_size, img_size[1] // cfg.patch_size)
        self.num_prefix_tokens = int(cfg.class_token) + int(cfg.distilled)
        self.use_fc_norm = cfg.global_pool in ("avg", "max", "avgmax") if cfg.fc_norm is None else cfg.fc_norm
        D = cfg.embed_dim
        num_patches = self.grid_size[0] * self.grid_size[1]

        if cfg.class_token:
            self.add_parameter("cls_token", (1, 1, D), "small_normal")
        self.add_parameter("pos_embed", (1, self.num_prefix_tokens + num_patches, D), "trunc_normal")
        if cfg.distilled:
            self.add_parameter("dist_token", (1, 1, D), "trunc_normal")
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, D)
        self.blocks = Module()
        for i in range(cfg.depth):
            setattr(self.blocks, str(i), Block(D, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias, cfg.norm_eps, cfg.act))
        self.norm = Identity() if self.use_fc_norm else LayerNorm(D, cfg.norm_eps)
        if self.use_fc_norm:
            self.fc_norm = LayerNorm(D, cfg.norm_eps)
        self.num_features = D
        if cfg.representation_size:
            self.pre_logits = Module()
            self.pre_logits.fc = Linear(D, cfg.representation_size)
            self.num_features = cfg.representation_size
        self.num_classes = cfg.num_classes
        if cfg.num_classes:
            self.head = Linear(self.num_features, cfg.num_classes)
            if cfg.distilled:
                self.head_dist = Linear(self.num_features, cfg.num_classes)

    @property
    def block_list(self):
        return [getattr(self.blocks, str(i)) for i in range(self.cfg.depth)]

    def _pos_embed(self, x):
        """Prepend the prefix tokens [cls, dist] and add the position embedding: (B, N, D) -> (B, prefix + N, D)."""
        B, N, D = x.shape
        prefix = []
        if self.cfg.class_token:
            prefix.append(np.broadcast_to(self.cls_token, (B, 1, D)))
        if self.cfg.distilled:
            prefix.append(np.broadcast_to(self.dist_token, (B, 1, D)))
        x = np.concatenate(prefix + [x], axis=1) if prefix else x  # (B, prefix + N, D)
        return x + self.pos_embed

    def forward_features(self, x):
        """(B, C, H, W) -> (B, prefix + N, D): patch embedding, position embedding, blocks, final norm."""
        x = self.check_input(x)
        x = self.patch_embed(x)  # (B, N, D)
        x = self._pos_embed(x)  # (B, prefix + N, D)
        for block in self.block_list:
            x = block(x)
        return self.norm(x)

    def pool(self, x):
        """(B, prefix + N, D) -> (B, D) by ``global_pool``; the avg / max pools leave the prefix tokens out."""
        pool = self.cfg.global_pool
        if pool == "token":
            return x[:, 0]
        patches = x[:, self.num_prefix_tokens :]
        if pool == "avg":
            return patches.mean(axis=1)
        if pool == "max":
            return patches.max(axis=1)
        if pool == "avgmax":
            return 0.5 * (patches.mean(axis=1) + patches.max(axis=1))
        return x

    def forward_head(self, x, pre_logits=False):
        """Pool, fc_norm, representation layer, head. ``pre_logits=True`` stops before the head."""
        if self.cfg.distilled:
            x_cls, x_dist = x[:, 0], x[:, 1]
            if pre_logits or not self.num_classes:
                return (x_cls + x_dist) / 2
            return (self.head(x_cls) + self.head_dist(x_dist)) / 2  # DeiT at inference: mean of the two heads
        x = self.pool(x)
        if self.use_fc_norm:
            x = self.fc_norm(x)
        if self.cfg.representation_size:
            x = ops.tanh(self.pre_logits.fc(x))
        if pre_logits or not self.num_classes:
            return x
        return self.head(x)


def _pair(size):
    return (size, size) if isinstance(size, int) else tuple(size)


_SIZES = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
    "large": dict(embed_dim=1024, depth=24, num_heads=16),
}
_DEIT = data_cfg(mean=IMAGENET_MEAN, std=IMAGENET_STD)

# name -> (timm constructor kwargs, timm pretrained_cfg of the default tag), checked against timm 1.0.31
MODELS = {
    "vit_tiny_patch16_224": (dict(patch_size=16, **_SIZES["tiny"]), data_cfg()),
    "vit_small_patch16_224": (dict(patch_size=16, **_SIZES["small"]), data_cfg()),
    "vit_base_patch16_224": (dict(patch_size=16, **_SIZES["base"]), data_cfg()),
    "vit_large_patch16_224": (dict(patch_size=16, **_SIZES["large"]), data_cfg()),
    "vit_small_patch32_224": (dict(patch_size=32, **_SIZES["small"]), data_cfg()),
    "vit_base_patch32_224": (dict(patch_size=32, **_SIZES["base"]), data_cfg()),
    # default tag orig_in21k: timm builds these two without a head unless num_classes is given
    "vit_large_patch32_224": (dict(patch_size=32, num_classes=0, **_SIZES["large"]), data_cfg()),
    "vit_huge_patch14_224": (dict(patch_size=14, num_classes=0, embed_dim=1280, depth=32, num_heads=16), data_cfg()),
    "vit_base_patch16_384": (dict(img_size=384, patch_size=16, **_SIZES["base"]), data_cfg(384, crop_pct=1.0)),
    "deit_tiny_patch16_224": (dict(patch_size=16, **_SIZES["tiny"]), _DEIT),
    "deit_small_patch16_224": (dict(patch_size=16, **_SIZES["small"]), _DEIT),
    "deit_base_patch16_224": (dict(patch_size=16, **_SIZES["base"]), _DEIT),
    "deit_tiny_distilled_patch16_224": (dict(patch_size=16, distilled=True, **_SIZES["tiny"]), _DEIT),
    "deit_small_distilled_patch16_224": (dict(patch_size=16, distilled=True, **_SIZES["small"]), _DEIT),
    "deit_base_distilled_patch16_224": (dict(patch_size=16, distilled=True, **_SIZES["base"]), _DEIT),
    # The demo model: a timm VisionTransformer config for 32x32 grey digits, trained by vitnp/demo/train_digits.py.
    "vit_digits_patch4_32": (
        dict(img_size=32, patch_size=4, in_chans=1, num_classes=10, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0),
        data_cfg(32, crop_pct=1.0, mean=(0.5,), std=(0.5,), interpolation="bilinear", in_chans=1),
    ),
}
