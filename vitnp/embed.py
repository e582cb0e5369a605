"""``vitnp embed``: features, logits or top-k classes of a whole image collection, on a Dask cluster, to Parquet.

The collection (a folder searched recursively, a glob, a text file of paths, or the same as fsspec URLs) is listed,
sorted and cut into shards of ``shard_size`` consecutive images. One task per shard reads and preprocesses its images,
runs the model in batches and writes ``part-<index>-<config hash>.parquet`` into the output folder: to a hidden
temporary name first, then renamed, so a shard file is either whole or absent. Each file carries in its Parquet
metadata the configuration hash, a digest of its image paths and the images it could not read (with the reason).
That makes the files the record of what is done: a re-run with the same configuration skips every shard whose file
is there for the same images, whatever happened to the run that wrote it. ``_manifest.json`` sums the run up (the
configuration, each shard's counts and status) and ``_errors.jsonl`` lists the unreadable images.

The weights reach each worker once. By default each worker process builds the model from the weights path itself,
on its first shard, and keeps it for the next ones (:func:`_worker_model`): .npz and .safetensors files are
memory-mapped, so the worker processes of one machine share the weights' pages in the page cache instead of holding
a copy each, and a worker that Dask restarts rebuilds the model without the client's help. When some worker cannot
see the weights file (another machine without a shared filesystem), the client builds the model and broadcasts it
to every worker with ``client.scatter(..., broadcast=True)``; a task then gets the copy already in its worker's memory.

Each worker process (and this process, with ``workers=0``) fixes glibc malloc's thresholds for itself on its first
shard (:func:`vitnp.memory.keep_freed_memory`), so that each batch reuses the memory of the one before.

Every batch runs whole on one thread, with the BLAS and vitnp's kernels single-threaded
(:func:`vitnp.threads.single_threaded`): a worker of ``nthreads`` threads runs that many shards at once, one core
each, and so uses its own cores and no more, whatever the machine has. ``LocalCluster(threads_per_worker=1)`` gives
one worker process per core. It also makes the numbers independent of the cluster: a row's values depend (in the
last bits, as OpenBLAS picks kernels by matrix size) on the batch it is computed in, never on threads or workers.

The same shard function runs in this process with ``workers=0`` (no Dask; ``vitnp.get_num_threads()`` shards at
once): a cluster run's output equals it row for row, bit for bit. Needs the ``scale`` extra:
``pip install 'vitnp[scale]'`` (dask[distributed], pyarrow, fsspec).
"""

import glob
import hashlib
import io
import json
import os
import socket
import sys
import threading
import time
import uuid
from contextlib import closing
from typing import NamedTuple

import numpy as np

from . import memory, threads
from .predict import IMAGE_SUFFIXES, class_names, top_k
from .preprocess import model_data_config, preprocess

WHATS = ("features", "logits", "topk")
# A leading '_' (or '.') makes the readers of a Parquet folder (pyarrow, pandas, Spark) skip a file.
MANIFEST = "_manifest.json"
ERRORS = "_errors.jsonl"
METADATA_KEY = b"vitnp.embed"
SUMMARY_KEYS = ("shard", "file", "images", "rows", "errors", "worker", "seconds")
FORMAT = 1  # of the output folder; part of the configuration, so a changed layout never resumes an old folder
_SCALE_HINT = "pip install 'vitnp[scale]'"


class Shard(NamedTuple):
    """One task's images: consecutive paths of the sorted list, the digest of those paths, the file to write."""

    index: int
    paths: list
    digest: str
    file: str


class Settings(NamedTuple):
    """What a shard task computes and how; the same for every shard of a run."""

    what: str
    topk: int
    batch_size: int
    config_hash: str


class ModelRef(NamedTuple):
    """What a worker needs to build the model itself: the registered name, the weights path, the backend, the config
    hash."""

    name: str
    weights: str
    backend: str
    key: str


# ---- the collection -------------------------------------------------------------------------------------------------


def _is_url(path):
    return "://" in path and not path.startswith("file://")


def _local(path):
    return os.path.abspath(path.removeprefix("file://"))


def list_images(source):
    """SOURCE -> the sorted list of distinct image paths (absolute) or URLs.

    SOURCE is a folder (its image files, searched recursively), a glob pattern (``**`` crosses folders), a text file
    of paths or URLs (one a line; blank lines and ``#`` comments skipped; relative paths are relative to the text
    file's folder), one image file, a list of paths, or any of these as an fsspec URL (``s3://bucket/images/``).
    Files a text file or a list names are kept even when missing: reading them records the error.
    """
    if isinstance(source, (list, tuple)):
        paths = [p if _is_url(p) else _local(p) for p in map(os.fspath, source)]
    elif _is_url(source):
        paths = _list_url(source)
    else:
        paths = _list_local(_local(source), source)
    return sorted(set(paths))


def _is_image(name):
    return name.lower().endswith(IMAGE_SUFFIXES)


def _list_local(path, source):
    if os.path.isdir(path):
        return [os.path.join(folder, name) for folder, _, names in os.walk(path) for name in names if _is_image(name)]
    if os.path.isfile(path):
        if _is_image(path):
            return [path]
        try:
            with open(path, encoding="utf-8") as f:
                return _paths_of_list(f.read(), os.path.dirname(path))
        except UnicodeDecodeError as error:
            raise ValueError(f"SOURCE {source} is neither an image file ({', '.join(IMAGE_SUFFIXES)}) nor a text "
                             "file of paths") from error
    if glob.has_magic(path):
        return [p for p in glob.glob(path, recursive=True) if os.path.isfile(p)]
    raise ValueError(f"SOURCE {source} is neither a folder, an image, a text file of paths nor a glob that matches")


def _paths_of_list(text, folder):
    """The paths of a text file's lines, relative ones joined to ``folder`` (a local folder or a URL)."""
    lines = [line.strip() for line in text.splitlines()]
    paths = [line for line in lines if line and not line.startswith("#")]
    joined = [p if _is_url(p) else os.path.join(folder, p) for p in paths]
    return [p if _is_url(p) else _local(p) for p in joined]


def _fsspec():
    try:
        import fsspec
    except ImportError as error:
        raise ValueError(f"reading URLs needs fsspec: {_SCALE_HINT}") from error
    return fsspec


def _list_url(source):
    """The images under a URL: a folder's (recursively), a glob's or a text file's, as full URLs."""
    fsspec = _fsspec()
    try:
        fs, path = fsspec.core.url_to_fs(source)
        if glob.has_magic(path):
            found = [p for p in fs.glob(path) if fs.isfile(p)]
        elif fs.isdir(path):
            found = [p for p in fs.find(path) if _is_image(p)]
        elif fs.isfile(path) and not _is_image(path):
            with fs.open(path, "rt", encoding="utf-8") as f:
                return _paths_of_list(f.read(), fs.unstrip_protocol(os.path.dirname(path)))
        elif fs.isfile(path):
            found = [path]
        else:
            raise ValueError(f"SOURCE {source} is neither a folder, an image, a text file of paths nor a glob that "
                             "matches")
    except ImportError as error:  # fsspec knows the protocol, its package (s3fs, gcsfs, ...) is not installed
        raise ValueError(f"cannot read {source}: {error}") from error
    except OSError as error:
        raise ValueError(f"cannot list {source}: {error}") from error
    return [fs.unstrip_protocol(p) for p in found]


class _NamedBytes(io.BytesIO):
    """An image file fetched from a URL, as bytes; prints as its URL so that read errors name it."""

    def __init__(self, url, data):
        super().__init__(data)
        self.url = url

    def __str__(self):
        return self.url


def _image_source(path):
    """A local path as it is; a URL fetched with fsspec (an OSError when that fails)."""
    if not _is_url(path):
        return path
    with _fsspec().open(path, "rb") as f:
        return _NamedBytes(path, f.read())


# ---- one shard (the task) -------------------------------------------------------------------------------------------

_MODEL_LOCK = threading.Lock()  # a worker's task threads build its model once, not once each
_WORKER_MODEL = {}  # this process's model: {ModelRef.key: model}, one entry
_FREED_MEMORY_KEPT = False  # has this process fixed malloc's thresholds (memory.keep_freed_memory)?


def _keep_freed_memory_once():
    """Fix glibc malloc's thresholds for this process, on its first shard: a process-wide setting, which each worker
    process makes for itself."""
    global _FREED_MEMORY_KEPT
    if not _FREED_MEMORY_KEPT:
        memory.keep_freed_memory()
        _FREED_MEMORY_KEPT = True


def _worker_model(source):
    """The model of a task: ``source`` itself, or built from its weights path once per worker process."""
    if not isinstance(source, ModelRef):
        return source
    if source.key not in _WORKER_MODEL:
        from .registry import create_model

        model = create_model(source.name, weights=source.weights, backend=source.backend)
        _WORKER_MODEL.clear()
        _WORKER_MODEL[source.key] = model
    return _WORKER_MODEL[source.key]


def _outputs(model, x, settings, names):
    """{column: array} of one batch: pre-logits features, logits, or the top-k classes.

    The batch runs whole on the calling thread (not split across threads as ``model(x)`` splits it): a row's numbers
    depend on the batch it is computed in, and so they stay the same whatever the number of threads or workers.
    """
    if settings.what == "features":
        return {"features": model.forward_head(model.forward_features(x), pre_logits=True)}
    logits = model.forward_head(model.forward_features(x))
    if settings.what == "logits":
        return {"logits": logits}
    indices, scores = top_k(logits, settings.topk)
    return {"indices": indices.astype(np.int32), "labels": np.array(names, dtype=object)[indices],
            "scores": scores.astype(np.float32)}


def run_shard(shard, model_source, settings, out):
    """Read, preprocess and run one shard's images in batches; write its Parquet file atomically; return a summary.

    ``model_source`` is a model or a :class:`ModelRef`. Images that cannot be read are left out of the file and
    listed in its metadata and in the summary (``errors``: ``{'path', 'reason'}``); they never stop the shard.
    """
    start = time.perf_counter()
    with _MODEL_LOCK:
        _keep_freed_memory_once()
        model = _worker_model(model_source)
    data_config = model_data_config(model)
    names = class_names(model) if settings.what == "topk" else None
    rows, outputs, errors, batch = [], [], [], []

    def run_batch():
        outputs.append(_outputs(model, np.stack([x for _, x in batch]), settings, names))
        rows.extend(path for path, _ in batch)
        batch.clear()

    with threads.single_threaded():
        for path in shard.paths:
            try:
                batch.append((path, preprocess(_image_source(path), data_config, model.dtype)))
            except Exception as error:  # decoders raise many types (OSError, SyntaxError, DecompressionBombError, ...)
                errors.append({"path": path, "reason": str(error) or type(error).__name__})
                continue
            if len(batch) == settings.batch_size:
                run_batch()
        if batch:
            run_batch()
        if not outputs:  # every image unreadable: one blank forward gives the columns' widths
            blank = _outputs(model, np.zeros((1, *data_config["input_size"]), model.dtype), settings, names)
            outputs.append({column: values[:0] for column, values in blank.items()})
    columns = {column: np.concatenate([o[column] for o in outputs]) for column in outputs[0]}
    summary = {"shard": shard.index, "file": shard.file, "images": len(shard.paths), "rows": len(rows),
               "errors": errors, "worker": f"{socket.gethostname()}:{os.getpid()}",
               "seconds": round(time.perf_counter() - start, 3)}
    metadata = {"config_hash": settings.config_hash, "paths_sha256": shard.digest} | summary
    _write_parquet(os.path.join(out, shard.file), rows, columns, metadata)
    return summary


def _write_parquet(path, rows, columns, metadata):
    """A table (path, then one fixed-size list column per output) written to a hidden temporary file, synced, then
    renamed to ``path``: readers and re-runs see the whole file or none."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrays = {"path": pa.array(rows, type=pa.string())}
    for column, values in columns.items():  # values: (rows, width)
        value_type = pa.string() if values.dtype == object else pa.from_numpy_dtype(values.dtype)
        flat = pa.array(values.reshape(-1), type=value_type)
        arrays[column] = pa.FixedSizeListArray.from_arrays(flat, values.shape[1])
    table = pa.table(arrays).replace_schema_metadata({METADATA_KEY: json.dumps(metadata)})
    folder, name = os.path.split(path)
    temporary = os.path.join(folder, f".{name}.tmp-{uuid.uuid4().hex}")
    try:
        with open(temporary, "wb") as f:
            pq.write_table(table, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


# ---- the run --------------------------------------------------------------------------------------------------------


def _sha256(text):
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _file_digest(path):
    """sha256 of a weights file's bytes, or of a folder's top-level files (names and bytes)."""
    digest = hashlib.sha256()
    if os.path.isfile(path):
        files = [path]
    else:
        files = sorted(os.path.join(path, name) for name in os.listdir(path) if not name.startswith("."))
        files = [file for file in files if os.path.isfile(file)]
    for file in files:
        digest.update(os.path.basename(file).encode("utf-8") + b"\0")
        with open(file, "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()


def _source_id(source, paths):
    if isinstance(source, (list, tuple)):
        return "paths sha256 " + _sha256("\n".join(paths))
    return source if _is_url(source) else _local(source)


def _plan(paths, shard_size, config_hash):
    shards = []
    for index, first in enumerate(range(0, len(paths), shard_size)):
        chunk = paths[first:first + shard_size]
        shards.append(Shard(index, chunk, _sha256("\n".join(chunk)), f"part-{index:06d}-{config_hash[:8]}.parquet"))
    return shards


def _done_summary(out, shard, config_hash):
    """The summary of a shard whose file is already there for these images and this configuration, else None."""
    import pyarrow.parquet as pq

    path = os.path.join(out, shard.file)
    if not os.path.isfile(path):
        return None
    try:
        metadata = json.loads(pq.read_schema(path).metadata[METADATA_KEY])
    except (OSError, KeyError, TypeError, ValueError):  # not a file this code wrote whole: compute it again
        return None
    if metadata.get("config_hash") != config_hash or metadata.get("paths_sha256") != shard.digest:
        return None
    return {key: metadata[key] for key in SUMMARY_KEYS}


def _open_out(out, config):
    """Create the output folder, or check that its manifest was written for the same configuration."""
    manifest_path = os.path.join(out, MANIFEST)
    if os.path.isfile(manifest_path):
        try:
            with open(manifest_path, encoding="utf-8") as f:
                previous = json.load(f)["config"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{manifest_path} is not a vitnp embed manifest ({error}); use another --out") from error
        changed = [f"{key} {previous.get(key)!r} there, {config.get(key)!r} now"
                   for key in sorted(set(previous) | set(config)) if previous.get(key) != config.get(key)]
        if changed:
            raise ValueError(f"{out} holds the output of another configuration ({'; '.join(changed)}): resuming "
                             "would mix the two; choose another --out, or delete the folder to start over")
    elif os.path.isdir(out) and os.listdir(out):
        raise ValueError(f"{out} is not empty and has no {MANIFEST}: not a vitnp embed output folder; choose a new "
                         "or empty --out")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as error:
        raise ValueError(f"cannot create the output folder {out}: {error.strerror or error}") from error


def _remove_leftovers(out, shards):
    """Delete temporary files of interrupted writes, and shard files no shard of this plan has (fewer images now)."""
    planned = {shard.file for shard in shards}
    for name in os.listdir(out):
        stale = name.startswith("part-") and name.endswith(".parquet") and name not in planned
        if stale or (name.startswith(".") and ".tmp-" in name):
            os.remove(os.path.join(out, name))


def _write_text_atomic(path, text):
    folder, name = os.path.split(path)
    temporary = os.path.join(folder, f".{name}.tmp-{uuid.uuid4().hex}")
    with open(temporary, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def _write_manifest(out, config, config_hash, shards, summaries, failed):
    entries = []
    for shard in shards:
        entry = {"shard": shard.index, "file": shard.file, "images": len(shard.paths)}
        if shard.index in summaries:
            summary = summaries[shard.index]
            entry.update(status="done", rows=summary["rows"], errors=len(summary["errors"]), worker=summary["worker"],
                         seconds=summary["seconds"])
        elif shard.index in failed:
            entry.update(status="failed", reason=failed[shard.index])
        else:
            entry.update(status="pending")
        entries.append(entry)
    manifest = {
        "vitnp_embed": FORMAT,
        "config": config,
        "config_hash": config_hash,
        "complete": len(summaries) == len(shards),
        "images": sum(len(shard.paths) for shard in shards),
        "rows": sum(s["rows"] for s in summaries.values()),
        "errors": sum(len(s["errors"]) for s in summaries.values()),
        "errors_file": ERRORS,
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "shards": entries,
    }
    _write_text_atomic(os.path.join(out, MANIFEST), json.dumps(manifest, indent=1) + "\n")


def _write_errors(out, summaries):
    lines = [json.dumps({"path": e["path"], "reason": e["reason"], "shard": index})
             for index in sorted(summaries) for e in summaries[index]["errors"]]
    _write_text_atomic(os.path.join(out, ERRORS), "".join(line + "\n" for line in lines))


class _ProgressBar:
    """One line on stderr, redrawn: images and shards done, images per second, time left."""

    def __init__(self, images, shards, width=30):
        self.images, self.shards, self.width = images, shards, width
        self.done_images = self.done_shards = 0
        self.start = time.perf_counter()

    def update(self, images):
        self.done_images += images
        self.done_shards += 1
        rate = self.done_images / max(time.perf_counter() - self.start, 1e-9)
        left = (self.images - self.done_images) / rate if rate else 0.0
        filled = self.width * self.done_images // max(self.images, 1)
        end = "\n" if self.done_shards == self.shards else ""
        print(f"\r[{'#' * filled}{'.' * (self.width - filled)}] {self.done_images}/{self.images} images, "
              f"{self.done_shards}/{self.shards} shards, {rate:.1f} images/s, {left:.0f} s left ", end=end,
              file=sys.stderr, flush=True)


def embed(source, model, weights, out, what="features", topk=5, batch_size=8, shard_size=256, scheduler=None,
          workers=None, client=None, progress=True, backend=None):
    """Run ``model`` (a registered name) with ``weights`` over every image of ``source`` into Parquet shards in ``out``.

    ``what``: 'features' (pre-logits, (rows, num_features)), 'logits' or 'topk' (``topk`` labels, class indices and
    softmax probabilities). Where: ``client`` (a ``distributed.Client``), else ``scheduler`` (an address), else a
    LocalCluster of ``workers`` single-threaded worker processes (default: one per core); ``workers=0`` runs in this
    process without Dask, ``vitnp.get_num_threads()`` shards at once. ``backend``: 'fast', 'reference' or None
    (``VITNP_BACKEND`` of this process, else 'fast'), the same on every worker. Shards already in ``out`` for the same
    configuration (the backend included: the two differ in the last bits) and images are skipped; an ``out`` written
    with another configuration is refused.

    Returns a summary: images, rows, errors (unreadable images), shards, and the shard indices ``computed``,
    ``skipped`` (already done) and ``failed`` (their tasks raised or their workers died: re-run to retry them).
    """
    if what not in WHATS:
        raise ValueError(f"what must be one of {', '.join(WHATS)}, got {what!r}")
    for name, value in (("topk", topk), ("batch_size", batch_size), ("shard_size", shard_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a whole number of at least 1, got {value!r}")
    if scheduler and workers is not None:
        raise ValueError("give either a scheduler address or a number of local workers, not both")
    if workers is not None and workers < 0:
        raise ValueError(f"workers must be 0 (this process) or more, got {workers}")
    in_process = workers == 0 and client is None
    _require("pyarrow", "writing Parquet")
    if not in_process and client is None:
        _require("distributed", "running on a Dask cluster (or pass workers=0 to run in this process)")

    paths = list_images(source)
    if not paths:
        raise ValueError(f"no images found in {source}")
    from .registry import create_model

    weights = os.path.abspath(os.fspath(weights))
    the_model = create_model(model, weights=weights, backend=backend)
    if what != "features" and not the_model.num_classes:
        raise ValueError(f"{model} with these weights has no classification head (num_classes=0): use what='features'")
    config = {"format": FORMAT, "model": model, "weights_sha256": _file_digest(weights), "what": what,
              "topk": min(topk, the_model.num_classes) if what == "topk" else None, "shard_size": shard_size,
              "source": _source_id(source, paths), "dtype": str(the_model.dtype), "backend": the_model.backend}
    config_hash = _sha256(json.dumps(config, sort_keys=True))
    out = os.path.abspath(os.fspath(out))
    _open_out(out, config)

    shards = _plan(paths, shard_size, config_hash)
    _remove_leftovers(out, shards)
    summaries = {}
    for shard in shards:
        summary = _done_summary(out, shard, config_hash)
        if summary is not None:
            summaries[shard.index] = summary
    skipped = sorted(summaries)
    pending = [shard for shard in shards if shard.index not in summaries]
    failed = {}
    _write_manifest(out, config, config_hash, shards, summaries, failed)  # from now on the folder resumes
    settings = Settings(what, config["topk"] or 0, batch_size, config_hash)
    if progress:
        done = f", {len(skipped)} already done" if skipped else ""
        print(f"vitnp embed: {len(paths)} images in {len(shards)} shards{done}, to {out}", file=sys.stderr)
    bar = _ProgressBar(sum(len(s.paths) for s in pending), len(pending)) if progress and pending else None
    start = saved = time.perf_counter()
    try:
        if pending:
            if in_process:
                runs = _run_here(pending, the_model, settings, out)
            else:
                model_ref = ModelRef(model, weights, the_model.backend, config_hash)
                runs = _run_on_cluster(pending, the_model, model_ref, settings, out, client, scheduler, workers,
                                       progress)
            with closing(runs):
                for shard, outcome in runs:
                    if isinstance(outcome, BaseException):
                        failed[shard.index] = f"{type(outcome).__name__}: {outcome}"
                    else:
                        summaries[shard.index] = outcome
                    if bar:
                        bar.update(len(shard.paths))
                    if time.perf_counter() - saved > 5:
                        _write_manifest(out, config, config_hash, shards, summaries, failed)
                        saved = time.perf_counter()
            _remove_leftovers(out, shards)  # temporary files of tasks whose workers died while writing
    finally:
        _write_manifest(out, config, config_hash, shards, summaries, failed)
        _write_errors(out, summaries)
    seconds = time.perf_counter() - start
    computed = sorted(set(summaries) - set(skipped))
    images_computed = sum(len(shards[i].paths) for i in computed)
    return {
        "out": out,
        "images": len(paths),
        "rows": sum(s["rows"] for s in summaries.values()),
        "errors": sum(len(s["errors"]) for s in summaries.values()),
        "shards": len(shards),
        "computed": computed,
        "skipped": skipped,
        "failed": sorted(failed),
        "failures": failed,
        "errors_file": os.path.join(out, ERRORS),
        "seconds": seconds,
        "images_per_s": images_computed / seconds if computed else 0.0,
    }


def _require(module, purpose):
    try:
        __import__(module)
    except ImportError as error:
        raise ValueError(f"{purpose} needs {module}: {_SCALE_HINT}") from error


def _outcome(future):
    """A finished future's result, or the exception its task raised (Dask's KilledWorker when its workers died)."""
    try:
        return future.result()
    except Exception as error:
        return error


def _run_here(pending, model, settings, out):
    """Yield ``(shard, summary or exception)`` as this process's threads (``vitnp.get_num_threads()``) finish them."""
    from concurrent.futures import ThreadPoolExecutor, as_completed

    with ThreadPoolExecutor(threads.get_num_threads(), thread_name_prefix="vitnp-embed") as pool:
        futures = {pool.submit(run_shard, shard, model, settings, out): shard for shard in pending}
        try:
            for future in as_completed(futures):
                yield futures[future], _outcome(future)
        finally:
            for future in futures:
                future.cancel()


def _run_on_cluster(pending, model, model_ref, settings, out, client, scheduler, workers, progress):
    """Yield ``(shard, summary or exception)`` as the cluster finishes them: one task per shard on ``client``, else
    on a client of ``scheduler``, else on a new LocalCluster of ``workers`` single-threaded processes."""
    from distributed import Client, as_completed

    cluster = own_client = None
    try:
        if client is None:
            if scheduler:
                try:
                    client = own_client = Client(scheduler, timeout=30)
                except OSError as error:
                    raise ValueError(f"cannot connect to the Dask scheduler at {scheduler}: {error}") from error
            else:
                cluster = local_cluster(workers)
                client = own_client = Client(cluster)
        if progress:
            hint = "" if _has("bokeh") else " (pip install bokeh to open it)"
            print(f"vitnp embed: dashboard {client.dashboard_link}{hint}", file=sys.stderr)
        model_source = _model_for_workers(client, model, model_ref, out, progress)
        run = uuid.uuid4().hex[:8]
        futures = {client.submit(run_shard, shard, model_source, settings, out, key=f"vitnp-embed-{run}-{shard.index}",
                                 pure=False): shard for shard in pending}
        try:
            for future in as_completed(futures):
                yield futures[future], _outcome(future)
                future.release()
        finally:
            client.cancel([future for future in futures if not future.done()])
    finally:
        if own_client is not None:
            own_client.close()
        if cluster is not None:
            cluster.close()


def _has(module):
    import importlib.util

    return importlib.util.find_spec(module) is not None


# Dask's nannies start workers with MALLOC_TRIM_THRESHOLD_=65536, which fixes glibc's mmap threshold: every array
# over 128 KiB is then a fresh mmap, zeroed page by page, and the forward takes ~1.5x as long (vit_tiny, 1 thread:
# 71-79 ms per image against 50). The LocalCluster started here leaves it unset; other clusters get a hint.
_MALLOC_CONFIG = "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_"


def local_cluster(workers=None):
    """The LocalCluster ``vitnp embed`` starts: ``workers`` (default: one per core) single-threaded worker processes,
    without MALLOC_TRIM_THRESHOLD_."""
    import dask
    from dask.system import CPU_COUNT
    from distributed import LocalCluster

    with dask.config.set({_MALLOC_CONFIG: None}):
        return LocalCluster(n_workers=workers or CPU_COUNT, threads_per_worker=1, processes=True)


def _worker_sees(path, size, out):
    """On a worker: does it see the weights file (with this size), the output folder; its MALLOC_TRIM_THRESHOLD_."""
    weights_ok = os.path.isdir(path) if size is None else os.path.isfile(path) and os.path.getsize(path) == size
    return weights_ok, os.path.isdir(out), os.environ.get("MALLOC_TRIM_THRESHOLD_")


def _model_for_workers(client, model, model_ref, out, progress):
    """``model_ref`` when every worker sees the weights file (each builds the model from it once), else ``model``
    broadcast to every worker. The output folder must be on a filesystem every worker shares."""
    path = model_ref.weights
    size = None if os.path.isdir(path) else os.path.getsize(path)
    seen = client.run(_worker_sees, path, size, out)
    blind = sorted(worker for worker, (_, out_ok, _) in seen.items() if not out_ok)
    if blind:
        raise ValueError(f"worker(s) {', '.join(blind)} cannot see the output folder {out}: --out must be on a "
                         "filesystem every worker shares")
    if progress and any(malloc for _, _, malloc in seen.values()):
        print(f"vitnp embed: the workers run with MALLOC_TRIM_THRESHOLD_ set, which makes the forward ~1.5x slower; "
              f"start them with the Dask config {_MALLOC_CONFIG}: null", file=sys.stderr)
    if all(weights_ok for weights_ok, _, _ in seen.values()):
        return model_ref
    return client.scatter(model, broadcast=True, hash=False)


def read_output(out):
    """The rows of an output folder as one pyarrow Table, in image order (shard by shard, as the manifest lists)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with open(os.path.join(out, MANIFEST), encoding="utf-8") as f:
        manifest = json.load(f)
    tables = [pq.read_table(os.path.join(out, entry["file"])) for entry in manifest["shards"]
              if entry["status"] == "done"]
    return pa.concat_tables([table.replace_schema_metadata(None) for table in tables])
