"""glibc malloc's thresholds, fixed so that a forward reuses the memory of the one before (an explicit call); Python's
cyclic garbage collector paused while vitnp's modules are imported."""

import contextlib
import ctypes
import gc
import os

# glibc's malloc returns the free memory at the top of its heap to the system once there is more than a threshold of
# it, and serves each block above another threshold with a mapping of its own; it moves both thresholds as blocks come
# and go. A forward allocates and frees activations of a few MiB each, and depending on the order of earlier calls the
# thresholds could settle where these pages were given back and faulted in again on every forward, thousands of page
# faults a forward, taken by the threads as they first wrote each output. Fixed thresholds keep that memory in the heap
# for the next forward (the effect on the timings is in benchmarks/README.md).
_MMAP_THRESHOLD = 32 << 20  # blocks up to this size come from the heap (glibc's largest allowed value)
_TRIM_THRESHOLD = 256 << 20  # free memory kept at the top of the heap before any is given back
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)


def keep_freed_memory():
    """Fix glibc malloc's thresholds (above) for this process, unless ``VITNP_SYSTEM_MALLOC=1``; elsewhere, nothing.

    A process-wide setting, so vitnp never makes it on import: the ``vitnp`` command and ``vitnp embed``'s workers
    call it for themselves, and a program that runs many forwards may too.
    """
    if os.environ.get("VITNP_SYSTEM_MALLOC") == "1":
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt  # glibc; musl and other C libraries have no mallopt
    except (OSError, AttributeError, TypeError):  # TypeError: Windows, where CDLL needs a name
        return
    mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
    mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)


@contextlib.contextmanager
def collector_paused():
    """Python's cyclic garbage collector paused, then left as it was. Importing vitnp (and Numba with it) makes a few
    hundred thousand objects, every one of which is kept; the collections their count would trigger meanwhile find
    nothing to free and took ~60 ms of a ~0.35 s import."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
