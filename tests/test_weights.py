"""Weight files, state_dict loading and input checks: every failure is a clear error naming the problem, and a failed
load leaves the model as it was. No torch needed: the files are written with NumPy exactly as the export recipe
``np.savez(f, **{k: t.numpy() for k, t in model.state_dict().items()})`` writes them."""

import mmap
import zipfile

import numpy as np
import pytest
from oracles import images

import vitnp
from vitnp.weights import CONFIG_KEY, save_npz

SMALL = dict(img_size=32, patch_size=8, embed_dim=24, depth=2, num_heads=2, num_classes=5)
NAME = "vit_tiny_patch16_224"


def _small_model(seed=0, dtype=np.float32, **overrides):
    return vitnp.create_model(NAME, seed=seed, dtype=dtype, **{**SMALL, **overrides})


def _images(batch=2, dtype=np.float32, size=32, channels=3, seed=0):
    return images((batch, channels, size, size), dtype, seed)


def _snapshot(model):
    return {k: v.copy() for k, v in model.state_dict().items()}


def _assert_same_state(model, snapshot):
    state = model.state_dict()
    assert state.keys() == snapshot.keys()
    for key, value in snapshot.items():
        np.testing.assert_array_equal(state[key], value, err_msg=key)
        assert state[key].dtype == value.dtype, key


@pytest.fixture
def state():
    return _small_model(seed=7).state_dict()


# ---------------------------------------------------------------------------------------------------- load_weights


def _is_memory_mapped(array):
    bases, base = [], array
    while base is not None:
        bases.append(base)
        base = getattr(base, "base", None)
    return any(isinstance(b, (np.memmap, mmap.mmap)) for b in bases)


def test_load_weights_reads_savez_arrays_into_read_only_memory(tmp_path, state):
    path = tmp_path / "weights.npz"
    arrays = {**state, "fortran": np.asfortranarray(np.arange(12.0).reshape(3, 4)), "scalar": np.float64(2.5)}
    np.savez(path, **arrays)
    loaded = vitnp.load_weights(path)
    assert list(loaded) == list(arrays)
    for key, value in arrays.items():
        assert loaded[key].dtype == np.asarray(value).dtype and loaded[key].shape == np.shape(value), key
        np.testing.assert_array_equal(loaded[key], value, err_msg=key)
        # read into memory, not mapped: the arrays do not change when the file does
        assert not _is_memory_mapped(loaded[key]) and not loaded[key].flags.writeable, key


def test_save_npz_writes_an_ordinary_npz_that_loads_back(tmp_path, state):
    path = tmp_path / "weights.npz"
    arrays = {**state, "odd": np.arange(7, dtype=np.float16), "empty": np.zeros((0, 3), np.float32),
              "scalar": np.array(3, np.int64)}  # a 0-d entry (BatchNorm's num_batches_tracked) stays 0-d
    save_npz(path, arrays, config={"img_size": 32})
    with np.load(path) as plain:  # an ordinary .npz for NumPy
        assert sorted(plain.files) == sorted([*arrays, CONFIG_KEY])
        for key, value in arrays.items():
            np.testing.assert_array_equal(plain[key], value, err_msg=key)
    loaded = vitnp.load_weights(path)
    for key, value in arrays.items():
        assert loaded[key].shape == value.shape, key
        np.testing.assert_array_equal(loaded[key], value, err_msg=key)
        assert not loaded[key].flags.writeable, key
    weight = loaded["blocks.0.attn.qkv.weight"]
    with pytest.raises(ValueError):
        weight[0, 0] = 1.0
    first = path.read_bytes()
    save_npz(path, arrays, config={"img_size": 32})
    assert path.read_bytes() == first  # the same arrays, the same file


def test_load_weights_reads_savez_compressed(tmp_path, state):
    path = tmp_path / "weights.npz"
    np.savez_compressed(path, **state)
    with zipfile.ZipFile(path) as archive:
        assert all(info.compress_type == zipfile.ZIP_DEFLATED for info in archive.infolist())
    loaded = vitnp.load_weights(str(path))
    assert loaded.keys() == state.keys()
    for key, value in state.items():
        np.testing.assert_array_equal(loaded[key], value, err_msg=key)


def test_load_weights_of_empty_arrays(tmp_path):
    path = tmp_path / "empty.npz"
    np.savez(path, empty=np.zeros((0, 3), np.float32))
    assert vitnp.load_weights(path)["empty"].shape == (0, 3)


def test_truncated_npz_is_a_weights_file_error_naming_the_file(tmp_path, state):
    path = tmp_path / "cut.npz"
    np.savez(path, **state)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(vitnp.WeightsFileError, match="cut.npz"):
        vitnp.load_weights(path)


def test_member_shorter_than_its_header_is_an_error(tmp_path):
    """A zip whose .npy member lost its tail (the central directory intact) is caught before mapping."""
    member = tmp_path / "a.npy"
    np.save(member, np.arange(100, dtype=np.float32))
    path = tmp_path / "short.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("a.npy", member.read_bytes()[:-40])
    with pytest.raises(vitnp.WeightsFileError, match="short.npz"):
        vitnp.load_weights(path)


def test_object_array_entry_is_a_weights_file_error(tmp_path, state):
    path = tmp_path / "objects.npz"
    np.savez(path, **state, extra=np.array([{"not": "an array"}, None], dtype=object))
    with pytest.raises(vitnp.WeightsFileError, match="extra") as error:
        vitnp.load_weights(path)
    assert "objects.npz" in str(error.value)


def test_non_npy_member_is_a_weights_file_error(tmp_path):
    path = tmp_path / "notes.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("readme.txt", "these are not weights")
    with pytest.raises(vitnp.WeightsFileError, match="readme"):
        vitnp.load_weights(path)


def test_missing_file_and_wrong_extension_are_clear_errors(tmp_path, state):
    with pytest.raises(vitnp.WeightsFileError, match="not found.*nothere.npz"):
        vitnp.load_weights(tmp_path / "nothere.npz")
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"\x08\x07onnx protobuf")
    with pytest.raises(vitnp.WeightsFileError, match=r"unsupported.*model\.onnx.*\.npz"):
        vitnp.load_weights(onnx)
    renamed = tmp_path / "weights.npz.txt"  # an .npz under another name is not guessed at either
    np.savez(tmp_path / "weights.npz", **state)
    (tmp_path / "weights.npz").rename(renamed)
    with pytest.raises(vitnp.WeightsFileError, match="unsupported"):
        vitnp.load_weights(renamed)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file at all")
    with pytest.raises(vitnp.WeightsFileError, match="garbage.npz"):
        vitnp.load_weights(garbage)
    assert issubclass(vitnp.WeightsFileError, ValueError)


# ---------------------------------------------------------------------------------------------------- load_state_dict


def test_load_state_dict_lists_every_problem_at_once_and_changes_nothing(state):
    model = _small_model(seed=1)
    before = _snapshot(model)
    broken = dict(state)
    del broken["head.bias"], broken["blocks.1.norm2.weight"]
    broken["head.extra"] = np.zeros(3, np.float32)
    broken["blocks.0.mlp.fc1.weight"] = np.zeros((7, 24), np.float32)
    with pytest.raises(vitnp.WeightsError) as error:
        model.load_state_dict(broken)
    message = str(error.value)
    for key in ("head.bias", "blocks.1.norm2.weight", "head.extra", "blocks.0.mlp.fc1.weight", "(7, 24)", "(96, 24)"):
        assert key in message, f"{key} not named in: {message}"
    assert "missing" in message and "unexpected" in message
    _assert_same_state(model, before)  # not even the well-formed keys were loaded


def test_non_numeric_values_are_rejected_without_loading(state):
    model = _small_model(seed=1)
    before = _snapshot(model)
    broken = {**state, "head.weight": np.full(state["head.weight"].shape, "x")}
    with pytest.raises(vitnp.WeightsError, match="head.weight"):
        model.load_state_dict(broken)
    _assert_same_state(model, before)


def test_non_strict_load_returns_missing_and_unexpected(state):
    model = _small_model(seed=1)
    before = _snapshot(model)
    partial = {k: v for k, v in state.items() if not k.startswith("head.")}
    partial["fc_norm.weight"] = np.ones(24, np.float32)
    missing, unexpected = model.load_state_dict(partial, strict=False)
    assert sorted(missing) == ["head.bias", "head.weight"]
    assert unexpected == ["fc_norm.weight"]
    loaded = model.state_dict()
    np.testing.assert_array_equal(loaded["pos_embed"], state["pos_embed"])
    np.testing.assert_array_equal(loaded["head.weight"], before["head.weight"])
    # mis-shaped keys are an error even when not strict
    with pytest.raises(vitnp.WeightsError, match="pos_embed"):
        model.load_state_dict({"pos_embed": np.zeros((1, 5, 24), np.float32)}, strict=False)


def test_state_dict_round_trip_gives_the_same_outputs(state):
    source = _small_model(seed=7)
    target = _small_model(seed=8)
    x = _images()
    assert not np.allclose(source(x), target(x))
    assert target.load_state_dict(source.state_dict()) == ([], [])
    np.testing.assert_array_equal(target(x), source(x))


def test_weights_are_cast_to_the_model_dtype(state):
    model = _small_model(dtype=np.float64)
    model.load_state_dict(state)
    assert all(v.dtype == np.float64 for v in model.state_dict().values())
    np.testing.assert_array_equal(model.state_dict()["head.weight"], state["head.weight"].astype(np.float64))


def test_create_model_with_weights_path_or_dict(tmp_path, state):
    path = tmp_path / "small.npz"
    np.savez(path, **state)
    from_path = vitnp.create_model(NAME, weights=path, **SMALL)
    from_str = vitnp.create_model(NAME, weights=str(path), **SMALL)
    from_dict = vitnp.create_model(NAME, weights=state, **SMALL)
    x = _images()
    reference = _small_model(seed=7)(x)
    for model in (from_path, from_str, from_dict):
        np.testing.assert_array_equal(model(x), reference)
    with pytest.raises(vitnp.WeightsError, match="pos_embed"):  # weights of another image size
        vitnp.create_model(NAME, weights=path, **{**SMALL, "img_size": 64})


# ---------------------------------------------------------------------------------------------------- inputs


@pytest.fixture(scope="module")
def model():
    return _small_model(dynamic_img_size=False)  # timm's default: only the size it was built for


@pytest.mark.parametrize(
    "x, message",
    [
        (np.zeros((3, 32, 32), np.float32), "rank 4"),
        (np.zeros((1, 1, 3, 32, 32), np.float32), "rank 4"),
        (np.zeros((1, 1, 32, 32), np.float32), "3 input channels"),
        (np.zeros((1, 32, 32, 3), np.float32), "3 input channels"),  # NHWC by mistake
        (np.zeros((1, 3, 64, 64), np.float32), "32x32"),
        (np.zeros((1, 3, 32, 40), np.float32), "32x40"),
        (np.zeros((1, 3, 32, 32), np.uint8), "floating-point"),
        (np.zeros((1, 3, 32, 32), np.int64), "dtype int64"),
        ([[[[1]]]], "floating-point"),
    ],
)
def test_bad_input_is_a_clear_value_error(model, x, message):
    with pytest.raises(ValueError, match=message):
        model(x)
    with pytest.raises(ValueError, match=message):
        model.forward_features(x)


def test_other_float_dtypes_are_cast_to_the_model_dtype(model):
    x16 = _images(dtype=np.float16)
    expected = model(x16.astype(np.float32))
    y16 = model(x16)
    assert y16.dtype == np.float32
    np.testing.assert_array_equal(y16, expected)
    x64 = x16.astype(np.float64)
    y64 = model(x64)
    assert y64.dtype == np.float32
    np.testing.assert_array_equal(y64, expected)
    model64 = _small_model(dtype=np.float64)
    assert model64(x16.astype(np.float32)).dtype == np.float64


def test_strided_input_gives_the_same_output(model):
    nhwc = np.ascontiguousarray(_images().transpose(0, 2, 3, 1))
    x = nhwc.transpose(0, 3, 1, 2)  # an NCHW view of an NHWC buffer
    np.testing.assert_array_equal(model(x), model(np.ascontiguousarray(x)))


def test_nested_list_input_is_accepted(model):
    x = _images(batch=1)
    np.testing.assert_array_equal(model(x.tolist()), model(x))


# ---------------------------------------------------------------------------------------------------- packed weights


def test_a_new_weight_array_is_packed_again(state):
    # The fast backend packs Linear weights on first use (vitnp.fast.ops.packed); a load must not leave the old
    # packing in use. (On the reference backend, which reads the parameters as they are, this is the round trip.)
    model = _small_model(seed=0, backend="fast")
    x = _images()
    before = model(x)
    model.load_state_dict(state)
    np.testing.assert_array_equal(model(x), _small_model(seed=7, backend="fast")(x))
    assert np.abs(model(x) - before).max() > 1e-3


def test_a_packed_weight_cannot_be_changed_in_place():
    # The fast backend's forward reads the packed copy: an in-place change of the parameter would be silently
    # ignored, so the parameter is read-only once packed, and the change fails loudly instead. The reference backend
    # packs nothing and reads the parameter itself: this is the fast backend's behaviour, asked for explicitly.
    model = _small_model(backend="fast")
    model(_images())
    weight = model.state_dict()["blocks.0.attn.qkv.weight"]
    with pytest.raises(ValueError, match="read-only"):
        weight[0, 0] = 1.0


def test_a_batch_norm_is_applied_from_its_current_arrays_and_cannot_be_changed_in_place():
    # MobileViT's convs apply each BatchNorm as x * scale + shift, computed once from its four arrays: a load's new
    # arrays are seen at the next forward; an in-place change, which the kept values would not see, fails loudly.
    model = vitnp.create_model("mobilevit_xxs", seed=0, img_size=64)
    x = images((1, 3, 64, 64))
    before = model(x)
    bn = model.stem.bn
    assert bn.scale_shift() is bn.scale_shift()
    with pytest.raises(ValueError, match="read-only"):
        bn.running_var[0] = 2.0
    state = model.state_dict()
    state["stem.bn.running_var"] = np.full_like(state["stem.bn.running_var"], 4.0)
    model.load_state_dict(state)
    scale, shift = bn.scale_shift()
    np.testing.assert_array_equal(scale, bn.weight / np.sqrt(np.float32(4.0) + np.float32(bn.eps)))
    np.testing.assert_array_equal(shift, bn.bias - bn.running_mean * scale)
    assert np.abs(model(x) - before).max() > 1e-3


def _resident_bytes(path):
    """Bytes of ``path``'s mappings resident in this process (Linux /proc/self/smaps)."""
    total, in_file = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5:  # a mapping's header line: address range, ..., [path]
                in_file = len(fields) >= 6 and fields[5] == str(path)
            elif in_file and fields[0] == "Rss:":
                total += int(fields[1]) * 1024
    return total


@pytest.mark.skipif(not hasattr(mmap, "MADV_DONTNEED"), reason="needs madvise (Linux, macOS)")
def test_mapped_weights_are_released_once_packed(tmp_path):
    import os

    if not os.path.exists("/proc/self/smaps"):
        pytest.skip("resident pages are read from /proc/self/smaps (Linux)")
    # Weights a caller hands over memory-mapped and uncopied (np.load(mmap_mode="r") of .npy files, copy=False;
    # vitnp's readers read into memory): the fast backend's packing copies the Linear weights and releases their
    # mapped pages.
    original = _small_model(seed=3, embed_dim=256, num_heads=4, backend="fast")  # Linear weights ~3 MB of the files
    files = {}
    for key, value in original.state_dict().items():
        files[key] = tmp_path / f"{key}.npy"
        np.save(files[key], value)
    model = _small_model(embed_dim=256, num_heads=4, backend="fast")
    model.load_state_dict({key: np.asarray(np.load(file, mmap_mode="r")) for key, file in files.items()}, copy=False)
    for value in model.state_dict().values():
        value.sum()  # touch every page of the mappings
    size = sum(os.path.getsize(file) for file in files.values())
    assert sum(_resident_bytes(file) for file in files.values()) > 0.9 * size
    out = model(_images())
    assert sum(_resident_bytes(file) for file in files.values()) < 0.2 * size  # the Linear weights' pages went
    np.testing.assert_array_equal(out, original(_images()))
    _assert_same_state(model, _snapshot(original))  # the released weights read back from the files


@pytest.mark.parametrize("name, overrides", [(NAME, SMALL), ("mobilevit_xxs", dict(img_size=64, num_classes=5))])
def test_a_model_from_an_unaligned_savez_file_gives_the_same_logits(tmp_path, name, overrides):
    # np.savez puts arrays at any byte offset: weights read from such a file must give the model's own logits (the
    # Linear weights through packing, MobileViT's convs through the BLAS).
    model = vitnp.create_model(name, seed=5, **overrides)
    path = tmp_path / "weights.npz"
    np.savez(path, **model.state_dict())
    loaded = vitnp.load_weights(path)
    mapped = vitnp.create_model(name, **overrides)
    mapped.load_state_dict(loaded)
    x = _images(size=model.img_size[0])
    np.testing.assert_array_equal(mapped(x), model(x))
