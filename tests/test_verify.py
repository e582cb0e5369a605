"""``vitnp verify`` and ``forward_trace``: a reference exported from timm (forward hooks written here) passes, a
deliberately perturbed one fails at the perturbed layer, and the in-process torch mode agrees; the notes' and
lucidrains' ViTs trace as their PyTorch code steps; the torch-free mode that checks the fast backend against the
reference backend passes for every family and fails, at the first broken layer, when a fast op is broken."""

import numpy as np
import pytest
from tolerances import assert_close

import vitnp
import vitnp.fast.ops as fast_ops
from vitnp import cli
from vitnp.demo import MODEL_NAME as DIGITS
from vitnp.demo import WEIGHTS_PATH as DIGITS_WEIGHTS
from vitnp.verify import compare_backends
from vitnp.weights import save_npz

try:  # the oracle: the tests of the torch-free backend comparison run without it
    import timm
    import torch
except ImportError:
    torch = timm = None
needs_torch = pytest.mark.skipif(torch is None, reason="needs torch and timm, the oracle")

ARCH = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=4)


def _timm_trace(reference, x):
    """timm's intermediates under vitnp's trace names, by forward hooks on timm's own modules."""
    outputs = {}

    def keep(name):
        return lambda module, inputs, output: outputs.__setitem__(name, output.detach().numpy().copy())

    reference.patch_embed.register_forward_hook(keep("patch_embed"))
    reference.pos_drop.register_forward_hook(keep("pos_embed"))
    for i, block in enumerate(reference.blocks):
        block.attn.register_forward_hook(keep(f"blocks.{i}.attn"))
        block.mlp.register_forward_hook(keep(f"blocks.{i}.mlp"))
        block.register_forward_hook(keep(f"blocks.{i}"))
    reference.norm.register_forward_hook(keep("norm"))
    with torch.no_grad():
        outputs["logits"] = reference(torch.from_numpy(x)).numpy()
        outputs["pre_logits"] = reference.forward_head(torch.from_numpy(outputs["norm"]), pre_logits=True).numpy()
    return outputs


@pytest.fixture(scope="module", params=[np.float32, np.float64], ids=["float32", "float64"])
def setup(request, tmp_path_factory):
    dtype = request.param
    folder = tmp_path_factory.mktemp("verify")
    torch.manual_seed(0)
    reference = timm.create_model("vit_tiny_patch16_224", num_classes=10, **ARCH).eval()
    reference = reference.to(torch.float64 if dtype == np.float64 else torch.float32)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    weights = folder / "weights.npz"
    save_npz(weights, {k: v.numpy() for k, v in reference.state_dict().items()}, dict(ARCH))
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(dtype)
    return dtype, weights, x, _timm_trace(reference, x), folder


@needs_torch
def test_forward_trace_equals_timm_layer_by_layer(setup):
    dtype, weights, x, expected, _ = setup
    model = vitnp.create_model("vit_tiny_patch16_224", weights=weights, dtype=dtype)
    trace = model.forward_trace(x)
    assert set(trace) == set(expected)
    for name in trace:
        assert trace[name].dtype == dtype, name
        assert_close(trace[name], expected[name], "model")


def _verify(dtype, weights, reference):
    return cli.main(["verify", "--model", "vit_tiny_patch16_224", "--weights", str(weights), "--reference",
                     str(reference), "--dtype", np.dtype(dtype).name])


@needs_torch
def test_verify_passes_on_the_true_reference(setup, capsys):
    dtype, weights, x, expected, folder = setup
    path = folder / "good.npz"
    np.savez(path, input=x, **expected)
    assert _verify(dtype, weights, path) == 0
    out = capsys.readouterr().out
    assert "OK: 14 layers" in out and "blocks.2.mlp" in out and "FAIL" not in out


@needs_torch
def test_verify_names_the_first_perturbed_layer(setup, capsys):
    dtype, weights, x, expected, folder = setup
    perturbed = dict(expected)
    # a bug in block 1's MLP: its output and everything after it are off
    names = list(vitnp.create_model("vit_tiny_patch16_224", weights=weights).forward_trace(x[:1]))
    for name in names[names.index("blocks.1.mlp"):]:
        perturbed[name] = expected[name] * (1 + 1e-3) + 1e-3
    path = folder / "bad.npz"
    np.savez(path, input=x, **perturbed)
    assert _verify(dtype, weights, path) == 1
    out = capsys.readouterr().out
    assert "first layer out of tolerance: blocks.1.mlp" in out
    row = next(line for line in out.splitlines() if line.startswith("blocks.1.attn "))
    assert row.endswith("ok")


@needs_torch
def test_verify_torch_mode(setup, capsys):
    dtype, weights, *_ = setup
    status = cli.main(["verify", "--model", "vit_tiny_patch16_224", "--weights", str(weights), "--torch",
                       "--dtype", np.dtype(dtype).name])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "OK: 14 layers" in out


@needs_torch
def test_verify_torch_mode_other_size(setup, capsys):
    dtype, weights, *_ = setup
    if dtype == np.float64:
        pytest.skip("timm resamples position embeddings in float32: a float64 comparison at another size cannot hold")
    assert cli.main(["verify", "--model", "vit_tiny_patch16_224", "--weights", str(weights), "--torch",
                     "--image-size", "48"]) == 0
    assert "OK" in capsys.readouterr().out


@needs_torch
def test_verify_bad_reference(setup, capsys):
    dtype, weights, x, expected, folder = setup
    path = folder / "no_input.npz"
    np.savez(path, logits=expected["logits"])
    assert _verify(dtype, weights, path) == 1
    assert "no 'input' array" in capsys.readouterr().err


# ---- the other families: Swin and MobileViT, traced by timm's module paths -----------------------------------------

OTHER_FAMILIES = {
    "swin_tiny_patch4_window7_224": dict(img_size=64, window_size=4, depths=(2, 2), num_heads=(2, 4), embed_dim=32),
    "mobilevit_xxs": {},
}


def _timm_trace_by_paths(reference, x, names):
    """timm's outputs at the modules whose paths are ``names`` (forward hooks), plus pre-logits and logits."""
    outputs = {}
    modules = dict(reference.named_modules())
    for name in names:
        if name in modules:
            modules[name].register_forward_hook(
                lambda module, inputs, output, name=name: outputs.__setitem__(name, output.detach().numpy().copy())
            )
    with torch.no_grad():
        features = reference.forward_features(torch.from_numpy(x))
        outputs["pre_logits"] = reference.forward_head(features, pre_logits=True).numpy()
        outputs["logits"] = reference.forward_head(features).numpy()
    return outputs


@pytest.fixture(scope="module", params=list(OTHER_FAMILIES))
def other_family(request, tmp_path_factory):
    name, arch = request.param, OTHER_FAMILIES[request.param]
    torch.manual_seed(0)
    reference = timm.create_model(name, pretrained=False, num_classes=10, **arch).eval()
    with torch.no_grad():  # move BatchNorm statistics and every weight off their init values, keeping the scale
        for key, tensor in reference.state_dict().items():
            if key.endswith("running_var"):
                tensor.mul_(1 + 0.2 * torch.rand_like(tensor))
            elif tensor.is_floating_point():
                tensor.add_(0.02 * torch.randn_like(tensor))
    state = {k: v.numpy().copy() for k, v in reference.state_dict().items()}
    weights = tmp_path_factory.mktemp("verify_other") / "weights.npz"
    save_npz(weights, state, dict(arch, num_classes=10))
    return name, arch, reference, state, weights


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@needs_torch
def test_forward_trace_of_swin_and_mobilevit_equals_timm(other_family, dtype):
    name, arch, reference, state, _ = other_family
    model = vitnp.create_model(name, weights=state, dtype=dtype, num_classes=10, **arch)
    size = arch.get("img_size", 64)
    x = np.random.default_rng(1).standard_normal((2, 3, size, size)).astype(dtype)
    trace = model.forward_trace(x)
    expected = _timm_trace_by_paths(reference.to(torch.float64 if dtype == np.float64 else torch.float32), x, trace)
    assert set(trace) == set(expected)
    assert len(trace) > 6  # every block is in it
    for layer in trace:
        assert trace[layer].dtype == dtype, layer
        assert_close(trace[layer], expected[layer], "model")


@needs_torch
def test_verify_torch_mode_of_swin_and_mobilevit(other_family, capsys):
    name, _, _, _, weights = other_family
    assert cli.main(["verify", "--model", name, "--weights", str(weights), "--torch"]) == 0
    out = capsys.readouterr().out
    assert "OK:" in out and "FAIL" not in out
    assert ("layers.1.downsample" if name.startswith("swin") else "stages.4.1") in out


@needs_torch
def test_verify_torch_mode_refuses_swin_at_another_size(tmp_path, capsys):
    name = "swin_tiny_patch4_window7_224"
    arch = OTHER_FAMILIES[name]
    weights = tmp_path / "swin.npz"
    save_npz(weights, vitnp.create_model(name, **arch).state_dict(), dict(arch))
    assert cli.main(["verify", "--model", name, "--weights", str(weights), "--torch", "--image-size", "96"]) == 1
    assert "built for one image size" in capsys.readouterr().err


# ---- the notes' and lucidrains' ViTs: traced by the module paths of their PyTorch code -----------------------------


def _residual_layers(trace, layers, h):
    """The loop ``x = attn(x) + x; x = ff(x) + x`` of seed 000 and vit_pytorch, keeping each branch's output
    ('transformer.layers.{i}.0' and '.1') and each layer's ('transformer.layers.{i}')."""
    for i, (attn, ff) in enumerate(layers):
        attended = trace[f"transformer.layers.{i}.0"] = attn(h)
        h = attended + h
        fed = trace[f"transformer.layers.{i}.1"] = ff(h)
        h = trace[f"transformer.layers.{i}"] = fed + h
    return h


def _prenorm_trace(reference, x):
    """Seed 000's ``VIT.forward``, step by step, each output under its module's path."""
    trace = {}
    h = trace["patchembedding"] = reference.patchembedding(x)
    h = _residual_layers(trace, reference.transformer.layers, h)
    pooled = h.mean(dim=1) if reference.pool == "mean" else h[:, 0]
    trace["mlp_head.0"] = trace["pre_logits"] = reference.mlp_head[0](pooled)
    trace["logits"] = reference(x)
    return trace


def _torch_encoder_trace(reference, x):
    """Seed 003's ``ViT.forward``; each ``nn.TransformerEncoderLayer`` (norm_first) by its branches, its output by
    its own forward."""
    trace = {}
    h = trace["embedding_block"] = reference.embedding_block(x)
    for i, layer in enumerate(reference.encoder_blocks.layers):
        path = f"encoder_blocks.layers.{i}"
        normed = layer.norm1(h)
        attn = trace[f"{path}.self_attn"] = layer.self_attn(normed, normed, normed, need_weights=False)[0]
        trace[f"{path}.linear2"] = layer.linear2(layer.activation(layer.linear1(layer.norm2(h + attn))))
        h = trace[path] = layer(h)
    trace["mlp_head.0"] = trace["pre_logits"] = reference.mlp_head[0](h[:, 0])
    trace["logits"] = reference(x)
    return trace


def _lucidrains_trace(reference, x):
    """``vit_pytorch.ViT.forward``, step by step, each output under its module's path."""
    trace = {}
    h = trace["to_patch_embedding"] = reference.to_patch_embedding(x)
    cls_tokens = reference.cls_token.expand(h.shape[0], *reference.cls_token.shape)
    h = torch.cat((cls_tokens, h), dim=1)
    h = trace["dropout"] = reference.dropout(h + reference.pos_embedding[: h.shape[1]])
    h = _residual_layers(trace, reference.transformer.layers, h)
    h = trace["transformer.norm"] = reference.transformer.norm(h)
    if reference.mlp_head is None:  # vit_pytorch without classes returns every token
        trace["pre_logits"] = reference(x)
    else:
        trace["pre_logits"] = reference.to_latent(h.mean(dim=1) if reference.pool == "mean" else h[:, 0])
        trace["logits"] = reference(x)
    return trace


NOTES_CASES = ["prenorm_cls", "prenorm_mean", "torch_encoder", "lucidrains_cls", "lucidrains_mean",
               "lucidrains_headless"]


def _notes_case(case):
    """(the PyTorch model, random weights, eval mode; its step-by-step trace; vitnp's name; vitnp's overrides)."""
    twins = pytest.importorskip("test_notes_vit")  # the PyTorch code of seeds 000 and 003, as the posts give it
    torch.manual_seed(0)
    family, _, variant = case.partition("_")
    if family == "prenorm":
        reference = twins.VIT(num_classes=5, img_size=16, patch_size=8, embed_dim=32, depth=2, heads=2, head_dim=16,
                              mlp_hidden_dim=48, pool=variant)
        overrides = dict(img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2, head_dim=16,
                         mlp_hidden_dim=48, pool=variant)
        return reference.eval(), _prenorm_trace, "notes_prenorm_vit_patch32_256", overrides
    if family == "torch":
        reference = twins.ViT(image_size=16, in_channels=1, embed_dim=32, patch_size=4, num_layers=1, num_heads=2,
                              num_encoders=2, num_classes=6, expansion=2, dropout=0.1)
        overrides = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2)
        return reference.eval(), _torch_encoder_trace, "notes_torch_encoder_vit_patch7_28", overrides
    vit_pytorch = pytest.importorskip("vit_pytorch")
    pool = "cls" if variant == "headless" else variant
    reference = vit_pytorch.ViT(image_size=16, patch_size=4, num_classes=0 if variant == "headless" else 5, dim=24,
                                depth=2, heads=2, mlp_dim=40, pool=pool, dim_head=8)
    overrides = dict(img_size=16, patch_size=4, embed_dim=24, depth=2, num_heads=2, head_dim=8, mlp_dim=40)
    return reference.eval(), _lucidrains_trace, "lucidrains_vit_patch32_256", overrides


@needs_torch
@pytest.mark.filterwarnings("ignore:enable_nested_tensor is True")
@pytest.mark.parametrize("case", NOTES_CASES)
def test_forward_trace_of_the_notes_models_steps_as_their_pytorch_code(case):
    reference, torch_trace, name, overrides = _notes_case(case)
    model = vitnp.create_model(name, weights={k: v.numpy() for k, v in reference.state_dict().items()}, **overrides)
    x = np.random.default_rng(0).standard_normal((2, model.in_chans, 16, 16)).astype(np.float32)
    trace = model.forward_trace(x)
    with torch.no_grad():
        expected = {layer: value.numpy() for layer, value in torch_trace(reference, torch.from_numpy(x)).items()}
    assert list(trace) == list(expected)  # the same names, in forward order
    modules = dict(reference.named_modules())
    assert [layer for layer in trace if layer not in modules] == ["pre_logits", "logits"][: 1 + bool(model.num_classes)]
    for layer in trace:
        assert_close(trace[layer], expected[layer], "model")
    assert_close(trace["logits" if model.num_classes else "pre_logits"], model(x), "model")


# ---- the torch-free mode: the fast backend against the reference backend, layer by layer ---------------------------

BACKEND_CASES = {  # a small configuration of every family
    "swin_tiny_patch4_window7_224": dict(img_size=64, window_size=4, depths=(2, 2), num_heads=(2, 4), embed_dim=32),
    "mobilevit_xxs": dict(img_size=64),
    "notes_prenorm_vit_patch32_256": dict(img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2, head_dim=16,
                                          mlp_hidden_dim=48, pool="mean"),
    "notes_torch_encoder_vit_patch7_28": dict(num_heads=2, depth=2),
    "lucidrains_vit_patch32_256": dict(img_size=16, patch_size=4, embed_dim=24, depth=2, num_heads=2, head_dim=8,
                                       mlp_dim=40),
}


def _random_weights(name, arch, path):
    """A seeded random init moved off its round values (LayerNorms at 1 / 0, zero biases, BatchNorm statistics at
    0 / 1), saved with its configuration."""
    rng = np.random.default_rng(1)
    state = {}
    for key, value in vitnp.create_model(name, seed=1, **arch).state_dict().items():
        if key.endswith("running_var"):
            value = value * (1 + 0.2 * rng.random(value.shape))
        elif np.issubdtype(value.dtype, np.floating):
            value = value + 0.02 * rng.standard_normal(value.shape)
        state[key] = value.astype(value.dtype)
    save_npz(path, state, dict(arch))
    return path


def _table_names(out):
    """The layer names of the printed table, in order."""
    lines = out.splitlines()
    return [line.split()[0] for line in lines[1:lines.index(next(line for line in lines if line.startswith("OK:")))]]


@pytest.mark.parametrize("name", [DIGITS, *BACKEND_CASES])
def test_verify_compare_backends_passes_for_every_family(name, tmp_path, capsys):
    if name == DIGITS:  # the shipped, trained ViT
        weights = DIGITS_WEIGHTS
    else:
        weights = _random_weights(name, BACKEND_CASES[name], tmp_path / "weights.npz")
    assert cli.main(["verify", "--model", name, "--weights", str(weights), "--compare-backends"]) == 0
    out = capsys.readouterr().out
    model = vitnp.create_model(name, weights=weights)
    x = np.zeros((1, model.in_chans, *model.img_size), np.float32)
    names = list(model.forward_trace(x))
    assert _table_names(out) == names  # every intermediate compared
    assert f"OK: {len(names)} layers within tolerance" in out


def test_verify_compare_backends_in_float64(capsys):
    assert cli.main(["verify", "--model", DIGITS, "--weights", str(DIGITS_WEIGHTS), "--compare-backends",
                     "--dtype", "float64"]) == 0
    # patch_embed, pos_embed, 4 blocks of 3 (attn, mlp, output), norm, pre_logits, logits
    assert "OK: 17 layers within tolerance" in capsys.readouterr().out


@pytest.mark.parametrize("name, op, first_bad", [(DIGITS, "scaled_dot_product_attention", "blocks.0.attn"),
                                                 ("mobilevit_xxs", "inverted_residual", "stages.0.0")])
def test_verify_compare_backends_fails_at_the_first_layer_a_broken_fast_op_computes(name, op, first_bad, monkeypatch,
                                                                                   capsys):
    correct = getattr(fast_ops, op)
    monkeypatch.setattr(fast_ops, op, lambda *args, **kwargs: correct(*args, **kwargs) + 1e-3)
    args = ["--weights", str(DIGITS_WEIGHTS)] if name == DIGITS else ["--image-size", "64"]
    assert cli.main(["verify", "--model", name, *args, "--compare-backends"]) == 1
    out = capsys.readouterr().out
    assert f"FAIL: first layer out of tolerance: {first_bad} (" in out
    rows = out.splitlines()[1:]
    bad = next(i for i, row in enumerate(rows) if row.startswith(f"{first_bad} "))
    assert bad > 0 and all(row.endswith(" ok") for row in rows[:bad])  # the layers before it agree
    assert rows[bad].endswith(" FAIL")


def test_compare_backends_leaves_the_model_on_its_backend():
    arch = BACKEND_CASES["notes_torch_encoder_vit_patch7_28"]
    model = vitnp.create_model("notes_torch_encoder_vit_patch7_28", backend="reference", **arch)
    rows = compare_backends(model, seed=3)
    assert model.backend == "reference" and all(row["ok"] for row in rows)
    assert [row["name"] for row in rows] == list(model.forward_trace(np.zeros((1, 1, 28, 28), np.float32)))


def test_verify_compare_backends_takes_no_backend(capsys):
    assert cli.main(["verify", "--model", DIGITS, "--compare-backends", "--backend", "fast"]) == 1
    assert "--backend goes with --reference or --torch" in capsys.readouterr().err


@needs_torch
def test_verify_torch_mode_on_the_reference_backend(setup, monkeypatch, capsys):
    from test_cli import break_the_fast_backend

    dtype, weights, *_ = setup
    break_the_fast_backend(monkeypatch)
    assert cli.main(["verify", "--model", "vit_tiny_patch16_224", "--weights", str(weights), "--torch",
                     "--dtype", np.dtype(dtype).name, "--backend", "reference"]) == 0
    assert "OK: 14 layers" in capsys.readouterr().out
