"""Image preprocessing with Pillow, step for step as torchvision's eval transforms.

:func:`load_image` is ``transforms.ToTensor()`` on ``Image.open(path).convert(mode)``; :func:`normalize` is
``transforms.Normalize(mean, std)``. A model's mean and std are in ``vitnp.data_config(name)``.
"""

import numpy as np
from PIL import Image, UnidentifiedImageError

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
