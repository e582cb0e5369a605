"""Swin V2 checkpoint layouts and the registered names pretrained at window 12.

- Hugging Face ``Swinv2ForImageClassification`` / ``Swinv2Model`` folders (save_pretrained, random stressed weights)
  through ``vitnp.create_model(name, weights=folder)``, against transformers' own logits / pooled output, float32 and
  float64, both backends; config.json read for the window, pretrained windows, depths, heads, sizes;
- original microsoft/Swin-Transformer V2 checkpoints (``{'model': ...}`` in a .pth), built from a timm model by the
  original code's module names (models/swin_transformer_v2.py), against timm, whose ``checkpoint_filter_fn`` reads
  the same file as the oracle of the renaming;
- detection: neither is mistaken for a Swin v1 layout, nor a Swin v1 checkpoint for them;
- the names added for timm 1.0.31 (``swinv2_base_window12to24_192to384``, ``swinv2_large_window12_192``,
  ``swinv2_large_window12to16_192to256``): window and pretrained window of every block, parameter counts.
"""

import json
import re

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from oracles import BACKENDS, images, in_dtype, needs, numpy_state, optional_import, randomise_, run
from tolerances import assert_close

import vitnp
from vitnp import layouts, registry, swinv2
from vitnp.layouts import LayoutError

torch = optional_import("torch")
timm = optional_import("timm")
transformers = optional_import("transformers")
timm_swinv2 = optional_import("timm.models.swin_transformer_v2")
needs_timm = needs("torch", "timm")
needs_hf = needs("torch", "transformers")

ABOVE_CLAMP = 5.5  # a logit_scale above log(1 / 0.01): both timm and transformers clamp it
ANY_SWINV2 = "swinv2_tiny_window8_256"  # the name the small models are built under (their config overrides it)

# 64x64 images, window 8: stage maps 16x16 (shifted), 8x8 (one window, not shifted), 4x4 (window clamped to 4);
# pretrained at other windows, so that the coordinates are not scaled by the stage's own window
HF_SMALL = dict(image_size=64, patch_size=4, embed_dim=16, depths=[2, 2, 2], num_heads=[2, 2, 4], window_size=8,
                pretrained_window_sizes=[6, 4, 3], num_labels=5)
TIMM_SMALL = dict(img_size=64, embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=4, num_classes=7,
                  pretrained_window_sizes=(3, 2))


def _stress_logit_scale(module):
    """The first head of every attention above the clamp (in place); returns the module."""
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if name.endswith("logit_scale"):
                parameter[0] = ABOVE_CLAMP
    return module


def _hf_model(cls, **changes):
    config = transformers.Swinv2Config(**{**HF_SMALL, **changes})
    return _stress_logit_scale(randomise_(getattr(transformers, cls)(config), seed=1).eval())


def _hf_output(source, x, dtype):
    """The logits of a ...ForImageClassification, the pooled output of a Swinv2Model, in ``dtype``."""
    with torch.no_grad():
        out = in_dtype(source, dtype)(pixel_values=torch.from_numpy(x))
    return (out.logits if hasattr(out, "logits") else out.pooler_output).numpy()


# ------------------------------------------------------------------------------------------- Hugging Face Swinv2


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    """{class name: (source model, its save_pretrained folder)} for the classifier and the headless model."""
    if transformers is None or torch is None:
        pytest.skip("needs torch and transformers")
    folders = {}
    for cls in ("Swinv2ForImageClassification", "Swinv2Model"):
        source = _hf_model(cls)
        folder = tmp_path_factory.mktemp(cls)
        source.save_pretrained(folder)
        folders[cls] = source, folder
    return folders


@needs_hf
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cls", ["Swinv2ForImageClassification", "Swinv2Model"])
def test_hf_swinv2_folder_matches_transformers(hf_folders, cls, dtype, backend):
    source, folder = hf_folders[cls]
    model = vitnp.create_model(ANY_SWINV2, weights=folder, dtype=dtype, backend=backend)
    assert model.num_classes == (5 if cls == "Swinv2ForImageClassification" else 0)
    x = images((2, 3, 64, 64), dtype, seed=2)
    out = model(x)
    assert out.dtype == dtype
    expected = _hf_output(source, x, dtype)
    assert np.abs(expected).max() > 0.1
    assert_close(out, expected, "model")


@needs_hf
def test_hf_config_json_gives_the_architecture_and_the_pretrained_windows(hf_folders):
    source, folder = hf_folders["Swinv2ForImageClassification"]
    info = layouts.describe(folder, registry.family_tables)
    assert info["layout"] == "hf-swinv2" and info["family"] == "SwinTransformerV2"
    config = info["config"]
    assert config["pretrained_window_sizes"] == (6, 4, 3) and config["window_size"] == 8
    assert (config["img_size"], config["depths"], config["num_heads"], config["embed_dim"]) == (
        64, (2, 2, 2), (2, 2, 4), 16)
    # without the pretrained windows of config.json, the same weights give other logits: the reader's field counts
    x = images((1, 3, 64, 64), seed=3)
    expected = _hf_output(source, x, np.float32)
    wrong = vitnp.create_model(ANY_SWINV2, weights=folder, pretrained_window_sizes=None)
    assert np.abs(wrong(x) - expected).max() > 1e-2


@needs_hf
def test_hf_swinv2_state_dict_without_config_json(hf_folders):
    """The weights alone (keys with and without the 'swinv2.' prefix) and the architecture given by the caller."""
    source, _ = hf_folders["Swinv2ForImageClassification"]
    headless, _ = hf_folders["Swinv2Model"]
    arch = dict(img_size=64, embed_dim=16, depths=(2, 2, 2), num_heads=(2, 2, 4), window_size=8,
                pretrained_window_sizes=(6, 4, 3))
    x = images((1, 3, 64, 64), seed=4)
    for module in (source, headless):
        assert layouts.detect_layout(module.state_dict()) == "hf-swinv2"
        model = vitnp.create_model(ANY_SWINV2, weights=module.state_dict(), **arch)
        assert_close(model(x), _hf_output(module, x, np.float32), "model")


FEW = min(6, settings().max_examples)  # each example builds a transformers model and a vitnp one


@st.composite
def hf_windows(draw):
    """A two-stage Swinv2Config whose stage maps are whole windows or smaller than one (clamped, not shifted): the
    configurations transformers and timm compute alike."""
    window = draw(st.integers(1, 6))
    grid = draw(st.sampled_from([g for g in (2, 4, 6, 8, 12, 16) if g <= window or g % window == 0]))
    assume(grid // 2 <= window or (grid // 2) % window == 0)
    pretrained = [draw(st.sampled_from([0, 2, 3, 5, 8])) for _ in range(2)]  # 1 would divide by 0 in torch
    return dict(image_size=2 * grid, patch_size=2, embed_dim=8, depths=[2, 2], num_heads=[2, 4], window_size=window,
                pretrained_window_sizes=pretrained, num_labels=3)


@needs_hf
@settings(max_examples=FEW)
@given(config=hf_windows(), backend=st.sampled_from(BACKENDS))
def test_hf_swinv2_windows_clamps_and_pretrained_windows_match_transformers(config, backend):
    source = _stress_logit_scale(randomise_(transformers.Swinv2ForImageClassification(
        transformers.Swinv2Config(**config)), seed=3).eval())
    # what create_model does with a save_pretrained folder: the weights converted, config.json read
    checkpoint = layouts.from_raw(numpy_state(source), json.loads(source.config.to_json_string()))
    model = vitnp.create_model(ANY_SWINV2, weights=checkpoint.state_dict, backend=backend, **checkpoint.config)
    x = images((1, 3, config["image_size"], config["image_size"]), seed=6)
    assert_close(model(x), _hf_output(source, x, np.float32), "model")


def _hf_checkpoint(config_changes):
    """(state_dict, config.json dict) of a small Swinv2Model whose config.json carries ``config_changes``."""
    source = _hf_model("Swinv2Model")
    return numpy_state(source), {**json.loads(source.config.to_json_string()), **config_changes}


@needs_hf
@pytest.mark.parametrize("changes, problem", [
    (dict(use_absolute_embeddings=True), "absolute position embeddings"),
    (dict(layer_norm_eps=1e-6), "layer_norm_eps"),
    (dict(hidden_act="relu"), "GELU"),
    (dict(image_size=72), "not whole windows"),
    (dict(pretrained_window_sizes=[6, 4]), "one integer >= 0 per stage"),
    (dict(pretrained_window_sizes=[6, -1, 3]), "one integer >= 0 per stage"),
    (dict(window_size=0), "window_size"),
])  # fmt: skip
def test_hf_config_json_that_vitnp_cannot_follow_is_a_layout_error(changes, problem):
    state, config = _hf_checkpoint(changes)
    with pytest.raises(LayoutError, match=re.escape(problem)):
        layouts.from_raw(state, config)


# ------------------------------------------------------------------------------------ original microsoft Swin V2


def _original_swinv2_state(reference):
    """The state_dict microsoft's ``SwinTransformerV2`` would save for the architecture of timm's ``reference``.

    Named by the original code's modules: ``layers.{i}`` is ``BasicLayer`` i, holding its blocks and, in stages
    0..S-2, its ``downsample`` (PatchMerging after the blocks); the classifier is ``head`` (an nn.Linear); every
    ``register_buffer`` is persistent: each attention's ``relative_coords_table`` (1, 2wh-1, 2ww-1, 2) and
    ``relative_position_index``, each shifted block's ``attn_mask``. The values are timm's.
    """
    timm_state = reference.state_dict()
    state = {}
    for i, stage in enumerate(reference.layers):
        for b, block in enumerate(stage.blocks):
            prefix = f"layers.{i}.blocks.{b}."
            for name in ("norm1", "attn.logit_scale", "attn.q_bias", "attn.v_bias", "attn.cpb_mlp.0",
                         "attn.cpb_mlp.2", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
                state.update({k: v for k, v in timm_state.items() if k == prefix + name or
                              k.startswith(prefix + name + ".")})
            state[prefix + "attn.relative_coords_table"] = block.attn.relative_coords_table
            state[prefix + "attn.relative_position_index"] = block.attn.relative_position_index
            if block.attn_mask is not None:
                state[prefix + "attn_mask"] = block.attn_mask
        if i + 1 < len(reference.layers):  # the merging timm puts at the start of the next stage
            following = reference.layers[i + 1].downsample
            for name in ("reduction.weight", "norm.weight", "norm.bias"):
                state[f"layers.{i}.downsample.{name}"] = following.get_parameter(name)
    state = {"patch_embed.proj.weight": reference.patch_embed.proj.weight,
             "patch_embed.proj.bias": reference.patch_embed.proj.bias,
             "patch_embed.norm.weight": reference.patch_embed.norm.weight,
             "patch_embed.norm.bias": reference.patch_embed.norm.bias, **state,
             "norm.weight": reference.norm.weight, "norm.bias": reference.norm.bias,
             "head.weight": reference.head.fc.weight, "head.bias": reference.head.fc.bias}
    return {k: v.detach().clone() for k, v in state.items()}


@pytest.fixture(scope="module")
def timm_reference():
    if torch is None or timm is None:
        pytest.skip("needs torch and timm")
    return _stress_logit_scale(randomise_(timm_swinv2.SwinTransformerV2(**TIMM_SMALL), seed=2).eval())


@needs_timm
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_original_swinv2_checkpoint_matches_timm(timm_reference, tmp_path, dtype, backend):
    original = _original_swinv2_state(timm_reference)
    assert "layers.0.downsample.reduction.weight" in original and "layers.1.downsample.norm.weight" not in original
    assert any(k.endswith("attn_mask") for k in original) and any(k.endswith("coords_table") for k in original)
    # timm's own reading of the original layout is the oracle of the renaming
    filtered = timm_swinv2.checkpoint_filter_fn({"model": original}, timm_reference)
    assert sorted(filtered) == sorted(timm_reference.state_dict())
    torch.save({"model": original, "epoch": 90}, tmp_path / "swinv2_small.pth")
    info = layouts.describe(tmp_path / "swinv2_small.pth", registry.family_tables)
    assert info["layout"] == "original-swinv2" and info["config"]["num_classes"] == 7
    arch = {k: v for k, v in TIMM_SMALL.items() if k != "num_classes"}
    model = vitnp.create_model(ANY_SWINV2, weights=tmp_path / "swinv2_small.pth", dtype=dtype, backend=backend, **arch)
    x = images((2, 3, 64, 64), dtype, seed=5)
    expected = run(in_dtype(timm_reference, dtype), x)
    assert np.abs(expected).max() > 0.1
    assert_close(model(x), expected, "model")


# ------------------------------------------------------------------------------------------------------ detection


def _swin_v1_states():
    """(expected layout, state_dict) of Swin v1 checkpoints in the layouts Swin V2's could be taken for."""
    with torch.device("meta"):
        v1 = timm.create_model("swin_tiny_patch4_window7_224", img_size=56, embed_dim=16, depths=(2, 2),
                               num_heads=(2, 4))
        config = transformers.SwinConfig(image_size=56, embed_dim=16, depths=[2, 2], num_heads=[2, 4])
        hf_v1 = transformers.SwinModel(config)
    original = {re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m[1]) - 1}.downsample", k)
                .replace("head.fc.", "head."): v for k, v in v1.state_dict().items()}
    return [
        ("timm-swin", v1.state_dict()),
        ("original-swin", original),
        ("hf-swin", hf_v1.state_dict()),
        ("hf-swin", {"swin." + k: v for k, v in hf_v1.state_dict().items()}),  # the classifier's prefix
    ]


@needs("torch", "timm", "transformers")
def test_detection_tells_swin_v2_layouts_from_swin_v1(timm_reference):
    with torch.device("meta"):
        hf_model = transformers.Swinv2Model(transformers.Swinv2Config(**HF_SMALL))
        hf_classifier = transformers.Swinv2ForImageClassification(transformers.Swinv2Config(**HF_SMALL))
    v2 = [
        ("timm-swinv2", timm_reference.state_dict()),
        ("original-swinv2", _original_swinv2_state(timm_reference)),
        ("hf-swinv2", hf_model.state_dict()),  # the keys of a Swinv2Model, unprefixed, hold hf-swin's sentinels
        ("hf-swinv2", hf_classifier.state_dict()),
    ]
    for expected, state in v2 + _swin_v1_states():
        assert layouts.detect_layout(state) == expected
    # a Swin V2 checkpoint refused by a Swin v1 name, naming the V2 names that fit
    with pytest.raises(ValueError, match="loads into a SwinTransformerV2; 'swin_tiny_patch4_window7_224'"):
        vitnp.create_model("swin_tiny_patch4_window7_224", weights=numpy_state(timm_reference))


# ----------------------------------------------------------------------------------- names pretrained at window 12

NEW_NAMES = ("swinv2_base_window12to24_192to384", "swinv2_large_window12_192", "swinv2_large_window12to16_192to256")


def test_the_issue_names_are_registered():
    issue = [f"swinv2_{size}_window{w}_256" for size in ("tiny", "small", "base") for w in (8, 16)] + [
        "swinv2_base_window12_192", "swinv2_base_window12to16_192to256", "swinv2_large_window12to24_192to384"]
    assert set(issue + list(NEW_NAMES)) <= set(vitnp.list_models())


@needs_timm
@pytest.mark.parametrize("name", NEW_NAMES)
def test_new_names_build_timms_windows_pretrained_windows_and_counts(name, monkeypatch):
    """Every block's window and log-spaced table as timm's arguments give them, the head size, the parameter count
    and the preprocessing of timm's default tag (timm on the meta device, vitnp without filling its weights)."""
    monkeypatch.setattr(vitnp.model.Model, "init_weights", lambda self, seed=0, dtype=np.float32: None)
    with torch.device("meta"):
        reference = timm.create_model(name, pretrained=False)
    model = vitnp.create_model(name)
    assert model.num_classes == reference.num_classes and model.img_size == tuple(reference.patch_embed.img_size)
    for stage, timm_stage in zip(model.stage_list, reference.layers, strict=True):
        for block, timm_block in zip(stage.block_list, timm_stage.blocks, strict=True):
            timm_attn = timm_block.attn
            assert block.attn.window_size == tuple(timm_attn.window_size)
            assert block.shift_size == tuple(timm_block.shift_size)
            table = swinv2.relative_coords_table(tuple(timm_attn.window_size), tuple(timm_attn.pretrained_window_size))
            np.testing.assert_array_equal(block.attn.relative_coords_table, table)
    assert vitnp.count_params(model) == sum(p.numel() for p in reference.parameters())
    config, expected = vitnp.data_config(name), reference.pretrained_cfg
    assert (config["input_size"], config["crop_pct"], config["interpolation"]) == (
        expected["input_size"], expected["crop_pct"], expected["interpolation"])
