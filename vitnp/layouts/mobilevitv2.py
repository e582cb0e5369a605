"""MobileViT v2 family layouts (vitnp.mobilevitv2.MobileViTV2): timm, Hugging Face MobileViTV2ForImageClassification
and MobileViTV2Model (the latter's keys, without the ``mobilevitv2.`` prefix, are told from v1's by ``qkv_proj``)."""

from .core import (
    CLASSIFIER_KEYS,
    HF_CONFIG_READERS,
    SIGNATURES,
    Layout,
    LayoutError,
    head_config,
    hf_field,
    num_blocks,
    register,
    rename,
    strip_prefix,
)
from .mobilevit import HF_SHARED_RULES, HF_TRANSFORMER, hf_conv_names

_MOBILEVITV2 = "MobileViTV2"


def _mobilevitv2_signature(state_dict):
    """Stem and stage widths, transformer depths and MV2 expansion, from timm-named MobileViT v2 weights."""
    stage_outputs = [f"stages.{s}.0.conv3_1x1.conv.weight" for s in range(5)]
    if any(key not in state_dict for key in ["stem.conv.weight", "stages.1.0.conv1_1x1.conv.weight", *stage_outputs]):
        return {}
    stem = state_dict["stem.conv.weight"]
    expand = state_dict["stages.1.0.conv1_1x1.conv.weight"]
    return dict(
        in_chans=int(stem.shape[1]),
        stem_chs=int(stem.shape[0]),
        stage_chs=tuple(int(state_dict[key].shape[0]) for key in stage_outputs),
        transformer_depths=tuple(num_blocks(state_dict, f"stages.{s}.1.transformer.") for s in (2, 3, 4)),
        bottle_ratio=int(expand.shape[0]) / int(expand.shape[1]),
    )


def _mobilevitv2_hf_config(hf):
    """What a Hugging Face MobileViTV2 config.json may set beyond the registry name's (fixed) architecture; the
    fields the weights do not show (activation, patch size, output stride) must be timm's."""
    if hf.get("hidden_act", "swish") not in ("swish", "silu"):
        raise LayoutError(f"config.json hidden_act {hf['hidden_act']!r:.40}: vitnp's MobileViT v2 uses silu (swish)")
    for name, value in (("patch_size", 2), ("output_stride", 32)):
        if hf.get(name, value) != value:
            raise LayoutError(f"config.json {name} {hf[name]!r:.40}: vitnp's MobileViT v2 has {value}, as timm's")
    size = hf_field(hf, "image_size", 256)
    return dict(in_chans=hf_field(hf, "num_channels", 3), img_size=(size, size),
                norm_eps=hf_field(hf, "layer_norm_eps", 1e-5, float))


SIGNATURES[_MOBILEVITV2] = _mobilevitv2_signature
HF_CONFIG_READERS[_MOBILEVITV2] = _mobilevitv2_hf_config
CLASSIFIER_KEYS[_MOBILEVITV2] = ("head.fc.weight", "head.fc.bias")


def _hf_mobilevitv2(state_dict):
    """Hugging Face MobileViTV2ForImageClassification / MobileViTV2Model.

    v1's names for the stem, MV2 blocks, local convs, final GroupNorm (``layernorm``), projection and classifier
    (:data:`vitnp.layouts.mobilevit.HF_SHARED_RULES`); in the transformer, ``layernorm_before`` / ``layernorm_after``
    are timm's ``norm1`` / ``norm2``, ``attention.qkv_proj`` / ``out_proj`` keep their names, ``ffn.conv1`` /
    ``conv2`` are ``mlp.fc1`` / ``fc2``; ``convolution`` / ``normalization`` are timm's ``conv`` / ``bn`` (the
    biased 1x1 convs of the transformer have no BatchNorm and take the ``convolution`` name off).
    """
    state_dict = strip_prefix(state_dict, ("mobilevitv2.",))
    transformer = HF_TRANSFORMER
    state_dict = rename(state_dict, [
        *HF_SHARED_RULES,
        (transformer + r"layernorm_before\.(weight|bias)", r"stages.\1.1.transformer.\2.norm1.\3"),
        (transformer + r"layernorm_after\.(weight|bias)", r"stages.\1.1.transformer.\2.norm2.\3"),
        (transformer + r"attention\.(qkv_proj|out_proj)\.convolution\.(weight|bias)",
         r"stages.\1.1.transformer.\2.attn.\3.\4"),
        (transformer + r"ffn\.conv1\.convolution\.(weight|bias)", r"stages.\1.1.transformer.\2.mlp.fc1.\3"),
        (transformer + r"ffn\.conv2\.convolution\.(weight|bias)", r"stages.\1.1.transformer.\2.mlp.fc2.\3"),
    ])
    return hf_conv_names(state_dict)


register(Layout(
    name="timm-mobilevitv2",
    description="timm MobileViT v2 (mobilevitv2_050 ... mobilevitv2_200)",
    family=_MOBILEVITV2,
    sentinels=(("stem.conv.weight", "stages.2.1.transformer.0.attn.qkv_proj.weight"),),
    convert=dict,
    config=head_config("head.fc.weight"),
))

register(Layout(
    name="hf-mobilevitv2",
    description="Hugging Face MobileViTV2ForImageClassification / MobileViTV2Model",
    family=_MOBILEVITV2,
    sentinels=(("mobilevitv2.conv_stem.convolution.weight",),
               ("conv_stem.convolution.weight",
                "encoder.layer.2.transformer.layer.0.attention.qkv_proj.convolution.weight")),
    convert=_hf_mobilevitv2,
    config=head_config("head.fc.weight"),
))
