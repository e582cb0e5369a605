"""The reference backend: the forward written to be read, each op the formula of the torch call it equals.

:mod:`vitnp.reference.ops` holds the ops the models call; :mod:`vitnp.reference.kernels` the Numba kernels among them
(LayerNorm, GELU, SiLU, softmax, Swin's roll and window partition / reverse); :mod:`vitnp.reference.resample` the
resampling matrices of the position embedding and of MobileViT's bilinear resize. Nothing here imports
:mod:`vitnp.fast`.
"""
