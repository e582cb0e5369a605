"""Preprocessing constants and the shape of a model's data config (timm's ``pretrained_cfg`` fields)."""

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
INCEPTION_MEAN, INCEPTION_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # OpenAI CLIP's


def data_cfg(input_size=224, crop_pct=0.9, mean=INCEPTION_MEAN, std=INCEPTION_STD, interpolation="bicubic", in_chans=3):
    """timm's eval preprocessing fields: resize the shorter side to floor(size / crop_pct), centre-crop, normalise."""
    return {
        "input_size": (in_chans, input_size, input_size),
        "crop_pct": crop_pct,
        "interpolation": interpolation,
        "mean": mean,
        "std": std,
    }
