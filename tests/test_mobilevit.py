"""MobileViT v1 against timm: state_dict keys and buffers, MV2 and MobileViT blocks, whole models at 256x256 and at
sizes that need the bilinear resize, float32 and float64, with and without BatchNorm folding.

timm models are built with ``pretrained=False`` and random weights; every BatchNorm gets random running statistics
and affine parameters (timm initialises them to the identity, which would hide a wrong eps or a swapped statistic),
and the head is scaled so that logits are O(1).
"""

import copy
import functools

import numpy as np
import pytest
from tolerances import assert_close

import vitnp
from vitnp import mobilevit

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

NAMES = ["mobilevit_xxs", "mobilevit_xs", "mobilevit_s"]
DTYPES = {np.float32: torch.float32, np.float64: torch.float64}


@functools.lru_cache(maxsize=None)
def _timm_model(name, **kwargs):
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.copy_(1.0 + 0.1 * torch.randn(module.weight.shape, generator=gen))
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=gen))
                module.running_mean.copy_(0.1 * torch.randn(module.running_mean.shape, generator=gen))
                module.running_var.copy_(0.5 + 1.5 * torch.rand(module.running_var.shape, generator=gen))
                module.num_batches_tracked.fill_(123)
        fc = getattr(model.head, "fc", None)
        if isinstance(fc, torch.nn.Linear):
            fc.weight.copy_(torch.randn(fc.weight.shape, generator=gen) * fc.in_features**-0.5)
    return model


def _pair(name, dtype=np.float32, fold_bn=False, **kwargs):
    """(timm model in dtype, vitnp model with the same weights)."""
    reference = _timm_model(name, **kwargs)
    if dtype == np.float64:
        reference = copy.deepcopy(reference).double()
    model = vitnp.create_model(name, dtype=dtype, fold_bn=fold_bn, **kwargs)
    model.load_state_dict({k: v.numpy() for k, v in _timm_model(name, **kwargs).state_dict().items()})
    return reference, model


def _images(shape, dtype, seed=0):
    return np.random.default_rng(seed).random(shape).astype(dtype)  # pixels in [0, 1]: MobileViT's input range


def _block(model, stage, index):
    """The vitnp block, called on and returning NCHW maps like timm's (vitnp's blocks work on NHWC maps)."""
    block = getattr(getattr(model.stages, str(stage)), str(index))
    return lambda x: np.moveaxis(block(np.ascontiguousarray(np.moveaxis(x, 1, -1))), -1, 1)


# ---------------------------------------------------------------------------------------------------- state_dict


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


@pytest.mark.parametrize("fold_bn", [False, True])
def test_loaded_state_dict_round_trips_unchanged(fold_bn):
    _, model = _pair("mobilevit_xxs", fold_bn=fold_bn)
    reference = _timm_model("mobilevit_xxs").state_dict()
    own = model.state_dict()
    for key, value in reference.items():
        np.testing.assert_array_equal(own[key], value.numpy(), err_msg=key)
    assert own["stem.bn.num_batches_tracked"].dtype == np.int64 and own["stem.bn.num_batches_tracked"] == 123


def test_registry_entries_and_data_config_match_timm():
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


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("fold_bn", [False, True])
@pytest.mark.parametrize(("stage", "index", "shape"), [
    (0, 0, (2, 16, 15, 12)),  # stride 1, 16 -> 16: residual
    (1, 0, (2, 16, 15, 12)),  # stride 2, 16 -> 24: no shortcut, odd map -> ceil(H / 2)
    (1, 1, (2, 24, 8, 7)),
])
def test_mv2_block_matches_timm(stage, index, shape, fold_bn, dtype):
    reference, model = _pair("mobilevit_xxs", dtype, fold_bn)
    x = np.random.default_rng(1).standard_normal(shape).astype(dtype)
    with torch.no_grad():
        expected = reference.stages[stage][index](torch.from_numpy(x)).numpy()
    assert_close(_block(model, stage, index)(x.copy()), expected, "layer")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("fold_bn", [False, True])
@pytest.mark.parametrize("hw", [(8, 6), (9, 7), (1, 3)])  # whole 2x2 patches; odd sizes -> bilinear resize
def test_mobilevit_block_matches_timm(hw, fold_bn, dtype):
    reference, model = _pair("mobilevit_xxs", dtype, fold_bn)
    x = np.random.default_rng(2).standard_normal((2, 48, *hw)).astype(dtype)
    with torch.no_grad():
        expected = reference.stages[2][1](torch.from_numpy(x)).numpy()
    assert_close(_block(model, 2, 1)(x.copy()), expected, "layer")


# ---------------------------------------------------------------------------------------------------- whole models


@pytest.mark.parametrize(("name", "batch", "size", "dtype", "fold_bn"), [
    ("mobilevit_xxs", 1, (256, 256), np.float32, False),
    ("mobilevit_xs", 1, (256, 256), np.float32, True),
    ("mobilevit_s", 1, (256, 256), np.float32, False),
    ("mobilevit_xxs", 2, (256, 256), np.float32, True),
    ("mobilevit_xxs", 1, (200, 232), np.float64, True),  # 200x232: odd maps in stages 2-4, the bilinear path
    ("mobilevit_xs", 1, (200, 232), np.float64, False),
    ("mobilevit_s", 1, (200, 232), np.float64, True),
])
def test_model_matches_timm(name, batch, size, dtype, fold_bn):
    reference, model = _pair(name, dtype, fold_bn)
    x = _images((batch, 3, *size), dtype)
    with torch.no_grad():
        features = reference.forward_features(torch.from_numpy(x))
        logits = reference.forward_head(features).numpy()
    ours = model.forward_features(x)
    assert ours.dtype == dtype
    np.testing.assert_array_equal(x, _images((batch, 3, *size), dtype))  # the input is not written to
    assert_close(ours, features.numpy(), "model")
    assert_close(model.forward_head(ours), logits, "model")


def test_fold_bn_changes_rounding_only():
    _, unfolded = _pair("mobilevit_xxs", np.float64, fold_bn=False)
    _, folded = _pair("mobilevit_xxs", np.float64, fold_bn=True)
    x = _images((1, 3, 96, 80), np.float64)
    np.testing.assert_allclose(folded(x), unfolded(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("hw", [(1, 1), (3, 5), (33, 17)])
def test_any_image_size_timm_accepts(hw):
    reference, model = _pair("mobilevit_xxs")
    x = _images((1, 3, *hw), np.float32)
    with torch.no_grad():
        expected = reference(torch.from_numpy(x)).numpy()
    assert_close(model(x), expected, "model")


@pytest.mark.parametrize("kwargs", [dict(num_classes=0), dict(global_pool="max"), dict(global_pool="avgmax")])
def test_head_options_match_timm(kwargs):
    reference, model = _pair("mobilevit_xxs", **kwargs)
    assert list(model.state_dict()) == list(reference.state_dict())
    x = _images((2, 3, 64, 64), np.float32)
    with torch.no_grad():
        expected = reference(torch.from_numpy(x)).numpy()
    assert_close(model(x), expected, "model")


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


def test_make_divisible_as_timm():
    from timm.layers import make_divisible

    for value in [8, 12, 30, 32, 44, 48.5, 96, 100, 250, 640]:
        assert mobilevit.make_divisible(value) == make_divisible(value)
