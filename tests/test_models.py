"""The contract of every registered name, and of the backends.

- Every name of ``vitnp.list_models()``, built at its registered configuration on each backend, gives its PyTorch
  twin's output (logits, or the pooled features of a headless model) on a random image, float32 with the 'model'
  tolerance of tests/tolerances.py, and float64 too except for the largest models listed in ``FLOAT32_ONLY``. The
  twin has random weights from ``oracles.randomise_`` and vitnp loads its state_dict. A name without a known twin
  fails: no registered name goes unchecked. The names in ``TOO_BIG_TO_RUN`` (a forward of 100 GFLOP or more) are
  checked by configuration and parameter count, and run small, in tests/test_vit_modern.py.
- ``create_model(backend=...)``, ``VITNP_BACKEND``, ``model.set_backend``: the backend is the one asked for, in every
  module, its ops are the ones that run, and the two backends give the same numbers.
"""

import functools
import pickle

import numpy as np
import pytest
from oracles import (
    BACKENDS,
    DIGITS_TIMM_KWARGS,
    images,
    in_dtype,
    materialise,
    needs,
    numpy_state,
    random_state,
    run,
    timm_model,
    with_vitnp_rope_table,
)
from tolerances import assert_close

import vitnp
from vitnp import backends
from vitnp.fast import ops as fast_ops
from vitnp.reference import ops as reference_ops

NAMES = vitnp.list_models()

# Compared in float32 only (on both backends), to keep this file's run short: in float64 each of these would add
# 10-30 s and 5-15 GB of memory (torch's copy, vitnp's, the fast backend's packed weights). Their float64 arithmetic
# is the code of the smaller models of their family, compared in float64 here and in test_vit.py / test_swin.py.
FLOAT32_ONLY = {
    "vit_huge_patch14_224": "632M parameters",
    "vit_large_patch16_224": "304M parameters",
    "vit_large_patch32_224": "306M parameters",
    "swin_large_patch4_window12_384": "197M parameters, 384x384",
    "swinv2_base_window8_256": "88M parameters, 256x256",
    "swinv2_base_window16_256": "88M parameters, 256x256",
    "swinv2_base_window12to16_192to256": "88M parameters, 256x256",
    "swinv2_large_window12to24_192to384": "197M parameters, 384x384",
    "swinv2_base_window12to24_192to384": "88M parameters, 384x384",
    "swinv2_large_window12_192": "197M parameters",
    "swinv2_large_window12to16_192to256": "197M parameters, 256x256",
    "vit_small_patch14_dinov2": "518x518: 1370 tokens",
    "vit_small_patch14_reg4_dinov2": "518x518: 1374 tokens",
}

# Not run at their registered size at all: one forward is 100 GFLOP to several TFLOP (DINOv2 at 518x518, up to 1.1e9
# parameters, 4.5 GB in float32). tests/test_vit_modern.py checks their configs and parameter counts against timm and
# runs each kind (registers, LayerScale, SwiGLU, QuickGELU, the MAP head, DeiT III) small, from timm's weights.
TOO_BIG_TO_RUN = {
    **{f"vit_{size}_patch14_{kind}dinov2": "518x518" for size in ("base", "large", "giant") for kind in ("", "reg4_")},
    "vit_large_patch14_clip_224": "304M parameters", "vit_large_patch14_clip_quickgelu_224": "304M parameters",
    "vit_so400m_patch14_siglip_224": "428M parameters", "vit_base_patch16_siglip_256": "vit_base_patch16_siglip_224",
    "vit_base_patch16_siglip_384": "vit_base_patch16_siglip_224 at 384x384",
    "deit3_small_patch16_384": "384x384", "deit3_base_patch16_384": "384x384", "deit3_large_patch16_224": "304M",
    "deit3_large_patch16_384": "304M parameters, 384x384",
}  # fmt: skip

# DINO's hubconf names are timm's ViT of the same size without a head. (DINO's +0.1 bicubic position-embedding
# resampler only acts at other image sizes: tests/test_dino.py compares it with DINO's own code.)
DINO_TWINS = {
    "dino_vit_tiny": "vit_tiny_patch16_224",
    "dino_vits16": "vit_small_patch16_224",
    "dino_vits8": "vit_small_patch8_224",
    "dino_vitb16": "vit_base_patch16_224",
    "dino_vitb8": "vit_base_patch8_224",
}

pytestmark = pytest.mark.filterwarnings("ignore:enable_nested_tensor is True")  # seed 003's nn.TransformerEncoder


def _meta(build):
    """``build()`` on torch's meta device, then on the CPU with random weights (:func:`oracles.materialise`)."""
    import torch

    with torch.device("meta"):
        return materialise(build())


def _notes_builders():
    """{name: (builder of the PyTorch model, input shape)} of the notes' models: their posts' PyTorch code
    (tests/test_notes_vit.py) and vit_pytorch, at the registered defaults, which are the posts' examples."""
    from test_notes_vit import VIT, ViT

    vit_pytorch = pytest.importorskip("vit_pytorch")
    return {
        "notes_prenorm_vit_patch32_256": (VIT, (3, 256, 256)),  # seed 000's defaults
        "notes_torch_encoder_vit_patch7_28": (lambda: ViT(28, 1, 100, 7, 1, 1, 1, 10, 4, 0.1), (1, 28, 28)),
        "lucidrains_vit_patch32_256": (  # the vit_pytorch README example
            lambda: vit_pytorch.ViT(image_size=256, patch_size=32, num_classes=1000, dim=1024, depth=6, heads=16,
                                    mlp_dim=2048), (3, 256, 256)),
        "lucidrains_vit_base_patch16_224": (  # ViT-B/16 sizes
            lambda: vit_pytorch.ViT(image_size=224, patch_size=16, num_classes=1000, dim=768, depth=12, heads=12,
                                    mlp_dim=3072, dim_head=64), (3, 224, 224)),
    }  # fmt: skip


@functools.lru_cache(maxsize=1)  # both backends (and the float64 copy) of a name use one twin; one alive at a time
def _twin(name):
    """(PyTorch twin of the registered name with random float32 weights, its (C, H, W) input shape)."""
    import timm
    from timm.models.vision_transformer import VisionTransformer

    if name in DINO_TWINS:
        return timm_model(DINO_TWINS[name], num_classes=0), (3, 224, 224)
    if name == "vit_digits_patch4_32":
        return _meta(lambda: VisionTransformer(**DIGITS_TIMM_KWARGS)), (1, 32, 32)
    if name.startswith(("notes_", "lucidrains_")):
        builders = _notes_builders()
        if name in builders:
            build, shape = builders[name]
            return _meta(build), shape
    elif timm.is_model(name):
        twin = timm_model(name)
        return twin, tuple(twin.pretrained_cfg["input_size"])
    raise AssertionError(f"{name} is registered but has no PyTorch twin here: add one to tests/test_models.py")


@functools.lru_cache(maxsize=1)
def _expected(name, dtype_name):
    """(twin's state_dict as NumPy, input batch of one image, twin's output) in ``dtype_name``."""
    twin, shape = _twin(name)
    twin = in_dtype(twin, dtype_name)
    if dtype_name == "float64" and getattr(twin, "rope", None) is not None:  # EVA-02: float32 rotary tables, an ulp
        twin = with_vitnp_rope_table(twin)  # apart here and there (oracles.with_vitnp_rope_table)
    x = images((1, *shape), dtype_name, seed=0)
    return numpy_state(twin), x, run(twin, x)


def _contract_cases():
    for name in (name for name in NAMES if name not in TOO_BIG_TO_RUN):
        for dtype in (np.float32, np.float64):
            if dtype == np.float64 and name in FLOAT32_ONLY:
                continue
            for backend in BACKENDS:  # the innermost loop: the two backends of a case share its twin
                yield pytest.param(name, dtype, backend, id=f"{name}-{np.dtype(dtype).name}-{backend}")


@needs("torch", "timm")
@pytest.mark.parametrize("name, dtype, backend", list(_contract_cases()))
def test_registered_model_matches_its_torch_twin(name, dtype, backend):
    state, x, expected = _expected(name, np.dtype(dtype).name)
    model = vitnp.create_model(name, weights=state, dtype=dtype, backend=backend)
    assert model.backend == backend
    actual = model(x)
    assert actual.dtype == dtype
    assert np.abs(expected).max() > 0.1  # random weights give outputs O(1): there is something to compare
    assert_close(actual, expected, "model")


def test_the_tables_here_follow_the_registry():
    """A renamed or removed model does not leave a stale entry that silently compares nothing."""
    assert set(FLOAT32_ONLY) <= set(NAMES), sorted(set(FLOAT32_ONLY) - set(NAMES))
    assert set(TOO_BIG_TO_RUN) <= set(NAMES), sorted(set(TOO_BIG_TO_RUN) - set(NAMES))
    assert set(DINO_TWINS) == set(vitnp.vit.DINO_MODELS)


# ---------------------------------------------------------------------------------------------------- backends

# One small configuration of each model family (the registered defaults are compared with torch above).
SMALL = {
    "deit_tiny_distilled_patch16_224": dict(img_size=32, patch_size=8, depth=2),
    "swin_tiny_patch4_window7_224": dict(img_size=64, embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=4),
    "swinv2_tiny_window8_256": dict(img_size=64, embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=4),
    "eva02_base_patch14_224": dict(img_size=28, embed_dim=32, depth=2, num_heads=2),
    "mobilevit_xxs": dict(img_size=64),
    "mobilevitv2_050": dict(img_size=64),
    "notes_prenorm_vit_patch32_256": dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, head_dim=16,
                                          mlp_hidden_dim=48),
    "notes_torch_encoder_vit_patch7_28": dict(depth=2, num_heads=2),
    "lucidrains_vit_patch32_256": dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, head_dim=16,
                                       mlp_dim=48),
}  # fmt: skip


def _small(name, backend, dtype=np.float32):
    """The small model of ``name`` with random values for every parameter (``oracles.random_state``)."""
    state = random_state(vitnp.create_model(name, **SMALL[name]).state_dict(), seed=3)
    return vitnp.create_model(name, weights=state, dtype=dtype, backend=backend, **SMALL[name])


def _input(model, dtype=np.float32, batch=2):
    return images((batch, model.in_chans, *model.img_size), dtype, seed=1)


def test_the_backends_are_fast_and_reference():
    assert backends.BACKENDS == BACKENDS


def test_each_family_is_in_the_small_configurations():
    families = {type(vitnp.create_model(name, **SMALL[name])).__name__ for name in SMALL}
    registered = {family.__name__ for family, _ in vitnp.registry._FAMILIES}
    assert families == registered


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", SMALL)
def test_create_model_puts_every_module_on_the_backend(name, backend):
    model = _small(name, backend)
    assert model.backend == backend
    assert {module.backend for _, module in model.named_modules()} == {backend}


def test_the_default_backend_is_fast(monkeypatch):
    monkeypatch.delenv("VITNP_BACKEND", raising=False)
    assert vitnp.create_model("vit_tiny_patch16_224", depth=1).backend == "fast"


@pytest.mark.parametrize("backend", BACKENDS)
def test_vitnp_backend_sets_the_default(monkeypatch, backend):
    monkeypatch.setenv("VITNP_BACKEND", backend)
    model = vitnp.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1)
    assert model.backend == backend
    assert {module.backend for _, module in model.named_modules()} == {backend}
    other = next(b for b in BACKENDS if b != backend)
    assert vitnp.create_model("vit_tiny_patch16_224", depth=1, backend=other).backend == other  # the argument wins


def test_unknown_backend_is_a_value_error_naming_the_backends(monkeypatch):
    with pytest.raises(ValueError, match="numpy") as error:
        vitnp.create_model("vit_tiny_patch16_224", depth=1, backend="numpy")
    assert all(name in str(error.value) for name in BACKENDS)
    model = vitnp.create_model("vit_tiny_patch16_224", depth=1)
    with pytest.raises(ValueError, match="fast.*reference"):
        model.set_backend("torch")
    monkeypatch.setenv("VITNP_BACKEND", "Fast")
    with pytest.raises(ValueError, match="VITNP_BACKEND") as error:
        vitnp.create_model("vit_tiny_patch16_224", depth=1)
    assert "'Fast'" in str(error.value) and all(name in str(error.value) for name in BACKENDS)


def _record_calls(monkeypatch):
    """Wrap the ops each backend has of its own (not the ones the fast backend takes from the reference): a list of
    (backend, op) per call."""
    calls = []
    for backend, module in (("fast", fast_ops), ("reference", reference_ops)):
        for op in reference_ops.__all__:
            function = getattr(module, op)
            if not callable(function) or getattr(fast_ops, op) is getattr(reference_ops, op):
                continue

            def recorded(*args, _function=function, _name=(backend, op), **kwargs):
                calls.append(_name)
                return _function(*args, **kwargs)

            monkeypatch.setattr(module, op, recorded)
    return calls


@pytest.mark.parametrize("name", SMALL)
def test_set_backend_switches_the_ops_that_run(name, monkeypatch):
    model = _small(name, "fast")
    x = _input(model)
    calls = _record_calls(monkeypatch)
    on_fast = model(x)
    assert calls and {backend for backend, _ in calls} == {"fast"}
    calls.clear()
    assert model.set_backend("reference") is model
    assert {module.backend for _, module in model.named_modules()} == {"reference"}
    on_reference = model(x)
    assert calls and {backend for backend, _ in calls} == {"reference"}
    assert_close(on_fast, on_reference, "model")


@pytest.mark.parametrize("name", SMALL)
def test_set_backend_of_a_subtree_switches_that_subtree_only(name, monkeypatch):
    model = _small(name, "fast")
    x = _input(model)
    on_fast = model(x)
    path, subtree = [(p, m) for p, m in model.named_modules() if p.count(".") == 1][-1]  # the last child module
    subtree.set_backend("reference")
    inside = {p for p, _ in subtree.named_modules(path)}
    for prefix, module in model.named_modules():
        assert module.backend == ("reference" if prefix in inside else "fast"), prefix
    calls = _record_calls(monkeypatch)
    assert_close(model(x), on_fast, "model")
    assert {"fast", "reference"} <= {backend for backend, _ in calls}


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_pickled_model_keeps_its_backend(backend):
    """What a process pool or a Dask worker receives: the same model on the same backend, the same numbers."""
    model = _small("deit_tiny_distilled_patch16_224", backend)
    clone = pickle.loads(pickle.dumps(model))
    assert {module.backend for _, module in clone.named_modules()} == {backend}
    x = _input(model)
    np.testing.assert_array_equal(clone(x), model(x))


@pytest.mark.parametrize("name", SMALL)
def test_backends_agree_in_float64(name):
    """Both backends compute the same formulas; only the order of their sums differs: ~1e-15 relative (the
    'kernel' float64 tolerance, rtol 1e-12, leaves a 1000x margin)."""
    fast = _small(name, "fast", np.float64)
    reference = _small(name, "reference", np.float64)
    x = _input(fast, np.float64)
    expected = reference(x)
    assert np.abs(expected).max() > 0.1
    assert_close(fast(x), expected, "kernel")
    assert_close(fast.forward_features(x), reference.forward_features(x), "kernel")
