"""The thread count of the BLAS behind NumPy's matmul, for the sections where one thread is faster.

Attention multiplies B * heads small matrices (197 x 64 by 64 x 197 for ViT-B/16) in one ``np.matmul``, which calls
the BLAS once per matrix. A multi-threaded OpenBLAS splits each of those small products across its threads and
synchronises them after each one; on 2 cores that cost more than the threads saved (vit_base_patch16_224, 2 threads:
forward 1.27x torch's time at batch 1 and 1.40x at batch 8, against 0.91x and 0.99x with these products
single-threaded; see benchmarks/README.md).

Only NumPy's own OpenBLAS (the wheels bundle it) is controlled; with any other BLAS ``single_threaded`` does nothing.
"""

import ctypes
import glob
import os
from contextlib import contextmanager

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


@contextmanager
def single_threaded():
    """Run the BLAS calls of the ``with`` body on one thread, then restore the BLAS's thread count."""
    if _OPENBLAS is None:
        yield
        return
    set_num_threads, get_num_threads = _OPENBLAS
    threads = get_num_threads()
    if threads == 1:
        yield
        return
    set_num_threads(1)
    try:
        yield
    finally:
        set_num_threads(threads)
