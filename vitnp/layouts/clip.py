"""CLIP and SigLIP image towers (vitnp.vit.VisionTransformer): the OpenAI CLIP / open_clip ``visual.*`` state dict,
Hugging Face ``CLIPVisionModel`` / ``CLIPVisionModelWithProjection`` / ``CLIPModel`` and ``SiglipVisionModel`` /
``SiglipModel`` folders.

A CLIP image tower is timm's ViT with ``pre_norm`` (``norm_pre`` after the position embedding; the patch embedding
has no bias), LayerNorm eps 1e-5 and the projection to the shared image-text space as a bias-free ``head`` (timm's
``_convert_openai_clip`` gives it a zero bias). SigLIP's is a ViT without class token whose pooling is an attention
pool (timm ``global_pool='map'``: ``attn_pool.*``). Weights of a whole CLIP / SigLIP model keep only the image tower:
the text tower and the logit scale / bias are left out.
"""

import re

import numpy as np

from .core import (
    HF_CONFIG_READERS,
    Layout,
    LayoutError,
    fuse_qkv,
    hf_activation,
    hf_field,
    register,
    rename,
)
from .vit import _sizes_config, _vit_config

_VIT = "VisionTransformer"


def _tower_config(state_dict, eps):
    """What a converted CLIP / SigLIP tower fixes: the timm ViT parts (norm_pre, no class token, MAP head, ...), the
    projection's size as num_classes, the patch size, the image size of the position embedding's grid, the MLP
    width, and the LayerNorm eps of the source code (it is not in the weights)."""
    class_token = "cls_token" in state_dict
    return {**_vit_config(state_dict), "class_token": class_token, "norm_eps": eps,
            **_sizes_config(state_dict, num_prefix=int(class_token))}


def _bias_free_head(state_dict, weight):
    """``head.weight`` = ``weight`` (out, D) with the zero ``head.bias`` timm gives a bias-free projection."""
    weight = np.asarray(weight)
    return {**state_dict, "head.weight": weight, "head.bias": np.zeros(weight.shape[0], dtype=weight.dtype)}


def _reshaped(tower, key, new_key, shape):
    """``tower`` with ``key`` renamed ``new_key`` and reshaped to ``shape`` (None: a leading axis of 1 added), when the
    key is there (else the strict load reports the missing ``new_key``)."""
    if key not in tower:
        return tower
    tower = dict(tower)
    value = np.asarray(tower.pop(key))
    tower[new_key] = value[None] if shape is None else value.reshape(shape)
    return tower


def _image_tower(state_dict, prefix, text_keys):
    """The keys under ``prefix`` without it, plus the keys outside it that are not the text tower's (to be renamed or
    reported); the text tower is ``text_keys`` (regexes matching the start of a key)."""
    text = re.compile("|".join(text_keys))
    return {key.removeprefix(prefix): value
            for key, value in state_dict.items() if key.startswith(prefix) or not text.match(key)}


# ---- OpenAI CLIP / open_clip -----------------------------------------------------------------------------------------


def _openai_clip(state_dict):
    """OpenAI CLIP ``VisionTransformer`` (and open_clip's, which keeps its names), under ``visual.`` in a whole CLIP
    model's state_dict or on its own (``model.visual.state_dict()``).

    ``conv1`` is the patch embedding, ``class_embedding`` (D,) the class token, ``positional_embedding`` (1 + N, D)
    ``pos_embed``, ``ln_pre`` / ``ln_post`` ``norm_pre`` / ``norm``; in a block ``ln_1`` / ``ln_2`` are norm1 / norm2,
    ``attn.in_proj_*`` (nn.MultiheadAttention, rows q | k | v) is ``attn.qkv``, ``mlp.c_fc`` / ``mlp.c_proj`` fc1 /
    fc2, open_clip's LayerScale ``ls_1`` / ``ls_2`` ``ls1`` / ``ls2`` and its qk_norm ``attn.ln_q`` / ``ln_k``
    (LayerNorm(head_dim) on q and k before the scale, as timm's) ``attn.q_norm`` / ``k_norm``; ``proj`` (D, out),
    applied as ``x @ proj``, is ``head.weight`` = proj^T with a zero bias. A whole model's text tower
    (``transformer.*``, ``token_embedding``, ``ln_final``, ``text_projection``, ...) is left out.
    """
    tower = state_dict
    if any(key.startswith("visual.") for key in state_dict):  # a whole model's state_dict; else ``visual``'s own
        tower = {key[len("visual."):]: value for key, value in state_dict.items() if key.startswith("visual.")}
    block = r"transformer\.resblocks\.(\d+)\."
    tower = rename(tower, [
        (r"conv1\.weight", "patch_embed.proj.weight"),
        (r"ln_pre\.(weight|bias)", r"norm_pre.\1"),
        (r"ln_post\.(weight|bias)", r"norm.\1"),
        (block + r"ln_(1|2)\.(weight|bias)", r"blocks.\1.norm\2.\3"),
        (block + r"attn\.in_proj_(weight|bias)", r"blocks.\1.attn.qkv.\2"),
        (block + r"attn\.out_proj\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
        (block + r"mlp\.c_fc\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
        (block + r"mlp\.c_proj\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
        (block + r"ls_(1|2)\.gamma", r"blocks.\1.ls\2.gamma"),
        (block + r"attn\.ln_(q|k)\.(weight|bias)", r"blocks.\1.attn.\2_norm.\3"),
    ])
    tower = _reshaped(tower, "class_embedding", "cls_token", (1, 1, -1))  # (D,) -> (1, 1, D)
    tower = _reshaped(tower, "positional_embedding", "pos_embed", None)  # (1 + N, D) -> (1, 1 + N, D)
    if "proj" in tower:
        tower = _bias_free_head(tower, np.asarray(tower.pop("proj")).T)  # (out, D)
    return tower


register(Layout(
    name="openai-clip",
    description="OpenAI CLIP / open_clip ViT image tower (visual.*; the activation is the model name's: OpenAI's "
                "weights use QuickGELU, the *_quickgelu_* names)",
    family=_VIT,
    sentinels=tuple((f"{prefix}class_embedding", f"{prefix}conv1.weight",
                     f"{prefix}transformer.resblocks.0.attn.in_proj_weight") for prefix in ("visual.", "")),
    convert=_openai_clip,
    config=lambda state_dict: _tower_config(state_dict, eps=1e-5),
))


# ---- Hugging Face CLIP -----------------------------------------------------------------------------------------------

_HF_TEXT = (r"text_model\.", r"text_projection\.", r"logit_scale$", r"logit_bias$")
_HF_LAYER = r"encoder\.layers\.(\d+)\."
_HF_ENCODER_RULES = [
    (_HF_LAYER + r"layer_norm(1|2)\.(weight|bias)", r"blocks.\1.norm\2.\3"),
    (_HF_LAYER + r"self_attn\.(q|k|v)_proj\.(weight|bias)", r"blocks.\1.attn.\2.\3"),
    (_HF_LAYER + r"self_attn\.out_proj\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (_HF_LAYER + r"mlp\.fc(1|2)\.(weight|bias)", r"blocks.\1.mlp.fc\2.\3"),
    (r"post_layernorm\.(weight|bias)", r"norm.\1"),
]


def _hf_clip(state_dict):
    """Hugging Face CLIP vision tower (``vision_model.`` prefix or none): ``class_embedding`` (D,) is the class
    token, ``position_embedding.weight`` (1 + N, D) ``pos_embed``, ``pre_layrnorm`` (sic) ``norm_pre``,
    ``post_layernorm`` ``norm`` (HF applies it to the class token only, timm to every token: the pooled vector is
    the same); q, k, v are concatenated into qkv; ``visual_projection`` (no bias) is ``head`` with a zero bias.
    A ``CLIPModel``'s text tower is left out; the ``position_ids`` buffer of older files is dropped."""
    tower = _image_tower(state_dict, "vision_model.", _HF_TEXT)
    tower = rename(tower, [
        (r"embeddings\.patch_embedding\.weight", "patch_embed.proj.weight"),
        (r"pre_layrnorm\.(weight|bias)", r"norm_pre.\1"),
        *_HF_ENCODER_RULES,
    ], drop=[r"embeddings\.position_ids"])
    tower = fuse_qkv(tower)
    tower = _reshaped(tower, "embeddings.class_embedding", "cls_token", (1, 1, -1))  # (D,) -> (1, 1, D)
    tower = _reshaped(tower, "embeddings.position_embedding.weight", "pos_embed", None)  # -> (1, 1 + N, D)
    if "visual_projection.weight" in tower:
        tower = _bias_free_head(tower, tower.pop("visual_projection.weight"))
    return tower


def _hf_tower_arguments(hf, patch_size, act, eps):
    """timm ViT arguments from a Hugging Face CLIP / SigLIP vision config.json (a whole model's ``vision_config``),
    HF's defaults where a field is absent; the MLP width and the projection's size come from the weights. (At other
    image sizes both resample the position embedding as HF ViT does, ``interpolate_pos_encoding=True``: 'hf'.)"""
    vision = hf.get("vision_config", hf)
    if not isinstance(vision, dict):
        raise LayoutError(f"config.json field 'vision_config' must be an object, got {vision!r:.40}")
    return dict(
        img_size=hf_field(vision, "image_size", 224),
        patch_size=hf_field(vision, "patch_size", patch_size),
        in_chans=hf_field(vision, "num_channels", 3),
        embed_dim=hf_field(vision, "hidden_size", 768),
        depth=hf_field(vision, "num_hidden_layers", 12),
        num_heads=hf_field(vision, "num_attention_heads", 12),
        norm_eps=hf_field(vision, "layer_norm_eps", eps, float),
        act=hf_activation(vision.get("hidden_act", act)),
    )


def _register_hf_tower(name, description, sentinels, convert, patch_size, act, eps):
    """Register a Hugging Face image-tower layout and its config.json reader; ``patch_size``, ``act`` (config.json's
    ``hidden_act`` name) and ``eps`` are HF's defaults, for a config.json without them and for weights alone."""
    HF_CONFIG_READERS[name] = lambda hf: _hf_tower_arguments(hf, patch_size, act, eps)
    register(Layout(
        name=name,
        description=description,
        family=_VIT,
        sentinels=tuple(tuple(prefix + key for key in sentinels) for prefix in ("vision_model.", "")),
        convert=convert,
        config=lambda state_dict: {**_tower_config(state_dict, eps), "pos_embed_resample": "hf"},
    ))


_register_hf_tower(
    "hf-clip", "Hugging Face CLIPVisionModel / CLIPVisionModelWithProjection / CLIPModel (image tower)",
    sentinels=("embeddings.class_embedding", "pre_layrnorm.weight"),
    convert=_hf_clip, patch_size=32, act="quick_gelu", eps=1e-5,
)


# ---- Hugging Face SigLIP ---------------------------------------------------------------------------------------------


def _hf_siglip(state_dict):
    """Hugging Face SigLIP vision tower (``vision_model.`` prefix or none): no class token; ``position_embedding``
    (N, D) is ``pos_embed``; the attention-pool head is timm's ``attn_pool``: ``probe`` the latent query,
    ``attention.in_proj_*`` (rows q | k | v) split into ``q`` and ``kv`` (rows k | v), ``out_proj`` ``proj``,
    ``layernorm`` ``norm``, ``mlp`` ``mlp``. A ``SiglipModel``'s text tower is left out."""
    tower = _image_tower(state_dict, "vision_model.", _HF_TEXT)
    tower = rename(tower, [
        (r"embeddings\.patch_embedding\.(weight|bias)", r"patch_embed.proj.\1"),
        *_HF_ENCODER_RULES,
        (r"head\.probe", "attn_pool.latent"),
        (r"head\.attention\.out_proj\.(weight|bias)", r"attn_pool.proj.\1"),
        (r"head\.layernorm\.(weight|bias)", r"attn_pool.norm.\1"),
        (r"head\.mlp\.fc(1|2)\.(weight|bias)", r"attn_pool.mlp.fc\1.\2"),
    ], drop=[r"embeddings\.position_ids"])
    tower = fuse_qkv(tower)
    tower = _reshaped(tower, "embeddings.position_embedding.weight", "pos_embed", None)  # -> (1, N, D)
    for param in ("weight", "bias"):
        in_proj = tower.pop(f"head.attention.in_proj_{param}", None)
        if in_proj is not None:
            in_proj = np.asarray(in_proj)
            dim = in_proj.shape[0] // 3
            tower[f"attn_pool.q.{param}"] = in_proj[:dim]
            tower[f"attn_pool.kv.{param}"] = in_proj[dim:]
    return tower


_register_hf_tower(
    "hf-siglip", "Hugging Face SiglipVisionModel / SiglipModel (image tower, attention-pool head)",
    sentinels=("embeddings.patch_embedding.bias", "post_layernorm.weight"),  # CLIP's patch embedding has no bias
    convert=_hf_siglip, patch_size=16, act="gelu_pytorch_tanh", eps=1e-6,
)
