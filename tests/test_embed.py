"""``vitnp embed``: a LocalCluster of 2 worker processes against the in-process run, bit for bit; a worker killed
mid-shard; resuming after an interruption; the command line; fsspec sources; the errors a user can make; the
reference backend in this process and on the workers, and a folder of one backend refused to the other."""

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image
from test_cli import break_the_fast_backend
from tolerances import assert_close

from vitnp import cli, memory
from vitnp import embed as embed_module
from vitnp.embed import embed, list_images, read_output
from vitnp.preprocess import preprocess
from vitnp.registry import create_model, data_config
from vitnp.weights import save_npz

pytest.importorskip("dask.distributed")
pq = pytest.importorskip("pyarrow.parquet")
fsspec = pytest.importorskip("fsspec")
from distributed import Client, LocalCluster, WorkerPlugin  # noqa: E402

MODEL = "deit_tiny_patch16_224"
ARCH = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=10)
SHARD_SIZE = 16
CORRUPT = ["bad_header.png", "empty.jpg", "sub/truncated.jpg", "sub/text.png"]


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    """200 small images (PNG / JPEG, RGB / L / RGBA, three folder levels), 4 unreadable ones, the weights file."""
    root = tmp_path_factory.mktemp("embed")
    images = root / "images"
    (images / "sub" / "deeper").mkdir(parents=True)
    rng = np.random.default_rng(0)
    readable = []
    for i in range(200):
        folder = ["", "sub/", "sub/deeper/"][i % 3]
        size = (32 + i % 17, 32 + i % 11)
        pixels = rng.integers(0, 256, (size[1], size[0], 4), dtype=np.uint8)
        path = images / f"{folder}{i:03d}.{'png' if i % 2 else 'jpg'}"
        mode = ["RGB", "L", "RGBA"][i // 2 % 3] if path.suffix == ".png" else "RGB"
        Image.fromarray(pixels, "RGBA").convert(mode).save(path)
        readable.append(str(path))
    (images / "bad_header.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    (images / "empty.jpg").write_bytes(b"")
    (images / "sub" / "truncated.jpg").write_bytes((images / "000.jpg").read_bytes()[:300])
    (images / "sub" / "text.png").write_text("just text")
    (images / "notes.txt").write_text("not an image: a folder source skips it")
    weights = root / "weights.npz"
    model = create_model(MODEL, seed=1, **ARCH)
    save_npz(weights, model.state_dict(), ARCH)
    return images, weights, sorted(readable)


@pytest.fixture(scope="module")
def reference(collection, tmp_path_factory):
    """The single-process run (workers=0): the reference every cluster run must equal."""
    images, weights, _ = collection
    out = tmp_path_factory.mktemp("reference") / "out"
    result = embed(str(images), MODEL, weights, out, shard_size=SHARD_SIZE, workers=0, progress=False)
    return out, result


@pytest.fixture(scope="module")
def client():
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        with Client(cluster) as client:
            yield client


def features_of(out):
    table = read_output(out)
    return table["path"].to_pylist(), np.stack(table["features"].to_numpy(zero_copy_only=False))


def test_single_process_run_is_the_model_on_each_readable_image(collection, reference):
    images, weights, readable = collection
    out, result = reference
    assert (result["images"], result["rows"], result["errors"], result["shards"]) == (204, 200, 4, 13)
    assert result["computed"] == list(range(13)) and result["failed"] == []
    paths, features = features_of(out)
    assert paths == readable  # every readable image once, in sorted path order
    assert pq.read_table(out)["path"].to_pylist() == paths  # Parquet readers of the folder skip _manifest.json
    model = create_model(MODEL, weights=weights)
    chosen = [0, 57, 199]
    config = dict(data_config(MODEL), input_size=(3, 32, 32))  # the name's eval transform, at the weights' size
    x = np.stack([preprocess(paths[i], config) for i in chosen])
    expected = model.forward_head(model.forward_features(x), pre_logits=True)
    assert_close(features[chosen], expected, "model")
    errors = [json.loads(line) for line in (out / "_errors.jsonl").read_text().splitlines()]
    assert sorted(e["path"] for e in errors) == sorted(str(images / name) for name in CORRUPT)
    assert all("cannot read image" in e["reason"] for e in errors)
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["complete"] and manifest["rows"] == 200 and manifest["config"]["what"] == "features"
    assert [s["status"] for s in manifest["shards"]] == ["done"] * 13
    shard_files = [s["file"] for s in manifest["shards"]]
    assert sorted(os.listdir(out)) == sorted(["_manifest.json", "_errors.jsonl", *shard_files])


def test_local_cluster_equals_single_process_row_for_row(collection, reference, client, tmp_path):
    images, weights, _ = collection
    out = tmp_path / "out"
    result = embed(str(images), MODEL, str(weights), out, shard_size=SHARD_SIZE, client=client, progress=False)
    assert result["computed"] == list(range(13)) and result["failed"] == []
    assert read_output(out).equals(read_output(reference[0]))  # bit for bit, row for row
    assert (out / "_errors.jsonl").read_text() == (reference[0] / "_errors.jsonl").read_text()
    workers = {s["worker"] for s in json.loads((out / "_manifest.json").read_text())["shards"]}
    assert len(workers) == 2 and not any(w.endswith(f":{os.getpid()}") for w in workers)


def test_worker_killed_mid_shard_is_retried_nothing_lost_or_duplicated(collection, reference, client, tmp_path):
    images, weights, _ = collection
    marker = str(tmp_path / "killed")

    class ExitOnShard(WorkerPlugin):  # defined here so that Dask sends it by value to the worker processes
        def transition(self, key, start, finish, **kwargs):
            if finish == "executing" and str(key).startswith("vitnp-embed-") and str(key).endswith("-5"):
                try:
                    fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # once, over every worker and restart
                except FileExistsError:
                    return
                os.write(fd, str(os.getpid()).encode())
                os.close(fd)
                os._exit(1)

    client.register_plugin(ExitOnShard(), name="exit-on-shard")
    try:
        out = tmp_path / "out"
        result = embed(str(images), MODEL, str(weights), out, shard_size=SHARD_SIZE, client=client, progress=False)
    finally:
        client.unregister_worker_plugin("exit-on-shard")
    with open(marker) as f:
        killed = f.read()  # the pid of the worker process that died as it started shard 5
    assert result["computed"] == list(range(13)) and result["failed"] == []
    shard5 = json.loads((out / "_manifest.json").read_text())["shards"][5]
    assert shard5["status"] == "done" and not shard5["worker"].endswith(f":{killed}")
    paths, _ = features_of(out)
    assert len(paths) == len(set(paths)) == 200
    assert read_output(out).equals(read_output(reference[0]))
    assert not [name for name in os.listdir(out) if ".tmp-" in name]


def test_second_run_computes_only_the_missing_shards(collection, reference, client, tmp_path):
    images, weights, _ = collection
    out = tmp_path / "out"
    shutil.copytree(reference[0], out)
    files = sorted(name for name in os.listdir(out) if name.endswith(".parquet"))
    for index in (2, 9):
        os.remove(out / files[index])  # interrupted before these shards were written (the manifest still says done)
    (out / files[4]).write_bytes(b"PAR1 half a file")  # a damaged file under a final name is computed again
    (out / f".{files[6]}.tmp-0123").write_bytes(b"PAR1 half")  # a crashed write's temporary file is removed
    result = embed(str(images), MODEL, str(weights), out, shard_size=SHARD_SIZE, client=client, progress=False)
    assert result["computed"] == [2, 4, 9]
    assert result["skipped"] == [i for i in range(13) if i not in (2, 4, 9)]
    assert read_output(out).equals(read_output(reference[0]))
    assert sorted(os.listdir(out)) == sorted(files + ["_manifest.json", "_errors.jsonl"])
    again = embed(str(images), MODEL, str(weights), out, shard_size=SHARD_SIZE, workers=2, progress=False)
    assert again["computed"] == [] and len(again["skipped"]) == 13  # all done: no cluster started


def test_model_broadcast_when_workers_cannot_see_the_weights(collection, reference, client, tmp_path, monkeypatch):
    images, weights, _ = collection
    scattered = []
    scatter = client.scatter
    monkeypatch.setattr(client, "scatter", lambda data, **kwargs: scattered.append(data) or scatter(data, **kwargs))
    monkeypatch.setattr(embed_module, "_worker_sees", lambda path, size, out: (False, True, None))  # sent by value
    out = tmp_path / "out"
    result = embed(str(images), MODEL, str(weights), out, shard_size=SHARD_SIZE, client=client, progress=False)
    assert len(scattered) == 1 and scattered[0].name == MODEL and result["failed"] == []
    assert read_output(out).equals(read_output(reference[0]))
    monkeypatch.setattr(embed_module, "_worker_sees", lambda path, size, out: (True, False, None))
    with pytest.raises(ValueError, match="cannot see the output folder .* filesystem every worker shares"):
        embed(str(images), MODEL, str(weights), tmp_path / "out2", shard_size=SHARD_SIZE, client=client,
              progress=False)


def test_cli_topk_on_a_scheduler(collection, client, tmp_path, capsys):
    images, weights, _ = collection
    sub = str(images / "sub")  # 133 images in sub/ and sub/deeper/, 2 unreadable
    args = [sub, "--model", MODEL, "--weights", str(weights), "--shard-size", "40", "--batch", "4"]
    out = tmp_path / "topk"
    status = cli.main(["embed", *args, "--out", str(out), "--what", "topk", "--topk", "3",
                       "--scheduler", client.cluster.scheduler_address])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert "dashboard http" in captured.err and "135/135 images" in captured.err
    assert "MALLOC_TRIM_THRESHOLD_ set" in captured.err  # the fixture's cluster has Dask's default environment
    assert "wrote 133 rows in 4 shards" in captured.out and "2 unreadable images listed in" in captured.out
    assert cli.main(["embed", *args, "--out", str(tmp_path / "logits"), "--what", "logits", "--workers", "0"]) == 0
    topk, logits = read_output(out), read_output(tmp_path / "logits")
    assert topk.column_names == ["path", "indices", "labels", "scores"]
    assert topk["path"].equals(logits["path"])
    values = np.stack(logits["logits"].to_numpy(zero_copy_only=False)).astype(np.float64)
    indices = np.stack(topk["indices"].to_numpy(zero_copy_only=False))
    assert (indices == np.argsort(-values, axis=1, kind="stable")[:, :3]).all()
    probabilities = np.exp(values - values.max(1, keepdims=True))
    probabilities /= probabilities.sum(1, keepdims=True)
    scores = np.stack(topk["scores"].to_numpy(zero_copy_only=False))
    assert_close(scores, np.take_along_axis(probabilities, indices, 1).astype(np.float32), "kernel")
    assert topk["labels"][0].as_py() == [f"class {i}" for i in indices[0]]


def test_sources_glob_list_file_and_fsspec_url(collection, tmp_path):
    images, weights, readable = collection
    assert list_images(str(images / "**" / "*.png")) == sorted(
        str(p) for p in images.rglob("*.png"))
    listing = tmp_path / "list.txt"
    listing.write_text(f"# two images and a missing one\n{readable[3]}\n\n{os.path.relpath(readable[1], tmp_path)}\n"
                       "missing.png\n")
    assert list_images(str(listing)) == sorted([readable[3], readable[1], str(tmp_path / "missing.png")])
    memory = fsspec.filesystem("memory")
    urls = [f"memory:///embed-test/{name}{os.path.splitext(path)[1]}" for name, path in zip("ab", readable[:2])]
    for url, path in zip(urls, readable[:2]):
        with open(path, "rb") as f:
            memory.pipe(url, f.read())
    memory.pipe("memory:///embed-test/broken.png", b"not an image")
    try:
        result = embed("memory://embed-test/", MODEL, weights, tmp_path / "url", workers=0, progress=False)
    finally:
        memory.rm("/embed-test", recursive=True)
    assert (result["rows"], result["errors"]) == (2, 1)
    from_urls = read_output(tmp_path / "url")
    assert from_urls["path"].to_pylist() == urls
    embed(readable[:2], MODEL, weights, tmp_path / "local", workers=0, progress=False)  # the same bytes, same batch
    assert from_urls["features"].equals(read_output(tmp_path / "local")["features"])
    error = json.loads((tmp_path / "url" / "_errors.jsonl").read_text())
    assert error["path"] == "memory:///embed-test/broken.png" and "cannot read image memory:///embed-test/broken.png"\
        in error["reason"]


def test_clear_errors(collection, reference, tmp_path, capsys):
    images, weights, _ = collection
    args = ["--model", MODEL, "--weights", str(weights)]
    (tmp_path / "empty").mkdir()
    assert cli.main(["embed", str(tmp_path / "empty"), *args, "--out", str(tmp_path / "o1"), "--workers", "0"]) == 1
    assert "no images found in" in capsys.readouterr().err
    assert cli.main(["embed", str(images), *args, "--out", str(reference[0]), "--what", "logits",
                     "--shard-size", str(SHARD_SIZE), "--workers", "0"]) == 1
    err = capsys.readouterr().err
    assert "holds the output of another configuration" in err and "what 'features' there, 'logits' now" in err
    with pytest.raises(SystemExit):
        cli.main(["embed", str(images), *args, "--out", str(tmp_path / "o2"), "--what", "pixels"])
    assert "invalid choice: 'pixels'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="what must be one of features, logits, topk"):
        embed(str(images), MODEL, weights, tmp_path / "o3", what="pixels")
    with pytest.raises(ValueError, match="shard_size must be a whole number of at least 1"):
        embed(str(images), MODEL, weights, tmp_path / "o3", shard_size=0)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "thesis.tex").write_text("mine")
    with pytest.raises(ValueError, match="not empty and has no _manifest.json"):
        embed(str(images), MODEL, weights, tmp_path / "busy", workers=0, progress=False)
    with pytest.raises(ValueError, match="neither a folder, an image, a text file of paths nor a glob"):
        embed(str(tmp_path / "nowhere"), MODEL, weights, tmp_path / "o4", workers=0)
    assert not (tmp_path / "o3").exists() and not (tmp_path / "o4").exists()


# ---- the backends ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def backend_runs(collection, tmp_path_factory):
    """24 images (a text file listing them) embedded in this process on the fast backend, then on the reference
    backend with every fast op made to raise and malloc's tuning counted: (listing, fast DIR, reference DIR, the
    number of keep_freed_memory calls of the reference run)."""
    images, weights, readable = collection
    root = tmp_path_factory.mktemp("backends")
    listing = root / "list.txt"
    listing.write_text("\n".join(readable[:24]) + "\n")
    embed(str(listing), MODEL, weights, root / "fast", shard_size=SHARD_SIZE, workers=0, progress=False,
          backend="fast")
    calls = []
    with pytest.MonkeyPatch.context() as monkeypatch:
        break_the_fast_backend(monkeypatch)
        monkeypatch.setattr(embed_module, "_FREED_MEMORY_KEPT", False)  # as in a new process
        monkeypatch.setattr(memory, "keep_freed_memory", lambda: calls.append(1))
        result = embed(str(listing), MODEL, weights, root / "reference", shard_size=SHARD_SIZE, workers=0,
                       progress=False, backend="reference")
    assert result["computed"] == [0, 1] and result["failed"] == []
    return listing, root / "fast", root / "reference", len(calls)


def test_reference_backend_in_process_agrees_with_the_fast_backend(backend_runs):
    _, fast, reference, malloc_calls = backend_runs
    assert malloc_calls == 1  # once for the process, not once per shard
    assert json.loads((reference / "_manifest.json").read_text())["config"]["backend"] == "reference"
    fast_paths, fast_features = features_of(fast)
    reference_paths, reference_features = features_of(reference)
    assert reference_paths == fast_paths
    assert not np.array_equal(reference_features, fast_features)  # two computations, apart in the last bits
    assert_close(reference_features, fast_features, "model")


def test_reference_backend_reaches_the_workers(backend_runs, collection, client, tmp_path):
    listing, _, reference, _ = backend_runs
    out = tmp_path / "out"
    result = embed(str(listing), MODEL, str(collection[1]), out, shard_size=SHARD_SIZE, client=client,
                   progress=False, backend="reference")
    assert result["failed"] == []
    assert read_output(out).equals(read_output(reference))  # bit for bit: the workers ran the reference backend

    def malloc_tuned():
        from vitnp import embed

        return os.getpid(), embed._FREED_MEMORY_KEPT

    tuned = dict(client.run(malloc_tuned).values())
    workers = {int(s["worker"].rsplit(":", 1)[1]) for s in json.loads((out / "_manifest.json").read_text())["shards"]}
    assert workers <= set(tuned) and all(tuned[pid] for pid in workers)


def test_a_folder_written_on_one_backend_is_not_resumed_on_the_other(backend_runs, collection, capsys):
    listing, _, reference, _ = backend_runs
    before = sorted(os.listdir(reference))
    assert cli.main(["embed", str(listing), "--model", MODEL, "--weights", str(collection[1]), "--out",
                     str(reference), "--shard-size", str(SHARD_SIZE), "--workers", "0", "--backend", "fast"]) == 1
    err = capsys.readouterr().err
    assert "holds the output of another configuration (backend 'reference' there, 'fast' now)" in err
    assert sorted(os.listdir(reference)) == before
