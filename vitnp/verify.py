"""Layer-by-layer comparison of a model's named intermediates (``forward_trace``) with another implementation's.

The reference is an .npz holding the input under ``input`` (B, C, H, W) and any of the trace's names
('patch_embed', 'pos_embed', 'blocks.{i}.attn', 'blocks.{i}.mlp', 'blocks.{i}', 'norm', 'pre_logits', 'logits'),
or timm's model of the same architecture run in this process on the same weights (:func:`torch_reference`).
"""

import numpy as np

# Agreement expected of a correct implementation (random weights, inputs ~N(0, 1)): float32 differs by GEMM
# rounding (~1e-6 on values ~1; 100x margin), float64 by ~1e-15.
TOLERANCES = {np.dtype(np.float32): dict(rtol=1e-4, atol=1e-4), np.dtype(np.float64): dict(rtol=1e-10, atol=1e-11)}


def read_reference(path):
    """(input, {name: array}) from a reference .npz; a ValueError when it has no 'input' or cannot be read."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read reference {path}: {error}") from error
    if "input" not in arrays:
        raise ValueError(f"{path} has no 'input' array (the (B, C, H, W) batch the reference was computed on)")
    x = arrays.pop("input")
    return x, arrays


def compare_traces(trace, reference, dtype):
    """One row per name present in both, in forward order: shape, max abs error, max relative error
    (max |a - b| / max |b|), and whether ``np.allclose`` holds with the dtype's tolerance."""
    tolerance = TOLERANCES[np.dtype(dtype)]
    common = [name for name in trace if name in reference]
    if not common:
        raise ValueError(f"the reference names none of the model's intermediates: {', '.join(trace)}")
    rows = []
    for name in common:
        actual, expected = np.asarray(trace[name], np.float64), np.asarray(reference[name], np.float64)
        if actual.shape != expected.shape:
            rows.append(dict(name=name, shape=f"{expected.shape} != {actual.shape}", max_abs=np.inf, max_rel=np.inf,
                             ok=False))
            continue
        error = np.abs(actual - expected)
        scale = np.abs(expected).max()
        rows.append(dict(name=name, shape=str(actual.shape), max_abs=float(error.max()),
                         max_rel=float(error.max() / scale) if scale > 0 else float(error.max()),
                         ok=bool(np.allclose(actual, expected, **tolerance))))
    return rows


def format_table(rows):
    """The rows as a fixed-width text table."""
    width = max(len("layer"), *(len(r["name"]) for r in rows))
    lines = [f"{'layer':<{width}}  {'shape':<18}  {'max abs err':>11}  {'max rel err':>11}  result"]
    for r in rows:
        lines.append(f"{r['name']:<{width}}  {r['shape']:<18}  {r['max_abs']:>11.3e}  {r['max_rel']:>11.3e}  "
                     + ("ok" if r["ok"] else "FAIL"))
    return "\n".join(lines)


def torch_reference(model, image_size=None, seed=0):
    """Run timm's VisionTransformer with ``model``'s architecture and weights on a seeded random input; returns
    (input, {name: array}) with forward hooks at the modules that produce the trace's names."""
    try:
        import timm
        import torch
    except ImportError as error:
        raise ValueError("--torch needs PyTorch and timm: pip install torch timm") from error
    if type(model).__name__ != "VisionTransformer":
        raise ValueError(f"layer-by-layer tracing is available for the ViT / DeiT / DINO family, not {model.name}")
    cfg = model.cfg
    size = image_size or model.img_size[0]
    if size != model.img_size[0] and cfg.pos_embed_resample != "timm":
        raise ValueError(f"timm resamples position embeddings its own way; {model.name} uses the "
                         f"{cfg.pos_embed_resample!r} resampler: compare at the trained size {model.img_size[0]}")
    base = "deit_base_distilled_patch16_224" if cfg.distilled else "vit_base_patch16_224"
    reference = timm.create_model(
        base, pretrained=False, img_size=model.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans,
        num_classes=cfg.num_classes, global_pool=cfg.global_pool, embed_dim=cfg.embed_dim, depth=cfg.depth,
        num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias, class_token=cfg.class_token,
        fc_norm=cfg.fc_norm, dynamic_img_size=size != model.img_size[0],
        **({} if cfg.distilled else {"representation_size": cfg.representation_size}),
    )
    torch_dtype = torch.float64 if model.dtype == np.float64 else torch.float32
    reference = reference.eval().to(torch_dtype)
    reference.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in model.state_dict().items()})
    outputs = {}

    def keep(name):
        return lambda module, inputs, output: outputs.__setitem__(name, output.detach().numpy().copy())

    reference.patch_embed.register_forward_hook(keep("patch_embed"))
    reference.pos_drop.register_forward_hook(keep("pos_embed"))
    for i, block in enumerate(reference.blocks):
        block.attn.register_forward_hook(keep(f"blocks.{i}.attn"))
        block.mlp.register_forward_hook(keep(f"blocks.{i}.mlp"))
        block.register_forward_hook(keep(f"blocks.{i}"))
    x = np.random.default_rng(seed).standard_normal((1, cfg.in_chans, size, size)).astype(model.dtype)
    with torch.no_grad():
        features = reference.forward_features(torch.from_numpy(x))
        outputs["norm"] = features.numpy()
        outputs["pre_logits"] = reference.forward_head(features, pre_logits=True).numpy()
        if cfg.num_classes:
            outputs["logits"] = reference.forward_head(features).numpy()
    if outputs["patch_embed"].ndim == 4:  # dynamic_img_size keeps NHWC patch tokens: (B, gh, gw, D)
        outputs["patch_embed"] = outputs["patch_embed"].reshape(1, -1, cfg.embed_dim)
    return x, outputs
