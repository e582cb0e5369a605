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

The common part is :mod:`vitnp.layouts.core`; each family's layouts are a module of their own here (``vit``,
``dinov2``, ``clip``, ``swin``, ``swinv2``, ``mobilevit``, ``notes``). To add a layout: write its convert function and
``register(Layout(...))`` it in the module of its family. Layouts are tried in registration order (the modules' order
below, then their order inside a module); the first whose sentinel keys are all present wins.
"""

# Importing a family's module registers its layouts, in this order: the order detection tries them in.
from . import eva, vit, dinov2, clip, swin, mobilevit, mobilevitv2, notes, swinv2  # noqa: F401, I001
from .core import (
    CLASSIFIER_KEYS,
    LAYOUTS,
    Checkpoint,
    Layout,
    LayoutError,
    check_family,
    describe,
    detect_layout,
    export_npz,
    find_layout,
    from_raw,
    guess_models,
    prepare,
    register,
    same_size,
    signature,
    to_timm,
    unwrap,
    without_classifier,
)

__all__ = [
    "CLASSIFIER_KEYS", "LAYOUTS", "Checkpoint", "Layout", "LayoutError", "check_family", "describe", "detect_layout",
    "export_npz", "find_layout", "from_raw", "guess_models", "prepare", "register", "same_size", "signature",
    "to_timm", "unwrap", "without_classifier",
]
