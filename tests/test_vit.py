"""Whole ViT / DeiT models against timm (random weights, float32 and float64, both backends), and the representation
(pre-logits) layer against the seed 002 PyTorch model, which timm 1.x no longer has.

Every parameter of the torch models is drawn at random by ``oracles.randomise_``, biases, LayerNorm affines and the
class / distillation tokens included. The registered names at their own configuration are compared with timm in
tests/test_models.py; here are the variants: batches, pooling and head options, every constructor override.
"""

from collections import OrderedDict
from functools import partial

import numpy as np
import pytest
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

torch = optional_import("torch")
nn = torch.nn if torch else NoTorchNN

_TIMM_CACHE = {}


def _timm_model(name, kwargs):
    """The float32 timm model for (name, kwargs) with random weights, kept for the other dtype and backend of the
    same case (one model alive at a time)."""
    key = (name, tuple(sorted(kwargs.items())))
    if key not in _TIMM_CACHE:
        _TIMM_CACHE.clear()
        _TIMM_CACHE[key] = timm_model(name, seed=1, **kwargs)
    return _TIMM_CACHE[key]


# (name, timm / vitnp keyword arguments, batch). Cases run in this order so that one timm model serves both dtypes
# and both backends. The head / pooling variants run at 96x96 (36 patches): they change nothing before the pooling.
CASES = [
    ("vit_tiny_patch16_224", {}, 3),
    ("vit_tiny_patch16_224", dict(img_size=96, global_pool="avg"), 1),
    ("vit_tiny_patch16_224", dict(img_size=96, num_classes=0), 1),
    ("vit_tiny_patch16_224", dict(img_size=96, class_token=False, global_pool="avg"), 1),
    ("vit_small_patch32_224", dict(img_size=96, global_pool="avg", fc_norm=False), 1),
    ("deit_tiny_distilled_patch16_224", {}, 3),
    ("deit_tiny_distilled_patch16_224", dict(img_size=96, num_classes=0), 1),
    # every constructor override at once, small: also checks num_heads / mlp_ratio / qkv_bias numerically
    (
        "vit_tiny_patch16_224",
        dict(img_size=(48, 32), patch_size=8, in_chans=2, num_classes=7, embed_dim=48, depth=3, num_heads=4,
             mlp_ratio=2.5, qkv_bias=False),
        2,
    ),  # fmt: skip
]


def _case_id(case):
    name, kwargs, batch = case
    return "-".join([name, *(f"{k}={v}" for k, v in kwargs.items()), f"B{batch}"])


@needs("torch", "timm")
@pytest.mark.parametrize("backend", BACKENDS)  # the first decorator varies fastest
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_model_matches_timm(case, dtype, backend):
    name, kwargs, batch = case
    reference = in_dtype(_timm_model(name, kwargs), dtype)
    model = vitnp.create_model(name, weights=numpy_state(reference), dtype=dtype, backend=backend, **kwargs)
    x = images((batch, reference.patch_embed.proj.in_channels, *reference.patch_embed.img_size), dtype)
    with torch.no_grad():
        features_t = reference.forward_features(torch.from_numpy(x))
        logits_t = reference.forward_head(features_t).numpy()
        pre_logits_t = reference.forward_head(features_t, pre_logits=True).numpy()
        features_t = features_t.numpy()

    features = model.forward_features(x)
    assert features.dtype == dtype
    tokens = reference.num_prefix_tokens + reference.patch_embed.num_patches
    assert features.shape == (batch, tokens, reference.embed_dim)
    assert_close(features, features_t, "model")

    logits = model.forward_head(features)
    assert logits.dtype == dtype
    assert logits.shape == (batch, reference.num_classes or reference.num_features)
    assert np.abs(logits_t).max() > 1e-2  # the comparison has something to compare
    assert_close(logits, logits_t, "model")
    assert_close(model.forward_head(features, pre_logits=True), pre_logits_t, "model")
    if batch > 1:  # model(x) is the whole forward (one chunk of the batch per thread); images do not leak
        assert_close(model(x), logits_t, "model")
        assert_close(model(x[1:2]), logits_t[1:2], "model")


# ---------------------------------------------------------------------------------------------------- pre-logits
# The ViT of seed 002 (the original "has_logits" ViT: a representation layer Linear + Tanh on the class token
# before the head), reduced to what inference runs. timm 1.x dropped this layer, so this model is the oracle.


class SeedPatchEmbed(nn.Module):
    def __init__(self, img_size, patch_size, in_c, embed_dim):
        super().__init__()
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_c, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, C, H, W] -> [B, HW, C]


class SeedAttention(nn.Module):
    def __init__(self, dim, num_heads, qkv_bias):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # [B, heads, N, head_dim]
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class SeedMlp(nn.Module):
    def __init__(self, in_features, hidden_features):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class SeedBlock(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio, qkv_bias, norm_layer):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = SeedAttention(dim, num_heads, qkv_bias)
        self.norm2 = norm_layer(dim)
        self.mlp = SeedMlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class SeedVisionTransformer(nn.Module):
    def __init__(self, img_size, patch_size, in_c, num_classes, embed_dim, depth, num_heads, mlp_ratio=4.0,
                 qkv_bias=True, representation_size=None):  # fmt: skip
        super().__init__()
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.patch_embed = SeedPatchEmbed(img_size, patch_size, in_c, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        self.blocks = nn.Sequential(
            *[SeedBlock(embed_dim, num_heads, mlp_ratio, qkv_bias, norm_layer) for _ in range(depth)]
        )
        self.norm = norm_layer(embed_dim)
        self.num_features = embed_dim
        if representation_size:
            self.has_logits = True
            self.num_features = representation_size
            self.pre_logits = nn.Sequential(
                OrderedDict([("fc", nn.Linear(embed_dim, representation_size)), ("act", nn.Tanh())])
            )
        else:
            self.has_logits = False
            self.pre_logits = nn.Identity()
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x):
        x = self.patch_embed(x)  # [B, N, D]
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)  # [B, 1 + N, D]
        x = self.norm(self.blocks(x + self.pos_embed))
        return self.pre_logits(x[:, 0])

    def forward(self, x):
        return self.head(self.forward_features(x))


SEED_CONFIG = dict(img_size=32, patch_size=8, num_classes=7, embed_dim=48, depth=2, num_heads=4)


@needs("torch")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_classes", [7, 0])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_representation_layer_matches_seed_002(num_classes, dtype, backend):
    config = {**SEED_CONFIG, "num_classes": num_classes}
    reference = randomise_(SeedVisionTransformer(in_c=3, representation_size=24, **config), seed=2).eval()
    reference = in_dtype(reference, dtype)
    state = numpy_state(reference)
    assert {"pre_logits.fc.weight", "pre_logits.fc.bias"} <= set(state)
    model = vitnp.create_model("vit_tiny_patch16_224", weights=state, dtype=dtype, backend=backend,
                               representation_size=24, **config)
    x = images((2, 3, 32, 32), dtype, seed=4)
    expected = run(reference, x)
    y = model(x)
    assert y.dtype == dtype and y.shape == (2, num_classes or 24)
    assert_close(y, expected, "model")
    if not num_classes:
        assert np.abs(y).max() < 1.0  # the Tanh of the representation layer is the last step
    else:
        pre_logits = run(reference.forward_features, x)
        assert_close(model.forward_head(model.forward_features(x), pre_logits=True), pre_logits, "model")


def test_distilled_model_with_representation_size_is_consistent():
    """Seed 002 ignores representation_size when distilled; either that, or a clear ValueError at creation."""
    try:
        model = vitnp.create_model("deit_tiny_distilled_patch16_224", img_size=32, depth=1, representation_size=16)
    except ValueError as error:
        assert "representation_size" in str(error)
        return
    assert model(images((1, 3, 32, 32))).shape == (1, 1000)
