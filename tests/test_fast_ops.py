"""The fast backend's ops (vitnp.fast.ops) against the reference's (vitnp.reference.ops), which are their spec: the
same names and signatures, and on the same Hypothesis-chosen inputs the same results, to the rounding of a reordered
sum. The reference's ops are held to torch in test_reference_ops.py; none of these tests needs torch.

Tolerances (tests/tolerances.py):
- float32 'kernel' (rtol 1e-5, atol 1e-6) for one op: the engine sums in another order (its GEMM's chains of fused
  multiply-adds against the BLAS's blocking, LayerNorm's lane-interleaved float64 sums), and its float32 exp and erf
  are within 2.5 ulp and 1.5e-9, where the reference rounds each element-wise value once.
- float32 'layer' (rtol 1e-4, atol 2e-5) for the whole blocks (inverted_residual, transformer_blocks), which chain
  several such ops, and for the 3x3 conv at stride 1, which the engine runs by Winograd's F(2x2, 3x3): its transforms
  add and subtract window values, each rounded once, so the error is a few ulp of the largest value in play, not of
  each output (measured up to ~2e-6 of the output's size; 'layer''s atol covers outputs up to ~10).
- float64 'kernel' (rtol 1e-12, atol 1e-13) throughout: the same reorderings at 2^-53.
- exact equality for the ops that only move values (roll, window partition and reverse; a residual's add is one
  rounding on both backends).
"""

import gc
import inspect

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_reference_ops import (
    DTYPES,
    LINEAR_SHAPES,
    SEEDS,
    cosine_kind,
    random_conv_norm_act,
    random_logit_scale,
    random_parameters,
)
from tolerances import assert_close

import vitnp
from vitnp import layers
from vitnp.fast import ops as fast
from vitnp.reference import ops as reference

SHAPES = st.tuples(st.lists(st.integers(1, 4), min_size=1, max_size=3), st.integers(1, 300)).map(
    lambda s: (*s[0], s[1])
)

COMPARED = set()  # the ops the tests below compare, each test marked with @compares


def compares(*names):
    """Mark a test as comparing the two backends' ops ``names``."""

    def mark(test):
        COMPARED.update(names)
        return test

    return mark


def _kind(dtype, float32_kind="kernel"):
    """The tolerance kind: ``float32_kind`` for float32, 'kernel' (2^-53 reorderings) for float64."""
    return float32_kind if dtype == np.float32 else "kernel"


@pytest.fixture
def two_threads():
    before = vitnp.get_num_threads()
    vitnp.set_num_threads(2)
    yield
    vitnp.set_num_threads(before)


# ---- the API ---------------------------------------------------------------------------------------------------------


def _functions(module):
    return {name for name in module.__all__ if inspect.isfunction(getattr(module, name))}


def test_both_backends_have_the_same_ops_with_the_same_signatures():
    assert list(fast.__all__) == list(reference.__all__)
    for name in reference.__all__:
        ours, theirs = getattr(fast, name), getattr(reference, name)  # AttributeError: an op the engine lacks
        if inspect.isfunction(theirs):
            assert inspect.isfunction(ours), name
            assert inspect.signature(ours) == inspect.signature(theirs), name
        else:
            assert ours == theirs, name


def test_every_op_is_compared_between_the_backends():
    # an op the engine takes from the reference (the same function: vitnp/fast/ops.py says why) has no twin to compare
    shared = {name for name in _functions(reference) if getattr(fast, name) is getattr(reference, name)}
    assert COMPARED | shared == _functions(reference), sorted(_functions(reference) - COMPARED - shared)


# ---- Linear, rows, patches -------------------------------------------------------------------------------------------


@compares("linear")
@given(LINEAR_SHAPES, st.sampled_from(reference.ACTIVATIONS), st.booleans(), st.booleans(), DTYPES, SEEDS)
def test_linear(shapes, act, with_bias, with_residual, dtype, seed):
    (lead, rows, k, n), rng = shapes, np.random.default_rng(seed)
    x = rng.standard_normal((*lead, rows, k)).astype(dtype)
    weight = (rng.standard_normal((n, k)) / np.sqrt(k)).astype(dtype)  # outputs O(1), as in a network
    bias = rng.standard_normal(n).astype(dtype) if with_bias else None
    residual = rng.standard_normal((*lead, rows, n)).astype(dtype) if with_residual else None
    expected = reference.linear(x, weight, bias, act, residual)
    y = fast.linear(x, weight, bias, act, residual)
    assert y.dtype == dtype and y.shape == expected.shape
    assert_close(y, expected, "kernel")


ROW_OPS = {  # name: op(backend, x, rng)
    "layer_norm": lambda ops, x, rng: ops.layer_norm(x, 1 + 0.5 * rng.standard_normal(x.shape[-1]).astype(x.dtype),
                                                     rng.standard_normal(x.shape[-1]).astype(x.dtype), 1e-6),
    "gelu": lambda ops, x, rng: ops.gelu(x),
    "gelu_tanh": lambda ops, x, rng: ops.gelu(x, approximate="tanh"),
    "silu": lambda ops, x, rng: ops.silu(x),
    "softmax": lambda ops, x, rng: ops.softmax(x),
}


@compares("layer_norm", "gelu", "silu", "softmax")
@pytest.mark.parametrize("name", ROW_OPS)
@given(st.tuples(SHAPES, DTYPES, st.sampled_from([0.1, 1.0, 10.0, 100.0]), SEEDS))
def test_row_ops(name, case):
    shape, dtype, scale, seed = case
    x = (np.random.default_rng(seed).standard_normal(shape) * scale).astype(dtype)
    expected = ROW_OPS[name](reference, x, np.random.default_rng(seed))
    y = ROW_OPS[name](fast, x, np.random.default_rng(seed))
    assert y.dtype == dtype and y.shape == shape
    assert_close(y, expected, "kernel")


@compares("group_norm")
@given(st.integers(1, 3), st.integers(1, 300), st.integers(1, 40), st.sampled_from([0.1, 1.0, 10.0]),
       st.sampled_from([0.0, -3.0, 100.0]), DTYPES, SEEDS)
def test_group_norm(B, positions, C, scale, offset, dtype, seed):
    # MobileViT v2's GroupNorm1 on channels-last samples (B, positions, C), some far from zero mean (100 standard
    # deviations off: float32's passes must centre them as the reference's float64 does; further off, float64's own
    # rounding of the mean, in another order in each, moves the results apart by more than its 'kernel' tolerance)
    rng = np.random.default_rng(seed)
    x = ((rng.standard_normal((B, positions, C)) + offset) * scale).astype(dtype)
    weight = (1 + 0.5 * rng.standard_normal(C)).astype(dtype)
    bias = rng.standard_normal(C).astype(dtype)
    y = fast.group_norm(x, weight, bias, 1e-5)
    assert y.dtype == dtype and y.shape == x.shape
    assert_close(y, reference.group_norm(x, weight, bias, 1e-5), "kernel")


@compares("patch_embed", "patchify")
@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 8), st.integers(1, 5), st.integers(1, 5),
       st.integers(0, 7), st.integers(1, 40), st.booleans(), DTYPES, SEEDS)
def test_patch_embed_and_patchify(B, C, p, gh, gw, more, embed_dim, with_bias, dtype, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, C, gh * p + more % p, gw * p)).astype(dtype)  # rows past the last patch left out
    weight = (rng.standard_normal((embed_dim, C, p, p)) / np.sqrt(C * p * p)).astype(dtype)
    bias = rng.standard_normal(embed_dim).astype(dtype) if with_bias else None
    np.testing.assert_array_equal(fast.patchify(x, p), reference.patchify(x, p))
    assert_close(fast.patch_embed(x, weight, bias), reference.patch_embed(x, weight, bias), "kernel")


@compares("tanh", "resize_bilinear")
@given(st.integers(1, 2), st.integers(1, 12), st.integers(1, 12), st.integers(1, 9), st.integers(1, 12),
       st.integers(1, 12), DTYPES, SEEDS)
def test_tanh_and_resize_bilinear(B, H, W, C, new_h, new_w, dtype, seed):
    x = (np.random.default_rng(seed).standard_normal((B, H, W, C)) * 3).astype(dtype)
    assert_close(fast.tanh(x), reference.tanh(x), "kernel")
    assert_close(fast.resize_bilinear(x, (new_h, new_w)), reference.resize_bilinear(x, (new_h, new_w)), "kernel")


# ---- attention -------------------------------------------------------------------------------------------------------


@st.composite
def attention_cases(draw):
    """(qkv, scale, bias, mask): a fused qkv Linear's output (B, N, 3 * heads * head_dim) as (B, N, 3, heads,
    head_dim); bias (heads, N, N) or None; mask (nW, N, N) or None, Swin's 0 / -100, B a multiple of nW."""
    nW, with_mask = draw(st.integers(1, 3)), draw(st.booleans())
    B = draw(st.integers(1, 2)) * nW if with_mask else draw(st.integers(1, 4))
    N, heads, head_dim = draw(st.integers(1, 40)), draw(st.integers(1, 4)), draw(st.integers(1, 40))
    dtype, rng = draw(DTYPES), np.random.default_rng(draw(SEEDS))
    qkv = rng.standard_normal((B, N, 3 * heads * head_dim)).astype(dtype).reshape(B, N, 3, heads, head_dim)
    bias = rng.standard_normal((heads, N, N)).astype(dtype) if draw(st.booleans()) else None
    mask = np.where(rng.random((nW, N, N)) < 0.3, -100.0, 0.0).astype(dtype) if with_mask else None
    return qkv, head_dim**-0.5, bias, mask


@compares("scaled_dot_product_attention", "attention_probs")
@given(attention_cases())
def test_attention_on_views_of_a_fused_qkv_and_on_separate_arrays(case):
    # timm's q, k, v: views of the qkv Linear's output, which the engine reads in place; or three arrays of their own
    qkv, scale, bias, mask = case
    q, k, v = qkv.transpose(2, 0, 3, 1, 4)  # each (B, heads, N, head_dim), a view
    separate = tuple(t.copy() for t in (q, k, v))
    assert np.shares_memory(fast._qkv_of(q, k, v), qkv)  # read in place
    assert not np.shares_memory(fast._qkv_of(*separate), qkv)
    expected = reference.scaled_dot_product_attention(*separate, scale, bias, mask)
    kind = _kind(qkv.dtype)
    for inputs in ((q, k, v), separate):
        y = fast.scaled_dot_product_attention(*inputs, scale, bias, mask)
        assert y.dtype == qkv.dtype and y.shape == q.shape
        assert_close(y, expected, kind)
    assert_close(fast.attention_probs(q, k, scale, bias, mask), reference.attention_probs(q, k, scale, bias, mask),
                 kind)


@compares("cosine_attention")
@given(attention_cases(), SEEDS)
def test_cosine_attention_on_views_of_a_fused_qkv_and_on_separate_arrays(case, seed):
    # Swin V2's attention: q and k made unit rows out of the qkv Linear's output (views) or three arrays of their own
    qkv, _, bias, mask = case
    q, k, v = qkv.transpose(2, 0, 3, 1, 4)  # each (B, heads, N, head_dim), a view
    logit_scale = random_logit_scale(np.random.default_rng(seed), q.shape[1], qkv.dtype)
    separate = tuple(t.copy() for t in (q, k, v))
    expected = reference.cosine_attention(*separate, logit_scale, 1e-12, bias, mask)
    for inputs in ((q, k, v), separate):
        y = fast.cosine_attention(*inputs, logit_scale, 1e-12, bias, mask)
        assert y.dtype == qkv.dtype and y.shape == q.shape
        assert_close(y, expected, cosine_kind(qkv.dtype))  # the logit scale (up to 100) multiplies the rounding
    np.testing.assert_array_equal(qkv.transpose(2, 0, 3, 1, 4)[0], q)  # the input left as it was


@compares("linear_self_attention")
@given(st.integers(1, 2), st.integers(1, 4), st.integers(1, 40), st.integers(1, 24), DTYPES, SEEDS)
def test_linear_self_attention(B, P, N, d, dtype, seed):
    qkv = np.random.default_rng(seed).standard_normal((B, P, N, 1 + 2 * d)).astype(dtype) * 3
    query, key, value = qkv[..., 0], qkv[..., 1:1 + d], qkv[..., 1 + d:]
    y = fast.linear_self_attention(query, key, value)
    assert y.dtype == dtype
    assert_close(y, reference.linear_self_attention(query, key, value), _kind(dtype))


# ---- Swin's roll and windows -----------------------------------------------------------------------------------------


@compares("roll", "window_partition", "window_reverse")
@given(st.integers(1, 3), st.integers(1, 20), st.integers(1, 20), st.integers(1, 40), st.integers(1, 8),
       st.integers(1, 8), st.tuples(st.integers(-25, 25), st.integers(-25, 25)), st.booleans(), DTYPES, SEEDS)
def test_roll_and_windows(B, H, W, C, wh, ww, shift, with_residual, dtype, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, H, W, C)).astype(dtype)
    np.testing.assert_array_equal(fast.roll(x, shift), reference.roll(x, shift))
    windows = fast.window_partition(x, (wh, ww), shift)
    np.testing.assert_array_equal(windows, reference.window_partition(x, (wh, ww), shift))
    scrambled = rng.standard_normal(windows.shape).astype(dtype)  # the padding positions not zero
    residual = rng.standard_normal(x.shape).astype(dtype) if with_residual else None
    np.testing.assert_array_equal(fast.window_reverse(scrambled, (wh, ww), H, W, shift, residual),
                                  reference.window_reverse(scrambled, (wh, ww), H, W, shift, residual))


# ---- convolution -----------------------------------------------------------------------------------------------------

CONV_KINDS = {  # name: (kernel, stride, padding, depthwise), the engine's paths
    "1x1": (1, 1, 0, False),  # a Linear over the channels
    "3x3": (3, 1, 1, False),  # Winograd's F(2x2, 3x3); with a residual, im2col rows on the GEMM
    "3x3 stride 2": (3, 2, 1, False),  # im2col rows on the GEMM
    "5x5": (5, 1, 2, False),
    "depthwise 3x3": (3, 1, 1, True),
    "depthwise 3x3 stride 2": (3, 2, 1, True),
    "depthwise 5x5 stride 2": (5, 2, 2, True),
    "1x1 padding 2 stride 2": (1, 2, 2, False),  # windows wholly in the padding: zeros, then scale / bias / act
    "depthwise 1x1 padding 2": (1, 1, 2, True),
}
CHANNELS = st.integers(1, 40) | st.sampled_from([16, 32, 48])  # whole vectors of channels, and remainders


@compares("conv2d")
@given(st.sampled_from(list(CONV_KINDS)), st.sampled_from(["nhwc", "two maps", "nchw images"]), st.integers(1, 2),
       st.integers(1, 12), st.integers(1, 12), CHANNELS, CHANNELS, st.sampled_from(reference.ACTIVATIONS),
       st.booleans(), st.booleans(), st.booleans(), DTYPES, SEEDS)
def test_conv2d(kind, form, B, H, W, C, out, act, with_scale, with_bias, with_residual, dtype, seed):
    # every path of the engine's conv2d: depthwise, 1x1, Winograd, im2col rows; one NHWC map, two read as their
    # channel concatenation, or the NHWC view of NCHW images (a network's input, read in place); scale, bias,
    # activation and residual applied as each output is written
    kernel, stride, padding, depthwise = CONV_KINDS[kind]
    rng = np.random.default_rng(seed)
    out = C if depthwise else out
    if form == "nchw images":
        x = rng.standard_normal((B, C, H, W)).astype(dtype).transpose(0, 2, 3, 1)  # (B, H, W, C), a view
    else:
        x = rng.standard_normal((B, H, W, C)).astype(dtype)
    maps = (x[..., : C // 2].copy(), x[..., C // 2 :].copy()) if form == "two maps" and C > 1 else x
    fan_in = (1 if depthwise else C) * kernel * kernel
    weight = (rng.standard_normal((out, 1 if depthwise else C, kernel, kernel)) / np.sqrt(fan_in)).astype(dtype)
    Ho, Wo = (reference.conv_output_size(n, kernel, stride, padding) for n in (H, W))
    arguments = dict(
        bias=rng.standard_normal(out).astype(dtype) if with_bias else None,
        stride=stride,
        padding=padding,
        groups=C if depthwise else 1,
        scale=rng.uniform(0.5, 2, out).astype(dtype) if with_scale else None,
        act=act,
        residual=rng.standard_normal((B, Ho, Wo, out)).astype(dtype) if with_residual else None,
    )
    expected = reference.conv2d(maps, weight, **arguments)
    y = fast.conv2d(maps, weight, **arguments)
    assert y.dtype == dtype and y.shape == expected.shape
    winograd = kind == "3x3" and not with_residual and form != "nchw images"
    assert_close(y, expected, _kind(dtype, "layer" if winograd else "kernel"))


# ---- whole blocks ----------------------------------------------------------------------------------------------------


@compares("inverted_residual")
@given(st.integers(1, 2), st.integers(1, 12), st.integers(1, 12), st.integers(1, 24), CHANNELS, st.integers(1, 24),
       st.sampled_from([(1, 3), (2, 3), (1, 5), (2, 5)]), st.sampled_from(reference.ACTIVATIONS), st.booleans(),
       st.booleans(), DTYPES, SEEDS)
def test_inverted_residual(B, H, W, in_chs, mid, out_chs, stride_kernel, act, shortcut, fold, dtype, seed):
    # An MV2 block of ConvNormAct layers, every parameter and BatchNorm statistic random, the BatchNorms applied
    # after each conv or folded into it; the engine runs the three convs as one kernel, a few output rows at a time
    stride, kernel = stride_kernel
    shortcut = shortcut and stride == 1
    out_chs = in_chs if shortcut else out_chs
    rng = np.random.default_rng(seed)
    convs = (
        random_conv_norm_act(rng, in_chs, mid, 1, act=act, dtype=dtype),
        random_conv_norm_act(rng, mid, mid, kernel, stride, depthwise=True, dtype=dtype),
        random_conv_norm_act(rng, mid, out_chs, 1, act="none", dtype=dtype),
    )
    for conv in convs if fold else ():
        conv.fold()
    x = rng.standard_normal((B, H, W, in_chs)).astype(dtype)
    for conv in convs:
        conv.set_backend("reference")
    expected = reference.inverted_residual(x, *convs, shortcut)
    for conv in convs:
        conv.set_backend("fast")
    y = fast.inverted_residual(x, *convs, shortcut)
    assert y.dtype == dtype
    assert_close(y, expected, _kind(dtype, "layer"))


@compares("transformer_blocks")
@given(st.integers(1, 6), st.integers(1, 40), st.integers(1, 4), st.integers(1, 24), st.sampled_from([1.0, 2.0, 2.5]),
       st.booleans(), st.sampled_from(reference.ACTIVATIONS), st.integers(1, 2), st.booleans(), DTYPES, SEEDS)
def test_transformer_blocks(S, N, heads, head_dim, mlp_ratio, qkv_bias, act, depth, with_mlp, dtype, seed):
    # timm Blocks (the engine's fused kernel, a chunk of whole sequences at a time), and a module that is not a Block
    # (an Mlp: its own forward, on the fast ops)
    C = heads * head_dim
    rng = np.random.default_rng(seed)
    blocks = [layers.Block(C, heads, mlp_ratio, qkv_bias, eps=1e-5, act=act) for _ in range(depth)]
    blocks += [layers.Mlp(C, 2 * C, act=act)] if with_mlp else []
    blocks = [random_parameters(block, rng, dtype) for block in blocks]
    x = rng.standard_normal((S, N, C)).astype(dtype)
    expected = reference.transformer_blocks(x, [block.set_backend("reference") for block in blocks])
    y = fast.transformer_blocks(x, [block.set_backend("fast") for block in blocks])
    assert y.dtype == dtype
    assert_close(y, expected, _kind(dtype, "layer"))


@compares("map_batch")
@pytest.mark.parametrize("batch", [1, 2, 5])
def test_map_batch(two_threads, batch):
    # the engine cuts the batch into one chunk per thread; the chunks come back in order
    x = np.random.default_rng(batch).standard_normal((batch, 3, 7))

    def forward(images):  # each image on its own, as a model's forward
        return reference.softmax(images) * np.arange(7) + images.sum(axis=(1, 2))[:, None, None]

    np.testing.assert_array_equal(fast.map_batch(forward, x), reference.map_batch(forward, x))


# ---- errors and packing ----------------------------------------------------------------------------------------------

DTYPE_MISMATCHES = {  # name: a call with one parameter in float64 among float32 inputs
    "linear bias": lambda ops, x: ops.linear(x, np.ones((3, 4), np.float32), np.zeros(3)),
    "linear residual": lambda ops, x: ops.linear(x, np.ones((3, 4), np.float32), residual=np.zeros((2, 5, 5, 3))),
    "patch_embed weight": lambda ops, x: ops.patch_embed(x.transpose(0, 3, 1, 2), np.ones((3, 4, 5, 5))),
    "attention bias": lambda ops, x: ops.scaled_dot_product_attention(x, x, x, 0.5, np.zeros((5, 5, 5))),
    "conv2d weight": lambda ops, x: ops.conv2d(x, np.ones((2, 4, 3, 3)), padding=1),
    "conv2d bias": lambda ops, x: ops.conv2d(x, np.ones((2, 4, 1, 1), np.float32), np.zeros(2)),
    "conv2d scale": lambda ops, x: ops.conv2d(x, np.ones((4, 1, 3, 3), np.float32), groups=4, scale=np.ones(4)),
    "window_reverse residual": lambda ops, x: ops.window_reverse(x.reshape(2, 25, 4), (5, 5), 5, 5,
                                                                 residual=np.zeros((2, 5, 5, 4))),
}


@pytest.mark.parametrize("name", DTYPE_MISMATCHES)
@pytest.mark.parametrize("ops", [reference, fast], ids=["reference", "fast"])
def test_a_parameter_of_another_dtype_is_refused(ops, name):
    # an op's arrays share one dtype, which its result keeps: a float64 parameter is an error, not a silent cast
    x = np.ones((2, 5, 5, 4), np.float32)
    with pytest.raises(ValueError, match="float64"):  # the message names the parameter's dtype
        DTYPE_MISMATCHES[name](ops, x)


@pytest.mark.parametrize("ops", [reference, fast], ids=["reference", "fast"])
def test_arguments_that_do_not_fit_are_refused(ops):
    x = np.zeros((1, 5, 5, 4), np.float32)
    for call, message in [
        (lambda: ops.gelu(x, approximate="sigmoid"), "approximate must be 'none' or 'tanh'"),
        (lambda: ops.linear(x, np.zeros((3, 4), np.float32), act="relu"), "unknown activation 'relu'"),
        (lambda: ops.linear(x, np.zeros((3, 5), np.float32)), "input has 4 features on its last axis"),
        (lambda: ops.conv2d(x, np.zeros((6, 2, 3, 3), np.float32), groups=2), "groups=2"),
        (lambda: ops.conv2d(x, np.zeros((2, 4, 7, 7), np.float32)), "a 7x7 kernel does not fit a 5x5 map padded by 0"),
        (lambda: ops.window_partition(x[0], (2, 2)), r"\(B, H, W, C\)"),
    ]:
        with pytest.raises(ValueError, match=message):
            call()


def test_a_weight_is_packed_once_made_read_only_and_forgotten_with_it():
    weight = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32)
    first = fast.packed(weight)
    assert fast.packed(weight) is first and not weight.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        weight[0, 0] = 1.0  # the packed copy would not see it
    assert fast.packed(weight.copy()) is not first  # another array: packed on its own
    key = (id(weight), "rows")
    assert key in fast._packed
    del weight, first
    gc.collect()
    assert key not in fast._packed


def test_a_changed_weight_array_is_used_after_load():
    # a layer given a new weight array (load_state_dict) runs on it, not on the packed copy of the one before
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 3)).astype(np.float32)
    linear = layers.Linear(3, 5).set_backend("fast")
    for _ in range(2):
        linear._parameters["weight"] = rng.standard_normal((5, 3)).astype(np.float32)
        assert_close(linear(x), reference.linear(x, linear.weight, linear.bias), "kernel")
