"""MobileViT family layouts (vitnp.mobilevit.MobileViT): timm, Hugging Face MobileViTForImageClassification."""

from .core import HF_CONFIG_READERS, SIGNATURES, fuse_qkv, hf_field, Layout, LayoutError, register, rename, strip_prefix

_MOBILEVIT = "MobileViT"


def _mobilevit_config(state_dict):
    """Head size fixed by timm-named MobileViT weights."""
    return {"num_classes": int(state_dict["head.fc.weight"].shape[0]) if "head.fc.weight" in state_dict else 0}


def _mobilevit_signature(state_dict):
    """Channel widths, transformer widths / depths and MV2 expansion, from timm-named MobileViT weights."""
    if "stem.conv.weight" not in state_dict or "final_conv.conv.weight" not in state_dict:
        return {}
    stage_chs, dims, depths = [], [], []
    for s in range(5):
        last = max(int(k.split(".")[2]) for k in state_dict if k.startswith(f"stages.{s}."))
        block = f"stages.{s}.{last}."
        if block + "conv_1x1.weight" in state_dict:
            stage_chs.append(int(state_dict[block + "conv_fusion.conv.weight"].shape[0]))
            dims.append(int(state_dict[block + "conv_1x1.weight"].shape[0]))
            depths.append(len({k.split(".")[4] for k in state_dict if k.startswith(block + "transformer.")}))
        else:
            stage_chs.append(int(state_dict[block + "conv3_1x1.conv.weight"].shape[0]))
    stem = state_dict["stem.conv.weight"]
    expand = state_dict["stages.1.0.conv1_1x1.conv.weight"]
    return dict(
        in_chans=int(stem.shape[1]),
        stem_chs=int(stem.shape[0]),
        stage_chs=tuple(stage_chs),
        transformer_dims=tuple(dims),
        transformer_depths=tuple(depths),
        bottle_ratio=int(expand.shape[0]) / int(expand.shape[1]),
        num_features=int(state_dict["final_conv.conv.weight"].shape[0]),
    )


def _mobilevit_hf_config(hf):
    """What a Hugging Face MobileViT config.json may set beyond the registry name's (fixed) architecture."""
    if hf.get("hidden_act", "silu") != "silu":
        raise LayoutError(f"config.json hidden_act {hf['hidden_act']!r:.40}: vitnp's MobileViT uses silu")
    size = hf_field(hf, "image_size", 256)
    return dict(in_chans=hf_field(hf, "num_channels", 3), img_size=(size, size))


SIGNATURES[_MOBILEVIT] = _mobilevit_signature
HF_CONFIG_READERS[_MOBILEVIT] = _mobilevit_hf_config


# Hugging Face's prefixes (MobileViT v1 and v2 alike): stage s, and layer j of the transformer of its MobileViT block
HF_LAYER = r"encoder\.layer\.(\d+)\."
HF_TRANSFORMER = HF_LAYER + r"transformer\.layer\.(\d+)\."
_HF_MV2 = {"expand_1x1": "conv1_1x1", "conv_3x3": "conv2_kxk", "reduce_1x1": "conv3_1x1"}

# The renames both MobileViT versions' Hugging Face layouts share: stem, MV2 blocks, a MobileViT block's local convs,
# final norm and projection, the classifier
HF_SHARED_RULES = [
    (r"conv_stem\.(.+)", r"stem.\1"),
    (HF_LAYER + r"layer\.(\d+)\.(expand_1x1|conv_3x3|reduce_1x1)\.(.+)",
     lambda m: f"stages.{m[1]}.{m[2]}.{_HF_MV2[m[3]]}.{m[4]}"),
    (HF_LAYER + r"downsampling_layer\.(expand_1x1|conv_3x3|reduce_1x1)\.(.+)",
     lambda m: f"stages.{m[1]}.0.{_HF_MV2[m[2]]}.{m[3]}"),
    (HF_LAYER + r"conv_kxk\.(.+)", r"stages.\1.1.conv_kxk.\2"),
    (HF_LAYER + r"conv_1x1\.convolution\.weight", r"stages.\1.1.conv_1x1.weight"),
    (HF_LAYER + r"layernorm\.(weight|bias)", r"stages.\1.1.norm.\2"),
    (HF_LAYER + r"conv_projection\.(.+)", r"stages.\1.1.conv_proj.\2"),
    (r"classifier\.(weight|bias)", r"head.fc.\1"),
]


def hf_conv_names(state_dict):
    """Hugging Face's ``convolution`` / ``normalization`` of a conv layer as timm's ``conv`` / ``bn``."""
    return rename(state_dict, [
        (r"(.+)\.convolution\.weight", r"\1.conv.weight"),
        (r"(.+)\.normalization\.(.+)", r"\1.bn.\2"),
    ])


def _hf_mobilevit(state_dict):
    """Hugging Face MobileViTForImageClassification / MobileViTModel (5.x names are the Hub names).

    ``encoder.layer.{s}.layer.{b}`` are the MV2 blocks of stages 0-1, ``downsampling_layer`` the first (MV2) block of
    stages 2-4 and the rest of ``encoder.layer.{s}`` its MobileViT block; ``convolution`` / ``normalization`` are
    timm's ``conv`` / ``bn``; query / key / value are fused into qkv.
    """
    state_dict = strip_prefix(state_dict, ("mobilevit.",))
    layer, transformer = HF_LAYER, HF_TRANSFORMER
    state_dict = rename(state_dict, [
        *HF_SHARED_RULES,
        (transformer + r"layernorm_before\.(weight|bias)", r"stages.\1.1.transformer.\2.norm1.\3"),
        (transformer + r"layernorm_after\.(weight|bias)", r"stages.\1.1.transformer.\2.norm2.\3"),
        (transformer + r"attention\.attention\.(q)uery\.(weight|bias)", r"stages.\1.1.transformer.\2.attn.\3.\4"),
        (transformer + r"attention\.attention\.(k)ey\.(weight|bias)", r"stages.\1.1.transformer.\2.attn.\3.\4"),
        (transformer + r"attention\.attention\.(v)alue\.(weight|bias)", r"stages.\1.1.transformer.\2.attn.\3.\4"),
        (transformer + r"attention\.output\.dense\.(weight|bias)", r"stages.\1.1.transformer.\2.attn.proj.\3"),
        (transformer + r"intermediate\.dense\.(weight|bias)", r"stages.\1.1.transformer.\2.mlp.fc1.\3"),
        (transformer + r"output\.dense\.(weight|bias)", r"stages.\1.1.transformer.\2.mlp.fc2.\3"),
        (layer + r"fusion\.(.+)", r"stages.\1.1.conv_fusion.\2"),
        (r"conv_1x1_exp\.(.+)", r"final_conv.\1"),
    ])
    return fuse_qkv(hf_conv_names(state_dict))


register(Layout(
    name="timm-mobilevit",
    description="timm MobileViT (mobilevit_xxs / xs / s)",
    family=_MOBILEVIT,
    sentinels=(("stem.conv.weight", "stages.2.1.transformer.0.attn.qkv.weight"),),
    convert=dict,
    config=_mobilevit_config,
))

register(Layout(
    name="hf-mobilevit",
    description="Hugging Face MobileViTForImageClassification / MobileViTModel",
    family=_MOBILEVIT,
    sentinels=(("mobilevit.conv_stem.convolution.weight",),  # MobileViTModel: v1's attention, not v2's qkv_proj
               ("conv_stem.convolution.weight",
                "encoder.layer.2.transformer.layer.0.attention.attention.query.weight")),
    convert=_hf_mobilevit,
    config=_mobilevit_config,
))
