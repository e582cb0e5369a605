"""The layouts' common part: what a layout is and the registry of layouts, detecting and converting a checkpoint,
the helpers converters share (renames, q / k / v fusion), and the architecture facts weights and config.json give."""

import math
import numbers
import os
import re
from dataclasses import dataclass, field, fields

import numpy as np

from ..weights import CONFIG_KEY, save_npz


class LayoutError(ValueError):
    """A checkpoint whose layout is not recognised, or that does not fit the requested model."""


@dataclass(frozen=True)
class Layout:
    """One checkpoint layout.

    ``family`` is the name of the vitnp model class the converted weights load into. ``sentinels`` holds
    alternatives: tuples of keys that must all be present. ``convert`` maps a state_dict in this layout's names to
    the family's names; ``config`` maps the converted state_dict to the constructor arguments the weights fix.
    """

    name: str
    description: str
    family: str
    sentinels: tuple
    convert: object
    config: object = None

    def matches(self, keys):
        return any(all(k in keys for k in group) for group in self.sentinels)


LAYOUTS = []


def register(layout, before=None):
    """Add a layout to the detection order: after the ones registered before it, or just before the layout named
    ``before`` (for a layout whose sentinels are a superset of an earlier layout's, e.g. Swin V2's under Swin's)."""
    if any(known.name == layout.name for known in LAYOUTS):
        raise ValueError(f"layout {layout.name!r} is registered twice")
    if before is None:
        LAYOUTS.append(layout)
    else:
        LAYOUTS.insert(LAYOUTS.index(_layout_named(before)), layout)
    return layout


@dataclass
class Checkpoint:
    """Weights in the family's names, with what the checkpoint says about the model."""

    state_dict: dict
    layout: Layout
    config: dict = field(default_factory=dict)  # constructor arguments fixed by the weights / config.json / export
    labels: object = None  # class names by index (Hugging Face id2label), or None
    notes: list = field(default_factory=list)  # what unwrapping did: wrappers taken, keys dropped


# ---------------------------------------------------------------------------------------------------------------------
# Unwrapping, detection, conversion
# ---------------------------------------------------------------------------------------------------------------------

# Training checkpoints nest the weights: DINO {'teacher', 'student'} (the teacher is what DINO evaluates), timm /
# original Swin {'model'}, Lightning-style {'state_dict'}. Nested dicts arrive flattened with dotted keys.
_WRAPPERS = ("teacher", "student", "model", "state_dict", "model_state_dict", "model_ema")


def unwrap(state_dict):
    """Strip training wrappers: returns ``(state_dict, notes)``.

    Until the keys match a layout: take the first wrapper dict present (``teacher`` before ``student``), strip a
    ``module.`` prefix held by every key (DistributedDataParallel), keep only the ``backbone.`` part of a DINO
    ``MultiCropWrapper`` (its ``head.*`` keys are the DINO projection head, not part of the ViT).
    """
    notes = []
    while not _recognised(state_dict):
        wrapper = next((w for w in _WRAPPERS if any(k.startswith(w + ".") for k in state_dict)), None)
        if wrapper is not None:
            inner = {k[len(wrapper) + 1:]: v for k, v in state_dict.items() if k.startswith(wrapper + ".")}
            notes.append(f"took the {wrapper!r} weights ({len(inner)} of {len(state_dict)} tensors)")
            state_dict = inner
        elif state_dict and all(k.startswith("module.") for k in state_dict):
            state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
            notes.append("stripped the 'module.' prefix")
        elif any(k.startswith("backbone.") for k in state_dict):
            backbone = {k[len("backbone."):]: v for k, v in state_dict.items() if k.startswith("backbone.")}
            dropped = len(state_dict) - len(backbone)
            dropped_note = f", dropped {dropped} others (DINO head)" if dropped else ""
            notes.append("kept the 'backbone.' weights" + dropped_note)
            state_dict = backbone
        else:
            break
    return state_dict, notes


def _recognised(state_dict):
    return any(layout.matches(state_dict.keys()) for layout in LAYOUTS)


def find_layout(state_dict):
    """The registered :class:`Layout` whose sentinel keys ``state_dict`` holds; a :class:`LayoutError` listing every
    layout's sentinels when none matches."""
    keys = set(state_dict)
    for layout in LAYOUTS:
        if layout.matches(keys):
            return layout
    looked_for = "\n  ".join(
        f"{layout.name} ({layout.description}): " + " | ".join(" + ".join(group) for group in layout.sentinels)
        for layout in LAYOUTS
    )
    sample = ", ".join(sorted(keys)[:8]) + (", ..." if len(keys) > 8 else "")
    raise LayoutError(
        f"cannot tell the layout of these weights ({len(keys)} keys: {sample}); looked for these sentinel keys:\n  "
        + looked_for
    )


def detect_layout(state_dict):
    """Name of the layout of ``state_dict`` (after :func:`unwrap`), e.g. 'timm-vit', 'hf-swin', 'seed004_swin'."""
    return find_layout(unwrap(state_dict)[0]).name


def to_timm(state_dict, layout=None):
    """``state_dict`` unwrapped and converted to its family's names; ``layout`` (a name) skips the detection."""
    state_dict, _ = unwrap(state_dict)
    return _layout_named(layout).convert(state_dict) if layout else find_layout(state_dict).convert(state_dict)


def _layout_named(name):
    for layout in LAYOUTS:
        if layout.name == name:
            return layout
    known = ", ".join(layout.name for layout in LAYOUTS)
    raise LayoutError(f"unknown checkpoint layout {name!r}; known layouts: {known}")


def prepare(weights):
    """A :class:`Checkpoint` from a path (file or Hugging Face folder) or a state_dict (arrays or torch tensors)."""
    from ..weights import read_checkpoint, to_arrays

    if isinstance(weights, dict):
        return from_raw(to_arrays(weights))
    raw = read_checkpoint(weights)
    return from_raw(raw.state_dict, raw.hf_config, raw.saved_config, source=os.fspath(weights))


def from_raw(state_dict, hf_config=None, saved_config=None, source=None):
    """Unwrap, detect, convert, and collect the constructor arguments: the weights', config.json's, an export's.

    A config that is not a JSON object, or a config.json field of the wrong type or sign, is a :class:`LayoutError`
    naming ``source`` (the file or folder read) and the field.
    """
    state_dict, notes = unwrap(state_dict)
    layout = find_layout(state_dict)
    converted = layout.convert(state_dict)
    config = layout.config(converted) if layout.config else {}
    dino_training = any("'teacher'" in note or "'student'" in note or "'backbone.'" in note for note in notes)
    if dino_training and "pos_embed_resample" not in config:  # a DINOv2 layout names its own resampler
        config["pos_embed_resample"] = "dino"  # a DINO training checkpoint: DINO's +0.1 resampler at other sizes
    labels = None
    try:
        if hf_config is not None:
            if not isinstance(hf_config, dict):
                raise LayoutError(f"config.json holds a {type(hf_config).__name__}, not a JSON object")
            config.update(hf_config_arguments(layout, hf_config))
            labels = hf_labels(hf_config, config.get("num_classes"))
        if saved_config is not None:
            if not isinstance(saved_config, dict):
                raise LayoutError(f"the {CONFIG_KEY!r} entry holds a {type(saved_config).__name__}, not a JSON object")
            saved_config = dict(saved_config)
            labels = saved_config.pop("labels", None)
            if labels is not None and not (isinstance(labels, list) and all(isinstance(x, str) for x in labels)):
                raise LayoutError(f"the {CONFIG_KEY!r} entry's labels are not a list of strings")
            config.update({k: tuple(v) if isinstance(v, list) else v for k, v in saved_config.items()})
    except LayoutError as error:
        if source is None:
            raise
        raise LayoutError(f"{source}: {error}") from error
    return Checkpoint(converted, layout, config, labels, notes)


def check_family(checkpoint, family_name, model_name, names_of_family):
    """Raise a :class:`LayoutError` when the checkpoint loads into another model family than ``model_name``'s.

    ``names_of_family(family_name)`` gives {registered name: (family class, arguments)}, to suggest names that fit.
    """
    layout = checkpoint.layout
    if layout.family == family_name:
        return
    guesses = guess_models(checkpoint, names_of_family(layout.family))
    hint = f"; try {', '.join(guesses)}" if guesses else ""
    raise LayoutError(
        f"these weights are {layout.description} (layout {layout.name!r}), which loads into a {layout.family}; "
        f"{model_name!r} is a {family_name}{hint}"
    )


# ---------------------------------------------------------------------------------------------------------------------
# Helpers the converters share
# ---------------------------------------------------------------------------------------------------------------------


def rename(state_dict, rules, drop=()):
    """Apply the first ``(regex, replacement)`` rule that matches the whole key; leave out keys matching a ``drop``
    regex (whole key); keep the name of keys no rule matches (the strict load then reports them).

    ``replacement`` is a ``re.sub`` template or a function of the match.
    """
    compiled = [(re.compile(pattern), replacement) for pattern, replacement in rules]
    dropped = [re.compile(pattern) for pattern in drop]
    out = {}
    for key, value in state_dict.items():
        if any(p.fullmatch(key) for p in dropped):
            continue
        for pattern, replacement in compiled:
            if pattern.fullmatch(key):
                key = pattern.sub(replacement, key)
                break
        if key in out:
            raise LayoutError(f"two checkpoint keys map to the same key {key!r}")
        out[key] = value
    return out


def fuse_qkv(state_dict, q="q", k="k", v="v", qkv="qkv"):
    """Concatenate separate query / key / value Linears into one ``qkv`` Linear, rows ordered q | k | v.

    Every ``<prefix>.{q}.weight`` (and ``.bias``) with its ``{k}`` and ``{v}`` siblings becomes
    ``<prefix>.{qkv}.weight`` = concat([Wq, Wk, Wv], axis 0): the split that timm's
    ``qkv(x).reshape(B, N, 3, heads, head_dim)`` undoes. A missing member leaves the others unfused, for the strict
    load to report.
    """
    out = dict(state_dict)
    for key in state_dict:
        module, _, param = key.rpartition(".")
        parent, _, last = module.rpartition(".")
        if last != q:
            continue
        prefix = parent + "." if parent else ""
        names = [f"{prefix}{part}.{param}" for part in (q, k, v)]
        if all(name in state_dict for name in names):
            out[f"{prefix}{qkv}.{param}"] = np.concatenate([np.asarray(state_dict[name]) for name in names], axis=0)
            for name in names:
                del out[name]
    return out


def strip_prefix(state_dict, prefixes):
    """Remove the first of ``prefixes`` each key starts with (Hugging Face's ``vit.`` / ``deit.`` / ``swin.``)."""
    out = {}
    for key, value in state_dict.items():
        for prefix in prefixes:
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        out[key] = value
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Architecture guesses, Hugging Face config.json, inspection
# ---------------------------------------------------------------------------------------------------------------------

# family name -> function(converted state_dict) -> {constructor argument: value} recoverable from the weights
SIGNATURES = {}
# family name, or layout name for a layout with a config.json of its own -> function(config.json dict) ->
# {constructor argument: value}
HF_CONFIG_READERS = {}


def signature(checkpoint):
    """Constructor arguments the weights themselves fix (embed_dim, depth, patch size, ...) for the layout's family."""
    read = SIGNATURES.get(checkpoint.layout.family)
    return read(checkpoint.state_dict) if read else {}


def guess_models(checkpoint, candidates):
    """Registered names (of ``candidates``: {name: (family class, arguments)}) whose architecture fits the weights.

    Compares what the weights fix (:func:`signature`) with each name's arguments over its family's defaults.
    """
    sig = signature(checkpoint)
    if not sig:
        return []
    fits = []
    for name, (family, arch) in candidates.items():
        full = {**{f.name: getattr(family.Config(), f.name) for f in fields(family.Config)}, **arch}
        if all(same_size(full.get(key), value) for key, value in sig.items()):
            fits.append(name)
    return sorted(fits)


# family name -> the keys of its classifier: what ``create_model(..., num_classes=0)`` leaves out of the weights
CLASSIFIER_KEYS = {
    "VisionTransformer": ("head.weight", "head.bias", "head_dist.weight", "head_dist.bias"),
    "SwinTransformer": ("head.fc.weight", "head.fc.bias"),
    "MobileViT": ("head.fc.weight", "head.fc.bias"),
    "PreNormViT": ("mlp_head.1.weight", "mlp_head.1.bias"),  # mlp_head.0, the LayerNorm before it, stays
    "TorchEncoderViT": ("mlp_head.1.weight", "mlp_head.1.bias"),
    "LucidrainsViT": ("mlp_head.weight", "mlp_head.bias"),
}


def without_classifier(state_dict, family_name):
    """``state_dict`` without the family's classifier keys: the weights of the model built with ``num_classes=0``."""
    dropped = CLASSIFIER_KEYS[family_name]
    return {key: value for key, value in state_dict.items() if key not in dropped}


def same_size(a, b):
    """Whether two architecture values are equal, an int size being the same as the (int, int) pair of it, and two
    ratios (floats) within 1e-4 of each other: registries write an MLP ratio to a few digits (timm's DINOv2 giant
    5.33334, SigLIP so400m 3.7362), the weights give the exact quotient (8192 / 1536, 4304 / 1152)."""
    if isinstance(a, (tuple, list)) or isinstance(b, (tuple, list)):
        a = (a, a) if isinstance(a, int) else a
        b = (b, b) if isinstance(b, int) else b
        return tuple(a) == tuple(b)
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-4)
    return a == b


def hf_config_arguments(layout, hf_config):
    """Constructor arguments from a Hugging Face ``config.json``: the facts the weights cannot give."""
    read = HF_CONFIG_READERS.get(layout.name, HF_CONFIG_READERS.get(layout.family))
    if read is None or not layout.name.startswith("hf-"):
        return {}
    return read(hf_config)


def hf_labels(hf_config, num_classes):
    """``id2label`` as a list by class index, when it names exactly the model's classes."""
    id2label = hf_config.get("id2label")
    if id2label is not None and not isinstance(id2label, dict):
        raise LayoutError(f"config.json field 'id2label' must be an object (index -> label), got {id2label!r:.40}")
    if not id2label or not num_classes or len(id2label) != num_classes:
        return None
    return [id2label.get(str(i), id2label.get(i)) for i in range(num_classes)]


def hf_activation(name):
    acts = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "quick_gelu": "quick_gelu"}
    if not isinstance(name, str) or name not in acts:
        raise LayoutError(f"config.json hidden_act {name!r} is not supported; vitnp has {', '.join(acts)}")
    return acts[name]


def hf_field(hf, name, default, kind=int):
    """config.json's ``name`` (``default`` when absent), checked: ``int`` a positive integer (JSON's true is not),
    ``float`` a finite number above 0, ``bool`` true or false, ``tuple`` a list of positive integers (as a tuple)."""
    value = hf.get(name, default)
    if kind is tuple:
        if isinstance(value, list) and value:
            return tuple(hf_field({name: v}, name, None) for v in value)
        wanted = "a list of positive integers"
    elif kind is bool:
        if isinstance(value, bool):
            return value
        wanted = "true or false"
    else:
        number = numbers.Integral if kind is int else numbers.Real
        if not isinstance(value, bool) and isinstance(value, number) and math.isfinite(value) and value > 0:
            return value
        wanted = "a positive integer" if kind is int else "a number above 0"
    raise LayoutError(f"config.json field {name!r} must be {wanted}, got {value!r:.40}")


def describe(path, names_of_family):
    """What a checkpoint holds, for ``vitnp inspect``: layout, family, architecture, names that fit, parameter count,
    stored dtypes, and what unwrapping did. ``names_of_family(family_name)`` gives {registered name: (family class,
    arguments)} (:func:`vitnp.registry.family_tables`), to say which names fit."""
    from ..weights import read_checkpoint

    raw = read_checkpoint(path)
    dtypes = {}
    for name in raw.dtypes.values():
        dtypes[name] = dtypes.get(name, 0) + 1
    checkpoint = from_raw(raw.state_dict, raw.hf_config, raw.saved_config, source=os.fspath(path))
    candidates = names_of_family(checkpoint.layout.family)
    return {
        "path": str(path),
        "layout": checkpoint.layout.name,
        "description": checkpoint.layout.description,
        "family": checkpoint.layout.family,
        "architecture": signature(checkpoint),
        "config": checkpoint.config,
        "models": guess_models(checkpoint, candidates),
        "num_params": sum(int(np.asarray(v).size) for k, v in checkpoint.state_dict.items() if not _is_buffer(k)),
        "num_tensors": len(raw.state_dict),
        "dtypes": dtypes,
        "labels": len(checkpoint.labels) if checkpoint.labels else 0,
        "notes": checkpoint.notes + (["read config.json"] if raw.hf_config is not None else []),
    }


def _is_buffer(key):
    return key.endswith(("running_mean", "running_var", "num_batches_tracked", "relative_position_index", "attn_mask"))


def export_npz(source, path, check=None):
    """Write any readable checkpoint as an .npz in vitnp's names, with the constructor arguments it fixes.

    ``source`` is a path (.pth, .safetensors, Hugging Face folder, ...) or a state_dict. The .npz loads without
    torch, and ``create_model(name, weights=path)`` rebuilds the same model (eps, heads, labels included).
    The file is written whole beside ``path`` and then renamed to it (:func:`vitnp.weights.save_npz`), so ``path``
    may be the source itself; ``check(written_path)``, when given, runs on the written file before the rename, and an
    error it raises leaves ``path`` as it was. Returns the :class:`Checkpoint` written.
    """
    checkpoint = prepare(source)
    config = dict(checkpoint.config)
    if checkpoint.labels:
        config["labels"] = list(checkpoint.labels)
    save_npz(path, checkpoint.state_dict, config, check=check)
    return checkpoint


def num_blocks(state_dict, prefix):
    return len({k[len(prefix):].split(".")[0] for k in state_dict if k.startswith(prefix)})


def square_img_size(num_patches, patch_size):
    return int(round(num_patches**0.5)) * patch_size


def head_config(key):
    """Config function: num_classes from the head Linear ``key`` (0 when the weights have no head)."""
    def config(state_dict):
        return {"num_classes": int(state_dict[key].shape[0]) if key in state_dict else 0}
    return config
