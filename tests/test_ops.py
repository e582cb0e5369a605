"""Patch extraction, patch embedding, attention and the transformer Block against torch / timm, plus the properties
(patchify round trip, permutation equivariance) that hold without any oracle."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from tolerances import assert_close

import vitnp
from vitnp import kernels, layers, ops

try:
    import torch
    import torch.nn.functional as F
except ImportError:
    torch = None
try:
    import timm
    from timm.models.vision_transformer import Block as TimmBlock
except ImportError:
    timm = None
needs_torch = pytest.mark.skipif(torch is None, reason="torch is not installed (pip install -e .[test])")
needs_timm = pytest.mark.skipif(timm is None, reason="timm is not installed (pip install -e .[test])")

DTYPES = st.sampled_from([np.float32, np.float64])
SEEDS = st.integers(0, 2**32 - 1)


def _t(a):
    return torch.from_numpy(np.ascontiguousarray(a))


def _torch_dtype(dtype):
    return torch.float64 if dtype == np.float64 else torch.float32


def _randomise_(torch_module, seed):
    """Give every parameter of a torch module random values, biases and norm parameters included.

    Default inits leave biases at 0 and LayerNorms at (1, 0), which would let a dropped bias or norm affine pass.
    Weights get std 1/sqrt(fan_in) so activations stay O(1) through the layer.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in torch_module.named_parameters():
            noise = torch.randn(p.shape, generator=generator, dtype=p.dtype)
            if p.ndim >= 2:
                p.copy_(noise / p[0].numel() ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.3 * noise)
            else:
                p.copy_(0.3 * noise)
    return torch_module


def _load(module, torch_module, dtype):
    """Copy a torch module's parameters into the vitnp module with the same parameter names, in ``dtype``."""
    state = {k: v.detach().numpy().astype(dtype) for k, v in torch_module.state_dict().items()}
    assert sorted(state) == sorted(k for k, _ in module.named_parameters()), "parameter names differ from timm's"
    modules = dict(module.named_modules())
    for key, value in state.items():
        prefix, _, name = key.rpartition(".")
        modules[prefix + "." if prefix else ""]._parameters[name] = value
    return module


def _fill(module, rng, dtype):
    """Random values for every parameter of a vitnp module (for the torch-free property tests)."""
    modules = dict(module.named_modules())
    for key, value in list(module.named_parameters()):
        prefix, _, name = key.rpartition(".")
        scale = value.shape[-1] ** -0.5 if value.ndim >= 2 else 0.3
        modules[prefix + "." if prefix else ""]._parameters[name] = (
            rng.standard_normal(value.shape) * scale + (1.0 if name == "weight" and value.ndim == 1 else 0.0)
        ).astype(dtype)
    return module


# ---------------------------------------------------------------------------------------------------- patches

GRIDS = st.fixed_dictionaries(
    dict(B=st.integers(1, 3), C=st.integers(1, 4), p=st.integers(1, 8), gh=st.integers(1, 5), gw=st.integers(1, 5))
)


@given(GRIDS, DTYPES, SEEDS)
def test_patchify_round_trip_and_token_order(g, dtype, seed):
    B, C, p, gh, gw = g["B"], g["C"], g["p"], g["gh"], g["gw"]
    x = np.random.default_rng(seed).standard_normal((B, C, gh * p, gw * p)).astype(dtype)
    patches = ops.patchify(x, p)
    assert patches.shape == (B, gh * gw, C * p * p) and patches.dtype == dtype
    # token t = i*gw + j holds x[:, :, i*p:(i+1)*p, j*p:(j+1)*p] flattened in (c, kh, kw) order
    for t in {0, gh * gw - 1, (gh // 2) * gw + gw // 2}:
        i, j = divmod(t, gw)
        np.testing.assert_array_equal(patches[:, t], x[:, :, i * p : (i + 1) * p, j * p : (j + 1) * p].reshape(B, -1))
    np.testing.assert_array_equal(ops.unpatchify(patches, p, (gh, gw), C), x)


def test_patchify_of_a_strided_view():
    """Images that are a transposed NHWC buffer (not C-contiguous) give the same patches as a contiguous copy."""
    nhwc = np.random.default_rng(0).standard_normal((2, 12, 8, 3))
    x = nhwc.transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(ops.patchify(x, 4), ops.patchify(np.ascontiguousarray(x), 4))


@needs_torch
@given(GRIDS, DTYPES, SEEDS)
def test_patchify_matches_torch_unfold(g, dtype, seed):
    B, C, p, gh, gw = g["B"], g["C"], g["p"], g["gh"], g["gw"]
    x = np.random.default_rng(seed).standard_normal((B, C, gh * p, gw * p)).astype(dtype)
    expected = F.unfold(_t(x), kernel_size=p, stride=p).transpose(1, 2).numpy()  # (B, N, C*p*p)
    np.testing.assert_array_equal(ops.patchify(x, p), expected)


@needs_torch
@given(GRIDS, st.integers(1, 12), st.booleans(), DTYPES, SEEDS)
def test_patch_embed_matches_conv2d(g, embed_dim, bias, dtype, seed):
    B, C, p, gh, gw = g["B"], g["C"], g["p"], g["gh"], g["gw"]
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, C, gh * p, gw * p)).astype(dtype)
    conv = _randomise_(torch.nn.Conv2d(C, embed_dim, kernel_size=p, stride=p, bias=bias), seed).to(_torch_dtype(dtype))
    with torch.no_grad():
        expected = conv(_t(x)).flatten(2).transpose(1, 2).numpy()  # (B, N, D)
    weight = conv.weight.detach().numpy()
    y = ops.patch_embed(x, weight, conv.bias.detach().numpy() if bias else None)
    assert y.dtype == dtype
    assert_close(y, expected, "kernel")

    embed = layers.PatchEmbed(p, C, embed_dim, bias=bias)
    _load(embed, _wrap_proj(conv), dtype)
    assert_close(embed(x), expected, "kernel")


def _wrap_proj(conv):
    """timm's PatchEmbed holds the Conv2d as ``proj``: the same key names as layers.PatchEmbed."""
    module = torch.nn.Module()
    module.proj = conv
    return module


# ---------------------------------------------------------------------------------------------------- attention

ATTN = st.fixed_dictionaries(
    dict(B=st.integers(1, 3), N=st.integers(1, 24), heads=st.integers(1, 4), head_dim=st.integers(1, 16))
)


@needs_torch
@given(ATTN, st.booleans(), DTYPES, SEEDS)
def test_scaled_dot_product_attention_matches_torch(a, with_bias, dtype, seed):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((a["B"], a["heads"], a["N"], a["head_dim"])).astype(dtype) for _ in range(3))
    bias = rng.standard_normal((a["heads"], a["N"], a["N"])).astype(dtype) if with_bias else None
    scale = a["head_dim"] ** -0.5
    expected = F.scaled_dot_product_attention(
        _t(q), _t(k), _t(v), attn_mask=_t(bias) if with_bias else None, scale=scale
    ).numpy()
    y = ops.scaled_dot_product_attention(q, k, v, scale, bias)
    assert y.dtype == dtype
    assert_close(y, expected, "layer")


@needs_torch
@given(ATTN, st.booleans(), DTYPES, SEEDS)
def test_multi_head_attention_matches_sdpa(a, qkv_bias, dtype, seed):
    B, N, H, hd = a["B"], a["N"], a["heads"], a["head_dim"]
    C = H * hd
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, N, C)).astype(dtype)
    qkv_w = (rng.standard_normal((3 * C, C)) * C**-0.5).astype(dtype)
    qkv_b = rng.standard_normal(3 * C).astype(dtype) * 0.3 if qkv_bias else None
    proj_w = (rng.standard_normal((C, C)) * C**-0.5).astype(dtype)
    proj_b = rng.standard_normal(C).astype(dtype) * 0.3
    # the torch side: q, k, v are the rows [0:C], [C:2C], [2C:3C] of the qkv projection, heads split per C
    q, k, v = F.linear(_t(x), _t(qkv_w), _t(qkv_b) if qkv_bias else None).split(C, dim=-1)
    q, k, v = (t.reshape(B, N, H, hd).transpose(1, 2) for t in (q, k, v))
    heads = F.scaled_dot_product_attention(q, k, v)  # default scale hd**-0.5
    expected = F.linear(heads.transpose(1, 2).reshape(B, N, C), _t(proj_w), _t(proj_b)).numpy()
    y = ops.multi_head_attention(x, qkv_w, qkv_b, proj_w, proj_b, H)
    assert y.dtype == dtype
    assert_close(y, expected, "layer")


@needs_timm
@given(ATTN, st.booleans(), DTYPES, SEEDS)
def test_attention_matches_timm(a, qkv_bias, dtype, seed):
    B, N, H, hd = a["B"], a["N"], a["heads"], a["head_dim"]
    C = H * hd
    x = np.random.default_rng(seed).standard_normal((B, N, C)).astype(dtype)
    reference = timm.layers.Attention(C, num_heads=H, qkv_bias=qkv_bias)
    reference = _randomise_(reference, seed).to(_torch_dtype(dtype)).eval()
    with torch.no_grad():
        expected = reference(_t(x)).numpy()
    attention = _load(layers.Attention(C, H, qkv_bias=qkv_bias), reference, dtype)
    y = attention(x)
    assert y.dtype == dtype
    assert_close(y, expected, "layer")
    # the same layer written out in ops (the readable definition) agrees too
    twin = ops.multi_head_attention(
        x, attention.qkv.weight, attention.qkv.bias if qkv_bias else None, attention.proj.weight,
        attention.proj.bias, H,
    )
    assert_close(y, twin, "layer")


@needs_timm
@given(
    st.integers(1, 2), st.integers(1, 20), st.integers(1, 4), st.integers(1, 12),
    st.sampled_from([1.0, 2.0, 2.5, 4.0]), st.booleans(), DTYPES, SEEDS,
)
def test_block_matches_timm(B, N, heads, head_dim, mlp_ratio, qkv_bias, dtype, seed):
    C = heads * head_dim
    x = np.random.default_rng(seed).standard_normal((B, N, C)).astype(dtype)
    reference = TimmBlock(C, heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias)
    reference = _randomise_(reference, seed).to(_torch_dtype(dtype)).eval()
    with torch.no_grad():
        expected = reference(_t(x)).numpy()
    block = _load(layers.Block(C, heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias), reference, dtype)
    x_before = x.copy()
    y = block(x)
    np.testing.assert_array_equal(x, x_before)  # the in-place activation must not reach the caller's array
    assert y.dtype == dtype
    assert_close(y, expected, "layer")
    assert_close(block.forward_sequences(x), expected, "layer")  # whole sequences per kernel call (MobileViT's way)


@given(
    st.integers(1, 6), st.integers(1, 70), st.integers(1, 4), st.integers(1, 40), st.sampled_from([1.0, 2.0, 2.5]),
    st.booleans(), st.sampled_from(kernels.ACTIVATIONS), st.sampled_from([1, 2]), DTYPES, SEEDS,
)
def test_block_on_whole_sequences_is_the_block_bit_for_bit(S, N, heads, head_dim, mlp_ratio, qkv_bias, act, n_threads,
                                                          dtype, seed):
    # forward_sequences runs the block's kernels on the rows of a chunk of sequences, the chunks shared out between
    # threads (when the work is big enough: S >= 2 with ~2^23 multiply-adds): the values of each step one by one.
    C = heads * head_dim
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((S, N, C)).astype(dtype)
    block = _fill(layers.Block(C, heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, eps=1e-5, act=act), rng, dtype)
    before = vitnp.get_num_threads()
    vitnp.set_num_threads(n_threads)
    try:
        y = block.forward_sequences(x)
    finally:
        vitnp.set_num_threads(before)
    assert y.dtype == dtype
    np.testing.assert_array_equal(y, block(x))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("S", "N", "heads", "head_dim"), [(4, 256, 4, 36), (5, 64, 4, 48), (4, 16, 4, 60)])
def test_block_on_whole_sequences_shared_between_threads_is_the_block_bit_for_bit(S, N, heads, head_dim, dtype):
    # MobileViT-S's three transformers at batch 1 (and an odd number of sequences), big enough to be shared out
    rng = np.random.default_rng(N)
    x = rng.standard_normal((S, N, heads * head_dim)).astype(dtype)
    block = _fill(layers.Block(heads * head_dim, heads, mlp_ratio=2.0, eps=1e-5, act="silu"), rng, dtype)
    before = vitnp.get_num_threads()
    vitnp.set_num_threads(2)
    try:
        y = block.forward_sequences(x)
    finally:
        vitnp.set_num_threads(before)
    np.testing.assert_array_equal(y, block(x))


def test_block_on_whole_sequences_rejects_what_does_not_fit():
    rng = np.random.default_rng(0)
    block = _fill(layers.Block(8, 2, mlp_ratio=2.0), rng, np.float32)
    with pytest.raises(ValueError, match=r"expected sequences \(S, N, dim\), got shape \(3, 8\)"):
        block.forward_sequences(np.zeros((3, 8), np.float32))
    with pytest.raises(ValueError, match=r"norm1 weight \(8,\) and bias \(8,\) do not fit dim 6"):
        block.forward_sequences(np.zeros((1, 3, 6), np.float32))
    norms = _fill(layers.Block(6, 2), rng, np.float32)
    parts = [module.parts() for module in (norms.norm1, block.attn.qkv, block.attn.proj, norms.norm2, block.mlp.fc1,
                                           block.mlp.fc2)]
    with pytest.raises(ValueError, match=r"qkv weight float32 \(24, 8\) does not fit float32 sequences of dim 6"):
        kernels.transformer_block(np.zeros((1, 3, 6), np.float32), *parts, 2, 0.5, "gelu")
    with pytest.raises(ValueError, match=r"qkv weight float32 \(24, 8\) does not fit float64 sequences of dim 8"):
        block.forward_sequences(np.zeros((1, 3, 8)))
    norm1 = (block.norm1.weight[:7], block.norm1.bias[:7], block.norm1.eps)
    parts = [module.parts() for module in (block.attn.qkv, block.attn.proj, block.norm2, block.mlp.fc1, block.mlp.fc2)]
    with pytest.raises(ValueError, match=r"norm1 weight \(7,\) and bias \(7,\) do not fit dim 8"):
        kernels.transformer_block(np.zeros((1, 3, 8), np.float32), norm1, *parts, 2, 0.5, "gelu")
    block = _fill(layers.Block(9, 3), rng, np.float32)
    parts = [module.parts() for module in (block.norm1, block.attn.qkv, block.attn.proj, block.norm2, block.mlp.fc1,
                                           block.mlp.fc2)]
    with pytest.raises(ValueError, match="dim 9 is not divisible by num_heads 2"):
        kernels.transformer_block(np.zeros((1, 3, 9), np.float32), *parts, 2, 0.5, "gelu")


def test_attention_rejects_heads_not_dividing_dim():
    with pytest.raises(ValueError, match="divisible"):
        layers.Attention(10, 3)


# ---------------------------------------------------------------------------------------------------- properties


@given(st.integers(1, 2), st.integers(2, 16), st.integers(1, 3), st.integers(1, 8), DTYPES, SEEDS)
def test_attention_and_block_are_permutation_equivariant(B, N, heads, head_dim, dtype, seed):
    """Without position embeddings, permuting the tokens permutes the outputs: f(x[:, P]) = f(x)[:, P]."""
    C = heads * head_dim
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, N, C)).astype(dtype)
    perm = rng.permutation(N)
    for module in (layers.Attention(C, heads), layers.Block(C, heads, mlp_ratio=2.0)):
        _fill(module, rng, dtype)
        y = module(x)
        assert_close(module(x[:, perm]), y[:, perm], "layer")
        # and it is not trivially equivariant: the tokens interact (each output depends on the others)
        if N > 1 and isinstance(module, layers.Attention):
            x_changed = x.copy()
            x_changed[:, 0] += 1.0
            assert not np.allclose(module(x_changed)[:, 1:], y[:, 1:])


def test_linear_folds_leading_axes():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 3, 4, 5))
    weight, bias = rng.standard_normal((6, 5)), rng.standard_normal(6)
    np.testing.assert_allclose(ops.linear(x, weight, bias), np.einsum("abcd,ed->abce", x, weight) + bias, rtol=1e-12)
