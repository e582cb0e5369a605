"""The small module system every vitnp model is built from.

A :class:`Module` holds named parameters (NumPy arrays) and named child modules, so that a model's dotted parameter
names are exactly the keys of the PyTorch ``state_dict`` it mirrors (timm's names), and runs its forward on the ops of
its backend (``self.ops``: :mod:`vitnp.reference.ops` or :mod:`vitnp.fast.ops`, the same functions). :class:`Model`
adds what a whole network needs: input checks, ``state_dict`` / ``load_state_dict(strict=True)`` with errors that name
keys, seeded random initialisation and a dtype.
"""

import math

import numpy as np

from .backends import backend_ops, check_backend, default_backend
from .compiling import note_model


class WeightsError(ValueError):
    """Weights that do not fit a model: missing, unexpected or mis-shaped keys, or unusable values.

    The message counts the keys of each kind and names the first few (:data:`SHOWN_KEYS`), with the likely cause when
    one can be told (``cause``, e.g. weights of another model size); the full lists are attributes: ``missing`` and
    ``unexpected`` (keys), ``mis_shaped`` ((key, shape in the weights, shape in the model)) and ``unusable``
    ((key, dtype)).
    """

    def __init__(self, model_name, missing=(), unexpected=(), mis_shaped=(), unusable=(), cause=None):
        self.model_name = model_name
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mis_shaped = list(mis_shaped)
        self.unusable = list(unusable)
        self.cause = cause
        super().__init__(self._message())

    def __reduce__(self):  # pickle (Dask workers) by the fields, not by the message
        return type(self), (self.model_name, self.missing, self.unexpected, self.mis_shaped, self.unusable, self.cause)

    def with_cause(self, cause):
        """The same error with ``cause`` (a sentence: why the weights do not fit) added to its message."""
        return WeightsError(self.model_name, self.missing, self.unexpected, self.mis_shaped, self.unusable, cause)

    def _message(self):
        lines = [f"cannot load weights into {self.model_name}, nothing was loaded"]
        if self.cause:
            lines.append(f"likely cause: {self.cause}")
        if self.missing:
            lines.append(f"missing keys ({len(self.missing)}): " + _first_few(self.missing, ", "))
        if self.unexpected:
            lines.append(f"unexpected keys ({len(self.unexpected)}): " + _first_few(self.unexpected, ", "))
        if self.mis_shaped:
            shapes = [f"{key}: weights {weights}, model {model}" for key, weights, model in self.mis_shaped]
            lines.append(f"mis-shaped keys ({len(self.mis_shaped)}): " + _first_few(shapes, "; "))
        if self.unusable:
            dtypes = [f"{key} (dtype {dtype})" for key, dtype in self.unusable]
            lines.append(f"keys whose values are not real numbers ({len(self.unusable)}): " + _first_few(dtypes, ", "))
        return "\n  ".join(lines)


SHOWN_KEYS = 3  # keys of each kind a WeightsError's message names; the exception holds them all


def _first_few(items, separator):
    more = len(items) - SHOWN_KEYS
    return separator.join(items[:SHOWN_KEYS]) + (f"{separator}... and {more} more" if more > 0 else "")


class _DefaultOps:
    """``module.ops`` of a module that :meth:`Module.set_backend` has not reached: the default backend's ops."""

    def __get__(self, module, owner):
        return backend_ops(default_backend())


class Module:
    """A node of the parameter tree. Parameters and children are found by attribute name, in definition order.

    ``self.ops`` is the ops module of the module's backend, which its forward calls (``self.ops.linear(x, ...)``).
    """

    ops = _DefaultOps()  # until set_backend puts the module's own in its __dict__

    def __init__(self):
        object.__setattr__(self, "_parameters", {})
        object.__setattr__(self, "_inits", {})
        object.__setattr__(self, "_buffers", {})
        object.__setattr__(self, "_buffer_inits", {})
        object.__setattr__(self, "_modules", {})

    def __setattr__(self, name, value):
        if isinstance(value, Module):
            self._modules[name] = value
        object.__setattr__(self, name, value)

    def __getattr__(self, name):
        parameters = self.__dict__.get("_parameters", {})
        if name in parameters:
            return parameters[name]
        buffers = self.__dict__.get("_buffers", {})
        if name in buffers:
            return buffers[name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def add_parameter(self, name, shape, init):
        """Declare a parameter: its shape and how random initialisation fills it.

        ``init`` is 'zeros', 'ones', 'trunc_normal' (std 0.02, cut at +-2 std, timm's default for Linear weights
        and position embeddings), 'small_normal' (std 1e-6, timm's class token) or 'lecun_normal' (a Conv2d patch
        embedding: std sqrt(1 / fan_in)), or a number: every value that constant (timm's LayerScale init_values).
        """
        self._parameters[name] = np.zeros(shape, dtype=np.float32)
        self._inits[name] = init

    def add_buffer(self, name, shape, init, dtype=None):
        """Declare a buffer: saved state that is not a parameter (BatchNorm's running statistics), as torch's.

        ``init`` as for :meth:`add_parameter`. ``dtype=None`` follows the model's dtype; a given dtype (int64 for
        ``num_batches_tracked``) is kept on initialisation and on load. Buffers are in the ``state_dict`` but not
        in :func:`count_params`.
        """
        self._buffers[name] = np.zeros(shape, dtype=dtype or np.float32)
        self._buffer_inits[name] = (init, dtype)

    @property
    def backend(self):
        """The name of the backend this module runs on: 'fast' or 'reference'."""
        return self.__dict__.get("_backend") or default_backend()

    def set_backend(self, name):
        """Run this module and every module below it on backend ``name`` ('fast' or 'reference'); returns self."""
        ops = backend_ops(check_backend(name))
        for _, module in self.named_modules():
            object.__setattr__(module, "_backend", name)
            object.__setattr__(module, "ops", ops)
        return self

    def __getstate__(self):  # pickle / deepcopy: the ops module is found again from the backend's name
        return {name: value for name, value in self.__dict__.items() if name != "ops"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        if "_backend" in state:
            object.__setattr__(self, "ops", backend_ops(state["_backend"]))

    def named_modules(self, prefix=""):
        yield prefix, self
        for name, child in self._modules.items():
            yield from child.named_modules(f"{prefix}{name}.")

    def named_parameters(self):
        for prefix, module in self.named_modules():
            for name, value in module._parameters.items():
                yield prefix + name, value

    def named_state(self):
        """Parameters and buffers in torch's ``state_dict`` order: a module's parameters, its buffers, its children."""
        for prefix, module in self.named_modules():
            yield from ((prefix + name, value) for name, value in module._parameters.items())
            yield from ((prefix + name, value) for name, value in module._buffers.items())


class Identity(Module):
    """Returns its input: the slot of an optional layer (no norm, no head), as ``nn.Identity``."""

    def __call__(self, x):
        return x


def _trunc_normal(rng, shape, std):
    values = rng.standard_normal(shape) * std
    while True:  # redraw the values outside [-2, 2]: torch's trunc_normal_(std=std) bounds are absolute (a=-2, b=2)
        outside = np.abs(values) > 2.0
        if not outside.any():
            return values
        values[outside] = rng.standard_normal(int(outside.sum())) * std


def _initial_value(rng, init, shape):
    if isinstance(init, float):
        return np.full(shape, init)
    if init == "zeros":
        return np.zeros(shape)
    if init == "ones":
        return np.ones(shape)
    if init == "trunc_normal":
        return _trunc_normal(rng, shape, 0.02)
    if init == "small_normal":
        return rng.standard_normal(shape) * 1e-6
    if init == "lecun_normal":
        fan_in = int(np.prod(shape[1:]))
        return _trunc_normal(rng, shape, math.sqrt(1.0 / fan_in))
    raise ValueError(f"unknown init {init!r}")


class Model(Module):
    """A whole network: call it on (B, C, H, W) images; load and save its parameters by timm's key names.

    Subclasses set ``in_chans`` and ``img_size`` and define ``forward_features`` and ``forward_head``.
    """

    in_chans: int
    img_size: tuple

    def init_weights(self, seed=0, dtype=np.float32):
        """Fill every parameter with seeded random values (timm-like init) in ``dtype``."""
        rng = np.random.default_rng(seed)
        for prefix, module in self.named_modules():
            for name, init in module._inits.items():
                shape = module._parameters[name].shape
                module._parameters[name] = _initial_value(rng, init, shape).astype(dtype)
            for name, (init, fixed_dtype) in module._buffer_inits.items():
                shape = module._buffers[name].shape
                module._buffers[name] = _initial_value(rng, init, shape).astype(fixed_dtype or dtype)
        self.dtype = np.dtype(dtype)

    def __call__(self, x):
        """Logits (B, num_classes) of a (B, C, H, W) batch (on the fast backend, one chunk of it per thread)."""
        x = self.check_input(x)

        def forward(chunk):
            return self.forward_head(self.forward_features(chunk))

        if len(x) == 0:  # an empty batch: the output of one blank image, without its row, for the output's shape
            return forward(np.zeros((1, *x.shape[1:]), x.dtype))[:0]
        return self.ops.map_batch(forward, x)

    def check_input(self, x):
        """Return ``x`` as an array of the model's dtype after checking it is a (B, C, H, W) float image batch."""
        x = np.asarray(x)
        if not np.issubdtype(x.dtype, np.floating):
            raise ValueError(
                f"expected a floating-point image array, got dtype {x.dtype}; convert and normalise the images "
                "first (pixels scaled to [0, 1], then the model's mean/std)"
            )
        if x.ndim != 4:
            raise ValueError(f"expected a (B, C, H, W) array of rank 4, got shape {x.shape}")
        if x.shape[1] != self.in_chans:
            raise ValueError(f"expected {self.in_chans} input channels (axis 1 of NCHW), got shape {x.shape}")
        self.check_image_size(x.shape[2], x.shape[3])
        note_model(self, x.shape[1:])  # the model whose kernels a cold cache compiles first (vitnp.compiling)
        return np.ascontiguousarray(x, dtype=self.dtype)

    def check_image_size(self, height, width):
        if (height, width) != tuple(self.img_size):
            raise ValueError(
                f"this model takes {self.img_size[0]}x{self.img_size[1]} images, got {height}x{width}; "
                f"create it with img_size=({height}, {width}) for another size"
            )

    def state_dict(self):
        """The parameters and buffers by timm's ``state_dict()`` key names, in timm's order."""
        return dict(self.named_state())

    def load_state_dict(self, state_dict, strict=True, copy=True):
        """Load parameters and buffers by name, cast to the model's dtype (integer buffers keep theirs).

        Every problem is collected before anything changes: missing keys (when ``strict``), unexpected keys (when
        ``strict``), mis-shaped keys and values that are not real numbers are reported together in one
        :class:`WeightsError`, and the model keeps its old parameters. Returns ``(missing, unexpected)``.

        The model keeps copies: the caller's arrays are neither shared nor changed (the fast backend makes the arrays
        it packs read-only). ``copy=False`` takes arrays of the right dtype as they are, for arrays nobody else holds
        (a checkpoint just read from a file, whose arrays are then not copied again).
        """
        own = dict(self.named_state())
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        mis_shaped, unusable = [], []
        converted = {}
        for key, current in own.items():
            if key not in state_dict:
                continue
            value = np.asarray(state_dict[key])
            if not (np.issubdtype(value.dtype, np.floating) or np.issubdtype(value.dtype, np.integer)):
                unusable.append((key, value.dtype))
            elif value.shape != current.shape:
                mis_shaped.append((key, tuple(value.shape), tuple(current.shape)))
            else:
                dtype = self.dtype if np.issubdtype(current.dtype, np.floating) else current.dtype  # int64 buffers stay
                if value.dtype != dtype or not value.flags.aligned:  # np.savez stores arrays at any offset: NumPy
                    value = value.astype(dtype)  # multiplies an unaligned one without its BLAS, in another order
                elif copy:
                    value = value.copy()
                converted[key] = value
        reported_missing, reported_unexpected = (missing, unexpected) if strict else ([], [])
        if reported_missing or reported_unexpected or mis_shaped or unusable:
            name = f"{self.name} ({type(self).__name__})" if "name" in self.__dict__ else type(self).__name__
            raise WeightsError(name, reported_missing, reported_unexpected, mis_shaped, unusable)
        modules = dict(self.named_modules())
        for key, value in converted.items():
            prefix, _, name = key.rpartition(".")
            module = modules[prefix + "." if prefix else ""]
            (module._parameters if name in module._parameters else module._buffers)[name] = value
        return missing, unexpected


def count_params(model, convention="timm"):
    """Number of parameters.

    ``convention='timm'`` counts every parameter, as ``sum(p.numel() for p in model.parameters())`` does.
    ``convention='torchsummary'`` counts only the parameters held by sub-modules, leaving out the ones the model
    holds itself (class / distillation token, position embedding): what torchsummary reports, because its
    per-layer hooks never see a bare ``nn.Parameter`` of the root module.
    """
    if convention == "timm":
        return sum(int(v.size) for _, v in model.named_parameters())
    if convention == "torchsummary":
        return sum(int(v.size) for k, v in model.named_parameters() if "." in k)
    raise ValueError(f"convention must be 'timm' or 'torchsummary', got {convention!r}")
