"""Layer-by-layer comparison of a model's named intermediates (``forward_trace``) with another implementation's.

The reference is an .npz holding the input under ``input`` (B, C, H, W) and any of the trace's names (ViT, EVA-02:
'patch_embed', 'pos_embed', 'blocks.{i}.attn', 'blocks.{i}.mlp', 'blocks.{i}', 'norm'; Swin v1 / v2: 'patch_embed',
'layers.{i}.downsample', 'layers.{i}.blocks.{j}', 'norm'; MobileViT: 'stem', 'stages.{s}.{b}', 'final_conv'; the
notes' and lucidrains' ViTs: the module paths of their PyTorch code, see their ``forward_trace``; all: 'pre_logits',
'logits'), or timm's model of the same architecture run in this process on the same weights
(:func:`torch_reference`), hooked at the modules those names are the paths of, or the same model on vitnp's
reference backend (:func:`compare_backends`: the fast backend checked against the readable formulas, no torch).
"""

import functools

import numpy as np

from .compiling import compile_in_foreground

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


def _random_input(model, size, seed=0, batch=1):
    """A seeded standard-normal (batch, in_chans, height, width) array in the model's dtype; size: (height, width)."""
    return np.random.default_rng(seed).standard_normal((batch, model.in_chans, *size)).astype(model.dtype)


def compare_backends(model, image_size=None, seed=0):
    """The fast backend's ``forward_trace`` against the reference backend's, on ``model``'s weights and a seeded random
    batch of two images (two, so that a kernel mixing up a batch's items shows), ``image_size`` square or the model's
    size: the rows of :func:`compare_traces`. Any family; no torch. ``model`` is left on the backend it was on.

    The fast side must run the engine's own kernels, so the process compiles any that are missing at once from now on
    (:func:`vitnp.compiling.compile_in_foreground`), instead of running the reference's while they compile."""
    compile_in_foreground()
    size = (image_size, image_size) if image_size else tuple(model.img_size)
    x = _random_input(model, size, seed, batch=2)
    backend = model.backend
    try:
        expected = model.set_backend("reference").forward_trace(x)
        actual = model.set_backend("fast").forward_trace(x)
    finally:
        model.set_backend(backend)
    return compare_traces(actual, expected, model.dtype)


def torch_reference(model, image_size=None, seed=0):
    """Run timm's model of ``model``'s architecture, with its weights, on a seeded random input; returns
    (input, {name: array}) from forward hooks at the timm modules the trace's names are the paths of."""
    try:
        import timm
        import torch
    except ImportError as error:
        raise ValueError("--torch needs PyTorch and timm: pip install torch timm") from error
    twins = {"VisionTransformer": _timm_vit, "SwinTransformer": _timm_swin, "SwinTransformerV2": _timm_swin,
             "MobileViT": _timm_mobilevit, "MobileViTV2": _timm_mobilevit, "Eva": _timm_eva}
    family = type(model).__name__
    if family not in twins:
        raise ValueError(f"layer-by-layer tracing against timm covers the ViT / DeiT / DINO, Swin (v1, v2), "
                         f"MobileViT (v1, v2) and EVA-02 families, not {model.name}")
    size = image_size or model.img_size[0]
    reference, hooked = twins[family](timm, model, size)
    torch_dtype = torch.float64 if model.dtype == np.float64 else torch.float32
    reference = reference.eval().to(torch_dtype)
    reference.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in model.state_dict().items()})
    outputs = {}

    def keep(name):
        return lambda module, inputs, output: outputs.__setitem__(name, output.detach().numpy().copy())

    modules = dict(reference.named_modules())
    for name, path in hooked.items():
        modules[path].register_forward_hook(keep(name))
    x = _random_input(model, (size, size), seed)
    with torch.no_grad():
        features = reference.forward_features(torch.from_numpy(x))
        if not family.startswith("MobileViT"):  # its forward_features output is the hooked final_conv's
            outputs["norm"] = features.numpy()
        outputs["pre_logits"] = reference.forward_head(features, pre_logits=True).numpy()
        if reference.num_classes:
            outputs["logits"] = reference.forward_head(features).numpy()
    if family in ("VisionTransformer", "Eva") and outputs["patch_embed"].ndim == 4:  # dynamic_img_size: NHWC
        outputs["patch_embed"] = outputs["patch_embed"].reshape(1, -1, model.cfg.embed_dim)
    return x, outputs


def _timm_vit(timm, model, size):
    """timm's VisionTransformer with ``model``'s config, and {trace name: timm module path} to hook."""
    cfg = model.cfg
    if size != model.img_size[0] and cfg.pos_embed_resample != "timm":
        raise ValueError(f"timm resamples position embeddings its own way; {model.name} uses the "
                         f"{cfg.pos_embed_resample!r} resampler: compare at the trained size {model.img_size[0]}")
    base = "deit_base_distilled_patch16_224" if cfg.distilled else "vit_base_patch16_224"
    mlp_layer = timm.layers.SwiGLUPacked if cfg.mlp_layer == "swiglu_packed" else timm.layers.Mlp
    reference = timm.create_model(
        base, pretrained=False, img_size=model.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans,
        num_classes=cfg.num_classes, global_pool=cfg.global_pool, embed_dim=cfg.embed_dim, depth=cfg.depth,
        num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias, class_token=cfg.class_token,
        fc_norm=cfg.fc_norm, dynamic_img_size=size != model.img_size[0], reg_tokens=cfg.reg_tokens,
        no_embed_class=cfg.no_embed_class, pre_norm=cfg.pre_norm, init_values=cfg.init_values, qk_norm=cfg.qk_norm,
        norm_layer=functools.partial(timm.layers.LayerNorm, eps=cfg.norm_eps), act_layer=cfg.act, mlp_layer=mlp_layer,
        **({} if cfg.distilled else {"representation_size": cfg.representation_size}),
    )
    hooked = {"patch_embed": "patch_embed", "pos_embed": "pos_drop"}
    if cfg.pre_norm:
        hooked["norm_pre"] = "norm_pre"
    for i in range(cfg.depth):
        hooked.update({f"blocks.{i}.attn": f"blocks.{i}.attn", f"blocks.{i}.mlp": f"blocks.{i}.mlp",
                       f"blocks.{i}": f"blocks.{i}"})
    return reference, hooked


def _timm_swin(timm, model, size):
    """timm's SwinTransformer or SwinTransformerV2 with ``model``'s config (its masks are built for one size: the
    model's)."""
    cfg = model.cfg
    if size != model.img_size[0] or model.img_size[0] != model.img_size[1]:
        raise ValueError(f"a Swin model is built for one image size: compare {model.name} at {model.img_size}")
    base, v2_arguments = "swin_tiny_patch4_window7_224", {}
    if type(model).__name__ == "SwinTransformerV2":  # 0: a stage's own window, timm's default
        base = "swinv2_tiny_window8_256"
        v2_arguments = dict(pretrained_window_sizes=cfg.pretrained_window_sizes or (0,) * len(cfg.depths))
    reference = timm.create_model(
        base, pretrained=False, img_size=model.img_size, patch_size=cfg.patch_size,
        in_chans=cfg.in_chans, num_classes=cfg.num_classes, embed_dim=cfg.embed_dim, depths=cfg.depths,
        num_heads=cfg.num_heads, window_size=cfg.window_size, mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias,
        **v2_arguments,
    )
    hooked = {"patch_embed": "patch_embed"}
    for i, depth in enumerate(cfg.depths):
        if i > 0:
            hooked[f"layers.{i}.downsample"] = f"layers.{i}.downsample"
        hooked.update({f"layers.{i}.blocks.{j}": f"layers.{i}.blocks.{j}" for j in range(depth)})
    return reference, hooked


def _timm_mobilevit(timm, model, size):
    """timm's ByobNet of the same registered name (MobileViT's architecture is fixed by the name)."""
    reference = timm.create_model(model.name, pretrained=False, in_chans=model.in_chans,
                                  num_classes=model.cfg.num_classes, global_pool=model.cfg.global_pool)
    hooked = {"stem": "stem", "final_conv": "final_conv"}
    for s, stage in reference.stages.named_children():
        hooked.update({f"stages.{s}.{b}": f"stages.{s}.{b}" for b, _ in stage.named_children()})
    return reference, hooked


def _timm_eva(timm, model, size):
    """timm's Eva with ``model``'s config. In float64 it gets vitnp's rotary table: both are float32 values, an ulp
    apart at some entries (torch's float32 sin / cos), which would move float64 outputs by ~1e-8."""
    import torch
    from timm.models.eva import Eva

    from .eva import rope_table

    cfg = model.cfg
    if not cfg.dynamic_img_size and (size != model.img_size[0] or model.img_size[0] != model.img_size[1]):
        raise ValueError(f"{model.name} takes {model.img_size} images only: build it with dynamic_img_size=True to "
                         "compare at another size")
    reference = Eva(
        img_size=model.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans, num_classes=cfg.num_classes,
        global_pool=cfg.global_pool, embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads,
        qkv_bias=cfg.qkv_bias, qkv_fused=cfg.qkv_fused, mlp_ratio=cfg.mlp_ratio, swiglu_mlp=cfg.swiglu_mlp,
        scale_mlp=cfg.scale_mlp, class_token=cfg.class_token, use_rot_pos_emb=cfg.use_rot_pos_emb,
        ref_feat_shape=cfg.ref_feat_shape, rope_rotate_half=cfg.rope_rotate_half, use_fc_norm=cfg.use_fc_norm,
        dynamic_img_size=cfg.dynamic_img_size, norm_layer=functools.partial(timm.layers.LayerNorm, eps=cfg.norm_eps),
    )
    rope = reference.rope
    if model.dtype == np.float64 and rope is not None and rope.pos_embed is not None:
        table = rope_table(tuple(rope.feat_shape), rope.dim, rope.ref_feat_shape, rope.rotate_half)
        rope.pos_embed.copy_(torch.from_numpy(table))
    hooked = {"patch_embed": "patch_embed", "pos_embed": "pos_drop"}
    for i in range(cfg.depth):
        hooked.update({f"blocks.{i}.attn": f"blocks.{i}.attn", f"blocks.{i}.mlp": f"blocks.{i}.mlp",
                       f"blocks.{i}": f"blocks.{i}"})
    return reference, hooked
