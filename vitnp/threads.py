"""How many cores vitnp uses, and how: the BLAS's threads and the split of a batch across threads.

Two ways to use 2 cores, each where it pays (figures in benchmarks/README.md):

- **One image**: the work of each op is cut into chunks that the threads take in turn, inside the Numba kernel and
  without the GIL (:func:`run_shared`): the output columns of every Linear (vitnp's own GEMM,
  :func:`vitnp.kernels.linear`), the (image or window, head) pairs of attention, the rows of LayerNorm, GELU and
  softmax, the runs of output rows of MobileViT's MV2 block, the sequences of its transformer blocks. Handed over
  through the GIL, one Python call per chunk, a 1.2 ms GELU took as long on two threads as on one; this way it takes
  0.6-0.8 ms.
- **A batch**: :func:`map_batch` cuts it into one chunk per thread and runs the whole forward of each chunk on its
  own thread with a single-threaded BLAS (GEMMs, Numba kernels and NumPy all release the GIL). Nothing waits for
  or spins against anything else, and a 2-thread forward of a batch of 8 takes ~25% less time than with the BLAS's
  own threads.

Only NumPy's own OpenBLAS (the wheels bundle it) is controlled; with another BLAS its threads are left alone.

Importing this module also fixes glibc malloc's thresholds, so that a forward reuses the memory of the one before
(:func:`_keep_freed_memory`: with the moving thresholds, page faults kept two threads from sharing the work).
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
_chunk = threading.local()  # .running is True on a thread computing a batch chunk or single_threaded: no split


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
    """Run the ``with`` body on the calling thread alone: the BLAS on one thread, and vitnp's shared kernels
    (:func:`run_shared`) inline; then restore the BLAS's thread count.

    Safe from several threads at once: the BLAS stays on one thread until the last of them leaves.
    """
    running_before = getattr(_chunk, "running", False)
    _chunk.running = True
    try:
        with _blas_single_threaded():
            yield
    finally:
        _chunk.running = running_before


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

    The chunks run on the calling thread and the helpers of :func:`run_shared`, which are spinning or quick to wake
    (a chunk of one image's work, a few milliseconds, does not wait for a sleeping pool thread); while another thread
    has the helpers, on a thread pool.
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
    results = [None] * threads

    def run_chunks(schedule, job):  # the job of the calling thread and the helpers: the chunks each takes
        from . import kernels

        begin, end = kernels.take_chunk(schedule, job)
        while begin < end:
            for index in range(begin, end):
                results[index] = run_chunk(chunks[index])
            begin, end = kernels.take_chunk(schedule, 0)

    with single_threaded():
        if _helpers.busy.acquire(blocking=False):
            try:
                _helpers.run(run_chunks, (), threads, min(threads - 1, _MAX_HELPERS))
            finally:
                _helpers.busy.release()
        else:
            results = list(_thread_pool(get_num_threads()).map(run_chunk, chunks))
    return np.concatenate(results)


# How long a waiting thread spins before it goes to sleep (as reads of a flag, counted on this machine when the first
# helper starts). 0.07 ms had been enough back to back, but in a forward whose caches other work had emptied the gaps
# between two shared kernels grew long enough for the helper to fall asleep again and again (not the Python between
# them, which a sweep leaves as fast): mobilevit_s batch 1 on two threads after a cache sweep 37.2-44.7 ms with
# 0.07 ms, 31.7-36.6 with 0.5 (31.0-31.5 warm either way; benchmarks/README.md).
_SPIN_SECONDS = 0.0005
# Work of fewer multiply-adds (or the equivalent) than this runs on the calling thread alone: handing a kernel's
# chunks to a helper costs ~25 microseconds here, about this much work on one core.
MIN_SHARED_MACS = 1 << 23
_MAX_HELPERS = 255


class _Helpers:
    """Threads that run the chunks of a shared kernel (:func:`run_shared`) beside the calling thread.

    A job and its progress live in ``schedule``, an int64 array the kernels update atomically (its slots are named in
    :mod:`vitnp.kernels`: JOB, NEXT, TOTAL, THREADS, FINISHED). Between jobs a helper spins on schedule[JOB] in a Numba
    loop that holds no GIL, for ``spins`` reads (:data:`_SPIN_SECONDS`), and only then sleeps: the ops of a forward come
    a fraction of a millisecond apart, and waking a sleeping thread took 0.1 to 0.5 ms on these 2-core virtual machines.
    """

    def __init__(self):
        self.busy = threading.Lock()  # one job at a time; a second caller meanwhile runs its work alone
        self.wakeup = threading.Condition()
        self.sleeping = 0  # helpers asleep on ``wakeup``
        self.schedule = None  # made with the first helper (vitnp.kernels, which names its slots, imports this module)
        self.started = 0
        self.spins = None  # reads of schedule[JOB] in _SPIN_SECONDS, measured with the first helper
        self.job = None  # (function, arguments, how many helpers take part)
        self.errors = []

    def run(self, kernel, arguments, total, helpers):
        """``kernel(*arguments, schedule, job)`` on the calling thread and on ``helpers`` helper threads at once, over
        ``total`` items; returns when all are done. The kernel announces the job itself once it has let go of the GIL;
        if a helper sleeps, the job is announced here instead, before waking it, and the kernel gets ``job`` 0."""
        from . import kernels

        if self.started < helpers:
            self._start(helpers)
        schedule = self.schedule
        schedule[kernels.NEXT] = 0
        schedule[kernels.TOTAL] = total
        schedule[kernels.THREADS] = helpers + 1
        self.job = (kernel, arguments, helpers)
        job = int(schedule[kernels.JOB]) + 1
        announce = job  # by the kernel
        if self.sleeping:
            schedule[kernels.JOB] = job
            announce = 0
            with self.wakeup:
                self.wakeup.notify_all()
        try:
            kernel(*arguments, schedule, announce)
        finally:
            if schedule[kernels.JOB] != job:  # the call failed before the kernel ran: the helpers try it and finish
                schedule[kernels.JOB] = job
            while not kernels.wait_finished(schedule, helpers, job, self.spins):
                with self.wakeup:  # a helper went to sleep just as the job came, or the machine descheduled it
                    self.wakeup.notify_all()
                time.sleep(0.0001)
            errors, self.errors = self.errors, []  # this job's, whether or not the calling thread's part raised
        if errors:
            raise errors[0]

    def _start(self, helpers):
        from . import kernels

        if self.schedule is None:
            self.schedule = np.zeros(kernels.FINISHED + _MAX_HELPERS, np.int64)
            self.spins = _spins_in(_SPIN_SECONDS)
        job = self.schedule[kernels.JOB]
        for index in range(self.started, helpers):
            self.schedule[kernels.FINISHED + index] = job
            threading.Thread(target=self._loop, args=(index, int(job)), name=f"vitnp-{index}", daemon=True).start()
        self.started = helpers

    def _loop(self, index, seen):
        # seen: the last job before this helper started (a job announced before the thread first runs is picked up)
        from . import kernels

        schedule = self.schedule
        while True:
            if not kernels.finish_and_wait(schedule, index, seen, self.spins):
                with self.wakeup:
                    self.sleeping += 1
                    # A job announced (without the lock) just as this helper gave up spinning finds ``sleeping`` still
                    # 0 and wakes no one: the first waits are short (1, 2, 4, ... 32 ms), so such a job is picked up
                    # that late at most (later than that, the calling thread wakes the helpers once its part is done).
                    timeout = 0.001
                    while schedule[kernels.JOB] == seen:
                        self.wakeup.wait(timeout)
                        timeout = 2 * timeout if timeout is not None and timeout < 0.032 else None
                    self.sleeping -= 1
            seen = int(schedule[kernels.JOB])
            kernel, arguments, helpers = self.job
            if index < helpers:
                try:
                    kernel(*arguments, schedule, 0)
                except BaseException as error:  # handed to the caller, which raises it
                    self.errors.append(error)


def _spins_in(seconds):
    """How many reads of a flag :func:`vitnp.kernels.finish_and_wait` makes in ``seconds`` on this machine (the
    fastest of three timings of 2^16 reads: ~0.27 ns a read on AVX-512 Zen 4, ~2 on AVX2 Zen 3)."""
    from . import kernels

    schedule = np.zeros(kernels.FINISHED + 1, np.int64)  # job 0, never followed by another: every read is made
    reads = 1 << 16
    fastest = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        kernels.finish_and_wait(schedule, 0, 0, reads)
        fastest = min(fastest, time.perf_counter() - start)
    return max(reads, int(seconds / fastest * reads))


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


def _alone(total):
    """A schedule for one thread: the whole range in one chunk."""
    from . import kernels

    schedule = np.zeros(kernels.FINISHED, np.int64)
    schedule[kernels.TOTAL] = total
    schedule[kernels.THREADS] = 1
    return schedule


def run_shared(kernel, arguments, total, macs):
    """``kernel(*arguments, schedule, job)`` on the calling thread and the helper threads at once: ``kernel`` is a
    Numba kernel that holds no GIL and takes its chunks of ``range(total)`` with :func:`vitnp.kernels.take_chunk`.

    It runs on the calling thread alone, the whole range as one chunk, when its work, ``macs`` multiply-adds or the
    equivalent, is below :data:`MIN_SHARED_MACS`; inside a chunk of :func:`map_batch` or a :func:`single_threaded`
    section; with one thread or one item; and while another thread's kernel has the helpers.
    """
    helpers = min(get_num_threads(), _MAX_HELPERS + 1) - 1
    if (
        macs < MIN_SHARED_MACS
        or helpers < 1
        or total < 2
        or getattr(_chunk, "running", False)
        or not _helpers.busy.acquire(blocking=False)
    ):
        kernel(*arguments, _alone(total), 0)
        return
    try:
        _helpers.run(kernel, arguments, total, helpers)
    finally:
        _helpers.busy.release()


# glibc's malloc returns the free memory at the top of its heap to the system once there is more than a threshold of
# it, and serves each block above another threshold with a mapping of its own; it moves both thresholds as blocks come
# and go. A forward allocates and frees activations of a few MiB each, and depending on the order of earlier calls the
# thresholds settled where these pages were given back and faulted in again on every forward: 2,500 page faults per
# mobilevit_s forward, taken by both threads as they first wrote each output, and the high-resolution blocks ran no
# faster on two threads than on one. Fixed thresholds keep that memory in the heap for the next forward (A/B,
# benchmarks/README.md: mobilevit_s batch 1 0.96, batch 8 0.91; ViT and Swin unchanged).
_MMAP_THRESHOLD = 32 << 20  # blocks up to this size come from the heap (glibc's largest allowed value)
_TRIM_THRESHOLD = 256 << 20  # free memory kept at the top of the heap before any is given back
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)


def _keep_freed_memory():
    """Fix glibc malloc's thresholds (above) for this process, unless ``VITNP_SYSTEM_MALLOC=1``; elsewhere, nothing."""
    if os.environ.get("VITNP_SYSTEM_MALLOC") == "1":
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt  # glibc; musl and other C libraries have no mallopt
    except (OSError, AttributeError, TypeError):  # TypeError: Windows, where CDLL needs a name
        return
    mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
    mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)


_keep_freed_memory()
