"""How many threads vitnp uses: :func:`set_num_threads` / :func:`get_num_threads`, the BLAS's thread count, and
:func:`single_threaded` sections.

The count is the BLAS's (NumPy's OpenBLAS, the one the wheels bundle; another BLAS's threads are left alone), Numba's,
and the number of threads the fast backend's kernels and batch chunks use (:mod:`vitnp.fast.pool`). The reference
backend uses the BLAS's threads inside its matrix products and no threads of its own.
"""

import ctypes
import glob
import os
import threading
from contextlib import contextmanager

import numba
import numpy as np

# (set, get) function names: OpenBLAS as NumPy's wheels bundle it (64-bit integers, symbol suffix), then plain.
_OPENBLAS_SYMBOLS = [
    ("scipy_openblas_set_num_threads64_", "scipy_openblas_get_num_threads64_"),
    ("scipy_openblas_set_num_threads", "scipy_openblas_get_num_threads"),
    ("openblas_set_num_threads64_", "openblas_get_num_threads64_"),
    ("openblas_set_num_threads", "openblas_get_num_threads"),
]


def _candidate_paths():
    numpy_dir = os.path.dirname(np.__file__)
    paths = glob.glob(os.path.join(numpy_dir, os.pardir, "numpy.libs", "*openblas*"))  # Linux / Windows wheels
    paths += glob.glob(os.path.join(numpy_dir, ".dylibs", "*openblas*"))  # macOS wheels
    try:
        with open("/proc/self/maps") as maps:  # any OpenBLAS already loaded into this process (Linux)
            paths += sorted({line.split()[-1] for line in maps if "openblas" in line and line.split()[-1][0] == "/"})
    except OSError:
        pass
    return paths


def _find_openblas():
    """(set_num_threads, get_num_threads) of the OpenBLAS NumPy uses, or None."""
    for path in _candidate_paths():
        try:
            library = ctypes.CDLL(os.path.realpath(path))  # already loaded by NumPy: the same handle
        except OSError:
            continue
        for set_name, get_name in _OPENBLAS_SYMBOLS:
            if hasattr(library, set_name) and hasattr(library, get_name):
                return getattr(library, set_name), getattr(library, get_name)
    return None


_OPENBLAS = _find_openblas()


_lock = threading.Lock()
_single_threaded_depth = 0  # how many threads are inside ``single_threaded`` now
_blas_threads_outside = None  # the BLAS's thread count to restore when the last of them leaves
_num_threads = None  # vitnp's thread count; None until set: the BLAS's own (or the machine's cores)
_local = threading.local()  # .alone is True on a thread that runs its work alone (a batch chunk, single_threaded)


def get_num_threads():
    """The number of threads vitnp uses: the last :func:`set_num_threads`, else the BLAS's own thread count."""
    if _num_threads is not None:
        return _num_threads
    if _OPENBLAS is not None:
        return max(1, _OPENBLAS[1]())
    return os.cpu_count() or 1


def set_num_threads(n):
    """Use ``n`` threads: the BLAS's thread count, Numba's (capped at the threads it started with), and the threads
    the fast backend shares a kernel's work or a batch's chunks between."""
    global _num_threads, _blas_threads_outside
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"set_num_threads: expected a positive integer, got {n!r}")
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    with _lock:
        if _OPENBLAS is not None:
            if _single_threaded_depth:
                _blas_threads_outside = n  # restored to n when the last single-threaded section ends
            else:
                _OPENBLAS[0](n)
        _num_threads = n


@contextmanager
def single_threaded():
    """Run the ``with`` body on the calling thread alone: the BLAS on one thread, and the fast backend's kernels
    without helper threads (:func:`alone`); then restore the BLAS's thread count.

    Safe from several threads at once: the BLAS stays on one thread until the last of them leaves.
    """
    with alone(), _blas_single_threaded():
        yield


@contextmanager
def alone():
    """Mark the calling thread as running its work alone for the ``with`` body: the fast backend's kernels run on it
    without helper threads, and a batch is not split again (:func:`is_alone`)."""
    before = getattr(_local, "alone", False)
    _local.alone = True
    try:
        yield
    finally:
        _local.alone = before


def is_alone():
    """Whether the calling thread is inside :func:`alone` (or :func:`single_threaded`)."""
    return getattr(_local, "alone", False)


@contextmanager
def _blas_single_threaded():
    global _single_threaded_depth, _blas_threads_outside
    if _OPENBLAS is None:
        yield
        return
    set_blas_threads, get_blas_threads = _OPENBLAS
    with _lock:
        if _single_threaded_depth == 0:
            _blas_threads_outside = get_blas_threads()
            if _blas_threads_outside != 1:
                set_blas_threads(1)
        _single_threaded_depth += 1
    try:
        yield
    finally:
        with _lock:
            _single_threaded_depth -= 1
            if _single_threaded_depth == 0 and _blas_threads_outside != 1:
                set_blas_threads(_blas_threads_outside)
