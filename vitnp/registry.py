"""Model names -> (family, architecture arguments, preprocessing config), with timm's names and configs.

The tables live beside each family (``vit.MODELS``, ...): architecture arguments are timm's constructor keyword
arguments; ``num_classes`` defaults to the class count of timm's default pretrained tag for the name (0 for the
headless in21k / DINO defaults, as ``timm.create_model``). The preprocessing config is timm's ``pretrained_cfg`` for
that default tag (see :func:`data_config`).
"""

import difflib
from dataclasses import fields, replace

import numpy as np

from . import layouts, mobilevit, notes_vit, swin, vit
from .backends import check_backend, default_backend

# Each family module holds its own table {name: (architecture kwargs, preprocessing config)}.
_FAMILIES = [
    (vit.VisionTransformer, vit.MODELS),
    (vit.VisionTransformer, vit.DINO_MODELS),
    (swin.SwinTransformer, swin.MODELS),
    (mobilevit.MobileViT, mobilevit.MODELS),
    *notes_vit.FAMILIES,  # the notes' hand-built ViTs (seeds 000, 003) and lucidrains vit_pytorch.ViT
]
_REGISTRY = {name: (family, arch, data_cfg) for family, table in _FAMILIES for name, (arch, data_cfg) in table.items()}


def list_models():
    """Names ``create_model`` accepts, sorted."""
    return sorted(_REGISTRY)


def data_config(name):
    """timm's preprocessing config of a registered name: input_size, crop_pct, interpolation, mean, std."""
    return dict(_lookup(name)[2])


def _lookup(name):
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; vitnp.list_models() lists them"
        raise ValueError(f"unknown model name {name!r}{hint}")
    return _REGISTRY[name]


def family_tables(family_name):
    """{name: (family class, architecture kwargs)} of the registered names whose family class is ``family_name``."""
    return {n: (family, arch) for n, (family, arch, _) in _REGISTRY.items() if family.__name__ == family_name}


def create_model(name, weights=None, num_classes=None, dtype=np.float32, seed=0, backend=None, **overrides):
    """Build a registered model; ``weights`` (a path or a state_dict) loads strictly, else seeded random init.

    ``backend`` is 'fast' (the engine) or 'reference' (the readable formulas, :mod:`vitnp.reference`); None takes
    ``VITNP_BACKEND``, else 'fast'. The model runs its forward on that backend's ops (``model.backend`` says which;
    ``model.set_backend`` changes it).

    ``overrides`` are timm's constructor keyword arguments (img_size, patch_size, in_chans, embed_dim, depth,
    num_heads, mlp_ratio, qkv_bias, class_token, global_pool, fc_norm, representation_size).

    ``weights`` may be in any layout :mod:`vitnp.layouts` knows (torchvision, Hugging Face, DINO, original Swin,
    ...): it is converted to the family's names, and what the checkpoint fixes (head size, representation layer,
    LayerNorm eps, a config.json's num_heads / image size) overrides the name's arguments; ``num_classes`` and
    ``overrides`` still win.
    """
    family, arch, data_cfg = _lookup(name)
    backend = check_backend(backend) if backend is not None else default_backend()
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"dtype must be float32 or float64, got {dtype}")
    allowed = {f.name for f in fields(family.Config)} - set(family.fixed_by_name)
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        accepted = ", ".join(sorted(allowed))
        raise ValueError(f"unknown argument(s) for {name}: {', '.join(unknown)}; accepted: {accepted}")
    checkpoint = None
    if weights is not None:  # read, detect the layout, convert to the family's names
        checkpoint = layouts.prepare(weights)
        layouts.check_family(checkpoint, family.__name__, name, family_tables)
    from_checkpoint = {k: v for k, v in checkpoint.config.items() if k in allowed} if checkpoint else {}
    args = {**arch, **from_checkpoint, **overrides}
    if num_classes is not None:
        args["num_classes"] = num_classes
    model = family(replace(family.Config(), **args)).set_backend(backend)
    if checkpoint is None:
        model.init_weights(seed=seed, dtype=dtype)
    else:
        model.dtype = dtype  # the strict load below replaces every parameter: no random init to draw
    model.name = name
    model.data_config = data_cfg
    model.labels = checkpoint.labels if checkpoint else None
    model.weights_origin = checkpoint.layout.name if checkpoint else None  # e.g. 'timm-vit', 'hf-vit'
    if checkpoint is not None:
        model.load_state_dict(checkpoint.state_dict, strict=True)
    return model
