"""The engine's choices that depend on the CPU: measured on it once, then kept with the kernel cache.

Some of the engine's settings have no answer that holds on every CPU: how deep a GEMM's blocks of weights should be
depends on how many fused multiply-adds a core issues a cycle against how fast its L2 cache feeds the L1. Such a
setting is a parameter of one kernel (not a copy of the kernel per CPU), and a :class:`MeasuredSetting` picks its
value by timing the candidates on this CPU, the first time an op needs it. The choice is written to a small file in the
kernel cache's folder, named after the CPU (its model, LLVM's name for it, its features and cache sizes), so that later
processes on the same kind of machine read it instead of measuring, and a cache folder shared by different machines
keeps one file each.

A choice may only change speed, never a bit of the results, so that two machines that choose differently still agree.
``VITNP_<NAME>`` in the environment (e.g. ``VITNP_GEMM_PANEL_BLOCK=0``), as a process first needs the setting, sets
it instead of measuring it.
"""

import functools
import hashlib
import json
import os
import platform
import tempfile
import threading

import llvmlite.binding
import numpy as np

_lock = threading.Lock()
_measuring = True


def defer_measuring():
    """In this process, use each setting's first candidate where no choice is kept, without measuring or keeping one:
    a process that compiles kernels while others run (``vitnp compile``'s workers, the background compiler) would
    time the candidates against that load."""
    global _measuring
    _measuring = False


@functools.lru_cache(maxsize=1)
def cpu_description():
    """This CPU as the tuning files name it: its model, LLVM's name and features for it, and its cache sizes (read
    once per process)."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), model)
    except OSError:
        pass
    caches = []
    folder = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for index in sorted(os.listdir(folder)):
            with open(os.path.join(folder, index, "level")) as level, open(os.path.join(folder, index, "size")) as size:
                caches.append(f"L{level.read().strip()} {size.read().strip()}")
    except OSError:
        pass
    features = llvmlite.binding.get_host_cpu_features().flatten()
    return f"{model}; {llvmlite.binding.get_host_cpu_name()}; {', '.join(caches)}; {features}"


def _settings_path(folder):
    digest = hashlib.sha256(cpu_description().encode()).hexdigest()[:16]
    return os.path.join(folder, f"vitnp-tuning-{digest}.json")


def _read_settings(path):
    try:
        with open(path) as file:
            settings = json.load(file)
    except (OSError, ValueError, RecursionError):  # unreadable, not JSON, nested past the parser's depth
        return {}
    return settings if isinstance(settings, dict) else {}


def _keep(path, key, entry):
    """Add ``entry`` under ``key`` to the settings file at ``path``, written whole (a reader never sees half of it);
    a folder that cannot be written keeps nothing (the choice is measured again in the next process)."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        settings = _read_settings(path)
        settings["cpu"] = cpu_description()
        settings[key] = entry
        handle, temporary = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        with os.fdopen(handle, "w") as file:
            json.dump(settings, file, indent=1)
        os.replace(temporary, path)
    except OSError:
        pass


class MeasuredSetting:
    """A setting of the engine whose value is one of ``candidates`` (ints; the first is the default), chosen per dtype
    on this CPU: ``setting(dtype)``.

    ``make_timer(dtype)`` gives ``seconds(candidate)``, the time of one run of the op the setting sets; it is made only
    when a measurement is due. The candidates run in ``rounds`` interleaved rounds after one run each to warm up, and
    the best time of each counts. Another candidate must beat the first by ``margin`` to be chosen: a difference within
    the noise of a shared machine keeps the default. Measured once per process at most, then kept in the settings file
    for this CPU in ``folder()`` and read from there; a value in the environment (``VITNP_<NAME>``) comes first, and a
    kept value that is not a candidate is measured again.
    """

    def __init__(self, name, candidates, make_timer, folder, rounds=5, margin=0.03):
        self.name, self.candidates, self.make_timer, self.folder = name, tuple(candidates), make_timer, folder
        self.rounds, self.margin = rounds, margin
        self.variable = f"VITNP_{name.upper()}"
        self.chosen = {}  # dtype (as given, and its name) -> the value chosen in this process

    def __call__(self, dtype):
        try:
            return self.chosen[dtype]
        except KeyError:
            pass
        dtype_name = np.dtype(dtype).name
        with _lock:
            if dtype_name not in self.chosen:
                choice = self._choose(dtype_name)
                if choice is None:  # deferred: the default for now, the choice when a later call may measure
                    return self.candidates[0]
                self.chosen[dtype_name] = choice
            self.chosen[dtype] = self.chosen[dtype_name]
            return self.chosen[dtype]

    def _choose(self, dtype_name):
        listed = ", ".join(map(str, self.candidates))
        if self.variable in os.environ:
            text = os.environ[self.variable]
            if text.strip() not in [str(candidate) for candidate in self.candidates]:
                raise ValueError(f"{self.variable}={text!r}: expected one of {listed}")
            return int(text)
        key = f"{self.name}/{dtype_name}"
        path = _settings_path(self.folder())
        kept = _read_settings(path).get(key)
        choice = kept.get("choice") if isinstance(kept, dict) else None
        if type(choice) is int and choice in self.candidates:  # not 0.0 or True, which equal candidates
            return choice
        if not _measuring:
            return None
        seconds, best = self.make_timer(np.dtype(dtype_name)), {}
        for candidate in self.candidates:  # warm-up: the first run of a kernel may load it from the cache
            seconds(candidate)
        for _ in range(self.rounds):
            for candidate in self.candidates:
                elapsed = seconds(candidate)
                best[candidate] = min(best.get(candidate, elapsed), elapsed)
        default = self.candidates[0]
        choice = min(self.candidates, key=best.__getitem__)
        if best[choice] > (1 - self.margin) * best[default]:
            choice = default
        _keep(path, key, {"choice": choice, "seconds": {str(c): best[c] for c in self.candidates}})
        return choice
