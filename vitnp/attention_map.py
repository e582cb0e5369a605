"""Attention maps of the class token, drawn as seed 001 / DINO's ``visualize_attention.py`` draws them, with Pillow.

The picture: the input image, the mean over heads laid over it, then one panel per head, each map upsampled to
pixels by repeating every patch's value (``F.interpolate(mode='nearest', scale_factor=p)``) and coloured with an
inferno-like colour map. Options: DINO's mask (the patches holding the top ``threshold`` of a head's attention mass)
and attention rollout (Abnar & Zuidema 2020) for supervised ViTs, whose last-block attention is less telling.
"""

import numpy as np
from PIL import Image, ImageDraw

from .preprocess import image_name, model_data_config, normalize, open_image, preprocess, resize, to_array

# inferno, sampled at 0, 1/6, ..., 1 (matplotlib's values rounded to 8 bits), linearly interpolated in between
_INFERNO = np.array([(0, 0, 4), (40, 11, 84), (101, 21, 110), (159, 42, 99), (212, 72, 66), (245, 125, 21),
                     (252, 255, 164)], dtype=np.float64)


def colour_map(values):
    """(H, W) values in [0, 1] -> (H, W, 3) uint8 inferno colours."""
    position = np.clip(values, 0.0, 1.0) * (len(_INFERNO) - 1)
    lower = np.minimum(position.astype(int), len(_INFERNO) - 2)
    fraction = (position - lower)[..., None]
    return np.round(_INFERNO[lower] * (1 - fraction) + _INFERNO[lower + 1] * fraction).astype(np.uint8)


def class_token_attention(model, x):
    """The last block's attention from the class token to every patch: (B, heads, gh, gw), rows of
    ``get_last_selfattention(x)[:, :, 0, prefix:]`` (DINO's ``attentions[0, :, 0, 1:]``)."""
    attn = model.get_last_selfattention(x)  # (B, heads, N, N)
    gh, gw = x.shape[-2] // model.patch_size, x.shape[-1] // model.patch_size
    B, heads = attn.shape[:2]
    return attn[:, :, 0, model.num_prefix_tokens :].reshape(B, heads, gh, gw)


def attention_rollout(model, x, residual=0.5):
    """Attention rollout: the product over blocks of (residual I + (1 - residual) mean-over-heads attention), rows
    renormalised; returns the class token's row over the patches, (B, 1, gh, gw)."""
    tokens = model.prepare_tokens(x)  # (B, prefix + N, D)
    N = tokens.shape[1]
    rollout = np.broadcast_to(np.eye(N), (tokens.shape[0], N, N))
    for block in model.block_list:
        attn = block.attn.attention_probs(block.norm1(tokens))  # (B, heads, N, N)
        mixed = residual * np.eye(N) + (1 - residual) * attn.mean(axis=1)
        mixed = mixed / mixed.sum(axis=-1, keepdims=True)
        rollout = mixed @ rollout
        tokens = block(tokens)
    gh, gw = x.shape[-2] // model.patch_size, x.shape[-1] // model.patch_size
    return rollout[:, None, 0, model.num_prefix_tokens :].reshape(-1, 1, gh, gw)


def threshold_mask(maps, threshold):
    """DINO's mask: per map, the patches whose attention, taken largest first, makes up ``threshold`` of the mass
    (``cumsum(sorted ascending / sum) > 1 - threshold``). (heads, gh, gw) -> bool of the same shape."""
    flat = maps.reshape(len(maps), -1)
    order = np.argsort(flat, axis=1, kind="stable")
    ascending = np.take_along_axis(flat, order, axis=1)
    cumulative = np.cumsum(ascending / ascending.sum(axis=1, keepdims=True), axis=1)
    mask = np.zeros_like(flat, dtype=bool)
    np.put_along_axis(mask, order, cumulative > 1 - threshold, axis=1)
    return mask.reshape(maps.shape)


def load_for_attention(model, image, image_size=None):
    """(1, C, H, W) input with H, W cut down to multiples of the patch size, and the matching (H, W, 3) uint8
    picture. ``image_size``: resize to N x N (bilinear) and normalise, DINO's ``visualize_attention``; None: the
    model's eval preprocessing."""
    config = model_data_config(model)
    if image_size:
        mode = "L" if config["input_size"][0] == 1 else "RGB"
        picture = resize(open_image(image, mode), (image_size, image_size), "bilinear", image_name(image))
        x = normalize(to_array(picture), config["mean"], config["std"])
    else:
        x = preprocess(image, config)
        mean, std = np.asarray(config["mean"], np.float32), np.asarray(config["std"], np.float32)
        pixels = (x * std[:, None, None] + mean[:, None, None]).transpose(1, 2, 0)  # back to [0, 1], (H, W, C)
        picture = Image.fromarray(np.round(np.clip(pixels, 0, 1) * 255).astype(np.uint8).squeeze())
    p = model.patch_size
    H, W = x.shape[1] - x.shape[1] % p, x.shape[2] - x.shape[2] % p
    picture = np.asarray(picture.convert("RGB"))[:H, :W]
    return x[None, :, :H, :W], picture


def _panel(picture, values, title, overlay):
    """One picture panel: the map coloured (and blended 50 / 50 over the image when ``overlay``), with a title."""
    span = values.max() - values.min()
    coloured = colour_map((values - values.min()) / span if span > 0 else np.zeros_like(values))
    if overlay:
        coloured = np.round(0.5 * coloured + 0.5 * picture).astype(np.uint8)
    panel = Image.fromarray(coloured)
    ImageDraw.Draw(panel).text((4, 2), title, fill=(255, 255, 255))
    return panel


def attention_figure(model, image, out, image_size=None, threshold=None, rollout=False, columns=4):
    """Write the PNG grid: image, mean over heads (overlaid), one panel per head; returns the (heads, H, W) maps."""
    if not hasattr(model, "get_last_selfattention"):
        raise ValueError(f"attention maps are drawn for the ViT / DeiT / DINO family, not {model.name}")
    if not model.cfg.class_token:
        raise ValueError(f"{model.name} has no class token: there is no class-token attention to draw")
    if threshold is not None and not 0 < threshold < 1:
        raise ValueError(f"threshold must be between 0 and 1, got {threshold}")
    x, picture = load_for_attention(model, image, image_size)
    x = x.astype(model.dtype)
    maps = (attention_rollout(model, x) if rollout else class_token_attention(model, x))[0]  # (heads, gh, gw)
    if threshold is not None:
        maps = threshold_mask(maps, threshold).astype(np.float64)
    p = model.patch_size
    pixels = maps.repeat(p, axis=1).repeat(p, axis=2)  # nearest upsampling, (heads, H, W)
    panels = [Image.fromarray(picture), _panel(picture, pixels.mean(axis=0), "mean" if not rollout else "rollout",
                                               overlay=True)]
    if not rollout:
        panels += [_panel(picture, m, f"head {i + 1}", overlay=False) for i, m in enumerate(pixels)]
    H, W = picture.shape[:2]
    columns = min(columns, len(panels))
    rows = -(-len(panels) // columns)
    gap = 4
    grid = Image.new("RGB", (columns * W + (columns - 1) * gap, rows * H + (rows - 1) * gap), (255, 255, 255))
    for i, panel in enumerate(panels):
        grid.paste(panel, ((i % columns) * (W + gap), (i // columns) * (H + gap)))
    try:
        grid.save(out, format="PNG")
    except OSError as error:
        raise ValueError(f"cannot write {out}: {error}") from error
    return pixels
