"""Hostile weight files: each one is built here, small, as an attacker (or a disk fault) would make it, and must give
a WeightsFileError naming the file and the problem, never another exception, a crash, a memory blow-up or a silent
wrong load. Also: a loaded model does not depend on its file staying as it was. No torch needed; the safetensors
library is the oracle of the .safetensors fuzz test only.
"""

import importlib.util
import json
import os
import pathlib
import struct
import subprocess
import sys
import textwrap
import zipfile
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from oracles import images, needs

import vitnp
from vitnp.weights import CONFIG_KEY, WeightsFileError, save_npz

SMALL = {"img_size": 32, "patch_size": 8, "embed_dim": 24, "depth": 2, "num_heads": 2, "num_classes": 5}
NAME = "vit_tiny_patch16_224"
FUZZ = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "fuzz_readers.py"


def _fuzz_module():
    """benchmarks/fuzz_readers.py, whose mutations and outcome checks the fuzz test drives from Hypothesis."""
    spec = importlib.util.spec_from_file_location("fuzz_readers", FUZZ)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fuzz = _fuzz_module()


def _load_error(path, *words):
    """Load ``path``, expecting a WeightsFileError whose message names the file and holds each of ``words``."""
    with pytest.raises(WeightsFileError) as caught:
        vitnp.load_weights(path)
    message = str(caught.value)
    assert os.path.basename(str(path)) in message, message
    for word in words:
        assert word in message, message
    return message


def _raw_npy_header(text, version=(1, 0)):
    """An .npy header holding ``text`` as it is (not necessarily a valid dict)."""
    length = struct.pack("<H", len(text)) if version == (1, 0) else struct.pack("<I", len(text))
    return b"\x93NUMPY" + bytes(version) + length + text


def _npy_header(shape, dtype="<f4", fortran_order=False, version=(1, 0)):
    """An .npy header padded as NumPy pads a version 1.0 one, for any shape and dtype, possible or not."""
    text = repr({"descr": dtype, "fortran_order": fortran_order, "shape": shape}).encode("latin1")
    return _raw_npy_header(text + b" " * (-(len(text) + 11) % 64) + b"\n", version)


def _zip(path, members, flags=0):
    """Write a zip by hand: ``members`` is [(name, stored bytes, method, declared size, declared CRC-32)].

    The directory says what the caller says (sizes over 4 GiB in a zip64 extra field), whatever the bytes hold.
    """
    body, directory = bytearray(), bytearray()
    for name, payload, method, size, crc in members:
        name = name.encode()
        large = size >= 0xFFFFFFFF or len(payload) >= 0xFFFFFFFF
        sizes = (0xFFFFFFFF, 0xFFFFFFFF) if large else (len(payload), size)
        extra = struct.pack("<HHQQ", 1, 16, size, len(payload)) if large else b""
        offset = len(body)
        body += struct.pack("<4s5H3L2H", b"PK\x03\x04", 45, flags, method, 0, 0x21, crc, *sizes, len(name), len(extra))
        body += name + extra + payload
        directory += struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 45, 45, flags, method, 0, 0x21, crc, *sizes,
                                 len(name), len(extra), 0, 0, 0, 0, offset)
        directory += name + extra
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(members), len(members), len(directory), len(body), 0)
    pathlib.Path(path).write_bytes(bytes(body + directory + end))
    return path


def _stored(name, data):
    return (name, data, zipfile.ZIP_STORED, len(data), zlib.crc32(data))


def _deflated(data):
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


def _safetensors(path, header, data=b""):
    """A .safetensors file of ``header`` (a dict, or JSON text or bytes as they are) and ``data``."""
    if isinstance(header, dict):
        header = json.dumps(header)
    text = header.encode() if isinstance(header, str) else header
    pathlib.Path(path).write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def _model(backend, seed=0):
    return vitnp.create_model(NAME, seed=seed, backend=backend, **SMALL)


def _write(path, writer, state):
    if writer == "save_npz":
        save_npz(path, state)
    elif writer == "savez":
        np.savez(path, **state)
    elif writer == "savez_compressed":
        np.savez_compressed(path, **state)
    else:
        pathlib.Path(path).write_bytes(fuzz.safetensors_bytes(state))


WRITERS = ["save_npz", "savez", "savez_compressed", "safetensors"]


def _suffix(writer):
    return ".safetensors" if writer == "safetensors" else ".npz"


# ------------------------------------------------------------------------ a loaded model does not follow its file


@pytest.mark.parametrize("backend", ["reference", "fast"])
@pytest.mark.parametrize("writer", WRITERS)
def test_a_model_keeps_its_weights_when_the_file_is_rewritten_in_place(tmp_path, writer, backend):
    path, other = tmp_path / f"w{_suffix(writer)}", tmp_path / f"other{_suffix(writer)}"
    _write(path, writer, _model(backend, seed=1).state_dict())
    _write(other, writer, _model(backend, seed=2).state_dict())
    x = images((2, 3, 32, 32))
    model = vitnp.create_model(NAME, weights=path, backend=backend, **SMALL)
    before = model(x)
    saved = {key: value.copy() for key, value in model.state_dict().items()}
    with open(path, "r+b") as f:  # the same file (inode), other values: what a copy over it or a re-export does
        f.write(other.read_bytes())
        f.truncate()
    np.testing.assert_array_equal(model(x), before)
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(value, saved[key], err_msg=key)


@pytest.mark.parametrize("writer", WRITERS)
def test_a_model_runs_after_its_file_is_truncated(tmp_path, writer):
    # Arrays that mapped the file would die with SIGBUS on the next forward: run it in a process of its own.
    path = tmp_path / f"w{_suffix(writer)}"
    _write(path, writer, _model("reference", seed=1).state_dict())
    script = textwrap.dedent(f"""
        import os, numpy as np, vitnp
        x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
        model = vitnp.create_model({NAME!r}, weights={str(path)!r}, backend="reference", **{SMALL!r})
        before = model(x)
        os.truncate({str(path)!r}, 0)
        print(np.array_equal(model(x), before))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False, timeout=120)
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    assert result.stdout.split() == ["True"]


# ------------------------------------------------------------------------------------------------- .npz CRC-32s


def _member_data_offset(path, key):
    """Where ``key``'s array data starts in the .npz file at ``path`` (a stored member)."""
    with zipfile.ZipFile(path) as archive, open(path, "rb") as raw:
        info = archive.getinfo(key + ".npy")
        raw.seek(info.header_offset + 26)
        name_length, extra_length = struct.unpack("<HH", raw.read(4))
        with archive.open(info) as member:
            np.lib.format.read_magic(member)
            np.lib.format.read_array_header_1_0(member)
            return info.header_offset + 30 + name_length + extra_length + member.tell()


@pytest.mark.parametrize("writer", ["save_npz", "savez"])
def test_a_byte_changed_in_a_stored_member_is_found_by_its_crc(tmp_path, writer):
    path = tmp_path / "w.npz"
    weight = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)  # 16 KiB
    _write(path, writer, {"bias": np.zeros(3, np.float32), "weight": weight})
    data = bytearray(path.read_bytes())
    data[_member_data_offset(path, "weight") + 5000] ^= 0x40  # past the first 4 KiB: only the CRC can tell
    path.write_bytes(bytes(data))
    _load_error(path, "'weight'", "CRC-32")


def test_a_byte_changed_in_a_deflated_member_is_an_error_naming_it(tmp_path):
    path = tmp_path / "w.npz"
    weight = np.random.default_rng(0).standard_normal((32, 32)).astype(np.float32)
    np.savez_compressed(path, weight=weight)
    original = path.read_bytes()
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("weight.npy")
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    errors = 0
    for position in range(start, start + info.compress_size, max(1, info.compress_size // 40)):
        data = bytearray(original)
        data[position] ^= 0x10
        path.write_bytes(bytes(data))
        try:
            loaded = vitnp.load_weights(path)
        except WeightsFileError as error:
            assert "w.npz" in str(error) and "'weight'" in str(error), error
            errors += 1
        else:  # a bit deflate does not use (the padding after the last block) changes nothing
            np.testing.assert_array_equal(loaded["weight"], weight)
    assert errors >= 38, errors


def test_a_wrong_crc_in_the_zip_directory_is_an_error(tmp_path):
    payload = _npy_header((4,)) + np.arange(4, dtype=np.float32).tobytes()
    name, data, method, size, crc = _stored("a.npy", payload)
    _load_error(_zip(tmp_path / "crc.npz", [(name, data, method, size, crc ^ 1)]), "'a'", "CRC-32")


# ----------------------------------------------------------------------------------------------- .npz zip bombs

UNDER_A_MEMORY_LIMIT = """
import resource, sys
import vitnp
from vitnp import cli

def address_space():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))

limit = address_space() + 256 * 2**20  # room for reading the header, not for any of the arrays the bombs claim
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
"""
BOMB_SCRIPT = UNDER_A_MEMORY_LIMIT + """
for path in sys.argv[1:]:
    try:
        vitnp.load_weights(path)
        print("load", "loaded")
    except vitnp.WeightsFileError as error:
        print("load", "WeightsFileError", str(error).replace("\\n", " "))
    for command in (["inspect", path], ["export", path, "-o", path + ".out.npz", "--model", "vit_tiny_patch16_224"]):
        print(command[0], cli.main(command))
"""


def test_npz_bombs_are_refused_before_allocating_under_a_memory_limit(tmp_path):
    terabyte = 2**40
    # 1. A stored member whose .npy header claims 1 TiB and holds nothing: a file under 200 bytes.
    compact = _raw_npy_header(b"{'descr':'<f4','fortran_order':False,'shape':(%d,)}" % (terabyte // 4))
    claims = _zip(tmp_path / "claims.npz", [_stored("a.npy", compact)])
    assert claims.stat().st_size < 200
    # 2. The zip directory claims the 1 TiB too (zip64), deflated into a few bytes.
    header = _npy_header((terabyte // 4,))
    both = _zip(tmp_path / "both.npz",
                [("a.npy", _deflated(header), zipfile.ZIP_DEFLATED, len(header) + terabyte, zlib.crc32(header))])
    # 3. An honest deflated member of 512 MiB of zeros (a 512 KiB file), more than the process may allocate.
    zeros, size = bytes(2**20), 512 * 2**20
    header = _npy_header((size // 4,))
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    stream, crc = bytearray(compressor.compress(header)), zlib.crc32(header)
    for _ in range(size // len(zeros)):
        stream += compressor.compress(zeros)
        crc = zlib.crc32(zeros, crc)
    stream += compressor.flush()
    honest = _zip(tmp_path / "honest.npz",
                  [("a.npy", bytes(stream), zipfile.ZIP_DEFLATED, len(header) + size, crc)])
    result = subprocess.run([sys.executable, "-c", BOMB_SCRIPT, str(claims), str(both), str(honest)],
                            capture_output=True, text=True, check=False, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert len(lines) == 9, result.stdout
    for path, (load, inspect, export) in zip((claims, both, honest), zip(*[iter(lines)] * 3)):
        assert load.startswith("load WeightsFileError") and path.name in load, load
        assert inspect == "inspect 1" and export == "export 1", (path, inspect, export)
    assert "MemoryError" not in result.stderr and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "not enough memory" in lines[6], lines[6]  # the honest member: the allocation itself fails, cleanly
    assert not any(tmp_path.glob("*.out.npz"))


def test_inflation_stops_at_the_declared_size(tmp_path):
    # A deflated member that inflates to 256 MiB while its headers say 1 KiB: the reader inflates 1 KiB.
    header = _npy_header((256,))
    declared = header + bytes(1024)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    stream = compressor.compress(declared) + b"".join(compressor.compress(bytes(2**20)) for _ in range(256))
    stream += compressor.flush()
    path = _zip(tmp_path / "long.npz",
                [("a.npy", stream, zipfile.ZIP_DEFLATED, len(declared), zlib.crc32(declared))])
    script = UNDER_A_MEMORY_LIMIT + f"print(vitnp.load_weights({str(path)!r})['a'].shape)"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "(256,)", result.stderr[-3000:]


# ------------------------------------------------------------------------------------- malformed .npz members

HOSTILE_NPY = {
    "nested": _raw_npy_header(b"{'descr': '<f4', 'fortran_order': False, 'shape': " + b"(" * 3000 + b")" * 3000
                              + b"}"),
    "unterminated": _raw_npy_header(b"{'descr': '<f4', 'fortran_order': False, 'shape': ((("),
    "float shape": _raw_npy_header(b"{'descr': '<f4', 'fortran_order': False, 'shape': (1e400,)}"),
    "negative shape": _npy_header((-4,)),
    "huge shape": _npy_header((10**400,)),
    "empty but too big": _npy_header((0, 10**20)),
    "object dtype": _npy_header((4,), dtype="|O"),
    "structured dtype": _npy_header((4,), dtype=[("a", "<f4")]),
    "datetime dtype": _npy_header((4,), dtype="<M8[s]"),
    "empty strings": _npy_header((10**12,), dtype="<U0"),
    "version 3": _npy_header((4,), version=(3, 0)),
    "header too long": _raw_npy_header(b" " * 20000, version=(2, 0)),
    "not npy": b"hello, world",
    "short": b"\x93NUMPY\x01",
}


@pytest.mark.parametrize("case", HOSTILE_NPY)
def test_a_malformed_npy_member_is_a_weights_file_error(tmp_path, case):
    payload = HOSTILE_NPY[case] + bytes(16)
    _load_error(_zip(tmp_path / "bad.npz", [_stored("a.npy", payload)]), "'a'")


def test_unreadable_zip_members_are_weights_file_errors(tmp_path):
    payload = _npy_header((4,)) + bytes(16)
    name, data, _, size, crc = _stored("a.npy", payload)
    _load_error(_zip(tmp_path / "method.npz", [(name, data, 99, size, crc)]), "'a'", "method 99")  # AES
    _load_error(_zip(tmp_path / "bzip2.npz", [(name, data, zipfile.ZIP_BZIP2, size, crc)]), "method 12")
    _load_error(_zip(tmp_path / "secret.npz", [(name, data, zipfile.ZIP_STORED, size, crc)], flags=1), "encrypted")
    _load_error(_zip(tmp_path / "twice.npz", [_stored("a.npy", payload)] * 2), "twice")
    _load_error(_zip(tmp_path / "sizes.npz", [(name, data, zipfile.ZIP_STORED, size + 4, crc)]), "must be equal")
    _load_error(_zip(tmp_path / "noise.npz", [(name, os.urandom(40), zipfile.ZIP_DEFLATED, size, crc)]), "'a'")
    _load_error(_zip(tmp_path / "short.npz", [(name, _deflated(payload)[:-6], zipfile.ZIP_DEFLATED, size, crc)]),
                "'a'")
    ends_early = _deflated(payload[:-8])
    _load_error(_zip(tmp_path / "early.npz", [(name, ends_early, zipfile.ZIP_DEFLATED, size, crc)]), "'a'")


def test_a_directory_that_hides_entries_is_an_error(tmp_path):
    # The directory's second entry grows a comment over the third: zipfile would list two entries.
    path = tmp_path / "hidden.npz"
    np.savez(path, a=np.zeros(2), b=np.ones(2), c=np.ones(3))
    data = bytearray(path.read_bytes())
    end = data.rfind(b"PK\x05\x06")
    (offset,) = struct.unpack_from("<L", data, end + 16)
    second = data.index(b"PK\x01\x02", offset + 4)
    hidden = end - (second + 46 + struct.unpack_from("<H", data, second + 28)[0]
                    + struct.unpack_from("<H", data, second + 30)[0])
    struct.pack_into("<H", data, second + 32, hidden)  # entry b's comment now covers entry c
    path.write_bytes(bytes(data))
    with zipfile.ZipFile(path) as archive:
        assert len(archive.infolist()) == 2  # the case under test is there
    _load_error(path, "announces 3 entries and holds 2")


def test_an_end_record_that_does_not_end_the_file_is_an_error(tmp_path):
    # Bytes inserted into the end record shift its counts to 0: zipfile would read an empty archive.
    path = tmp_path / "shifted.npz"
    np.savez(path, a=np.zeros(2))
    data = bytearray(path.read_bytes())
    end = data.rfind(b"PK\x05\x06")
    data[end + 4 : end + 4] = bytes(8)
    path.write_bytes(bytes(data))
    with zipfile.ZipFile(path) as archive:
        assert not archive.infolist()  # the case under test is there
    _load_error(path, "does not end the file")


@pytest.mark.parametrize("config", [np.array("[]"), np.array("{"), np.array("[" * 100000 + "]" * 100000),
                                    np.arange(3.0)], ids=["list", "not JSON", "deeply nested", "numbers"])
def test_a_malformed_saved_config_is_a_weights_file_error(tmp_path, config):
    path = tmp_path / "config.npz"
    np.savez(path, **{"a": np.zeros(2), CONFIG_KEY: config})
    _load_error(path, CONFIG_KEY)


# ------------------------------------------------------------------------------------ the safetensors format

F32x2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
HOSTILE_SAFETENSORS = {
    "offsets as strings": ({"a": {**F32x2, "data_offsets": ["0", "8"]}}, 8, "data_offsets"),
    "offsets as floats": ({"a": {**F32x2, "data_offsets": [0.0, 8.0]}}, 8, "data_offsets"),
    "offsets as booleans": ({"a": {"dtype": "U8", "shape": [1], "data_offsets": [False, True]}}, 1, "data_offsets"),
    "one offset": ({"a": {**F32x2, "data_offsets": [8]}}, 8, "data_offsets"),
    "dtype as a list": ({"a": {**F32x2, "dtype": ["F32"]}}, 8, "dtype"),
    "unknown dtype": ({"a": {**F32x2, "dtype": "F8_E4M3"}}, 8, "F8_E4M3"),
    "shape 1e400": ('{"a": {"dtype": "F32", "shape": [1e400], "data_offsets": [0, 8]}}', 8, "shape"),
    "shape as a string": ({"a": {**F32x2, "shape": "34"}}, 8, "shape"),
    "shape of booleans": ({"a": {**F32x2, "shape": [True, True]}}, 8, "shape"),
    "65 dimensions": ({"a": {**F32x2, "shape": [1] * 65}}, 8, "shape"),
    "empty but too big": ({"a": F32x2, "b": {**F32x2, "shape": [0, 10**20], "data_offsets": [8, 8]}}, 8, "shape"),
    "negative dims, reversed offsets": ({"a": {**F32x2, "shape": [-2], "data_offsets": [8, 0]}}, 8, "shape"),
    "size is not shape": ({"a": {**F32x2, "shape": [3]}}, 8, "needs 12"),
    "an extra field": ({"a": {**F32x2, "scale": 1}}, 8, "malformed"),
    "a missing field": ({"a": {"dtype": "F32", "shape": [2]}}, 8, "malformed"),
    "entry not an object": ({"a": [1, 2]}, 8, "malformed"),
    "overlap": ({"a": F32x2, "b": {**F32x2, "data_offsets": [4, 12]}}, 12, "overlaps"),
    "hole": ({"a": F32x2, "b": {**F32x2, "data_offsets": [12, 20]}}, 20, "gap"),
    "data left over": ({"a": F32x2}, 12, "data section holds 12"),
    "data short": ({"a": F32x2, "b": {**F32x2, "data_offsets": [8, 16]}}, 12, "truncated"),
    "duplicate names": (('{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, '
                         '"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'), 8, "twice"),
    "deeply nested": ('{"a": ' + "[" * 100000 + "]" * 100000 + "}", 8, "JSON"),
    "a 5000-digit offset": ('{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 1' + "0" * 5000 + "]}}", 8,
                            "JSON"),
    "metadata of numbers": ({"__metadata__": {"epoch": 3}, "a": F32x2}, 8, "__metadata__"),
    "metadata a list": ({"__metadata__": ["x"], "a": F32x2}, 8, "__metadata__"),
    "header a list": ("[]", 0, "JSON object"),
    "header not UTF-8": (b'{"\xff": 1}', 0, "JSON"),
}


@pytest.mark.parametrize("case", HOSTILE_SAFETENSORS)
def test_a_safetensors_header_against_the_format_is_a_weights_file_error(tmp_path, case):
    header, data_length, words = HOSTILE_SAFETENSORS[case]
    _load_error(_safetensors(tmp_path / "bad.safetensors", header, bytes(range(data_length))), words)


def test_a_safetensors_header_length_past_the_file_or_the_limit(tmp_path):
    path = tmp_path / "long.safetensors"
    path.write_bytes(struct.pack("<Q", 2**63) + b"{}")
    _load_error(path, "header length")
    path.write_bytes(struct.pack("<Q", 200_000_000) + b" " * 200_000_008)
    _load_error(path, "limit")


def test_well_formed_safetensors_edge_cases_load(tmp_path):
    # Zero-size tensors share an offset; metadata of strings; the header padded with spaces (as writers align it).
    header = {"__metadata__": {"format": "pt"}, "a": F32x2, "empty": {"dtype": "F16", "shape": [0, 3],
                                                                       "data_offsets": [8, 8]},
              "b": {"dtype": "BF16", "shape": [], "data_offsets": [8, 10]}}
    text = json.dumps(header) + "   "
    path = _safetensors(tmp_path / "ok.safetensors", text, np.float32([1, 2]).tobytes() + b"\x80\x3f")
    loaded = vitnp.load_weights(path)
    np.testing.assert_array_equal(loaded["a"], [1, 2])
    assert loaded["empty"].shape == (0, 3) and loaded["b"].shape == () and loaded["b"] == 1.0
    assert not any(value.flags.writeable for value in loaded.values())


# ---------------------------------------------------------------------------------------- Hugging Face folders


def _hf_folder(folder, weight_map=None):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "vit"}))
    if weight_map is not None:
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


@pytest.mark.parametrize("name", ["ABSOLUTE", "../outside.safetensors", "inner/../../outside.safetensors",
                                  "..\\outside.safetensors", ""])
def test_a_shard_index_cannot_name_files_outside_its_folder(tmp_path, name):
    outside = _safetensors(tmp_path / "outside.safetensors", {"a": F32x2}, bytes(8))
    folder = _hf_folder(tmp_path / "model", {"a": str(outside) if name == "ABSOLUTE" else name})
    (folder / "inner").mkdir()
    with pytest.raises(WeightsFileError, match="not a file name inside"):
        vitnp.load_weights(folder)


@pytest.mark.parametrize("index", [[], {"weight_map": []}, {"weight_map": {"a": 3}}, "[" * 100000],
                         ids=["list", "map a list", "shard a number", "deeply nested"])
def test_a_malformed_shard_index_is_a_weights_file_error(tmp_path, index):
    folder = _hf_folder(tmp_path / "model")
    text = index if isinstance(index, str) else json.dumps(index)
    (folder / "model.safetensors.index.json").write_text(text)
    with pytest.raises(WeightsFileError, match="index.json"):
        vitnp.load_weights(folder)


def test_shards_inside_the_folder_load_and_may_be_links_as_in_the_hub_cache(tmp_path):
    # The Hugging Face cache's snapshot folders link each file to its blobs folder: such a shard is read.
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    _safetensors(blobs / "0123abcd", {"a": F32x2}, np.float32([1, 2]).tobytes())
    folder = _hf_folder(tmp_path / "snapshot", {"a": "model-00001-of-00002.safetensors",
                                                 "b": "sub/model-00002-of-00002.safetensors"})
    (folder / "model-00001-of-00002.safetensors").symlink_to(blobs / "0123abcd")
    (folder / "sub").mkdir()
    _safetensors(folder / "sub" / "model-00002-of-00002.safetensors", {"b": F32x2}, np.float32([3, 4]).tobytes())
    loaded = vitnp.load_weights(folder)
    np.testing.assert_array_equal(loaded["a"], [1, 2])
    np.testing.assert_array_equal(loaded["b"], [3, 4])


@pytest.mark.parametrize("config", ["[]", "3", "[" * 100000, "\udcff"],
                         ids=["list", "number", "deeply nested", "not UTF-8"])
def test_a_config_json_that_is_not_an_object_is_a_weights_file_error(tmp_path, config):
    folder = tmp_path / "model"
    folder.mkdir()
    _safetensors(folder / "model.safetensors", {"a": F32x2}, bytes(8))
    (folder / "config.json").write_bytes(config.encode("utf-8", "surrogateescape"))
    with pytest.raises(WeightsFileError, match="config.json"):
        vitnp.load_weights(folder)


# ------------------------------------------------------------------------------------------------------ fuzzing

MUTATIONS = st.lists(
    st.tuples(st.sampled_from(fuzz.MUTATION_KINDS), st.floats(0, 1, exclude_max=True), st.integers(0, 2**16 - 1)),
    min_size=1, max_size=3,
)


@pytest.fixture(scope="module")
def base_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    paths, arrays = fuzz.base_files(str(folder))
    return folder, {reader: pathlib.Path(path).read_bytes() for reader, path in paths.items()}, arrays


def _fuzz(base_files, reader, mutations):
    folder, originals, arrays = base_files
    path = folder / f"mutated{'.safetensors' if reader == 'safetensors' else '.npz'}"
    path.write_bytes(fuzz.apply(originals[reader], mutations))
    kind, detail = fuzz.outcome(str(path), fuzz.expected_after(reader, str(path), arrays))
    assert kind in ("error", "load"), detail


@settings(max_examples=100)
@given(reader=st.sampled_from(["npz_save_npz", "npz_savez", "npz_savez_compressed"]), mutations=MUTATIONS)
def test_mutated_npz_files_give_a_clean_error_or_the_original_arrays(base_files, reader, mutations):
    _fuzz(base_files, reader, mutations)


@needs("safetensors.numpy")
@settings(max_examples=100)
@given(mutations=MUTATIONS)
def test_mutated_safetensors_files_give_a_clean_error_or_what_the_format_says(base_files, mutations):
    _fuzz(base_files, "safetensors", mutations)
