"""The notes' hand-built ViTs and lucidrains vit_pytorch.ViT (vitnp.notes_vit): own architectures, own names."""

from .core import SIGNATURES, head_config, Layout, num_blocks, register, square_img_size

def _prenorm_signature(state_dict):
    conv = state_dict["patchembedding.patch_embedding.weight"]
    patch = int(conv.shape[-1])
    return dict(
        in_chans=int(conv.shape[1]),
        patch_size=patch,
        embed_dim=int(state_dict["patchembedding.linear.weight"].shape[0]),
        depth=num_blocks(state_dict, "transformer.layers."),
        mlp_hidden_dim=int(state_dict["transformer.layers.0.1.fn.net.0.weight"].shape[0]),
        img_size=square_img_size(state_dict["patchembedding.pos_embedding"].shape[1] - 1, patch),
    )


def _torch_encoder_signature(state_dict):
    conv = state_dict["embedding_block.patcher.0.weight"]
    patch, dim = int(conv.shape[-1]), int(conv.shape[0])
    return dict(
        in_chans=int(conv.shape[1]),
        patch_size=patch,
        embed_dim=dim,
        depth=num_blocks(state_dict, "encoder_blocks.layers."),
        mlp_ratio=state_dict["encoder_blocks.layers.0.linear1.weight"].shape[0] / dim,
        img_size=square_img_size(state_dict["embedding_block.position_embedding"].shape[1] - 1, patch),
    )


def _lucidrains_config(state_dict):
    """Head size, and the pooling: vit_pytorch 1.26 keeps a class token only for pool='cls'."""
    return {**head_config("mlp_head.weight")(state_dict),
            "pool": "cls" if state_dict["cls_token"].shape[0] else "mean"}


def _lucidrains_signature(state_dict):
    return dict(
        embed_dim=int(state_dict["to_patch_embedding.2.weight"].shape[0]),
        depth=num_blocks(state_dict, "transformer.layers."),
        mlp_dim=int(state_dict["transformer.layers.0.1.net.1.weight"].shape[0]),
    )


SIGNATURES["PreNormViT"] = _prenorm_signature
SIGNATURES["TorchEncoderViT"] = _torch_encoder_signature
SIGNATURES["LucidrainsViT"] = _lucidrains_signature

register(Layout(
    name="notes-prenorm-vit",
    description="the notes' PreNorm ViT (seed 000: conv + Linear patch embedding, to_q / to_k / to_v)",
    family="PreNormViT",
    sentinels=(("patchembedding.linear.weight", "transformer.layers.0.0.fn.to_q.weight"),),
    convert=dict,
    config=head_config("mlp_head.1.weight"),
))

register(Layout(
    name="notes-torch-encoder-vit",
    description="the notes' nn.TransformerEncoder ViT (seed 003)",
    family="TorchEncoderViT",
    sentinels=(("embedding_block.patcher.0.weight", "encoder_blocks.layers.0.self_attn.in_proj_weight"),),
    convert=dict,
    config=head_config("mlp_head.1.weight"),
))

register(Layout(
    name="lucidrains-vit",
    description="lucidrains vit_pytorch.ViT",
    family="LucidrainsViT",
    sentinels=(("to_patch_embedding.2.weight", "transformer.layers.0.0.to_qkv.weight"),),
    convert=dict,
    config=_lucidrains_config,
))
