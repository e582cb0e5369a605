"""Swin Transformer V2 against timm's ``SwinTransformerV2`` (timm 1.0.31): the computed buffers, blocks and whole
models on random weights, float32 and float64, both backends.

Every parameter of the torch modules is drawn by ``oracles.randomise_`` (LayerNorm affines around 1, q / v biases and
the cpb_mlp non-zero), and some heads' ``logit_scale`` is put above timm's clamp, log(100), so that a missing clamp,
a k bias, a dropped ReLU or sigmoid, or pre-norm in place of post-norm cannot pass. The registered names at their own
configuration are compared with timm in tests/test_models.py (logits) and tests/test_registry.py (keys, counts,
preprocessing); here one of them, swinv2_tiny_window8_256, at full size.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from oracles import BACKENDS, images, in_dtype, needs, numpy_state, optional_import, random_state, randomise_, run
from test_swin import _load_module  # a timm module's state_dict into the vitnp module of the same names
from tolerances import assert_close

import vitnp
from vitnp import cli, layouts, swinv2
from vitnp.weights import save_npz

torch = optional_import("torch")
timm = optional_import("timm")
timm_swinv2 = optional_import("timm.models.swin_transformer_v2")
needs_timm = needs("torch", "timm")

DTYPES = st.sampled_from([np.float32, np.float64])
FEW = min(8, settings().max_examples)  # blocks per Hypothesis test: each builds a timm and a vitnp block
ABOVE_CLAMP = 5.5  # a logit_scale above log(1 / 0.01) = 4.6: timm clamps it

# Small models: img 64 / window 4 (a shifted 16x16 and an 8x8 stage), a non-square image whose windows are clamped
# in one dimension only and padded in the other, with pretrained window sizes (an int and an (h, w) pair).
SMALL = {
    "square": dict(img_size=64, embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=4, num_classes=10),
    "clamped": dict(img_size=(72, 40), embed_dim=12, depths=(2, 3), num_heads=(2, 3), window_size=8, num_classes=7,
                    pretrained_window_sizes=(3, (5, 2))),
}  # fmt: skip


def _stress_logit_scale(module):
    """Put the first head of every attention above timm's clamp (in place); returns the module."""
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, timm_swinv2.WindowAttention):
                sub.logit_scale[0] = ABOVE_CLAMP
    return module


def _timm_small(kind, seed=0):
    kwargs = {k: v for k, v in SMALL[kind].items() if k != "pretrained_window_sizes"}
    pretrained = SMALL[kind].get("pretrained_window_sizes", (0,) * len(SMALL[kind]["depths"]))
    reference = timm_swinv2.SwinTransformerV2(**kwargs, pretrained_window_sizes=pretrained)
    return _stress_logit_scale(randomise_(reference, seed).eval())


def _vitnp_small(kind, state, dtype, backend, **changes):
    return vitnp.create_model("swinv2_tiny_window8_256", weights=state, dtype=dtype, backend=backend,
                              **{**SMALL[kind], **changes})


# ------------------------------------------------------------------------------------- computed buffers and masks

windows = st.tuples(st.integers(1, 16), st.integers(1, 16))
pretrained_windows = st.one_of(st.just((0, 0)), st.tuples(st.integers(1, 24), st.integers(0, 24)))


@needs_timm
@given(window=windows, pretrained=pretrained_windows)
def test_relative_coords_table_and_index_equal_timms_buffers(window, pretrained):
    """Bit for bit: the table is timm's float32 buffer (timm scales by the pretrained window when its height is > 0)."""
    reference = timm_swinv2.WindowAttention(4, window, 2, pretrained_window_size=pretrained)
    table = swinv2.relative_coords_table(window, pretrained)
    assert table.dtype == np.float32
    np.testing.assert_array_equal(table, reference.relative_coords_table.numpy()[0])
    attention = swinv2.WindowAttention(4, 2, window, pretrained_window_size=pretrained)
    np.testing.assert_array_equal(attention.relative_position_index, reference.relative_position_index.numpy())


@needs_timm
@given(resolution=st.tuples(st.integers(1, 20), st.integers(1, 20)), window=windows, shifted=st.booleans())
def test_window_shift_and_mask_equal_timms(resolution, window, shifted):
    """The window clamped to the map, no shift where the window covers it, the mask exactly 0 / -100."""
    shift = tuple(w // 2 for w in window) if shifted else (0, 0)
    reference = timm_swinv2.SwinTransformerV2Block(4, resolution, 2, window_size=window, shift_size=shift)
    block = swinv2.SwinTransformerV2Block(4, resolution, 2, window, shift)
    assert block.window_size == tuple(reference.window_size)
    assert block.shift_size == tuple(reference.shift_size)
    if reference.attn_mask is None:
        assert block.attn_mask is None
    else:
        np.testing.assert_array_equal(block.attn_mask, reference.attn_mask.numpy())


# ------------------------------------------------------------------------------------------------------ blocks


@st.composite
def block_cases(draw):
    """A block: resolution, window (may exceed the map: then clamped), shifted or not, pretrained window, heads."""
    window = draw(st.tuples(st.integers(1, 6), st.integers(1, 6)))
    # head_dim >= 4: a unit vector of 1 or 2 values flips with the sign of a value near 0, and LayerNorm over a few
    # channels (post-norm) amplifies rounding: such cases compare float32 roundings, not the formulas
    heads, head_dim = draw(st.integers(1, 3)), draw(st.integers(4, 8))
    return dict(
        B=draw(st.integers(1, 2)), resolution=(draw(st.integers(1, 12)), draw(st.integers(1, 12))), window=window,
        shift=tuple(w // 2 for w in window) if draw(st.booleans()) else (0, 0), heads=heads, dim=heads * head_dim,
        pretrained=draw(pretrained_windows), qkv_bias=draw(st.booleans()), dtype=draw(DTYPES),
        seed=draw(st.integers(0, 2**16)),
    )  # fmt: skip


@needs_timm
@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=FEW)
@given(case=block_cases())
def test_block_matches_timm(case, backend):
    reference = timm_swinv2.SwinTransformerV2Block(
        case["dim"], case["resolution"], case["heads"], window_size=case["window"], shift_size=case["shift"],
        qkv_bias=case["qkv_bias"], pretrained_window_size=case["pretrained"],
    )  # fmt: skip
    reference = in_dtype(_stress_logit_scale(randomise_(reference, case["seed"]).eval()), case["dtype"])
    block = swinv2.SwinTransformerV2Block(
        case["dim"], case["resolution"], case["heads"], case["window"], case["shift"], qkv_bias=case["qkv_bias"],
        pretrained_window_size=case["pretrained"],
    ).set_backend(backend)  # fmt: skip
    _load_module(block, numpy_state(reference))
    x = images((case["B"], *case["resolution"], case["dim"]), case["dtype"], seed=case["seed"])
    out = block(x)
    assert out.dtype == case["dtype"]
    assert_close(out, run(reference, x), "layer")


@needs_timm
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_patch_merging_reduces_then_normalises_as_timm(dtype, backend):
    """Odd H / W padded, timm's 2x2 order, Linear(4C -> out) then LayerNorm(out)."""
    reference = in_dtype(randomise_(timm_swinv2.PatchMerging(6, 10), seed=1).eval(), dtype)
    merging = swinv2.PatchMerging(6, 10).set_backend(backend)
    _load_module(merging, numpy_state(reference))
    x = images((2, 7, 4, 6), dtype, seed=2)
    assert_close(merging(x), run(reference, x), "layer")


# ------------------------------------------------------------------------------------------------ whole models


@needs_timm
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind", SMALL)
def test_small_model_matches_timm(kind, dtype, backend):
    reference = in_dtype(_timm_small(kind), dtype)
    model = _vitnp_small(kind, numpy_state(reference), dtype, backend)
    x = images((2, 3, *model.img_size), dtype, seed=1)
    out = model(x)
    assert out.dtype == dtype
    assert np.abs(out).max() > 0.1
    assert_close(out, run(reference, x), "model")
    if dtype == np.float64:  # in float32 the maps of these narrow stages (LayerNorm over 12 channels after attention
        # logits scaled by 100) are ~4e-4 from the exact values in torch itself: only the float64 maps say anything
        features = run(reference.forward_features, x)  # (B, H', W', C), NHWC as timm's
        assert_close(model.forward_features(x), features, "model")


@needs_timm
@pytest.mark.parametrize("backend", BACKENDS)
def test_registered_name_at_full_size_matches_timm(backend):
    """swinv2_tiny_window8_256 as timm builds it (256x256, window 8, the last stage's 8x8 map one unshifted window)."""
    from oracles import timm_model

    reference = _stress_logit_scale(timm_model("swinv2_tiny_window8_256"))
    model = vitnp.create_model("swinv2_tiny_window8_256", weights=numpy_state(reference), backend=backend)
    x = images((1, 3, 256, 256), np.float32, seed=3)
    assert_close(model(x), run(reference, x), "model")


@needs_timm
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_wrong_pretrained_window_size_changes_the_output(backend):
    """The same weights with the pretrained window sizes left out (each stage's own window scales the coordinates)
    give another position bias, and other logits."""
    reference = _timm_small("clamped")
    state = numpy_state(reference)
    x = images((1, 3, 72, 40), np.float32, seed=4)
    expected = run(reference, x)
    right = _vitnp_small("clamped", state, np.float32, backend)
    assert_close(right(x), expected, "model")
    for wrong in (None, (3, 3), (4, (5, 2))):
        model = _vitnp_small("clamped", state, np.float32, backend, pretrained_window_sizes=wrong)
        assert np.abs(model(x) - expected).max() > 1e-2, wrong


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_position_bias_follows_new_cpb_weights_and_refuses_changes_in_place(backend):
    """The continuous position bias is computed once per set of cpb_mlp weights: a load_state_dict after a forward
    gives the logits of a model built with the new weights, and writing into a weight it was computed from fails
    instead of leaving it stale."""
    model = _vitnp_small("square", None, np.float32, backend)
    x = images((1, 3, 64, 64), np.float32, seed=6)
    before = model(x)
    state = model.state_dict()
    rng = np.random.default_rng(7)
    changed = {key: (rng.standard_normal(value.shape).astype(value.dtype) if ".cpb_mlp." in key else value)
               for key, value in state.items()}
    model.load_state_dict(changed)
    after = model(x)
    assert_close(after, _vitnp_small("square", changed, np.float32, backend)(x), "model")
    assert np.abs(after - before).max() > 1e-3
    with pytest.raises(ValueError, match="read-only"):
        model.state_dict()["layers.0.blocks.0.attn.cpb_mlp.2.weight"][0, 0] = 1.0


def test_the_kept_position_bias_is_the_backends_and_is_not_carried_into_copies():
    """The bias kept by a model on one backend is not used on the other (their Linears round differently): switched
    to the reference, a model gives a fresh reference model's logits bit for bit. A pickled copy computes its own and
    makes its own weights read-only (its unpickled arrays are writable, and a write would leave a copied bias stale)."""
    import pickle

    model = _vitnp_small("square", None, np.float32, "fast")
    x = images((1, 3, 64, 64), np.float32, seed=8)
    model(x)
    fresh = _vitnp_small("square", model.state_dict(), np.float32, "reference")
    np.testing.assert_array_equal(model.set_backend("reference")(x), fresh(x))
    copy = pickle.loads(pickle.dumps(model))
    np.testing.assert_array_equal(copy(x), fresh(x))
    with pytest.raises(ValueError, match="read-only"):
        copy.state_dict()["layers.1.blocks.1.attn.cpb_mlp.0.bias"][0] = 1.0


def test_forward_trace_names_are_timms_module_paths_and_end_in_the_logits():
    model = vitnp.create_model("swinv2_tiny_window8_256", **SMALL["square"])
    x = images((1, 3, 64, 64), np.float32)
    trace = model.forward_trace(x)
    assert list(trace) == ["patch_embed", "layers.0.blocks.0", "layers.0.blocks.1", "layers.1.downsample",
                           "layers.1.blocks.0", "layers.1.blocks.1", "norm", "pre_logits", "logits"]
    np.testing.assert_array_equal(trace["logits"], model(x))


@needs_timm
def test_vitnp_verify_torch_compares_every_layer_with_timm(tmp_path, capsys):
    arch = {k: v for k, v in SMALL["clamped"].items() if k != "img_size"} | dict(img_size=48)
    weights = tmp_path / "swinv2.npz"
    state = random_state(vitnp.create_model("swinv2_tiny_window8_256", **arch).state_dict(), seed=5)
    save_npz(weights, state, dict(arch))
    assert cli.main(["verify", "--model", "swinv2_tiny_window8_256", "--weights", str(weights), "--torch"]) == 0
    out = capsys.readouterr().out
    assert "layers.1.downsample" in out and "logits" in out and "FAIL" not in out


# ---------------------------------------------------------------------------------------- keys, init, arguments


@needs_timm
@pytest.mark.parametrize("name", sorted(swinv2.MODELS))
def test_state_dict_keys_and_shapes_equal_timms(name, monkeypatch):
    """Same keys in the same order and shapes, none of timm's non-persistent buffers (relative_coords_table,
    relative_position_index, k_bias, attn_mask) among them. Both sides built without filling their weights."""
    monkeypatch.setattr(vitnp.model.Model, "init_weights", lambda self, seed=0, dtype=np.float32: None)
    with torch.device("meta"):
        reference = timm.create_model(name, pretrained=False)
    expected = [(k, tuple(v.shape)) for k, v in reference.state_dict().items()]
    assert [(k, v.shape) for k, v in vitnp.create_model(name).state_dict().items()] == expected


@needs_timm
def test_random_init_starts_logit_scale_at_log_10_as_timm():
    initial = float(timm_swinv2.WindowAttention(8, (4, 4), 2).logit_scale.detach()[0])
    model = vitnp.create_model("swinv2_tiny_window8_256", **SMALL["square"])
    scales = [value for key, value in model.state_dict().items() if key.endswith("logit_scale")]
    assert len(scales) == 4
    for value in scales:
        np.testing.assert_allclose(value, initial, rtol=1e-7)


def test_timm_weights_are_recognised_and_refused_by_swin_v1():
    state = vitnp.create_model("swinv2_tiny_window8_256", **SMALL["square"]).state_dict()
    assert layouts.detect_layout(state) == "timm-swinv2"
    with pytest.raises(ValueError, match="timm-swinv2.*'swin_tiny_patch4_window7_224' is a SwinTransformer"):
        vitnp.create_model("swin_tiny_patch4_window7_224", weights=state)
    arch = {**SMALL["square"], "num_classes": 0}  # the weights' classifier is left out
    headless = vitnp.create_model("swinv2_tiny_window8_256", weights=state, **arch)
    assert headless(images((1, 3, 64, 64))).shape == (1, 32)  # the pooled features


@pytest.mark.parametrize("sizes, problem", [
    ((12, 12, 12), "one window size per stage"), ((12, -1, 12, 6), "integers >= 0"), ((12, 12, 12, "6"), "integers"),
    ((12, (1, 2, 3), 12, 6), "pairs"), (12, "one window size per stage"),
])  # fmt: skip
def test_bad_pretrained_window_sizes_are_a_value_error_naming_them(sizes, problem):
    with pytest.raises(ValueError, match="pretrained") as error:
        vitnp.create_model("swinv2_tiny_window8_256", pretrained_window_sizes=sizes)
    assert problem in str(error.value)


def test_image_of_another_size_is_refused_with_the_size_to_build():
    model = vitnp.create_model("swinv2_tiny_window8_256", **SMALL["square"])
    with pytest.raises(ValueError, match="img_size=\\(96, 96\\)"):
        model(images((1, 3, 96, 96)))
