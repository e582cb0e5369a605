"""Threads: vitnp.set_num_threads / get_num_threads and the BLAS's single-threaded sections (vitnp.threads), the fast
backend's batch chunks and shared kernels (vitnp.fast.pool, on vitnp.fast.schedule's protocol), and what vitnp does
to the process (vitnp.memory: nothing on import, malloc's thresholds on request).

No oracle needed: a batch computed in chunks must equal the images computed alone (to GEMM rounding: the BLAS picks
its blocking by the number of rows), an op shared out between threads must equal the same op run serially bit for bit
(each output is the same chain of operations), and the BLAS's thread count must come back to what it was.
"""

import json
import os
import platform
import subprocess
import sys
import threading
import time

import numba
import numpy as np
import pytest
from tolerances import assert_close

import vitnp
from vitnp import threads
from vitnp.fast import conv, gemm, pool, schedule

on_glibc = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc's malloc"
)


@pytest.fixture
def restore_threads():
    before = threads.get_num_threads()
    yield
    vitnp.set_num_threads(before)


def _blas_threads():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    pools = [p for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas" and "openblas" in p["internal_api"]]
    if threads._OPENBLAS is None or not pools:
        pytest.skip("NumPy's BLAS is not an OpenBLAS vitnp controls")
    return threads._OPENBLAS[1]()


# ---- thread counts and sections --------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True])
def test_set_num_threads_rejects_non_positive_integers(bad):
    with pytest.raises(ValueError, match="positive integer"):
        vitnp.set_num_threads(bad)


def test_set_num_threads_sets_the_blas_threads(restore_threads):
    vitnp.set_num_threads(1)
    assert vitnp.get_num_threads() == 1
    assert _blas_threads() == 1
    vitnp.set_num_threads(3)
    assert vitnp.get_num_threads() == 3
    assert _blas_threads() == 3


def test_single_threaded_restores_the_blas_threads_when_the_last_thread_leaves(restore_threads):
    vitnp.set_num_threads(2)
    assert _blas_threads() == 2
    inside, release = threading.Barrier(3), threading.Event()
    observed = []

    def worker():
        with threads.single_threaded():
            inside.wait()
            release.wait()
            observed.append((threads._OPENBLAS[1](), threads.is_alone()))

    workers = [threading.Thread(target=worker) for _ in range(2)]
    for w in workers:
        w.start()
    inside.wait()
    assert _blas_threads() == 1
    release.set()
    for w in workers:
        w.join()
    assert observed == [(1, True), (1, True)]  # the first to leave did not restore two threads under the other
    assert _blas_threads() == 2


def test_alone_marks_the_calling_thread_only_and_nests():
    seen_elsewhere = []
    with threads.alone():
        with threads.alone():
            assert threads.is_alone()
        assert threads.is_alone()  # the inner section restored what it found
        other = threading.Thread(target=lambda: seen_elsewhere.append(threads.is_alone()))
        other.start()
        other.join()
    assert not threads.is_alone() and seen_elsewhere == [False]


# ---- batches ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_threads, batch, sizes", [(1, 5, [5]), (2, 1, [1]), (2, 5, [3, 2]), (3, 7, [3, 2, 2])])
def test_map_batch_runs_one_chunk_per_thread(restore_threads, n_threads, batch, sizes):
    vitnp.set_num_threads(n_threads)
    seen = []

    def forward(chunk):
        seen.append((len(chunk), threading.get_ident(), threads._OPENBLAS[1]() if threads._OPENBLAS else 1))
        time.sleep(0.05)  # long enough for every thread to take a chunk (the chunks go to whichever thread is free)
        return chunk * 2.0

    x = np.arange(batch * 3, dtype=np.float32).reshape(batch, 3)
    np.testing.assert_array_equal(pool.map_batch(forward, x), x * 2.0)  # chunks come back in order
    assert sorted(size for size, _, _ in seen) == sorted(sizes)
    if len(sizes) > 1:
        assert all(blas == 1 for _, _, blas in seen)  # each chunk's GEMMs run on its own thread only
        assert len({ident for _, ident, _ in seen}) == len(sizes)  # the calling thread and the helpers, one each


def test_map_batch_runs_on_the_pool_while_another_thread_has_the_helpers(restore_threads):
    vitnp.set_num_threads(2)
    seen = []

    def forward(chunk):
        seen.append(threading.get_ident())
        return chunk - 1.0

    x = np.arange(6, dtype=np.float32).reshape(3, 2)
    with pool._helpers.busy:  # as while another thread's kernel runs on them
        np.testing.assert_array_equal(pool.map_batch(forward, x), x - 1.0)
    assert len(seen) == 2 and threading.get_ident() not in seen


def test_map_batch_inside_a_chunk_runs_inline(restore_threads):
    vitnp.set_num_threads(2)  # both threads busy with the outer chunks: a nested split would wait forever
    inner_threads = []

    def inner(chunk):
        inner_threads.append(threading.get_ident())
        return chunk + 1.0

    def outer(chunk):
        result = pool.map_batch(inner, chunk)
        assert inner_threads[-1] == threading.get_ident()  # ran here, not on another pool thread
        return result

    x = np.zeros((4, 2), np.float32)
    results = []
    caller = threading.Thread(target=lambda: results.append(pool.map_batch(outer, x)), daemon=True)
    caller.start()
    caller.join(timeout=30)
    assert not caller.is_alive(), "a split inside a chunk waits on its own busy pool"
    np.testing.assert_array_equal(results[0], x + 1.0)
    assert len(inner_threads) == 2


def _small_model(name):
    overrides = {
        "vit_tiny_patch16_224": dict(img_size=64, depth=2),
        "swin_tiny_patch4_window7_224": dict(img_size=64, window_size=4, depths=(2, 2), num_heads=(2, 4), embed_dim=32),
        "mobilevit_xxs": dict(img_size=64),
    }[name]
    return vitnp.create_model(name, seed=0, **overrides)


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "swin_tiny_patch4_window7_224", "mobilevit_xxs"])
def test_a_batch_split_across_threads_equals_the_images_alone(restore_threads, name):
    model = _small_model(name)
    x = np.random.default_rng(1).standard_normal((5, 3, *model.img_size)).astype(np.float32)
    vitnp.set_num_threads(1)
    alone = np.concatenate([model(x[i : i + 1]) for i in range(len(x))])
    vitnp.set_num_threads(2)
    batched = model(x)
    assert batched.shape == alone.shape and batched.dtype == np.float32
    assert_close(batched, alone, "model")
    assert np.abs(batched - alone).max() < 1e-5  # rounding only; a mixed-up chunk would move logits by O(1)


# ---- kernels shared out between threads ------------------------------------------------------------------------------


@pytest.fixture
def share_everything(monkeypatch, restore_threads):
    """Two threads, and every op shared out between them however small (the size threshold set to 0)."""
    monkeypatch.setattr(pool, "MIN_SHARED_MACS", 0)
    vitnp.set_num_threads(2)


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "swin_tiny_patch4_window7_224", "mobilevit_xxs"])
def test_ops_shared_out_between_threads_equal_the_serial_forward(share_everything, monkeypatch, name):
    # At batch 1 every GEMM, attention and row kernel is cut into chunks for two threads: each output is still
    # computed by the same arithmetic in the same order, so the logits are bit-identical to those of the same
    # forward with nothing shared out.
    model = _small_model(name)
    x = np.random.default_rng(1).standard_normal((1, 3, *model.img_size)).astype(np.float32)
    shared = model(x)
    monkeypatch.setattr(pool, "MIN_SHARED_MACS", 2**62)
    np.testing.assert_array_equal(shared, model(x))


@pytest.mark.parametrize("l2_bytes", [1, 30_000, 1 << 19])
def test_a_shared_conv2d_split_by_bands_and_panels_equals_the_serial_one(share_everything, monkeypatch, l2_bytes):
    # conv2d's items are (band of output rows, panel) pairs: a thread builds a band's im2col rows once for its run of
    # panels over it, and the two threads' runs start and end anywhere (bands of 1 and 2 rows here, or the whole map,
    # 3 panels of 32 float32 columns with AVX-512, the last cut short). Every output is the serial product's: bit
    # for bit, its residual's add (sliced to the band) included.
    rng = np.random.default_rng(l2_bytes)
    maps = tuple(rng.standard_normal((2, 12, 10, c)).astype(np.float32) for c in (24, 8))
    packed = gemm.pack_linear_weight((rng.standard_normal((70, 9 * 32)) * 0.1).astype(np.float32))
    bias, residual = rng.standard_normal(70).astype(np.float32), rng.standard_normal((2, 12, 10, 70)).astype(np.float32)
    monkeypatch.setattr(conv, "L2_ROWS_BYTES", l2_bytes)
    shared = conv.conv2d(maps, packed, 3, 1, 1, bias, "silu", residual=residual)
    monkeypatch.setattr(pool, "MIN_SHARED_MACS", 2**62)
    np.testing.assert_array_equal(shared, conv.conv2d(maps, packed, 3, 1, 1, bias, "silu", residual=residual))
    np.testing.assert_array_equal(shared, gemm.linear(conv.im2col(maps, 3, 1, 1), packed, bias, "silu",
                                                      residual=residual))


@pytest.mark.parametrize(("rows", "depth", "out_features"), [(5000, 200, 40), (2000, 24, 300), (700, 64, 7)])
def test_a_shared_gemm_split_by_rows_and_panels_equals_the_serial_one(share_everything, monkeypatch, rows, depth,
                                                                      out_features):
    # A tall product with few panels is shared out by (block of rows, panel) pairs (5000 x 200: 8 blocks of 655 rows x
    # 3 panels, the last cut short); one with many panels by panels alone. Either way each output is the same chain of
    # multiply-adds as in the serial product, its activation and residual add included: equal bit for bit.
    rng = np.random.default_rng(rows)
    x = rng.standard_normal((rows, depth)).astype(np.float32)
    weight = (rng.standard_normal((out_features, depth)) / np.sqrt(depth)).astype(np.float32)
    bias, residual = rng.standard_normal(out_features).astype(np.float32), rng.standard_normal((rows, out_features))
    packed = gemm.pack_linear_weight(weight)
    shared = gemm.linear(x, packed, bias, "silu", residual=residual.astype(np.float32))
    monkeypatch.setattr(pool, "MIN_SHARED_MACS", 2**62)
    np.testing.assert_array_equal(shared, gemm.linear(x, packed, bias, "silu", residual=residual.astype(np.float32)))
    expected = x.astype(np.float64) @ weight.T.astype(np.float64) + bias
    # "layer": a GEMM, an activation and an add, whose sum cancels to ~1e-2 in places (2e-6 off in float32)
    assert_close(shared, expected / (1 + np.exp(-expected)) + residual, "layer")


# Shared Numba kernels (pool.run_shared): the chunks are taken inside compiled code, without the GIL.


@numba.njit(nogil=True)
def _count_items(counts, chunks, schedule_, job):
    begin, end = schedule.take_chunk(schedule_, job)
    while begin < end:
        chunks[begin] = end  # each chunk's start: where it ends (the chunks are disjoint, so no two threads race)
        for i in range(begin, end):
            counts[i] += 1
        begin, end = schedule.take_chunk(schedule_, 0)


@numba.njit(nogil=True)
def _first_chunk_waits_for_another_thread(met, spins, schedule_, job):
    begin, end = schedule.take_chunk(schedule_, job)
    if begin == 0:  # the first chunk's thread holds on to it until another thread has taken the next chunk
        for _ in range(spins):
            if schedule.load_acquire(schedule_, schedule.NEXT) != end:
                met[0] = 1
                break
    while begin < end:
        begin, end = schedule.take_chunk(schedule_, 0)


@pytest.mark.parametrize("total", [1, 2, 7, 64, 1000])
def test_run_shared_covers_every_item_once(share_everything, total):
    counts, chunks = np.zeros(total, np.int64), np.zeros(total, np.int64)
    pool.run_shared(_count_items, (counts, chunks), total, macs=1)
    np.testing.assert_array_equal(counts, 1)
    starts = np.flatnonzero(chunks)
    assert starts[0] == 0 and (chunks[starts[:-1]] == starts[1:]).all() and chunks[starts[-1]] == total


def test_run_shared_runs_on_a_second_thread(share_everything):
    met = np.zeros(1, np.int64)
    # Compiled first: a helper that finds no job for ~0.5 ms sleeps, and one that fell asleep while the calling thread
    # compiled the kernel is woken only after the kernel returns (it would then wait 2^31 reads for nothing).
    pool.run_shared(_first_chunk_waits_for_another_thread, (met, 0), 8, macs=1)
    pool.run_shared(_first_chunk_waits_for_another_thread, (met, 1 << 31), 8, macs=1)
    assert met[0] == 1  # alone, the first chunk's thread would have given up after 2^31 reads


def test_run_shared_runs_alone_in_one_chunk_when_small_or_nested(restore_threads):
    vitnp.set_num_threads(2)
    counts, chunks = np.zeros(100, np.int64), np.zeros(100, np.int64)
    pool.run_shared(_count_items, (counts, chunks), 100, macs=pool.MIN_SHARED_MACS - 1)
    assert list(np.flatnonzero(chunks)) == [0] and chunks[0] == 100  # below the threshold: one chunk, all of it

    def chunk_starts(x):
        counts, chunks = np.zeros(10, np.int64), np.zeros(10, np.int64)
        pool.run_shared(_count_items, (counts, chunks), 10, macs=pool.MIN_SHARED_MACS)
        return np.flatnonzero(chunks)[None]

    assert pool.map_batch(chunk_starts, np.zeros(4)).tolist() == [[0]] * 2  # in a batch's chunks: one chunk each
    with threads.single_threaded():
        assert chunk_starts(None).tolist() == [[0]]
    assert chunk_starts(None).tolist() != [[0]]  # and shared out again after it


def test_run_shared_raises_a_failed_call_once_and_the_helpers_still_work(share_everything):
    with pytest.raises(numba.core.errors.TypingError):
        pool.run_shared(_count_items, ("not an array", None), 8, macs=1)  # fails on every thread, before any chunk
    counts, chunks = np.zeros(8, np.int64), np.zeros(8, np.int64)
    pool.run_shared(_count_items, (counts, chunks), 8, macs=1)  # nothing stale is raised, every item done once
    np.testing.assert_array_equal(counts, 1)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_runs_shared_kernels_with_its_own_helpers(share_everything):
    pool.run_shared(_first_chunk_waits_for_another_thread, (np.zeros(1, np.int64), 0), 8, macs=1)  # compiled
    pid = os.fork()
    if pid == 0:
        import signal

        signal.alarm(20)
        met = np.zeros(1, np.int64)
        pool.run_shared(_first_chunk_waits_for_another_thread, (met, 1 << 31), 8, macs=1)
        os._exit(0 if met[0] == 1 else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def test_run_shared_from_two_threads_at_once(share_everything):
    results = {}

    def caller(name):
        counts, chunks = np.zeros(500, np.int64), np.zeros(500, np.int64)
        for _ in range(50):
            pool.run_shared(_count_items, (counts, chunks), 500, macs=1)  # the helpers go to one caller at a time
        results[name] = counts

    callers = [threading.Thread(target=caller, args=(i,)) for i in range(2)]
    for c in callers:
        c.start()
    for c in callers:
        c.join()
    assert len(results) == 2
    for counts in results.values():
        np.testing.assert_array_equal(counts, 50)


def test_a_waiting_thread_spins_for_about_the_time_it_was_told():
    # The helpers' spin before sleeping is counted in reads of a flag, measured once against the clock: that many
    # reads take about the time asked for (bounds of 10x either way: a shared virtual machine's speed swings, not that
    # much).
    reads = pool._spins_in(0.002)
    schedule_ = np.zeros(schedule.FINISHED + 1, np.int64)
    start = time.perf_counter()
    assert not schedule.finish_and_wait(schedule_, 0, 0, reads)  # no job came: it spun them all
    assert 0.0002 < time.perf_counter() - start < 0.02


def test_helpers_not_taking_part_keep_working(restore_threads, monkeypatch):
    # Three threads started, then jobs for two: the helper left out wakes for each and lets it pass, and takes part
    # again when there are three threads.
    monkeypatch.setattr(pool, "MIN_SHARED_MACS", 0)
    vitnp.set_num_threads(3)
    pool.run_shared(_count_items, (np.zeros(8, np.int64), np.zeros(8, np.int64)), 8, macs=1)
    vitnp.set_num_threads(2)
    for _ in range(200):
        counts = np.zeros(64, np.int64)
        pool.run_shared(_count_items, (counts, np.zeros(64, np.int64)), 64, macs=1)
        np.testing.assert_array_equal(counts, 1)
    vitnp.set_num_threads(3)
    counts = np.zeros(64, np.int64)
    pool.run_shared(_count_items, (counts, np.zeros(64, np.int64)), 64, macs=1)
    np.testing.assert_array_equal(counts, 1)
    assert all(thread.is_alive() for thread in threading.enumerate() if thread.name.startswith("vitnp-"))


# ---- the process: malloc ---------------------------------------------------------------------------------------------

_MALLOC_ROUNDS = """
import resource, sys
import numpy as np
import vitnp.memory

if sys.argv[1] == "keep":
    vitnp.memory.keep_freed_memory()

def one_round():  # blocks of 1 to 4 MiB allocated and freed, as a forward's activations are
    arrays = [np.ones(size, np.float32) for size in (1 << 18, 3 << 18, 1 << 20, 1 << 19) * 6]
    del arrays

one_round()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    one_round()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 4)
"""


def _run_python(code, *arguments, **env):
    environment = {name: value for name, value in os.environ.items() if name != "VITNP_SYSTEM_MALLOC"}
    result = subprocess.run([sys.executable, "-c", code, *arguments], env={**environment, **env},
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout


@on_glibc
def test_freed_activation_memory_stays_in_the_heap_after_keep_freed_memory():
    # After vitnp.memory.keep_freed_memory(), a round of allocations like a forward's reuses the heap of the round
    # before: (almost) no page faults. With the system's thresholds (VITNP_SYSTEM_MALLOC=1, or vitnp imported and the
    # call not made) the same rounds give the memory back and fault it in again (thousands of faults per round),
    # which shows the rounds are a fair test.
    assert int(_run_python(_MALLOC_ROUNDS, "keep")) < 100
    assert int(_run_python(_MALLOC_ROUNDS, "keep", VITNP_SYSTEM_MALLOC="1")) > 1000
    assert int(_run_python(_MALLOC_ROUNDS, "import only")) > 1000


_IMPORT_WATCH = """
import ctypes, json, os, threading
import numpy as np  # its BLAS loaded before the count is read
import threadpoolctl

looked_up = []  # every C function a ctypes library is asked for, by name (CDLL.__getattr__ goes through here)
find_function = ctypes.CDLL.__getitem__

def watched(library, name):
    looked_up.append(name)
    return find_function(library, name)

ctypes.CDLL.__getitem__ = watched

def state():
    blas = [(p["internal_api"], p["num_threads"]) for p in threadpoolctl.threadpool_info()]
    return dict(environment=dict(os.environ), threads=threading.active_count(), blas=blas)

before = state()
import vitnp
after = state()
at_import = list(looked_up)
import vitnp.memory
vitnp.memory.keep_freed_memory()
print(json.dumps(dict(before=before, after=after, at_import=at_import, after_call=looked_up[len(at_import):])))
"""


@on_glibc
def test_importing_vitnp_changes_nothing_process_wide():
    # No mallopt call, no thread started, no environment variable set, the BLAS's thread count unchanged: importing a
    # library leaves the process as it was (vitnp.memory.keep_freed_memory() is the explicit call that tunes malloc,
    # and the watch does see its mallopt).
    pytest.importorskip("threadpoolctl")
    report = json.loads(_run_python(_IMPORT_WATCH))
    assert "mallopt" not in report["at_import"]
    assert "mallopt" in report["after_call"]
    assert report["after"] == report["before"]
