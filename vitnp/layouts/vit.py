"""ViT family layouts (vitnp.vit.VisionTransformer): timm, DINO, torchvision, Hugging Face ViT / DeiT."""

import math

from .core import (
    HF_CONFIG_READERS,
    SIGNATURES,
    fuse_qkv,
    hf_activation,
    hf_field,
    Layout,
    register,
    rename,
    square_img_size,
    strip_prefix,
)

_VIT = "VisionTransformer"


def _vit_config(state_dict):
    """What timm-named ViT weights fix: head size, representation layer, and the parts only some ViTs have
    (registers, norm_pre, LayerScale, qk_norm, MAP head, SwiGLU MLP) when the weights have them."""
    config = {"num_classes": int(state_dict["head.weight"].shape[0]) if "head.weight" in state_dict else 0}
    if "pre_logits.fc.weight" in state_dict:
        config["representation_size"] = int(state_dict["pre_logits.fc.weight"].shape[0])
    parts = _vit_parts(state_dict)
    # Not no_embed_class: a position embedding's length can read both ways (25 = 5 x 5 patches, or a class token and
    # 6 x 4), so the registered name (DeiT III's, DINOv2's) or the layout that knows its source says it.
    del parts["no_embed_class"]
    config.update({key: value for key, value in parts.items() if value not in (0, False, "mlp")})
    if "blocks.0.ls1.gamma" in state_dict:
        config["init_values"] = 1e-5  # LayerScale present; the value is only the init, the weights replace it
    if "attn_pool.latent" in state_dict:
        config["global_pool"] = "map"
    return config


def _vit_parts(state_dict):
    """The ViT parts timm-named weights show: reg_tokens, no_embed_class, pre_norm, qk_norm, mlp_layer."""
    parts = dict(
        reg_tokens=int(state_dict["reg_token"].shape[1]) if "reg_token" in state_dict else 0,
        no_embed_class=_no_embed_class(state_dict),
        pre_norm="norm_pre.weight" in state_dict,
        qk_norm="blocks.0.attn.q_norm.weight" in state_dict,
        mlp_layer="mlp",
    )
    fc1, fc2 = state_dict.get("blocks.0.mlp.fc1.weight"), state_dict.get("blocks.0.mlp.fc2.weight")
    if fc1 is not None and fc2 is not None and fc1.shape[0] == 2 * fc2.shape[1]:
        parts["mlp_layer"] = "swiglu_packed"  # fc1 gives gate | value, fc2 reads half of it (timm SwiGLUPacked)
    return parts


def _sizes_config(state_dict, num_prefix):
    """The sizes weights fix beyond the name's embed_dim and depth, of the tensors present: patch_size, img_size (the
    square grid of ``pos_embed`` less its ``num_prefix`` prefix positions) and mlp_ratio."""
    config = {}
    if "patch_embed.proj.weight" in state_dict:
        config["patch_size"] = int(state_dict["patch_embed.proj.weight"].shape[-1])
        if "pos_embed" in state_dict:
            num_patches = int(state_dict["pos_embed"].shape[1]) - num_prefix
            config["img_size"] = square_img_size(num_patches, config["patch_size"])
    if "blocks.0.mlp.fc1.weight" in state_dict:
        config["mlp_ratio"] = _mlp_ratio(state_dict)
    return config


def _mlp_ratio(state_dict):
    """fc1's width over embed_dim (:func:`_ratio`)."""
    return _ratio(*state_dict["blocks.0.mlp.fc1.weight"].shape)


def _ratio(hidden, dim):
    """hidden / dim as the float whose ``int(dim * ratio)`` gives back ``hidden`` (vitnp and timm size the MLP's
    hidden layer that way: the plain quotient can land one below, 100 / 24 * 24 = 99.99...)."""
    ratio = hidden / dim
    while int(dim * ratio) < hidden:
        ratio = math.nextafter(ratio, math.inf)
    return ratio


def _num_prefix_tokens(state_dict):
    return sum(int(state_dict[key].shape[1]) for key in ("cls_token", "dist_token", "reg_token") if key in state_dict)


def _no_embed_class(state_dict):
    """Whether pos_embed leaves the prefix tokens out (timm ``no_embed_class``): its length is a square grid, and the
    length less the prefix tokens is not (k^2 + 1 is never a square). When both are (3 x 3 patches or 2 x 2 and five
    prefix tokens), register tokens tell: timm's ViTs with registers leave them out. A non-square grid reads as
    timm's default."""
    prefix = _num_prefix_tokens(state_dict)
    if "pos_embed" not in state_dict or not prefix:
        return False
    length = int(state_dict["pos_embed"].shape[1])
    if _is_square(length) and _is_square(length - prefix):
        return "reg_token" in state_dict
    return _is_square(length)


def _is_square(n):
    return n > 0 and int(round(n**0.5)) ** 2 == n


def _vit_signature(state_dict):
    """embed_dim, depth, patch size, image size (square grid), mlp_ratio, distilled, class token and the parts of
    :func:`_vit_parts`, from timm-named ViT weights."""
    if "patch_embed.proj.weight" not in state_dict or "pos_embed" not in state_dict:
        return {}
    proj = state_dict["patch_embed.proj.weight"]
    embed_dim, patch = int(proj.shape[0]), int(proj.shape[-1])
    distilled = "dist_token" in state_dict
    parts = _vit_parts(state_dict)
    prefix = 0 if parts["no_embed_class"] else _num_prefix_tokens(state_dict)
    grid = int(round((state_dict["pos_embed"].shape[1] - prefix) ** 0.5))
    sig = dict(embed_dim=embed_dim, in_chans=int(proj.shape[1]), patch_size=patch,
               depth=len({k.split(".")[1] for k in state_dict if k.startswith("blocks.")}),
               img_size=grid * patch, distilled=distilled, class_token="cls_token" in state_dict, **parts)
    if "blocks.0.mlp.fc1.weight" in state_dict:
        sig["mlp_ratio"] = state_dict["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim
    return sig


def _vit_hf_config(hf):
    """timm ViT arguments from a Hugging Face ViT / DeiT config.json (HF's defaults where a field is absent)."""
    hidden = hf_field(hf, "hidden_size", 768)
    return dict(
        img_size=hf_field(hf, "image_size", 224),
        patch_size=hf_field(hf, "patch_size", 16),
        in_chans=hf_field(hf, "num_channels", 3),
        embed_dim=hidden,
        depth=hf_field(hf, "num_hidden_layers", 12),
        num_heads=hf_field(hf, "num_attention_heads", 12),
        mlp_ratio=_ratio(hf_field(hf, "intermediate_size", 4 * hidden), hidden),
        qkv_bias=hf_field(hf, "qkv_bias", True, bool),
        norm_eps=hf_field(hf, "layer_norm_eps", 1e-12, float),
        act=hf_activation(hf.get("hidden_act", "gelu")),
    )


SIGNATURES[_VIT] = _vit_signature
HF_CONFIG_READERS[_VIT] = _vit_hf_config

register(Layout(
    name="timm-vit",
    description="timm VisionTransformer / DeiT (also the DINO and DeiT releases)",
    family=_VIT,
    sentinels=(("patch_embed.proj.weight", "blocks.0.attn.qkv.weight"),),
    convert=dict,
    config=_vit_config,
))


def _torchvision_vit(state_dict):
    """torchvision ``VisionTransformer`` (vit_b_16 ... vit_h_14): renames only; ``in_proj`` is already q | k | v;
    ``heads.pre_logits`` (Linear + Tanh, the representation layer) is ``pre_logits.fc``."""
    block = r"encoder\.layers\.encoder_layer_(\d+)\."
    return rename(state_dict, [
        (r"class_token", "cls_token"),
        (r"conv_proj\.(weight|bias)", r"patch_embed.proj.\1"),
        (r"encoder\.pos_embedding", "pos_embed"),
        (block + r"ln_1\.(weight|bias)", r"blocks.\1.norm1.\2"),
        (block + r"self_attention\.in_proj_(weight|bias)", r"blocks.\1.attn.qkv.\2"),
        (block + r"self_attention\.out_proj\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
        (block + r"ln_2\.(weight|bias)", r"blocks.\1.norm2.\2"),
        (block + r"mlp\.(?:0|linear_1)\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),  # linear_1: torchvision < 0.13
        (block + r"mlp\.(?:3|linear_2)\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
        (r"encoder\.ln\.(weight|bias)", r"norm.\1"),
        (r"heads\.pre_logits\.(weight|bias)", r"pre_logits.fc.\1"),
        (r"heads\.head\.(weight|bias)", r"head.\1"),
    ])


register(Layout(
    name="torchvision-vit",
    description="torchvision VisionTransformer (vit_b_16, vit_b_32, vit_l_16, vit_l_32, vit_h_14)",
    family=_VIT,
    sentinels=(("conv_proj.weight", "encoder.layers.encoder_layer_0.self_attention.in_proj_weight"),),
    convert=_torchvision_vit,
    config=_vit_config,
))


def _hf_vit(state_dict):
    """Hugging Face ViT / DeiT, 5.x ``state_dict`` names and 4.x / Hub (``save_pretrained``) names.

    q, k, v Linears are concatenated into qkv; ``pooler.dense`` (ViTModel: Linear + Tanh on the class token) is the
    representation layer ``pre_logits.fc``; DeiT's ``cls_classifier`` / ``distillation_classifier`` are
    ``head`` / ``head_dist``.
    """
    state_dict = strip_prefix(state_dict, ("vit.", "deit."))
    new = r"layers\.(\d+)\."  # 5.x
    old = r"encoder\.layer\.(\d+)\."  # 4.x, Hub files
    state_dict = rename(state_dict, [
        (r"embeddings\.cls_token", "cls_token"),
        (r"embeddings\.distillation_token", "dist_token"),
        (r"embeddings\.position_embeddings", "pos_embed"),
        (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"patch_embed.proj.\1"),
        (rf"(?:{new}|{old})layernorm_before\.(weight|bias)", r"blocks.\1\2.norm1.\3"),
        (rf"(?:{new}|{old})layernorm_after\.(weight|bias)", r"blocks.\1\2.norm2.\3"),
        (new + r"attention\.(q|k|v)_proj\.(weight|bias)", r"blocks.\1.attn.\2.\3"),
        (old + r"attention\.attention\.(q)uery\.(weight|bias)", r"blocks.\1.attn.\2.\3"),
        (old + r"attention\.attention\.(k)ey\.(weight|bias)", r"blocks.\1.attn.\2.\3"),
        (old + r"attention\.attention\.(v)alue\.(weight|bias)", r"blocks.\1.attn.\2.\3"),
        (rf"(?:{new}attention\.o_proj|{old}attention\.output\.dense)\.(weight|bias)", r"blocks.\1\2.attn.proj.\3"),
        (rf"(?:{new}mlp\.fc1|{old}intermediate\.dense)\.(weight|bias)", r"blocks.\1\2.mlp.fc1.\3"),
        (rf"(?:{new}mlp\.fc2|{old}output\.dense)\.(weight|bias)", r"blocks.\1\2.mlp.fc2.\3"),
        (r"layernorm\.(weight|bias)", r"norm.\1"),
        (r"pooler\.dense\.(weight|bias)", r"pre_logits.fc.\1"),
        (r"(?:classifier|cls_classifier)\.(weight|bias)", r"head.\1"),
        (r"distillation_classifier\.(weight|bias)", r"head_dist.\1"),
    ])
    return fuse_qkv(state_dict)


def _hf_vit_config(state_dict):
    """As for timm names, with Hugging Face ViT's LayerNorm eps (1e-12) unless a config.json says otherwise, and
    its size-based bicubic position-embedding resampler (``interpolate_pos_encoding``)."""
    return {**_vit_config(state_dict), "norm_eps": 1e-12, "pos_embed_resample": "hf"}


register(Layout(
    name="hf-vit",
    description="Hugging Face ViTModel / ViTForImageClassification / DeiT (4.x Hub or 5.x names)",
    family=_VIT,
    sentinels=tuple(
        (f"{prefix}{key}",)
        for prefix in ("vit.", "deit.", "")
        for key in ("layers.0.attention.q_proj.weight", "encoder.layer.0.attention.attention.query.weight")
    ),
    convert=_hf_vit,
    config=_hf_vit_config,
))
