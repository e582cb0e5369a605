"""Reading weight files into ``{key: array}`` dictionaries, without torch where the format allows.

- ``.npz``: what ``np.savez(f, **{k: t.numpy() for k, t in model.state_dict().items()})`` writes. Members stored
  without compression (``np.savez``) are memory-mapped straight from the file, so loading costs no copy and no more
  memory than the pages the forward pass touches; compressed members (``np.savez_compressed``) are read.
- ``.safetensors``: parsed here (an 8-byte header length, a JSON header, raw little-endian bytes), memory-mapped;
  float16 stays float16, bfloat16 is widened exactly to float32.
- A Hugging Face model folder: ``config.json`` + ``model.safetensors`` (or ``pytorch_model.bin``, or their sharded
  ``*.index.json`` forms).
- ``.pth`` / ``.pt`` / ``.bin`` / ``.ckpt``: PyTorch pickles, read with ``torch.load(weights_only=True)`` when torch is
  installed; nested dicts (``{'model': ...}``, DINO's ``{'teacher': ..., 'student': ...}``) are flattened to dotted
  keys, and entries that are not tensors (epoch counters, argument namespaces) are left out.

Keys stay as in the file; :mod:`vitnp.layouts` maps foreign layouts to vitnp's names.
"""

import io
import json
import mmap
import os
import struct
import zipfile
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
        saved = state_dict.pop(CONFIG_KEY, None)
        saved = json.loads(str(saved)) if saved is not None else None
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


def _read_npz(path):
    try:
        with zipfile.ZipFile(path) as archive:
            return {_key(info.filename): _read_member(path, archive, info) for info in archive.infolist()}
    except WeightsFileError:
        raise
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, struct.error) as error:
        raise WeightsFileError(f"cannot read weights file {path}: {error} (truncated or not an .npz?)") from error


def _key(member_name):
    return member_name[: -len(".npy")] if member_name.endswith(".npy") else member_name


def _read_member(path, archive, info):
    """One array of the archive: memory-mapped when stored uncompressed, else read."""
    with archive.open(info) as member:
        try:
            version = np.lib.format.read_magic(member)
            read_header = _HEADER_READERS.get(version)
            if read_header is None:  # a newer header version: let NumPy read the member whole
                member.seek(0)
                return np.lib.format.read_array(member, allow_pickle=False)
            shape, fortran_order, dtype = read_header(member)
        except ValueError as error:
            raise WeightsFileError(f"{path}: entry {_key(info.filename)!r} is not a NumPy array ({error})") from error
        if dtype.hasobject:
            raise WeightsFileError(
                f"{path}: entry {_key(info.filename)!r} holds Python objects (dtype {dtype}), not numbers; export "
                "tensors with t.numpy()"
            )
        header_length = member.tell()
        if info.compress_type != zipfile.ZIP_STORED:
            member.seek(0)
            return np.lib.format.read_array(member, allow_pickle=False)
    expected = int(np.prod(shape)) * dtype.itemsize
    if header_length + expected != info.file_size:
        raise WeightsFileError(
            f"{path}: entry {_key(info.filename)!r} holds {info.file_size - header_length} bytes of data, "
            f"its header says {shape} {dtype} ({expected} bytes)"
        )
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        fields = _LOCAL_HEADER.unpack(f.read(_LOCAL_HEADER.size))
        if fields[0] != _LOCAL_HEADER_MAGIC:
            raise WeightsFileError(f"{path}: corrupt zip header for entry {_key(info.filename)!r}")
        name_length, extra_length = fields[-2], fields[-1]
        data_offset = info.header_offset + _LOCAL_HEADER.size + name_length + extra_length + header_length
    if expected == 0:
        return np.zeros(shape, dtype=dtype, order="F" if fortran_order else "C")
    if data_offset + expected > os.path.getsize(path):
        raise WeightsFileError(f"{path}: entry {_key(info.filename)!r} runs past the end of the file (truncated)")
    order = "F" if fortran_order else "C"
    mapped = np.memmap(path, dtype=dtype, mode="r", offset=data_offset, shape=shape, order=order)
    return np.asarray(mapped)  # a plain read-only ndarray view of the mapping, aligned or not


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


def bfloat16_to_float32(bits):
    """Widen bfloat16 bit patterns (uint16) to float32, exactly: the 16 bits are the high half of the float32.

    Equals ``tensor.to(torch.float32)`` for a ``torch.bfloat16`` tensor (bf16 is float32 with the low 16 mantissa
    bits cut off, so every bf16 value, inf and nan included, is a float32).
    """
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def read_safetensors(path):
    """Read a ``.safetensors`` file: ``({name: array}, {name: stored dtype name})``.

    Layout: 8 bytes little-endian u64 ``n``, ``n`` bytes of JSON ``{name: {dtype, shape, data_offsets: [begin, end]},
    "__metadata__": {...}}``, then the raw data; offsets count from the end of the header. Arrays are read-only views
    of a memory map, except bfloat16 ones, widened to float32 copies.
    """
    path = os.fspath(path)
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise WeightsFileError(f"{path}: {size} bytes is too short for a .safetensors file (truncated?)")
            (header_length,) = struct.unpack("<Q", prefix)
            if header_length > size - 8:
                raise WeightsFileError(
                    f"{path}: header length {header_length} runs past the end of the file ({size} bytes): truncated "
                    "or not a .safetensors file"
                )
            header = json.loads(f.read(header_length))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise WeightsFileError(f"{path}: the .safetensors header is not valid JSON ({error})") from error
    if not isinstance(header, dict):
        raise WeightsFileError(f"{path}: the .safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    data_start = 8 + header_length
    mapped = np.memmap(path, dtype=np.uint8, mode="r") if size > data_start else np.zeros(0, np.uint8)
    arrays, dtypes = {}, {}
    for name, info in header.items():
        arrays[name] = _safetensors_tensor(path, name, info, mapped, data_start)
        dtypes[name] = _SAFETENSORS_NAMES.get(info["dtype"], str(_SAFETENSORS_DTYPES[info["dtype"]].name))
    return arrays, dtypes


def _safetensors_tensor(path, name, info, mapped, data_start):
    try:
        code, shape, (begin, end) = info["dtype"], tuple(int(s) for s in info["shape"]), info["data_offsets"]
    except (KeyError, TypeError, ValueError) as error:
        raise WeightsFileError(f"{path}: malformed header entry for {name!r}: {info!r}") from error
    dtype = _SAFETENSORS_DTYPES.get(code)
    if dtype is None:
        raise WeightsFileError(
            f"{path}: tensor {name!r} has dtype {code}, which vitnp does not read "
            f"(it reads {', '.join(_SAFETENSORS_DTYPES)})"
        )
    expected = int(np.prod(shape)) * dtype.itemsize
    if end - begin != expected or begin < 0:
        raise WeightsFileError(
            f"{path}: tensor {name!r} holds {end - begin} bytes, its shape {shape} {code} needs {expected}"
        )
    if expected == 0:
        return np.zeros(shape, dtype=np.float32 if code == "BF16" else dtype)
    if data_start + end > mapped.size:
        raise WeightsFileError(f"{path}: tensor {name!r} runs past the end of the file (truncated)")
    values = np.frombuffer(mapped, dtype=dtype, count=int(np.prod(shape)), offset=data_start + begin).reshape(shape)
    return bfloat16_to_float32(values) if code == "BF16" else values


def release_mapped_pages(array):
    """Drop this process's resident pages of the file mapping ``array`` views, if it views one (else nothing).

    For a weight that has been repacked (:func:`vitnp.fast.ops.packed`): the forward reads only the packed
    copy, so the mapped pages would only double the resident memory. The mapping stays valid; a later read of
    ``array`` (``state_dict()``, saving) pages the data back in from the file.
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
        try:
            with open(config_path) as f:
                config = json.load(f)
        except (OSError, json.JSONDecodeError) as error:
            raise WeightsFileError(f"cannot read {config_path}: {error}") from error
    weights_file = os.path.join(path, present[0])
    if weights_file.endswith(".index.json"):
        try:
            with open(weights_file) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, KeyError, TypeError, json.JSONDecodeError) as error:
            raise WeightsFileError(f"cannot read the shard index {weights_file}: {error}") from error
    else:
        shards = [present[0]]
    state_dict, dtypes = {}, {}
    for shard in shards:
        shard_path = os.path.join(path, shard)
        if not os.path.isfile(shard_path):
            raise WeightsFileError(f"{weights_file} names the shard {shard}, which is not in {path}")
        read = read_safetensors if shard.endswith(".safetensors") else read_torch
        arrays, shard_dtypes = read(shard_path)
        state_dict.update(arrays)
        dtypes.update(shard_dtypes)
    return RawCheckpoint(state_dict, config, None, dtypes)


# ---------------------------------------------------------------------------------------------------------------------
# Writing .npz
# ---------------------------------------------------------------------------------------------------------------------


def save_npz(path, state_dict, config=None):
    """Write ``state_dict`` (arrays) to an uncompressed .npz that :func:`load_weights` memory-maps.

    Same format as ``np.savez`` (NumPy reads it as usual), with every array's data placed at a multiple of
    :data:`NPZ_ALIGNMENT` bytes in the file (padding in each member's zip "extra" field), so that the mapped arrays
    are aligned (``np.savez`` places them at any offset: they map as well, but NumPy's BLAS and ufuncs take slower
    paths on unaligned data). ``config`` (constructor arguments, ``labels``) goes into the
    :data:`CONFIG_KEY` entry as JSON, so that ``create_model(name, weights=path)`` rebuilds the model the weights
    were exported from.
    """
    arrays = {key: np.asarray(value, order="C") for key, value in state_dict.items()}  # 0-d stays 0-d
    if config:
        arrays[CONFIG_KEY] = np.array(json.dumps(config))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for key, value in arrays.items():
            header = io.BytesIO()
            np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(value))
            info = zipfile.ZipInfo(key + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.file_size = header.tell() + value.nbytes
            _pad_to_alignment(info, archive.fp.tell(), header.tell())
            with archive.open(info, "w") as member:
                member.write(header.getvalue())
                member.write(memoryview(value).cast("B") if value.nbytes else b"")


NPZ_ALIGNMENT = 64  # bytes; the .npy header is itself padded to a multiple of 64 (NumPy's ARRAY_ALIGN)
_ALIGNMENT_EXTRA_ID = 0xD935  # the zip extra-field id zipalign uses for padding


def _pad_to_alignment(info, header_offset, npy_header_length):
    """Set ``info.extra`` so that the member's array data, after the local header and the .npy header, is aligned."""
    zip64 = info.file_size * 1.05 > zipfile.ZIP64_LIMIT  # zipfile's own rule when it writes the local header
    info.CRC = info.compress_size = 0  # as zipfile sets them before it writes the header; the lengths do not change
    info.extra = b""
    unpadded = header_offset + len(info.FileHeader(zip64)) + npy_header_length + 4  # + the extra field's own header
    padding = -unpadded % NPZ_ALIGNMENT
    info.extra = struct.pack("<HH", _ALIGNMENT_EXTRA_ID, padding) + bytes(padding)
