"""Model names -> (family, architecture arguments, preprocessing config), with timm's names and configs.

The tables live beside each family (``vit.MODELS``, ...): architecture arguments are timm's constructor keyword
arguments; ``num_classes`` defaults to the class count of timm's default pretrained tag for the name (0 for the
headless in21k / DINO defaults, as ``timm.create_model``). The preprocessing config is timm's ``pretrained_cfg`` for
that default tag (see :func:`data_config`).
"""

import difflib
from dataclasses import fields, replace

import numpy as np

from . import vit

# Each family module holds its own table {name: (architecture kwargs, preprocessing config)}.
_FAMILIES = [(vit.VisionTransformer, vit.MODELS)]
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


def create_model(name, weights=None, num_classes=None, dtype=np.float32, seed=0, **overrides):
    """Build a registered model; ``weights`` (a path or a state_dict) loads strictly, else seeded random init.

    ``overrides`` are timm's constructor keyword arguments (img_size, patch_size, in_chans, embed_dim, depth,
    num_heads, mlp_ratio, qkv_bias, class_token, global_pool, fc_norm, representation_size).
    """
    from .weights import load_weights

    family, arch, data_cfg = _lookup(name)
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"dtype must be float32 or float64, got {dtype}")
    allowed = {f.name for f in fields(family.Config)} - set(family.fixed_by_name)
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise ValueError(f"unknown argument(s) for {name}: {', '.join(unknown)}; accepted: {', '.join(sorted(allowed))}")
    args = {**arch, **overrides}
    if num_classes is not None:
        args["num_classes"] = num_classes
    model = family(replace(family.Config(), **args))
    model.init_weights(seed=seed, dtype=dtype)
    model.name = name
    model.data_config = data_cfg
    if weights is not None:
        state_dict = load_weights(weights) if not isinstance(weights, dict) else weights
        model.load_state_dict(state_dict, strict=True)
    return model
