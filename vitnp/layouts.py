"""Foreign checkpoint layouts -> vitnp's names (timm's): the one place in vitnp where other naming schemes are mapped.

Every model family keeps one naming: timm's ``state_dict`` names (the notes' own ViTs and lucidrains' keep theirs,
being architectures of their own). A checkpoint written by another codebase is recognised by its *sentinel keys*,
keys only that layout has, and converted by the layout's ``convert`` function: renames, q / k / v concatenated into
qkv, stage indices renumbered, recomputed buffers (relative_position_index, attn_mask) dropped. Converters rename
only the keys they know; any other key keeps its name, so that a strict ``load_state_dict`` reports it as unexpected
instead of it being dropped in silence.

Reading a checkpoint (:func:`prepare`, what ``create_model(name, weights=...)`` does): read the file
(:mod:`vitnp.weights`) -> :func:`unwrap` training wrappers (``teacher`` / ``student`` / ``model`` / ``state_dict``
dicts, ``module.`` and ``backbone.`` prefixes; the DINO projection head is dropped) -> :func:`find_layout` ->
``layout.convert`` -> the constructor arguments the weights fix (``layout.config``: head size, representation layer,
LayerNorm eps, ...) merged with those of a Hugging Face ``config.json`` or of an exported ``.npz``.

To add a layout: write its convert function and ``register(Layout(...))`` it in the section of its family. Layouts
are tried in registration order; the first whose sentinel keys are all present wins.
"""

import re
from dataclasses import dataclass, field, fields

import numpy as np


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


def register(layout):
    """Add a layout to the detection order (after the ones registered before it)."""
    if any(known.name == layout.name for known in LAYOUTS):
        raise ValueError(f"layout {layout.name!r} is registered twice")
    LAYOUTS.append(layout)
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
    from .weights import read_checkpoint, to_arrays

    if isinstance(weights, dict):
        return from_raw(to_arrays(weights))
    raw = read_checkpoint(weights)
    return from_raw(raw.state_dict, raw.hf_config, raw.saved_config)


def from_raw(state_dict, hf_config=None, saved_config=None):
    """Unwrap, detect, convert, and collect the constructor arguments: the weights', config.json's, an export's."""
    state_dict, notes = unwrap(state_dict)
    layout = find_layout(state_dict)
    converted = layout.convert(state_dict)
    config = layout.config(converted) if layout.config else {}
    if any("'teacher'" in note or "'student'" in note or "'backbone.'" in note for note in notes):
        config["pos_embed_resample"] = "dino"  # a DINO training checkpoint: DINO's +0.1 resampler at other sizes
    labels = None
    if hf_config is not None:
        config.update(hf_config_arguments(layout, hf_config))
        labels = _labels(hf_config, config.get("num_classes"))
    if saved_config is not None:
        saved_config = dict(saved_config)
        labels = saved_config.pop("labels", None)
        config.update({k: tuple(v) if isinstance(v, list) else v for k, v in saved_config.items()})
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
# family name -> function(config.json dict) -> {constructor argument: value}
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
        if all(_same(full.get(key), value) for key, value in sig.items()):
            fits.append(name)
    return sorted(fits)


def _same(a, b):
    if isinstance(a, (tuple, list)) or isinstance(b, (tuple, list)):
        a = (a, a) if isinstance(a, int) else a
        b = (b, b) if isinstance(b, int) else b
        return tuple(a) == tuple(b)
    return a == b


def hf_config_arguments(layout, hf_config):
    """Constructor arguments from a Hugging Face ``config.json``: the facts the weights cannot give."""
    read = HF_CONFIG_READERS.get(layout.family)
    if read is None or not layout.name.startswith("hf-"):
        return {}
    return read(hf_config)


def _labels(hf_config, num_classes):
    """``id2label`` as a list by class index, when it names exactly the model's classes."""
    id2label = hf_config.get("id2label")
    if not id2label or not num_classes or len(id2label) != num_classes:
        return None
    return [id2label.get(str(i), id2label.get(i)) for i in range(num_classes)]


def _hf_activation(name):
    acts = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
    if name not in acts:
        raise LayoutError(f"config.json hidden_act {name!r} is not supported; vitnp has {', '.join(acts)}")
    return acts[name]


def describe(path, names_of_family):
    """What a checkpoint holds, for ``vitnp inspect``: layout, family, architecture, names that fit, parameter count,
    stored dtypes, and what unwrapping did. ``names_of_family(family_name)`` gives {registered name: (family class,
    arguments)} (:func:`vitnp.registry.family_tables`), to say which names fit."""
    from .weights import read_checkpoint

    raw = read_checkpoint(path)
    dtypes = {}
    for name in raw.dtypes.values():
        dtypes[name] = dtypes.get(name, 0) + 1
    checkpoint = from_raw(raw.state_dict, raw.hf_config, raw.saved_config)
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


def export_npz(source, path):
    """Write any readable checkpoint as an .npz in vitnp's names, with the constructor arguments it fixes.

    ``source`` is a path (.pth, .safetensors, Hugging Face folder, ...) or a state_dict. The .npz loads without
    torch, and ``create_model(name, weights=path)`` rebuilds the same model (eps, heads, labels included).
    Returns the :class:`Checkpoint` written.
    """
    from .weights import save_npz

    checkpoint = prepare(source)
    config = dict(checkpoint.config)
    if checkpoint.labels:
        config["labels"] = list(checkpoint.labels)
    save_npz(path, checkpoint.state_dict, config)
    return checkpoint


# ---------------------------------------------------------------------------------------------------------------------
# ViT family (vitnp.vit.VisionTransformer): timm, DINO, torchvision, Hugging Face ViT / DeiT
# ---------------------------------------------------------------------------------------------------------------------

_VIT = "VisionTransformer"


def _vit_config(state_dict):
    """Head size and representation layer fixed by timm-named ViT weights."""
    config = {"num_classes": int(state_dict["head.weight"].shape[0]) if "head.weight" in state_dict else 0}
    if "pre_logits.fc.weight" in state_dict:
        config["representation_size"] = int(state_dict["pre_logits.fc.weight"].shape[0])
    return config


def _vit_signature(state_dict):
    """embed_dim, depth, patch size, image size (square grid), mlp_ratio, distilled, from timm-named ViT weights."""
    if "patch_embed.proj.weight" not in state_dict or "pos_embed" not in state_dict:
        return {}
    proj = state_dict["patch_embed.proj.weight"]
    embed_dim, patch = int(proj.shape[0]), int(proj.shape[-1])
    distilled = "dist_token" in state_dict
    prefix = int("cls_token" in state_dict) + int(distilled)
    grid = int(round((state_dict["pos_embed"].shape[1] - prefix) ** 0.5))
    sig = dict(embed_dim=embed_dim, in_chans=int(proj.shape[1]), patch_size=patch,
               depth=len({k.split(".")[1] for k in state_dict if k.startswith("blocks.")}),
               img_size=grid * patch, distilled=distilled)
    if "blocks.0.mlp.fc1.weight" in state_dict:
        sig["mlp_ratio"] = state_dict["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim
    return sig


def _vit_hf_config(hf):
    """timm ViT arguments from a Hugging Face ViT / DeiT config.json (HF's defaults where a field is absent)."""
    hidden = hf.get("hidden_size", 768)
    return dict(
        img_size=hf.get("image_size", 224),
        patch_size=hf.get("patch_size", 16),
        in_chans=hf.get("num_channels", 3),
        embed_dim=hidden,
        depth=hf.get("num_hidden_layers", 12),
        num_heads=hf.get("num_attention_heads", 12),
        mlp_ratio=hf.get("intermediate_size", 4 * hidden) / hidden,
        qkv_bias=hf.get("qkv_bias", True),
        norm_eps=hf.get("layer_norm_eps", 1e-12),
        act=_hf_activation(hf.get("hidden_act", "gelu")),
    )


SIGNATURES[_VIT] = _vit_signature
HF_CONFIG_READERS[_VIT] = _vit_hf_config

register(Layout(
    name="timm-vit",
    description="timm VisionTransformer / DeiT (also the DINO and DeiT releases)",
    family=_VIT,
    sentinels=(("patch_embed.proj.weight", "blocks.0.attn.qkv.weight"),),
    convert=dict,
    config=_vit_config,
))


def _torchvision_vit(state_dict):
    """torchvision ``VisionTransformer`` (vit_b_16 ... vit_h_14): renames only; ``in_proj`` is already q | k | v;
    ``heads.pre_logits`` (Linear + Tanh, the representation layer) is ``pre_logits.fc``."""
    block = r"encoder\.layers\.encoder_layer_(\d+)\."
    return rename(state_dict, [
        (r"class_token", "cls_token"),
        (r"conv_proj\.(weight|bias)", r"patch_embed.proj.\1"),
        (r"encoder\.pos_embedding", "pos_embed"),
        (block + r"ln_1\.(weight|bias)", r"blocks.\1.norm1.\2"),
        (block + r"self_attention\.in_proj_(weight|bias)", r"blocks.\1.attn.qkv.\2"),
        (block + r"self_attention\.out_proj\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
        (block + r"ln_2\.(weight|bias)", r"blocks.\1.norm2.\2"),
        (block + r"mlp\.(?:0|linear_1)\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),  # linear_1: torchvision < 0.13
        (block + r"mlp\.(?:3|linear_2)\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
        (r"encoder\.ln\.(weight|bias)", r"norm.\1"),
        (r"heads\.pre_logits\.(weight|bias)", r"pre_logits.fc.\1"),
        (r"heads\.head\.(weight|bias)", r"head.\1"),
    ])


register(Layout(
    name="torchvision-vit",
    description="torchvision VisionTransformer (vit_b_16, vit_b_32, vit_l_16, vit_l_32, vit_h_14)",
    family=_VIT,
    sentinels=(("conv_proj.weight", "encoder.layers.encoder_layer_0.self_attention.in_proj_weight"),),
    convert=_torchvision_vit,
    config=_vit_config,
))


def _hf_vit(state_dict):
    """Hugging Face ViT / DeiT, 5.x ``state_dict`` names and 4.x / Hub (``save_pretrained``) names.

    q, k, v Linears are concatenated into qkv; ``pooler.dense`` (ViTModel: Linear + Tanh on the class token) is the
    representation layer ``pre_logits.fc``; DeiT's ``cls_classifier`` / ``distillation_classifier`` are
    ``head`` / ``head_dist``.
    """
    state_dict = strip_prefix(state_dict, ("vit.", "deit."))
    new = r"layers\.(\d+)\."  # 5.x
    old = r"encoder\.layer\.(\d+)\."  # 4.x, Hub files
    state_dict = rename(state_dict, [
        (r"embeddings\.cls_token", "cls_token"),
        (r"embeddings\.distillation_token", "dist_token"),
        (r"embeddings\.position_embeddings", "pos_embed"),
        (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"patch_embed.proj.\1"),
        (rf"(?:{new}|{old})layernorm_before\.(weight|bias)", r"blocks.\1\2.norm1.\3"),
        (rf"(?:{new}|{old})layernorm_after\.(weight|bias)", r"blocks.\1\2.norm2.\3"),
        (new + r"attention\.(q|k|v)_proj\.(weight|bias)", r"blocks.\1.attn.\2.\3"),
        (old + r"attention\.attention\.(q)uery\.(weight|bias)", r"blocks.\1.attn.\2.\3"),
        (old + r"attention\.attention\.(k)ey\.(weight|bias)", r"blocks.\1.attn.\2.\3"),
        (old + r"attention\.attention\.(v)alue\.(weight|bias)", r"blocks.\1.attn.\2.\3"),
        (rf"(?:{new}attention\.o_proj|{old}attention\.output\.dense)\.(weight|bias)", r"blocks.\1\2.attn.proj.\3"),
        (rf"(?:{new}mlp\.fc1|{old}intermediate\.dense)\.(weight|bias)", r"blocks.\1\2.mlp.fc1.\3"),
        (rf"(?:{new}mlp\.fc2|{old}output\.dense)\.(weight|bias)", r"blocks.\1\2.mlp.fc2.\3"),
        (r"layernorm\.(weight|bias)", r"norm.\1"),
        (r"pooler\.dense\.(weight|bias)", r"pre_logits.fc.\1"),
        (r"(?:classifier|cls_classifier)\.(weight|bias)", r"head.\1"),
        (r"distillation_classifier\.(weight|bias)", r"head_dist.\1"),
    ])
    return fuse_qkv(state_dict)


def _hf_vit_config(state_dict):
    """As for timm names, with Hugging Face ViT's LayerNorm eps (1e-12) unless a config.json says otherwise, and
    its size-based bicubic position-embedding resampler (``interpolate_pos_encoding``)."""
    return {**_vit_config(state_dict), "norm_eps": 1e-12, "pos_embed_resample": "hf"}


register(Layout(
    name="hf-vit",
    description="Hugging Face ViTModel / ViTForImageClassification / DeiT (4.x Hub or 5.x names)",
    family=_VIT,
    sentinels=tuple(
        (f"{prefix}{key}",)
        for prefix in ("vit.", "deit.", "")
        for key in ("layers.0.attention.q_proj.weight", "encoder.layer.0.attention.attention.query.weight")
    ),
    convert=_hf_vit,
    config=_hf_vit_config,
))


# ---------------------------------------------------------------------------------------------------------------------
# Swin family (vitnp.swin.SwinTransformer): timm, seed 004, original microsoft Swin, torchvision, Hugging Face Swin
# ---------------------------------------------------------------------------------------------------------------------

_SWIN = "SwinTransformer"
_SWIN_BUFFERS = (r".*\.relative_position_index", r".*\.attn_mask")  # recomputed by vitnp, never loaded


def _swin_config(state_dict):
    """Head size, and whether PatchMerging's reduction has a bias (seed 004's has, timm's has not)."""
    config = {"num_classes": int(state_dict["head.fc.weight"].shape[0]) if "head.fc.weight" in state_dict else 0}
    if any(k.endswith(".downsample.reduction.bias") for k in state_dict):
        config["downsample_bias"] = True
    return config


def _swin_signature(state_dict):
    """embed_dim, patch size, depths, heads and window per stage (from the bias tables)."""
    if "patch_embed.proj.weight" not in state_dict:
        return {}
    proj = state_dict["patch_embed.proj.weight"]
    stages = sorted({int(k.split(".")[1]) for k in state_dict if k.startswith("layers.") and ".blocks." in k})
    depths, heads, windows = [], [], []
    for s in stages:
        depths.append(len({k.split(".")[3] for k in state_dict if k.startswith(f"layers.{s}.blocks.")}))
        table = state_dict[f"layers.{s}.blocks.0.attn.relative_position_bias_table"]
        heads.append(int(table.shape[1]))
        windows.append((int(round(table.shape[0] ** 0.5)) + 1) // 2)
    sig = dict(embed_dim=int(proj.shape[0]), in_chans=int(proj.shape[1]), patch_size=int(proj.shape[-1]),
               depths=tuple(depths), num_heads=tuple(heads))
    if len(set(windows)) == 1:  # a window clamped to a small last stage has a smaller table: no single window then
        sig["window_size"] = windows[0]
    return sig


def _swin_hf_config(hf):
    """timm Swin arguments from a Hugging Face Swin config.json (HF's defaults where a field is absent)."""
    if hf.get("use_absolute_embeddings"):
        raise LayoutError(
            "config.json sets use_absolute_embeddings: Swin with absolute position embeddings is not supported"
        )
    return dict(
        img_size=hf.get("image_size", 224),
        patch_size=hf.get("patch_size", 4),
        in_chans=hf.get("num_channels", 3),
        embed_dim=hf.get("embed_dim", 96),
        depths=tuple(hf.get("depths", (2, 2, 6, 2))),
        num_heads=tuple(hf.get("num_heads", (3, 6, 12, 24))),
        window_size=hf.get("window_size", 7),
        mlp_ratio=hf.get("mlp_ratio", 4.0),
        qkv_bias=hf.get("qkv_bias", True),
        norm_eps=hf.get("layer_norm_eps", 1e-5),
    )


SIGNATURES[_SWIN] = _swin_signature
HF_CONFIG_READERS[_SWIN] = _swin_hf_config


def _merging_to_next_stage(match):
    """PatchMerging at the end of stage i (original, seed 004, Hugging Face) is at the start of stage i + 1 in timm."""
    return f"layers.{int(match[1]) + 1}.downsample.{match[2]}"


# --- seed 004 Swin (the blog's ``Swin`` class) -----------------------------------------------------------------------
# patch_embedding.{patch_embed,norm}, stages.{s}.blocks.{b}.{attn_norm,attn,mlp_norm,mlp}, stages.{s}.patch_merging
# (PatchMerging at the END of stages 0..S-2, where timm has it at the START of stages 1..S-1), norm, fc.
# Its PatchMerging.reduction is nn.Linear(4C, 2C) with the default bias=True: the layout's config sets
# downsample_bias=True (timm's reduction has no bias).

_SEED004_SWIN_RULES = [
    (r"patch_embedding\.patch_embed\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"patch_embedding\.norm\.(weight|bias)", r"patch_embed.norm.\1"),
    (r"stages\.(\d+)\.blocks\.(\d+)\.attn_norm\.(weight|bias)", r"layers.\1.blocks.\2.norm1.\3"),
    (r"stages\.(\d+)\.blocks\.(\d+)\.mlp_norm\.(weight|bias)", r"layers.\1.blocks.\2.norm2.\3"),
    (r"stages\.(\d+)\.blocks\.(\d+)\.(attn|mlp)\.(.+)", r"layers.\1.blocks.\2.\3.\4"),
    (r"stages\.(\d+)\.patch_merging\.(.+)", _merging_to_next_stage),
    (r"fc\.(weight|bias)", r"head.fc.\1"),
]


def seed004_swin_to_timm(state_dict):
    """Rename seed 004 ``Swin`` keys to timm ``SwinTransformer`` keys and drop its mask / index buffers.

    ``stages.{s}.patch_merging.*`` becomes ``layers.{s+1}.downsample.*`` and ``fc.*`` becomes ``head.fc.*``; the other
    renames are one-to-one (attn_norm -> norm1, mlp_norm -> norm2). No weight is transposed or permuted: the 2x2
    concatenation order of PatchMerging and the qkv row order are the same as timm's.
    """
    return rename(state_dict, _SEED004_SWIN_RULES, drop=_SWIN_BUFFERS)


register(Layout(
    name="seed004_swin",
    description="seed 004 blog Swin (patch_embedding / stages / patch_merging / fc)",
    family=_SWIN,
    sentinels=(("patch_embedding.patch_embed.weight", "stages.0.blocks.0.attn_norm.weight"),),
    convert=seed004_swin_to_timm,
    config=_swin_config,
))


# --- original microsoft/Swin-Transformer, torchvision, Hugging Face ---------------------------------------------------


def _original_swin(state_dict):
    """microsoft/Swin-Transformer: timm's names but merging at stage end, ``head`` for ``head.fc``, saved buffers."""
    return rename(state_dict, [
        (r"layers\.(\d+)\.downsample\.(.+)", _merging_to_next_stage),
        (r"head\.(weight|bias)", r"head.fc.\1"),
    ], drop=_SWIN_BUFFERS)


def _torchvision_swin(state_dict):
    """torchvision ``SwinTransformer`` (swin_t / swin_s / swin_b): ``features.0`` patch embedding, ``features.{2s+1}``
    the blocks of stage s, ``features.{2s}`` the merging layer before stage s; relative_position_index dropped."""
    def block(m, rest):
        return f"layers.{(int(m[1]) - 1) // 2}.blocks.{m[2]}.{rest}"

    return rename(state_dict, [
        (r"features\.0\.0\.(weight|bias)", r"patch_embed.proj.\1"),
        (r"features\.0\.2\.(weight|bias)", r"patch_embed.norm.\1"),
        (r"features\.(\d+)\.(\d+)\.mlp\.0\.(weight|bias)", lambda m: block(m, f"mlp.fc1.{m[3]}")),
        (r"features\.(\d+)\.(\d+)\.mlp\.3\.(weight|bias)", lambda m: block(m, f"mlp.fc2.{m[3]}")),
        (r"features\.(\d+)\.(\d+)\.(norm1|norm2|attn)\.(.+)", lambda m: block(m, f"{m[3]}.{m[4]}")),
        (r"features\.(\d+)\.(reduction|norm)\.(weight|bias)",
         lambda m: f"layers.{int(m[1]) // 2}.downsample.{m[2]}.{m[3]}"),
        (r"head\.(weight|bias)", r"head.fc.\1"),
    ], drop=_SWIN_BUFFERS)


def _hf_swin(state_dict):
    """Hugging Face SwinModel / SwinForImageClassification, 5.x and 4.x / Hub names; q, k, v fused into qkv."""
    state_dict = strip_prefix(state_dict, ("swin.",))
    block = r"encoder\.layers\.(\d+)\.blocks\.(\d+)\."
    to = r"layers.\1.blocks.\2."
    state_dict = rename(state_dict, [
        (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"patch_embed.proj.\1"),
        (r"embeddings\.norm\.(weight|bias)", r"patch_embed.norm.\1"),
        (block + r"layernorm_before\.(weight|bias)", to + r"norm1.\3"),
        (block + r"layernorm_after\.(weight|bias)", to + r"norm2.\3"),
        (block + r"attention\.(q|k|v)_proj\.(weight|bias)", to + r"attn.\3.\4"),
        (block + r"attention\.self\.(q)uery\.(weight|bias)", to + r"attn.\3.\4"),
        (block + r"attention\.self\.(k)ey\.(weight|bias)", to + r"attn.\3.\4"),
        (block + r"attention\.self\.(v)alue\.(weight|bias)", to + r"attn.\3.\4"),
        (block + r"attention\.(?:relative_position_bias|self)\.relative_position_bias_table",
         to + "attn.relative_position_bias_table"),
        (block + r"attention\.(?:o_proj|output\.dense)\.(weight|bias)", to + r"attn.proj.\3"),
        (block + r"(?:mlp\.fc1|intermediate\.dense)\.(weight|bias)", to + r"mlp.fc1.\3"),
        (block + r"(?:mlp\.fc2|output\.dense)\.(weight|bias)", to + r"mlp.fc2.\3"),
        (r"encoder\.layers\.(\d+)\.downsample\.(.+)", _merging_to_next_stage),
        (r"layernorm\.(weight|bias)", r"norm.\1"),
        (r"classifier\.(weight|bias)", r"head.fc.\1"),
    ], drop=_SWIN_BUFFERS)
    return fuse_qkv(state_dict)


register(Layout(
    name="original-swin",
    description="original microsoft/Swin-Transformer checkpoint",
    family=_SWIN,
    sentinels=(("layers.0.blocks.0.attn.relative_position_bias_table", "layers.0.downsample.reduction.weight"),),
    convert=_original_swin,
    config=_swin_config,
))

register(Layout(
    name="timm-swin",
    description="timm SwinTransformer",
    family=_SWIN,
    sentinels=(("patch_embed.proj.weight", "layers.0.blocks.0.attn.relative_position_bias_table"),),
    convert=dict,
    config=_swin_config,
))

register(Layout(
    name="torchvision-swin",
    description="torchvision SwinTransformer (swin_t, swin_s, swin_b)",
    family=_SWIN,
    sentinels=(("features.0.0.weight", "features.1.0.attn.relative_position_bias_table"),),
    convert=_torchvision_swin,
    config=_swin_config,
))

register(Layout(
    name="hf-swin",
    description="Hugging Face SwinModel / SwinForImageClassification (4.x Hub or 5.x names)",
    family=_SWIN,
    sentinels=tuple(
        (f"{prefix}encoder.layers.0.blocks.0.attention.{key}",)
        for prefix in ("swin.", "")
        for key in ("q_proj.weight", "self.query.weight")
    ),
    convert=_hf_swin,
    config=_swin_config,
))


# ---------------------------------------------------------------------------------------------------------------------
# MobileViT family (vitnp.mobilevit.MobileViT): timm, Hugging Face MobileViTForImageClassification
# ---------------------------------------------------------------------------------------------------------------------

_MOBILEVIT = "MobileViT"


def _mobilevit_config(state_dict):
    """Head size fixed by timm-named MobileViT weights."""
    return {"num_classes": int(state_dict["head.fc.weight"].shape[0]) if "head.fc.weight" in state_dict else 0}


def _mobilevit_signature(state_dict):
    """Channel widths, transformer widths / depths and MV2 expansion, from timm-named MobileViT weights."""
    if "stem.conv.weight" not in state_dict or "final_conv.conv.weight" not in state_dict:
        return {}
    stage_chs, dims, depths = [], [], []
    for s in range(5):
        last = max(int(k.split(".")[2]) for k in state_dict if k.startswith(f"stages.{s}."))
        block = f"stages.{s}.{last}."
        if block + "conv_1x1.weight" in state_dict:
            stage_chs.append(int(state_dict[block + "conv_fusion.conv.weight"].shape[0]))
            dims.append(int(state_dict[block + "conv_1x1.weight"].shape[0]))
            depths.append(len({k.split(".")[4] for k in state_dict if k.startswith(block + "transformer.")}))
        else:
            stage_chs.append(int(state_dict[block + "conv3_1x1.conv.weight"].shape[0]))
    stem = state_dict["stem.conv.weight"]
    expand = state_dict["stages.1.0.conv1_1x1.conv.weight"]
    return dict(
        in_chans=int(stem.shape[1]),
        stem_chs=int(stem.shape[0]),
        stage_chs=tuple(stage_chs),
        transformer_dims=tuple(dims),
        transformer_depths=tuple(depths),
        bottle_ratio=int(expand.shape[0]) / int(expand.shape[1]),
        num_features=int(state_dict["final_conv.conv.weight"].shape[0]),
    )


def _mobilevit_hf_config(hf):
    """What a Hugging Face MobileViT config.json may set beyond the registry name's (fixed) architecture."""
    if hf.get("hidden_act", "silu") != "silu":
        raise LayoutError(f"config.json hidden_act {hf['hidden_act']!r}: vitnp's MobileViT uses silu")
    size = hf.get("image_size", 256)
    return dict(in_chans=hf.get("num_channels", 3), img_size=(size, size))


SIGNATURES[_MOBILEVIT] = _mobilevit_signature
HF_CONFIG_READERS[_MOBILEVIT] = _mobilevit_hf_config


def _hf_mobilevit(state_dict):
    """Hugging Face MobileViTForImageClassification / MobileViTModel (5.x names are the Hub names).

    ``encoder.layer.{s}.layer.{b}`` are the MV2 blocks of stages 0-1, ``downsampling_layer`` the first (MV2) block of
    stages 2-4 and the rest of ``encoder.layer.{s}`` its MobileViT block; ``convolution`` / ``normalization`` are
    timm's ``conv`` / ``bn``; query / key / value are fused into qkv.
    """
    state_dict = strip_prefix(state_dict, ("mobilevit.",))
    layer = r"encoder\.layer\.(\d+)\."
    transformer = layer + r"transformer\.layer\.(\d+)\."
    mv2 = {"expand_1x1": "conv1_1x1", "conv_3x3": "conv2_kxk", "reduce_1x1": "conv3_1x1"}
    state_dict = rename(state_dict, [
        (r"conv_stem\.(.+)", r"stem.\1"),
        (layer + r"layer\.(\d+)\.(expand_1x1|conv_3x3|reduce_1x1)\.(.+)",
         lambda m: f"stages.{m[1]}.{m[2]}.{mv2[m[3]]}.{m[4]}"),
        (layer + r"downsampling_layer\.(expand_1x1|conv_3x3|reduce_1x1)\.(.+)",
         lambda m: f"stages.{m[1]}.0.{mv2[m[2]]}.{m[3]}"),
        (layer + r"conv_kxk\.(.+)", r"stages.\1.1.conv_kxk.\2"),
        (layer + r"conv_1x1\.convolution\.weight", r"stages.\1.1.conv_1x1.weight"),
        (transformer + r"layernorm_before\.(weight|bias)", r"stages.\1.1.transformer.\2.norm1.\3"),
        (transformer + r"layernorm_after\.(weight|bias)", r"stages.\1.1.transformer.\2.norm2.\3"),
        (transformer + r"attention\.attention\.(q)uery\.(weight|bias)", r"stages.\1.1.transformer.\2.attn.\3.\4"),
        (transformer + r"attention\.attention\.(k)ey\.(weight|bias)", r"stages.\1.1.transformer.\2.attn.\3.\4"),
        (transformer + r"attention\.attention\.(v)alue\.(weight|bias)", r"stages.\1.1.transformer.\2.attn.\3.\4"),
        (transformer + r"attention\.output\.dense\.(weight|bias)", r"stages.\1.1.transformer.\2.attn.proj.\3"),
        (transformer + r"intermediate\.dense\.(weight|bias)", r"stages.\1.1.transformer.\2.mlp.fc1.\3"),
        (transformer + r"output\.dense\.(weight|bias)", r"stages.\1.1.transformer.\2.mlp.fc2.\3"),
        (layer + r"layernorm\.(weight|bias)", r"stages.\1.1.norm.\2"),
        (layer + r"conv_projection\.(.+)", r"stages.\1.1.conv_proj.\2"),
        (layer + r"fusion\.(.+)", r"stages.\1.1.conv_fusion.\2"),
        (r"conv_1x1_exp\.(.+)", r"final_conv.\1"),
        (r"classifier\.(weight|bias)", r"head.fc.\1"),
    ])
    state_dict = rename(state_dict, [
        (r"(.+)\.convolution\.weight", r"\1.conv.weight"),
        (r"(.+)\.normalization\.(.+)", r"\1.bn.\2"),
    ])
    return fuse_qkv(state_dict)


register(Layout(
    name="timm-mobilevit",
    description="timm MobileViT (mobilevit_xxs / xs / s)",
    family=_MOBILEVIT,
    sentinels=(("stem.conv.weight", "stages.2.1.transformer.0.attn.qkv.weight"),),
    convert=dict,
    config=_mobilevit_config,
))

register(Layout(
    name="hf-mobilevit",
    description="Hugging Face MobileViTForImageClassification / MobileViTModel",
    family=_MOBILEVIT,
    sentinels=(("mobilevit.conv_stem.convolution.weight",), ("conv_stem.convolution.weight",)),
    convert=_hf_mobilevit,
    config=_mobilevit_config,
))


# ---------------------------------------------------------------------------------------------------------------------
# The notes' hand-built ViTs and lucidrains vit_pytorch.ViT (vitnp.notes_vit): own architectures, own names
# ---------------------------------------------------------------------------------------------------------------------


def _num_blocks(state_dict, prefix):
    return len({k[len(prefix):].split(".")[0] for k in state_dict if k.startswith(prefix)})


def _square_img_size(num_patches, patch_size):
    return int(round(num_patches**0.5)) * patch_size


def _head_config(key):
    """Config function: num_classes from the head Linear ``key`` (0 when the weights have no head)."""
    def config(state_dict):
        return {"num_classes": int(state_dict[key].shape[0]) if key in state_dict else 0}
    return config


def _prenorm_signature(state_dict):
    conv = state_dict["patchembedding.patch_embedding.weight"]
    patch = int(conv.shape[-1])
    return dict(
        in_chans=int(conv.shape[1]),
        patch_size=patch,
        embed_dim=int(state_dict["patchembedding.linear.weight"].shape[0]),
        depth=_num_blocks(state_dict, "transformer.layers."),
        mlp_hidden_dim=int(state_dict["transformer.layers.0.1.fn.net.0.weight"].shape[0]),
        img_size=_square_img_size(state_dict["patchembedding.pos_embedding"].shape[1] - 1, patch),
    )


def _torch_encoder_signature(state_dict):
    conv = state_dict["embedding_block.patcher.0.weight"]
    patch, dim = int(conv.shape[-1]), int(conv.shape[0])
    return dict(
        in_chans=int(conv.shape[1]),
        patch_size=patch,
        embed_dim=dim,
        depth=_num_blocks(state_dict, "encoder_blocks.layers."),
        mlp_ratio=state_dict["encoder_blocks.layers.0.linear1.weight"].shape[0] / dim,
        img_size=_square_img_size(state_dict["embedding_block.position_embedding"].shape[1] - 1, patch),
    )


def _lucidrains_config(state_dict):
    """Head size, and the pooling: vit_pytorch 1.26 keeps a class token only for pool='cls'."""
    return {**_head_config("mlp_head.weight")(state_dict),
            "pool": "cls" if state_dict["cls_token"].shape[0] else "mean"}


def _lucidrains_signature(state_dict):
    return dict(
        embed_dim=int(state_dict["to_patch_embedding.2.weight"].shape[0]),
        depth=_num_blocks(state_dict, "transformer.layers."),
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
    config=_head_config("mlp_head.1.weight"),
))

register(Layout(
    name="notes-torch-encoder-vit",
    description="the notes' nn.TransformerEncoder ViT (seed 003)",
    family="TorchEncoderViT",
    sentinels=(("embedding_block.patcher.0.weight", "encoder_blocks.layers.0.self_attn.in_proj_weight"),),
    convert=dict,
    config=_head_config("mlp_head.1.weight"),
))

register(Layout(
    name="lucidrains-vit",
    description="lucidrains vit_pytorch.ViT",
    family="LucidrainsViT",
    sentinels=(("to_patch_embedding.2.weight", "transformer.layers.0.0.to_qkv.weight"),),
    convert=dict,
    config=_lucidrains_config,
))
