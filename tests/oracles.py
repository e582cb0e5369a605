"""The torch side of the comparisons, in one place: random weights for any torch model, timm models built quickly,
float64 copies, state_dicts as NumPy arrays, and the image batches fed to both sides.

torch and timm are imported inside the functions that use them, so that a test that needs no torch can import this
module (``images``, ``random_state``, ``BACKENDS``, ``needs``) where torch is not installed.

Why :func:`randomise_` draws every parameter: torch's and timm's own init leave biases at 0, norm affines at 1 / 0,
BatchNorm statistics at 0 / 1 and class tokens near 0, exactly the values at which a dropped bias, a dropped norm
affine, a swapped statistic or a forgotten token changes nothing, and so passes.
"""

import copy
import importlib

import numpy as np
import pytest

# The backends every model comparison runs on; tests/test_models.py checks this is vitnp.backends.BACKENDS.
BACKENDS = ("fast", "reference")

# The demo model vit_digits_patch4_32 as a timm VisionTransformer (its name is no timm name): img 32, patch 4, one
# channel, the ten digits, as vitnp/demo/train_digits.py trains it.
DIGITS_TIMM_KWARGS = dict(
    img_size=32, patch_size=4, in_chans=1, num_classes=10, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0
)


def optional_import(name):
    """The module ``name``, or None where it cannot be imported (a test module's oracle packages: torch, timm, ...)."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def needs(*names):
    """A mark that skips a test, saying why, where one of the packages ``names`` (the oracle) cannot be imported."""
    missing = [name for name in names if optional_import(name) is None]
    return pytest.mark.skipif(bool(missing), reason=f"needs {', '.join(missing)} as the oracle")


class NoTorchNN:
    """Stands for ``torch.nn`` where torch is not installed: ``Module`` is ``object``, so that a test module still
    defines its PyTorch models at import and runs its torch-free tests (the tests that build them are marked
    ``needs('torch')`` and skip)."""

    Module = object


def images(shape, dtype=np.float32, seed=0):
    """A seeded batch of N(0, 1) values of ``shape`` (B, C, H, W): normalised images, both signs, no structure."""
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def randomise_(module, seed=0):
    """Draw every parameter and BatchNorm statistic of a torch module from a seeded generator, in place; returns the
    module.

    - matrices (Linear / Conv weights, attention in-projections; any parameter of rank >= 2 named ``*weight``):
      N(0, 1 / fan_in), fan_in the product of the trailing dims, so that each layer keeps its input's scale. (A
      fixed std of 0.02 scales a 3x3 conv over 16 channels by 0.02 * sqrt(144) ~ 0.25: after MobileViT's ~20 convs
      the signal would be the biases alone, and a wrong conv weight would not show.)
    - norm weights (LayerNorm, GroupNorm, BatchNorm): N(1, 0.1^2); every other rank-1 parameter (biases): N(0, 0.1^2).
    - tokens, position embeddings, relative position bias tables (the other parameters of rank >= 2): N(0, 0.5^2),
      of the order of what they are added to.
    - BatchNorm running_mean N(0, 0.1^2), running_var uniform in [0.5, 1.5], num_batches_tracked in [1, 1000).
    """
    import torch
    from torch import nn

    norms = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for submodule in module.modules():
            is_norm = isinstance(submodule, norms)
            for name, p in submodule.named_parameters(recurse=False):
                if p.ndim == 1:
                    p.normal_(1.0 if is_norm and name == "weight" else 0.0, 0.1, generator=generator)
                elif name.endswith("weight"):
                    p.normal_(0.0, p[0].numel() ** -0.5, generator=generator)
                else:
                    p.normal_(0.0, 0.5, generator=generator)
            if isinstance(submodule, nn.modules.batchnorm._BatchNorm) and submodule.track_running_stats:
                submodule.running_mean.normal_(0.0, 0.1, generator=generator)
                submodule.running_var.uniform_(0.5, 1.5, generator=generator)
                submodule.num_batches_tracked.random_(1, 1000, generator=generator)
    return module


def random_state(state, seed=0):
    """A state_dict of the same keys, shapes and dtypes with :func:`randomise_`'s draws, told apart by key names (no
    torch needed): rank-1 ``*weight`` are norm weights, ``running_mean`` / ``running_var`` BatchNorm statistics;
    integer entries (``num_batches_tracked``) are kept."""
    rng = np.random.default_rng(seed)
    drawn = {}
    for key, value in state.items():
        if not np.issubdtype(value.dtype, np.floating):
            drawn[key] = value
            continue
        if key.endswith("running_var"):
            values = rng.uniform(0.5, 1.5, value.shape)
        elif value.ndim == 1:
            values = rng.normal(1.0 if key.endswith("weight") else 0.0, 0.1, value.shape)
        elif key.endswith("weight"):
            values = rng.normal(0.0, value[0].size ** -0.5, value.shape)
        else:
            values = rng.normal(0.0, 0.5, value.shape)
        drawn[key] = values.astype(value.dtype)
    return drawn


def timm_model(name, seed=0, **kwargs):
    """``timm.create_model(name, **kwargs)`` in eval mode with :func:`randomise_`'d float32 weights.

    Built on the meta device: timm's own init would be thrown away and costs seconds for the large models. The
    buffers that are no parameters' copies (Swin's relative position index and attention mask) are computed again
    on the CPU by timm's ``init_non_persistent_buffers``.
    """
    import timm
    import torch

    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, **kwargs)
    return materialise(model, seed)


def materialise(meta_model, seed=0):
    """A module built on the meta device, on the CPU with :func:`randomise_`'d weights, in eval mode.

    ``to_empty`` leaves every buffer uninitialised: BatchNorm's statistics are drawn by :func:`randomise_`, the
    buffers timm computes from the architecture by ``init_non_persistent_buffers``; any other buffer is an error.
    """
    from torch.nn.modules.batchnorm import _BatchNorm

    model = meta_model.to_empty(device="cpu")
    for module in model.modules():
        unset = {name for name, _ in module.named_buffers(recurse=False)}
        if isinstance(module, _BatchNorm):
            unset -= {"running_mean", "running_var", "num_batches_tracked"}
        if hasattr(module, "init_non_persistent_buffers"):
            module.init_non_persistent_buffers()
            unset -= module._non_persistent_buffers_set
        if unset:
            raise RuntimeError(f"{type(module).__name__}: to_empty leaves {sorted(unset)} unset, and nothing here sets "
                               "them; build this model on the CPU")
    return randomise_(model, seed).eval()


def in_dtype(module, dtype):
    """The module in ``dtype`` (float32: itself; float64: a double copy, the float32 module left as it is)."""
    return copy.deepcopy(module).double() if np.dtype(dtype) == np.float64 else module


def with_vitnp_rope_table(eva):
    """A timm ``Eva`` built for one image size, its cached rotary table replaced by vitnp's (in place); returns it.

    Both tables are float32 values, computed once; vitnp's sin / cos are the float64 ones rounded, torch's float32
    sin / cos are an ulp off at some entries, which moves a float64 model's outputs by ~1e-8. With vitnp's table the
    float64 comparison checks the rest of the model at 2^-53; tests/test_eva.py compares the tables themselves.
    """
    import torch

    from vitnp.eva import rope_table

    rope = eva.rope
    table = rope_table(tuple(rope.feat_shape), rope.dim, rope.ref_feat_shape, rope.rotate_half)
    with torch.no_grad():
        rope.pos_embed.copy_(torch.from_numpy(table))
    return eva


def numpy_state(module):
    """The module's state_dict as NumPy arrays (views of the tensors, no copy), keys in torch's order."""
    return {key: value.detach().numpy() for key, value in module.state_dict().items()}


def run(function, x):
    """``function`` (a torch module or method) on the NumPy batch ``x``, without autograd, as NumPy."""
    import torch

    with torch.no_grad():
        return function(torch.from_numpy(x)).numpy()
