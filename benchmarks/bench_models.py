"""Time vitnp against torch eager on the same model, weights, input and thread count, alternating in one run.

    python benchmarks/bench_models.py [--models NAME ...] [--batch 1 8] [--threads 2] [--repeats N] [--per-op]

Any name that both vitnp and timm register works. For each (model, batch, threads) it builds the timm model with
random weights (pretrained=False), loads the same weights into vitnp, warms both up, then times one forward of each
engine per repeat, alternating which goes first, and prints medians: ms per image, images/s, the ratio vitnp/torch
and the largest logit difference. It also prints the BLAS library and kernel in use with the thread counts, and the
Numba start-up cost: import + first forward with an empty Numba cache (cold compile) and with a warm one.

OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE are removed from the environment for this run (the script re-executes itself
before NumPy is imported): on this machine they pin OpenBLAS to slower kernels than it picks itself.

Needs torch, timm and threadpoolctl (the test extra) besides vitnp.
"""

import os
import sys

_OPENBLAS_OVERRIDES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


def restart_without_openblas_overrides(script):
    """Re-execute ``script`` (with this process's arguments) without the OpenBLAS variables, if any is set. OpenBLAS
    reads them once, when it is loaded: call this before anything imports NumPy."""
    if any(name in os.environ for name in _OPENBLAS_OVERRIDES):
        env = {k: v for k, v in os.environ.items() if k not in _OPENBLAS_OVERRIDES}
        env["VITNP_BENCH_UNSET"] = " ".join(f"{k}={os.environ[k]}" for k in _OPENBLAS_OVERRIDES if k in os.environ)
        os.execve(sys.executable, [sys.executable, os.path.abspath(script), *sys.argv[1:]], env)


if __name__ == "__main__":
    restart_without_openblas_overrides(__file__)

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from contextlib import contextmanager  # noqa: E402

DEFAULT_MODELS = ["vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", nargs="+", default=DEFAULT_MODELS, help="registered names (vitnp and timm)")
    p.add_argument("--batch", nargs="+", type=int, default=[1, 8], help="batch sizes (default 1 8)")
    p.add_argument("--threads", nargs="+", type=int, default=[2], help="thread counts, same for every engine")
    p.add_argument("--numba-threads", type=int, help="Numba's thread count, if not --threads (BLAS keeps --threads)")
    p.add_argument("--repeats", type=int, default=7, help="timed forwards per engine; the median is reported")
    p.add_argument("--warmup", type=int, default=2, help="untimed forwards per engine first")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--per-op", action="store_true", help="also break vitnp's forward down by op (wall clock)")
    p.add_argument("--no-startup", action="store_true", help="skip the Numba cold / cached start-up measurement")
    p.add_argument("--startup-model", help="model for the start-up measurement (default: the first of --models)")
    p.add_argument("--json", metavar="PATH", help="also write every figure to PATH as JSON")
    p.add_argument("--no-onnxruntime", action="store_true", help="leave onnxruntime out even when it is installed")
    p.add_argument("--memory", action="store_true", help="also measure each engine's peak RSS in a fresh process")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------- environment


def blas_report():
    """One line per native thread pool threadpoolctl finds (BLAS and OpenMP): library, kernel, threads."""
    from threadpoolctl import threadpool_info

    lines = []
    for pool in threadpool_info():
        details = [f"{pool['user_api']}: {pool['internal_api']} {pool.get('version') or ''}".rstrip()]
        if pool.get("architecture"):
            details.append(f"kernel {pool['architecture']}")
        if pool.get("threading_layer"):
            details.append(f"threading {pool['threading_layer']}")
        details.append(f"num_threads {pool['num_threads']}")
        details.append(os.path.basename(pool["filepath"]))
        lines.append(", ".join(details))
    return lines


def numba_report():
    import numba

    try:
        layer = numba.threading_layer()  # known only once a parallel kernel has run
    except ValueError:
        layer = "(no parallel kernel run yet)"
    return (
        f"numba {numba.__version__}: threading layer {layer} (config {numba.config.THREADING_LAYER!r}), "
        f"num_threads {numba.get_num_threads()} of {numba.config.NUMBA_NUM_THREADS}"
    )


def engine_versions():
    import importlib.metadata

    return [f"{e.name} {importlib.metadata.version(e.name)}" for e in ENGINES]


def machine_report():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = f"{names[0]} x {len(names)}" if names else cpu
    except OSError:
        pass
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return f"{cpu}; os.cpu_count() {os.cpu_count()}; load average {load}"


class Threads:
    """Sets torch's, vitnp's (BLAS, Numba, batch chunks) thread counts together and keeps the BLAS limit in force."""

    def __init__(self):
        from threadpoolctl import ThreadpoolController

        self.controller = ThreadpoolController()
        self.limit = None

    def set(self, n, numba_threads=None):
        import numba
        import torch

        import vitnp

        if self.limit is not None:
            self.limit.restore_original_limits()
        torch.set_num_threads(n)
        self.limit = self.controller.limit(limits=n, user_api="blas")
        vitnp.set_num_threads(n)  # the BLAS's threads (again), Numba's and the chunks a batch is split into
        numba.set_num_threads(numba_threads or n)
        for engine in ENGINES:
            engine.threads = n


# ----------------------------------------------------------------------------------------------- engines
# An engine turns (timm model, state_dict, dtype) into a function images -> logits (NumPy in, NumPy out).
# vitnp is the engine under test; every other engine is a reference it is compared with.


class VitnpEngine:
    name = "vitnp"

    def prepare(self, model_name, timm_model, state_dict, dtype):
        import vitnp

        model = vitnp.create_model(model_name, weights=state_dict, dtype=dtype)
        self.model = model
        return model


class TorchEngine:
    name = "torch"

    def prepare(self, model_name, timm_model, state_dict, dtype):
        import torch

        timm_model = timm_model.to(getattr(torch, dtype)).eval()

        def forward(x):
            with torch.inference_mode():
                return timm_model(torch.from_numpy(x)).numpy()

        return forward


class OnnxRuntimeEngine:
    """The timm model exported to ONNX (same weights), run by onnxruntime's CPU provider with the current threads."""

    name = "onnxruntime"

    def __init__(self, workdir):
        self.workdir = workdir
        self.threads = 1
        self.paths = {}  # model name -> its .onnx file

    @staticmethod
    def available(dtype):
        import importlib.util

        return dtype == "float32" and all(importlib.util.find_spec(m) for m in ("onnxruntime", "onnx"))

    def export(self, model_name, timm_model):
        import torch

        path = os.path.join(self.workdir, f"{model_name}.onnx")
        images = torch.zeros(1, *timm_model.pretrained_cfg["input_size"])
        with warnings.catch_warnings():  # the TorchScript exporter's deprecation and tracer notes
            warnings.simplefilter("ignore")
            torch.onnx.export(
                timm_model, (images,), path, input_names=["images"], output_names=["logits"],
                dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17, dynamo=False,
            )
        return path

    def prepare(self, model_name, timm_model, state_dict, dtype):
        import onnxruntime

        path = self.paths[model_name] = self.export(model_name, timm_model)
        sessions = {}

        def forward(x):
            if self.threads not in sessions:
                options = onnxruntime.SessionOptions()
                options.intra_op_num_threads = self.threads
                options.inter_op_num_threads = 1
                options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
                options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
                sessions[self.threads] = onnxruntime.InferenceSession(
                    path, options, providers=["CPUExecutionProvider"]
                )
            return sessions[self.threads].run(None, {"images": x})[0]

        return forward


ENGINES = [VitnpEngine(), TorchEngine()]  # main() adds OnnxRuntimeEngine when onnxruntime is installed


def build_case(model_name, dtype):
    """The timm model with random weights and the same weights as a {key: ndarray} state_dict."""
    import timm
    import torch

    torch.manual_seed(0)
    timm_model = timm.create_model(model_name, pretrained=False).eval()
    state_dict = {k: v.detach().numpy().copy() for k, v in timm_model.state_dict().items()}
    return timm_model, state_dict


# ----------------------------------------------------------------------------------------------- timing


PAUSE_S = 0.1


def time_alternating(forwards, x, warmup, repeats):
    """Median seconds per forward of each engine; the engines take turns, and the order flips every repeat.

    Each timed forward starts after a pause of :data:`PAUSE_S`: torch's OpenMP threads, onnxruntime's and vitnp's
    helpers keep spinning for a while after a forward, and would otherwise take a core from the next engine.
    """
    for _ in range(warmup):
        for forward in forwards.values():
            forward(x)
    samples = {name: [] for name in forwards}
    order = list(forwards)
    gc.disable()
    try:
        for r in range(repeats):
            for name in order if r % 2 == 0 else order[::-1]:
                time.sleep(PAUSE_S)
                start = time.perf_counter()
                forwards[name](x)
                samples[name].append(time.perf_counter() - start)
    finally:
        gc.enable()
    return {name: statistics.median(s) for name, s in samples.items()}


def flops_per_image(timm_model, image_shape):
    """FLOPs of one forward of one image (2 per multiply-add of every matmul / conv / attention), torch's count."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        timm_model(torch.zeros(1, *image_shape))
    return counter.get_total_flops()


_GEMM_PEAK = {}


def gemm_peak(n_threads, size=2048, repeats=5):
    """GFLOP/s of NumPy's BLAS on a square float32 GEMM with the current thread count: the measured peak."""
    import numpy as np

    if n_threads not in _GEMM_PEAK:
        rng = np.random.default_rng(0)
        a, b = (rng.standard_normal((size, size)).astype(np.float32) for _ in range(2))
        a @ b
        best = min(_timed(lambda: a @ b) for _ in range(repeats))
        _GEMM_PEAK[n_threads] = 2 * size**3 / best / 1e9
    return _GEMM_PEAK[n_threads]


def _timed(function):
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def run_benchmarks(args, threads):
    import numpy as np

    rows, breakdowns = [], []
    rng = np.random.default_rng(0)
    for model_name in args.models:
        timm_model, state_dict = build_case(model_name, args.dtype)
        forwards = {e.name: e.prepare(model_name, timm_model, state_dict, args.dtype) for e in ENGINES}
        vitnp_model = ENGINES[0].model
        image_shape = (vitnp_model.in_chans, *vitnp_model.img_size)
        flops = flops_per_image(timm_model, image_shape)
        for n_threads in args.threads:
            threads.set(n_threads, args.numba_threads)
            peak = gemm_peak(n_threads)
            for batch in args.batch:
                x = rng.standard_normal((batch, *image_shape)).astype(args.dtype)
                logits = {name: np.asarray(f(x)) for name, f in forwards.items()}
                seconds = time_alternating(forwards, x, args.warmup, args.repeats)
                row = dict(model=model_name, batch=batch, threads=n_threads, dtype=args.dtype)
                row.update(gflop_per_img=flops / 1e9, gemm_peak_gflops=peak)
                for name, s in seconds.items():
                    row[f"{name}_ms_per_img"] = 1e3 * s / batch
                    row[f"{name}_img_per_s"] = batch / s
                    row[f"{name}_gflops"] = flops * batch / s / 1e9
                    row[f"{name}_peak_fraction"] = row[f"{name}_gflops"] / peak
                for name in seconds:
                    if name != "vitnp":
                        row[f"vitnp/{name}"] = seconds["vitnp"] / seconds[name]
                        row[f"max_abs_diff_{name}"] = float(np.abs(logits["vitnp"] - logits[name]).max())
                rows.append(row)
                print(format_row(row), flush=True)
                if args.per_op:
                    breakdowns.append((row, per_op_breakdown(vitnp_model, x, args.repeats)))
    for row, breakdown in breakdowns:
        print_per_op(row, *breakdown)
    return rows


def format_header():
    others = [e.name for e in ENGINES[1:]]
    cols = ["model", "batch", "thr", "vitnp ms/img"]
    cols += [f"{o} ms/img" for o in others] + [f"vitnp/{o}" for o in others]
    cols += ["vitnp img/s"] + [f"{o} img/s" for o in others] + ["GFLOP/img"]
    cols += [f"{e.name} GFLOP/s (% peak)" for e in ENGINES] + [f"max|dlogit| {o}" for o in others]
    return "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols)


def format_row(row):
    others = [e.name for e in ENGINES[1:]]
    cells = [row["model"], str(row["batch"]), str(row["threads"]), f"{row['vitnp_ms_per_img']:.1f}"]
    cells += [f"{row[f'{o}_ms_per_img']:.1f}" for o in others]
    cells += [f"{row[f'vitnp/{o}']:.2f}" for o in others]
    cells += [f"{row['vitnp_img_per_s']:.1f}"] + [f"{row[f'{o}_img_per_s']:.1f}" for o in others]
    cells += [f"{row['gflop_per_img']:.2f}"]
    cells += [f"{row[f'{e.name}_gflops']:.0f} ({100 * row[f'{e.name}_peak_fraction']:.0f}%)" for e in ENGINES]
    cells += [f"{row[f'max_abs_diff_{o}']:.1e}" for o in others]
    return "| " + " | ".join(cells) + " |"


# ----------------------------------------------------------------------------------------------- per-op breakdown


class OpProfiler:
    """Wall-clock time of each module call and each ``ops`` / ``kernels`` function call in vitnp's forward.

    Every vitnp ``Module`` subclass's ``__call__`` and every public function of ``vitnp.ops`` and ``vitnp.kernels``
    is wrapped while profiling. Time is *exclusive*: a module's own line is what its ``__call__`` spends outside the
    calls it makes to wrapped modules and functions (for a ViT ``Block``: the residual adds; for ``Attention``: the
    q scaling, the two attention matmuls and the head reshapes). Labels are parameter paths with the block indices
    folded (``blocks.*.attn.qkv``), and ``path: function`` for a function called by a module, so the breakdown works
    for every family without knowing it. Each thread keeps its own stack: a batch runs as one chunk per thread.
    """

    def __init__(self, model):
        self.model = model
        self.paths = {}
        for path, module in model.named_modules():
            label = ".".join("*" if part.isdigit() else part for part in path.rstrip(".").split("."))
            self.paths[id(module)] = label or type(model).__name__
        self.totals = {}
        self.calls = {}
        self.lock = threading.Lock()
        self.local = threading.local()  # each thread's own stack of [label, start, time spent in wrapped callees]

    @property
    def stack(self):
        if not hasattr(self.local, "stack"):
            self.local.stack = []
        return self.local.stack

    def _enter(self, label):
        self.stack.append([label, time.perf_counter(), 0.0])

    def _exit(self):
        stack = self.stack
        label, start, inner = stack.pop()
        elapsed = time.perf_counter() - start
        with self.lock:
            self.totals[label] = self.totals.get(label, 0.0) + elapsed - inner
            self.calls[label] = self.calls.get(label, 0) + 1
        if stack:
            stack[-1][2] += elapsed

    @contextmanager
    def active(self):
        import vitnp.kernels
        import vitnp.model
        import vitnp.ops
        import vitnp.threads

        patched = []
        profiler = self

        def module_call(original):
            def __call__(module, *a, **kw):
                profiler._enter(profiler.paths.get(id(module), type(module).__name__))
                try:
                    return original(module, *a, **kw)
                finally:
                    profiler._exit()

            return __call__

        def function_call(original, name):
            def call(*a, **kw):
                parent = profiler.stack[-1][0] if profiler.stack else ""
                profiler._enter(f"{parent}: {name}")
                try:
                    return original(*a, **kw)
                finally:
                    profiler._exit()

            return call

        classes = set()
        for _, module in self.model.named_modules():
            for cls in type(module).__mro__:
                if issubclass(cls, vitnp.model.Module) and "__call__" in cls.__dict__:
                    classes.add(cls)
        for cls in classes:
            patched.append((cls, "__call__", cls.__dict__["__call__"]))
            setattr(cls, "__call__", module_call(cls.__dict__["__call__"]))
        for mod in (vitnp.ops, vitnp.kernels):
            for name, value in list(vars(mod).items()):
                if callable(value) and not name.startswith("_") and getattr(value, "__module__", None) == mod.__name__:
                    if isinstance(value, type):
                        continue
                    patched.append((mod, name, value))
                    setattr(mod, name, function_call(value, name))
        original_map_batch = vitnp.threads.map_batch  # its exclusive time: the caller waiting for the chunks
        patched.append((vitnp.threads, "map_batch", original_map_batch))
        vitnp.threads.map_batch = function_call(original_map_batch, "map_batch")
        try:
            yield self
        finally:
            for owner, name, original in reversed(patched):
                setattr(owner, name, original)


def per_op_breakdown(model, x, repeats):
    """(seconds per forward under the profiler, {label: (exclusive seconds per forward, calls per forward)})."""
    model(x)
    profiler = OpProfiler(model)
    with profiler.active():
        start = time.perf_counter()
        for _ in range(repeats):
            model(x)
        total = (time.perf_counter() - start) / repeats
    ops = {label: (t / repeats, profiler.calls[label] // repeats) for label, t in profiler.totals.items()}
    return total, ops


def print_per_op(row, total, ops):
    batch = row["batch"]
    waiting = {label: ops.pop(label) for label in list(ops) if label.endswith(": map_batch")}
    measured = sum(t for t, _ in ops.values())
    print(f"\nper-op breakdown of vitnp, {row['model']} batch {batch}, {row['threads']} threads: "
          f"{1e3 * total / batch:.2f} ms/img under the profiler (exclusive time per label on the thread that ran it, "
          f"summed over threads: {1e3 * measured / batch:.2f} ms/img)")
    print("| op | thread ms/img | share | calls/forward |\n|---|---|---|---|")
    for label, (t, calls) in sorted(ops.items(), key=lambda item: -item[1][0]):
        print(f"| {label} | {1e3 * t / batch:.3f} | {100 * t / measured:.1f}% | {calls} |")
    for label, (t, _) in waiting.items():
        print(f"(not in the table: {label}, the calling thread waiting for the chunks, {1e3 * t / batch:.3f} ms/img)")


# ----------------------------------------------------------------------------------------------- start-up

_STARTUP_CODE = """
import json, sys, time
start = time.perf_counter()
import numpy as np
import vitnp
imported = time.perf_counter()
model = vitnp.create_model(sys.argv[1])
created = time.perf_counter()
x = np.zeros((1, model.in_chans, *model.img_size), np.float32)
model(x)
first = time.perf_counter()
model(x)
second = time.perf_counter()
print(json.dumps(dict(import_s=imported - start, create_s=created - imported, first_forward_s=first - created,
                      second_forward_s=second - first)))
"""


def measure_startup(model_name):
    """Two fresh interpreters sharing one new NUMBA_CACHE_DIR: the first compiles every kernel, the second loads."""
    results = {}
    with tempfile.TemporaryDirectory(prefix="vitnp-numba-cache-") as cache_dir:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache_dir}
        for state in ("cold", "cached"):
            start = time.perf_counter()
            out = subprocess.run(
                [sys.executable, "-c", _STARTUP_CODE, model_name], env=env, capture_output=True, text=True, check=True
            )
            result = json.loads(out.stdout.strip().splitlines()[-1])
            result["process_s"] = time.perf_counter() - start
            results[state] = result
    return results


def print_startup(model_name, results):
    print(f"\nNumba start-up, {model_name} batch 1 (fresh interpreter, fresh NUMBA_CACHE_DIR for 'cold'):")
    print("| cache | import vitnp s | create_model s | first forward s | second forward s | whole process s |")
    print("|---|---|---|---|---|---|")
    for state, r in results.items():
        print(
            f"| {state} | {r['import_s']:.2f} | {r['create_s']:.2f} | {r['first_forward_s']:.2f} "
            f"| {r['second_forward_s']:.3f} | {r['process_s']:.2f} |"
        )
    compile_s = results["cold"]["first_forward_s"] - results["cached"]["first_forward_s"]
    print(f"cold compile cost (first forward, cold - cached): {compile_s:.2f} s")


# ----------------------------------------------------------------------------------------------- memory

_MEMORY_CODE = {
    "vitnp": """
import vitnp
vitnp.set_num_threads(THREADS)
report("imports")
model = vitnp.create_model(NAME, weights=NPZ)  # the .npz is memory-mapped, not read into memory
x = np.zeros((1, model.in_chans, *model.img_size), np.float32)
model(x)
""",
    "torch": """
import torch, timm
torch.set_num_threads(THREADS)
report("imports")
model = timm.create_model(NAME, pretrained=False).eval()
model.load_state_dict({k: torch.from_numpy(v) for k, v in np.load(NPZ).items()})
with torch.inference_mode():
    model(torch.zeros(1, *model.pretrained_cfg["input_size"]))
""",
    "onnxruntime": """
import onnxruntime
report("imports")
options = onnxruntime.SessionOptions()
options.intra_op_num_threads = THREADS
session = onnxruntime.InferenceSession(ONNX, options, providers=["CPUExecutionProvider"])
shape = [1 if isinstance(d, str) else d for d in session.get_inputs()[0].shape]
session.run(None, {session.get_inputs()[0].name: np.zeros(shape, np.float32)})
""",
}

_MEMORY_PRELUDE = """
import json, sys
import numpy as np
NAME, NPZ, ONNX, THREADS = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
marks = {}
def report(mark):  # peak RSS so far, MiB: VmHWM starts afresh at exec (ru_maxrss would carry the parent's peak over)
    with open("/proc/self/status") as status:
        marks[mark] = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024
"""


def measure_memory(model_name, state_dict, onnx_path, n_threads, workdir):
    """Peak RSS (MiB) of a fresh interpreter per engine: after its imports, and after one batch-1 forward."""
    from vitnp.weights import save_npz

    npz_path = os.path.join(workdir, f"{model_name}.npz")
    save_npz(npz_path, state_dict)  # as `vitnp export` writes it: every array aligned and memory-mapped
    results = {"weights_mib": os.path.getsize(npz_path) / 2**20}
    for engine in ENGINES:
        code = _MEMORY_PRELUDE + _MEMORY_CODE[engine.name] + "report('forward')\nprint(json.dumps(marks))\n"
        argv = [sys.executable, "-c", code, model_name, npz_path, onnx_path or "", str(n_threads)]
        out = subprocess.run(argv, capture_output=True, text=True, check=True)
        results[engine.name] = json.loads(out.stdout.strip().splitlines()[-1])
    return results


def print_memory(model_name, results):
    print(f"\npeak RSS, {model_name} batch 1, fresh interpreter per engine (weights: {results['weights_mib']:.0f} MiB .npz)")
    print("| engine | after imports MiB | after the first forward MiB |\n|---|---|---|")
    for engine in ENGINES:
        marks = results[engine.name]
        print(f"| {engine.name} | {marks['imports']:.0f} | {marks['forward']:.0f} |")


# ----------------------------------------------------------------------------------------------- main


def main(argv=None):
    args = parse_args(argv)
    if max(args.threads) > (os.cpu_count() or 1):
        os.environ["NUMBA_NUM_THREADS"] = str(max(args.threads))  # numba.set_num_threads cannot exceed it
    import numba
    import numpy as np
    import torch

    import vitnp

    workdir = tempfile.mkdtemp(prefix="vitnp-bench-")
    if not args.no_onnxruntime and OnnxRuntimeEngine.available(args.dtype):
        ENGINES.append(OnnxRuntimeEngine(workdir))
    threads = Threads()
    threads.set(args.threads[0])
    overrides = [name for name in _OPENBLAS_OVERRIDES if name in os.environ]
    unset = os.environ.get("VITNP_BENCH_UNSET") or "none were set"
    print(f"machine: {machine_report()}")
    print(f"python {platform.python_version()}, numpy {np.__version__}, torch {torch.__version__}, vitnp {vitnp.__version__}")
    print(f"OpenBLAS overrides in force: {overrides or 'none'} (unset for this run: {unset})")
    print(f"torch threads {torch.get_num_threads()}, interop {torch.get_num_interop_threads()}")
    print("thread pools (threadpoolctl):")
    for line in blas_report():
        print(f"  {line}")
    print(f"  {numba_report()}")
    print(f"engines: {', '.join(engine_versions())}")
    print(f"measured GEMM peak (float32 2048^3 through NumPy's BLAS): "
          + ", ".join(f"{n} threads {gemm_peak(n):.0f} GFLOP/s" for n in args.threads))

    print(f"\nfp {args.dtype}, median of {args.repeats} alternating repeats after {args.warmup} warm-up forwards")
    print(format_header())
    rows = run_benchmarks(args, threads)

    print("\nthread pools after the run:")
    for line in blas_report():
        print(f"  {line}")
    print(f"  {numba_report()}")
    print(f"  torch: {torch.get_num_threads()} threads")
    del numba

    memory = {}
    if args.memory:
        onnx_engine = next((e for e in ENGINES if e.name == "onnxruntime"), None)
        for model_name in args.models:
            onnx = onnx_engine.paths.get(model_name) if onnx_engine else None
            memory[model_name] = measure_memory(model_name, build_case(model_name, args.dtype)[1], onnx,
                                                args.threads[0], workdir)
            print_memory(model_name, memory[model_name])

    startup = None
    if not args.no_startup:
        startup_model = args.startup_model or args.models[0]
        startup = measure_startup(startup_model)
        print_startup(startup_model, startup)

    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(rows=rows, memory=memory, startup=startup, blas=blas_report(), numba=numba_report()), f,
                      indent=1)
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
