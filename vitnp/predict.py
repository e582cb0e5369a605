"""Classify image files: preprocessing, batched forward, softmax, top-k with class names.

Class names: the checkpoint's own (a Hugging Face ``id2label``, an export's ``labels``), else the ImageNet-1k names
shipped with vitnp for 1000-class heads, else ``class <index>``.
"""

import csv
import glob
import json
import os
from importlib import resources

import numpy as np

from .preprocess import model_data_config, preprocess_files
from .reference.ops import softmax

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def imagenet_classes():
    """The 1000 ImageNet-1k class names, by class index (torchvision's short names)."""
    text = resources.files("vitnp").joinpath("imagenet_classes.txt").read_text(encoding="utf-8")
    return text.splitlines()


def class_names(model):
    """Names of the model's classes by index: the checkpoint's, ImageNet-1k's for 1000 classes, or 'class <i>'.

    The checkpoint's list must name each of the head's classes: another count is a ValueError.
    """
    if getattr(model, "labels", None):
        labels = list(model.labels)
        if len(labels) != model.num_classes:
            raise ValueError(f"the weights' list of class names (labels) has {len(labels)} names, but {model.name}'s "
                             f"head has {model.num_classes} classes: the labels do not belong to these weights")
        return labels
    if model.num_classes == 1000:
        return imagenet_classes()
    return [f"class {i}" for i in range(model.num_classes)]


def expand_inputs(inputs):
    """Paths, folders (their image files, sorted) and glob patterns -> a list of file paths, in order given.

    A path that does not exist and matches nothing is kept, so that reading it reports the error.
    """
    paths = []
    for item in inputs:
        if os.path.isdir(item):
            names = sorted(n for n in os.listdir(item) if n.lower().endswith(IMAGE_SUFFIXES))
            paths.extend(os.path.join(item, n) for n in names)
        elif not os.path.exists(item) and glob.has_magic(item):
            paths.extend(sorted(glob.glob(item)))
        else:
            paths.append(item)
    return paths


def top_k(logits, k):
    """softmax over classes, then the k most probable per row: (indices (B, k), probabilities (B, k))."""
    probs = softmax(np.array(logits, dtype=np.float64))
    k = min(k, probs.shape[-1])
    order = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    return order, np.take_along_axis(probs, order, axis=-1)


def predict_files(model, paths, topk=5, batch_size=8):
    """An iterator of one result per path, in order: ``{'path', 'top': [(index, label, probability), ...]}`` or
    ``{'path', 'error': message}`` for a file that cannot be read (the others go on).

    A model that cannot classify (no head, class names that do not fit it) raises at once, before any image is read.
    """
    if not model.num_classes:
        raise ValueError(f"{model.name} has no classification head (num_classes=0): nothing to predict")
    return _predictions(model, class_names(model), paths, topk, batch_size)


def _predictions(model, names, paths, topk, batch_size):
    pending = []

    def flush():
        batch = np.stack([x for _, x in pending])
        indices, probs = top_k(model(batch), topk)
        for (path, _), row, p in zip(pending, indices, probs):
            yield {"path": path, "top": [(int(i), names[i], float(q)) for i, q in zip(row, p)]}
        pending.clear()

    for path, x, error in preprocess_files(paths, model_data_config(model), model.dtype):
        if error is not None:
            yield from flush() if pending else ()
            yield {"path": path, "error": error}
            continue
        pending.append((path, x))
        if len(pending) == batch_size:
            yield from flush()
    if pending:
        yield from flush()


class ResultsFile:
    """Predictions written as they come: a .csv (one row per class, an ``error`` column for unreadable files) or
    a .jsonl / .json file (one JSON record per image). Opening it creates the file, so that a path that cannot be
    written fails before anything is computed; every failure to write is a ValueError naming the file."""

    FORMATS = (".csv", ".jsonl", ".json")

    def __init__(self, path):
        self.path = os.fspath(path)
        self.format = os.path.splitext(self.path)[1].lower()
        if self.format not in self.FORMATS:
            raise ValueError(f"the results file must end in .csv or .jsonl, got {self.path}")
        self.file = self._io(open, self.path, "w", newline="", encoding="utf-8")
        if self.format == ".csv":
            self.csv = csv.writer(self.file)
            self._io(self.csv.writerow, ["path", "rank", "class_index", "label", "probability", "error"])

    def write(self, result):
        """One result of :func:`predict_files`."""
        if self.format == ".csv":
            rows = [[result["path"], rank, index, label, f"{p:.6g}", ""]
                    for rank, (index, label, p) in enumerate(result.get("top", []), 1)]
            if "error" in result:
                rows.append([result["path"], "", "", "", "", result["error"]])
            self._io(self.csv.writerows, rows)
            return
        record = {"path": result["path"]}
        if "error" in result:
            record["error"] = result["error"]
        else:
            record["top"] = [{"class_index": i, "label": label, "probability": p} for i, label, p in result["top"]]
        self._io(self.file.write, json.dumps(record) + "\n")

    def close(self):
        self._io(self.file.close)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def _io(self, function, *args, **kwargs):
        try:
            return function(*args, **kwargs)
        except OSError as error:
            raise ValueError(f"cannot write {self.path}: {error.strerror or error}") from error
