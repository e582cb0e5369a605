"""Reading weight files into ``{key: array}`` dictionaries, without torch where the format allows.

- ``.npz``: what ``np.savez(f, **{k: t.numpy() for k, t in model.state_dict().items()})`` writes, stored
  (``np.savez``) or deflated (``np.savez_compressed``); each member's CRC-32 is checked.
- ``.safetensors``: parsed here (an 8-byte header length, a JSON header, raw little-endian bytes) and held to the
  format's rules; float16 stays float16, bfloat16 is widened exactly to float32.
- A Hugging Face model folder: ``config.json`` + ``model.safetensors`` (or ``pytorch_model.bin``, or their sharded
  ``*.index.json`` forms, whose shards must be files inside the folder).
- ``.pth`` / ``.pt`` / ``.bin`` / ``.ckpt``: PyTorch pickles, read with ``torch.load(weights_only=True)`` when torch is
  installed; nested dicts (``{'model': ...}``, DINO's ``{'teacher': ..., 'student': ...}``) are flattened to dotted
  keys, and entries that are not tensors (epoch counters, argument namespaces) are left out.

Keys stay as in the file; :mod:`vitnp.layouts` maps foreign layouts to vitnp's names. Every array is read into
memory (read-only), so a loaded model does not depend on the file staying as it was. A file that cannot be read is a
:class:`WeightsFileError` naming the file and the problem; what a header claims is checked against the file's size
before memory is allocated for it.
"""

import contextlib
import io
import json
import math
import mmap
import os
import secrets
import struct
import zipfile
import zlib
from typing import NamedTuple

import numpy as np

_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")  # the fixed 30-byte part of a zip local file header
_LOCAL_HEADER_MAGIC = b"PK\003\004"
_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


class WeightsFileError(ValueError):
    """A weight file that cannot be read: missing, truncated, of an unknown format, or holding no arrays."""


CONFIG_KEY = "__config__"  # an .npz entry written by `vitnp export`: JSON of the constructor arguments and labels
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


class RawCheckpoint(NamedTuple):
    """What a weight file holds: arrays keyed as in the file, the configs found beside them, the stored dtypes."""

    state_dict: dict
    hf_config: object  # the parsed config.json of a Hugging Face folder, else None
    saved_config: object  # the CONFIG_KEY entry of an exported .npz, else None
    dtypes: dict  # key -> dtype name as stored in the file ('bfloat16' for a widened bf16 tensor)


def load_weights(path):
    """Read a weight file or a Hugging Face folder into a dict of arrays keyed as in the file."""
    return read_checkpoint(path).state_dict


def read_checkpoint(path):
    """Read a weight file (.npz, .safetensors, .pth / .pt / .bin / .ckpt) or a Hugging Face model folder."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return _read_hf_folder(path)
    if not os.path.isfile(path):
        raise WeightsFileError(f"weights file not found: {path}")
    if path.endswith(".npz"):
        state_dict = _read_npz(path)
        saved = _saved_config(path, state_dict.pop(CONFIG_KEY, None))
        return RawCheckpoint(state_dict, None, saved, {k: str(v.dtype) for k, v in state_dict.items()})
    if path.endswith(".safetensors"):
        state_dict, dtypes = read_safetensors(path)
        return RawCheckpoint(state_dict, None, None, dtypes)
    if path.endswith(TORCH_SUFFIXES):
        state_dict, dtypes = read_torch(path)
        return RawCheckpoint(state_dict, None, None, dtypes)
    raise WeightsFileError(
        f"unsupported weights file {path}: vitnp reads .npz, .safetensors, PyTorch {' / '.join(TORCH_SUFFIXES)} "
        "files (with torch installed) and Hugging Face model folders"
    )


def _saved_config(path, entry):
    """The JSON object of an exported .npz's CONFIG_KEY entry (None when there is none)."""
    if entry is None:
        return None
    try:
        if entry.dtype.kind != "U" or entry.ndim:
            raise ValueError(f"a {entry.dtype} array of shape {entry.shape}, not a string")
        config = json.loads(str(entry))
    except (ValueError, RecursionError) as error:
        raise WeightsFileError(f"{path}: the {CONFIG_KEY} entry is not JSON ({error})") from error
    if not isinstance(config, dict):
        raise WeightsFileError(f"{path}: the {CONFIG_KEY} entry is not a JSON object")
    return config


def _read_npz(path):
    """Every member of the archive, read into memory; the zip's own sizes and CRC-32s are checked on the way."""
    try:
        with open(path, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            with zipfile.ZipFile(f) as archive:
                members = archive.infolist()
            announced = _announced_entries(path, f, file_size)
            if announced != len(members):
                raise WeightsFileError(
                    f"{path}: the zip directory announces {announced} entries and holds {len(members)} (corrupt)"
                )
            arrays = {}
            for info in members:
                key = _key(info.filename)
                if key in arrays:
                    raise WeightsFileError(f"{path}: the archive holds the entry {key!r} twice")
                try:
                    arrays[key] = _read_member(path, f, file_size, info)
                except WeightsFileError:
                    raise
                except _ZIP_ERRORS as error:
                    raise WeightsFileError(f"{path}: cannot read entry {key!r}: {error}") from error
            return arrays
    except WeightsFileError:
        raise
    except _ZIP_ERRORS as error:
        raise WeightsFileError(f"cannot read weights file {path}: {error} (truncated or not an .npz?)") from error


# what zipfile, zlib and file reads raise for a file that is not a whole, well-formed zip
_ZIP_ERRORS = (zipfile.BadZipFile, OSError, EOFError, ValueError, struct.error, NotImplementedError, OverflowError,
               RuntimeError, RecursionError, zlib.error)


def _key(member_name):
    return member_name.removesuffix(".npy")


_MAX_DEFLATE_RATIO = 1032  # deflate's bound: no stream inflates to more than ~1032 times its compressed size
_MAX_NPY_HEADER = 10000  # bytes; NumPy's own limit for the header of an .npy file it reads
_NPY_DTYPE_KINDS = "biufcSU"  # numbers, and the strings of the CONFIG_KEY entry
_CHUNK = 1 << 22  # bytes read, inflated and CRC-checked at a time
_MAX_DIMS = 64  # NumPy's limit for the dimensions of an array


def _read_member(path, f, file_size, info):
    """One array of the archive, read (and inflated) into an array of its own.

    Everything a member's headers claim is checked against what the file can hold before memory is allocated: the
    zip directory's sizes against the file's size (and deflate's largest ratio), the .npy header's shape and dtype
    against the member's size. Inflation stops at the declared size, and the member's CRC-32 must match.
    """
    name = _key(info.filename)
    if info.flag_bits & 0x1:
        raise WeightsFileError(f"{path}: entry {name!r} is encrypted")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise WeightsFileError(
            f"{path}: entry {name!r} is compressed with zip method {info.compress_type}; vitnp reads stored and "
            "deflated entries (np.savez, np.savez_compressed)"
        )
    member = _Member(path, f, file_size, info)
    try:
        shape, fortran_order, dtype, header_length = _npy_header(member)
    except WeightsFileError:
        raise
    except Exception as error:  # NumPy parses the (at most 10 kB) header with ast and tokenize: any of their errors
        raise WeightsFileError(f"{path}: entry {name!r} is not a NumPy array ({error})") from error
    if dtype.hasobject:
        raise WeightsFileError(
            f"{path}: entry {name!r} holds Python objects (dtype {dtype}), not numbers; export tensors with t.numpy()"
        )
    if dtype.kind not in _NPY_DTYPE_KINDS or dtype.fields or dtype.subdtype or not dtype.itemsize:
        raise WeightsFileError(f"{path}: entry {name!r} has dtype {dtype}, which is not an array of numbers")
    if len(shape) > _MAX_DIMS or any(size < 0 for size in shape):
        raise WeightsFileError(f"{path}: entry {name!r} has an impossible shape {shape}")
    expected = math.prod(shape) * dtype.itemsize
    if header_length + expected != info.file_size:
        raise WeightsFileError(
            f"{path}: entry {name!r} holds {info.file_size - header_length} bytes of data, its header says {shape} "
            f"{dtype} ({expected} bytes)"
        )
    try:
        data = np.empty(expected, np.uint8)
    except MemoryError as error:
        raise WeightsFileError(f"{path}: not enough memory to read entry {name!r} ({expected} bytes)") from error
    member.readinto(memoryview(data))
    member.check_crc()
    array = data.view(dtype).reshape(shape, order="F" if fortran_order else "C")
    array.flags.writeable = False
    return array


def _npy_header(member):
    """``(shape, fortran_order, dtype, header length)`` of the .npy file at the start of ``member``."""
    magic = member.read(8)
    version = np.lib.format.read_magic(io.BytesIO(magic))
    read_header = _HEADER_READERS.get(version)
    if read_header is None:
        raise ValueError(f".npy format version {version[0]}.{version[1]} (vitnp reads 1.0 and 2.0)")
    length_field = member.read(2 if version == (1, 0) else 4)
    (length,) = struct.unpack("<H" if version == (1, 0) else "<I", length_field)
    if length > _MAX_NPY_HEADER:
        raise ValueError(f"its header claims {length} bytes (at most {_MAX_NPY_HEADER})")
    header = member.read(length)
    shape, fortran_order, dtype = read_header(io.BytesIO(length_field + header))
    return shape, fortran_order, dtype, len(magic) + len(length_field) + length


class _Member:
    """The uncompressed bytes of one zip member, read in order and never past the size the zip directory gives, with
    their CRC-32 computed on the way (stored members are read straight into the caller's buffer)."""

    def __init__(self, path, f, file_size, info):
        self.path, self.file, self.info, self.name = path, f, info, _key(info.filename)
        self.crc, self.left = 0, info.file_size
        f.seek(info.header_offset)
        fields = _LOCAL_HEADER.unpack(_read_exactly(f, _LOCAL_HEADER.size, path))
        if fields[0] != _LOCAL_HEADER_MAGIC:
            raise WeightsFileError(f"{path}: corrupt zip header for entry {self.name!r}")
        name_length, extra_length = fields[-2], fields[-1]
        if f.read(name_length) != _stored_name(info):
            raise WeightsFileError(f"{path}: entry {self.name!r} has another name in its own zip header")
        data_offset = info.header_offset + _LOCAL_HEADER.size + name_length + extra_length
        if data_offset + info.compress_size > file_size:
            raise WeightsFileError(f"{path}: entry {self.name!r} runs past the end of the file (truncated)")
        if info.compress_type == zipfile.ZIP_STORED:
            self.inflater = None
            if info.file_size != info.compress_size:
                raise WeightsFileError(
                    f"{path}: entry {self.name!r} is stored: its size {info.file_size} and its size in the file "
                    f"{info.compress_size} must be equal"
                )
        else:
            self.inflater = zlib.decompressobj(-zlib.MAX_WBITS)
            if info.file_size > info.compress_size * _MAX_DEFLATE_RATIO + 64:
                raise WeightsFileError(
                    f"{path}: entry {self.name!r} claims {info.file_size} bytes, more than its {info.compress_size} "
                    "deflated bytes can hold"
                )
        f.seek(data_offset)
        self.compressed_left, self.pending = info.compress_size, b""

    def read(self, size):
        buffer = bytearray(min(size, self.left))
        self.readinto(memoryview(buffer))
        return bytes(buffer)

    def readinto(self, view):
        """Fill ``view`` with the member's next ``len(view)`` bytes."""
        if len(view) > self.left:
            raise WeightsFileError(f"{self.path}: entry {self.name!r} is shorter than its header says")
        filled = 0
        while filled < len(view):
            chunk = view[filled : filled + _CHUNK]
            produced = self._read_stored(chunk) if self.inflater is None else self._inflate(chunk)
            self.crc = zlib.crc32(chunk[:produced], self.crc)
            filled += produced
        self.left -= len(view)

    def _read_stored(self, chunk):
        produced = self.file.readinto(chunk)
        if not produced:
            raise WeightsFileError(f"{self.path}: entry {self.name!r} runs past the end of the file (truncated)")
        return produced

    def _inflate(self, chunk):
        """Inflate at most ``len(chunk)`` bytes into ``chunk``; the count inflated (at least one)."""
        while True:
            if not self.pending and self.compressed_left:
                self.pending = self.file.read(min(_CHUNK, self.compressed_left))
                if not self.pending:
                    raise WeightsFileError(f"{self.path}: entry {self.name!r} runs past the end of the file")
                self.compressed_left -= len(self.pending)
            before = len(self.pending)
            out = self.inflater.decompress(self.pending, len(chunk))
            self.pending = self.inflater.unconsumed_tail
            if out:
                chunk[: len(out)] = out
                return len(out)
            if self.inflater.eof or (len(self.pending) == before and not self.compressed_left):
                raise WeightsFileError(f"{self.path}: entry {self.name!r} inflates to less than its header says")

    def check_crc(self):
        if self.crc != self.info.CRC:
            raise WeightsFileError(
                f"{self.path}: entry {self.name!r} is corrupt (its CRC-32 is {self.crc:08x}, the zip directory says "
                f"{self.info.CRC:08x})"
            )


_END_RECORD = struct.Struct("<4s4H2LH")  # a zip's end record: magic, disks, entry counts, directory size and offset,
# comment length
_ZIP64_LOCATOR = struct.Struct("<4sLQL")  # magic, disk, offset of the zip64 end record, number of disks
_ZIP64_END_RECORD = struct.Struct("<4sQ2H2L4Q")  # magic, size, versions, disks, entry counts, size, offset


def _announced_entries(path, f, file_size):
    """How many members the zip's end-of-central-directory record announces (its zip64 twin's count when needed).

    zipfile reads the directory by its size in bytes, so a directory entry whose comment or extra field grew over
    the entries after it would hide them; the count, stored apart, tells. The record (with its comment) must end the
    file, which zipfile does not ask either.
    """
    tail_start = max(0, file_size - _END_RECORD.size - 0xFFFF)  # the record ends the file but for a comment < 64 KiB
    f.seek(tail_start)
    tail = f.read()
    at = tail.rfind(b"PK\005\006", 0, len(tail) - _END_RECORD.size + 4)  # a whole record after the magic
    if at < 0:
        raise WeightsFileError(f"{path}: no zip end record (truncated or not an .npz?)")
    fields = _END_RECORD.unpack_from(tail, at)
    entries, comment_length = fields[4], fields[-1]
    if at + _END_RECORD.size + comment_length != len(tail):
        raise WeightsFileError(f"{path}: the zip end record does not end the file (corrupt or truncated)")
    if entries != 0xFFFF or at < _ZIP64_LOCATOR.size:
        return entries
    magic, _, record_offset, _ = _ZIP64_LOCATOR.unpack_from(tail, at - _ZIP64_LOCATOR.size)
    if magic != b"PK\006\007":
        return entries
    f.seek(record_offset)
    record = _ZIP64_END_RECORD.unpack(_read_exactly(f, _ZIP64_END_RECORD.size, path))
    return record[7] if record[0] == b"PK\006\006" else entries


def _stored_name(info):
    """The member's name as its headers store it: UTF-8 when the zip says so (flag bit 11), else code page 437."""
    return info.orig_filename.encode("utf-8" if info.flag_bits & 0x800 else "cp437")


def _read_exactly(f, size, path):
    data = f.read(size)
    if len(data) != size:
        raise WeightsFileError(f"{path}: the file ends early (truncated)")
    return data


# ---------------------------------------------------------------------------------------------------------------------
# safetensors (read without torch)
# ---------------------------------------------------------------------------------------------------------------------

_SAFETENSORS_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_SAFETENSORS_NAMES = {"BF16": "bfloat16", "BOOL": "bool"}
_SAFETENSORS_MAX_HEADER = 100_000_000  # bytes; the safetensors library's own limit
_SAFETENSORS_FIELDS = {"dtype", "shape", "data_offsets"}


class _SafetensorsEntry(NamedTuple):
    name: str
    code: str  # the dtype as the file names it: 'F32', 'BF16', ...
    shape: tuple
    begin: int  # byte offsets in the data section
    end: int


def bfloat16_to_float32(bits):
    """Widen bfloat16 bit patterns (uint16) to float32, exactly: the 16 bits are the high half of the float32.

    Equals ``tensor.to(torch.float32)`` for a ``torch.bfloat16`` tensor (bf16 is float32 with the low 16 mantissa
    bits cut off, so every bf16 value, inf and nan included, is a float32).
    """
    widened = np.asarray(bits, dtype=np.uint16).astype(np.uint32)
    widened <<= 16  # in place: a 0-d array stays an array
    return widened.view(np.float32)


def read_safetensors(path):
    """Read a ``.safetensors`` file: ``({name: array}, {name: stored dtype name})``.

    Layout: 8 bytes little-endian u64 ``n``, ``n`` bytes of JSON ``{name: {dtype, shape, data_offsets: [begin, end]},
    "__metadata__": {str: str}}``, then the raw data; offsets count from the end of the header. The header is held to
    the format's rules before anything is allocated (each tensor's offsets span exactly its shape's bytes; the tensors
    cover the data section end to end, without holes or overlaps; no name twice). Arrays are read into memory and
    read-only; bfloat16 ones are widened to float32.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            entries, data_start = _safetensors_header(path, f, size)
            arrays, dtypes = {}, {}
            for entry in entries:
                arrays[entry.name] = _safetensors_tensor(path, f, data_start, entry)
                dtypes[entry.name] = _SAFETENSORS_NAMES.get(entry.code, _SAFETENSORS_DTYPES[entry.code].name)
            return arrays, dtypes
    except OSError as error:
        raise WeightsFileError(f"cannot read weights file {path}: {error}") from error


def _safetensors_header(path, f, size):
    """The header's tensors, checked against the format's rules and the file's size, and where the data starts."""
    if size < 8:
        raise WeightsFileError(f"{path}: {size} bytes is too short for a .safetensors file (truncated?)")
    (header_length,) = struct.unpack("<Q", _read_exactly(f, 8, path))
    if header_length > min(size - 8, _SAFETENSORS_MAX_HEADER):
        raise WeightsFileError(
            f"{path}: header length {header_length} runs past the end of the file ({size} bytes) or past the "
            f"format's limit ({_SAFETENSORS_MAX_HEADER}): truncated or not a .safetensors file"
        )
    try:
        header = json.loads(_read_exactly(f, header_length, path).decode("utf-8"), object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as error:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise WeightsFileError(f"{path}: the .safetensors header is not valid JSON ({error})") from error
    if not isinstance(header, dict):
        raise WeightsFileError(f"{path}: the .safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise WeightsFileError(f"{path}: the .safetensors __metadata__ is not a JSON object of strings")
    entries = [_safetensors_entry(path, name, info) for name, info in header.items()]
    position = 0
    for entry in sorted(entries, key=lambda e: (e.begin, e.end)):
        if entry.begin != position:
            problem = "overlaps the tensor before it" if entry.begin < position else "leaves a gap before it"
            raise WeightsFileError(
                f"{path}: tensor {entry.name!r} (bytes {entry.begin}..{entry.end} of the data) {problem}"
            )
        position = entry.end
    data_length = size - 8 - header_length
    if position != data_length:
        raise WeightsFileError(
            f"{path}: the tensors span {position} bytes, the data section holds {data_length}"
            + (" (truncated)" if position > data_length else "")
        )
    return entries, 8 + header_length


def _unique_keys(pairs):
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"a name appears twice: {next(k for k in keys if keys.count(k) > 1)!r}")
    return dict(pairs)


def _is_count(value):
    return type(value) is int and value >= 0  # not bool, not float


def _safetensors_entry(path, name, info):
    if not isinstance(info, dict) or set(info) != _SAFETENSORS_FIELDS:
        raise WeightsFileError(
            f"{path}: malformed header entry for {name!r}: {str(info)[:200]} (expected dtype, shape, data_offsets)"
        )
    code, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(code, str) or code not in _SAFETENSORS_DTYPES:
        raise WeightsFileError(
            f"{path}: tensor {name!r} has dtype {str(code)[:50]}, which vitnp does not read "
            f"(it reads {', '.join(_SAFETENSORS_DTYPES)})"
        )
    if not isinstance(shape, list) or len(shape) > _MAX_DIMS or not all(_is_count(s) for s in shape):
        raise WeightsFileError(f"{path}: tensor {name!r} has shape {str(shape)[:200]}, not a list of sizes")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        raise WeightsFileError(f"{path}: tensor {name!r} has data_offsets {str(offsets)[:200]}, not [begin, end]")
    begin, end = offsets
    expected = math.prod(shape) * _SAFETENSORS_DTYPES[code].itemsize
    if end - begin != expected:
        raise WeightsFileError(
            f"{path}: tensor {name!r} holds {end - begin} bytes, its shape {shape} {code} needs {expected}"
        )
    return _SafetensorsEntry(name, code, tuple(shape), begin, end)


def _safetensors_tensor(path, f, data_start, entry):
    dtype = _SAFETENSORS_DTYPES[entry.code]
    try:
        values = np.empty(entry.shape, dtype)
    except ValueError as error:  # a size past NumPy's limits beside a zero (an empty tensor)
        raise WeightsFileError(f"{path}: tensor {entry.name!r} has shape {entry.shape}: {error}") from error
    except MemoryError as error:
        raise WeightsFileError(
            f"{path}: not enough memory to read tensor {entry.name!r} ({entry.end - entry.begin} bytes)"
        ) from error
    f.seek(data_start + entry.begin)
    view = memoryview(values.reshape(-1)).cast("B")
    for start in range(0, len(view), _CHUNK):
        chunk = view[start : start + _CHUNK]
        if f.readinto(chunk) != len(chunk):
            raise WeightsFileError(f"{path}: tensor {entry.name!r} runs past the end of the file (truncated)")
    if entry.code == "BF16":
        values = bfloat16_to_float32(values)
    values.flags.writeable = False
    return values


def release_mapped_pages(array):
    """Drop this process's resident pages of the file mapping ``array`` views, if it views one (else nothing).

    For a weight that has been repacked (:func:`vitnp.fast.ops.packed`) and that the caller handed over as a memory
    map (vitnp's readers read weights into memory; ``np.load(f, mmap_mode="r")`` maps an .npy file): the forward
    reads only the packed copy, so the mapped pages would only double the resident memory. The mapping stays valid;
    a later read of ``array`` (``state_dict()``, saving) pages the data back in from the file.
    """
    base = array
    while isinstance(base, np.ndarray) and not isinstance(base, np.memmap):
        base = base.base
    mapping = getattr(base, "_mmap", None)
    if mapping is not None and hasattr(mapping, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        mapping.madvise(mmap.MADV_DONTNEED)


# ---------------------------------------------------------------------------------------------------------------------
# PyTorch pickles (torch needed) and in-memory state_dicts
# ---------------------------------------------------------------------------------------------------------------------


def read_torch(path):
    """Read a PyTorch checkpoint with ``torch.load(weights_only=True)``: ``({dotted key: array}, {key: dtype})``.

    ``argparse.Namespace`` is allowed in the pickle (DINO and original Swin checkpoints keep their training
    arguments there); it is not a tensor and is left out, as are other non-tensor entries.
    """
    try:
        import torch
    except ImportError as error:
        raise WeightsFileError(
            f"{path} is a PyTorch pickle; reading it needs torch. Convert it where torch is installed with "
            "`vitnp export`, or save it as .safetensors"
        ) from error
    import argparse

    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, EOFError... for unusable files
        raise WeightsFileError(
            f"cannot read {path} as a PyTorch state_dict: {error}. Save `model.state_dict()`, not the model object"
        ) from error
    dtypes = {}
    state_dict = to_arrays(obj, dtypes)
    if not state_dict:
        raise WeightsFileError(f"{path} holds no tensors (a {type(obj).__name__})")
    return state_dict, dtypes


def to_arrays(obj, dtypes=None, prefix=""):
    """Flatten a (nested) state_dict of torch tensors or arrays into ``{dotted key: ndarray}``.

    Tensors are detached and moved to the CPU; bfloat16 tensors are widened to float32 (exact; NumPy has no bf16).
    Entries that are neither tensors nor arrays, nor dicts holding some, are left out. ``dtypes``, when given,
    receives each key's stored dtype name.
    """
    out = {}
    if isinstance(obj, dict):
        for key, value in obj.items():
            out.update(to_arrays(value, dtypes, f"{prefix}{key}."))
        return out
    key = prefix[:-1]
    if hasattr(obj, "detach") and hasattr(obj, "dtype"):  # a torch.Tensor, without importing torch
        tensor = obj.detach().cpu()
        name = str(tensor.dtype).replace("torch.", "")
        if name == "bfloat16":
            tensor = tensor.float()
        out[key] = tensor.numpy()
    elif isinstance(obj, np.ndarray):
        name = str(obj.dtype)
        out[key] = obj
    else:
        return out
    if dtypes is not None:
        dtypes[key] = name
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Hugging Face model folders
# ---------------------------------------------------------------------------------------------------------------------

_HF_WEIGHT_FILES = (
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
)


def _read_hf_folder(path):
    """``config.json`` + the first of model.safetensors / its index / pytorch_model.bin / its index."""
    present = [name for name in _HF_WEIGHT_FILES if os.path.isfile(os.path.join(path, name))]
    if not present:
        raise WeightsFileError(
            f"{path} is a folder without Hugging Face weights: expected one of {', '.join(_HF_WEIGHT_FILES)}"
        )
    config = None
    config_path = os.path.join(path, "config.json")
    if os.path.isfile(config_path):
        config = _read_json(config_path)
        if not isinstance(config, dict):
            raise WeightsFileError(f"{config_path} is not a JSON object")
    weights_file = os.path.join(path, present[0])
    if weights_file.endswith(".index.json"):
        weight_map = _read_json(weights_file)
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(s, str) for s in weight_map.values()):
            raise WeightsFileError(f"{weights_file} has no weight_map of {{key: shard file name}}")
        shards = sorted(set(weight_map.values()))
    else:
        shards = [present[0]]
    state_dict, dtypes = {}, {}
    for shard in shards:
        shard_path = _shard_path(path, weights_file, shard)
        read = read_safetensors if shard.endswith(".safetensors") else read_torch
        arrays, shard_dtypes = read(shard_path)
        state_dict.update(arrays)
        dtypes.update(shard_dtypes)
    return RawCheckpoint(state_dict, config, None, dtypes)


def _read_json(path):
    try:
        with open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError, RecursionError) as error:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise WeightsFileError(f"cannot read {path}: {error}") from error


def _shard_path(folder, index_file, shard):
    """The path of a shard the index names: a file inside ``folder``, never one elsewhere (absolute, ``..``).

    The shard itself may be a symbolic link (a Hugging Face cache's snapshot folder links each file to its blobs
    folder); the index's name may not lead out of the folder.
    """
    parts = shard.replace("\\", "/").split("/")
    if not shard or os.path.isabs(shard) or os.path.splitdrive(shard)[0] or ".." in parts:
        raise WeightsFileError(f"{index_file} names the shard {shard!r}, which is not a file name inside {folder}")
    shard_path = os.path.join(folder, shard)
    if not os.path.isfile(shard_path):
        raise WeightsFileError(f"{index_file} names the shard {shard}, which is not in {folder}")
    return shard_path


# ---------------------------------------------------------------------------------------------------------------------
# Writing .npz
# ---------------------------------------------------------------------------------------------------------------------


def save_npz(path, state_dict, config=None, check=None):
    """Write ``state_dict`` (arrays) to an uncompressed .npz, the format ``np.savez`` writes (NumPy reads it as usual).

    Every member gets the same fixed timestamp, so that the same arrays give the same file. ``config`` (constructor
    arguments, ``labels``) goes into the :data:`CONFIG_KEY` entry as JSON, so that ``create_model(name,
    weights=path)`` rebuilds the model the weights were exported from. The file is written whole beside ``path`` and
    renamed to it (:func:`write_atomically`): ``path`` may be the file the arrays came from, and ``check(written)``,
    when given, runs on the written file before the rename (an error it raises leaves ``path`` as it was).
    """
    arrays = {key: np.asarray(value, order="C") for key, value in state_dict.items()}  # 0-d stays 0-d
    if config:
        arrays[CONFIG_KEY] = np.array(json.dumps(config))

    def write(temporary):
        _write_npz(temporary, arrays)
        if check is not None:
            check(temporary)

    write_atomically(path, write)


def _write_npz(path, arrays):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for key, value in arrays.items():
            header = io.BytesIO()
            np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(value))
            info = zipfile.ZipInfo(key + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.file_size = header.tell() + value.nbytes
            with archive.open(info, "w") as member:
                member.write(header.getvalue())
                member.write(memoryview(value).cast("B") if value.nbytes else b"")


def write_atomically(path, write):
    """``write(temporary_path)``, then rename the temporary file (in ``path``'s folder, with its suffix) to ``path``:
    ``path`` is either as it was or the whole new file, and a source read from ``path`` itself stays as it was until
    the rename replaces it. The temporary file is removed when ``write`` fails."""
    folder, name = os.path.split(os.path.abspath(path))
    temporary = os.path.join(folder, f".tmp-{secrets.token_hex(6)}-{name}")
    os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # a new file's mode, under the umask
    try:
        write(temporary)
        with open(temporary, "rb") as written:  # on disk before the rename makes it the file
            os.fsync(written.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise