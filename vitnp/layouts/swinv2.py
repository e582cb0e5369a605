"""Swin V2 family layouts (vitnp.swinv2.SwinTransformerV2): timm, original microsoft/Swin-Transformer V2, Hugging
Face Swinv2."""

from .core import (
    CLASSIFIER_KEYS,
    HF_CONFIG_READERS,
    SIGNATURES,
    fuse_qkv,
    head_config,
    hf_field,
    Layout,
    LayoutError,
    num_blocks,
    register,
    rename,
    strip_prefix,
)
from .swin import _SWIN_BUFFERS, _merging_to_next_stage, HF_BLOCK, HF_SWIN_SHARED_RULES, HF_TO_BLOCK

_SWINV2 = "SwinTransformerV2"


def _swinv2_signature(state_dict):
    """embed_dim, patch size, depths, and heads per stage (the output width of each stage's cpb_mlp); the window size
    is not in the weights (the position bias MLP takes any)."""
    if "patch_embed.proj.weight" not in state_dict:
        return {}
    proj = state_dict["patch_embed.proj.weight"]
    stages = sorted({int(k.split(".")[1]) for k in state_dict if k.startswith("layers.") and ".blocks." in k})
    return dict(embed_dim=int(proj.shape[0]), in_chans=int(proj.shape[1]), patch_size=int(proj.shape[-1]),
                depths=tuple(num_blocks(state_dict, f"layers.{s}.blocks.") for s in stages),
                num_heads=tuple(int(state_dict[f"layers.{s}.blocks.0.attn.cpb_mlp.2.weight"].shape[0])
                                for s in stages))


# recomputed by vitnp, never loaded: v1's index and masks, and v2's log-spaced coordinates table
_SWINV2_BUFFERS = _SWIN_BUFFERS + (r".*\.relative_coords_table",)


def _hf_swinv2_config(hf):
    """timm SwinTransformerV2 arguments from a Hugging Face Swinv2 config.json (HF's defaults where a field is absent).

    Refused, with the reason: absolute position embeddings, an activation other than GELU, a ``layer_norm_eps`` other
    than 1e-5 (transformers uses it in the blocks and the final norm but LayerNorm's default 1e-5 in the patch
    embedding and the mergings; vitnp has one eps), and stage maps that are not whole windows (transformers pads a
    map before the cyclic shift, timm and vitnp after: the shifted blocks would differ).
    """
    if hf.get("use_absolute_embeddings"):
        raise LayoutError("config.json sets use_absolute_embeddings: Swin V2 with absolute position embeddings is "
                          "not supported")
    if hf.get("hidden_act", "gelu") != "gelu":
        raise LayoutError(f"config.json hidden_act {hf['hidden_act']!r:.40}: vitnp's Swin V2 has GELU only")
    eps = hf_field(hf, "layer_norm_eps", 1e-5, float)
    if eps != 1e-5:
        raise LayoutError(f"config.json layer_norm_eps {eps}: transformers' Swinv2 keeps 1e-5 in its embedding and "
                          "merging norms, vitnp has one eps for all; only 1e-5 is supported")
    image_size = hf_field(hf, "image_size", 224, tuple if isinstance(hf.get("image_size"), list) else int)
    depths = hf_field(hf, "depths", [2, 2, 6, 2], tuple)
    window = hf_field(hf, "window_size", 7)
    patch = hf_field(hf, "patch_size", 4)
    pretrained = hf.get("pretrained_window_sizes", [0] * len(depths))
    if not (isinstance(pretrained, list) and len(pretrained) == len(depths)
            and all(isinstance(w, int) and not isinstance(w, bool) and w >= 0 for w in pretrained)):
        raise LayoutError(f"config.json field 'pretrained_window_sizes' must be a list of one integer >= 0 per stage "
                          f"({len(depths)}), got {pretrained!r:.40}")
    grid = [size // patch for size in (image_size if isinstance(image_size, tuple) else (image_size, image_size))]
    for stage in range(len(depths)):
        maps = [g / 2**stage for g in grid]
        if any(m != int(m) or (m > window and m % window) for m in maps):
            raise LayoutError(f"config.json image_size {image_size} with patch_size {patch} gives stage {stage} a map "
                              f"of {maps[0]:g}x{maps[1]:g}, not whole windows of {window}: transformers pads before "
                              "the cyclic shift and timm after, and vitnp computes timm's; use an image size that "
                              "halves to whole windows")
    return dict(
        img_size=image_size,
        patch_size=patch,
        in_chans=hf_field(hf, "num_channels", 3),
        embed_dim=hf_field(hf, "embed_dim", 96),
        depths=depths,
        num_heads=hf_field(hf, "num_heads", [3, 6, 12, 24], tuple),
        window_size=window,
        mlp_ratio=hf_field(hf, "mlp_ratio", 4.0, float),
        qkv_bias=hf_field(hf, "qkv_bias", True, bool),
        pretrained_window_sizes=tuple(pretrained),
        norm_eps=eps,
    )


SIGNATURES[_SWINV2] = _swinv2_signature
HF_CONFIG_READERS[_SWINV2] = _hf_swinv2_config
CLASSIFIER_KEYS[_SWINV2] = ("head.fc.weight", "head.fc.bias")


def _original_swinv2(state_dict):
    """microsoft/Swin-Transformer V2 (``models/swin_transformer_v2.py``): timm's names, but PatchMerging at the end of
    stages 0..S-2 (timm: the start of stages 1..S-1), ``head`` for ``head.fc``, and its buffers saved (dropped)."""
    return rename(state_dict, [
        (r"layers\.(\d+)\.downsample\.(.+)", _merging_to_next_stage),
        (r"head\.(weight|bias)", r"head.fc.\1"),
    ], drop=_SWINV2_BUFFERS)


def _hf_swinv2(state_dict):
    """Hugging Face Swinv2Model / Swinv2ForImageClassification: separate query / key / value Linears (the key without
    a bias) fused into qkv, whose bias is timm's q_bias / v_bias; merging at the end of a stage."""
    state_dict = strip_prefix(state_dict, ("swinv2.",))
    block, to = HF_BLOCK, HF_TO_BLOCK
    state_dict = rename(state_dict, [
        (block + r"attention\.self\.(q)uery\.weight", to + r"attn.\3.weight"),
        (block + r"attention\.self\.(k)ey\.weight", to + r"attn.\3.weight"),
        (block + r"attention\.self\.(v)alue\.weight", to + r"attn.\3.weight"),
        (block + r"attention\.self\.(q)uery\.bias", to + r"attn.\3_bias"),
        (block + r"attention\.self\.(v)alue\.bias", to + r"attn.\3_bias"),
        (block + r"attention\.self\.logit_scale", to + "attn.logit_scale"),
        (block + r"attention\.self\.continuous_position_bias_mlp\.(\d)\.(weight|bias)", to + r"attn.cpb_mlp.\3.\4"),
        *HF_SWIN_SHARED_RULES,
    ], drop=_SWINV2_BUFFERS)
    return fuse_qkv(state_dict)


register(Layout(
    name="hf-swinv2",
    description="Hugging Face Swinv2Model / Swinv2ForImageClassification",
    family=_SWINV2,
    sentinels=tuple((f"{prefix}encoder.layers.0.blocks.0.attention.self.continuous_position_bias_mlp.0.weight",)
                    for prefix in ("swinv2.", "")),
    convert=_hf_swinv2,
    config=head_config("head.fc.weight"),
), before="hf-swin")  # a Swinv2Model's query / key / value keys are the ones hf-swin looks for

register(Layout(  # before timm-swinv2, whose sentinels it also holds
    name="original-swinv2",
    description="original microsoft/Swin-Transformer V2 checkpoint",
    family=_SWINV2,
    sentinels=(("layers.0.blocks.0.attn.cpb_mlp.0.weight", "layers.0.downsample.reduction.weight"),),
    convert=_original_swinv2,
    config=head_config("head.fc.weight"),
))

register(Layout(
    name="timm-swinv2",
    description="timm SwinTransformerV2",
    family=_SWINV2,
    sentinels=(("patch_embed.proj.weight", "layers.0.blocks.0.attn.cpb_mlp.0.weight"),),
    convert=dict,
    config=head_config("head.fc.weight"),
))
