"""DINOv2 layouts (vitnp.vit.VisionTransformer): the facebookresearch/dinov2 torch hub checkpoints and Hugging Face
``Dinov2Model`` / ``Dinov2WithRegistersModel`` folders, with and without registers, MLP or SwiGLU (giant).

DINOv2 adds the register tokens after the position embedding ([cls, registers, patches], the position embedding
covering cls and patches); timm's ``no_embed_class`` ViT computes the same with the class token's position folded
into ``cls_token`` and ``pos_embed`` covering the patches only, which is how these weights are converted (timm's
``_convert_dinov2``). Without registers ``pos_embed`` keeps its class position, as in timm's ``vit_*_dinov2``.
"""

import numpy as np

from . import vit  # noqa: F401  (the timm ViT layouts first: these register before them)
from .core import (
    HF_CONFIG_READERS,
    Layout,
    fuse_qkv,
    hf_activation,
    hf_field,
    register,
    rename,
)
from .vit import _sizes_config, _vit_config

_VIT = "VisionTransformer"


def _fold_registers(state_dict):
    """DINOv2 with registers -> timm ``no_embed_class``: ``register_tokens`` is ``reg_token``, the class token takes
    its position embedding (it is added before the registers are inserted, so the sum is all the class token ever
    sees), and ``pos_embed`` keeps the patch positions. Without registers the weights are returned as they are."""
    if "reg_token" not in state_dict:
        return state_dict
    out = dict(state_dict)
    pos_embed = np.asarray(state_dict["pos_embed"])  # (1, 1 + N, D)
    # summed in float64, exactly: a float64 model gets the sum the source computes in float64, a float32 one the
    # rounding float32 addition gives
    out["cls_token"] = np.asarray(state_dict["cls_token"], dtype=np.float64) + pos_embed[:, :1]
    out["pos_embed"] = pos_embed[:, 1:]  # (1, N, D)
    return out


def _dinov2_config(state_dict):
    """What converted DINOv2 weights fix: the timm ViT parts (registers, LayerScale, SwiGLU, ...), no head (the hub
    models' head is an identity), LayerNorm eps 1e-6, SiLU in the SwiGLU MLP (timm's ``vit_giant_patch14_dinov2``),
    the image size of the position embedding's grid, and the position-embedding resampler of the DINOv2 code (the
    hub's models with registers resample by size, antialiased: 'dinov2-reg')."""
    config = _vit_config(state_dict)
    registers = config.get("reg_tokens", 0)
    config.update(
        class_token=True,
        no_embed_class=bool(registers),  # as _fold_registers leaves pos_embed
        norm_eps=1e-6,
        pos_embed_resample="dinov2-reg" if registers else "dinov2",
        **_sizes_config(state_dict, num_prefix=0 if registers else 1),
    )
    if config.get("mlp_layer") == "swiglu_packed":
        config["act"] = "silu"
    return config


# ---- facebookresearch/dinov2 (torch hub) -----------------------------------------------------------------------------


def _dinov2_hub(state_dict):
    """facebookresearch/dinov2 ``DinoVisionTransformer``: timm's names already but for the blocks of a chunked model
    (``blocks.<chunk>.<i>.``: the chunk index goes), SwiGLU's ``w12`` / ``w3`` (timm SwiGLUPacked's ``fc1`` /
    ``fc2``, same gate | value order), ``register_tokens``, and ``mask_token`` (iBOT masking in training only:
    dropped)."""
    state_dict = rename(state_dict, [
        (r"register_tokens", "reg_token"),
        (r"blocks\.\d+\.(\d+)\.(.+)", r"blocks.\1.\2"),
    ], drop=[r"mask_token"])
    state_dict = rename(state_dict, [
        (r"(blocks\.\d+\.mlp)\.w12\.(weight|bias)", r"\1.fc1.\2"),
        (r"(blocks\.\d+\.mlp)\.w3\.(weight|bias)", r"\1.fc2.\2"),
    ])
    return _fold_registers(state_dict)


register(Layout(
    name="dinov2",
    description="facebookresearch/dinov2 torch hub checkpoint (DINOv2, with or without registers)",
    family=_VIT,
    sentinels=(
        ("mask_token", "patch_embed.proj.weight", "blocks.0.norm1.weight"),
        ("mask_token", "patch_embed.proj.weight", "blocks.0.0.norm1.weight"),  # block_chunks > 0
    ),
    convert=_dinov2_hub,
    config=_dinov2_config,
), before="timm-vit")


# ---- Hugging Face Dinov2Model / Dinov2WithRegistersModel -------------------------------------------------------------


def _hf_dinov2(state_dict):
    """Hugging Face Dinov2 / Dinov2WithRegisters, Hub (``save_pretrained``) and 5.x ``state_dict`` names.

    q, k, v Linears are concatenated into qkv; ``layer_scale{1,2}.lambda1`` is LayerScale's ``ls{1,2}.gamma``; the
    SwiGLU MLP's ``weights_in`` (5.x: ``gate_proj`` | ``up_proj``, the halves the 5.x loader cuts it into) is fc1 and
    ``weights_out`` (``down_proj``) fc2; ``layernorm`` is the final ``norm``; ``mask_token`` is dropped.
    """
    layer = r"encoder\.layer\.(\d+)\."
    state_dict = rename(state_dict, [
        (r"embeddings\.cls_token", "cls_token"),
        (r"embeddings\.register_tokens", "reg_token"),
        (r"embeddings\.position_embeddings", "pos_embed"),
        (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"patch_embed.proj.\1"),
        (layer + r"norm(1|2)\.(weight|bias)", r"blocks.\1.norm\2.\3"),
        (layer + r"attention\.attention\.(q)uery\.(weight|bias)", r"blocks.\1.attn.\2.\3"),
        (layer + r"attention\.attention\.(k)ey\.(weight|bias)", r"blocks.\1.attn.\2.\3"),
        (layer + r"attention\.attention\.(v)alue\.(weight|bias)", r"blocks.\1.attn.\2.\3"),
        (layer + r"attention\.(q|k|v)_proj\.(weight|bias)", r"blocks.\1.attn.\2.\3"),
        (layer + r"attention\.(?:output\.dense|o_proj)\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
        (layer + r"layer_scale(1|2)\.lambda1", r"blocks.\1.ls\2.gamma"),
        (layer + r"mlp\.(?:fc1|weights_in)\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
        (layer + r"mlp\.(?:fc2|weights_out|down_proj)\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
        (layer + r"mlp\.(gate|up)_proj\.(weight|bias)", r"blocks.\1.mlp.\2.\3"),
        (r"layernorm\.(weight|bias)", r"norm.\1"),
    ], drop=[r"embeddings\.mask_token"])
    return _fold_registers(_join_gate_up(fuse_qkv(state_dict)))


def _join_gate_up(state_dict):
    """5.x SwiGLU names: ``mlp.gate`` and ``mlp.up`` (the halves of ``weights_in``) concatenated back into fc1, rows
    gate | up: timm SwiGLUPacked's ``silu(first half) * second half``."""
    out = dict(state_dict)
    for key in state_dict:
        if ".mlp.gate." in key:
            up = key.replace(".mlp.gate.", ".mlp.up.")
            if up in state_dict:
                out[key.replace(".mlp.gate.", ".mlp.fc1.")] = np.concatenate([state_dict[key], state_dict[up]])
                del out[key], out[up]
    return out


def _hf_dinov2_config(state_dict):
    """As for the hub checkpoints, with Hugging Face's resamplers for other image sizes: Dinov2's size-based bicubic
    in float32, Dinov2WithRegisters' antialiased one (the hub's models with registers do the same)."""
    config = _dinov2_config(state_dict)
    return {**config, "pos_embed_resample": "dinov2-reg" if config.get("reg_tokens") else "hf-dinov2"}


def _hf_dinov2_arguments(hf):
    """timm ViT arguments from a Hugging Face Dinov2 / Dinov2WithRegisters config.json (HF's defaults where a field
    is absent); the MLP width comes from the weights (Dinov2 sizes it from ``mlp_ratio``, SwiGLU's rounded to 8)."""
    arguments = dict(
        img_size=hf_field(hf, "image_size", 224),
        patch_size=hf_field(hf, "patch_size", 14),
        in_chans=hf_field(hf, "num_channels", 3),
        embed_dim=hf_field(hf, "hidden_size", 768),
        depth=hf_field(hf, "num_hidden_layers", 12),
        num_heads=hf_field(hf, "num_attention_heads", 12),
        qkv_bias=hf_field(hf, "qkv_bias", True, bool),
        norm_eps=hf_field(hf, "layer_norm_eps", 1e-6, float),
    )
    if not hf_field(hf, "use_swiglu_ffn", False, bool):  # SwiGLU's activation is SiLU, whatever hidden_act says
        arguments["act"] = hf_activation(hf.get("hidden_act", "gelu"))
    return arguments


HF_CONFIG_READERS["hf-dinov2"] = _hf_dinov2_arguments

register(Layout(
    name="hf-dinov2",
    description="Hugging Face Dinov2Model / Dinov2WithRegistersModel (Hub or 5.x names)",
    family=_VIT,
    sentinels=(("embeddings.patch_embeddings.projection.weight", "encoder.layer.0.layer_scale1.lambda1"),),
    convert=_hf_dinov2,
    config=_hf_dinov2_config,
), before="hf-vit")
