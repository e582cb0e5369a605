"""The ops and layers of the modern ViTs (CLIP, SigLIP, DINOv2 giant) against torch and timm 1.0.31, both backends:

- the 'quick_gelu' activation (timm ``QuickGELU``, OpenAI CLIP's x * sigmoid(1.702 x)) of the reference and of the
  engine (its rows, its GEMM's epilogue and its depthwise conv, in registers and in memory);
- ``layers.SwiGLUPacked`` against ``timm.layers.SwiGLUPacked`` (DINOv2 giant's MLP);
- ``scaled_dot_product_attention`` with fewer queries than keys, and ``layers.AttentionPoolLatent`` against
  ``timm.layers.AttentionPoolLatent`` (timm's ``global_pool='map'``, SigLIP's head).

Every timm module gets ``oracles.randomise_``'d parameters (norm affines around 1, non-zero biases and latent), float32
and float64, with the tolerances of tests/tolerances.py: 'kernel' for one op, 'layer' for a whole layer. Each feature
has a test showing that leaving it out (GELU for QuickGELU, the other half as the gate, the pool's norms and MLP)
changes the output far beyond those tolerances.
"""

import functools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from oracles import BACKENDS, in_dtype, needs, numpy_state, optional_import, randomise_
from test_fast_kernels import ACTIVATION_EDGES, _assert_same_bits
from test_reference_ops import DTYPES, LINEAR_SHAPES, SEEDS, arrays, random_parameters
from test_swin import _load_module  # a timm module's state_dict into the vitnp module of the same names
from tolerances import assert_close

from vitnp import layers
from vitnp.backends import backend_ops
from vitnp.fast import conv, gemm, rows
from vitnp.fast import ops as fast
from vitnp.reference import ops as reference

torch = optional_import("torch")
timm = optional_import("timm")
needs_torch = needs("torch")
needs_timm = needs("torch", "timm")
on_both_backends = pytest.mark.parametrize("backend", BACKENDS)
FEW = min(10, settings().max_examples)  # examples of the tests that build a timm module each


def _t(a):
    return torch.from_numpy(np.array(a))  # a copy: the fast backend makes the weights it packs read-only


def _torch_quick_gelu(t):
    return t * torch.sigmoid(1.702 * t)  # timm.layers.activations.quick_gelu, OpenAI CLIP's QuickGELU


def _timm_act_layer(act):
    nn = torch.nn
    return {"gelu": nn.GELU, "gelu_tanh": functools.partial(nn.GELU, approximate="tanh"), "silu": nn.SiLU,
            "quick_gelu": timm.layers.QuickGELU}[act]


def _timm_twin(timm_module, layer, dtype, backend):
    """The vitnp ``layer`` holding the timm module's (float32, randomised) parameters in ``dtype``, on ``backend``;
    and the timm module in ``dtype``."""
    timm_module = in_dtype(timm_module, dtype)
    _load_module(layer, {key: value.copy() for key, value in numpy_state(timm_module).items()})
    return layer.set_backend(backend), timm_module


def _run(module, x):
    with torch.no_grad():
        return module(_t(x)).numpy()


# ---- quick_gelu ------------------------------------------------------------------------------------------------------


@needs_timm
@given(arrays(scales=(0.1, 1.0, 10.0, 100.0)))
def test_quick_gelu_matches_torch_and_timm_on_both_backends(xr):
    x, _ = xr
    expected = _torch_quick_gelu(_t(x)).numpy()
    assert_close(timm.layers.QuickGELU()(_t(x)).numpy(), expected, "kernel")  # the formula is timm's
    y = reference.activation(x, "quick_gelu")
    assert y.dtype == x.dtype and y.shape == x.shape
    assert_close(y, expected, "kernel")
    y_fast = rows.quick_gelu(x)
    assert y_fast.dtype == x.dtype and y_fast.shape == x.shape
    assert_close(y_fast, y, "kernel")


@needs_torch
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_quick_gelu_at_the_extremes(dtype):
    # exp(-1.702 v) overflows for v < -417 (float64), v < -52 (float32 exp's clamp): the limit -0, not nan; +-inf as
    # torch's (inf * sigmoid(inf) = inf, -inf * 0 = nan)
    x = np.array([-np.inf, -1e30, -1e4, -800.0, -417.0, -200.0, -53.0, -52.0, -51.0, -20.0, -1e-30, 0.0, 1e-30, 20.0,
                  51.0, 88.0, 200.0, 1e4, 1e30, np.inf], dtype)
    expected = _torch_quick_gelu(_t(x)).numpy()
    identity = gemm.pack_linear_weight(np.ones((1, 1), dtype))
    for y in (reference.activation(x, "quick_gelu"), rows.quick_gelu(x),
              gemm.linear(x[:, None], identity, act="quick_gelu")[:, 0]):
        np.testing.assert_array_equal(np.isnan(y), np.isnan(expected))
        numbers = ~np.isnan(y)
        assert_close(y[numbers], expected[numbers], "kernel")


@needs_torch
@given(LINEAR_SHAPES, st.booleans(), st.booleans(), DTYPES, SEEDS)
def test_linear_with_quick_gelu_matches_torch_on_both_backends(shapes, with_bias, with_residual, dtype, seed):
    # fc1 of CLIP's MLP: quick_gelu in the fast GEMM's epilogue on every tile, the cut-short last panel and the rows
    # past the last 6-row tile included
    (lead, n_rows, k, n), rng = shapes, np.random.default_rng(seed)
    x = rng.standard_normal((*lead, n_rows, k)).astype(dtype)
    weight = (rng.standard_normal((n, k)) / np.sqrt(k)).astype(dtype)
    bias = rng.standard_normal(n).astype(dtype) if with_bias else None
    residual = rng.standard_normal((*lead, n_rows, n)).astype(dtype) if with_residual else None
    y = reference.linear(x, weight, bias, "quick_gelu", residual)
    product = torch.nn.functional.linear(_t(x), _t(weight), None if bias is None else _t(bias))
    expected = _torch_quick_gelu(product) + (0.0 if residual is None else _t(residual))
    assert y.dtype == dtype
    assert_close(y, expected.numpy(), "kernel")
    y_fast = fast.linear(x, weight, bias, "quick_gelu", residual)
    assert y_fast.dtype == dtype and y_fast.shape == y.shape
    assert_close(y_fast, y, "kernel")


@given(st.integers(1, 20), st.integers(1, 80), st.sampled_from([1, 3]), st.integers(1, 3), DTYPES, SEEDS)
def test_quick_gelu_in_registers_is_quick_gelu_in_memory_bit_for_bit(n_rows, channels, kernel, stride, dtype, seed):
    # The GEMM applies quick_gelu to its output tile in the registers and the depthwise conv to its vectors of
    # channels (activations.vquick_gelu); rows.quick_gelu runs activations.activate's loop over memory: the same
    # operations in the same order, over exp's whole range (its clamps, +-inf, nan), every tile row and column, every
    # vector and scalar channel remainder.
    rng = np.random.default_rng(seed)
    pool = np.concatenate([ACTIVATION_EDGES, rng.standard_normal(40) * 30])
    weight = (rng.choice([-1.0, 1.0], channels) * rng.uniform(0.5, 2.0, channels)).astype(dtype)
    shift = rng.standard_normal(channels).astype(dtype)
    x = rng.choice(pool, (n_rows, 1)).astype(dtype)
    packed = gemm.pack_linear_weight(weight[:, None])
    pre_activation = gemm.linear(x, packed, shift)
    _assert_same_bits(gemm.linear(x, packed, shift, act="quick_gelu"), rows.quick_gelu(pre_activation))
    maps = rng.choice(pool, (1, n_rows, 5, channels)).astype(dtype)
    taps = np.repeat(weight[:, None, None, None], kernel, axis=2).repeat(kernel, axis=3)  # (C, 1, k, k)
    conv_output = conv.depthwise_conv2d(maps, taps, stride, kernel // 2, shift=shift)
    in_registers = conv.depthwise_conv2d(maps, taps, stride, kernel // 2, shift=shift, act="quick_gelu")
    _assert_same_bits(in_registers, rows.quick_gelu(conv_output))


@pytest.mark.parametrize("backend", BACKENDS)
def test_quick_gelu_is_visibly_not_gelu_nor_silu(backend):
    # A CLIP OpenAI model run with GELU or SiLU in place of QuickGELU must fail the comparison: the activations differ
    # by about 1e-2 to 2e-1 over the values a Linear gives, far beyond every tolerance
    x = np.linspace(-4, 4, 81)
    ops = backend_ops(backend)
    quick_gelu = ops.linear(x[:, None], np.ones((1, 1)), act="quick_gelu")
    for other in ("gelu", "silu"):
        assert np.abs(quick_gelu - ops.linear(x[:, None], np.ones((1, 1)), act=other)).max() > 1e-2


# ---- SwiGLUPacked ----------------------------------------------------------------------------------------------------


@needs_timm
@on_both_backends
@settings(max_examples=FEW)
@given(st.integers(0, 3), st.integers(1, 20), st.integers(1, 48), st.integers(1, 40), DTYPES, SEEDS)
def test_swiglu_packed_matches_timm(backend, B, N, dim, half, dtype, seed):
    timm_mlp = randomise_(timm.layers.SwiGLUPacked(dim, 2 * half), seed).eval()
    mlp, timm_mlp = _timm_twin(timm_mlp, layers.SwiGLUPacked(dim, 2 * half), dtype, backend)
    x = np.random.default_rng(seed).standard_normal((B, N, dim)).astype(dtype)
    expected = _run(timm_mlp, x)
    y = mlp(x)
    assert y.dtype == dtype and y.shape == (B, N, dim)
    assert_close(y, expected, "layer")
    assert_close(mlp(x, residual=x), x + expected, "layer")  # a Block's x + mlp(norm2(x)), as layers.Mlp takes it


@needs_timm
def test_swiglu_packed_gates_the_first_half():
    # timm's GluMlp default gates the second half (gate_last=True); SwiGLUPacked the first: with the same weights the
    # two differ visibly, so a swapped chunk cannot pass
    timm_mlp = randomise_(timm.layers.SwiGLUPacked(32, 64), 0).eval()
    gate_last = timm.layers.GluMlp(32, 64, act_layer=torch.nn.SiLU, gate_last=True)
    gate_last.load_state_dict(timm_mlp.state_dict())
    mlp, _ = _timm_twin(timm_mlp, layers.SwiGLUPacked(32, 64), np.float32, "reference")
    x = np.random.default_rng(0).standard_normal((2, 5, 32)).astype(np.float32)
    assert_close(mlp(x), _run(timm_mlp, x), "layer")
    assert np.abs(mlp(x) - _run(gate_last.eval(), x)).max() > 1e-1


def test_swiglu_packed_refuses_an_odd_hidden_width():
    with pytest.raises(ValueError, match="hidden_features 7 must be even"):
        layers.SwiGLUPacked(4, 7)


# ---- attention with fewer queries than keys --------------------------------------------------------------------------


@st.composite
def cross_attention_cases(draw):
    """(q, k, v, scale, bias): q (B, heads, Nq, head_dim) over k, v (B, heads, N, head_dim), Nq and N independent;
    bias (heads, Nq, N) or None."""
    B, heads, head_dim = draw(st.integers(0, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 24))
    n_queries, n_keys = draw(st.integers(1, 6)), draw(st.integers(1, 50))
    dtype, rng = draw(DTYPES), np.random.default_rng(draw(SEEDS))
    q = rng.standard_normal((B, heads, n_queries, head_dim)).astype(dtype)
    k, v = rng.standard_normal((2, B, heads, n_keys, head_dim)).astype(dtype)  # views of one array, as timm's kv
    bias = rng.standard_normal((heads, n_queries, n_keys)).astype(dtype) if draw(st.booleans()) else None
    return q, k, v, head_dim**-0.5 * draw(st.sampled_from([1.0, 3.0])), bias


@needs_torch
@given(cross_attention_cases())
def test_attention_of_fewer_queries_than_keys_matches_torch_on_both_backends(case):
    q, k, v, scale, bias = case
    expected = torch.nn.functional.scaled_dot_product_attention(
        _t(q), _t(k), _t(v), attn_mask=None if bias is None else _t(bias), scale=scale
    ).numpy()
    y = reference.scaled_dot_product_attention(q, k, v, scale, bias)
    assert y.dtype == q.dtype and y.shape == q.shape
    assert_close(y, expected, "kernel")
    y_fast = fast.scaled_dot_product_attention(q, k, v, scale, bias)
    assert y_fast.dtype == q.dtype and y_fast.shape == q.shape
    assert_close(y_fast, y, "kernel")


@pytest.mark.parametrize("ops", [reference, fast], ids=["reference", "fast"])
def test_attention_refuses_q_k_v_that_do_not_fit(ops):
    q = np.zeros((2, 3, 1, 4), np.float32)
    k = np.zeros((2, 3, 5, 4), np.float32)
    for q_, k_, v_ in [(q, k, k[:, :, :4]), (q, k[:, :2], k[:, :2]), (q[..., :3], k, k), (q[0], k, k)]:
        with pytest.raises(ValueError, match="attention: "):
            ops.scaled_dot_product_attention(q_, k_, v_, 0.5)


# ---- AttentionPoolLatent ---------------------------------------------------------------------------------------------


def _timm_pool(dim, heads, mlp_ratio=4.0, qkv_bias=True, qk_norm=False, eps=1e-6, act="gelu", latent_len=1, seed=0):
    """timm's AttentionPoolLatent as VisionTransformer(global_pool='map') builds it (its norm_layer, here a LayerNorm
    of ``eps``, also for q_norm / k_norm), randomised."""
    pool = timm.layers.AttentionPoolLatent(
        dim, num_heads=heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_norm=qk_norm, latent_len=latent_len,
        norm_layer=functools.partial(torch.nn.LayerNorm, eps=eps), act_layer=_timm_act_layer(act),
    )
    return randomise_(pool, seed).eval()


@needs_timm
@on_both_backends
@settings(max_examples=FEW)
@given(st.integers(1, 3), st.integers(1, 30), st.integers(1, 4), st.integers(1, 12), st.integers(1, 3),
       st.sampled_from([1.0, 2.0, 3.734]), st.booleans(), st.booleans(),
       st.sampled_from(["gelu", "gelu_tanh", "quick_gelu"]), st.sampled_from([1e-6, 1e-5]), DTYPES, SEEDS)
def test_attention_pool_latent_matches_timm(backend, B, N, heads, head_dim, latent_len, mlp_ratio, qkv_bias, qk_norm,
                                            act, eps, dtype, seed):
    dim = heads * head_dim
    config = dict(mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_norm=qk_norm, eps=eps, act=act, latent_len=latent_len)
    timm_pool = _timm_pool(dim, heads, **config, seed=seed)
    pool, timm_pool = _timm_twin(timm_pool, layers.AttentionPoolLatent(dim, heads, **config), dtype, backend)
    x = np.random.default_rng(seed).standard_normal((B, N, dim)).astype(dtype)
    y = pool(x)
    assert y.dtype == dtype and y.shape == (B, dim)
    assert_close(y, _run(timm_pool, x), "layer")


@needs_timm
@on_both_backends
def test_attention_pool_latent_without_its_norms_or_mlp_is_visibly_different(backend):
    # The pool's q_norm / k_norm, its norm + MLP residual and its latent each move the output far beyond 'layer'
    # tolerance, so a model that drops one cannot pass the comparison with timm
    timm_pool = _timm_pool(32, 4, qk_norm=True, latent_len=2)
    pool, _ = _timm_twin(timm_pool, layers.AttentionPoolLatent(32, 4, qk_norm=True, latent_len=2), np.float64, backend)
    x = np.random.default_rng(1).standard_normal((2, 9, 32))
    expected = _run(in_dtype(timm_pool, np.float64), x)
    assert_close(pool(x), expected, "layer")
    far = 1e-2  # 500 times float32's 'layer' tolerance
    for part, replacement in [("q_norm", layers.Identity()), ("k_norm", layers.Identity()),
                              ("mlp", lambda h, residual: residual)]:
        changed, _ = _timm_twin(timm_pool, layers.AttentionPoolLatent(32, 4, qk_norm=True, latent_len=2), np.float64,
                                backend)
        changed.__dict__[part] = replacement
        assert np.abs(changed(x) - expected).max() > far, part
    pool._parameters["latent"] = pool.latent[:, ::-1].copy()  # the other latent first
    assert np.abs(pool(x) - expected).max() > far


@on_both_backends
def test_attention_pool_latent_of_an_empty_batch_and_bad_configs(backend):
    pool = layers.AttentionPoolLatent(8, 2).set_backend(backend)
    assert pool(np.zeros((0, 5, 8), np.float32)).shape == (0, 8)
    with pytest.raises(ValueError, match="embed_dim 10 is not divisible by num_heads 3"):
        layers.AttentionPoolLatent(10, 3)


@on_both_backends
@given(st.integers(1, 3), st.integers(1, 12), st.integers(1, 3), st.integers(1, 8), DTYPES, SEEDS)
def test_a_block_with_a_swiglu_packed_mlp_runs_its_own_forward_in_transformer_blocks(backend, S, N, heads, head_dim,
                                                                                     dtype, seed):
    # The fast transformer_blocks op runs a timm pre-norm Block as one fused kernel of fc1 -> act -> fc2; a Block
    # whose SwiGLUPacked MLP has the same parameter names (mlp.fc1, mlp.fc2) must run its own forward instead
    dim = heads * head_dim
    block = layers.Block(dim, heads, mlp_ratio=2.0, mlp_layer="swiglu_packed")
    random_parameters(block, np.random.default_rng(seed), dtype).set_backend(backend)
    assert fast.transformer_block_parts(block) is None
    x = np.random.default_rng(seed).standard_normal((S, N, dim)).astype(dtype)
    expected = block.set_backend("reference")(x)
    block.set_backend(backend)
    assert_close(backend_ops(backend).transformer_blocks(x, [block]), expected, "kernel" if dtype == np.float64
                 else "layer")
