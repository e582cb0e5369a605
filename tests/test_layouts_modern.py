"""DINOv2, CLIP and SigLIP checkpoint layouts (vitnp/layouts/dinov2.py, clip.py): each source model is built with
random weights (oracles.randomise_) in its own code, saved the way its users save it, converted, and compared with
the source model's own output twice: the converted weights loaded into timm's VisionTransformer built from the
config the layout derived (the mapping and the config, checked against timm), and ``vitnp.create_model(name,
weights=...)`` on both backends in float32 and float64.

Sources: transformers' Dinov2Model, Dinov2WithRegistersModel, CLIPVisionModel(WithProjection), CLIPModel,
SiglipVisionModel; the facebookresearch/dinov2 hub model and the OpenAI CLIP image tower, written below from their
published architecture with their key names (and open_clip's own, where it is installed).
"""

from collections import OrderedDict
from functools import partial

import numpy as np
import pytest
from oracles import BACKENDS, NoTorchNN, images, in_dtype, needs, numpy_state, optional_import, randomise_
from tolerances import assert_close

import vitnp
from vitnp import layouts, registry
from vitnp.cli import main

torch = optional_import("torch")
timm = optional_import("timm")
transformers = optional_import("transformers")
nn = torch.nn if torch else NoTorchNN
needs_hf = needs("torch", "timm", "transformers")
needs_timm = needs("torch", "timm")

DIM, DEPTH, HEADS, PATCH = 64, 2, 4, 14
IMG = 3 * PATCH  # a 3 x 3 grid
SIZES = dict(embed_dim=DIM, depth=DEPTH, num_heads=HEADS)  # what a name gives where no config.json does


# ---------------------------------------------------------------------------------------------------------------------
# Sources without a package: the facebookresearch/dinov2 hub model and the OpenAI CLIP image tower, by their names
# ---------------------------------------------------------------------------------------------------------------------


class DinoAttention(nn.Module):
    """DINOv2's ``Attention``: fused qkv (rows q | k | v), softmax(q k^T * scale) v, proj."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)  # (3, B, h, N, hd)
        q, k, v = qkv[0] * (C // self.heads) ** -0.5, qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class DinoLayerScale(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), 1e-5))

    def forward(self, x):
        return x * self.gamma


class DinoMlp(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class DinoSwiGLU(nn.Module):
    """DINOv2's ``SwiGLUFFNFused`` (the giant's MLP): hidden width 2/3 of 4 * dim rounded up to 8; w12 gives x1 | x2,
    out = w3(silu(x1) * x2)."""

    def __init__(self, dim):
        super().__init__()
        hidden = (int(4 * dim * 2 / 3) + 7) // 8 * 8
        self.w12, self.w3 = nn.Linear(dim, 2 * hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(nn.functional.silu(x1) * x2)


class DinoBlock(nn.Module):
    def __init__(self, dim, heads, swiglu):
        super().__init__()
        self.norm1, self.attn, self.ls1 = nn.LayerNorm(dim, eps=1e-6), DinoAttention(dim, heads), DinoLayerScale(dim)
        self.norm2, self.ls2 = nn.LayerNorm(dim, eps=1e-6), DinoLayerScale(dim)
        self.mlp = DinoSwiGLU(dim) if swiglu else DinoMlp(dim)

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DinoBlockChunk(nn.Module):
    """DINOv2's ``BlockChunk``: blocks i .. i + n - 1 of the model as children ``i`` .. (the earlier indices are
    identities in DINOv2, without parameters, left out here)."""

    def __init__(self, first, blocks):
        super().__init__()
        for i, block in enumerate(blocks, start=first):
            self.add_module(str(i), block)

    def forward(self, x):
        for block in self.children():
            x = block(x)
        return x


class DinoV2Hub(nn.Module):
    """facebookresearch/dinov2 ``DinoVisionTransformer`` at its trained image size: [cls, registers, patches], the
    position embedding added to cls and patches before the registers go in; ``block_chunks`` > 0 groups the blocks
    as the training code does (``blocks.<chunk>.<i>``, earlier indices held by identities)."""

    def __init__(self, registers=0, swiglu=False, block_chunks=0, dim=DIM, depth=DEPTH, heads=HEADS):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, PATCH, PATCH)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + (IMG // PATCH) ** 2, dim))
        self.register_tokens = nn.Parameter(torch.zeros(1, registers, dim)) if registers else None
        self.mask_token = nn.Parameter(torch.zeros(1, dim))
        blocks = [DinoBlock(dim, heads, swiglu) for _ in range(depth)]
        if block_chunks:
            size = depth // block_chunks
            self.blocks = nn.ModuleList(DinoBlockChunk(i, blocks[i:i + size]) for i in range(0, depth, size))
        else:
            self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x):
        """(B, 3, H, W) -> the normed tokens (B, 1 + registers + N, D)."""
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)  # (B, N, D)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        if self.register_tokens is not None:
            x = torch.cat([x[:, :1], self.register_tokens.expand(x.shape[0], -1, -1), x[:, 1:]], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class ClipResidualBlock(nn.Module):
    """OpenAI CLIP's ``ResidualAttentionBlock``: nn.MultiheadAttention on (N, B, D), QuickGELU MLP c_fc / c_proj."""

    def __init__(self, width, heads):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict(
            [("c_fc", nn.Linear(width, 4 * width)), ("gelu", QuickGELU()), ("c_proj", nn.Linear(4 * width, width))]
        ))

    def forward(self, x):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class ClipTransformer(nn.Module):
    def __init__(self, width, layers, heads):
        super().__init__()
        self.resblocks = nn.Sequential(*[ClipResidualBlock(width, heads) for _ in range(layers)])

    def forward(self, x):
        return self.resblocks(x)


class OpenAIClipVisual(nn.Module):
    """OpenAI CLIP ``VisionTransformer``: ``ln_post`` on the class token, then ``@ proj``."""

    def __init__(self, width=DIM, layers=DEPTH, heads=HEADS, output_dim=24):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, PATCH, PATCH, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(width))
        self.positional_embedding = nn.Parameter(torch.zeros(1 + (IMG // PATCH) ** 2, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = ClipTransformer(width, layers, heads)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.zeros(width, output_dim))

    def forward(self, x):
        x = self.conv1(x).flatten(2).permute(0, 2, 1)  # (B, N, D)
        cls = self.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype)
        x = self.ln_pre(torch.cat([cls, x], dim=1) + self.positional_embedding)
        x = self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)  # blocks on (N, B, D)
        return self.ln_post(x[:, 0, :]) @ self.proj


class OpenAIClip(nn.Module):
    """A whole OpenAI CLIP model's state_dict: the image tower under ``visual.`` beside a (small) text tower."""

    def __init__(self):
        super().__init__()
        self.visual = OpenAIClipVisual()
        self.transformer = ClipTransformer(32, 1, 2)
        self.token_embedding = nn.Embedding(10, 32)
        self.positional_embedding = nn.Parameter(torch.zeros(5, 32))
        self.ln_final = nn.LayerNorm(32)
        self.text_projection = nn.Parameter(torch.zeros(32, 24))
        self.logit_scale = nn.Parameter(torch.ones([]))

    def encode_image(self, x):
        return self.visual(x)


# ---------------------------------------------------------------------------------------------------------------------
# Sources from transformers
# ---------------------------------------------------------------------------------------------------------------------

_HF_SIZES = dict(hidden_size=DIM, num_hidden_layers=DEPTH, num_attention_heads=HEADS, image_size=IMG, patch_size=PATCH)


def hf_dinov2(registers=0, swiglu=False):
    if registers:
        config = transformers.Dinov2WithRegistersConfig(num_register_tokens=registers, use_swiglu_ffn=swiglu,
                                                        **_HF_SIZES)
        return randomise_(transformers.Dinov2WithRegistersModel(config).eval())
    config = transformers.Dinov2Config(use_swiglu_ffn=swiglu, mlp_ratio=3, **_HF_SIZES)
    return randomise_(transformers.Dinov2Model(config).eval())


def hf_clip(kind="CLIPVisionModelWithProjection"):
    vision = dict(intermediate_size=96, projection_dim=24, **_HF_SIZES)
    if kind == "CLIPModel":
        text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
        config = transformers.CLIPConfig(vision_config=vision, text_config=text, projection_dim=24)
    else:
        config = transformers.CLIPVisionConfig(**vision)
    return randomise_(getattr(transformers, kind)(config).eval())


def hf_siglip():
    config = transformers.SiglipVisionConfig(intermediate_size=96, **_HF_SIZES)
    return randomise_(transformers.SiglipVisionModel(config).eval())


def _hf_outputs(source, x):
    with torch.no_grad():
        out = source(pixel_values=torch.from_numpy(x))
    return {key: value.numpy() for key, value in out.items() if value is not None}


# ---------------------------------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------------------------------


def _timm_twin(config):
    """timm's VisionTransformer built from the constructor arguments a layout derived (vitnp's names -> timm's)."""
    kwargs = {k: v for k, v in config.items() if k not in ("norm_eps", "act", "mlp_layer", "pos_embed_resample")}
    kwargs["norm_layer"] = partial(nn.LayerNorm, eps=config["norm_eps"])
    kwargs["act_layer"] = config.get("act", "gelu")
    if config.get("mlp_layer") == "swiglu_packed":
        kwargs["mlp_layer"] = timm.layers.SwiGLUPacked
    return timm.models.VisionTransformer(**kwargs).eval()


def _through_timm(weights, **extra):
    """The converted weights in timm's VisionTransformer (strict load) built from the layout's config + ``extra``."""
    checkpoint = layouts.prepare(weights)
    model = _timm_twin({**checkpoint.config, **extra})
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in checkpoint.state_dict.items()}, strict=True)
    return model


def _timm_outputs(model, x):
    with torch.no_grad():
        tokens = model.forward_features(torch.from_numpy(x))
        return tokens.numpy(), model.forward_head(tokens, pre_logits=True).numpy(), model.forward_head(tokens).numpy()


def _close(actual, expected, dtype=np.float32):
    assert np.abs(expected).max() > 1e-2  # something to compare
    assert_close(actual, expected, "model", dtype)


def _save_hf(source, path):
    source.save_pretrained(path)
    return path


def _save_torch(state_dict, path):
    torch.save({k: torch.as_tensor(np.array(v)) for k, v in state_dict.items()}, path)
    return path


# ---------------------------------------------------------------------------------------------------------------------
# Detection
# ---------------------------------------------------------------------------------------------------------------------


@needs_hf
def test_each_layout_is_recognised_and_not_taken_for_another():
    sources = {
        "dinov2": [DinoV2Hub(), DinoV2Hub(registers=4, swiglu=True), DinoV2Hub(block_chunks=2)],
        "hf-dinov2": [hf_dinov2(), hf_dinov2(registers=2, swiglu=True)],
        "hf-clip": [hf_clip(), hf_clip("CLIPVisionModel"), hf_clip("CLIPModel")],
        "hf-siglip": [hf_siglip()],
        "openai-clip": [OpenAIClip(), OpenAIClipVisual()],
    }
    for name, models in sources.items():
        for model in models:
            assert layouts.detect_layout(numpy_state(model)) == name, type(model).__name__
    # timm's own DINOv2 / CLIP / SigLIP weights stay timm's
    for kwargs in (dict(reg_tokens=4, no_embed_class=True, init_values=1e-5), dict(pre_norm=True),
                   dict(class_token=False, global_pool="map")):
        timm_model = timm.models.VisionTransformer(img_size=28, patch_size=14, embed_dim=32, depth=1, num_heads=2,
                                                   **kwargs)
        assert layouts.detect_layout(numpy_state(timm_model)) == "timm-vit"


@needs_timm
def test_timm_weights_of_each_dinov2_clip_siglip_name_fit_that_name():
    """The architecture read from timm's weights (registers, no_embed_class, norm_pre, SwiGLU, the MAP head, an MLP
    ratio like 8192 / 1536) names the registered name they come from (`vitnp inspect`'s "fits")."""
    names = vitnp.list_models("dinov2") + vitnp.list_models("clip") + vitnp.list_models("siglip")
    assert len(names) >= 18
    candidates = registry.family_tables("VisionTransformer")
    for name in names:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False)
        shapes = {k: np.broadcast_to(np.float32(0), tuple(v.shape)) for k, v in model.state_dict().items()}
        assert name in layouts.guess_models(layouts.from_raw(shapes), candidates), name


@needs_hf
def test_hf_layouts_both_key_sets(tmp_path):
    """Hub files (save_pretrained) and the 5.x state_dict names convert to the same timm weights."""
    for source in (hf_dinov2(), hf_dinov2(registers=2, swiglu=True), hf_dinov2(swiglu=True), hf_clip(), hf_siglip()):
        folder = _save_hf(source, tmp_path / type(source).__name__ / str(len(source.state_dict())))
        from_hub = layouts.prepare(folder).state_dict
        from_memory = layouts.to_timm(numpy_state(source))
        assert sorted(from_hub) == sorted(from_memory)
        for key, value in from_hub.items():
            np.testing.assert_array_equal(value, from_memory[key], err_msg=key)


# ---------------------------------------------------------------------------------------------------------------------
# Against the source, through timm (the mapping and the derived config) and through vitnp (both backends, f32 / f64)
# ---------------------------------------------------------------------------------------------------------------------


def _vitnp_outputs(name, weights, dtype, backend, **overrides):
    model = vitnp.create_model(name, weights=weights, dtype=dtype, backend=backend, **overrides)
    x = images((2, 3, IMG, IMG), dtype=dtype)
    tokens = model.forward_features(x)
    return model, tokens, model.forward_head(tokens, pre_logits=True), model(x)


def _hf_folder_against_source(source, folder, name):
    """The folder's weights against the HF model's last_hidden_state (the normed tokens) and pooler_output: through
    timm, then through vitnp (both backends, float32 and float64). Returns the last vitnp model."""
    x = images((2, 3, IMG, IMG))
    expected = _hf_outputs(source, x)
    tokens, pooled, _ = _timm_outputs(_through_timm(folder), x)
    _close(tokens, expected["last_hidden_state"])
    _close(pooled, expected["pooler_output"])
    for dtype in (np.float32, np.float64):
        expected = _hf_outputs(in_dtype(source, dtype), images((2, 3, IMG, IMG), dtype=dtype))
        for backend in BACKENDS:
            model, tokens, _, out = _vitnp_outputs(name, folder, dtype, backend)
            assert out.dtype == dtype
            _close(tokens, expected["last_hidden_state"], dtype)
            _close(out, expected["pooler_output"], dtype)
    return model


@needs_hf
@pytest.mark.parametrize("registers, swiglu", [(0, False), (4, False), (0, True), (2, True)])
def test_hf_dinov2_folder(tmp_path, registers, swiglu):
    """A save_pretrained folder: config.json gives the sizes and heads; the tokens are [cls, registers, patches],
    pooler_output the class token. Read as a dict (no config.json), the name gives the sizes."""
    source = hf_dinov2(registers, swiglu)
    folder = _save_hf(source, tmp_path / "dinov2")
    name = "vit_small_patch14_reg4_dinov2" if registers else "vit_small_patch14_dinov2"
    model = _hf_folder_against_source(source, folder, name)
    assert model.weights_origin == "hf-dinov2" and model.cfg.reg_tokens == registers
    x = images((2, 3, IMG, IMG))
    without_config = vitnp.create_model(name, weights=vitnp.load_weights(folder), **SIZES)
    _close(without_config(x), _hf_outputs(source, x)["pooler_output"])


@needs_hf
def test_an_mlp_width_whose_ratio_no_float_gives(tmp_path):
    """embed_dim 44, MLP width 60: int(44 * (60 / 44)) is 59; the ratio the layout derives gives back 60."""
    config = transformers.SiglipVisionConfig(hidden_size=44, intermediate_size=60, num_hidden_layers=1,
                                             num_attention_heads=4, image_size=28, patch_size=14)
    source = randomise_(transformers.SiglipVisionModel(config).eval())
    folder = _save_hf(source, tmp_path / "siglip")
    x = images((2, 3, 28, 28))
    model = vitnp.create_model("vit_base_patch16_siglip_224", weights=folder)
    assert int(44 * (60 / 44)) == 59 and int(44 * model.cfg.mlp_ratio) == 60
    _close(model(x), _hf_outputs(source, x)["pooler_output"])


@needs_hf
@pytest.mark.parametrize("registers, swiglu, block_chunks", [(0, False, 0), (4, False, 2), (0, True, 0), (4, True, 2)])
def test_dinov2_hub_checkpoint(tmp_path, registers, swiglu, block_chunks):
    source = randomise_(DinoV2Hub(registers, swiglu, block_chunks).eval())
    path = _save_torch(numpy_state(source), tmp_path / "dinov2.pth")
    x = images((2, 3, IMG, IMG))
    with torch.no_grad():
        expected = source(torch.from_numpy(x)).numpy()
    tokens, pooled, _ = _timm_outputs(_through_timm(path, **SIZES), x)
    _close(tokens, expected)
    _close(pooled, expected[:, 0])
    name = "vit_small_patch14_reg4_dinov2" if registers else "vit_small_patch14_dinov2"
    for dtype in (np.float32, np.float64):
        x = images((2, 3, IMG, IMG), dtype=dtype)
        with torch.no_grad():
            expected = in_dtype(source, dtype)(torch.from_numpy(x)).numpy()
        for backend in BACKENDS:
            model, tokens, _, out = _vitnp_outputs(name, path, dtype, backend, **SIZES)
            assert model.weights_origin == "dinov2"
            _close(tokens, expected, dtype)
            _close(out, expected[:, 0], dtype)


@needs_hf
def test_dinov2_training_checkpoint_keeps_the_dinov2_resampler(tmp_path):
    """A DINOv2 training checkpoint ({'teacher': {'backbone.*', heads}}) is unwrapped like DINO's, but keeps the
    DINOv2 resampler (not DINO's)."""
    source = randomise_(DinoV2Hub(registers=0, block_chunks=2).eval())
    nested = {f"teacher.backbone.{k}": v for k, v in numpy_state(source).items()}
    nested["teacher.dino_head.mlp.0.weight"] = np.zeros((3, DIM), np.float32)
    checkpoint = layouts.prepare(nested)
    assert checkpoint.layout.name == "dinov2" and checkpoint.config["pos_embed_resample"] == "dinov2"


@needs_hf
@pytest.mark.parametrize("kind", ["CLIPVisionModelWithProjection", "CLIPVisionModel", "CLIPModel"])
def test_hf_clip_folder(tmp_path, kind):
    """CLIP's image tower: quick_gelu and eps 1e-5 from config.json, norm_pre, the projection as the head (zero
    bias); a CLIPModel folder's text tower is left out."""
    source = hf_clip(kind)
    folder = _save_hf(source, tmp_path / "clip")
    x = images((2, 3, IMG, IMG))

    def expected_of(model, x):
        """The normed class token (pooler_output) and, with a projection, the image embedding."""
        with torch.no_grad():
            pooled = getattr(model, "vision_model", model)(pixel_values=torch.from_numpy(x)).pooler_output
            projected = model.visual_projection(pooled) if hasattr(model, "visual_projection") else pooled
        if kind == "CLIPVisionModelWithProjection":
            np.testing.assert_array_equal(projected.numpy(), _hf_outputs(model, x)["image_embeds"])
        return pooled.numpy(), projected.numpy()

    pooled_expected, out_expected = expected_of(source, x)
    _, pooled, out = _timm_outputs(_through_timm(folder), x)
    _close(pooled, pooled_expected)
    _close(out, out_expected)
    checkpoint = layouts.prepare(folder)
    assert checkpoint.config["act"] == "quick_gelu" and checkpoint.config["norm_eps"] == 1e-5
    assert not any(key.startswith(("text", "logit")) for key in checkpoint.state_dict)
    for dtype in (np.float32, np.float64):
        pooled_expected, out_expected = expected_of(in_dtype(source, dtype), images((2, 3, IMG, IMG), dtype=dtype))
        for backend in BACKENDS:
            model, _, pooled, out = _vitnp_outputs("vit_base_patch16_clip_224", folder, dtype, backend)
            assert model.cfg.pre_norm and model.cfg.act == "quick_gelu"
            _close(pooled, pooled_expected, dtype)
            _close(out, out_expected, dtype)


@needs_hf
def test_hf_siglip_folder(tmp_path):
    """SigLIP's image tower: no class token, gelu_tanh from config.json, the attention-pool head as attn_pool."""
    source = hf_siglip()
    model = _hf_folder_against_source(source, _save_hf(source, tmp_path / "siglip"), "vit_base_patch16_siglip_224")
    assert model.cfg.global_pool == "map" and model.cfg.act == "gelu_tanh" and not model.cfg.class_token


@needs_hf
def test_openai_clip_state_dict(tmp_path):
    """The OpenAI CLIP state_dict (visual.* beside the text tower); QuickGELU comes with the *_quickgelu_* name."""
    source = randomise_(OpenAIClip().eval())
    path = _save_torch(numpy_state(source), tmp_path / "clip.pt")
    x = images((2, 3, IMG, IMG))
    with torch.no_grad():
        expected = source.encode_image(torch.from_numpy(x)).numpy()
    _, _, out = _timm_outputs(_through_timm(path, act="quick_gelu", **SIZES), x)
    _close(out, expected)
    for dtype in (np.float32, np.float64):
        x = images((2, 3, IMG, IMG), dtype=dtype)
        with torch.no_grad():
            expected = in_dtype(source, dtype).encode_image(torch.from_numpy(x)).numpy()
        for backend in BACKENDS:
            model, _, _, out = _vitnp_outputs("vit_base_patch16_clip_quickgelu_224", path, dtype, backend, **SIZES)
            assert model.weights_origin == "openai-clip" and model.num_classes == 24
            _close(out, expected, dtype)
    x = images((2, 3, IMG, IMG))
    tower_only = vitnp.create_model("vit_base_patch16_clip_quickgelu_224", weights=numpy_state(source.visual), **SIZES)
    _close(tower_only(x), expected)  # model.visual.state_dict(): the same names without 'visual.'
    gelu = vitnp.create_model("vit_base_patch16_clip_224", weights=path, **SIZES)  # timm's non-quickgelu name
    assert np.abs(gelu(x) - expected).max() > 1e-2


@needs("torch", "timm", "open_clip")
@pytest.mark.parametrize("ls_init_value, qk_norm", [(None, False), (0.1, True)])
def test_open_clip_vision_transformer(tmp_path, ls_init_value, qk_norm):
    """open_clip's own VisionTransformer (its LayerScale ls_1 / ls_2 and qk_norm ln_q / ln_k too), GELU as its LAION
    models use."""
    import open_clip.transformer as oc

    source = randomise_(oc.VisionTransformer(image_size=IMG, patch_size=PATCH, width=DIM, layers=DEPTH, heads=HEADS,
                                             mlp_ratio=4.0, ls_init_value=ls_init_value, qk_norm=qk_norm,
                                             output_dim=24).eval())
    state = {f"visual.{k}": v for k, v in numpy_state(source).items()}
    path = _save_torch(state, tmp_path / "open_clip.pt")
    x = images((2, 3, IMG, IMG))
    with torch.no_grad():
        expected = source(torch.from_numpy(x)).numpy()
    _, _, out = _timm_outputs(_through_timm(path, **SIZES), x)
    _close(out, expected)
    model = vitnp.create_model("vit_base_patch16_clip_224", weights=path, **SIZES)
    assert (model.cfg.init_values is not None, model.cfg.qk_norm) == (ls_init_value is not None, qk_norm)
    _close(model(x), expected)


@needs_hf
@pytest.mark.parametrize("source_of, name, resampler", [
    (hf_dinov2, "vit_small_patch14_dinov2", "hf-dinov2"),
    (partial(hf_dinov2, registers=4), "vit_small_patch14_reg4_dinov2", "dinov2-reg"),
    (hf_clip, "vit_base_patch16_clip_224", "hf"),
    (hf_siglip, "vit_base_patch16_siglip_224", "hf"),
])
def test_hf_folders_at_another_image_size(tmp_path, source_of, name, resampler):
    """Another image size (3 x 5 patches for 3 x 3): the position embedding resampled as the folder's HF model does
    it (Dinov2 always; CLIP / SigLIP with ``interpolate_pos_encoding=True``), the resampler chosen by the layout."""
    source = source_of()
    folder = _save_hf(source, tmp_path / "hf")
    x = images((2, 3, 3 * PATCH, 5 * PATCH))
    with torch.no_grad():
        kwargs = {} if "dinov2" in name else dict(interpolate_pos_encoding=True)
        expected = source(pixel_values=torch.from_numpy(x), **kwargs)
    expected = expected.image_embeds if "clip" in name else expected.pooler_output
    for backend in BACKENDS:
        model = vitnp.create_model(name, weights=folder, backend=backend)
        assert model.cfg.pos_embed_resample == resampler
        _close(model(x), expected.numpy())


# ---------------------------------------------------------------------------------------------------------------------
# What each conversion step is for: dropping it changes the output visibly
# ---------------------------------------------------------------------------------------------------------------------


@needs_hf
def test_register_fold_and_siglip_split_matter():
    """The class token's position folded in (DINOv2 with registers) and SigLIP's in_proj split q | kv: undoing
    either moves the output by far more than the tolerance."""
    source = randomise_(DinoV2Hub(registers=4).eval())
    x = images((2, 3, IMG, IMG))
    converted = layouts.to_timm(numpy_state(source))
    config = dict(layouts.prepare(numpy_state(source)).config, **SIZES)
    unfolded = dict(converted, cls_token=numpy_state(source)["cls_token"])
    outputs = []
    for state in (converted, unfolded):
        model = _timm_twin(config)
        model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()})
        outputs.append(_timm_outputs(model, x)[0])
    assert np.abs(outputs[0] - outputs[1]).max() > 1e-2

    source = hf_siglip()
    checkpoint = layouts.prepare(numpy_state(source))
    swapped = dict(checkpoint.state_dict)
    kv = swapped["attn_pool.kv.weight"]
    swapped["attn_pool.kv.weight"] = np.concatenate([kv[DIM:], kv[:DIM]])  # v | k
    outputs = []
    for state in (checkpoint.state_dict, swapped):
        model = _timm_twin({**checkpoint.config, **SIZES})
        model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()})
        outputs.append(_timm_outputs(model, x)[1])
    assert np.abs(outputs[0] - outputs[1]).max() > 1e-2


@needs_hf
def test_missing_tensors_and_bad_config_json_are_clear_errors(tmp_path):
    """A tensor missing from a recognised layout is the strict load's error naming it (no KeyError from the
    converter); a config.json field of the wrong type is a LayoutError naming the file and the field."""
    for source, name, missing in ((OpenAIClip(), "vit_base_patch16_clip_224", "visual.positional_embedding"),
                                  (hf_siglip(), "vit_base_patch16_siglip_224", "embeddings.position_embedding.weight"),
                                  (DinoV2Hub(registers=4), "vit_small_patch14_reg4_dinov2", "blocks.1.mlp.fc1.weight")):
        state = numpy_state(source)
        del state[missing]
        with pytest.raises(vitnp.WeightsError, match="missing"):
            vitnp.create_model(name, weights=state, **SIZES)
    source = hf_clip("CLIPModel")
    folder = _save_hf(source, tmp_path / "clip")
    config = (folder / "config.json").read_text()
    (folder / "config.json").write_text(config.replace('"num_attention_heads": 4', '"num_attention_heads": "four"'))
    with pytest.raises(vitnp.LayoutError, match="num_attention_heads"):
        vitnp.create_model("vit_base_patch16_clip_224", weights=folder)


# ---------------------------------------------------------------------------------------------------------------------
# vitnp inspect / vitnp export
# ---------------------------------------------------------------------------------------------------------------------


@needs_hf
def test_inspect_names_the_layout_and_export_converts(tmp_path, capsys):
    source = hf_dinov2(registers=4)
    folder = _save_hf(source, tmp_path / "dinov2")
    info = layouts.describe(folder, registry.family_tables)
    assert info["layout"] == "hf-dinov2" and info["config"]["reg_tokens"] == 4
    assert main(["inspect", str(folder)]) == 0
    assert "hf-dinov2" in capsys.readouterr().out
    out = tmp_path / "dinov2.npz"
    assert main(["export", str(folder), "-o", str(out), "--model", "vit_small_patch14_reg4_dinov2"]) == 0
    capsys.readouterr()
    x = images((2, 3, IMG, IMG))
    model = vitnp.create_model("vit_small_patch14_reg4_dinov2", weights=out)
    _close(model.forward_features(x), _hf_outputs(source, x)["last_hidden_state"])

    for name, save in (("openai-clip", lambda p: _save_torch(numpy_state(randomise_(OpenAIClip())), p / "c.pt")),
                       ("hf-siglip", lambda p: _save_hf(hf_siglip(), p / "siglip")),
                       ("dinov2", lambda p: _save_torch(numpy_state(randomise_(DinoV2Hub(4, True))), p / "d.pth"))):
        assert layouts.describe(save(tmp_path), registry.family_tables)["layout"] == name
