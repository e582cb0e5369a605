"""The two backends a model runs on, and the default one.

- ``'fast'`` (:mod:`vitnp.fast`): the engine, its own packed GEMM, fused blocks and threads; the default.
- ``'reference'`` (:mod:`vitnp.reference`): each op the plain formula of the torch call it equals, to read or to check
  another implementation against.

Both have the same ops (``linear``, ``layer_norm``, ``scaled_dot_product_attention``, ``conv2d``, ...), with the same
arguments and results; a model's layers call those of their model's backend (``module.ops``). ``VITNP_BACKEND`` sets
the default for the process.
"""

import importlib
import os

BACKENDS = ("fast", "reference")


def check_backend(name):
    """``name`` if it names a backend, else a ValueError that lists them."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


def default_backend(unset="fast"):
    """``VITNP_BACKEND`` if set, else ``unset`` ('fast')."""
    name = os.environ.get("VITNP_BACKEND", unset)
    if name not in BACKENDS:
        raise ValueError(f"VITNP_BACKEND={name!r}: expected one of {BACKENDS}")
    return name


_tiered_ops = None


def backend_ops(name):
    """The ops of backend ``name``, imported on first use (a process that runs the reference never loads the engine):
    :mod:`vitnp.reference.ops`, or the fast backend's ops through :class:`vitnp.compiling.TieredOps`, which runs
    an op on the reference's kernels while its own are not compiled yet (``VITNP_COMPILE``)."""
    global _tiered_ops
    if check_backend(name) == "reference":
        return importlib.import_module(".reference.ops", __package__)
    if _tiered_ops is None:
        from .compiling import TieredOps

        _tiered_ops = TieredOps()
    return _tiered_ops
