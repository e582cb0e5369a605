"""One tolerance table for every comparison against torch, by dtype and by what is compared.

Why these numbers:
- float32 kernels (LayerNorm, GELU, softmax, one Linear): each output is a handful of roundings of values O(1), so it
  agrees with torch to a few ulp: rtol 1e-5 (~80 ulp at 2^-23) covers different summation orders over C <= 4096.
- float32 whole models / blocks: every block adds GEMM rounding (K up to 4C terms, ~sqrt(K) * 2^-24 relative) and
  torch uses other GEMM blockings (and SDPA for attention); measured differences on random-weight models are ~1e-6
  on logits of size ~1, so atol 1e-4 + rtol 1e-4 leaves a 100x margin yet catches any real mistake (a wrong eps, a
  missing bias, a transposed weight moves logits by >= 1e-3).
- float64: the same computations at 2^-53; the issue asks for ~1e-10 relative, measured ~1e-15.
"""

import numpy as np

TOLERANCES = {
    ("kernel", np.float32): dict(rtol=1e-5, atol=1e-6),
    ("kernel", np.float64): dict(rtol=1e-12, atol=1e-13),
    ("layer", np.float32): dict(rtol=1e-4, atol=2e-5),
    ("layer", np.float64): dict(rtol=1e-10, atol=1e-12),
    ("model", np.float32): dict(rtol=1e-4, atol=1e-4),
    ("model", np.float64): dict(rtol=1e-10, atol=1e-11),
}


def assert_close(actual, expected, kind, dtype=None):
    """Compare with the tolerance of ``kind`` ('kernel', 'layer', 'model') for ``dtype`` (default: actual's)."""
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    dtype = np.dtype(dtype or actual.dtype).type
    assert actual.shape == expected.shape, f"shape {actual.shape} != {expected.shape}"
    tol = TOLERANCES[(kind, dtype)]
    np.testing.assert_allclose(actual, expected, **tol)
