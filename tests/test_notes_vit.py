"""The notes' hand-built ViTs (seeds 000 and 003) and lucidrains vit_pytorch.ViT against their PyTorch code.

The seeds' PyTorch classes are written out below as the posts give them (dropout layers kept; they are inert in
eval mode). Each model gets random values for every parameter (``oracles.randomise_``: LayerNorm affines and biases
too), is saved with ``torch.save(model.state_dict())`` as its users do, loaded through
``vitnp.create_model(name, weights=path)`` on each backend and compared on logits; shapes and options are drawn by
Hypothesis from small configs. The registered defaults are compared in tests/test_models.py.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from oracles import BACKENDS, NoTorchNN, images, in_dtype, needs, numpy_state, optional_import, randomise_
from tolerances import assert_close

import vitnp

torch = optional_import("torch")
nn = torch.nn if torch else NoTorchNN

pytestmark = [
    needs("torch"),  # every test here compares with the posts' PyTorch code
    # nn.TransformerEncoder warns that norm_first layers cannot use its nested-tensor fast path: irrelevant here.
    pytest.mark.filterwarnings("ignore:enable_nested_tensor is True"),
]


# ---------------------------------------------------------------------------------------------------- seed 000


class PatchAndPosEmbedding(nn.Module):
    def __init__(self, img_size=256, patch_size=32, in_channels=3, embed_dim=1024, drop_out=0.):
        super(PatchAndPosEmbedding, self).__init__()
        num_patches = int((img_size / patch_size) ** 2)
        patch_size_dim = patch_size * patch_size * in_channels
        self.patch_embedding = nn.Conv2d(in_channels=in_channels, out_channels=patch_size_dim,
                                         kernel_size=patch_size, stride=patch_size)
        self.linear = nn.Linear(patch_size_dim, embed_dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, embed_dim))
        self.pos_embedding = nn.Parameter(torch.randn(1, num_patches + 1, embed_dim))
        self.dropout = nn.Dropout(drop_out)

    def forward(self, img):
        x = self.patch_embedding(img)
        x = x.flatten(2)
        x = x.transpose(2, 1)
        x = self.linear(x)
        cls_token = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls_token, x], dim=1)
        x += self.pos_embedding
        out = self.dropout(x)
        return out


class Attention(nn.Module):
    def __init__(self, dim, heads=16, head_dim=64, dropout=0.):
        super(Attention, self).__init__()
        inner_dim = heads * head_dim
        self.heads = heads
        self.scale = head_dim ** -0.5
        project_out = not (heads == 1 and head_dim == dim)
        self.to_q = nn.Linear(dim, inner_dim, bias=False)
        self.to_k = nn.Linear(dim, inner_dim, bias=False)
        self.to_v = nn.Linear(dim, inner_dim, bias=False)
        self.atten = nn.Softmax(dim=-1)
        self.dropout = nn.Dropout(dropout)
        self.to_out = nn.Sequential(nn.Linear(dim, inner_dim), nn.Dropout(dropout)) if project_out else nn.Identity()

    def forward(self, x):
        q = self.to_q(x)
        k = self.to_k(x)
        v = self.to_v(x)
        q = q.reshape(q.shape[0], q.shape[1], self.heads, -1).transpose(1, 2)
        k = k.reshape(k.shape[0], k.shape[1], self.heads, -1).transpose(1, 2)
        v = v.reshape(v.shape[0], v.shape[1], self.heads, -1).transpose(1, 2)
        dots = torch.matmul(q, k.transpose(-1, -2)) * self.scale
        atten = self.atten(dots)
        atten = self.dropout(atten)
        out = torch.matmul(atten, v)
        out = out.transpose(1, 2)
        out = out.reshape(out.shape[0], out.shape[1], -1)
        return self.to_out(out)


class MLP(nn.Module):
    def __init__(self, dim, hidden_dim, dropout=0.):
        super(MLP, self).__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden_dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, dim),
            nn.GELU(),
            nn.Dropout(dropout)
        )

    def forward(self, x):
        return self.net(x)


class PreNorm(nn.Module):
    def __init__(self, dim, fn):
        super(PreNorm, self).__init__()
        self.norm = nn.LayerNorm(dim)
        self.fn = fn

    def forward(self, x, **kwargs):
        return self.fn(self.norm(x), **kwargs)


class Transformer(nn.Module):
    def __init__(self, dim, depth, heads, head_dim, mlp_hidden_dim, dropout=0.):
        super(Transformer, self).__init__()
        self.layers = nn.ModuleList([])
        for _ in range(depth):
            self.layers.append(
                nn.ModuleList([
                    PreNorm(dim, Attention(dim, heads, head_dim, dropout=dropout)),
                    PreNorm(dim, MLP(dim, mlp_hidden_dim, dropout=dropout))
                ]))

    def forward(self, x):
        for attn, ff in self.layers:
            x = attn(x) + x
            x = ff(x) + x
        return x


class VIT(nn.Module):
    def __init__(self, num_classes=10, img_size=256, patch_size=32, in_channels=3,
                 embed_dim=1024, depth=6, heads=16, head_dim=64, mlp_hidden_dim=2048, pool='cls', dropout=0.1):
        super(VIT, self).__init__()
        assert pool in {'cls', 'mean'}, 'pool type must be either cls (cls token) or mean (mean pooling)'
        self.pool = pool
        self.patchembedding = PatchAndPosEmbedding(img_size, patch_size, in_channels, embed_dim, dropout)
        self.transformer = Transformer(embed_dim, depth, heads, head_dim, mlp_hidden_dim, dropout)
        self.to_latent = nn.Identity()
        self.mlp_head = nn.Sequential(
            nn.LayerNorm(embed_dim),
            nn.Linear(embed_dim, num_classes)
        )

    def forward(self, x):
        x = self.patchembedding(x)
        x = self.transformer(x)
        x = x.mean(dim=1) if self.pool == 'mean' else x[:, 0]
        out = self.mlp_head(x)
        return out


# ---------------------------------------------------------------------------------------------------- seed 003


class PatchEmbedding(nn.Module):
    def __init__(self, image_size, in_channels, embed_dim, patch_size, dropout):
        super().__init__()
        num_patches = (image_size // patch_size) ** 2
        self.patcher = nn.Sequential(
            nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size),
            nn.Flatten(2))
        self.cls_token = nn.Parameter(torch.randn(1, 1, embed_dim), requires_grad=True)
        self.position_embedding = nn.Parameter(torch.randn(1, num_patches + 1, embed_dim), requires_grad=True)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        cls_tokens = self.cls_token.expand(x.shape[0], -1, -1)
        x = self.patcher(x).permute(0, 2, 1)
        x = torch.cat([cls_tokens, x], dim=1)
        x = self.position_embedding + x
        x = self.dropout(x)
        return x


class ViT(nn.Module):
    def __init__(self, image_size, in_channels, embed_dim, patch_size, num_layers, num_heads, num_encoders,
                 num_classes, expansion, dropout):
        super().__init__()
        self.embedding_block = PatchEmbedding(image_size, in_channels, embed_dim, patch_size, dropout)
        encoder_layer = nn.TransformerEncoderLayer(d_model=embed_dim, nhead=num_heads, dropout=dropout,
                                                   dim_feedforward=int(embed_dim * expansion), activation="gelu",
                                                   batch_first=True, norm_first=True)
        self.encoder_blocks = nn.TransformerEncoder(encoder_layer, num_layers=num_encoders)
        self.mlp_head = nn.Sequential(
            nn.LayerNorm(embed_dim),
            nn.Linear(embed_dim, num_classes)
        )

    def forward(self, x):
        x = self.embedding_block(x)
        x = self.encoder_blocks(x)
        x = self.mlp_head(x[:, 0, :])
        return x


# ---------------------------------------------------------------------------------------------------- helpers


def _saved(tmp_path_factory, module):
    path = tmp_path_factory.mktemp("notes") / "model.pth"
    torch.save(module.state_dict(), path)
    return path


def _images(batch, chans, size, dtype=np.float32):
    return torch.from_numpy(images((batch, chans, size, size), dtype))


def _check(model, reference, x, dtype=np.float32):
    with torch.no_grad():
        expected = reference(x).numpy()
    actual = model(x.numpy())
    assert actual.dtype == dtype
    assert np.abs(expected).max() > 1e-2  # something to compare
    assert_close(actual, expected, "model", dtype)


# ---------------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=6)
@given(
    patch_size=st.sampled_from([4, 8]),
    grid=st.integers(2, 4),
    in_chans=st.sampled_from([1, 3]),
    heads=st.sampled_from([1, 2, 4]),
    depth=st.integers(1, 2),
    pool=st.sampled_from(["cls", "mean"]),
    batch=st.integers(1, 2),
)
def test_seed000_prenorm_vit_matches_its_torch_code(tmp_path_factory, patch_size, grid, in_chans, heads, depth, pool,
                                                    batch, backend):
    dim = 32  # the seed's to_out is Linear(dim, heads * head_dim): it runs only when the two are equal
    img = patch_size * grid
    reference = randomise_(VIT(num_classes=5, img_size=img, patch_size=patch_size, in_channels=in_chans,
                               embed_dim=dim, depth=depth, heads=heads, head_dim=dim // heads, mlp_hidden_dim=48,
                               pool=pool)).eval()
    path = _saved(tmp_path_factory, reference)
    model = vitnp.create_model("notes_prenorm_vit_patch32_256", weights=path, backend=backend, img_size=img,
                               patch_size=patch_size, in_chans=in_chans, embed_dim=dim, depth=depth, num_heads=heads,
                               head_dim=dim // heads, mlp_hidden_dim=48, pool=pool)
    assert model.num_classes == 5  # from the weights' mlp_head
    _check(model, reference, _images(batch, in_chans, img))


@pytest.mark.parametrize("backend", BACKENDS)
def test_seed000_float64_and_identity_to_out(backend):
    """heads=1 and head_dim=dim: the seed's to_out is Identity, and the model has no to_out keys."""
    reference = VIT(num_classes=3, img_size=16, patch_size=8, embed_dim=16, depth=2, heads=1, head_dim=16,
                    mlp_hidden_dim=24)
    reference = in_dtype(randomise_(reference, seed=1).eval(), np.float64)
    state = numpy_state(reference)
    assert not any("to_out" in k for k in state)
    model = vitnp.create_model("notes_prenorm_vit_patch32_256", weights=state, dtype=np.float64, backend=backend,
                               img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=1, head_dim=16,
                               mlp_hidden_dim=24)
    assert list(model.state_dict()) == list(state)  # same keys, in torch's order
    _check(model, reference, _images(2, 3, 16, np.float64), np.float64)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=6)
@given(
    patch_size=st.sampled_from([4, 7]),
    grid=st.integers(2, 4),
    in_chans=st.sampled_from([1, 3]),
    heads=st.sampled_from([1, 2, 4]),
    depth=st.integers(1, 2),
    expansion=st.sampled_from([2, 4]),
    batch=st.integers(1, 2),
)
def test_seed003_torch_encoder_vit_matches_its_torch_code(tmp_path_factory, patch_size, grid, in_chans, heads,
                                                          depth, expansion, batch, backend):
    img = patch_size * grid
    reference = randomise_(ViT(image_size=img, in_channels=in_chans, embed_dim=32, patch_size=patch_size,
                               num_layers=1, num_heads=heads, num_encoders=depth, num_classes=6, expansion=expansion,
                               dropout=0.1)).eval()
    path = _saved(tmp_path_factory, reference)
    model = vitnp.create_model("notes_torch_encoder_vit_patch7_28", weights=path, backend=backend, img_size=img,
                               patch_size=patch_size, in_chans=in_chans, embed_dim=32, depth=depth, num_heads=heads,
                               mlp_ratio=expansion)
    assert list(model.state_dict()) == list(reference.state_dict())
    _check(model, reference, _images(batch, in_chans, img))


def test_seed003_example_config_is_the_registry_default():
    """The registered name is the post's example: ViT(28, 1, 100, 7, 1, 1, 1, 10, 4, 0.1), loaded from the torch
    state_dict itself (tensors, not arrays)."""
    reference = randomise_(ViT(image_size=28, in_channels=1, embed_dim=100, patch_size=7, num_layers=1, num_heads=1,
                               num_encoders=1, num_classes=10, expansion=4, dropout=0.1), seed=2).eval()
    model = vitnp.create_model("notes_torch_encoder_vit_patch7_28", weights=reference.state_dict())
    _check(model, reference, _images(4, 1, 28))


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=6)
@given(
    patch_size=st.sampled_from([4, 8]),
    grid=st.integers(2, 4),
    channels=st.sampled_from([1, 3]),
    heads=st.sampled_from([1, 2, 3]),
    dim_head=st.sampled_from([8, 16]),
    depth=st.integers(1, 2),
    pool=st.sampled_from(["cls", "mean"]),
)
def test_lucidrains_vit_matches_vit_pytorch(tmp_path_factory, patch_size, grid, channels, heads, dim_head, depth,
                                            pool, backend):
    vit_pytorch = pytest.importorskip("vit_pytorch")
    img = patch_size * grid
    reference = randomise_(vit_pytorch.ViT(image_size=img, patch_size=patch_size, num_classes=5, dim=24, depth=depth,
                                           heads=heads, mlp_dim=40, pool=pool, channels=channels,
                                           dim_head=dim_head)).eval()
    path = _saved(tmp_path_factory, reference)
    model = vitnp.create_model("lucidrains_vit_patch32_256", weights=path, backend=backend, img_size=img,
                               patch_size=patch_size, in_chans=channels, embed_dim=24, depth=depth, num_heads=heads,
                               head_dim=dim_head, mlp_dim=40)
    assert model.cfg.pool == pool  # read from the weights: vit_pytorch keeps a class token only for pool='cls'
    assert list(model.state_dict()) == list(reference.state_dict())
    _check(model, reference, _images(2, channels, img))


def test_lucidrains_headless_returns_every_token():
    vit_pytorch = pytest.importorskip("vit_pytorch")
    reference = randomise_(vit_pytorch.ViT(image_size=16, patch_size=4, num_classes=0, dim=16, depth=1, heads=2,
                                           mlp_dim=32, dim_head=8), seed=3).eval()
    model = vitnp.create_model("lucidrains_vit_patch32_256", weights=reference.state_dict(), img_size=16,
                               patch_size=4, embed_dim=16, depth=1, num_heads=2, head_dim=8, mlp_dim=32)
    assert model.num_classes == 0
    x = _images(2, 3, 16)
    assert model(x.numpy()).shape == (2, 17, 16)
    _check(model, reference, x)


def test_notes_models_parameter_counts_match_torch():
    """The registered defaults build the sources' default models (parameter for parameter)."""
    vit_pytorch = pytest.importorskip("vit_pytorch")
    with torch.device("meta"):
        sources = {
            "notes_prenorm_vit_patch32_256": VIT(),
            "notes_torch_encoder_vit_patch7_28": ViT(28, 1, 100, 7, 1, 1, 1, 10, 4, 0.1),
            "lucidrains_vit_patch32_256": vit_pytorch.ViT(image_size=256, patch_size=32, num_classes=1000, dim=1024,
                                                          depth=6, heads=16, mlp_dim=2048),
            "lucidrains_vit_base_patch16_224": vit_pytorch.ViT(image_size=224, patch_size=16, num_classes=1000,
                                                               dim=768, depth=12, heads=12, mlp_dim=3072, dim_head=64),
        }
    for name, source in sources.items():
        model = vitnp.create_model(name)
        assert {k: v.shape for k, v in model.state_dict().items()} == {
            k: tuple(v.shape) for k, v in source.state_dict().items()}, name
        assert vitnp.count_params(model) == sum(p.numel() for p in source.parameters()), name
