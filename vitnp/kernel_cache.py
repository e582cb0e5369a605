"""Where vitnp's compiled kernels are kept, and compiling them ahead of a run.

Numba compiles a kernel the first time it runs for a dtype and memory layout, and keeps the machine code on disk
(``cache=True``), so that later processes load it in milliseconds. It looks for a writable place in this order:
``$NUMBA_CACHE_DIR``; the ``__pycache__`` folder beside vitnp's sources; the user's cache folder (``~/.cache/numba``)
when the package folder is read-only, as a system-wide site-packages or a container image is. Where none of these is
writable (a container or a Dask worker without a home folder), Numba refuses to run a cached function at all; for
vitnp's own kernels one more place is tried last, a folder of the system's temporary directory that belongs to the
user (:class:`TemporaryFolderLocator`), so that vitnp runs there and compiles once per machine boot, not per process.

:func:`compile_kernels` (``vitnp compile``) compiles every kernel the registered models use at once;
:func:`compile_from_stdin` is the process :mod:`vitnp.compiling` starts to compile one model's fast kernels while the
model runs on the reference backend's.
"""

import contextlib
import functools
import hashlib
import os
import pickle
import stat
import sys
import tempfile
import time

import numpy as np
from numba.core import caching

from . import compiling
from .fast import tuning

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _is_private_folder(path):
    """Whether ``path`` (made if missing) is a folder only this user can write: one another user made in the shared
    temporary directory could hold a cache that runs their code."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        info = os.lstat(path)
    except OSError:
        return False
    getuid = getattr(os, "getuid", None)
    return stat.S_ISDIR(info.st_mode) and not info.st_mode & 0o022 and not (getuid and info.st_uid != getuid())


def _is_vitnp_source(py_file):
    return os.path.commonpath([PACKAGE_DIR, os.path.abspath(py_file)]) == PACKAGE_DIR


@functools.lru_cache(maxsize=1)
def kernel_sources_digest():
    """A digest of every source file that holds kernels (vitnp/fast, vitnp/reference): read once per process."""
    digest = hashlib.sha256()
    for folder in ("fast", "reference"):
        for name in sorted(os.listdir(os.path.join(PACKAGE_DIR, folder))):
            if name.endswith(".py"):
                with open(os.path.join(PACKAGE_DIR, folder, name), "rb") as source:
                    digest.update(f"{folder}/{name}\0".encode() + source.read())
    return digest.hexdigest()


class _KernelSources:
    """For vitnp's kernels only: the compiled code is valid for the sources of all of vitnp's kernel modules, not
    for the kernel's own file alone (Numba's stamp), because a kernel compiles the functions it calls from other
    modules (activations' exp, vecmath's vectors, schedule's chunks) into itself: a change there must recompile it."""

    def get_source_stamp(self):
        return kernel_sources_digest()

    @classmethod
    def from_function(cls, py_func, py_file):
        if not _is_vitnp_source(py_file):
            return None  # another package's function: Numba's own rules, unchanged
        return super().from_function(py_func, py_file)


class _UserProvidedLocator(_KernelSources, caching.UserProvidedCacheLocator):
    """``$NUMBA_CACHE_DIR``, with the stamp of :class:`_KernelSources`."""


class _InTreeLocator(_KernelSources, caching.InTreeCacheLocator):
    """The ``__pycache__`` folder beside the source, with the stamp of :class:`_KernelSources`."""


class _UserWideLocator(_KernelSources, caching.UserWideCacheLocator):
    """The user's cache folder (``~/.cache/numba``), with the stamp of :class:`_KernelSources`."""


class TemporaryFolderLocator(_KernelSources, caching.UserWideCacheLocator):
    """Numba's user-wide cache locator rooted in ``<tmp>/vitnp-kernels-<uid>``, for vitnp's sources only: the last
    place tried, where Numba would otherwise raise "no locator available"."""

    def __init__(self, py_func, py_file):
        super().__init__(py_func, py_file)
        user = getattr(os, "getuid", lambda: "user")()
        self._root = os.path.join(tempfile.gettempdir(), f"vitnp-kernels-{user}")
        self._cache_path = os.path.join(self._root, self.get_suitable_cache_subpath(py_file))

    def ensure_cache_path(self):
        if not _is_private_folder(self._root):
            raise OSError(f"{self._root} is not a private folder of this user")
        super().ensure_cache_path()


def install_kernel_locators():
    """Have Numba find vitnp's kernels through its own three places with the stamp of :class:`_KernelSources`, then
    :class:`TemporaryFolderLocator` last (once; before any kernel is defined)."""
    locators = caching.CacheImpl._locator_classes
    if TemporaryFolderLocator in locators:
        return
    for ours in (_UserProvidedLocator, _InTreeLocator, _UserWideLocator):
        numbas = next(base for base in ours.__bases__ if base is not _KernelSources)
        locators.insert(locators.index(numbas), ours)
    locators.append(TemporaryFolderLocator)


# One registered model of each kind whose forward calls a different set of kernels (a 1-channel stem, the distillation
# token, separate q / k / v Linears, post-norm blocks, Swin's windows, Swin V2's cosine attention, MobileViT's
# convolutions, MobileViT v2's GroupNorm, CLIP's QuickGELU, EVA-02's SwiGLU and rotary embedding): their first forwards
# compile every kernel any registered model uses, for a dtype and backend.
# The slowest to compile come first, so that the worker processes share the work out evenly.
KERNEL_SAMPLES = (
    "mobilevit_xxs", "mobilevitv2_050", "swin_tiny_patch4_window7_224", "swinv2_tiny_window8_256",
    "vit_digits_patch4_32", "vit_tiny_patch16_224",
    "deit_tiny_distilled_patch16_224", "vit_base_patch32_clip_quickgelu_224", "eva02_tiny_patch14_224",
    "lucidrains_vit_patch32_256", "notes_prenorm_vit_patch32_256", "notes_torch_encoder_vit_patch7_28",
)


def _first_forwards(name, backend, dtype):
    """Run ``name``'s forward at batch 1 and 2 on ``backend`` in ``dtype`` (compiling or loading its kernels)."""
    from .registry import create_model  # here: the registry defines kernels, which needs the locator installed first

    model = create_model(name, backend=backend, dtype=dtype)
    _forwards_at_batch_1_and_2(model, (model.in_chans, *model.img_size), dtype)
    _forwards_at_batch_1_and_2(_read_only(model), (model.in_chans, *model.img_size), dtype)  # as read from a file
    return name, backend, dtype


def _read_only(model):
    """``model`` with read-only weights, as :func:`vitnp.load_weights` gives them (Numba compiles a kernel apart for
    read-only arrays)."""
    for _, value in model.named_state():
        value.flags.writeable = False
    return model


def _forwards_at_batch_1_and_2(model, image_shape, dtype):
    """Forwards of zero images at batch 1 and 2: a batch of two takes the fast backend's split across threads."""
    for batch in (1, 2):
        model(np.zeros((batch, *image_shape), dtype))


def compile_kernels(backends=("fast", "reference"), dtypes=("float32",), processes=None, report=None,
                    names=KERNEL_SAMPLES):
    """Compile (or find in the cache) every kernel the registered models use, for each backend and dtype, so that no
    later run waits for Numba: e.g. once after installing, or in a container image's build. The models ``names``
    (:data:`KERNEL_SAMPLES`) run their first forwards in ``processes`` fresh worker processes at once (default: one
    per core; they share the cache on disk, where Numba writes each kernel whole or not at all); then, for the fast
    backend, this process measures the settings that depend on the CPU (:mod:`vitnp.fast.tuning`) and keeps them.
    ``report(name, backend, dtype, seconds)`` is called as each model finishes."""
    # imported here, not with the module: every vitnp process imports this one, and these two cost ~20 ms of its start
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    jobs = [(name, backend, dtype) for dtype in dtypes for backend in backends for name in names]
    start = time.perf_counter()
    spawn = multiprocessing.get_context("spawn")  # not fork: this process may have threads (the fast backend's)
    with ProcessPoolExecutor(max_workers=processes or os.cpu_count(), mp_context=spawn,
                             initializer=_compile_worker) as pool:
        for done in as_completed([pool.submit(_first_forwards, *job) for job in jobs]):
            name, backend, dtype = done.result()
            if report is not None:
                report(name, backend, dtype, time.perf_counter() - start)
    if "fast" in backends:  # the engine's settings measured on this CPU, now that no worker runs beside the timing
        from .fast import gemm

        for dtype in dtypes:
            gemm.panel_block_bytes(dtype)


def _compile_worker():
    """A worker of :func:`compile_kernels`: it compiles what is missing in the foreground, and leaves the measured
    settings (:mod:`vitnp.fast.tuning`) to a process that is not timing them against the other workers."""
    compiling.compile_in_foreground()
    tuning.defer_measuring()


def compile_from_stdin(dtype):
    """The background compiler's process: the pickled model (or None) on stdin; its fast kernels for ``dtype`` are
    compiled (or found in the cache) by forwards at batch 1 and 2 of a randomly initialised copy."""
    with contextlib.suppress(OSError):
        os.nice(5)  # the process that asked runs its forwards meanwhile: it comes first
    tuning.defer_measuring()  # and would make this one's timings of the measured settings wrong
    model = pickle.loads(sys.stdin.buffer.read())
    if model is None:
        for name in KERNEL_SAMPLES:
            _first_forwards(name, "fast", dtype)
        return
    family, config, image_shape, _, read_only = model
    model = family(config)
    model.init_weights(dtype=dtype)
    model.set_backend("fast")
    _forwards_at_batch_1_and_2(_read_only(model) if read_only else model, image_shape, dtype)
