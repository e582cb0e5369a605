"""``vitnp embed`` against hostile collections and faults: symlink cycles and aliases, ``file://`` entries, weights
renamed or rewritten during a run, a shard file damaged behind an intact footer, a full output folder, a collection
of unreadable images, an image that kills the worker reading it, a frozen worker; and the progress bar sharing
stderr with the messages printed during a run."""

import contextlib
import glob
import json
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitnp import cli, threads
from vitnp import collection as collection_module
from vitnp import embed as embed_module
from vitnp.embed import ModelRef, WeightsChangedError, embed, list_images, read_output
from vitnp.registry import create_model
from vitnp.weights import save_npz

pq = pytest.importorskip("pyarrow.parquet")

MODEL = "deit_tiny_patch16_224"
ARCH = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2, "num_classes": 10}
SHARD_SIZE = 8


def make_images(folder, count, seed=0):
    """``count`` small PNG images in ``folder``; their paths, sorted."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = folder / f"{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (32 + i % 5, 40, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    """32 images (4 shards of 8) and the weights file."""
    root = tmp_path_factory.mktemp("hostile-embed")
    paths = make_images(root / "images", 32)
    weights = root / "weights.npz"
    save_npz(weights, create_model(MODEL, seed=1, **ARCH).state_dict(), ARCH)
    return root / "images", weights, paths


@pytest.fixture(scope="module")
def reference(collection, tmp_path_factory):
    """The in-process run every other run is compared with."""
    images, weights, _ = collection
    out = tmp_path_factory.mktemp("reference") / "out"
    embed(str(images), MODEL, weights, out, shard_size=SHARD_SIZE, workers=0, progress=False)
    return out


def manifest_of(out):
    return json.loads((out / "_manifest.json").read_text())


def errors_of(out):
    return [json.loads(line) for line in (out / "_errors.jsonl").read_text().splitlines()]


# ---- listing --------------------------------------------------------------------------------------------------------


def test_symlinked_folders_are_not_followed_and_aliases_count_once(tmp_path):
    images = make_images(tmp_path / "root" / "a" / "b", 2)
    os.symlink("..", tmp_path / "root" / "a" / "b" / "up")  # a folder linking to its parent: a cycle of one link
    (tmp_path / "root" / "c").mkdir()
    os.symlink("../a", tmp_path / "root" / "c" / "to_a")  # a -> c -> a: a cycle of two links
    os.symlink("../c", tmp_path / "root" / "a" / "to_c")
    os.symlink("b/000.png", tmp_path / "root" / "a" / "alias.png")  # one file, two names
    root = str(tmp_path / "root")
    for source in (root, f"{root}/**/*.png", f"{root}/**", f"{root}/a/**/*.png"):
        assert list_images(source) == images, source
    assert list_images(f"{root}/a/alias.png") == [f"{root}/a/alias.png"]  # alone, a link is its only name
    listing = tmp_path / "list.txt"
    listing.write_text(f"{root}/a/alias.png\n{images[0]}\nroot/a/b/../b/001.png\n")
    assert list_images(str(listing)) == images


def test_globs_match_what_python_globs_match_where_there_is_no_link(tmp_path):
    rng = np.random.default_rng(0)
    folders = [[], ["a"], ["a", "b"], [".hidden"], ["b", ".c"], ["x", "y", "z"]]
    for i in range(60):
        folder = tmp_path.joinpath(*folders[rng.integers(len(folders))])
        folder.mkdir(parents=True, exist_ok=True)
        (folder / ["f.png", ".g.png", "h.jpg", "k.txt"][rng.integers(4)]).write_bytes(b"")
    for pattern in ("*", "*/*.png", "**", "**/*.png", "a/**/*.png", "*/b/*", "**/.g.png", ".hidden/*", "*/**/h.jpg",
                    "**/b/**", "x/*/z/*"):
        python = sorted(p for p in glob.glob(f"{tmp_path}/{pattern}", recursive=True) if os.path.isfile(p))
        assert sorted(collection_module._glob_files(f"{tmp_path}/{pattern}")) == python, pattern


def test_file_urls_in_a_source_list(collection, tmp_path):
    _, _, paths = collection
    listing = tmp_path / "list.txt"
    listing.write_text(f"file://{paths[0]}\nfile://localhost{paths[1]}\n{paths[2]}\n")
    assert list_images(str(listing)) == paths[:3]
    assert list_images([f"file://{paths[3]}"]) == [paths[3]]
    listing.write_text("file://otherhost/data/a.png\n")
    with pytest.raises(ValueError, match="names a file on another host"):
        list_images(str(listing))


# ---- weights ------------------------------------------------------------------------------------------------------


def test_identical_weights_at_another_path_resume_the_run(collection, reference, tmp_path):
    images, weights, _ = collection
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    elsewhere = tmp_path / "renamed-copy.npz"
    elsewhere.write_bytes(weights.read_bytes())
    result = embed(str(images), MODEL, elsewhere, out, shard_size=SHARD_SIZE, workers=0, progress=False)
    assert result["computed"] == [] and result["skipped"] == [0, 1, 2, 3]


def test_weights_rewritten_during_a_run_stop_it(collection, reference, tmp_path, monkeypatch):
    images, weights, paths = collection
    changed = tmp_path / "weights.npz"
    changed.write_bytes(weights.read_bytes())
    other = tmp_path / "other.npz"
    save_npz(other, create_model(MODEL, seed=2, **ARCH).state_dict(), ARCH)
    preprocess = embed_module.preprocess

    def rewrite_the_weights_at_image_12(source, *args, **kwargs):  # in shard 1, after its first check
        if str(source) == paths[12]:
            with open(changed, "r+b") as f:  # in place, as a training job saving its next checkpoint would
                f.write(other.read_bytes())
        return preprocess(source, *args, **kwargs)

    monkeypatch.setattr(embed_module, "preprocess", rewrite_the_weights_at_image_12)
    monkeypatch.setattr(threads, "get_num_threads", lambda: 1)  # one shard after the other
    out = tmp_path / "out"
    with pytest.raises(WeightsChangedError, match=f"the weights file {changed} changed during the run"):
        embed(str(images), MODEL, changed, out, shard_size=SHARD_SIZE, workers=0, progress=False)
    shards = manifest_of(out)["shards"]
    assert [shard["status"] for shard in shards] == ["done", "pending", "pending", "pending"]
    assert sorted(os.listdir(out)) == sorted(["_manifest.json", "_errors.jsonl", shards[0]["file"]])
    assert pq.read_table(out / shards[0]["file"]).equals(pq.read_table(reference / shards[0]["file"]))


def test_a_worker_builds_the_model_only_from_the_weights_the_run_started_with(collection, tmp_path):
    _, weights, _ = collection
    ref = ModelRef(MODEL, str(weights), "fast", "a-run-planned-on-other-weights", "0" * 64)
    with pytest.raises(WeightsChangedError, match="changed since the run started"):
        embed_module._worker_model(ref)


# ---- the output folder ----------------------------------------------------------------------------------------------


def test_a_shard_damaged_behind_an_intact_footer_is_computed_again(collection, reference, tmp_path):
    images, weights, _ = collection
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    shard = out / manifest_of(out)["shards"][2]["file"]
    first_value = pq.read_table(shard)["features"][0].values[0].as_py()
    data = bytearray(shard.read_bytes())
    at = data.find(np.float32(first_value).tobytes())  # the value as stored (incompressible: a literal run)
    assert at > 0
    data[at:at + 4] = np.float32(-296.0).tobytes()
    shard.write_bytes(bytes(data))
    assert pq.read_table(shard)["features"][0].values[0].as_py() == -296.0  # reads without an error: silently wrong
    result = embed(str(images), MODEL, weights, out, shard_size=SHARD_SIZE, workers=0, progress=False)
    assert result["computed"] == [2] and result["skipped"] == [0, 1, 3]
    assert read_output(out).equals(read_output(reference))


def run_cli_limited(args, file_size_limit):
    """``vitnp ARGS`` in a subprocess whose files cannot grow past ``file_size_limit`` bytes (a full disk: writes
    fail with EFBIG): (exit status, stderr)."""

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    code = "import sys; from vitnp import cli; sys.exit(cli.main(sys.argv[1:]))"
    run = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120, check=False,
                         preexec_fn=limit)
    return run.returncode, run.stderr


def test_a_full_output_folder_is_one_line_and_keeps_the_shard_failures(collection, tmp_path):
    images, weights, _ = collection
    args = ["embed", str(images), "--model", MODEL, "--weights", str(weights), "--shard-size", str(SHARD_SIZE),
            "--workers", "0"]
    status, err = run_cli_limited([*args, "--out", str(tmp_path / "none")], 0)  # not even the manifest
    assert status == 1 and "Traceback" not in err
    manifest = tmp_path / "none" / "_manifest.json"
    assert err.strip().splitlines() == [f"vitnp embed: error: cannot write {manifest}: File too large"]
    # Room for the manifest (~1 KB), not for a shard file (~3 KB): every shard fails, and the manifest says why.
    status, err = run_cli_limited([*args, "--out", str(tmp_path / "some")], 2000)
    assert status == 1 and "Traceback" not in err
    for index in range(4):
        assert f"vitnp embed: shard {index} failed: OSError: [Errno 27] File too large" in err
    shards = manifest_of(tmp_path / "some")["shards"]
    assert [(s["status"], s["reason"]) for s in shards] == [("failed", "OSError: [Errno 27] File too large")] * 4


def test_a_folder_filling_up_during_a_run_keeps_the_shard_failures_in_its_error(collection, tmp_path, monkeypatch):
    images, weights, _ = collection
    fsync = os.fsync
    synced = []

    def full_after_the_first_manifest(fd):  # every file is synced before its rename: the manifest first
        if synced:
            raise OSError(28, "No space left on device")
        synced.append(fd)
        fsync(fd)

    monkeypatch.setattr(os, "fsync", full_after_the_first_manifest)
    out = tmp_path / "out"
    with pytest.raises(ValueError) as caught:
        embed(str(images), MODEL, weights, out, shard_size=SHARD_SIZE, workers=0, progress=False)
    assert str(caught.value) == f"cannot write {out}/_manifest.json: No space left on device; 4 of 4 shards " \
        "failed, the first: shard 0: OSError: [Errno 28] No space left on device"
    assert sorted(os.listdir(out)) == ["_manifest.json"]  # no temporary file left behind


def test_exit_status_1_when_no_image_can_be_read(tmp_path, collection, capsys):
    _, weights, _ = collection
    (tmp_path / "images").mkdir()
    for name in ("a.png", "b.jpg"):
        (tmp_path / "images" / name).write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    status = cli.main(["embed", str(tmp_path / "images"), "--model", MODEL, "--weights", str(weights), "--out",
                       str(tmp_path / "out"), "--workers", "0"])
    captured = capsys.readouterr()
    assert status == 1
    assert "wrote 0 rows" in captured.out and "none of the 2 images could be read" in captured.err
    assert len(errors_of(tmp_path / "out")) == 2


# ---- messages while the progress bar is drawn -----------------------------------------------------------------------


def test_messages_during_a_run_start_on_their_own_line(collection, tmp_path, monkeypatch, capsys):
    images, weights, paths = collection
    outputs = embed_module._outputs

    def out_of_memory_in_shard_1(model, x, settings, names):
        if threading.current_thread().name.startswith("vitnp-embed") and shard_1_running.is_set():
            raise MemoryError
        return outputs(model, x, settings, names)

    shard_1_running = threading.Event()
    preprocess = embed_module.preprocess

    def preprocess_noting_shard_1(source, *args, **kwargs):
        if str(source) in paths[8:16]:
            shard_1_running.set()
        elif str(source) in paths[16:]:
            shard_1_running.clear()
        return preprocess(source, *args, **kwargs)

    monkeypatch.setattr(embed_module, "_outputs", out_of_memory_in_shard_1)
    monkeypatch.setattr(embed_module, "preprocess", preprocess_noting_shard_1)
    monkeypatch.setattr(threads, "get_num_threads", lambda: 1)
    result = embed(str(images), MODEL, weights, tmp_path / "out", shard_size=SHARD_SIZE, workers=0)
    assert result["failed"] == [1] and "no image to blame" in result["failures"][1]
    err = capsys.readouterr().err
    note = "vitnp embed: shard 1 died (MemoryError); reading its 8 images one by one to find the one to blame"
    assert note in err
    before, after = err.split(note)
    assert before.endswith("\n") and "\r[" in before  # the bar was drawn, and its line ended before the message
    assert after.startswith("\n\r[")  # the bar is drawn again below it
    lines = err.replace("\r", "\n").splitlines()
    assert not [line for line in lines if "vitnp embed:" in line and "images/s" in line]


def test_log_records_while_the_bar_is_drawn_start_on_their_own_line(capsys):
    handler = logging.StreamHandler(sys.stderr)  # as Dask's own handler on the 'distributed' logger
    logger = logging.getLogger("distributed")
    logger.addHandler(handler)
    try:
        with embed_module._ProgressBar(images=4, shards=2) as bar:
            bar.update(2)
            logger.warning("Restarting worker")
            bar.update(2)
    finally:
        logger.removeHandler(handler)
    err = capsys.readouterr().err
    assert "1/2 shards" in err and "\nRestarting worker\n\r[" in err and err.endswith("s left \n")
    assert not handler.filters  # the bar's filter is gone with it


# ---- a Dask cluster -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client():
    """2 single-threaded worker processes; a task whose worker dies is not run again (Dask's default is 3 more
    tries, each costing a worker's restart)."""
    pytest.importorskip("dask.distributed")
    import dask
    from distributed import Client, LocalCluster

    with (dask.config.set({"distributed.scheduler.allowed-failures": 0}),
          LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster,
          Client(cluster) as client):
        yield client


@contextlib.contextmanager
def worker_plugin(client, plugin):
    """``plugin`` on every worker of ``client`` (and every worker started later) while the block runs."""
    name = type(plugin).__name__
    client.register_plugin(plugin, name=name)
    try:
        yield
    finally:
        client.unregister_worker_plugin(name)


def test_an_image_that_kills_its_worker_costs_that_image_only(collection, reference, client, tmp_path):
    from distributed import WorkerPlugin

    images, weights, paths = collection
    poison = images / "013-poison.png"  # sorts into shard 1
    poison.write_bytes(Path(paths[13]).read_bytes())

    class CrashOnPoison(WorkerPlugin):  # a decoder that crashes its process on one file (sent by value)
        def setup(self, worker):
            from vitnp import embed

            preprocess = embed.preprocess

            def crashing(source, *args, **kwargs):
                if "poison" in str(source):
                    os._exit(1)
                return preprocess(source, *args, **kwargs)

            embed.preprocess = crashing

    out = tmp_path / "out"
    try:
        with worker_plugin(client, CrashOnPoison()):
            result = embed(str(images), MODEL, str(weights), out, shard_size=SHARD_SIZE, client=client, progress=False)
    finally:
        poison.unlink()
    assert result["failed"] == [] and (result["rows"], result["errors"]) == (32, 1)
    (error,) = errors_of(out)
    assert error["path"] == str(poison) and "the task reading this image alone died too: KilledWorker" in \
        error["reason"]
    assert read_output(out).equals(read_output(reference))  # every other image, as without the culprit


def test_a_frozen_worker_is_restarted_and_its_shard_run_again(collection, reference, client, tmp_path):
    from distributed import WorkerPlugin

    images, weights, _ = collection
    marker = str(tmp_path / "frozen")

    class FreezeOnShard2(WorkerPlugin):
        def transition(self, key, start, finish, **kwargs):
            if finish == "executing" and str(key).startswith("vitnp-embed-") and str(key).endswith("-2"):
                try:
                    fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # once over every worker
                except FileExistsError:
                    return
                os.write(fd, str(os.getpid()).encode())
                os.close(fd)
                os.kill(os.getpid(), signal.SIGSTOP)

    out = tmp_path / "out"
    outcome = {}
    run = threading.Thread(target=lambda: outcome.update(result=embed(
        str(images), MODEL, str(weights), out, shard_size=SHARD_SIZE, client=client, progress=False,
        shard_timeout=3)))
    start = time.perf_counter()
    seen_while_frozen = None
    try:
        with worker_plugin(client, FreezeOnShard2()):
            run.start()
            while run.is_alive():  # the manifest follows the shards as they end, the frozen one pending
                if os.path.exists(marker) and (out / "_manifest.json").exists():
                    statuses = [shard["status"] for shard in manifest_of(out)["shards"]]
                    if "done" in statuses and statuses[2] == "pending":
                        seen_while_frozen = statuses
                time.sleep(0.05)
            run.join()
    finally:
        if os.path.exists(marker):
            with contextlib.suppress(ProcessLookupError):  # already killed by its nanny when the test passes
                os.kill(int(Path(marker).read_text()), signal.SIGKILL)
    assert seen_while_frozen
    result = outcome["result"]
    assert result["computed"] == [0, 1, 2, 3] and result["failed"] == []
    assert not manifest_of(out)["shards"][2]["worker"].endswith(f":{Path(marker).read_text()}")
    assert read_output(out).equals(read_output(reference))
    assert time.perf_counter() - start < 30
