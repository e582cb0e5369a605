"""Swin Transformer v1 against timm (modules and whole models, random weights, float32 and float64, both backends)
and against the seed 004 PyTorch ``Swin`` (loaded through vitnp.layouts).

Every parameter of the torch modules is drawn by ``oracles.randomise_`` (LayerNorm affines around 1, biases and the
relative position bias table non-zero), so a dropped bias, a swapped norm or a mis-gathered bias table cannot pass.
The registered names at their own configuration are compared with timm in tests/test_models.py.
"""

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from oracles import (
    BACKENDS,
    NoTorchNN,
    images,
    in_dtype,
    needs,
    numpy_state,
    optional_import,
    randomise_,
    run,
    timm_model,
)
from tolerances import assert_close

import vitnp
from vitnp import layouts, swin
from vitnp.model import WeightsError

torch = optional_import("torch")
nn = torch.nn if torch else NoTorchNN
timm_swin = optional_import("timm.models.swin_transformer")
needs_timm = needs("torch", "timm")

DTYPES = st.sampled_from([np.float32, np.float64])
FEW = min(10, settings().max_examples)  # whole models per Hypothesis test: each builds a timm and a vitnp model


def _load_module(module, state):
    """Put a timm module's state_dict into the vitnp module of the same name: the keys must match, in order."""
    own = dict(module.named_parameters())
    assert list(own) == list(state), f"parameter names differ: {list(own)} vs {list(state)}"
    for prefix, sub in module.named_modules():
        for name in sub._parameters:
            assert sub._parameters[name].shape == state[prefix + name].shape, prefix + name
            sub._parameters[name] = state[prefix + name]


def _t(a):
    return torch.from_numpy(np.ascontiguousarray(a))


# ------------------------------------------------------------------------------------------------------- pieces


@needs_timm
@given(st.integers(1, 12), st.integers(1, 12))
def test_relative_position_index_matches_timm(wh, ww):
    expected = timm_swin.get_relative_position_index(wh, ww).numpy()
    np.testing.assert_array_equal(swin.relative_position_index((wh, ww)), expected)


@st.composite
def block_cases(draw):
    """A block: resolution, window (may exceed the map: then clamped), shift per dimension (0 allowed), heads."""
    H, W = draw(st.integers(1, 14)), draw(st.integers(1, 14))
    window = (draw(st.integers(1, 7)), draw(st.integers(1, 7)))
    shift = (draw(st.integers(0, window[0] - 1)), draw(st.integers(0, window[1] - 1)))
    heads, head_dim = draw(st.integers(1, 3)), draw(st.integers(1, 6))
    return dict(
        B=draw(st.integers(1, 2)), resolution=(H, W), window=window, shift=shift, heads=heads, dim=heads * head_dim,
        mlp_ratio=draw(st.sampled_from([1.0, 2.0, 4.0])), qkv_bias=draw(st.booleans()), dtype=draw(DTYPES),
        seed=draw(st.integers(0, 2**16)),
    )  # fmt: skip


@needs_timm
@pytest.mark.parametrize("backend", BACKENDS)
@given(case=block_cases())
def test_block_matches_timm(case, backend):
    dtype = case["dtype"]
    reference = timm_swin.SwinTransformerBlock(
        case["dim"], input_resolution=case["resolution"], num_heads=case["heads"], window_size=case["window"],
        shift_size=case["shift"], mlp_ratio=case["mlp_ratio"], qkv_bias=case["qkv_bias"],
    )  # fmt: skip
    reference = in_dtype(randomise_(reference, case["seed"]).eval(), dtype)
    block = swin.SwinTransformerBlock(
        case["dim"], case["resolution"], case["heads"], case["window"], case["shift"], case["mlp_ratio"],
        case["qkv_bias"],
    ).set_backend(backend)  # fmt: skip
    _load_module(block, numpy_state(reference))
    assert block.window_size == tuple(reference.window_size)
    assert block.shift_size == tuple(reference.shift_size)
    if reference.attn_mask is None:
        assert block.attn_mask is None
    else:
        np.testing.assert_array_equal(block.attn_mask, reference.attn_mask.numpy())  # exactly 0 / -100

    x = images((case["B"], *case["resolution"], case["dim"]), dtype, seed=case["seed"])
    out = block(x)
    assert out.dtype == dtype
    assert_close(out, run(reference, x), "layer")


@needs_timm
@pytest.mark.parametrize("backend", BACKENDS)
@given(case=block_cases(), num_windows=st.integers(1, 4), with_mask=st.booleans())
def test_window_attention_matches_timm(case, num_windows, with_mask, backend):
    """WindowAttention alone on (B*nW, N, C), with a random region mask of 0 / -100 or without one."""
    dtype, (wh, ww) = case["dtype"], case["window"]
    N = wh * ww
    reference = timm_swin.WindowAttention(case["dim"], case["heads"], window_size=(wh, ww), qkv_bias=case["qkv_bias"])
    reference = in_dtype(randomise_(reference, case["seed"]).eval(), dtype)
    attention = swin.WindowAttention(case["dim"], case["heads"], (wh, ww), case["qkv_bias"]).set_backend(backend)
    _load_module(attention, numpy_state(reference))

    rng = np.random.default_rng(case["seed"])
    x = rng.standard_normal((case["B"] * num_windows, N, case["dim"])).astype(dtype)
    mask = None
    if with_mask:
        regions = rng.integers(0, 3, (num_windows, N))
        mask = np.where(regions[:, :, None] != regions[:, None, :], -100.0, 0.0).astype(np.float32)
    with torch.no_grad():
        expected = reference(_t(x), mask=None if mask is None else _t(mask.astype(dtype))).numpy()
    out = attention(x, mask=mask)
    assert out.dtype == dtype
    assert_close(out, expected, "layer")


@needs_timm
@pytest.mark.parametrize("backend", BACKENDS)
@given(H=st.integers(1, 12), W=st.integers(1, 12), dim=st.integers(1, 8), out_dim=st.integers(1, 8),
       B=st.integers(1, 2), dtype=DTYPES, seed=st.integers(0, 2**16))  # fmt: skip
def test_patch_merging_matches_timm(H, W, dim, out_dim, B, dtype, seed, backend):
    """Odd H / W are padded; the 4C concatenation order and the bias-free reduction are timm's."""
    reference = in_dtype(randomise_(timm_swin.PatchMerging(dim, out_dim), seed).eval(), dtype)
    merging = swin.PatchMerging(dim, out_dim).set_backend(backend)
    _load_module(merging, numpy_state(reference))
    x = images((B, H, W, dim), dtype, seed=seed)
    out = merging(x)
    assert out.shape == (B, (H + 1) // 2, (W + 1) // 2, out_dim)
    assert_close(out, run(reference, x), "layer")


# ------------------------------------------------------------------------------------------------- whole models


def _compare_with_timm(name, dtype, backend, batch=1, **kwargs):
    reference = in_dtype(timm_model(name, seed=1, **kwargs), dtype)
    state = numpy_state(reference)
    model = vitnp.create_model(name, weights=state, dtype=dtype, backend=backend, **kwargs)
    x = images((batch, model.in_chans, *model.img_size), dtype, seed=2)
    with torch.no_grad():
        features_t = reference.forward_features(_t(x))
        logits_t = reference.forward_head(features_t).numpy()
        features_t = features_t.numpy()
    features = model.forward_features(x)
    assert features.dtype == dtype and features.shape == features_t.shape  # (B, H, W, C), timm's NHWC
    assert_close(features, features_t, "model")
    logits = model.forward_head(features)
    assert np.abs(logits_t).max() > 1e-2  # the comparison has something to compare
    assert_close(logits, logits_t, "model")
    return model, state


@needs_timm
@pytest.mark.parametrize("backend", BACKENDS)
def test_swin_tiny_non_square_non_multiple_of_window_matches_timm(backend):
    """256x160: stage maps 64x40 .. 8x5 are padded to whole windows, and the last stage (8x5) is shifted along H only
    (its W is clamped to a 5-wide window), so timm's roll-then-pad order and per-dimension clamp both matter."""
    _compare_with_timm("swin_tiny_patch4_window7_224", np.float32, backend, img_size=(256, 160))


SMALL = dict(img_size=64, embed_dim=32, depths=(2, 2), num_heads=(2, 4), window_size=4, num_classes=10)


@needs_timm
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_small_random_config_matches_timm(dtype, backend):
    _compare_with_timm("swin_tiny_patch4_window7_224", dtype, backend, batch=2, **SMALL)


@st.composite
def small_configs(draw):
    """Small Swins at any image size timm accepts: sides multiples of the patch, windows larger or smaller than maps."""
    num_stages = draw(st.integers(1, 3))
    patch = draw(st.sampled_from([2, 4]))
    embed_dim = draw(st.sampled_from([8, 12, 16]))
    window = draw(st.one_of(st.integers(1, 6), st.tuples(st.integers(1, 6), st.integers(1, 6))))
    heads = tuple(draw(st.sampled_from([h for h in (1, 2, 4) if (embed_dim << i) % h == 0])) for i in range(num_stages))
    return dict(
        img_size=(patch * draw(st.integers(1, 24)), patch * draw(st.integers(1, 24))), patch_size=patch,
        embed_dim=embed_dim, depths=tuple(draw(st.integers(1, 2)) for _ in range(num_stages)), num_heads=heads,
        window_size=window, mlp_ratio=draw(st.sampled_from([1.0, 2.0])), qkv_bias=draw(st.booleans()),
        in_chans=draw(st.sampled_from([1, 3])), num_classes=draw(st.sampled_from([0, 5])),
    )  # fmt: skip


@needs_timm
@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=FEW)
@given(config=small_configs())
def test_any_accepted_size_matches_timm_float64(config, backend):
    """Every image size timm accepts, non-square and not a multiple of the window at any stage, in float64."""
    _compare_with_timm("swin_tiny_patch4_window7_224", np.float64, backend, **config)


@needs_timm
def test_float32_and_float64_models_agree():
    state = numpy_state(timm_model("swin_tiny_patch4_window7_224", seed=1, **SMALL))
    x = images((2, 3, 64, 64), np.float64, seed=4)
    logits64 = vitnp.create_model("swin_tiny_patch4_window7_224", weights=state, dtype=np.float64, **SMALL)(x)
    logits32 = vitnp.create_model("swin_tiny_patch4_window7_224", weights=state, **SMALL)(x)
    assert logits32.dtype == np.float32 and logits64.dtype == np.float64
    assert_close(logits32, logits64, "model", np.float32)


# --------------------------------------------------------------------------------------------- registry, weights


@needs_timm
@pytest.mark.parametrize("name", sorted(swin.MODELS))
def test_registered_names_have_timm_keys_and_shapes(name):
    """Every registered Swin builds timm's parameters: same keys, same order, same shapes (timm built on 'meta')."""
    import timm

    with torch.device("meta"):
        reference = timm.create_model(name, pretrained=False)
    arch, data = swin.MODELS[name]
    model = swin.SwinTransformer(replace(swin.SwinConfig(), **arch))  # no init: the parameters stay lazy zeros
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert [(k, v.shape) for k, v in model.named_parameters()] == list(expected.items())
    assert data["input_size"] == reference.pretrained_cfg["input_size"]
    assert data["crop_pct"] == reference.pretrained_cfg["crop_pct"]
    assert tuple(data["mean"]) == tuple(reference.pretrained_cfg["mean"])
    windows = [(tuple(b.window_size), tuple(b.shift_size)) for stage in reference.layers for b in stage.blocks]
    assert windows == [(b.window_size, b.shift_size) for stage in model.stage_list for b in stage.block_list]


@needs_timm
def test_state_dict_round_trip(tmp_path):
    model, state = _compare_with_timm("swin_tiny_patch4_window7_224", np.float64, "fast", **SMALL)
    own = model.state_dict()
    assert list(own) == list(state)  # timm's keys in timm's order: no relative_position_index, no attn_mask
    assert not any("relative_position_index" in k or "attn_mask" in k for k in own)
    for key in own:
        np.testing.assert_array_equal(own[key], state[key])

    path = tmp_path / "swin_small.npz"
    np.savez(path, **own)
    reloaded = vitnp.create_model("swin_tiny_patch4_window7_224", weights=path, dtype=np.float64, **SMALL)
    fresh = vitnp.create_model("swin_tiny_patch4_window7_224", dtype=np.float64, seed=7, **SMALL)
    fresh.load_state_dict(own)
    x = images((1, 3, 64, 64), np.float64, seed=5)
    for other in (reloaded, fresh):
        assert list(other.state_dict()) == list(own)
        for key, value in other.state_dict().items():
            np.testing.assert_array_equal(value, own[key])
        # equal weights, equal logits; only BLAS blocking (memory-mapped vs in-memory weights) may move the last bit
        assert_close(other(x), model(x), "kernel")


# ------------------------------------------------------------------------------------------------------- errors


def test_wrong_image_sizes_are_clear_value_errors():
    model = vitnp.create_model("swin_tiny_patch4_window7_224", **SMALL)
    with pytest.raises(ValueError, match=r"img_size=\(96, 64\)"):
        model(np.zeros((1, 3, 96, 64), np.float32))
    with pytest.raises(ValueError, match="multiples of the patch size 4"):
        model(np.zeros((1, 3, 66, 64), np.float32))
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        vitnp.create_model("swin_tiny_patch4_window7_224", **{**SMALL, "img_size": (66, 64)})
    with pytest.raises(ValueError, match="input channels"):
        model(np.zeros((1, 1, 64, 64), np.float32))
    with pytest.raises(ValueError, match="rank 4"):
        model(np.zeros((3, 64, 64), np.float32))
    with pytest.raises(ValueError, match="one entry per stage"):
        vitnp.create_model("swin_tiny_patch4_window7_224", depths=(2, 2), num_heads=(3,))
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        vitnp.create_model("swin_tiny_patch4_window7_224", num_heads=(5, 6, 12, 24))
    with pytest.raises(ValueError, match="one window size per stage"):
        vitnp.create_model("swin_tiny_patch4_window7_224", window_size=(7, 7, 7))


def test_mismatched_weights_are_reported_by_key():
    state = vitnp.create_model("swin_tiny_patch4_window7_224", **SMALL).state_dict()
    model = vitnp.create_model("swin_tiny_patch4_window7_224", **{**SMALL, "window_size": 8})
    table = r"layers\.0\.blocks\.0\.attn\.relative_position_bias_table: weights \(49, 2\), model \(225, 2\)"
    with pytest.raises(WeightsError, match=table):  # a window-4 table (7x7 = 49 rows) in a window-8 model
        model.load_state_dict(state)
    missing = {k: v for k, v in state.items() if k != "layers.1.downsample.reduction.weight"}
    with pytest.raises(WeightsError, match=r"missing keys \(1\): layers\.1\.downsample\.reduction\.weight"):
        vitnp.create_model("swin_tiny_patch4_window7_224", **SMALL).load_state_dict(missing)
    extra = {**state, "layers.0.blocks.1.attn_mask": np.zeros((16, 16, 16), np.float32)}
    with pytest.raises(WeightsError, match=r"unexpected keys \(1\): layers\.0\.blocks\.1\.attn_mask"):
        vitnp.create_model("swin_tiny_patch4_window7_224", **SMALL).load_state_dict(extra)


# ---------------------------------------------------------------------------------------------------- seed 004
# The seed's ``SwinStage`` and ``Swin`` classes as printed in the blog, with the classes they use (from the course's
# earlier lessons, not in the seed) written to the module names and shapes the blog's printed model shows:
# PatchEmbedding(patch_embed, norm), SwinBlock(attn_norm, attn, mlp_norm, mlp), WindowAttention(softmax, qkv, proj
# and the relative position bias table), PatchMerging(reduction with bias, norm), Mlp(fc1, fc2, act, dropout).
# Adapted minimally so it runs: ``Indentity`` defined, the blog's ``input_reslution`` spelling kept, and the block's
# window clamp of the original Swin (a map no larger than the window is one window, unshifted).


class PatchEmbedding(nn.Module):
    def __init__(self, patch_size=4, embed_dim=96, in_channels=3):
        super().__init__()
        self.patch_embed = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x):
        x = self.patch_embed(x)  # [B, embed_dim, h, w]
        x = x.flatten(2).transpose(1, 2)  # [B, h*w, embed_dim]
        return self.norm(x)


class PatchMerging(nn.Module):
    def __init__(self, input_resolution, dim):
        super().__init__()
        self.resolution = input_resolution
        self.dim = dim
        self.reduction = nn.Linear(4 * dim, 2 * dim)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x):
        h, w = self.resolution
        b, _, c = x.shape
        x = x.reshape(b, h, w, c)
        x0 = x[:, 0::2, 0::2, :]
        x1 = x[:, 1::2, 0::2, :]
        x2 = x[:, 0::2, 1::2, :]
        x3 = x[:, 1::2, 1::2, :]
        x = torch.cat([x0, x1, x2, x3], -1).reshape(b, -1, 4 * c)
        x = self.norm(x)
        return self.reduction(x)


class Mlp(nn.Module):
    def __init__(self, dim, mlp_ratio=4.0, dropout=0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, int(dim * mlp_ratio))
        self.fc2 = nn.Linear(int(dim * mlp_ratio), dim)
        self.act = nn.GELU()
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.fc2(self.dropout(self.act(self.fc1(x)))))


def windows_partition(x, window_size):
    B, H, W, C = x.shape
    x = x.reshape(B, H // window_size, window_size, W // window_size, window_size, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size, window_size, C)


def windows_reverse(windows, window_size, H, W):
    B = windows.shape[0] // ((H // window_size) * (W // window_size))
    x = windows.reshape(B, H // window_size, W // window_size, window_size, window_size, -1)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(B, H, W, -1)


def generate_mask(window_size, shift_size, input_resolution):
    H, W = input_resolution
    img_mask = torch.zeros((1, H, W, 1))
    h_slices = (slice(0, -window_size), slice(-window_size, -shift_size), slice(-shift_size, None))
    w_slices = (slice(0, -window_size), slice(-window_size, -shift_size), slice(-shift_size, None))
    cnt = 0
    for h in h_slices:
        for w in w_slices:
            img_mask[:, h, w, :] = cnt
            cnt += 1
    mask_windows = windows_partition(img_mask, window_size).reshape(-1, window_size * window_size)
    attn_mask = mask_windows.unsqueeze(1) - mask_windows.unsqueeze(2)
    return torch.where(attn_mask != 0, torch.full_like(attn_mask, -100.0), attn_mask)


class WindowAttention(nn.Module):
    def __init__(self, dim, window_size, num_heads):
        super().__init__()
        self.dim = dim
        self.dim_head = dim // num_heads
        self.num_heads = num_heads
        self.scale = self.dim_head**-0.5
        self.softmax = nn.Softmax(-1)
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        coords = torch.stack(torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij"))
        coords = coords.flatten(1)  # [2, ws*ws]
        relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # [ws*ws, ws*ws, 2]
        relative[:, :, 0] += window_size - 1
        relative[:, :, 1] += window_size - 1
        relative[:, :, 0] *= 2 * window_size - 1
        self.register_buffer("relative_position_index", relative.sum(-1))

    def transpose_multi_head(self, x):
        B, N, _ = x.shape
        return x.reshape(B, N, self.num_heads, self.dim_head).permute(0, 2, 1, 3)  # [B, heads, N, dim_head]

    def forward(self, x, mask=None):
        B, N, C = x.shape
        q, k, v = map(self.transpose_multi_head, self.qkv(x).chunk(3, -1))
        q = q * self.scale
        attn = torch.matmul(q, k.transpose(-1, -2))  # [B, heads, N, N]
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)].reshape(N, N, -1)
        attn = attn + bias.permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            attn = attn.reshape(B // mask.shape[0], mask.shape[0], self.num_heads, N, N)
            attn = (attn + mask.unsqueeze(1).unsqueeze(0)).reshape(-1, self.num_heads, N, N)
        attn = self.softmax(attn)
        out = torch.matmul(attn, v).permute(0, 2, 1, 3).reshape(B, N, C)
        return self.proj(out)


class SwinBlock(nn.Module):
    def __init__(self, dim, input_reslution, num_heads, window_size, shift_size=0):
        super().__init__()
        self.dim = dim
        self.resolution = input_reslution
        self.window_size = window_size
        self.shift_size = shift_size
        if min(self.resolution) <= self.window_size:
            self.shift_size = 0
            self.window_size = min(self.resolution)
        self.attn_norm = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, self.window_size, num_heads)
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp = Mlp(dim)
        attn_mask = generate_mask(self.window_size, self.shift_size, self.resolution) if self.shift_size > 0 else None
        self.register_buffer("attn_mask", attn_mask)

    def forward(self, x):
        H, W = self.resolution
        B, N, C = x.shape
        h = x
        x = self.attn_norm(x).reshape(B, H, W, C)
        if self.shift_size > 0:
            shifted_x = torch.roll(x, shifts=(-self.shift_size, -self.shift_size), dims=(1, 2))
        else:
            shifted_x = x
        x_windows = windows_partition(shifted_x, self.window_size).reshape(-1, self.window_size**2, C)
        attn_windows = self.attn(x_windows, mask=self.attn_mask)
        attn_windows = attn_windows.reshape(-1, self.window_size, self.window_size, C)
        shifted_x = windows_reverse(attn_windows, self.window_size, H, W)
        if self.shift_size > 0:
            x = torch.roll(shifted_x, shifts=(self.shift_size, self.shift_size), dims=(1, 2))
        else:
            x = shifted_x
        x = h + x.reshape(B, H * W, C)
        h = x
        return h + self.mlp(self.mlp_norm(x))


class Indentity(nn.Module):
    def forward(self, x):
        return x


# CLass 7 (the seed's code from here on)
class SwinStage(nn.Module):
    def __init__(self, dim, input_resolution, depth, num_heads, window_size, patch_merging=None):
        super().__init__()
        self.blocks = nn.ModuleList()
        for i in range(depth):
            self.blocks.append(
                SwinBlock(dim=dim,
                          input_reslution=input_resolution,
                          num_heads=num_heads,
                          window_size=window_size,
                          shift_size=0 if (i % 2 == 0) else window_size // 2))
        if patch_merging is None:
            self.patch_merging = Indentity()
        else:
            self.patch_merging = PatchMerging(input_resolution=input_resolution, dim=dim)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        x = self.patch_merging(x)
        return x


class Swin(nn.Module):
    def __init__(self,
                 image_size=224,
                 patch_size=4,
                 in_channels=4,
                 embed_dim=96,
                 window_size=7,
                 num_heads=[3, 6, 12, 24],
                 depths=[2, 2, 6, 2],
                 num_classes=1000):
        super().__init__()
        self.num_classes = num_classes
        self.depths = depths
        self.num_heads = num_heads
        self.embed_dim = embed_dim
        self.num_stages = len(depths)
        self.num_features = int(self.embed_dim * 2 ** (self.num_stages - 1))
        self.patch_resolution = [image_size // patch_size, image_size // patch_size]

        self.patch_embedding = PatchEmbedding(patch_size=patch_size, embed_dim=embed_dim)
        self.stages = nn.ModuleList()
        for idx, (depth, num_heads) in enumerate(zip(self.depths, self.num_heads)):
            stage = SwinStage(dim=int(self.embed_dim * 2 ** idx),
                              input_resolution=(self.patch_resolution[0] // (2 ** idx),
                                                self.patch_resolution[0] // (2 ** idx)),
                              depth=depth,
                              num_heads=num_heads,
                              window_size=window_size,
                              patch_merging=PatchMerging if (idx < self.num_stages - 1) else None)
            self.stages.append(stage)
        self.norm = nn.LayerNorm(self.num_features)
        self.avgpool = nn.AdaptiveAvgPool1d(1)
        self.fc = nn.Linear(self.num_features, self.num_classes)

    def forward(self, x):
        x = self.patch_embedding(x)
        for stage in self.stages:
            x = stage(x)
        x = self.norm(x)
        x = x.permute(0, 2, 1)
        # [B, embed_dim, num_windows]
        x = self.avgpool(x)  # [B, embed_dim, 1]
        x = x.flatten(1)
        x = self.fc(x)

        return x  # fmt: skip


SEED_SMALL = dict(image_size=64, patch_size=4, embed_dim=16, window_size=4, num_heads=[2, 4, 8], depths=[2, 2, 2],
                  num_classes=10)  # fmt: skip
SEED_SMALL_AS_TIMM = dict(img_size=64, patch_size=4, embed_dim=16, window_size=4, num_heads=(2, 4, 8), depths=(2, 2, 2))


def _seed_model(dtype, **kwargs):
    return in_dtype(randomise_(Swin(**kwargs), seed=3).eval(), dtype)


@needs("torch")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "dtype, kwargs, as_timm",
    [(np.float64, SEED_SMALL, SEED_SMALL_AS_TIMM), (np.float32, {}, {})],  # the small one, then the blog's default
    ids=["small-float64", "default-float32"],
)
def test_seed004_swin_loads_through_the_layout_mapping(dtype, kwargs, as_timm, backend):
    seed = _seed_model(dtype, **kwargs)
    state = numpy_state(seed)  # includes its relative_position_index and attn_mask buffers
    assert layouts.detect_layout(state) == "seed004_swin"
    converted = layouts.to_timm(state)
    model = vitnp.create_model("swin_tiny_patch4_window7_224", weights=state, dtype=dtype, backend=backend, **as_timm)
    assert model.cfg.downsample_bias  # the seed's reduction Linear has a bias, set by the layout's config
    assert list(model.state_dict()) == sorted(converted, key=list(model.state_dict()).index)

    x = images((2, 3, *model.img_size), dtype, seed=6)
    expected = run(seed, x)
    assert np.abs(expected).max() > 1e-2
    assert_close(model(x), expected, "model")


@needs("torch")
def test_seed004_layout_renames_every_key():
    state = numpy_state(_seed_model(np.float32, **SEED_SMALL))
    converted = layouts.to_timm(state)
    assert "layers.1.downsample.reduction.bias" in converted and "head.fc.weight" in converted
    assert "layers.0.downsample.reduction.weight" not in converted  # the seed's stage-0 merging moves to stage 1
    assert not any(k.startswith(("stages.", "patch_embedding.", "fc.")) for k in converted)
    assert not any(k.endswith(("attn_mask", "relative_position_index")) for k in converted)
    model = swin.SwinTransformer(swin.SwinConfig(downsample_bias=True, num_classes=10, **SEED_SMALL_AS_TIMM))
    assert set(converted) == set(model.state_dict())
