"""Swin family layouts (vitnp.swin.SwinTransformer): timm, seed 004, original microsoft Swin, torchvision, Hugging
Face Swin."""

from .core import HF_CONFIG_READERS, SIGNATURES, fuse_qkv, hf_field, Layout, LayoutError, register, rename, strip_prefix

_SWIN = "SwinTransformer"
_SWIN_BUFFERS = (r".*\.relative_position_index", r".*\.attn_mask")  # recomputed by vitnp, never loaded


def _swin_config(state_dict):
    """Head size, and whether PatchMerging's reduction has a bias (seed 004's has, timm's has not)."""
    config = {"num_classes": int(state_dict["head.fc.weight"].shape[0]) if "head.fc.weight" in state_dict else 0}
    if any(k.endswith(".downsample.reduction.bias") for k in state_dict):
        config["downsample_bias"] = True
    return config


def _swin_signature(state_dict):
    """embed_dim, patch size, depths, heads and window per stage (from the bias tables)."""
    if "patch_embed.proj.weight" not in state_dict:
        return {}
    proj = state_dict["patch_embed.proj.weight"]
    stages = sorted({int(k.split(".")[1]) for k in state_dict if k.startswith("layers.") and ".blocks." in k})
    depths, heads, windows = [], [], []
    for s in stages:
        depths.append(len({k.split(".")[3] for k in state_dict if k.startswith(f"layers.{s}.blocks.")}))
        table = state_dict[f"layers.{s}.blocks.0.attn.relative_position_bias_table"]
        heads.append(int(table.shape[1]))
        windows.append((int(round(table.shape[0] ** 0.5)) + 1) // 2)
    sig = dict(embed_dim=int(proj.shape[0]), in_chans=int(proj.shape[1]), patch_size=int(proj.shape[-1]),
               depths=tuple(depths), num_heads=tuple(heads))
    if len(set(windows)) == 1:  # a window clamped to a small last stage has a smaller table: no single window then
        sig["window_size"] = windows[0]
    return sig


def _swin_hf_config(hf):
    """timm Swin arguments from a Hugging Face Swin config.json (HF's defaults where a field is absent)."""
    if hf.get("use_absolute_embeddings"):
        raise LayoutError(
            "config.json sets use_absolute_embeddings: Swin with absolute position embeddings is not supported"
        )
    return dict(
        img_size=hf_field(hf, "image_size", 224),
        patch_size=hf_field(hf, "patch_size", 4),
        in_chans=hf_field(hf, "num_channels", 3),
        embed_dim=hf_field(hf, "embed_dim", 96),
        depths=hf_field(hf, "depths", [2, 2, 6, 2], tuple),
        num_heads=hf_field(hf, "num_heads", [3, 6, 12, 24], tuple),
        window_size=hf_field(hf, "window_size", 7),
        mlp_ratio=hf_field(hf, "mlp_ratio", 4.0, float),
        qkv_bias=hf_field(hf, "qkv_bias", True, bool),
        norm_eps=hf_field(hf, "layer_norm_eps", 1e-5, float),
    )


SIGNATURES[_SWIN] = _swin_signature
HF_CONFIG_READERS[_SWIN] = _swin_hf_config


def _merging_to_next_stage(match):
    """PatchMerging at the end of stage i (original, seed 004, Hugging Face) is at the start of stage i + 1 in timm."""
    return f"layers.{int(match[1]) + 1}.downsample.{match[2]}"


# --- seed 004 Swin (the blog's ``Swin`` class) -----------------------------------------------------------------------
# patch_embedding.{patch_embed,norm}, stages.{s}.blocks.{b}.{attn_norm,attn,mlp_norm,mlp}, stages.{s}.patch_merging
# (PatchMerging at the END of stages 0..S-2, where timm has it at the START of stages 1..S-1), norm, fc.
# Its PatchMerging.reduction is nn.Linear(4C, 2C) with the default bias=True: the layout's config sets
# downsample_bias=True (timm's reduction has no bias).

_SEED004_SWIN_RULES = [
    (r"patch_embedding\.patch_embed\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"patch_embedding\.norm\.(weight|bias)", r"patch_embed.norm.\1"),
    (r"stages\.(\d+)\.blocks\.(\d+)\.attn_norm\.(weight|bias)", r"layers.\1.blocks.\2.norm1.\3"),
    (r"stages\.(\d+)\.blocks\.(\d+)\.mlp_norm\.(weight|bias)", r"layers.\1.blocks.\2.norm2.\3"),
    (r"stages\.(\d+)\.blocks\.(\d+)\.(attn|mlp)\.(.+)", r"layers.\1.blocks.\2.\3.\4"),
    (r"stages\.(\d+)\.patch_merging\.(.+)", _merging_to_next_stage),
    (r"fc\.(weight|bias)", r"head.fc.\1"),
]


def seed004_swin_to_timm(state_dict):
    """Rename seed 004 ``Swin`` keys to timm ``SwinTransformer`` keys and drop its mask / index buffers.

    ``stages.{s}.patch_merging.*`` becomes ``layers.{s+1}.downsample.*`` and ``fc.*`` becomes ``head.fc.*``; the other
    renames are one-to-one (attn_norm -> norm1, mlp_norm -> norm2). No weight is transposed or permuted: the 2x2
    concatenation order of PatchMerging and the qkv row order are the same as timm's.
    """
    return rename(state_dict, _SEED004_SWIN_RULES, drop=_SWIN_BUFFERS)


register(Layout(
    name="seed004_swin",
    description="seed 004 blog Swin (patch_embedding / stages / patch_merging / fc)",
    family=_SWIN,
    sentinels=(("patch_embedding.patch_embed.weight", "stages.0.blocks.0.attn_norm.weight"),),
    convert=seed004_swin_to_timm,
    config=_swin_config,
))


# --- original microsoft/Swin-Transformer, torchvision, Hugging Face ---------------------------------------------------


def _original_swin(state_dict):
    """microsoft/Swin-Transformer: timm's names but merging at stage end, ``head`` for ``head.fc``, saved buffers."""
    return rename(state_dict, [
        (r"layers\.(\d+)\.downsample\.(.+)", _merging_to_next_stage),
        (r"head\.(weight|bias)", r"head.fc.\1"),
    ], drop=_SWIN_BUFFERS)


def _torchvision_swin(state_dict):
    """torchvision ``SwinTransformer`` (swin_t / swin_s / swin_b): ``features.0`` patch embedding, ``features.{2s+1}``
    the blocks of stage s, ``features.{2s}`` the merging layer before stage s; relative_position_index dropped."""
    def block(m, rest):
        return f"layers.{(int(m[1]) - 1) // 2}.blocks.{m[2]}.{rest}"

    return rename(state_dict, [
        (r"features\.0\.0\.(weight|bias)", r"patch_embed.proj.\1"),
        (r"features\.0\.2\.(weight|bias)", r"patch_embed.norm.\1"),
        (r"features\.(\d+)\.(\d+)\.mlp\.0\.(weight|bias)", lambda m: block(m, f"mlp.fc1.{m[3]}")),
        (r"features\.(\d+)\.(\d+)\.mlp\.3\.(weight|bias)", lambda m: block(m, f"mlp.fc2.{m[3]}")),
        (r"features\.(\d+)\.(\d+)\.(norm1|norm2|attn)\.(.+)", lambda m: block(m, f"{m[3]}.{m[4]}")),
        (r"features\.(\d+)\.(reduction|norm)\.(weight|bias)",
         lambda m: f"layers.{int(m[1]) // 2}.downsample.{m[2]}.{m[3]}"),
        (r"head\.(weight|bias)", r"head.fc.\1"),
    ], drop=_SWIN_BUFFERS)


# Hugging Face Swin and Swinv2 keys: "encoder.layers.{s}.blocks.{b}." + the block's own names -> timm's
HF_BLOCK, HF_TO_BLOCK = r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.", r"layers.\1.blocks.\2."

# the names Hugging Face Swin (4.x / Hub and 5.x) and Swinv2 share: embeddings, block norms, attention output, MLP,
# merging at the end of a stage, final norm, classifier
HF_SWIN_SHARED_RULES = [
    (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"embeddings\.norm\.(weight|bias)", r"patch_embed.norm.\1"),
    (HF_BLOCK + r"layernorm_before\.(weight|bias)", HF_TO_BLOCK + r"norm1.\3"),
    (HF_BLOCK + r"layernorm_after\.(weight|bias)", HF_TO_BLOCK + r"norm2.\3"),
    (HF_BLOCK + r"attention\.(?:o_proj|output\.dense)\.(weight|bias)", HF_TO_BLOCK + r"attn.proj.\3"),
    (HF_BLOCK + r"(?:mlp\.fc1|intermediate\.dense)\.(weight|bias)", HF_TO_BLOCK + r"mlp.fc1.\3"),
    (HF_BLOCK + r"(?:mlp\.fc2|output\.dense)\.(weight|bias)", HF_TO_BLOCK + r"mlp.fc2.\3"),
    (r"encoder\.layers\.(\d+)\.downsample\.(.+)", _merging_to_next_stage),
    (r"layernorm\.(weight|bias)", r"norm.\1"),
    (r"classifier\.(weight|bias)", r"head.fc.\1"),
]


def _hf_swin(state_dict):
    """Hugging Face SwinModel / SwinForImageClassification, 5.x and 4.x / Hub names; q, k, v fused into qkv."""
    state_dict = strip_prefix(state_dict, ("swin.",))
    block, to = HF_BLOCK, HF_TO_BLOCK
    state_dict = rename(state_dict, [
        (block + r"attention\.(q|k|v)_proj\.(weight|bias)", to + r"attn.\3.\4"),
        (block + r"attention\.self\.(q)uery\.(weight|bias)", to + r"attn.\3.\4"),
        (block + r"attention\.self\.(k)ey\.(weight|bias)", to + r"attn.\3.\4"),
        (block + r"attention\.self\.(v)alue\.(weight|bias)", to + r"attn.\3.\4"),
        (block + r"attention\.(?:relative_position_bias|self)\.relative_position_bias_table",
         to + "attn.relative_position_bias_table"),
        *HF_SWIN_SHARED_RULES,
    ], drop=_SWIN_BUFFERS)
    return fuse_qkv(state_dict)


register(Layout(
    name="original-swin",
    description="original microsoft/Swin-Transformer checkpoint",
    family=_SWIN,
    sentinels=(("layers.0.blocks.0.attn.relative_position_bias_table", "layers.0.downsample.reduction.weight"),),
    convert=_original_swin,
    config=_swin_config,
))

register(Layout(
    name="timm-swin",
    description="timm SwinTransformer",
    family=_SWIN,
    sentinels=(("patch_embed.proj.weight", "layers.0.blocks.0.attn.relative_position_bias_table"),),
    convert=dict,
    config=_swin_config,
))

register(Layout(
    name="torchvision-swin",
    description="torchvision SwinTransformer (swin_t, swin_s, swin_b)",
    family=_SWIN,
    sentinels=(("features.0.0.weight", "features.1.0.attn.relative_position_bias_table"),),
    convert=_torchvision_swin,
    config=_swin_config,
))

register(Layout(
    name="hf-swin",
    description="Hugging Face SwinModel / SwinForImageClassification (4.x Hub or 5.x names)",
    family=_SWIN,
    sentinels=tuple(
        (f"{prefix}encoder.layers.0.blocks.0.attention.{key}",)
        for prefix in ("swin.", "")
        for key in ("q_proj.weight", "self.query.weight")
    ),
    convert=_hf_swin,
    config=_swin_config,
))
