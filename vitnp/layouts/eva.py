"""Eva family layouts (vitnp.eva.Eva, EVA-02): timm.

Registered before the ViT layouts: timm-named EVA-02 Tiny / Small weights hold the ViT's sentinel keys too
(``patch_embed.proj.weight``, ``blocks.0.attn.qkv.weight``); what tells them apart is Eva's own keys: the q / v biases
beside a bias-free qkv, the separate q / k / v Linears, or the split SwiGLU MLP.
"""

from .core import CLASSIFIER_KEYS, SIGNATURES, Layout, head_config, num_blocks, register

_EVA = "Eva"


def _eva_signature(state_dict):
    """embed_dim, patch size, depth, image size (square grid), class token, qkv fused or not, the MLP's kind and
    mlp_ratio, from timm-named Eva weights (the number of heads is not in the weights)."""
    if "patch_embed.proj.weight" not in state_dict or "pos_embed" not in state_dict:
        return {}
    proj = state_dict["patch_embed.proj.weight"]
    embed_dim, patch = int(proj.shape[0]), int(proj.shape[-1])
    class_token = "cls_token" in state_dict
    grid = round((state_dict["pos_embed"].shape[1] - int(class_token)) ** 0.5)
    sig = dict(embed_dim=embed_dim, in_chans=int(proj.shape[1]), patch_size=patch, img_size=grid * patch,
               depth=num_blocks(state_dict, "blocks."), class_token=class_token,
               qkv_fused="blocks.0.attn.q_proj.weight" not in state_dict,
               swiglu_mlp="blocks.0.mlp.fc1_g.weight" in state_dict or "blocks.0.mlp.fc1.weight" in state_dict
               and state_dict["blocks.0.mlp.fc2.weight"].shape[1] * 2 == state_dict["blocks.0.mlp.fc1.weight"].shape[0],
               scale_mlp="blocks.0.mlp.norm.weight" in state_dict)
    if "blocks.0.mlp.fc2.weight" in state_dict:
        sig["mlp_ratio"] = state_dict["blocks.0.mlp.fc2.weight"].shape[1] / embed_dim
    return sig


SIGNATURES[_EVA] = _eva_signature
CLASSIFIER_KEYS[_EVA] = ("head.weight", "head.bias")

register(Layout(
    name="timm-eva",
    description="timm Eva (EVA-02)",
    family=_EVA,
    sentinels=(
        ("patch_embed.proj.weight", "blocks.0.attn.q_bias", "blocks.0.attn.qkv.weight"),
        ("patch_embed.proj.weight", "blocks.0.attn.q_proj.weight"),
        ("patch_embed.proj.weight", "blocks.0.mlp.fc1_g.weight"),
    ),
    convert=dict,
    config=head_config("head.weight"),
))
