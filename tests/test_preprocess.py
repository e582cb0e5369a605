"""vitnp.preprocess against timm's eval transform, ``create_transform(**resolve_data_config({}, model=m))``.

Generated PIL images of odd sizes and every mode a user meets (RGB, RGBA, L, P, 16-bit, EXIF-rotated); the timm
side gets the image as timm's ImageDataset hands it over (``.convert('RGB')``), after the EXIF orientation for the
rotated file. Expected: bit for bit equal (same Pillow filter, same float32 arithmetic). The unreadable-file checks
need no timm.
"""

import io

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from oracles import needs
from PIL import Image, ImageOps

import vitnp
from vitnp.preprocess import open_image, preprocess_files

needs_timm = needs("torch", "timm")

# one timm name per distinct preset (0.5 / ImageNet mean, crop 0.9 / 1.0, 224 / 256 / 384, Swin, MobileViT)
PRESETS = ["vit_tiny_patch16_224", "deit_tiny_patch16_224", "vit_base_patch16_384", "swin_tiny_patch4_window7_224",
           "mobilevit_xxs"]
_TRANSFORMS = {}


def timm_transform(name):
    import timm
    from timm.data import create_transform, resolve_data_config

    if name not in _TRANSFORMS:
        small = {"depth": 1} if name.startswith(("vit_", "deit_")) else {}
        model = timm.create_model(name, pretrained=False, num_classes=0, **small)
        _TRANSFORMS[name] = create_transform(**resolve_data_config({}, model=model))
    return _TRANSFORMS[name]


def _image(rng, width, height, mode):
    pixels = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
    pixels[..., :3] = np.clip(pixels[..., :3].astype(int) // 2 + np.linspace(0, 120, width, dtype=int)[None, :, None],
                              0, 255)  # some structure so that resampling mistakes show
    image = Image.fromarray(pixels, "RGBA")
    if mode == "P":
        return image.convert("RGB").quantize(37)
    return image.convert(mode)


@needs_timm
@pytest.mark.parametrize("name", PRESETS)
@settings(max_examples=12)  # x 5 presets; the time budget of this file
@given(width=st.integers(3, 300), height=st.integers(3, 300), mode=st.sampled_from(["RGB", "RGBA", "L", "P"]))
def test_preprocess_equals_timm_eval_transform(name, width, height, mode):
    image = _image(np.random.default_rng(width * 1000 + height), width, height, mode)
    expected = timm_transform(name)(image.convert("RGB")).numpy()
    actual = vitnp.preprocess(image, name)
    assert actual.dtype == np.float32
    np.testing.assert_array_equal(actual, expected)


@needs_timm
def test_preprocess_takes_a_model_and_float64():
    model = vitnp.create_model("deit_tiny_patch16_224", depth=1)
    image = _image(np.random.default_rng(0), 301, 250, "RGB")
    expected = timm_transform("deit_tiny_patch16_224")(image).numpy()
    actual = vitnp.preprocess(image, model, dtype=np.float64)
    assert actual.dtype == np.float64 and actual.shape == (3, 224, 224)
    np.testing.assert_array_equal(actual, expected.astype(np.float64))


@needs_timm
def test_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path):
    grey = _image(np.random.default_rng(1), 97, 131, "L")
    wide = np.asarray(grey, dtype=np.uint16) * 257  # v * 257 >> 8 == v: the 8-bit image, in 16 bits
    path = tmp_path / "wide.png"
    Image.fromarray(wide).save(path)
    with Image.open(path) as opened:
        assert opened.mode.startswith("I")
    expected = timm_transform("vit_tiny_patch16_224")(grey.convert("RGB")).numpy()
    np.testing.assert_array_equal(vitnp.preprocess(path, "vit_tiny_patch16_224"), expected)


@needs_timm
def test_exif_rotated_file_is_turned_upright(tmp_path):
    upright = _image(np.random.default_rng(2), 120, 200, "RGB")
    stored = upright.transpose(Image.Transpose.ROTATE_270)  # what the camera wrote: 200 x 120, turned clockwise
    exif = Image.Exif()
    exif[0x0112] = 8  # Orientation 8: shown after a quarter turn counter-clockwise
    path = tmp_path / "rotated.png"
    stored.save(path, exif=exif)
    with Image.open(path) as opened:
        shown = ImageOps.exif_transpose(opened).convert("RGB")
    assert shown.size == upright.size
    expected = timm_transform("deit_tiny_patch16_224")(shown).numpy()
    np.testing.assert_array_equal(vitnp.preprocess(str(path), "deit_tiny_patch16_224"), expected)
    np.testing.assert_array_equal(np.asarray(open_image(path)), np.asarray(upright))


@needs_timm
def test_jpeg_file_and_greyscale_model(tmp_path):
    image = _image(np.random.default_rng(3), 64, 40, "RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG")
    path = tmp_path / "photo.jpg"
    path.write_bytes(buffer.getvalue())
    with Image.open(path) as opened:
        expected = timm_transform("vit_tiny_patch16_224")(opened.convert("RGB")).numpy()
    np.testing.assert_array_equal(vitnp.preprocess(path, "vit_tiny_patch16_224"), expected)
    digits = vitnp.preprocess(path, "vit_digits_patch4_32")
    assert digits.shape == (1, 32, 32)


def test_unreadable_files_raise_clear_errors_and_batches_go_on(tmp_path):
    good = tmp_path / "good.png"
    _image(np.random.default_rng(4), 50, 60, "RGB").save(good)
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(ValueError, match="cannot read image .*corrupt.jpg"):
        vitnp.preprocess(corrupt, "vit_tiny_patch16_224")
    with pytest.raises(ValueError, match="not found"):
        vitnp.preprocess(tmp_path / "missing.png", "vit_tiny_patch16_224")
    results = list(preprocess_files([corrupt, good], "vit_tiny_patch16_224"))
    assert results[0][1] is None and "corrupt.jpg" in results[0][2]
    assert results[1][1].shape == (3, 224, 224) and results[1][2] is None
    with pytest.raises(ValueError, match="registered model name"):
        vitnp.preprocess(good, 3)
