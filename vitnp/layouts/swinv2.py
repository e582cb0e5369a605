"""Swin V2 family layouts (vitnp.swinv2.SwinTransformerV2): timm."""

from .core import CLASSIFIER_KEYS, SIGNATURES, head_config, Layout, num_blocks, register

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


SIGNATURES[_SWINV2] = _swinv2_signature
CLASSIFIER_KEYS[_SWINV2] = ("head.fc.weight", "head.fc.bias")

register(Layout(
    name="timm-swinv2",
    description="timm SwinTransformerV2",
    family=_SWINV2,
    sentinels=(("patch_embed.proj.weight", "layers.0.blocks.0.attn.cpb_mlp.0.weight"),),
    convert=dict,
    config=head_config("head.fc.weight"),
))
