"""The fast backend: the engine, held op by op to :mod:`vitnp.reference`.

:mod:`vitnp.fast.ops` holds the ops the models call, with the reference's names, arguments and results; the rooms behind
it: :mod:`~vitnp.fast.schedule` (the protocol threads share a kernel's work by, a leaf), :mod:`~vitnp.fast.pool` (the
helper threads and batch chunks), :mod:`~vitnp.fast.vecmath` (SIMD registers), :mod:`~vitnp.fast.activations` (float32
exp / erf, the activations), :mod:`~vitnp.fast.gemm` (the packed GEMM), :mod:`~vitnp.fast.rows` (LayerNorm, GELU, SiLU,
softmax), :mod:`~vitnp.fast.windows` (Swin's windows), :mod:`~vitnp.fast.attention`, :mod:`~vitnp.fast.conv` and
:mod:`~vitnp.fast.winograd` (MobileViT's convolutions), :mod:`~vitnp.fast.fused` (MobileViT's blocks in one call),
:mod:`~vitnp.fast.tuning` (the settings measured on the CPU once).
"""
