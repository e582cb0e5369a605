"""How many cores vitnp uses, and how: the BLAS's threads and the split of a batch across threads.

Two ways to use 2 cores, each where it pays (figures in benchmarks/README.md):

- **One image**: the work of each op is cut into chunks that the threads take in turn (:func:`parallel_ranges`):
  the output columns of every Linear (vitnp's own GEMM, :func:`vitnp.kernels.linear`), the heads of attention,
  the rows of LayerNorm, GELU and softmax. The BLAS only multiplies attention's small per-head matrices (197 x 64
  by 64 x 197 for ViT-B/16), on one thread per chunk of heads (:func:`single_threaded`): split inside the BLAS,
  each of those small products cost more in synchronisation than it saved.
- **A batch**: :func:`map_batch` cuts it into one chunk per thread and runs the whole forward of each chunk on its
  own thread with a single-threaded BLAS (GEMMs, Numba kernels and NumPy all release the GIL). Nothing waits for
  or spins against anything else, and a 2-thread forward of a batch of 8 takes ~25% less time than with the BLAS's
  own threads.

Only NumPy's own OpenBLAS (the wheels bundle it) is controlled; with another BLAS its threads are left alone.
"""

import ctypes
import glob
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
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


_lock = threading.Lock()
_single_threaded_depth = 0  # how many threads are inside ``single_threaded`` now
_blas_threads_outside = None  # the BLAS's thread count to restore when the last of them leaves
_num_threads = None  # vitnp's thread count; None until set: the BLAS's own (or the machine's cores)
_pool = None  # (threads, ThreadPoolExecutor) for map_batch
_chunk = threading.local()  # .running is True on a thread while it computes a chunk with others: no further split


def get_num_threads():
    """The number of threads vitnp uses: the last :func:`set_num_threads`, else the BLAS's own thread count."""
    if _num_threads is not None:
        return _num_threads
    if _OPENBLAS is not None:
        return max(1, _OPENBLAS[1]())
    return os.cpu_count() or 1


def set_num_threads(n):
    """Use ``n`` threads: the BLAS's thread count, Numba's, and the number of chunks :func:`map_batch` runs at once."""
    global _num_threads, _blas_threads_outside
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"set_num_threads: expected a positive integer, got {n!r}")
    from . import kernels  # the one module that imports numba

    kernels.set_num_threads(n)
    with _lock:
        if _OPENBLAS is not None:
            if _single_threaded_depth:
                _blas_threads_outside = n  # restored to n when the last single-threaded section ends
            else:
                _OPENBLAS[0](n)
        _num_threads = n


@contextmanager
def single_threaded():
    """Run the BLAS calls of the ``with`` body on one thread, then restore the BLAS's thread count.

    Safe from several threads at once: the BLAS stays on one thread until the last of them leaves.
    """
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


def _thread_pool(threads):
    global _pool
    with _lock:
        if _pool is None or _pool[0] != threads:
            if _pool is not None:
                _pool[1].shutdown(wait=False)
            _pool = (threads, ThreadPoolExecutor(threads, thread_name_prefix="vitnp"))
        return _pool[1]


def map_batch(forward, x):
    """``forward(x)`` for a batch ``x`` (B, ...), computed as one chunk of the batch per thread, concatenated.

    With one thread, or one image, it is ``forward(x)``; called again from inside a chunk (a model run inside another
    model's forward) it is ``forward(x)`` too, so the pool never waits on itself. ``forward`` must treat the images of
    a batch independently (every model forward does) and return an array whose first axis is the batch.
    """
    threads = min(get_num_threads(), len(x))
    if threads < 2 or getattr(_chunk, "running", False):
        return forward(x)

    def run_chunk(chunk):
        _chunk.running = True
        try:
            return forward(chunk)
        finally:
            _chunk.running = False

    chunks = np.array_split(x, threads)
    with single_threaded():
        results = list(_thread_pool(get_num_threads()).map(run_chunk, chunks))
    return np.concatenate(results)


_SPINS = 1 << 18  # reads of a flag before a waiting thread goes to sleep: ~0.5 ms
# Work of fewer multiply-adds than this (~1.5 ms on one core) is not worth sharing out: handing chunks to another
# thread costs 0.1 to 0.3 ms here (waking it, passing it the GIL).
MIN_PARALLEL_MACS = 1 << 26


class _Helpers:
    """Threads that run :func:`parallel_ranges`'s chunks beside the calling thread.

    Between jobs a helper spins on the job counter in a Numba loop that holds no GIL, for about half a millisecond, and
    only then sleeps: the ops of a forward come a fraction of a millisecond apart, and waking a sleeping thread took
    0.1 to 0.5 ms on this 2-core virtual machine (with a ThreadPoolExecutor a 2.2 ms softmax took 1.64 ms on two
    threads, 1.1 ideal; with the spinning helpers 1.33-1.51).
    """

    def __init__(self):
        self.busy = threading.Lock()  # one job at a time; a second caller meanwhile runs its work alone
        self.wakeup = threading.Condition()
        self.generation = np.zeros(1, np.int64)  # the number of the current job
        self.finished = np.zeros(0, np.int64)  # finished[i]: the last job helper i has finished
        self.job = None  # (function, how many helpers take part)
        self.errors = []

    def run(self, job, helpers):
        """``job()`` on the calling thread and on ``helpers`` helper threads at once; returns when all are done."""
        from . import kernels

        if len(self.finished) < helpers:
            self._start(helpers)
        self.job = (job, helpers)
        generation = int(self.generation[0]) + 1
        self.generation[0] = generation
        with self.wakeup:
            self.wakeup.notify_all()
        try:
            job()
        finally:
            for index in range(helpers):
                while not kernels.spin_until(self.finished, index, generation, True, _SPINS):
                    time.sleep(0.0001)  # a helper descheduled by the machine: stop burning the core meanwhile
            errors, self.errors = self.errors, []  # this job's, whether or not the calling thread's part raised
        if errors:
            raise errors[0]

    def _start(self, helpers):
        first = len(self.finished)
        self.finished = np.concatenate([self.finished, np.full(helpers - first, self.generation[0], np.int64)])
        for index in range(first, helpers):
            threading.Thread(target=self._loop, args=(index,), name=f"vitnp-{index}", daemon=True).start()

    def _loop(self, index):
        from . import kernels

        seen = int(self.generation[0])
        while True:
            if not kernels.spin_until(self.generation, 0, seen, False, _SPINS):
                with self.wakeup:
                    while self.generation[0] == seen:
                        self.wakeup.wait()
            seen = int(self.generation[0])
            job, helpers = self.job
            if index < helpers:
                try:
                    job()
                except BaseException as error:  # handed to the caller, which raises it
                    self.errors.append(error)
            self.finished[index] = seen


_helpers = _Helpers()


def _after_fork_in_child():
    # A forked child has only the thread that forked: the parent's helpers and pool threads are not there (and a
    # lock may have been held), so the child starts its own when it first needs them.
    global _helpers, _pool, _lock
    _helpers = _Helpers()
    _pool = None
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def parallel_ranges(work, total, macs):
    """``work(begin, end)`` over ``range(total)``, in chunks that the threads take in turn until none is left.

    The chunks shrink as the work runs out and go to the threads as they become free, so a thread that the machine
    slows down takes fewer of them. The calling thread works too. It is ``work(0, total)`` on the calling thread
    alone when the whole work, ``macs`` multiply-adds or the equivalent, is below :data:`MIN_PARALLEL_MACS`; inside
    a chunk of :func:`map_batch` (every thread busy already); with one thread or one item; and while another
    thread's ``parallel_ranges`` has the helpers. ``work`` must release the GIL to run in parallel (the Numba kernels
    and the BLAS do).
    """
    threads = get_num_threads()
    if (
        macs < MIN_PARALLEL_MACS
        or threads < 2
        or total < 2
        or getattr(_chunk, "running", False)
        or not _helpers.busy.acquire(blocking=False)
    ):
        work(0, total)
        return
    taken = 0  # items handed out so far
    take = threading.Lock()

    def next_chunk():
        # Each chunk is a 1 / (2 * threads) share of what is left: big at first (few hand-offs), small at the end
        # (no thread waits long for another's last chunk). Against four equal chunks per thread: 0.98-0.99 of the
        # time on ViT-B's batch-1 GEMMs, within this machine's noise (two runs of one setting differed by 8%).
        nonlocal taken
        with take:
            begin = taken
            taken = min(total, begin + max(1, (total - begin) // (2 * threads)))
        return begin, taken

    def take_chunks():
        _chunk.running = True  # a parallel_ranges inside ``work`` runs inline
        try:
            while True:
                begin, end = next_chunk()
                if begin == end:
                    return
                work(begin, end)
        finally:
            _chunk.running = False

    try:
        _helpers.run(take_chunks, threads - 1)
    finally:
        _helpers.busy.release()
