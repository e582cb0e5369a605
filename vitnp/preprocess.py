"""Image preprocessing with Pillow, step for step as timm's / torchvision's eval transforms: the one home of it.

:func:`preprocess` is timm's ``create_transform(**resolve_data_config({}, model=m))`` for a model's pretrained
config: ``Resize(floor(size / crop_pct))`` of the shorter side with the config's interpolation (Pillow's filter,
as torchvision applies it to PIL images), ``CenterCrop(size)``, ``ToTensor()``, ``Normalize(mean, std)``. Before
it, :func:`open_image` reads a file as timm's dataset does (``.convert('RGB')``), after applying the EXIF
orientation and scaling 16-bit greyscale to 8 bits. :func:`load_image` is ``transforms.ToTensor()`` on
``Image.open(path).convert(mode)``; :func:`normalize` is ``transforms.Normalize(mean, std)``.

Images are untrusted input, and the work one may ask for is bounded. Pillow refuses to decode more than twice
``Image.MAX_IMAGE_PIXELS`` (a ``DecompressionBombError``, reported here as an unreadable image), but a tiny image can
still ask a resize for gigabytes: a 1 x 20000 PNG, about 120 bytes, resized to a shorter side of 248 becomes
248 x 4,960,000 pixels (5 GiB). :func:`check_resize` refuses every resize whose output would have more than
:data:`MAX_RESIZED_PIXELS`. Every refusal is a ValueError naming the file and the reason, as for a corrupt file.
"""

import math
import os

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

MODES = {"L": 1, "RGB": 3}  # Pillow mode -> channels; both 8 bits per channel

# The most pixels a resize may make: 2**24, 64 MiB as Pillow holds RGB. Normal pictures stay far below it (an
# aspect ratio up to 1:113 at the largest registered shorter side, 384; up to 1:270 at 248), while the centre crop
# that follows keeps only a square of the shorter side: a longer resize output is work for nothing.
MAX_RESIZED_PIXELS = 2**24

# What decoders raise on corrupt, truncated and oversized files: a DecompressionBombError is no OSError, and some
# plugins raise ValueError on a malformed header (PPM's 'Token too long')
_UNREADABLE = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def _read_file(path, read):
    """``read(Image.open(path))``; a missing, unreadable or too large file raises a ValueError naming it."""
    try:
        with Image.open(path) as image:
            return read(image)
    except FileNotFoundError as error:
        raise ValueError(f"image file not found: {path}") from error
    except _UNREADABLE as error:
        raise ValueError(f"cannot read image {image_name(path)}: {error}") from error


def load_image(path, mode="RGB"):
    """Read an image file as float32 (C, H, W) in [0, 1]: ``to_tensor(Image.open(path).convert(mode))``."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)} (Pillow modes), got {mode!r}")
    image = _read_file(path, lambda image: image.convert(mode))
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


_ARRAY_MODES = {1: "L", 3: "RGB", 4: "RGBA"}  # channels of an (H, W, C) uint8 array -> its Pillow mode
_TAKES = ("an image file path, an open binary file, a PIL image, or a uint8 NumPy array of RGB pixels: (H, W) grey, "
          "(H, W, 1), (H, W, 3) RGB or (H, W, 4) RGBA")


def open_image(source, mode="RGB"):
    """A PIL image in ``mode`` from a path, a binary file object, a PIL image or a uint8 pixel array: EXIF
    orientation applied, 16-bit greyscale scaled to 8 bits (value >> 8), then ``.convert(mode)`` (alpha dropped,
    palettes expanded, as timm's ImageDataset).

    An array holds pixel values, rows first, as imageio and ``np.asarray(pil_image)`` give them: (H, W) or (H, W, 1)
    grey, (H, W, 3) RGB, (H, W, 4) RGBA. The channels are taken as RGB: OpenCV's arrays are BGR, convert them first
    (``cv2.cvtColor(a, cv2.COLOR_BGR2RGB)`` or ``a[..., ::-1]``). Anything else raises a TypeError saying what is
    taken. An unreadable or missing file raises a ValueError naming it.
    """
    if isinstance(source, Image.Image):
        return _to_mode(source, mode)
    if isinstance(source, np.ndarray):
        return _to_mode(_from_array(source), mode)
    if not isinstance(source, (str, bytes, os.PathLike)) and not hasattr(source, "read"):
        raise TypeError(f"expected {_TAKES}; got {type(source).__name__}")

    def decoded(image):
        image.load()
        return _to_mode(image, mode)

    return _read_file(source, decoded)


def _from_array(pixels):
    """A PIL image of a uint8 (H, W) or (H, W, C) pixel array (C = 1, 3 or 4)."""
    channels = pixels.shape[2] if pixels.ndim == 3 else 1
    if pixels.dtype != np.uint8 or pixels.ndim not in (2, 3) or channels not in _ARRAY_MODES or 0 in pixels.shape:
        raise TypeError(f"expected {_TAKES}; got a {pixels.dtype} array of shape {pixels.shape}")
    pixels = np.ascontiguousarray(pixels.reshape(pixels.shape[0], pixels.shape[1], channels))
    return Image.fromarray(pixels[:, :, 0] if channels == 1 else pixels, mode=_ARRAY_MODES[channels])


def _to_mode(image, mode):
    image = ImageOps.exif_transpose(image)
    if image.mode in _SIXTEEN_BIT:  # Pillow's convert would clip 16-bit values at 255 instead of scaling them
        pixels = np.array(image, dtype=np.int32)  # in place from here: 4 bytes a pixel at most
        np.clip(pixels, 0, 65535, out=pixels)
        np.right_shift(pixels, 8, out=pixels)
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


def check_resize(size, new_size, source="the image"):
    """Refuse to resize an image of ``size`` (width, height) to ``new_size`` when the output would have more than
    :data:`MAX_RESIZED_PIXELS`: a ValueError naming ``source`` (a file, or what the image is), as for an unreadable
    file."""
    (width, height), (new_width, new_height) = size, new_size
    if new_width * new_height > MAX_RESIZED_PIXELS:
        raise ValueError(
            f"refusing image {source}: its {width} x {height} pixels (aspect ratio "
            f"1:{max(width, height) / min(width, height):.0f}) resized to {new_width} x {new_height} would make "
            f"{new_width * new_height:,} pixels, more than the {MAX_RESIZED_PIXELS:,} vitnp allows"
        )


def resize(image, new_size, interpolation, source="the image"):
    """``image.resize(new_size)`` with the named Pillow filter, after :func:`check_resize`."""
    check_resize(image.size, new_size, source)
    return image.resize(new_size, INTERPOLATIONS[interpolation])


def resize_shorter_side(image, size, interpolation, source="the image"):
    """``transforms.Resize(size, interpolation)`` on a PIL image: the shorter side to ``size``, the longer side to
    int(size * long / short) (truncated), with Pillow's filter; bounded by :func:`check_resize`."""
    width, height = image.size
    short, long = min(width, height), max(width, height)
    if short == 0:
        raise ValueError(f"refusing image {source}: it has no pixels ({width} x {height})")
    new_long = int(size * long / short)
    new_size = (size, new_long) if width <= height else (new_long, size)
    if new_size == image.size:
        return image
    return resize(image, new_size, interpolation, source)


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
    """An image -> the model's eval input, (C, H, W): timm's eval transform for its pretrained config.

    ``image`` is a path, a binary file object, a PIL image or a uint8 (H, W) / (H, W, C) array of RGB(A) or grey
    pixels (:func:`open_image`); an array gives the same result as the PIL image of the same pixels. ``model`` is a
    vitnp model, a registered name or a data config dict. Resize the shorter side to floor(size / crop_pct) with the
    config's interpolation, centre-crop size x size, scale to [0, 1], normalise by mean / std (in float32, as
    torchvision; then cast to ``dtype``). An unreadable file, or an image that asks for more than
    :data:`MAX_RESIZED_PIXELS`, raises a ValueError naming it.
    """
    config = resolve_config(model)
    channels, height, width = config["input_size"]
    if height != width:
        raise ValueError(f"only square input sizes are supported, got {height}x{width}")
    source = image_name(image)
    image = open_image(image, "L" if channels == 1 else "RGB")
    image = resize_shorter_side(image, math.floor(height / config["crop_pct"]), config["interpolation"], source)
    image = center_crop(image, height, width)
    x = normalize(to_array(image), config["mean"], config["std"])
    return x.astype(dtype, copy=False)


def image_name(image):
    """How error messages name an image: its path (or URL, or a file object's name), else what it is."""
    if isinstance(image, np.ndarray):
        return f"array of shape {image.shape}"
    if isinstance(image, Image.Image):
        return f"PIL image of {image.size[0]} x {image.size[1]}"
    if hasattr(image, "read"):  # a file object: its file name when it has one
        return str(getattr(image, "name", None) or image)
    return str(image)


def preprocess_files(paths, model, dtype=np.float32):
    """Preprocess many files, going on past unreadable ones: yields ``(path, array or None, error or None)``."""
    config = resolve_config(model)
    for path in paths:
        try:
            yield path, preprocess(path, config, dtype), None
        except ValueError as error:
            yield path, None, str(error)
