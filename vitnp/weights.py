"""Reading weight files into ``{timm key: array}`` dictionaries.

``.npz`` files are what ``np.savez(f, **{k: t.numpy() for k, t in model.state_dict().items()})`` writes. Members
stored without compression (``np.savez``) are memory-mapped straight from the file, so loading costs no copy and
no more memory than the pages the forward pass touches; compressed members (``np.savez_compressed``) are read.
"""

import os
import struct
import zipfile

import numpy as np

_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")  # the fixed 30-byte part of a zip local file header
_LOCAL_HEADER_MAGIC = b"PK\003\004"
_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


class WeightsFileError(ValueError):
    """A weight file that cannot be read: missing, truncated, not an .npz, or holding something not an array."""


def load_weights(path):
    """Read a weight file into a dict of arrays keyed as in the file (a PyTorch ``state_dict``'s names)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise WeightsFileError(f"weights file not found: {path}")
    if not path.endswith(".npz"):
        raise WeightsFileError(f"unsupported weights file {path}: vitnp reads .npz (see `vitnp export`)")
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
    mapped = np.memmap(path, dtype=dtype, mode="r", offset=data_offset, shape=shape, order="F" if fortran_order else "C")
    return np.asarray(mapped)  # a plain read-only ndarray view of the mapping
