"""Resampling weights along one axis, as matrices: bilinear (MobileViT's resize of a map that is not whole patches) and
the bicubic variants that resample a ViT's position embedding (timm's, DINO's, DINOv2's, Hugging Face's).

Each matrix M (n_out, n_in) gives a resampled axis as M @ values, so a 2-D resize is M_h @ grid @ M_w^T: the index
arithmetic of torch's ``F.interpolate`` written out once, and tested against it.
"""

import math

import numpy as np


def bilinear_matrix(n_in, n_out, align_corners=False):
    """(n_out, n_in) weights of bilinear resampling along one axis, no antialias.

    Output i reads the input at src = (i + 0.5) * n_in / n_out - 0.5, clamped below at 0 (``align_corners=False``),
    or at src = i * (n_in - 1) / (n_out - 1) (``align_corners=True``; 0 for a single output), and mixes its two
    neighbours x0 = floor(src) and x1 = min(x0 + 1, n_in - 1) with weights 1 - l and l, l = src - x0: torch's
    ``upsample_bilinear2d`` index arithmetic.
    """
    if align_corners:
        src = np.arange(n_out) * ((n_in - 1) / (n_out - 1) if n_out > 1 else 0.0)
    else:
        src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    x0 = src.astype(np.int64)
    x1 = np.minimum(x0 + 1, n_in - 1)
    lam = src - x0
    matrix = np.zeros((n_out, n_in))
    rows = np.arange(n_out)
    np.add.at(matrix, (rows, x0), 1.0 - lam)
    np.add.at(matrix, (rows, x1), lam)  # x1 == x0 at the last input: the weights add up to 1 there
    return matrix


def cubic_weight(x, A):
    """Keys' cubic convolution kernel with parameter A (torch's bicubic: A = -0.75; PIL / antialias: A = -0.5)."""
    x = abs(x)
    if x <= 1:
        return ((A + 2) * x - (A + 3)) * x * x + 1
    if x < 2:
        return ((A * x - 5 * A) * x + 8 * A) * x - 4 * A
    return 0.0


def bicubic_matrix(n_in, n_out, align_corners=False, scale_factor=None, A=-0.75, dtype=np.float64):
    """(n_out, n_in) weights of ``F.interpolate(mode='bicubic', antialias=False)`` along one axis.

    Output i reads the input at src = (i + 0.5) / scale - 0.5 (align_corners=False; scale = n_out / n_in, or the
    given ``scale_factor``, which torch uses as is: DINO's +0.1) or src = i (n_in - 1) / (n_out - 1)
    (align_corners=True), and mixes the four taps floor(src) - 1 .. floor(src) + 2, clamped to the border, with
    the cubic kernel's weights at their distances t + 1, t, 1 - t, (1 - t) + 1 to src. The positions and weights
    are computed in ``dtype``, as torch's kernel computes them in the tensor's (float32 for a float32 tensor).
    """
    real = np.dtype(dtype).type
    if align_corners:
        step = real(n_in - 1) / real(n_out - 1) if n_out > 1 else real(0.0)
    else:
        step = real(1.0 / scale_factor) if scale_factor else real(n_in) / real(n_out)
    matrix = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = real(i) * step if align_corners else step * (real(i) + real(0.5)) - real(0.5)
        x0 = math.floor(src)
        t = src - real(x0)
        for k, distance in zip(range(-1, 3), (t + real(1), t, real(1) - t, (real(1) - t) + real(1))):
            matrix[i, min(max(x0 + k, 0), n_in - 1)] += cubic_weight(distance, real(A))
    return matrix


def aa_bicubic_matrix(n_in, n_out, A=-0.5):
    """(n_out, n_in) weights of ``F.interpolate(mode='bicubic', antialias=True, align_corners=False)`` on one axis.

    PIL's resampling filter: output i is centred at c = (i + 0.5) n_in / n_out; the cubic kernel (A = -0.5) is
    stretched by the scale when shrinking (support 2 * max(scale, 1)), and the weights of the taps inside the image
    are divided by their sum (a window cut by the border is renormalised).
    """
    scale = n_in / n_out
    support = 2.0 * max(scale, 1.0)
    stretch = 1.0 / scale if scale >= 1.0 else 1.0
    matrix = np.zeros((n_out, n_in))
    for i in range(n_out):
        centre = scale * (i + 0.5)
        lo = max(int(centre - support + 0.5), 0)
        hi = min(int(centre + support + 0.5), n_in)
        weights = np.array([cubic_weight((j + 0.5 - centre) * stretch, A) for j in range(lo, hi)])
        matrix[i, lo:hi] = weights / weights.sum()
    return matrix


POS_EMBED_RESAMPLERS = ("timm", "dino", "hf", "dinov2", "dinov2-reg", "hf-dinov2")


def resample_pos_embed(grid, new_size, method="timm"):
    """Resample a (D, gh, gw) position-embedding grid to (D, *new_size): out = M_h @ grid @ M_w^T per channel.

    ``method`` is the resampler of the weights' origin:

    - 'timm' (``timm.layers.resample_abs_pos_embed``): ``F.interpolate(grid.float(), size=new_size,
      mode='bicubic', antialias=True)``, computed in float32 whatever the model's dtype, then cast back;
    - 'dino' (DINO's ``interpolate_pos_encoding``): ``F.interpolate(grid, scale_factor=((gh' + 0.1) / gh,
      (gw' + 0.1) / gw), mode='bicubic')`` — the +0.1 moves the sampling positions, not only the size;
    - 'dinov2' (DINOv2's ``interpolate_pos_encoding``, hub models without registers: ``interpolate_offset=0.1``,
      no antialias): DINO's call on ``grid.float()``, computed in float32, then cast back;
    - 'dinov2-reg' (DINOv2's hub models with registers, ``interpolate_antialias=True, interpolate_offset=0``, and
      Hugging Face ``Dinov2WithRegistersEmbeddings``): timm's call, by size, antialiased, in float32 (the two differ
      only in when they keep the stored embedding: :meth:`vitnp.vit.VisionTransformer.pos_embed_for`);
    - 'hf' (Hugging Face ``ViTEmbeddings.interpolate_pos_encoding``): ``F.interpolate(grid, size=new_size,
      mode='bicubic')``;
    - 'hf-dinov2' (Hugging Face ``Dinov2Embeddings.interpolate_pos_encoding``): the same call on
      ``grid.to(torch.float32)``, computed in float32, then cast back.
    """
    (gh, gw), (nh, nw) = grid.shape[-2:], new_size
    if method in ("timm", "dinov2-reg"):
        m_h, m_w, dtype = aa_bicubic_matrix(gh, nh), aa_bicubic_matrix(gw, nw), np.float32
    elif method in ("dino", "dinov2"):
        dtype = np.float32 if method == "dinov2" else grid.dtype
        m_h = bicubic_matrix(gh, nh, scale_factor=(nh + 0.1) / gh, dtype=dtype)
        m_w = bicubic_matrix(gw, nw, scale_factor=(nw + 0.1) / gw, dtype=dtype)
    elif method in ("hf", "hf-dinov2"):
        dtype = np.float32 if method == "hf-dinov2" else grid.dtype
        m_h, m_w = bicubic_matrix(gh, nh, dtype=dtype), bicubic_matrix(gw, nw, dtype=dtype)
    else:
        raise ValueError(f"pos-embed resampler must be one of {POS_EMBED_RESAMPLERS}, got {method!r}")
    resampled = m_h.astype(dtype) @ grid.astype(dtype) @ m_w.T.astype(dtype)  # (D, nh, nw)
    return resampled.astype(grid.dtype)
