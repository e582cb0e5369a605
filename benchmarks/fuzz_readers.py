"""Fuzz vitnp's weight readers: mutate well-formed .npz and .safetensors files and sort what each reader does.

Every mutated file must give one of two outcomes: a clean error (a ``WeightsFileError`` naming the file) or a correct
load. For an .npz (every member CRC-checked) a correct load is the original arrays, bit for bit; for a .safetensors
file (no checksum: a changed data byte is a file of other values) it is what the ``safetensors`` library itself reads
from the same bytes, and a file that library refuses must be refused. Anything else (another exception, a wrong
load, a file accepted against the format's rules) is listed.

    python benchmarks/fuzz_readers.py --mutations 20000

The mutations (:func:`apply`): byte flips, truncations, inserted and deleted bytes, and edits of the headers'
numbers and words (shapes, offsets, lengths, dtypes); positions favour the headers and the zip directory, where the
readers' decisions are. tests/test_hostile_readers.py drives the same mutations from Hypothesis.
"""

import argparse
import collections
import json
import os
import random
import re
import sys
import tempfile
import traceback

import numpy as np

from vitnp.weights import WeightsFileError, load_weights, save_npz

MUTATION_KINDS = ("flip", "truncate", "insert", "delete", "number", "word")
# what a header's number or word is replaced by: sizes at and past every limit, signs, types JSON and Python allow
HOSTILE_NUMBERS = ("0", "-1", "1", "7", "8", "64", "255", "65535", "4294967295", "4294967296", "18446744073709551615",
                   "1e400", "-1e400", "NaN", "0.5", "true", "null", "\"8\"", "[8]", "1" + "0" * 30)
HOSTILE_WORDS = ("F64", "BF16", "BOOL", "X", "", "<f8", "|O", "<U0", "[\"F32\"]", "__metadata__", "data_offsets",
                 "shape", "dtype", "True", "descr", "fortran_order")


def base_files(folder):
    """Write the well-formed files to mutate: ``{reader name: path}``, and the arrays they hold (one dict for all)."""
    rng = np.random.default_rng(0)
    arrays = {
        "blocks.0.attn.qkv.weight": rng.standard_normal((48, 16)).astype(np.float32),  # 3 KiB: data past 4 KiB too
        "blocks.0.norm1.bias": rng.standard_normal(16).astype(np.float16),
        "pos_embed": rng.standard_normal((1, 5, 16)).astype(np.float32),
        "relative_position_index": np.arange(12, dtype=np.int64).reshape(3, 4),
        "scalar": np.array(2.5, dtype=np.float64),
        "empty": np.zeros((0, 4), np.float32),
    }
    paths = {
        "npz_save_npz": os.path.join(folder, "save_npz.npz"),
        "npz_savez": os.path.join(folder, "savez.npz"),
        "npz_savez_compressed": os.path.join(folder, "savez_compressed.npz"),
        "safetensors": os.path.join(folder, "base.safetensors"),
    }
    save_npz(paths["npz_save_npz"], arrays)
    np.savez(paths["npz_savez"], **arrays)
    np.savez_compressed(paths["npz_savez_compressed"], **arrays)
    with open(paths["safetensors"], "wb") as f:
        f.write(safetensors_bytes(arrays, metadata={"format": "np"}))
    return paths, arrays


_SAFETENSORS_CODES = {"float64": "F64", "float32": "F32", "float16": "F16", "int64": "I64"}


def safetensors_bytes(arrays, metadata=None):
    """A .safetensors file holding ``arrays``, written by the format's description (8-byte length, JSON, data)."""
    header, data, offset = {}, [], 0
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, value in arrays.items():
        raw = np.ascontiguousarray(value).tobytes()
        header[name] = {"dtype": _SAFETENSORS_CODES[value.dtype.name], "shape": list(value.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        data.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + b"".join(data)


def random_mutations(rng, count):
    """``count`` mutations drawn with ``rng`` (a ``random.Random``): (kind, position in [0, 1), value)."""
    return [(rng.choice(MUTATION_KINDS), rng.random(), rng.randrange(1 << 16)) for _ in range(count)]


def apply(data, mutations):
    """``data`` (bytes) with each mutation (kind, position in [0, 1), value) applied in turn.

    A position is mapped into one of three regions, picked by ``value``: the first 256 bytes (the headers), the last
    256 bytes (a zip's central directory) or anywhere. 'number' and 'word' replace a number or a word of the text
    there (a JSON or .npy header) by one of :data:`HOSTILE_NUMBERS` / :data:`HOSTILE_WORDS`.
    """
    data = bytearray(data)
    for kind, position, value in mutations:
        if not data:
            break
        region = value % 3
        if region == 0:
            index = int(position * min(len(data), 256))
        elif region == 1:
            index = len(data) - 1 - int(position * min(len(data), 256))
        else:
            index = int(position * len(data))
        if kind == "flip":  # one bit, or a whole byte's worth
            data[index] ^= (1 << (value >> 2) % 8) if value & 0x40 else (value >> 2) % 255 + 1
        elif kind == "truncate":
            del data[index:]
        elif kind == "insert":
            data[index:index] = bytes([value % 256]) * (1 + (value >> 8) % 8)
        elif kind == "delete":
            del data[index : index + 1 + (value >> 8) % 8]
        else:
            pattern = rb"-?\d+" if kind == "number" else rb"[A-Za-z_<|][A-Za-z0-9_<|]*"
            matches = [m for m in re.finditer(pattern, bytes(data)) if m.start() >= index] or list(
                re.finditer(pattern, bytes(data))
            )
            if matches:
                match = matches[(value >> 2) % len(matches)] if kind == "word" and value & 1 else matches[0]
                choices = HOSTILE_NUMBERS if kind == "number" else HOSTILE_WORDS
                data[match.start() : match.end()] = choices[(value >> 4) % len(choices)].encode()
    return bytes(data)


def outcome(path, expected):
    """('error' | 'load' | 'other', detail) for reading ``path``; ``expected`` is what a correct load equals, or
    None where the file must be refused."""
    try:
        loaded = load_weights(path)
    except WeightsFileError as error:
        if os.path.basename(path) not in str(error):
            return "other", f"WeightsFileError not naming the file: {error}"
        return "error", None
    except BaseException as error:  # noqa: B036 (anything else is the finding: a crash, MemoryError, a Rust panic)
        if isinstance(error, KeyboardInterrupt):
            raise
        return "other", "".join(traceback.format_exception_only(type(error), error)).strip()
    if expected is None:
        return "other", "loaded a file that must be refused"
    difference = compare(loaded, expected)
    return ("load", None) if difference is None else ("other", f"wrong load: {difference}")


def compare(loaded, expected):
    """None when ``loaded`` holds ``expected``'s keys, dtypes, shapes and bits; else what differs."""
    if list(loaded) != list(expected) and sorted(loaded) != sorted(expected):
        return f"keys {sorted(loaded)} != {sorted(expected)}"
    for key, value in expected.items():
        got = loaded[key]
        if got.dtype != value.dtype or got.shape != value.shape:
            return f"{key}: {got.dtype} {got.shape} != {value.dtype} {value.shape}"
        if got.tobytes() != np.ascontiguousarray(value).tobytes():
            return f"{key}: other values"
    return None


def safetensors_reference(path):
    """What the ``safetensors`` library reads from ``path`` ({name: array}), or None when it refuses the file."""
    from safetensors.numpy import load_file

    try:
        return load_file(path)
    except BaseException as error:  # noqa: B036 (the library raises SafetensorError, or panics)
        if isinstance(error, KeyboardInterrupt):
            raise
        return None


def expected_after(reader, path, arrays):
    """What a correct load of the mutated file at ``path`` gives (None: it must be refused)."""
    return safetensors_reference(path) if reader == "safetensors" else arrays


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mutations", type=int, default=2000, help="mutated files per reader (default 2000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--most", type=int, default=3, help="mutations applied to each file: 1 to MOST (default 3)")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    findings = []
    with tempfile.TemporaryDirectory() as folder:
        paths, arrays = base_files(folder)
        for reader, path in paths.items():
            with open(path, "rb") as f:
                original = f.read()
            counts = collections.Counter()
            mutated_path = os.path.join(folder, "mutated" + os.path.splitext(path)[1])
            for _ in range(args.mutations):
                mutations = random_mutations(rng, rng.randint(1, args.most))
                with open(mutated_path, "wb") as f:
                    f.write(apply(original, mutations))
                kind, detail = outcome(mutated_path, expected_after(reader, mutated_path, arrays))
                counts[kind] += 1
                if kind == "other":
                    findings.append((reader, mutations, detail))
            print(f"{reader:22s} clean error {counts['error']:6d}   correct load {counts['load']:6d}   "
                  f"anything else {counts['other']:6d}")
    for reader, mutations, detail in findings:
        print(f"{reader}: {mutations}: {detail}")
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
