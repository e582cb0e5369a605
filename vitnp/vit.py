"""The Vision Transformer family: timm's ``VisionTransformer`` and DeiT (distillation token), forward only; with
timm's constructor options, the ViTs of DINOv2 (registers, LayerScale, SwiGLU), CLIP (norm_pre, QuickGELU, projection
head), SigLIP (attention-pool head) and DeiT III.

Parameters carry timm's ``state_dict`` names: ``cls_token``, ``reg_token``, ``pos_embed``, ``dist_token``,
``patch_embed.proj``, ``norm_pre``, ``blocks.{i}.norm1 / attn.qkv / attn.q_norm / attn.k_norm / attn.proj / ls1.gamma
/ norm2 / mlp.fc1 / mlp.fc2 / ls2.gamma``, ``norm``, ``attn_pool.*``, ``fc_norm``, ``pre_logits.fc`` (the
representation layer of the original ViT, seed 002), ``head``, ``head_dist``.
"""

import math
import numbers
from dataclasses import dataclass

import numpy as np

from .layers import AttentionPoolLatent, Block, Identity, LayerNorm, Linear, PatchEmbed
from .model import Model, Module
from .preprocess_config import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, data_cfg
from .reference.ops import ACTIVATIONS
from .reference.resample import POS_EMBED_RESAMPLERS, resample_pos_embed

GLOBAL_POOLS = ("", "token", "avg", "max", "avgmax", "map")
MLP_LAYERS = ("mlp", "swiglu_packed")


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
    act: str = "gelu"  # the MLPs' activation: 'gelu', 'gelu_tanh', 'silu' or 'quick_gelu' (timm's act_layer)
    pos_embed_resample: str = "timm"  # resampler for other input sizes: one of POS_EMBED_RESAMPLERS
    dynamic_img_size: bool = True  # any image size, pos_embed resampled; False: only img_size (timm's default)
    reg_tokens: int = 0  # register tokens: reg_token (1, reg_tokens, D), after the class token
    no_embed_class: bool = False  # pos_embed covers the patches only; the prefix tokens are put in front after it
    pre_norm: bool = False  # norm_pre, a LayerNorm after the position embedding (CLIP); patch_embed then without bias
    init_values: object = None  # a number: LayerScale ls1 / ls2 in every block, gamma starting at it
    qk_norm: bool = False  # LayerNorm of q and k over head_dim in every attention (attn.q_norm, attn.k_norm)
    mlp_layer: str = "mlp"  # 'mlp' (fc1 -> act -> fc2) or 'swiglu_packed' (timm SwiGLUPacked: DINOv2 giant)


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
        if cfg.pos_embed_resample not in POS_EMBED_RESAMPLERS:
            raise ValueError(
                f"pos_embed_resample must be one of {POS_EMBED_RESAMPLERS}, got {cfg.pos_embed_resample!r}"
            )
        if cfg.distilled and cfg.representation_size:
            raise ValueError(
                "a distilled (DeiT) model has no representation (pre-logits) layer: drop representation_size"
            )
        if cfg.distilled and (cfg.reg_tokens or cfg.no_embed_class):
            raise ValueError("a distilled (DeiT) model has no register tokens and a position for every prefix token "
                             "(timm's VisionTransformerDistilled): drop reg_tokens / no_embed_class")
        if isinstance(cfg.reg_tokens, bool) or not isinstance(cfg.reg_tokens, numbers.Integral) or cfg.reg_tokens < 0:
            raise ValueError(f"reg_tokens must be an integer >= 0, got {cfg.reg_tokens!r}")
        if cfg.init_values is not None and not _is_real(cfg.init_values):
            raise ValueError(f"init_values must be None or a finite number (LayerScale's start), got "
                             f"{cfg.init_values!r}")
        if cfg.act not in ACTIVATIONS or cfg.act == "none":
            raise ValueError(f"act must be one of {ACTIVATIONS[1:]}, got {cfg.act!r}")
        if cfg.mlp_layer not in MLP_LAYERS:
            raise ValueError(f"mlp_layer must be one of {MLP_LAYERS}, got {cfg.mlp_layer!r}")
        if cfg.mlp_layer == "swiglu_packed" and cfg.act != "silu":
            raise ValueError(f"mlp_layer='swiglu_packed' gates with SiLU: act must be 'silu', got {cfg.act!r}")
        img_size = _pair(cfg.img_size)
        if img_size[0] % cfg.patch_size or img_size[1] % cfg.patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {cfg.patch_size}")
        self.cfg = cfg
        self.img_size = img_size
        self.in_chans = cfg.in_chans
        self.patch_size = cfg.patch_size
        self.grid_size = (img_size[0] // cfg.patch_size, img_size[1] // cfg.patch_size)
        self.num_prefix_tokens = int(cfg.class_token) + int(cfg.distilled) + int(cfg.reg_tokens)
        self.num_embedded_prefix = 0 if cfg.no_embed_class else self.num_prefix_tokens  # prefix tokens in pos_embed
        self.use_fc_norm = cfg.global_pool in ("avg", "max", "avgmax") if cfg.fc_norm is None else cfg.fc_norm
        D = cfg.embed_dim
        num_patches = self.grid_size[0] * self.grid_size[1]

        if cfg.class_token:
            self.add_parameter("cls_token", (1, 1, D), "small_normal")
        if cfg.reg_tokens:
            self.add_parameter("reg_token", (1, cfg.reg_tokens, D), "small_normal")
        self.add_parameter("pos_embed", (1, self.num_embedded_prefix + num_patches, D), "trunc_normal")
        if cfg.distilled:
            self.add_parameter("dist_token", (1, 1, D), "trunc_normal")
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, D, bias=not cfg.pre_norm)  # CLIP: no bias
        self.norm_pre = LayerNorm(D, cfg.norm_eps) if cfg.pre_norm else Identity()
        self.blocks = Module()
        for i in range(cfg.depth):
            block = Block(D, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias, cfg.norm_eps, cfg.act, qk_norm=cfg.qk_norm,
                          init_values=cfg.init_values, mlp_layer=cfg.mlp_layer)
            setattr(self.blocks, str(i), block)
        self.norm = Identity() if self.use_fc_norm else LayerNorm(D, cfg.norm_eps)
        if cfg.global_pool == "map":  # SigLIP's head: a latent query attends to the patch tokens
            self.attn_pool = AttentionPoolLatent(D, cfg.num_heads, cfg.mlp_ratio, eps=cfg.norm_eps, act=cfg.act)
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

    def check_image_size(self, height, width):
        if not self.cfg.dynamic_img_size:
            return super().check_image_size(height, width)
        if height < self.patch_size or width < self.patch_size:
            p = self.patch_size
            raise ValueError(f"images must be at least one patch ({p}x{p}), got {height}x{width}")

    def pos_embed_for(self, height, width):
        """The position embedding for a height x width image, gh, gw = height // p, width // p: (1, prefix + gh*gw,
        D), or (1, gh*gw, D) with ``no_embed_class``.

        The stored embedding is resampled to the new grid (prefix positions untouched) by the resampler of the
        weights' origin (``cfg.pos_embed_resample``) with that codebase's early-out: timm keeps the stored one when
        the grid is the trained one; DINO, DINOv2 and Hugging Face only when the grid is and the image is square.
        """
        grid = (height // self.patch_size, width // self.patch_size)
        method = self.cfg.pos_embed_resample
        if grid == self.grid_size and (method == "timm" or height == width):
            return self.pos_embed
        prefix, patches = self.pos_embed[:, : self.num_embedded_prefix], self.pos_embed[0, self.num_embedded_prefix :]
        if method == "dinov2":  # DINOv2 takes the whole embedding to float32 and back, the prefix positions too
            prefix = prefix.astype(np.float32).astype(prefix.dtype)
        D = patches.shape[-1]
        patches = patches.T.reshape(D, *self.grid_size)  # (D, gh, gw)
        patches = resample_pos_embed(patches, grid, method)  # (D, gh', gw')
        return np.concatenate([prefix, patches.reshape(D, -1).T[None]], axis=1)  # (1, prefix + gh'*gw', D)

    def prepare_tokens(self, x):
        """(B, C, H, W) -> (B, prefix + N, D): patch embedding, prefix tokens, position embedding, norm_pre (DINO's
        name).

        Any image of at least one patch: the rows and columns past the last whole patch are left out (as the stride-p
        convolution does) and the position embedding is resampled to the grid (:meth:`pos_embed_for`).
        """
        x = self.check_input(x)
        height, width = x.shape[-2:]
        x = self.patch_embed(x)  # (B, N, D)
        x = self._pos_embed(x, self.pos_embed_for(height, width))  # (B, prefix + N, D)
        return self.norm_pre(x)

    def _pos_embed(self, x, pos_embed):
        """Prefix tokens and position embedding, timm's ``_pos_embed``: (B, N, D) -> (B, prefix + N, D).

        The prefix tokens are [cls, reg_1 .. reg_r] (DeiT: [cls, dist]). The position embedding covers them too and
        is added after they are put in front of the patches; with ``no_embed_class`` (DeiT III, DINOv2 with
        registers) it covers the patches only and is added before.
        """
        B, N, D = x.shape
        prefix = []
        if self.cfg.class_token:
            prefix.append(np.broadcast_to(self.cls_token, (B, 1, D)))
        if self.cfg.distilled:
            prefix.append(np.broadcast_to(self.dist_token, (B, 1, D)))
        if self.cfg.reg_tokens:
            prefix.append(np.broadcast_to(self.reg_token, (B, self.cfg.reg_tokens, D)))
        if self.cfg.no_embed_class:
            x = x + pos_embed
            return np.concatenate(prefix + [x], axis=1) if prefix else x  # (B, prefix + N, D)
        x = np.concatenate(prefix + [x], axis=1) if prefix else x  # (B, prefix + N, D)
        return x + pos_embed

    def forward_features(self, x):
        """(B, C, H, W) -> (B, prefix + N, D): patch embedding, position embedding, norm_pre, blocks, final norm."""
        x = self.prepare_tokens(x)  # (B, prefix + N, D)
        for block in self.block_list:
            x = block(x)
        return self.norm(x)

    def pool(self, x):
        """(B, prefix + N, D) -> (B, D) by ``global_pool``; the avg / max pools and the attention pool ('map') leave
        the prefix tokens out."""
        pool = self.cfg.global_pool
        if pool == "token":
            return x[:, 0]
        patches = x[:, self.num_prefix_tokens :]
        if pool == "map":
            return self.attn_pool(patches)
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
            x = self.ops.tanh(self.pre_logits.fc(x))
        if pre_logits or not self.num_classes:
            return x
        return self.head(x)

    # ---- reading inside: DINO's and timm's intermediate outputs, every named step ---------------------------------

    def get_last_selfattention(self, x):
        """DINO's ``get_last_selfattention``: softmax(q k^T * scale) of the last block, (B, heads, N, N).

        Tokens through every block but the last, then the last block's attention probabilities on norm1(x); each
        row sums to one over the keys. Any input size (:meth:`prepare_tokens`).
        """
        x = self.prepare_tokens(x)
        *first, last = self.block_list
        for block in first:
            x = block(x)
        return last.attn.attention_probs(last.norm1(x))  # (B, heads, N, N)

    def get_intermediate_layers(self, x, n=1):
        """DINO's ``get_intermediate_layers``: the outputs of the last ``n`` blocks, each through the final norm,
        prefix (class, register) tokens kept: a list of n arrays (B, prefix + N, D), oldest first."""
        if not 1 <= n <= self.cfg.depth:
            raise ValueError(f"n must be between 1 and depth ({self.cfg.depth}), got {n}")
        x = self.prepare_tokens(x)
        outputs = []
        for i, block in enumerate(self.block_list):
            x = block(x)
            if self.cfg.depth - i <= n:
                outputs.append(self.norm(x))
        return outputs

    def forward_intermediates(self, x, indices=None, norm=False, return_prefix_tokens=False, output_fmt="NCHW"):
        """timm's ``forward_intermediates``: ``(final features, [block outputs])``.

        ``indices``: an int n takes the last n blocks, a list takes those block indices (negative from the end),
        None all. Each block output optionally goes through the final norm, loses its prefix tokens and becomes a
        (B, D, gh, gw) map ('NCHW') or stays (B, N, D) ('NLC'); with ``return_prefix_tokens`` each entry is a pair
        (map, prefix tokens (B, prefix, D)). The final features are norm(x) of the last block, (B, prefix + N, D).
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        depth = self.cfg.depth
        if indices is None:
            take = list(range(depth))
        elif isinstance(indices, int):
            take = list(range(depth - indices, depth)) if 1 <= indices <= depth else []
        elif all(-depth <= i < depth for i in indices):
            take = [i % depth for i in indices]  # -1 is the last block
        else:
            take = []
        if not take:
            raise ValueError(f"indices {indices!r} do not name blocks of a depth-{depth} model: a count from 1 to "
                             f"{depth}, or block indices from {-depth} to {depth - 1}")
        gh, gw = np.asarray(x).shape[-2] // self.patch_size, np.asarray(x).shape[-1] // self.patch_size
        x = self.prepare_tokens(x)
        intermediates = []
        for i, block in enumerate(self.block_list):
            x = block(x)
            if i in take:
                y = self.norm(x) if norm else x
                prefix, patches = y[:, : self.num_prefix_tokens], y[:, self.num_prefix_tokens :]
                if output_fmt == "NCHW":
                    B, _, D = patches.shape
                    patches = patches.reshape(B, gh, gw, D).transpose(0, 3, 1, 2)  # (B, D, gh, gw)
                intermediates.append((patches, prefix) if return_prefix_tokens else patches)
        return self.norm(x), intermediates

    def forward_trace(self, x):
        """Every named intermediate of ``model(x)``, in order: {name: array}, for checking another implementation.

        Names: 'patch_embed' (B, N, D); 'pos_embed' (tokens with prefix and position embedding); 'norm_pre' (with
        ``pre_norm``); per block i 'blocks.{i}.attn' and 'blocks.{i}.mlp' (the residual branches' outputs, before
        LayerScale and the addition) and 'blocks.{i}' (the block output); 'norm' (forward_features); 'pre_logits'
        (pooled, fc_norm / representation layer applied); 'logits' (only with a head). Same steps as
        ``forward_features`` + ``forward_head``.
        """
        x = self.check_input(x)
        trace = {}
        height, width = x.shape[-2:]
        x = trace["patch_embed"] = self.patch_embed(x)  # (B, N, D)
        x = trace["pos_embed"] = self._pos_embed(x, self.pos_embed_for(height, width))  # (B, prefix + N, D)
        if self.cfg.pre_norm:
            x = trace["norm_pre"] = self.norm_pre(x)
        for i, block in enumerate(self.block_list):
            attn = trace[f"blocks.{i}.attn"] = block.attn(block.norm1(x))
            x = x + block.ls1(attn)
            mlp = trace[f"blocks.{i}.mlp"] = block.mlp(block.norm2(x))
            x = trace[f"blocks.{i}"] = x + block.ls2(mlp)
        x = trace["norm"] = self.norm(x)
        trace["pre_logits"] = self.forward_head(x, pre_logits=True)
        if self.num_classes:
            trace["logits"] = self.forward_head(x)
        return trace


def _pair(size):
    return (size, size) if isinstance(size, int) else tuple(size)


def _is_real(value):
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)) and math.isfinite(value)


_SIZES = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
    "large": dict(embed_dim=1024, depth=24, num_heads=16),
}
_DEIT = data_cfg(mean=IMAGENET_MEAN, std=IMAGENET_STD)

# DINOv2 (default tag lvd142m: no head, 518 px): LayerScale; with registers, 4 register tokens and a position
# embedding of the patches only; the giant's MLP is SwiGLU (hidden int(1536 * 5.33334) = 8192, packed w1 | w2)
_DINOV2 = data_cfg(518, crop_pct=1.0, mean=IMAGENET_MEAN, std=IMAGENET_STD)
_DINOV2_ARGS = dict(img_size=518, patch_size=14, num_classes=0, init_values=1e-5)
_DINOV2_GIANT = dict(embed_dim=1536, depth=40, num_heads=24, mlp_ratio=2.66667 * 2, mlp_layer="swiglu_packed",
                     act="silu")
_REG4 = dict(reg_tokens=4, no_embed_class=True)
# CLIP image towers: norm_pre (patch embedding without bias), LayerNorm eps 1e-5; the default tags of the plain names
# are ImageNet-1k fine-tunes (1000 classes), those of the _quickgelu_ names the CLIP image projection (the head)
_CLIP = dict(pre_norm=True, norm_eps=1e-5)
_QUICKGELU = dict(pre_norm=True, norm_eps=1e-5, act="quick_gelu")
# SigLIP image towers (default tag v2_webli: no head): no class token, attention-pool head (attn_pool)
_SIGLIP = dict(patch_size=16, num_classes=0, class_token=False, global_pool="map", **_SIZES["base"])
_SIGLIP_DATA = data_cfg(crop_pct=0.9)
_SO400M = dict(embed_dim=1152, depth=27, num_heads=16, mlp_ratio=3.7362)
# DeiT III: LayerScale from 1e-6, position embedding of the patches only
_DEIT3 = dict(patch_size=16, no_embed_class=True, init_values=1e-6)
_DEIT3_384 = data_cfg(384, crop_pct=1.0, mean=IMAGENET_MEAN, std=IMAGENET_STD)

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
    "vit_small_patch14_dinov2": (dict(**_DINOV2_ARGS, **_SIZES["small"]), _DINOV2),
    "vit_base_patch14_dinov2": (dict(**_DINOV2_ARGS, **_SIZES["base"]), _DINOV2),
    "vit_large_patch14_dinov2": (dict(**_DINOV2_ARGS, **_SIZES["large"]), _DINOV2),
    "vit_giant_patch14_dinov2": (dict(**_DINOV2_ARGS, **_DINOV2_GIANT), _DINOV2),
    "vit_small_patch14_reg4_dinov2": (dict(**_DINOV2_ARGS, **_REG4, **_SIZES["small"]), _DINOV2),
    "vit_base_patch14_reg4_dinov2": (dict(**_DINOV2_ARGS, **_REG4, **_SIZES["base"]), _DINOV2),
    "vit_large_patch14_reg4_dinov2": (dict(**_DINOV2_ARGS, **_REG4, **_SIZES["large"]), _DINOV2),
    "vit_giant_patch14_reg4_dinov2": (dict(**_DINOV2_ARGS, **_REG4, **_DINOV2_GIANT), _DINOV2),
    "vit_base_patch16_clip_224": (
        dict(patch_size=16, **_CLIP, **_SIZES["base"]), data_cfg(crop_pct=0.95, mean=CLIP_MEAN, std=CLIP_STD)
    ),
    "vit_base_patch32_clip_224": (
        dict(patch_size=32, **_CLIP, **_SIZES["base"]), data_cfg(crop_pct=0.9, mean=CLIP_MEAN, std=CLIP_STD)
    ),
    "vit_large_patch14_clip_224": (dict(patch_size=14, **_CLIP, **_SIZES["large"]), data_cfg(crop_pct=1.0)),
    "vit_base_patch16_clip_quickgelu_224": (  # default tag metaclip_2pt5b
        dict(patch_size=16, num_classes=512, **_QUICKGELU, **_SIZES["base"]),
        data_cfg(crop_pct=1.0, mean=CLIP_MEAN, std=CLIP_STD),
    ),
    "vit_base_patch32_clip_quickgelu_224": (  # default tag laion400m_e32
        dict(patch_size=32, num_classes=512, **_QUICKGELU, **_SIZES["base"]),
        data_cfg(crop_pct=0.9, mean=CLIP_MEAN, std=CLIP_STD),
    ),
    "vit_large_patch14_clip_quickgelu_224": (  # default tag dfn2b
        dict(patch_size=14, num_classes=768, **_QUICKGELU, **_SIZES["large"]),
        data_cfg(crop_pct=1.0, mean=CLIP_MEAN, std=CLIP_STD),
    ),
    "vit_base_patch16_siglip_224": (dict(img_size=224, **_SIGLIP), _SIGLIP_DATA),
    "vit_base_patch16_siglip_256": (dict(img_size=256, **_SIGLIP), data_cfg(256, crop_pct=0.9)),
    "vit_base_patch16_siglip_384": (dict(img_size=384, **_SIGLIP), data_cfg(384, crop_pct=0.9)),
    "vit_so400m_patch14_siglip_224": (dict(_SIGLIP, patch_size=14, **_SO400M), _SIGLIP_DATA),
    "deit3_small_patch16_224": (dict(**_DEIT3, **_SIZES["small"]), _DEIT),
    "deit3_base_patch16_224": (dict(**_DEIT3, **_SIZES["base"]), _DEIT),
    "deit3_large_patch16_224": (dict(**_DEIT3, **_SIZES["large"]), _DEIT),
    "deit3_small_patch16_384": (dict(img_size=384, **_DEIT3, **_SIZES["small"]), _DEIT3_384),
    "deit3_base_patch16_384": (dict(img_size=384, **_DEIT3, **_SIZES["base"]), _DEIT3_384),
    "deit3_large_patch16_384": (dict(img_size=384, **_DEIT3, **_SIZES["large"]), _DEIT3_384),
    # The demo model: a timm VisionTransformer config for 32x32 grey digits, trained by vitnp/demo/train_digits.py.
    "vit_digits_patch4_32": (
        dict(img_size=32, patch_size=4, in_chans=1, num_classes=10, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0),
        data_cfg(32, crop_pct=1.0, mean=(0.5,), std=(0.5,), interpolation="bilinear", in_chans=1),
    ),
}

# DINO backbones (facebookresearch/dino hubconf names, seed 001; not timm names): timm's ViT without a head, DINO's
# +0.1 bicubic position-embedding resampler; preprocessing of timm's '.dino' tags
DINO_MODELS = {
    "dino_vit_tiny": (dict(patch_size=16, num_classes=0, pos_embed_resample="dino", **_SIZES["tiny"]), _DEIT),
    "dino_vits16": (dict(patch_size=16, num_classes=0, pos_embed_resample="dino", **_SIZES["small"]), _DEIT),
    "dino_vits8": (dict(patch_size=8, num_classes=0, pos_embed_resample="dino", **_SIZES["small"]), _DEIT),
    "dino_vitb16": (dict(patch_size=16, num_classes=0, pos_embed_resample="dino", **_SIZES["base"]), _DEIT),
    "dino_vitb8": (dict(patch_size=8, num_classes=0, pos_embed_resample="dino", **_SIZES["base"]), _DEIT),
}
