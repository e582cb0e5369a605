"""The fast backend's threads: a kernel's work shared between the calling thread and helper threads without the GIL
(:func:`run_shared`), and a batch cut into one chunk per thread (:func:`map_batch`).

Two ways to use the cores, each where it pays:

- **One image**: the work of each op is cut into chunks that the threads take in turn, inside the Numba kernel and
  without the GIL: the output columns of every Linear, the (image or window, head) pairs of attention, the rows of
  LayerNorm, GELU and softmax, the runs of output rows of MobileViT's MV2 block, the sequences of its transformer
  blocks. A thread that waits for the GIL sleeps, and waking it costs more than a small op takes: handed over through
  the GIL, one Python call per chunk, the threads gained nothing.
- **A batch**: :func:`map_batch` cuts it into one chunk per thread and runs the whole forward of each chunk on its own
  thread with a single-threaded BLAS (GEMMs, Numba kernels and NumPy all release the GIL), so that nothing waits for
  or spins against anything else.

The protocol the kernels and the helpers follow is :mod:`vitnp.fast.schedule`'s.
"""

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .. import threads
from .schedule import FINISHED, JOB, NEXT, THREADS, TOTAL, finish_and_wait, take_chunk, wait_finished

# One value of LayerNorm, GELU or softmax costs about as much time as this many multiply-adds of a GEMM, and one value
# copied (im2col) as MACS_PER_COPY: the units of run_shared's decision whether a kernel is worth sharing out.
MACS_PER_VALUE = 128
MACS_PER_COPY = 32

_lock = threading.Lock()
_pool = None  # (threads, ThreadPoolExecutor) for map_batch while another thread has the helpers


def _thread_pool(count):
    global _pool
    with _lock:
        if _pool is None or _pool[0] != count:
            if _pool is not None:
                _pool[1].shutdown(wait=False)
            _pool = (count, ThreadPoolExecutor(count, thread_name_prefix="vitnp"))
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
    count = min(threads.get_num_threads(), len(x))
    if count < 2 or threads.is_alone():
        return forward(x)

    def run_chunk(chunk):
        with threads.alone():
            return forward(chunk)

    chunks = np.array_split(x, count)
    results = [None] * count

    def run_chunks(schedule, job):  # the job of the calling thread and the helpers: the chunks each takes
        begin, end = take_chunk(schedule, job)
        while begin < end:
            for index in range(begin, end):
                results[index] = run_chunk(chunks[index])
            begin, end = take_chunk(schedule, 0)

    with threads.single_threaded():
        if _helpers.busy.acquire(blocking=False):
            try:
                _helpers.run(run_chunks, (), count, min(count - 1, _MAX_HELPERS))
            finally:
                _helpers.busy.release()
        else:
            results = list(_thread_pool(threads.get_num_threads()).map(run_chunk, chunks))
    return np.concatenate(results)


# How long a waiting thread spins before it goes to sleep (as reads of a flag, counted on this machine when the first
# helper starts): long enough to bridge the gaps between two shared kernels of a forward even when other work has
# emptied the caches and the kernels run slower, so that a helper does not fall asleep between them.
_SPIN_SECONDS = 0.0005
# Work of fewer multiply-adds (or the equivalent) than this runs on the calling thread alone: handing a kernel's
# chunks to a helper costs about as much as this much work on one core.
MIN_SHARED_MACS = 1 << 23
_MAX_HELPERS = 255


class _Helpers:
    """Threads that run the chunks of a shared kernel (:func:`run_shared`) beside the calling thread.

    A job and its progress live in ``schedule``, an int64 array the kernels update atomically (its slots are named in
    :mod:`vitnp.fast.schedule`: JOB, NEXT, TOTAL, THREADS, FINISHED). Between jobs a helper spins on schedule[JOB] in a
    Numba loop that holds no GIL, for ``spins`` reads (:data:`_SPIN_SECONDS`), and only then sleeps: the ops of a
    forward come a fraction of a millisecond apart, closer than a sleeping thread wakes on a virtual machine.
    """

    def __init__(self):
        self.busy = threading.Lock()  # one job at a time; a second caller meanwhile runs its work alone
        self.wakeup = threading.Condition()
        self.sleeping = 0  # helpers asleep on ``wakeup``
        self.schedule = None  # made with the first helper
        self.started = 0
        self.spins = None  # reads of schedule[JOB] in _SPIN_SECONDS, measured with the first helper
        self.job = None  # (function, arguments, how many helpers take part)
        self.errors = []

    def run(self, kernel, arguments, total, helpers):
        """``kernel(*arguments, schedule, job)`` on the calling thread and on ``helpers`` helper threads at once, over
        ``total`` items; returns when all are done. The kernel announces the job itself once it has let go of the GIL;
        if a helper sleeps, the job is announced here instead, before waking it, and the kernel gets ``job`` 0."""
        if self.started < helpers:
            self._start(helpers)
        schedule = self.schedule
        schedule[NEXT] = 0
        schedule[TOTAL] = total
        schedule[THREADS] = helpers + 1
        self.job = (kernel, arguments, helpers)
        job = int(schedule[JOB]) + 1
        announce = job  # by the kernel
        if self.sleeping:
            schedule[JOB] = job
            announce = 0
            with self.wakeup:
                self.wakeup.notify_all()
        try:
            kernel(*arguments, schedule, announce)
        finally:
            if schedule[JOB] != job:  # the call failed before the kernel ran: the helpers try it and finish
                schedule[JOB] = job
            while not wait_finished(schedule, helpers, job, self.spins):
                with self.wakeup:  # a helper went to sleep just as the job came, or the machine descheduled it
                    self.wakeup.notify_all()
                time.sleep(0.0001)
            errors, self.errors = self.errors, []  # this job's, whether or not the calling thread's part raised
        if errors:
            raise errors[0]

    def _start(self, helpers):
        if self.schedule is None:
            self.schedule = np.zeros(FINISHED + _MAX_HELPERS, np.int64)
            self.spins = _spins_in(_SPIN_SECONDS)
        job = self.schedule[JOB]
        for index in range(self.started, helpers):
            self.schedule[FINISHED + index] = job
            threading.Thread(target=self._loop, args=(index, int(job)), name=f"vitnp-{index}", daemon=True).start()
        self.started = helpers

    def _loop(self, index, seen):
        # seen: the last job before this helper started (a job announced before the thread first runs is picked up)
        schedule = self.schedule
        while True:
            if not finish_and_wait(schedule, index, seen, self.spins):
                with self.wakeup:
                    self.sleeping += 1
                    # A job announced (without the lock) just as this helper gave up spinning finds ``sleeping`` still
                    # 0 and wakes no one: the first waits are short (1, 2, 4, ... 32 ms), so such a job is picked up
                    # that late at most (later than that, the calling thread wakes the helpers once its part is done).
                    timeout = 0.001
                    while schedule[JOB] == seen:
                        self.wakeup.wait(timeout)
                        timeout = 2 * timeout if timeout is not None and timeout < 0.032 else None
                    self.sleeping -= 1
            seen = int(schedule[JOB])
            kernel, arguments, helpers = self.job
            if index < helpers:
                try:
                    kernel(*arguments, schedule, 0)
                except BaseException as error:  # handed to the caller, which raises it
                    self.errors.append(error)


def _spins_in(seconds):
    """How many reads of a flag :func:`vitnp.fast.schedule.finish_and_wait` makes in ``seconds`` on this machine (the
    fastest of three timings of 2^16 reads: a read's time varies several-fold between CPUs)."""
    schedule = np.zeros(FINISHED + 1, np.int64)  # job 0, never followed by another: every read is made
    reads = 1 << 16
    fastest = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        finish_and_wait(schedule, 0, 0, reads)
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


def _one_chunk(total):
    """A schedule for one thread: the whole range in one chunk."""
    schedule = np.zeros(FINISHED, np.int64)
    schedule[TOTAL] = total
    schedule[THREADS] = 1
    return schedule


def run_shared(kernel, arguments, total, macs):
    """``kernel(*arguments, schedule, job)`` on the calling thread and the helper threads at once: ``kernel`` is a
    Numba kernel that holds no GIL and takes its chunks of ``range(total)`` with :func:`vitnp.fast.schedule.take_chunk`.

    It runs on the calling thread alone, the whole range as one chunk, when its work, ``macs`` multiply-adds or the
    equivalent, is below :data:`MIN_SHARED_MACS`; inside a chunk of :func:`map_batch` or a
    :func:`vitnp.threads.single_threaded` section; with one thread or one item; and while another thread's kernel has
    the helpers.
    """
    helpers = min(threads.get_num_threads(), _MAX_HELPERS + 1) - 1
    if (
        macs < MIN_SHARED_MACS
        or helpers < 1
        or total < 2
        or threads.is_alone()
        or not _helpers.busy.acquire(blocking=False)
    ):
        kernel(*arguments, _one_chunk(total), 0)
        return
    try:
        _helpers.run(kernel, arguments, total, helpers)
    finally:
        _helpers.busy.release()
