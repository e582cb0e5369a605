"""``vitnp verify`` and ``forward_trace``: a reference exported from timm (forward hooks written here) passes, a
deliberately perturbed one fails at the perturbed layer, and the in-process torch mode agrees."""

import numpy as np
import pytest

import vitnp
from vitnp import cli
from vitnp.weights import save_npz
from tolerances import assert_close

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

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


def test_verify_passes_on_the_true_reference(setup, capsys):
    dtype, weights, x, expected, folder = setup
    path = folder / "good.npz"
    np.savez(path, input=x, **expected)
    assert _verify(dtype, weights, path) == 0
    out = capsys.readouterr().out
    assert "OK: 14 layers" in out and "blocks.2.mlp" in out and "FAIL" not in out


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


def test_verify_torch_mode(setup, capsys):
    dtype, weights, *_ = setup
    status = cli.main(["verify", "--model", "vit_tiny_patch16_224", "--weights", str(weights), "--torch",
                       "--dtype", np.dtype(dtype).name])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "OK: 14 layers" in out


def test_verify_torch_mode_other_size(setup, capsys):
    dtype, weights, *_ = setup
    if dtype == np.float64:
        pytest.skip("timm resamples position embeddings in float32: a float64 comparison at another size cannot hold")
    assert cli.main(["verify", "--model", "vit_tiny_patch16_224", "--weights", str(weights), "--torch",
                     "--image-size", "48"]) == 0
    assert "OK" in capsys.readouterr().out


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


def test_verify_torch_mode_of_swin_and_mobilevit(other_family, capsys):
    name, _, _, _, weights = other_family
    assert cli.main(["verify", "--model", name, "--weights", str(weights), "--torch"]) == 0
    out = capsys.readouterr().out
    assert "OK:" in out and "FAIL" not in out
    assert ("layers.1.downsample" if name.startswith("swin") else "stages.4.1") in out


def test_verify_torch_mode_refuses_swin_at_another_size(tmp_path, capsys):
    name = "swin_tiny_patch4_window7_224"
    arch = OTHER_FAMILIES[name]
    weights = tmp_path / "swin.npz"
    save_npz(weights, vitnp.create_model(name, **arch).state_dict(), dict(arch))
    assert cli.main(["verify", "--model", name, "--weights", str(weights), "--torch", "--image-size", "96"]) == 1
    assert "built for one image size" in capsys.readouterr().err
