"""MobileViT v1 against timm: state_dict keys and buffers, MV2 and MobileViT blocks, whole models at sizes that need
the bilinear resize, float32 and float64, with and without BatchNorm folding, on both backends.

timm models get random values for every parameter and buffer (``oracles.randomise_``): BatchNorm affines and running
statistics, and the transformer blocks' biases and LayerNorm affines too, which timm initialises to the identity and
which would hide a wrong eps, a swapped statistic or a dropped bias. The registered names at 256x256 are compared
with timm in tests/test_models.py.
"""

import functools

import numpy as np
import pytest
from oracles import BACKENDS, images, in_dtype, needs, numpy_state, random_state, run, timm_model
from tolerances import assert_close

import vitnp
from vitnp import mobilevit

NAMES = ["mobilevit_xxs", "mobilevit_xs", "mobilevit_s"]
needs_timm = needs("torch", "timm")


@functools.lru_cache(maxsize=None)
def _timm_model(name, **kwargs):
    return timm_model(name, **kwargs)


def _pair(name, dtype=np.float32, fold_bn=False, backend="fast", **kwargs):
    """(timm model in dtype, vitnp model with the same weights)."""
    reference = in_dtype(_timm_model(name, **kwargs), dtype)
    model = vitnp.create_model(name, dtype=dtype, fold_bn=fold_bn, backend=backend, **kwargs)
    model.load_state_dict(numpy_state(_timm_model(name, **kwargs)))
    return reference, model


def _block(model, stage, index):
    """The vitnp block, called on and returning NCHW maps like timm's (vitnp's blocks work on NHWC maps)."""
    block = getattr(getattr(model.stages, str(stage)), str(index))
    return lambda x: np.moveaxis(block(np.ascontiguousarray(np.moveaxis(x, 1, -1))), -1, 1)


# ---------------------------------------------------------------------------------------------------- state_dict


@needs_timm
@pytest.mark.parametrize("name", NAMES)
def test_state_dict_keys_shapes_and_buffers_match_timm(name):
    reference = _timm_model(name).state_dict()
    model = vitnp.create_model(name)
    own = model.state_dict()
    assert list(own) == list(reference)
    for key, value in own.items():
        assert value.shape == tuple(reference[key].shape), key
    assert own["stem.bn.num_batches_tracked"].dtype == np.int64
    assert vitnp.count_params(model) == sum(p.numel() for p in _timm_model(name).parameters())


@needs_timm
@pytest.mark.parametrize("fold_bn", [False, True])
def test_loaded_state_dict_round_trips_unchanged(fold_bn):
    _, model = _pair("mobilevit_xxs", fold_bn=fold_bn)
    reference = _timm_model("mobilevit_xxs").state_dict()
    own = model.state_dict()
    for key, value in reference.items():
        np.testing.assert_array_equal(own[key], value.numpy(), err_msg=key)
    assert own["stem.bn.num_batches_tracked"].dtype == np.int64 and own["stem.bn.num_batches_tracked"] > 0


@needs_timm
def test_registry_entries_and_data_config_match_timm():
    import timm

    for name in NAMES:
        assert name in vitnp.list_models()
        cfg = timm.create_model(name, pretrained=False).pretrained_cfg
        ours = vitnp.data_config(name)
        for key in ("input_size", "crop_pct", "interpolation", "mean", "std"):
            assert tuple(np.atleast_1d(ours[key])) == tuple(np.atleast_1d(cfg[key])), (name, key)


def test_architecture_is_fixed_by_name():
    with pytest.raises(ValueError, match="unknown argument"):
        vitnp.create_model("mobilevit_xxs", stage_chs=(16, 16, 16, 16, 16))
    with pytest.raises(ValueError, match="num_classes=0"):
        vitnp.create_model("mobilevit_xxs", global_pool="")


# ---------------------------------------------------------------------------------------------------- blocks


@needs_timm
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("fold_bn", [False, True])
@pytest.mark.parametrize(("stage", "index", "shape"), [
    (0, 0, (2, 16, 15, 12)),  # stride 1, 16 -> 16: residual
    (1, 0, (2, 16, 15, 12)),  # stride 2, 16 -> 24: no shortcut, odd map -> ceil(H / 2)
    (1, 1, (2, 24, 8, 7)),
])  # fmt: skip
def test_mv2_block_matches_timm(stage, index, shape, fold_bn, dtype, backend):
    reference, model = _pair("mobilevit_xxs", dtype, fold_bn, backend)
    x = images(shape, dtype, seed=1)
    expected = run(reference.stages[stage][index], x)
    assert_close(_block(model, stage, index)(x.copy()), expected, "layer")


@needs_timm
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("fold_bn", [False, True])
@pytest.mark.parametrize("hw", [(8, 6), (9, 7), (1, 3)])  # whole 2x2 patches; odd sizes -> bilinear resize
def test_mobilevit_block_matches_timm(hw, fold_bn, dtype, backend):
    reference, model = _pair("mobilevit_xxs", dtype, fold_bn, backend)
    x = images((2, 48, *hw), dtype, seed=2)
    expected = run(reference.stages[2][1], x)
    assert_close(_block(model, 2, 1)(x.copy()), expected, "layer")


# ---------------------------------------------------------------------------------------------------- whole models


@needs_timm
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("name", "batch", "size", "dtype", "fold_bn"), [
    ("mobilevit_xxs", 2, (256, 256), np.float32, True),
    ("mobilevit_xxs", 1, (200, 232), np.float64, True),  # 200x232: odd maps in stages 2-4, the bilinear path
    ("mobilevit_xs", 1, (200, 232), np.float64, False),
    ("mobilevit_s", 1, (200, 232), np.float64, True),
])  # fmt: skip
def test_model_matches_timm(name, batch, size, dtype, fold_bn, backend):
    reference, model = _pair(name, dtype, fold_bn, backend)
    x = images((batch, 3, *size), dtype)
    features = run(reference.forward_features, x)
    logits = run(reference.forward_head, features)
    ours = model.forward_features(x)
    assert ours.dtype == dtype
    np.testing.assert_array_equal(x, images((batch, 3, *size), dtype))  # the input is not written to
    assert_close(ours, features, "model")
    assert_close(model.forward_head(ours), logits, "model")


@pytest.mark.parametrize("backend", BACKENDS)
def test_fold_bn_changes_rounding_only(backend):
    """Folding each BatchNorm into its conv changes nothing but roundings: float64 agrees to ~1e-15 (rtol 1e-12).
    Random BatchNorm statistics and affines: at the init's identity the folding would be trivial."""
    state = random_state(vitnp.create_model("mobilevit_xxs", dtype=np.float64).state_dict(), seed=4)
    unfolded = vitnp.create_model("mobilevit_xxs", weights=state, dtype=np.float64, backend=backend)
    folded = vitnp.create_model("mobilevit_xxs", weights=state, dtype=np.float64, fold_bn=True, backend=backend)
    x = images((1, 3, 96, 80), np.float64)
    np.testing.assert_allclose(folded(x), unfolded(x), rtol=1e-12, atol=1e-12)


@needs_timm
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hw", [(1, 1), (3, 5), (33, 17)])
def test_any_image_size_timm_accepts(hw, backend):
    reference, model = _pair("mobilevit_xxs", backend=backend)
    x = images((1, 3, *hw))
    assert_close(model(x), run(reference, x), "model")


@needs_timm
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kwargs", [dict(num_classes=0), dict(global_pool="max"), dict(global_pool="avgmax")])
def test_head_options_match_timm(kwargs, backend):
    reference, model = _pair("mobilevit_xxs", backend=backend, **kwargs)
    assert list(model.state_dict()) == list(reference.state_dict())
    x = images((2, 3, 64, 64))
    assert_close(model(x), run(reference, x), "model")


def test_bad_input_is_a_clear_value_error():
    model = vitnp.create_model("mobilevit_xxs")
    with pytest.raises(ValueError, match="at least 1x1"):
        model(np.zeros((1, 3, 0, 8), np.float32))
    with pytest.raises(ValueError, match="3 input channels"):
        model(np.zeros((1, 1, 32, 32), np.float32))
    with pytest.raises(ValueError, match="floating-point"):
        model(np.zeros((1, 3, 32, 32), np.uint8))
    with pytest.raises(ValueError, match="global_pool"):
        mobilevit.MobileViT(mobilevit.MobileViTConfig(global_pool="token"))


@needs_timm
def test_make_divisible_as_timm():
    from timm.layers import make_divisible

    for value in [8, 12, 30, 32, 44, 48.5, 96, 100, 250, 640]:
        assert mobilevit.make_divisible(value) == make_divisible(value)
