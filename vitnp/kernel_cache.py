"""Where vitnp's compiled kernels are kept, and the note that says when they are being compiled.

Numba compiles a kernel the first time it runs for a dtype and memory layout, and keeps the machine code on disk
(``cache=True``), so that later processes load it in milliseconds. It looks for a writable place in this order:
``$NUMBA_CACHE_DIR``; the ``__pycache__`` folder beside vitnp's sources; the user's cache folder (``~/.cache/numba``)
when the package folder is read-only, as a system-wide site-packages or a container image is. Where none of these is
writable (a container or a Dask worker without a home folder), Numba refuses to run a cached function at all; for
vitnp's own kernels one more place is tried last, a folder of the system's temporary directory that belongs to the
user (:class:`TemporaryFolderLocator`), so that vitnp runs there and compiles once per machine boot, not per process.

:func:`announce_compiling` prints one line when a kernel of vitnp's really is compiled (loading one from the cache is
silent); the ``vitnp`` command turns it on, so that a first run does not look hung.
"""

import multiprocessing
import os
import stat
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed

import numpy as np
from numba.core import caching, event

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


class TemporaryFolderLocator(caching.UserWideCacheLocator):
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

    @classmethod
    def from_function(cls, py_func, py_file):
        if os.path.commonpath([PACKAGE_DIR, os.path.abspath(py_file)]) != PACKAGE_DIR:
            return None  # another package's function: Numba's own rules, unchanged
        return super().from_function(py_func, py_file)


def install_fallback_locator():
    """Let Numba try :class:`TemporaryFolderLocator` after its own locators (once; before any kernel is defined)."""
    if TemporaryFolderLocator not in caching.CacheImpl._locator_classes:
        caching.CacheImpl._locator_classes.append(TemporaryFolderLocator)


def kernel_cache_dir(dispatcher):
    """The folder where Numba keeps ``dispatcher``'s compiled code."""
    return dispatcher._cache.cache_path


class _CompileNote(event.Listener):
    """Writes the note once, when Numba starts compiling (not loading) the first kernel of vitnp's in this process."""

    def __init__(self, stream):
        self.stream = stream
        self.lock = threading.Lock()
        self.written = False

    def on_start(self, numba_event):
        dispatcher = numba_event.data["dispatcher"]
        if not dispatcher.py_func.__module__.startswith("vitnp."):
            return
        with self.lock:
            if self.written:
                return
            self.written = True
        print(f"vitnp: compiling its kernels for this CPU, once (seconds to a minute); later runs load them from the "
              f"cache, e.g. {kernel_cache_dir(dispatcher)}", file=self.stream or sys.stderr, flush=True)

    def on_end(self, numba_event):
        pass


_note = None


def announce_compiling(stream=None):
    """From now on, print one line on ``stream`` (default: stderr) the first time this process compiles one of
    vitnp's kernels. Nothing is printed when every kernel a run needs comes from the cache."""
    global _note
    if _note is None:
        _note = _CompileNote(stream)
        event.register("numba:compile", _note)


# One registered model of each kind whose forward calls a different set of kernels (a 1-channel stem, the distillation
# token, separate q / k / v Linears, post-norm blocks, Swin's windows, MobileViT's convolutions): their first forwards
# compile every kernel any registered model uses, for a dtype and backend.
# The slowest to compile come first, so that the worker processes share the work out evenly.
KERNEL_SAMPLES = (
    "mobilevit_xxs", "swin_tiny_patch4_window7_224", "vit_digits_patch4_32", "vit_tiny_patch16_224",
    "deit_tiny_distilled_patch16_224", "lucidrains_vit_patch32_256", "notes_prenorm_vit_patch32_256",
    "notes_torch_encoder_vit_patch7_28",
)


def _first_forwards(name, backend, dtype):
    """Run ``name``'s forward at batch 1 and 2 on ``backend`` in ``dtype`` (compiling or loading its kernels)."""
    from .registry import create_model  # here: the registry defines kernels, which needs the locator installed first

    model = create_model(name, backend=backend, dtype=dtype)
    for batch in (1, 2):
        model(np.zeros((batch, model.in_chans, *model.img_size), dtype))
    return name, backend, dtype


def compile_kernels(backends=("fast", "reference"), dtypes=("float32",), processes=None, report=None,
                    names=KERNEL_SAMPLES):
    """Compile (or find in the cache) every kernel the registered models use, for each backend and dtype, so that no
    later run waits for Numba: e.g. once after installing, or in a container image's build. The models ``names``
    (:data:`KERNEL_SAMPLES`) run their first forwards in ``processes`` fresh worker processes at once (default: one
    per core; they share the cache on disk, where Numba writes each kernel whole or not at all).
    ``report(name, backend, dtype, seconds)`` is called as each model finishes."""
    jobs = [(name, backend, dtype) for dtype in dtypes for backend in backends for name in names]
    start = time.perf_counter()
    spawn = multiprocessing.get_context("spawn")  # not fork: this process may have threads (the fast backend's)
    with ProcessPoolExecutor(max_workers=processes or os.cpu_count(), mp_context=spawn) as pool:
        for done in as_completed([pool.submit(_first_forwards, *job) for job in jobs]):
            name, backend, dtype = done.result()
            if report is not None:
                report(name, backend, dtype, time.perf_counter() - start)
