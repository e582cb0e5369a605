"""What happens while vitnp's kernels are compiled: a note on stderr, and the fast backend answering meanwhile.

Numba compiles a kernel the first time it runs for a dtype and memory layout and keeps the machine code on disk
(:mod:`vitnp.kernel_cache` says where); later processes load it in milliseconds. The reference backend's short kernels
compile in about a second; the fast backend's take seconds to tens of seconds per model family. So that a first run
does not wait for them, a fast op whose kernel is not in the cache runs on the reference backend (:class:`Tiering`)
while another process compiles the engine's kernels, and the engine takes over once they are ready.

:func:`announce_compiling` prints one line when a kernel of vitnp's really is compiled (loading one from the cache is
silent); the ``vitnp`` command turns it on, so that a first run does not look hung.
"""

import functools
import importlib
import os
import pickle
import subprocess
import sys
import threading
import time

import numpy as np
from numba.core import event, types

from . import threads


class KernelsNotCompiled(Exception):
    """Raised where Numba would start compiling a kernel of the fast backend that :class:`Tiering` holds back: the op
    that called it runs on the reference backend instead, while the kernels compile in another process."""

    def __init__(self, dtypes):
        super().__init__(f"the fast backend's kernels for {', '.join(dtypes)} are not compiled yet")
        self.dtypes = dtypes


class _CompileEvents(event.Listener):
    """Numba's compile events (not cache loads) for vitnp's kernels: a fast kernel the tiering holds back is stopped
    before Numba compiles it; otherwise the note is written once, when the first kernel of vitnp's is compiled."""

    def __init__(self):
        self.lock = threading.Lock()
        self.announce = False
        self.stream = None
        self.written = False

    def on_start(self, numba_event):
        dispatcher = numba_event.data["dispatcher"]
        module = dispatcher.py_func.__module__
        if not module.startswith("vitnp."):
            return
        where = dispatcher._cache.cache_path
        if tiering.active():
            self.note("vitnp: compiling its kernels for this CPU, once: the fast backend's in the background (seconds "
                      "to a minute), its ops running on the reference backend's kernels until they are ready (the same "
                      f"results to float rounding); later runs load them from the cache, e.g. {where}")
        else:
            self.note(f"vitnp: compiling its kernels for this CPU, once (seconds to a minute); later runs load them "
                      f"from the cache, e.g. {where}")
        if module.startswith("vitnp.fast."):
            held_back = tiering.held_back(numba_event.data["args"])
            if held_back:
                raise KernelsNotCompiled(held_back)

    def on_end(self, numba_event):
        pass

    def note(self, line):
        """Write ``line`` if notes are on and none has been written yet."""
        with self.lock:
            if not self.announce or self.written:
                return
            self.written = True
        print(line, file=self.stream or sys.stderr, flush=True)


_events = None


def _compile_events():
    """The listener of Numba's compile events, registered on first use."""
    global _events
    if _events is None:
        _events = _CompileEvents()
        event.register("numba:compile", _events)
    return _events


def announce_compiling(stream=None):
    """From now on, print one line on ``stream`` (default: stderr) the first time this process compiles one of
    vitnp's kernels, or starts compiling the fast backend's in the background. Nothing is printed when every kernel a
    run needs comes from the cache."""
    events = _compile_events()
    events.stream = stream
    events.announce = True


# ---- the fast backend on an empty cache: the reference's kernels until its own are compiled ----------------------

COMPILE_MODES = ("background", "wait")
_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Tiering:
    """What a fast op does when one of its kernels is not in the cache (``VITNP_COMPILE``).

    - ``'background'`` (the default): the kernel is not compiled in this process. The op runs on the reference backend
      (the same op, equal to the rounding of a reordered sum), and another process compiles the fast kernels of the
      model last run, for that dtype, into the cache. Ops of that dtype keep to the reference until it is done; then
      they load the compiled kernels, and any kernel still missing (a model or method that process did not run) is
      compiled here, at once.
    - ``'wait'``: the kernel is compiled here, at once, as Numba does; the first forward waits for it. Tests,
      benchmarks and ``vitnp verify --compare-backends`` use this, since they must run the engine itself.

    A dtype's state: absent (try the cache), 'compiling' (another process compiles its kernels), 'ready' (that
    process has finished: try the cache again), 'foreground' (compile what is missing here).
    """

    def __init__(self):
        self.lock = threading.Lock()
        self.states = {}
        self.compilers = {}  # dtype -> the process compiling its kernels, until it is known to have finished
        self.model = None  # (class, config, (C, H, W), dtype) of the last model that checked an input
        self.forced_mode = None
        self.ops_built = False  # set by TieredOps

    def active(self):
        """Whether fast ops of this process hold back kernels that are not compiled (a fast model has been built, and
        ``VITNP_COMPILE`` is 'background')."""
        return self.ops_built and self.mode() == "background"

    def mode(self):
        mode = self.forced_mode or os.environ.get("VITNP_COMPILE", "background")
        if mode not in COMPILE_MODES:
            raise ValueError(f"VITNP_COMPILE={mode!r}: expected one of {COMPILE_MODES}")
        return mode

    def state(self, dtype):
        if self.mode() == "wait":
            return "foreground"
        with self.lock:
            state = self.states.get(dtype)
            if state == "compiling" and self.compilers[dtype].poll() is not None:
                state = self.states[dtype] = "ready"
                del self.compilers[dtype]
            return state

    def held_back(self, arg_types):
        """The float dtypes of a kernel's array arguments whose kernels are not to be compiled here now."""
        dtypes = {str(t.dtype) for t in arg_types if isinstance(t, types.Array) and isinstance(t.dtype, types.Float)}
        return sorted(d for d in dtypes if self.state(d) != "foreground")

    def run(self, fast, reference, name, *args, **kwargs):
        """Fast op ``name`` (of ops module ``fast``) on ``args``, or its ``reference`` twin while the fast kernels it
        needs are being compiled. Called between every two kernels of a forward: the usual case, no compile going on
        and every kernel in the cache, costs one attribute test."""
        if self.compilers and self._compiling(args):
            return self._on_reference(reference, name, args, kwargs)
        try:
            return getattr(fast, name)(*args, **kwargs)
        except KernelsNotCompiled as missing:
            if self._after_miss(missing.dtypes):
                return getattr(fast, name)(*args, **kwargs)
            return self._on_reference(reference, name, args, kwargs)

    @staticmethod
    def _on_reference(reference, name, args, kwargs):
        """The reference's op, its products on one BLAS thread: the compiling process has the other core, and a BLAS
        whose threads wait for a busy core runs several times slower than one thread."""
        with threads.single_threaded():
            return getattr(reference, name)(*args, **kwargs)

    def _compiling(self, args):
        """Whether another process compiles the kernels of the dtype of the op's first float array argument."""
        dtype = next((str(a.dtype) for a in args if isinstance(a, np.ndarray) and a.dtype.kind == "f"), None)
        return dtype is not None and self.state(dtype) == "compiling"

    def _after_miss(self, dtypes):
        """Start compiling the kernels of ``dtypes`` in another process, or, where that has been done already, mark
        them to be compiled here; whether the op can now run its fast kernels (compiling them here)."""
        with self.lock:
            for dtype in dtypes:
                state = self.states.get(dtype)
                if state == "ready":
                    self.states[dtype] = "foreground"
                elif state is None:
                    self.states[dtype] = self._start_compiler(dtype)
            return all(self.states[dtype] == "foreground" for dtype in dtypes)

    def _start_compiler(self, dtype):
        """Start a process that compiles the fast kernels of the last model run (or of every registered kind of
        model) for ``dtype``: 'compiling', or 'foreground' if no process can be started."""
        model = self.model if self.model is not None and self.model[3] == dtype else None
        try:
            payload = pickle.dumps(model)
        except Exception:  # a config that does not pickle: compile every kind of model's kernels instead
            payload = pickle.dumps(None)
        compile_it = f"from vitnp.kernel_cache import compile_from_stdin; compile_from_stdin({dtype!r})"
        command = [sys.executable, "-c", compile_it]
        # the same vitnp as this process's, compiling at once
        search_path = os.pathsep.join(filter(None, [_PACKAGE_PARENT, os.environ.get("PYTHONPATH")]))
        env = dict(os.environ, VITNP_COMPILE="wait", PYTHONPATH=search_path)
        try:
            process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL, start_new_session=True, env=env)
            process.stdin.write(payload)
            process.stdin.close()
        except OSError:
            return "foreground"
        self.compilers[dtype] = process
        return "compiling"

    def wait(self, timeout=None):
        """Wait until the kernels being compiled in other processes are ready, or ``timeout`` seconds have passed;
        whether they are."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for process in list(self.compilers.values()):
            try:
                process.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                return False
        return True


tiering = Tiering()


def wait_for_kernels(timeout=None):
    """Wait until the fast kernels being compiled in other processes for this one are ready (the next fast forward
    then runs the engine), or ``timeout`` seconds have passed; whether they are ready."""
    return tiering.wait(timeout)


def kernels_compiling():
    """Whether another process is compiling fast kernels for this one now (its fast ops meanwhile run on the
    reference's kernels)."""
    return any(tiering.state(dtype) == "compiling" for dtype in list(tiering.compilers))


def note_model(model, image_shape):
    """Remember the model that is about to run (its class, config, one image's shape, dtype, and whether its weights
    are read-only, as weights read from a file are: Numba compiles a kernel apart for read-only arrays): the one whose
    kernels a background compile compiles."""
    _, first = next(model.named_state())
    tiering.model = (type(model), model.cfg, tuple(image_shape), str(model.dtype), not first.flags.writeable)


def compile_in_foreground():
    """From now on this process compiles any missing kernel when it is first needed, as ``VITNP_COMPILE=wait``."""
    tiering.forced_mode = "wait"


class TieredOps:
    """The fast backend's ops as a model calls them (``module.ops``): each op of :mod:`vitnp.fast.ops` through
    :meth:`Tiering.run`, so that a cold cache does not make the first forward wait; other names are the engine's."""

    def __init__(self):
        _compile_events()  # the listener that holds kernels back
        tiering.ops_built = True
        self._fast = importlib.import_module(".fast.ops", __package__)
        reference = importlib.import_module(".reference.ops", __package__)
        for name in reference.__all__:
            if callable(getattr(self._fast, name, None)):
                setattr(self, name, functools.partial(tiering.run, self._fast, reference, name))

    def __getattr__(self, name):
        return getattr(self.__dict__["_fast"], name)
