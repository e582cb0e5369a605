"""Image preprocessing with Pillow, step for step as timm's / torchvision's eval transforms: the one home of it.

:func:`preprocess` is timm's ``create_transform(**resolve_data_config({}, model=m))`` for a model's pretrained
config: ``Resize(floor(size / crop_pct))`` of the shorter side with the config's interpolation (Pillow's filter,
as torchvision applies it to PIL images), ``CenterCrop(size)``, ``ToTensor()``, ``Normalize(mean, std)``. Before
it, :func:`open_image` reads a file as timm's dataset does (``.convert('RGB')``), after applying the EXIF
orientation and scaling 16-bit greyscale to 8 bits. :func:`load_image` is ``transforms.ToTensor()`` on
``Image.open(path).convert(mode)``; :func:`normalize` is ``transforms.Normalize(mean, std)``.
"""

import math

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

MODES = {"L": 1, "RGB": 3}  # Pillow mode -> channels; both 8 bits per channel


def load_image(path, mode="RGB"):
    """Read an image file as float32 (C, H, W) in [0, 1]: ``to_tensor(Image.open(path).convert(mode))``."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)} (Pillow modes), got {mode!r}")
    try:
        with Image.open(path) as image:
            image = image.convert(mode)
    except FileNotFoundError as error:
        raise ValueError(f"image file not found: {path}") from error
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"cannot read image {path}: {error}") from error
    pixels = np.asarray(image, dtype=np.float32) / np.float32(255)
    pixels = pixels.reshape(image.height, image.width, MODES[mode])  # (H, W, C); mode 'L' reads as (H, W)
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))  # (C, H, W)


def normalize(x, mean, std):
    """Per-channel (x - mean[c]) / std[c] on (C, H, W) or (B, C, H, W): ``transforms.Normalize(mean, std)``.

    mean and std are cast to x's dtype first, as torchvision does, so float32 input gives float32 output.
    """
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating) or x.ndim not in (3, 4):
        raise ValueError(f"expected a float (C, H, W) or (B, C, H, W) array, got {x.dtype} of shape {x.shape}")
    channels = x.shape[-3]
    mean = np.asarray(mean, dtype=x.dtype).reshape(-1)
    std = np.asarray(std, dtype=x.dtype).reshape(-1)
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"mean and std need one value per channel ({channels}), got {len(mean)} and {len(std)}")
    if np.any(std == 0):
        raise ValueError("std has a zero: cannot normalise")
    return (x - mean[:, None, None]) / std[:, None, None]


# ---- a model's eval transform ---------------------------------------------------------------------------------------

INTERPOLATIONS = {  # timm's str_to_interp_mode names -> the Pillow filters torchvision resizes PIL images with
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
}
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def open_image(source, mode="RGB"):
    """A PIL image in ``mode`` from a path or a PIL image: EXIF orientation applied, 16-bit greyscale scaled to
    8 bits (value >> 8), then ``.convert(mode)`` (alpha dropped, palettes expanded, as timm's ImageDataset).

    An unreadable or missing file raises a ValueError naming it.
    """
    if isinstance(source, Image.Image):
        return _to_mode(source, mode)
    try:
        with Image.open(source) as image:
            image.load()
            return _to_mode(image, mode)
    except FileNotFoundError as error:
        raise ValueError(f"image file not found: {source}") from error
    except (UnidentifiedImageError, OSError, SyntaxError) as error:  # truncated / corrupt files raise all three
        raise ValueError(f"cannot read image {source}: {error}") from error


def _to_mode(image, mode):
    image = ImageOps.exif_transpose(image)
    if image.mode in _SIXTEEN_BIT:  # Pillow's convert would clip 16-bit values at 255 instead of scaling them
        pixels = np.clip(np.asarray(image, dtype=np.int64), 0, 65535) >> 8
        image = Image.fromarray(pixels.astype(np.uint8), mode="L")
    return image if image.mode == mode else image.convert(mode)


def resolve_config(model):
    """The preprocessing config of a model, a registered name, or a config dict (``vitnp.data_config``'s fields)."""
    if isinstance(model, dict):
        config = model
    elif isinstance(model, str):
        from .registry import data_config

        config = data_config(model)
    elif getattr(model, "data_config", None) is not None:
        config = model.data_config
    else:
        raise ValueError("model must be a vitnp model, a registered model name or a data config dict")
    missing = [k for k in ("input_size", "crop_pct", "interpolation", "mean", "std") if k not in config]
    if missing:
        raise ValueError(f"data config lacks {', '.join(missing)}")
    if config["interpolation"] not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {config['interpolation']!r}")
    return config


def model_data_config(model):
    """A model's eval preprocessing config at the image size the model was built for (its name's config may be for
    another size when img_size was overridden)."""
    return dict(resolve_config(model), input_size=(model.in_chans, *model.img_size))


def resize_shorter_side(image, size, interpolation):
    """``transforms.Resize(size, interpolation)`` on a PIL image: the shorter side to ``size``, the longer side to
    int(size * long / short) (truncated), with Pillow's filter."""
    width, height = image.size
    short, long = min(width, height), max(width, height)
    new_long = int(size * long / short)
    new_size = (size, new_long) if width <= height else (new_long, size)
    if new_size == image.size:
        return image
    return image.resize(new_size, INTERPOLATIONS[interpolation])


def center_crop(image, height, width):
    """``transforms.CenterCrop((height, width))`` on a PIL image: the offset int(round((size - crop) / 2)) on each
    axis; an image smaller than the crop is zero-padded first (left / top get half the padding, rounded down)."""
    image_width, image_height = image.size
    if image_width < width or image_height < height:
        pad_w, pad_h = max(width - image_width, 0), max(height - image_height, 0)
        padded = Image.new(image.mode, (image_width + pad_w, image_height + pad_h))
        padded.paste(image, (pad_w // 2, pad_h // 2))
        image, (image_width, image_height) = padded, padded.size
    top = int(round((image_height - height) / 2.0))
    left = int(round((image_width - width) / 2.0))
    return image.crop((left, top, left + width, top + height))


def to_array(image):
    """``transforms.ToTensor()``: a PIL image (8 bits per channel) -> float32 (C, H, W) in [0, 1]."""
    pixels = np.asarray(image, dtype=np.float32) / np.float32(255)
    pixels = pixels.reshape(image.height, image.width, -1)  # (H, W, C); mode 'L' reads as (H, W)
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))  # (C, H, W)


def preprocess(image, model, dtype=np.float32):
    """A PIL image or a path -> the model's eval input, (C, H, W): timm's eval transform for its pretrained config.

    ``model`` is a vitnp model, a registered name or a data config dict. Resize the shorter side to
    floor(size / crop_pct) with the config's interpolation, centre-crop size x size, scale to [0, 1], normalise by
    mean / std (in float32, as torchvision; then cast to ``dtype``).
    """
    config = resolve_config(model)
    channels, height, width = config["input_size"]
    if height != width:
        raise ValueError(f"only square input sizes are supported, got {height}x{width}")
    image = open_image(image, "L" if channels == 1 else "RGB")
    image = resize_shorter_side(image, math.floor(height / config["crop_pct"]), config["interpolation"])
    image = center_crop(image, height, width)
    x = normalize(to_array(image), config["mean"], config["std"])
    return x.astype(dtype, copy=False)


def preprocess_files(paths, model, dtype=np.float32):
    """Preprocess many files, going on past unreadable ones: yields ``(path, array or None, error or None)``."""
    config = resolve_config(model)
    for path in paths:
        try:
            yield path, preprocess(path, config, dtype), None
        except ValueError as error:
            yield path, None, str(error)
