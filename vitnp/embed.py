"""``vitnp embed``: features, logits or top-k classes of a whole image collection, on a Dask cluster, to Parquet.

The collection (a folder searched recursively, a glob, a text file of paths, or the same as fsspec URLs) is listed,
sorted and cut into shards of ``shard_size`` consecutive images. One task per shard reads and preprocesses its images,
runs the model in batches and writes ``part-<index>-<config hash>.parquet`` into the output folder: to a hidden
temporary name first, then renamed, so a shard file is either whole or absent. Each file carries in its Parquet
metadata the configuration hash, a digest of its image paths, a digest of its rows and the images it could not read
(with the reason). That makes the files the record of what is done: a re-run with the same configuration skips every
shard whose file is there, whole (read back and checked against its digest), for the same images, whatever happened
to the run that wrote it. ``_manifest.json`` sums the run up (the configuration, each shard's counts and status) and
``_errors.jsonl`` lists the unreadable images; both are rewritten as shards end.

Faults cost as little as they can (:func:`_run_tasks`). Tasks are handed out one per free worker thread, so that a
task's clock starts when it runs: a task running past the shard timeout has its worker restarted (a frozen or stuck
process) and runs again. A shard task that dies (its worker killed, out of memory, crashed, or past the timeout twice)
has its images probed one by one (:func:`probe_image`), and runs again without the images that kill the task reading
them alone, which are listed as unreadable. Every task checks that the weights file is still the one the run
started with (:class:`WeightsChangedError`).

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

import collections
import hashlib
import json
import logging
import os
import socket
import sys
import threading
import time
from contextlib import closing, nullcontext, suppress
from typing import NamedTuple

import numpy as np

from . import memory, threads
from .collection import SCALE_HINT, image_source, is_url, list_images, local_path
from .embed_tasks import DaskTasks, ThreadTasks, TimeoutPolicy
from .predict import class_names, top_k
from .preprocess import model_data_config, preprocess
from .weights import write_atomically

WHATS = ("features", "logits", "topk")
# A leading '_' (or '.') makes the readers of a Parquet folder (pyarrow, pandas, Spark) skip a file.
MANIFEST = "_manifest.json"
ERRORS = "_errors.jsonl"
METADATA_KEY = b"vitnp.embed"
SUMMARY_KEYS = ("shard", "file", "images", "rows", "errors", "worker", "seconds")
FORMAT = 2  # of the output folder; part of the configuration, so a changed layout never resumes an old folder


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
    hash, and the sha256 of the weights the run started with (:func:`_file_digest`)."""

    name: str
    weights: str
    backend: str
    key: str
    weights_sha256: str


class LoadedModel(NamedTuple):
    """A model this process built from ``ref``'s weights (with ``workers=0``), and the file's stamp then."""

    model: object
    ref: ModelRef
    stamp: tuple


class WeightsChangedError(ValueError):
    """The weights file is no longer the one the run started with: a model built from it now would be another."""


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
    """The model of a task: ``source`` itself, a :class:`LoadedModel`'s, or built from a :class:`ModelRef`'s weights
    path once per worker process.

    A worker builds the model only from the weights the run started with, and each task checks that the file is still
    the same (its size, modification time and inode, its bytes when these moved): a file rewritten during the run
    stops the run with :class:`WeightsChangedError` instead of adding shards of other weights to it.
    """
    if isinstance(source, LoadedModel):
        _check_weights(source.ref, source.stamp)
        return source.model
    if not isinstance(source, ModelRef):
        return source
    if source.key not in _WORKER_MODEL:
        model, stamp, _ = load_checked(source.name, source.weights, source.backend, source.weights_sha256)
        _WORKER_MODEL.clear()
        _WORKER_MODEL[source.key] = model, stamp
    model, stamp = _WORKER_MODEL[source.key]
    _WORKER_MODEL[source.key] = model, _check_weights(source, stamp)
    return model


def _check_weights(ref, stamp):
    """The weights file's stamp now, after checking that its bytes are still those of ``ref.weights_sha256`` (read
    only when the stamp moved from ``stamp``)."""
    now = _stamp(ref.weights)
    if now != stamp and _file_digest(ref.weights) != ref.weights_sha256:
        raise WeightsChangedError(_changed_message(ref.weights, "during the run"))
    return now


def load_checked(name, weights, backend, expected_sha256=None):
    """``create_model(name, weights=weights, backend=backend)``, the weights file's stamp and sha256; a
    :class:`WeightsChangedError` when the file changed while it was read, or is not the one of ``expected_sha256``."""
    from .registry import create_model

    stamp = _stamp(weights)
    model = create_model(name, weights=weights, backend=backend)
    digest = _file_digest(weights)
    if _stamp(weights) != stamp:
        raise WeightsChangedError(_changed_message(weights, "while it was read"))
    if expected_sha256 is not None and digest != expected_sha256:
        raise WeightsChangedError(_changed_message(weights, "since the run started"))
    return model, stamp, digest


def _changed_message(weights, when):
    return (f"the weights file {weights} changed {when}: stopped rather than write shards of other weights into this "
            "run; restore the file and run the same command again, or start over in a new --out")


def _stamp(path):
    """What changes when a file (or a folder's files) is rewritten: size, modification time, inode."""
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(path, name) for name in os.listdir(path) if not name.startswith("."))
    stamps = []
    for file in files:
        status = os.stat(file)
        stamps.append((os.path.basename(file), status.st_size, status.st_mtime_ns, status.st_ino))
    return tuple(stamps)


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


def run_shard(shard, model_source, settings, out, skip=None):
    """Read, preprocess and run one shard's images in batches; write its Parquet file atomically; return a summary.

    ``model_source`` is a model or a :class:`ModelRef`. Images that cannot be read are left out of the file and
    listed in its metadata and in the summary (``errors``: ``{'path', 'reason'}``); they never stop the shard.
    ``skip``: ``{path: reason}`` of images found to kill or hang the task reading them (:func:`probe_image`), listed
    as errors without being read.
    """
    skip = skip or {}
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
            if path in skip:
                errors.append({"path": path, "reason": skip[path]})
                continue
            try:
                batch.append((path, preprocess(image_source(path), data_config, model.dtype)))
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
    with _MODEL_LOCK:
        _worker_model(model_source)  # checks again that the weights file did not change while the shard ran
    summary = {"shard": shard.index, "file": shard.file, "images": len(shard.paths), "rows": len(rows),
               "errors": errors, "worker": f"{socket.gethostname()}:{os.getpid()}",
               "seconds": round(time.perf_counter() - start, 3)}
    metadata = {"config_hash": settings.config_hash, "paths_sha256": shard.digest,
                "content_sha256": _content_digest(rows, columns)} | summary
    _write_parquet(os.path.join(out, shard.file), rows, columns, metadata)
    return summary


def probe_image(path, data_config, dtype):
    """Read and preprocess one image, as a shard task does: the part of a task's work that depends on the image.
    After a task died (its worker killed, out of memory, frozen), each of its images is probed in a task of its own,
    so that the image to blame kills that task only. Errors are left to the shard task, which lists them."""
    with suppress(Exception):  # an unreadable image: not what a probe looks for
        preprocess(image_source(path), data_config, dtype)


def _content_digest(rows, columns):
    """sha256 of a shard's rows (paths) and output columns ((rows, width) arrays), as written and as read back."""
    digest = hashlib.sha256("\0".join(rows).encode("utf-8"))
    for column in sorted(columns):
        values = columns[column]
        digest.update(column.encode("utf-8") + b"\0" + str(values.shape[1:]).encode("utf-8"))
        if values.dtype == object:
            digest.update("\0".join(values.reshape(-1)).encode("utf-8"))
        else:
            digest.update(values.dtype.str.encode("utf-8") + np.ascontiguousarray(values).tobytes())
    return digest.hexdigest()


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

    def write(temporary):
        with open(temporary, "wb") as f:  # Python's file: a full disk is an OSError naming its errno
            pq.write_table(table, f)

    write_atomically(path, write)


# ---- the run --------------------------------------------------------------------------------------------------------


def _sha256(text):
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _file_digest(path):
    """sha256 of a weights file's bytes, or of a folder's top-level files (their names in the folder, and bytes): the
    same weights under another name or in another folder give the same digest."""
    digest = hashlib.sha256()
    if os.path.isfile(path):
        files = [path]
    else:
        files = sorted(os.path.join(path, name) for name in os.listdir(path) if not name.startswith("."))
        files = [file for file in files if os.path.isfile(file)]
    for file in files:
        if file != path:
            digest.update(os.path.basename(file).encode("utf-8") + b"\0")
        with open(file, "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()


def _source_id(source, paths):
    if isinstance(source, (list, tuple)):
        return "paths sha256 " + _sha256("\n".join(paths))
    return source if is_url(source) else local_path(source)


def _plan(paths, shard_size, config_hash):
    shards = []
    for index, first in enumerate(range(0, len(paths), shard_size)):
        chunk = paths[first:first + shard_size]
        shards.append(Shard(index, chunk, _sha256("\n".join(chunk)), f"part-{index:06d}-{config_hash[:8]}.parquet"))
    return shards


def _done_summary(out, shard, config_hash):
    """The summary of a shard whose file is already there, whole, for these images and this configuration, else None.

    The file is read in full and its rows checked against the digest its writer stored: a file damaged anywhere (not
    only in the footer) is computed again."""
    import pyarrow.parquet as pq

    path = os.path.join(out, shard.file)
    if not os.path.isfile(path):
        return None
    try:
        table = pq.read_table(path)
        metadata = json.loads(table.schema.metadata[METADATA_KEY])
        if metadata.get("config_hash") != config_hash or metadata.get("paths_sha256") != shard.digest:
            return None
        rows = table["path"].to_pylist()
        columns = {}
        for column in table.column_names[1:]:
            lists = table[column].combine_chunks()
            columns[column] = lists.flatten().to_numpy(zero_copy_only=False).reshape(len(rows), lists.type.list_size)
        if _content_digest(rows, columns) != metadata.get("content_sha256"):
            return None
        return {key: metadata[key] for key in SUMMARY_KEYS}
    except Exception:  # not a file this code wrote whole (pyarrow raises many types): compute it again
        return None


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
    try:
        for name in os.listdir(out):
            stale = name.startswith("part-") and name.endswith(".parquet") and name not in planned
            if stale or (name.startswith(".") and ".tmp-" in name):
                os.remove(os.path.join(out, name))
    except OSError as error:
        raise ValueError(f"cannot clean up the output folder {out}: {error.strerror or error}") from error


def _write_text_atomic(path, text):
    """Write a text file whole or not at all (a temporary file renamed); a ValueError naming it when that fails."""

    def write(temporary):
        with open(temporary, "w", encoding="utf-8") as f:
            f.write(text)

    try:
        write_atomically(path, write)
    except OSError as error:
        raise ValueError(f"cannot write {path}: {error.strerror or error}") from error


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


def _failures_note(failed, shards):
    """'; N of M shards failed, the first: shard I: REASON' (what a one-line error keeps of the shards' failures)."""
    if not failed:
        return ""
    first = min(failed)
    return f"; {len(failed)} of {len(shards)} shards failed, the first: shard {first}: {failed[first]}"


class _ProgressBar:
    """One line on stderr, redrawn: images and shards done, images per second, time left. Messages printed while it
    is drawn go through :meth:`note`, each on a line of its own."""

    def __init__(self, images, shards, width=30):
        self.images, self.shards, self.width = images, shards, width
        self.done_images = self.done_shards = 0
        self.start = time.perf_counter()
        self.line = ""  # the bar as last drawn, while its line is open

    def update(self, images):
        self.done_images += images
        self.done_shards += 1
        rate = self.done_images / max(time.perf_counter() - self.start, 1e-9)
        left = (self.images - self.done_images) / rate if rate else 0.0
        filled = self.width * self.done_images // max(self.images, 1)
        self.line = (f"[{'#' * filled}{'.' * (self.width - filled)}] {self.done_images}/{self.images} images, "
                     f"{self.done_shards}/{self.shards} shards, {rate:.1f} images/s, {left:.0f} s left ")
        self._draw()

    def note(self, message):
        """Print ``message`` on a line of its own: the bar's line cleared (on a terminal) or ended first, the bar drawn
        again below it."""
        self._leave_line()
        print(message, file=sys.stderr, flush=True)
        if self.line:
            self._draw()

    def __enter__(self):
        """While the bar is shown, a log record of this process written to stderr (Dask's, as it restarts a worker)
        starts on a line of its own too; the bar is drawn again on its next update."""
        self.handlers = [handler for name in ("distributed", None) for handler in logging.getLogger(name).handlers
                         if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stderr]
        for handler in self.handlers:
            handler.addFilter(self._before_log_record)
        return self

    def __exit__(self, *exc_info):
        for handler in self.handlers:
            handler.removeFilter(self._before_log_record)
        self._leave_line()  # a run cut short leaves no half-drawn line
        self.line = ""

    def _before_log_record(self, record):
        self._leave_line()
        self.line = ""
        return True

    def _leave_line(self):
        if self.line:
            print("\r" + " " * len(self.line) + "\r" if sys.stderr.isatty() else "\n", end="", file=sys.stderr)

    def _draw(self):
        done = self.done_shards == self.shards
        print(f"\r{self.line}", end="\n" if done else "", file=sys.stderr, flush=True)
        if done:
            self.line = ""


def _quiet(message):
    """What :meth:`_ProgressBar.note` stands for when nothing is printed."""


def embed(source, model, weights, out, what="features", topk=5, batch_size=8, shard_size=256, scheduler=None,
          workers=None, client=None, progress=True, backend=None, shard_timeout=None):
    """Run ``model`` (a registered name) with ``weights`` over every image of ``source`` into Parquet shards in ``out``.

    ``what``: 'features' (pre-logits, (rows, num_features)), 'logits' or 'topk' (``topk`` labels, class indices and
    softmax probabilities). Where: ``client`` (a ``distributed.Client``), else ``scheduler`` (an address), else a
    LocalCluster of ``workers`` single-threaded worker processes (default: one per core); ``workers=0`` runs in this
    process without Dask, ``vitnp.get_num_threads()`` shards at once. ``backend``: 'fast', 'reference' or None
    (``VITNP_BACKEND`` of this process, else 'fast'), the same on every worker. Shards already in ``out`` for the same
    configuration (the backend included: the two differ in the last bits) and images are skipped; an ``out`` written
    with another configuration is refused.

    On a cluster, a task that runs longer than ``shard_timeout`` seconds (default: once shards have finished,
    ``max(60, 5 x their median time)``) has its worker restarted (frozen or stuck) and runs once more; a task whose
    workers die (killed, out of memory, crashed) or that times out twice has its images probed one by one, and the
    images whose probes die too are listed as unreadable while the shard's other images are embedded. A weights file
    that changes during the run stops it (:class:`WeightsChangedError`).

    Returns a summary: images, rows, errors (unreadable images), shards, and the shard indices ``computed``,
    ``skipped`` (already done) and ``failed`` (their tasks raised or their workers died: re-run to retry them).
    """
    if what not in WHATS:
        raise ValueError(f"what must be one of {', '.join(WHATS)}, got {what!r}")
    for name, value in (("topk", topk), ("batch_size", batch_size), ("shard_size", shard_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a whole number of at least 1, got {value!r}")
    if shard_timeout is not None and not shard_timeout > 0:
        raise ValueError(f"shard_timeout must be a number of seconds above 0, got {shard_timeout!r}")
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
    weights = os.path.abspath(os.fspath(weights))
    the_model, weights_stamp, weights_sha256 = load_checked(model, weights, backend)
    if what != "features" and not the_model.num_classes:
        raise ValueError(f"{model} with these weights has no classification head (num_classes=0): use what='features'")
    config = {"format": FORMAT, "model": model, "weights_sha256": weights_sha256, "what": what,
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
    note = bar.note if bar else _quiet
    image_config = (model_data_config(the_model), the_model.dtype)
    start = saved = time.perf_counter()
    try:
        if pending:
            model_ref = ModelRef(model, weights, the_model.backend, config_hash, weights_sha256)
            if in_process:
                runs = _run_here(pending, LoadedModel(the_model, model_ref, weights_stamp), settings, out,
                                 image_config, note)
            else:
                runs = _run_on_cluster(pending, the_model, model_ref, settings, out, image_config, client, scheduler,
                                       workers, TimeoutPolicy(shard_timeout), note, progress)
            unsaved = False
            with closing(runs), bar or nullcontext():
                for ended in runs:  # (shard, summary or failure reason) as shards end; None about once a second
                    if ended is not None:
                        shard, outcome = ended
                        if isinstance(outcome, dict):
                            summaries[shard.index] = outcome
                        else:
                            failed[shard.index] = outcome
                        if bar:
                            bar.update(len(shard.paths))
                        unsaved = True
                    if unsaved and time.perf_counter() - saved >= 1:  # the manifest follows the shards as they end
                        _write_manifest(out, config, config_hash, shards, summaries, failed)
                        _write_errors(out, summaries)
                        saved, unsaved = time.perf_counter(), False
            _remove_leftovers(out, shards)  # temporary files of tasks whose workers died while writing
    finally:
        try:
            _write_manifest(out, config, config_hash, shards, summaries, failed)
            _write_errors(out, summaries)
        except ValueError as error:  # the folder became read-only or full: say so, with what the shards met
            raise ValueError(f"{error}{_failures_note(failed, shards)}") from error
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
        raise ValueError(f"{purpose} needs {module}: {SCALE_HINT}") from error


# ---- running the tasks: retries, timeouts, images to blame ----------------------------------------------------------


class _Task(NamedTuple):
    """A task of the run: a shard (``path`` None; ``skip``: None on its first run, then the images to list without
    reading them) or the probe of one of its images (:func:`probe_image`; ``alone``: while no other probe of the
    shard runs); ``attempt`` counts its runs cut short by the shard timeout."""

    shard: Shard
    path: str = None
    skip: dict = None
    alone: bool = False
    attempt: int = 0


class TaskTimeout(Exception):
    """A task ran longer than the shard timeout on two workers."""


def _died(error):
    """Did a task die rather than raise: its worker processes killed or crashed (Dask's KilledWorker), out of memory,
    or frozen or stuck past the shard timeout twice?"""
    return isinstance(error, (MemoryError, TaskTimeout)) or type(error).__name__ == "KilledWorker"


def _reason(error):
    if type(error).__name__ == "KilledWorker":
        return "KilledWorker: the worker processes running it died (killed, out of memory or crashed)"
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def _run_tasks(tasks, pending, model_source, settings, out, image_config, timeout, note):
    """Run the pending shards on ``tasks`` (:class:`~vitnp.embed_tasks.ThreadTasks` or
    :class:`~vitnp.embed_tasks.DaskTasks`); yield ``(shard, summary or failure reason)`` as each shard ends, and None
    about once a second in between.

    A shard task that dies (:func:`_died`) is not the end of its shard: each of its images is probed in a task of its
    own, the images whose probes die are probed again one at a time, and the shard runs once more listing the images
    that died alone as unreadable. A task running longer than ``timeout.seconds`` has its worker restarted (frozen or
    stuck) and runs once more; a second timeout is a death.
    """
    waiting = collections.deque()  # tasks to hand out, one per free thread of the cluster
    running = {}  # handle -> _Task
    probing = {}  # shard index -> {"left": probes running, "suspects": [paths whose probes died], "culprits":
    #                                {path: reason}, "reason": the shard's death}
    submitted = 0

    def submit(task):
        waiting.append(task)

    def launch():
        """Hand out waiting tasks while threads are free: a task handed out runs at once, so that its clock (the
        timeout) starts when it does, and no task waits on a worker beside another (a worker that dies takes down
        every task it holds)."""
        nonlocal submitted
        while waiting and len(running) < tasks.threads():
            task = waiting.popleft()
            submitted += 1
            tag = f"{task.shard.index}" if submitted <= len(pending) else f"r{submitted}-{task.shard.index}"
            start(task, tag)

    def start(task, tag):
        if task.path is None:
            handle = tasks.submit(f"vitnp-embed-{tasks.run}-{tag}", run_shard, task.shard, model_source, settings,
                                  out, task.skip)
        else:
            handle = tasks.submit(f"vitnp-probe-{tasks.run}-{tag}", probe_image, task.path, *image_config)
        running[handle] = task

    def ended(task, outcome):
        """What a task's end gives: a list of (shard, summary or reason) ended, new tasks submitted on the way."""
        shard = task.shard
        if task.path is not None:
            state = probing[shard.index]
            if task.alone and isinstance(outcome, BaseException):
                state["culprits"][task.path] = f"the task reading this image alone died too: {_reason(outcome)}"
            elif isinstance(outcome, BaseException):
                state["suspects"].append(task.path)
            state["left"] -= not task.alone
            if state["left"]:
                return []
            return isolate_next(shard, state)
        if not isinstance(outcome, BaseException):
            timeout.record(outcome["seconds"])
            return [(shard, outcome)]
        if _died(outcome) and task.skip is None:
            note(f"vitnp embed: shard {shard.index} died ({_reason(outcome)}); reading its {len(shard.paths)} images "
                 "one by one to find the one to blame")
            probing[shard.index] = {"left": len(shard.paths), "suspects": [], "culprits": {},
                                    "reason": _reason(outcome)}
            for path in shard.paths:
                submit(_Task(shard, path=path))
            return []
        blameless = "; each of its images read alone is fine: no image to blame" if task.skip == {} else ""
        return [(shard, _reason(outcome) + blameless)]

    def isolate_next(shard, state):
        """After a shard's probes: each image whose probe died read again alone (a task that shared the dying worker
        dies with it), one at a time; then the shard once more, without the images that died alone."""
        if state["suspects"]:
            submit(_Task(shard, path=state["suspects"].pop(0), alone=True))
            return []
        del probing[shard.index]
        culprits = state["culprits"]
        if culprits:
            note(f"vitnp embed: shard {shard.index}: {', '.join(culprits)} killed the tasks reading them; embedding "
                 "the shard's other images")
        submit(_Task(shard, skip=culprits))
        return []

    try:
        for shard in pending:
            submit(_Task(shard))
        checked = time.perf_counter()
        while waiting or running:
            launch()
            finished = tasks.wait(list(running), 1.0)
            changed = [outcome for _, outcome in finished if isinstance(outcome, WeightsChangedError)]
            for handle, outcome in sorted(finished, key=lambda item: running[item[0]].shard.index):
                if not isinstance(outcome, WeightsChangedError):
                    yield from ended(running.pop(handle), outcome)
            if changed:  # after the shards that ended well with it (their weights were checked after computing)
                raise changed[0]
            if time.perf_counter() - checked < 1:
                continue
            checked = time.perf_counter()
            seconds = timeout.seconds
            overdue = tasks.overdue(list(running), seconds) if seconds else []
            late = [running.pop(handle) for handle, _ in overdue]
            tasks.cancel([handle for handle, _ in overdue])
            for worker in sorted({worker for _, worker in overdue}):
                note(f"vitnp embed: a task ran over the shard timeout ({seconds:.0f} s) on {worker}: restarting "
                     "that worker (frozen or stuck) and running its task again")
                tasks.restart(worker)
            for task in late:
                if task.attempt == 0:
                    submit(task._replace(attempt=1))
                else:
                    yield from ended(task, TaskTimeout(f"ran over the shard timeout ({seconds:.0f} s) twice"))
            yield None
    finally:
        tasks.cancel(list(running))
        tasks.close()


def _run_here(pending, model, settings, out, image_config, note):
    """:func:`_run_tasks` on this process's threads."""
    yield from _run_tasks(ThreadTasks(), pending, model, settings, out, image_config, TimeoutPolicy(), note)


def _run_on_cluster(pending, model, model_ref, settings, out, image_config, client, scheduler, workers, timeout,
                    note, progress):
    """:func:`_run_tasks` on ``client``, else on a client of ``scheduler``, else on a new LocalCluster of ``workers``
    single-threaded processes."""
    from distributed import Client

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
        yield from _run_tasks(DaskTasks(client), pending, model_source, settings, out, image_config, timeout, note)
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
