"""The protocol by which threads share a kernel's work without the GIL: the leaf both the pool and the kernels import.

A shared kernel is a loop over chunks of its rows (or GEMM panels) that it takes from a schedule until none is left:
the calling thread and :mod:`vitnp.fast.pool`'s helper threads run the same kernel on the same arrays at once, and a
chunk goes to whichever thread asks first. The schedule is a small int64 array the threads read and update atomically;
its slots are named below. The calling thread announces the job from inside the kernel, where it no longer holds the
GIL, and a helper marks a job finished from inside its waiting loop, where it no longer holds it either: so no thread
ever waits for the GIL in a hand-off (a thread that waits for the GIL sleeps, and waking it costs more than a small
op takes).
"""

import numba
import numpy as np
from numba.extending import intrinsic

JOB = 0  # schedule[JOB]: the number of the job being run (announced by the calling thread)
NEXT = 1  # schedule[NEXT]: the first item no thread has taken yet
TOTAL = 2  # schedule[TOTAL]: the number of items
THREADS = 3  # schedule[THREADS]: how many threads take part
FINISHED = 4  # schedule[FINISHED + i]: the last job helper i has finished
# take_chunk's ``job`` for a thread's later chunks: nothing to announce. An int64, not a literal 0: Numba compiles a
# jitted function once more for each literal argument a jitted caller passes it (Literal[int](0)).
NO_JOB = np.int64(0)


def element_pointer(context, builder, array_type, array, index):
    """Address of element ``index`` of a 1-D C-contiguous array (no bounds check, no negative wrap-around)."""
    return builder.gep(context.make_array(array_type)(context, builder, array).data, [index])


@intrinsic
def load_acquire(typingctx, array, index):
    """``array[index]`` read from memory on every call (an atomic acquire load): another thread may change it."""

    def codegen(context, builder, signature, args):
        pointer = element_pointer(context, builder, signature.args[0], *args)
        return builder.load_atomic(pointer, "acquire", array.dtype.bitwidth // 8)

    return array.dtype(array, index), codegen


@intrinsic
def store_release(typingctx, array, index, value):
    """``array[index] = value`` as an atomic release store: what this thread wrote before is visible with it."""

    def codegen(context, builder, signature, args):
        array_value, index_value, value_value = args
        pointer = element_pointer(context, builder, signature.args[0], array_value, index_value)
        builder.store_atomic(value_value, pointer, "release", array.dtype.bitwidth // 8)
        return context.get_dummy_value()

    return numba.types.void(array, index, array.dtype), codegen


@intrinsic
def compare_exchange(typingctx, array, index, expected, new):
    """Atomically: if ``array[index] == expected``, set it to ``new`` and return True; else change nothing, False."""

    def codegen(context, builder, signature, args):
        array_value, index_value, expected_value, new_value = args
        pointer = element_pointer(context, builder, signature.args[0], array_value, index_value)
        swapped = builder.extract_value(builder.cmpxchg(pointer, expected_value, new_value, "acq_rel", "acquire"), 1)
        return context.cast(builder, swapped, numba.types.boolean, numba.types.boolean)

    return numba.types.boolean(array, index, array.dtype, array.dtype), codegen


@numba.njit(cache=True, nogil=True)
def take_chunk(schedule, job):
    """The next chunk (begin, end) of the schedule's items for this thread; (total, total) when none is left. A
    nonzero ``job`` is announced first (the calling thread's first chunk of a job it has not announced yet).

    Each chunk is a 1 / (2 * threads) share of what is left, at least one item: big at first (few claims), small at
    the end (no thread waits long for another's last chunk), and a thread the machine slows down takes fewer of them.
    With one thread it is the whole range at once.
    """
    if job:
        store_release(schedule, JOB, job)
    total = schedule[TOTAL]
    parts = 2 * schedule[THREADS]
    while True:
        begin = load_acquire(schedule, NEXT)
        if begin >= total:
            return total, total
        end = total if parts <= 2 else min(total, begin + max(1, (total - begin) // parts))
        if compare_exchange(schedule, NEXT, begin, end):
            return begin, end


@numba.njit(cache=True, nogil=True)
def one_thread_schedule(total):
    """A schedule of ``total`` items for a shared kernel that another kernel calls on its own thread: take_chunk hands
    them all over at once."""
    schedule = np.zeros(FINISHED + 1, np.int64)
    schedule[TOTAL] = total
    schedule[THREADS] = 1
    return schedule


@numba.njit(cache=True, nogil=True)
def finish_and_wait(schedule, helper, job, spins):
    """For helper ``helper``: mark ``job`` finished, then spin (without the GIL) until another job is announced; False
    after ``spins`` reads without one. Spinning for a fraction of a millisecond costs less than sleeping and being
    woken on a virtual machine, and the ops of a forward come that close together."""
    store_release(schedule, FINISHED + helper, job)
    for _ in range(spins):
        if load_acquire(schedule, JOB) != job:
            return True
    return False


@numba.njit(cache=True, nogil=True)
def wait_finished(schedule, helpers, job, spins):
    """For the calling thread: spin (without the GIL) until helpers 0 .. ``helpers`` - 1 have finished ``job``; False
    after ``spins`` rounds of reads without it."""
    for _ in range(spins):
        finished = True
        for helper in range(helpers):
            if load_acquire(schedule, FINISHED + helper) != job:
                finished = False
        if finished:
            return True
    return False
