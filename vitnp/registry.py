"""Model names -> (family, architecture arguments, preprocessing config), with timm's names and configs.

The tables live beside each family (``vit.MODELS``, ...): architecture arguments are timm's constructor keyword
arguments; ``num_classes`` defaults to the class count of timm's default pretrained tag for the name (0 for the
headless in21k / DINO defaults, as ``timm.create_model``). The preprocessing config is timm's ``pretrained_cfg`` for
that default tag (see :func:`data_config`).
"""

import difflib
import fnmatch
import math
import numbers
from dataclasses import fields, replace

import numpy as np

from . import eva, layouts, mobilevit, mobilevitv2, notes_vit, swin, swinv2, vit
from .backends import check_backend, default_backend
from .model import WeightsError, count_params

# Each family module holds its own table {name: (architecture kwargs, preprocessing config)}.
_FAMILIES = [
    (vit.VisionTransformer, vit.MODELS),
    (vit.VisionTransformer, vit.DINO_MODELS),
    (swin.SwinTransformer, swin.MODELS),
    (swinv2.SwinTransformerV2, swinv2.MODELS),
    (eva.Eva, eva.MODELS),
    (mobilevit.MobileViT, mobilevit.MODELS),
    (mobilevitv2.MobileViTV2, mobilevitv2.MODELS),
    *notes_vit.FAMILIES,  # the notes' hand-built ViTs (seeds 000, 003) and lucidrains vit_pytorch.ViT
]
_REGISTRY = {name: (family, arch, data_cfg) for family, table in _FAMILIES for name, (arch, data_cfg) in table.items()}


def list_models(filter=""):
    """Names ``create_model`` accepts, sorted; ``filter`` keeps some of them, as timm's ``list_models(filter)``.

    A filter with wildcards (``*``, ``?``, ``[...]``) is a shell-style pattern the whole name must match
    (``'deit_*'``); a plain word matches anywhere in the name (``'swin'``); both ignore case. A list of filters keeps
    the names any of them keeps. No match gives an empty list.
    """
    patterns = [p.lower() for p in ([filter] if isinstance(filter, str) else filter) if p]
    if not patterns:
        return sorted(_REGISTRY)

    def matches(name, pattern):
        return fnmatch.fnmatchcase(name, pattern) if any(c in pattern for c in "*?[") else pattern in name

    return sorted(name for name in _REGISTRY if any(matches(name.lower(), p) for p in patterns))


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
    ``overrides`` still win. ``num_classes=0`` with weights that have a classifier leaves the classifier out (as
    timm does): the model gives the pooled features. Weights of another size raise a :class:`WeightsError` that says
    which sizes differ and which registered names the weights fit.

    Every argument is checked (type, sign, :data:`MAX_WIDTH` and the other bounds) before anything is built.
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

    def origin(key):
        if key in overrides or (key == "num_classes" and num_classes is not None):
            return f"create_model({name!r}) argument"
        if key in from_checkpoint:
            return f"the weights {_describe(weights)} set"
        return f"registry entry {name!r} has"

    check_arguments(family.Config, args, origin)
    state_dict = checkpoint.state_dict if checkpoint else None
    labels = checkpoint.labels if checkpoint else None
    if checkpoint is not None and num_classes == 0:  # features asked for: the weights' classifier is not loaded
        state_dict = layouts.without_classifier(state_dict, family.__name__)
        labels = None
    try:
        model = _build(family, replace(family.Config(), **args), name).set_backend(backend)
    except ValueError as error:  # sizes that do not fit together: say where they came from
        if not from_checkpoint:
            raise
        raise ValueError(f"cannot build {name} from {_describe(weights)}: {error}") from error
    if checkpoint is None:
        model.init_weights(seed=seed, dtype=dtype)
    else:
        model.dtype = dtype  # the strict load below replaces every parameter: no random init to draw
    model.name = name
    model.data_config = data_cfg
    model.labels = labels
    model.weights_origin = checkpoint.layout.name if checkpoint else None  # e.g. 'timm-vit', 'hf-vit'
    if checkpoint is not None:
        try:  # arrays read from a file belong to the checkpoint alone: no copy; a caller's dict is copied
            model.load_state_dict(state_dict, strict=True, copy=isinstance(weights, dict))
        except WeightsError as error:  # say why, when the weights tell (another size, another classifier)
            cause = _mismatch_cause(checkpoint, model.cfg, family.__name__, name)
            if cause is None:
                raise
            raise error.with_cause(cause) from None
    return model


def _mismatch_cause(checkpoint, config, family_name, model_name):
    """Why the weights do not fit a model built from ``config``, when the weights tell: the sizes that differ and the
    registered names the weights fit (the closest to ``model_name`` first), or the classifier's size; else None."""
    try:
        fixed = layouts.signature(checkpoint)
    except (KeyError, IndexError, ValueError):  # weights too incomplete to tell their sizes
        fixed = {}
    differences = [f"{key} {_show(value)}, not {_show(getattr(config, key))}" for key, value in fixed.items()
                   if hasattr(config, key) and not layouts.same_size(getattr(config, key), value)]
    if differences:
        fits = sorted(layouts.guess_models(checkpoint, family_tables(family_name)),
                      key=lambda name: -difflib.SequenceMatcher(None, name, model_name).ratio())
        shown = ", ".join(fits[:3]) + (", ..." if len(fits) > 3 else "")
        return (f"these weights look like {shown}: " if fits else "the weights have ") + "; ".join(differences)
    classes = checkpoint.config.get("num_classes")
    if classes is not None and classes != config.num_classes:
        return (f"the weights' classifier has {classes} classes, the model {config.num_classes} "
                "(num_classes=0 leaves the classifier out)")
    return None


def _show(value):
    return "x".join(map(str, value)) if isinstance(value, tuple) and len(value) == 2 else str(value)


def _describe(weights):
    return "(a state_dict)" if isinstance(weights, dict) else str(weights)


# Bounds on the constructor arguments, a few times the largest real models' (ViT-22B: width 6144, 48 blocks): any
# real checkpoint is within them, and a config asking for absurd sizes is refused before anything is allocated.
MAX_WIDTH = 16384  # embed_dim, head_dim, MLP and channel widths, heads
MAX_DEPTH = 256  # blocks, in all stages together
MAX_IMAGE_SIZE = 4096  # img_size, patch_size and window_size, per side (SAM: 1024)
MAX_CHANNELS = 1024  # in_chans
MAX_CLASSES = 1_000_000
MAX_RATIO = 64.0  # mlp_ratio, bottle_ratio
MAX_PARAMETERS = 8_000_000_000  # the built model's parameter count (vit_huge: 0.63e9)
_LIMITS = {"img_size": MAX_IMAGE_SIZE, "patch_size": MAX_IMAGE_SIZE, "window_size": MAX_IMAGE_SIZE,
           "in_chans": MAX_CHANNELS, "num_classes": MAX_CLASSES, "depth": MAX_DEPTH, "depths": MAX_DEPTH,
           "transformer_depths": MAX_DEPTH, "mlp_ratio": MAX_RATIO, "bottle_ratio": MAX_RATIO, "norm_eps": 1.0}


def check_arguments(config_class, args, origin=lambda key: "argument"):
    """Raise a ValueError naming the argument, and where it came from (``origin(key)``), when a value of ``args`` has
    the wrong type (a list for an int, a string for a number), is zero or negative where a size is meant, is not
    finite, or is beyond the bounds above. How the values fit together (heads dividing the width, the patch the
    image) the family checks when it is built."""
    defaults = {f.name: f.default for f in fields(config_class)}
    for key, value in args.items():
        problem = _argument_problem(key, value, defaults[key])
        if problem:
            raise ValueError(f"{origin(key)} {key}={value!r:.40}: {problem}")


def _argument_problem(key, value, default):
    """What is wrong with ``value`` for the constructor argument ``key`` (whose default is ``default``), or None."""
    limit = _LIMITS.get(key, MAX_WIDTH)
    if key in ("num_classes", "representation_size", "reg_tokens"):  # 0 (or None) for none
        return None if value is None and key == "representation_size" else _size_problem(value, limit, minimum=0)
    if key == "fc_norm":
        return None if value is None or _is_bool(value) else "must be None, True or False"
    if key in ("img_size", "window_size"):  # an int or (h, w); Swin's window_size also one of these per stage
        per_stage = key == "window_size" and isinstance(value, (list, tuple)) and not _is_pair(value)
        for size in value if per_stage else [value]:
            if not (_is_pair(size) or isinstance(size, numbers.Integral)):
                return "must be an integer or a pair of integers (height, width)"
            problem = _first_problem(size if _is_pair(size) else [size], limit)
            if problem:
                return problem
        return None
    if _is_bool(default):
        return None if _is_bool(value) else "must be True or False"
    if isinstance(default, int):
        return _size_problem(value, limit)
    if isinstance(default, float):
        if _is_bool(value) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            return "must be a finite number"
        return None if 0 < value <= limit else f"must be above 0 and at most {limit:g}"
    if isinstance(default, str):
        return None if isinstance(value, str) else "must be a string"
    if isinstance(default, tuple):  # one size per stage
        if not isinstance(value, (list, tuple)) or not 1 <= len(value) <= 16:
            return "must be a list of 1 to 16 integers, one per stage"
        problem = _first_problem(value, limit)
        if problem is None and limit == MAX_DEPTH and sum(value) > MAX_DEPTH:
            problem = f"must add up to at most {MAX_DEPTH} blocks"
        return problem
    return None


def _size_problem(value, limit, minimum=1):
    if _is_bool(value) or not isinstance(value, numbers.Integral):
        return "must be an integer"
    if not minimum <= value <= limit:
        return f"must be between {minimum} and {limit}"
    return None


def _first_problem(sizes, limit):
    return next(filter(None, (_size_problem(size, limit) for size in sizes)), None)


def _is_pair(value):
    return isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, numbers.Integral) for v in value)


def _is_bool(value):
    return isinstance(value, (bool, np.bool_))


def _build(family, config, name):
    """``family(config)``, refused as a ValueError when the model would be beyond :data:`MAX_PARAMETERS` or does not
    fit in memory (its parameters are zero-filled pages until initialised or loaded)."""
    try:
        model = family(config)
    except MemoryError as error:
        raise ValueError(f"{name} with these arguments does not fit in this machine's memory") from error
    params = count_params(model)
    if params > MAX_PARAMETERS:
        raise ValueError(f"{name} with these arguments has {params:,} parameters, more than vitnp builds "
                         f"({MAX_PARAMETERS:,})")
    return model
