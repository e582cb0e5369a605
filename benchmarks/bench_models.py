"""Time vitnp's two backends against torch eager, onnxruntime and OpenVINO: same model, weights, input and thread
count, the engines taking turns in one process.

    python benchmarks/bench_models.py [--models NAME ...] [--batch 1 8] [--threads 2] [--repeats 7]
                                      [--reference-repeats 3] [--engines ...] [--memory] [--per-op] [--json PATH]

Any name that both vitnp and timm register works. For each model it builds the timm model with random weights
(pretrained=False), loads the same weights into vitnp (backend 'fast' and backend 'reference') and exports the timm
model to ONNX for onnxruntime and OpenVINO. OpenVINO compiles that file for the CPU with a static input shape per
batch size, ``INFERENCE_PRECISION_HINT`` f32 (on a CPU with bf16 it would otherwise compute in bf16) and
``INFERENCE_NUM_THREADS`` the others' thread count. For each (thread count, batch) every engine runs one untimed
forward (its logits are compared with torch's) and ``--warmup`` more, then the engines take turns, one timed forward
each, the order flipping every round; the table gives per engine the median ms per batch, images/s, GFLOP/s, its time
over torch eager's and over the fastest peer's (peers: torch eager, onnxruntime and OpenVINO), the largest logit
difference from torch, and with ``--memory`` its peak RSS in a fresh process. The reference backend is slow: it runs
``--reference-repeats`` timed forwards and no warm-up beyond its first forward. Then the start-up of both vitnp
backends: import + create_model + first forward in a fresh interpreter, with an empty Numba cache (cold: every kernel
compiled) and with a filled one.

The run calls ``vitnp.memory.keep_freed_memory()`` (as the ``vitnp`` command does: glibc malloc keeps freed activation
memory for the next forward; the setting is process-wide, so every engine in this process runs with it), and so does
every fresh vitnp interpreter it starts. OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE are removed from the environment for
the run (the script re-executes itself before NumPy is imported): set, they override the kernel and cache size
OpenBLAS detects for this CPU (with slower ones on the machines measured so far). The CPU, the features GEMM
kernels are chosen by (FMA, AVX2, AVX-512 and its VNNI / bf16 / fp16 parts, AMX), the BLAS kernel OpenBLAS picked
(threadpoolctl) and every thread count are printed with the figures, and at the end the rows again with the engines
side by side, as benchmarks/README.md shows them.

Needs torch, timm and threadpoolctl (the test extra), and onnx with onnxruntime and / or openvino for the engines that
run the exported ONNX file (the bench extra: ``pip install -e .[bench]``).
"""

import os
import sys

OPENBLAS_OVERRIDES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


def restart_without_openblas_overrides(script):
    """Re-execute ``script`` (with this process's arguments) without the OpenBLAS variables, if any is set. OpenBLAS
    reads them once, when it is loaded: call this before anything imports NumPy."""
    if any(name in os.environ for name in OPENBLAS_OVERRIDES):
        env = {k: v for k, v in os.environ.items() if k not in OPENBLAS_OVERRIDES}
        env["VITNP_BENCH_UNSET"] = " ".join(f"{k}={os.environ[k]}" for k in OPENBLAS_OVERRIDES if k in os.environ)
        os.execve(sys.executable, [sys.executable, os.path.abspath(script), *sys.argv[1:]], env)


if __name__ == "__main__":
    restart_without_openblas_overrides(__file__)

# Time the engine's own kernels: a kernel missing from the cache is compiled at once, never run on the reference's
# kernels meanwhile (vitnp.compiling); child processes inherit it.
os.environ.setdefault("VITNP_COMPILE", "wait")

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from contextlib import contextmanager  # noqa: E402

from bench_startup import (  # noqa: E402 (this folder)
    VITNP_PRELUDE,
    cpu_report,
    gemm_features,
    measure_startup,
    print_startup,
)

DEFAULT_MODELS = ["vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224"]
ENGINE_CHOICES = ("vitnp-fast", "vitnp-reference", "torch", "onnxruntime", "openvino")
PEERS = ("torch eager", "onnxruntime", "openvino")  # the engines every engine's time is compared with
# VITNP_COMPILE of each backend's start-up measurement: the fast backend as it starts by default, its kernels compiled
# in the background; the reference compiles its kernels at once anyway
STARTUP_COMPILE = {"fast": "background", "reference": "wait"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", nargs="+", default=DEFAULT_MODELS, help="registered names (vitnp and timm)")
    p.add_argument("--batch", nargs="+", type=int, default=[1, 8], help="batch sizes (default 1 8)")
    p.add_argument("--threads", nargs="+", type=int, default=[2], help="thread counts, the same for every engine")
    p.add_argument("--repeats", type=int, default=7, help="timed forwards per engine; the median is reported")
    p.add_argument("--reference-repeats", type=int, default=3,
                   help="timed forwards of vitnp's reference backend (default 3: it is slow)")
    p.add_argument("--warmup", type=int, default=2, help="untimed forwards per engine after the first (not reference)")
    p.add_argument("--engines", nargs="+", choices=ENGINE_CHOICES, default=list(ENGINE_CHOICES),
                   help="engines to time (default all; onnxruntime and openvino only when installed and for "
                        "float32)")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--memory", action="store_true", help="also each engine's peak RSS, one fresh process per row")
    p.add_argument("--per-op", action="store_true", help="also break each vitnp forward down by op (wall clock)")
    p.add_argument("--no-startup", action="store_true", help="skip the start-up measurement")
    p.add_argument("--startup-model", help="model for the start-up measurement (default: the first of --models)")
    p.add_argument("--json", metavar="PATH", help="also write every figure to PATH as JSON")
    args = p.parse_args(argv)
    if min(args.repeats, args.reference_repeats) < 1:
        p.error("--repeats and --reference-repeats must be at least 1 (--engines leaves an engine out)")
    return args


# ----------------------------------------------------------------------------------------------- environment


def load_report():
    return ", ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "unknown"


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

    return f"numba {numba.__version__}: num_threads {numba.get_num_threads()} of {numba.config.NUMBA_NUM_THREADS}"


def package_versions(names):
    import importlib.metadata

    versions = []
    for name in names:
        try:
            versions.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return ", ".join(versions)


def set_threads(n, engines, blas_limits):
    """The same thread count for torch, vitnp (BLAS, Numba, its own threads), onnxruntime's sessions and OpenVINO's
    compiled models; the BLAS limit stays in force through threadpoolctl (``blas_limits``: the controller and the
    limit now in force)."""
    import torch

    import vitnp

    controller, limit = blas_limits
    if limit is not None:
        limit.restore_original_limits()
    torch.set_num_threads(n)
    vitnp.set_num_threads(n)
    for engine in engines:
        if isinstance(engine, OnnxFileEngine):  # its sessions are made per thread count, on first use
            engine.threads = n
    return controller, controller.limit(limits=n, user_api="blas")


# ----------------------------------------------------------------------------------------------- engines
# An engine turns (model name, timm model, state_dict, dtype) into a function images -> logits (NumPy in and out).


class VitnpEngine:
    def __init__(self, backend, repeats, warmup):
        self.backend = backend
        self.name = f"vitnp {backend}"
        self.repeats, self.warmup = repeats, warmup
        self.model = None  # the model prepared last (for --per-op)

    def prepare(self, model_name, timm_model, state_dict, dtype):
        import vitnp

        model = vitnp.create_model(model_name, weights=state_dict, dtype=dtype, backend=self.backend)
        self.model = model
        return model


class TorchEngine:
    name = "torch eager"

    def __init__(self, repeats, warmup):
        self.repeats, self.warmup = repeats, warmup

    def prepare(self, model_name, timm_model, state_dict, dtype):
        return torch_forward(timm_model, dtype)


def torch_forward(timm_model, dtype):
    import torch

    timm_model = timm_model.to(getattr(torch, dtype)).eval()

    def forward(x):
        with torch.inference_mode():
            return timm_model(torch.from_numpy(x)).numpy()

    return forward


def onnx_path(workdir, model_name):
    return os.path.join(workdir, f"{model_name}.onnx")


def export_onnx(model_name, timm_model, workdir):
    """The timm model as an ONNX file with a dynamic batch axis (float32), written once per model for the engines that
    read it (onnxruntime, OpenVINO); returns its path."""
    import torch

    path = onnx_path(workdir, model_name)
    if os.path.exists(path):
        return path
    images = torch.zeros(1, *timm_model.pretrained_cfg["input_size"])
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation and tracer notes
        warnings.simplefilter("ignore")
        torch.onnx.export(
            timm_model, (images,), path, input_names=["images"], output_names=["logits"],
            dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17, dynamo=False,
        )
    return path


class OnnxFileEngine:
    """An engine that runs the timm model exported to ONNX (same weights, float32) with the current thread count
    (``threads``, set by :func:`set_threads`); ``modules`` are the packages it needs."""

    modules = ()

    def __init__(self, repeats, warmup, workdir):
        self.repeats, self.warmup = repeats, warmup
        self.workdir = workdir
        self.threads = 1

    @classmethod
    def available(cls, dtype):
        import importlib.util

        return dtype == "float32" and all(importlib.util.find_spec(m) for m in cls.modules)


class OnnxRuntimeEngine(OnnxFileEngine):
    """The ONNX file run by onnxruntime's CPU provider: one session per thread count."""

    name = "onnxruntime"
    modules = ("onnxruntime", "onnx")

    def prepare(self, model_name, timm_model, state_dict, dtype):
        import onnxruntime

        path = export_onnx(model_name, timm_model, self.workdir)
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


class OpenVinoEngine(OnnxFileEngine):
    """The ONNX file compiled by OpenVINO for the CPU: one compiled model per (thread count, batch size), its input
    shape static; float32 arithmetic (INFERENCE_PRECISION_HINT f32), one inference at a time on the current thread
    count (PERFORMANCE_HINT LATENCY, INFERENCE_NUM_THREADS)."""

    name = "openvino"
    modules = ("openvino", "onnx")

    def prepare(self, model_name, timm_model, state_dict, dtype):
        path = export_onnx(model_name, timm_model, self.workdir)
        compiled = {}

        def forward(x):
            key = (self.threads, x.shape[0])
            if key not in compiled:
                compiled[key] = openvino_compile(path, x.shape, self.threads)
            return compiled[key]({0: x})[0]

        return forward


def openvino_compile(path, input_shape, threads):
    """The ONNX file at ``path`` compiled for the CPU with the static ``input_shape``: a callable, inputs -> outputs."""
    import openvino

    core = openvino.Core()
    model = core.read_model(path)
    model.reshape({model.inputs[0].get_any_name(): list(input_shape)})
    config = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
    return core.compile_model(model, "CPU", config)


def make_engines(args, workdir):
    engines = []
    for choice in args.engines:
        if choice == "vitnp-fast":
            engines.append(VitnpEngine("fast", args.repeats, args.warmup))
        elif choice == "vitnp-reference":
            engines.append(VitnpEngine("reference", args.reference_repeats, 0))
        elif choice == "torch":
            engines.append(TorchEngine(args.repeats, args.warmup))
        else:
            engine_class = OnnxRuntimeEngine if choice == "onnxruntime" else OpenVinoEngine
            if engine_class.available(args.dtype):
                engines.append(engine_class(args.repeats, args.warmup, workdir))
            else:
                print(f"{choice} left out: onnx + {choice} not installed, or --dtype float64")
    return engines


def build_case(model_name):
    """The timm model with random weights and the same weights as a {key: ndarray} state_dict."""
    import timm
    import torch

    torch.manual_seed(0)
    timm_model = timm.create_model(model_name, pretrained=False).eval()
    state_dict = {k: v.detach().numpy().copy() for k, v in timm_model.state_dict().items()}
    return timm_model, state_dict


# ----------------------------------------------------------------------------------------------- timing


PAUSE_S = 0.1


def time_alternating(engines, forwards, x):
    """Median seconds per forward of each engine: ``engine.warmup`` untimed forwards each, then rounds in which every
    engine with timed forwards left (``engine.repeats``) runs one, the order flipping every round.

    Each timed forward starts after a pause of :data:`PAUSE_S`: torch's OpenMP threads, onnxruntime's and vitnp's
    helpers keep spinning for a while after a forward, and would otherwise take a core from the next engine.
    """
    for engine in engines:
        for _ in range(engine.warmup):
            forwards[engine.name](x)
    samples = {engine.name: [] for engine in engines}
    gc.disable()
    try:
        for r in range(max(engine.repeats for engine in engines)):
            for engine in engines if r % 2 == 0 else engines[::-1]:
                if r < engine.repeats:
                    time.sleep(PAUSE_S)
                    start = time.perf_counter()
                    forwards[engine.name](x)
                    samples[engine.name].append(time.perf_counter() - start)
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


def gemm_peak(size=2048, repeats=5):
    """GFLOP/s of NumPy's BLAS on a square float32 GEMM with the current thread count: the measured peak."""
    import numpy as np

    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((size, size)).astype(np.float32) for _ in range(2))
    a @ b
    fastest = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        fastest = min(fastest, time.perf_counter() - start)
    return 2 * size**3 / fastest / 1e9


def run_benchmarks(args, engines, workdir):
    """One row per (model, threads, batch): every engine's figures (and with --memory its peak RSS), printed as
    measured; then the per-op breakdowns."""
    import numpy as np
    from threadpoolctl import ThreadpoolController

    blas_limits = (ThreadpoolController(), None)
    rows, breakdowns = [], []
    rng = np.random.default_rng(0)
    print_table_header(args, engines)
    for model_name in args.models:
        timm_model, state_dict = build_case(model_name)
        image_shape = tuple(timm_model.pretrained_cfg["input_size"])
        flops = flops_per_image(timm_model, image_shape)  # in float32, before an engine casts the timm model
        forwards = {e.name: e.prepare(model_name, timm_model, state_dict, args.dtype) for e in engines}
        torch_logits = torch_forward(timm_model, args.dtype)
        npz_path = write_npz(model_name, state_dict, workdir) if args.memory else None
        for n_threads in args.threads:
            blas_limits = set_threads(n_threads, engines, blas_limits)
            for batch in args.batch:
                x = rng.standard_normal((batch, *image_shape)).astype(args.dtype)
                expected = torch_logits(x)
                logit_diffs = {name: float(np.abs(np.asarray(f(x)) - expected).max()) for name, f in forwards.items()}
                seconds = time_alternating(engines, forwards, x)
                row = dict(model=model_name, batch=batch, threads=n_threads, dtype=args.dtype,
                           gflop_per_image=flops / 1e9, engines={})
                peer_seconds = [seconds[name] for name in PEERS if name in seconds]
                for engine in engines:
                    s = seconds[engine.name]
                    row["engines"][engine.name] = dict(
                        ms_per_batch=1e3 * s, images_per_s=batch / s, gflops=flops * batch / s / 1e9,
                        over_torch=s / seconds["torch eager"] if "torch eager" in seconds else None,
                        over_fastest_peer=s / min(peer_seconds) if peer_seconds else None,
                        max_abs_logit_diff=logit_diffs[engine.name], timed_forwards=engine.repeats,
                    )
                if args.memory:
                    onnx_file = onnx_path(workdir, model_name)
                    onnx_file = onnx_file if os.path.exists(onnx_file) else ""
                    for engine in engines:
                        row["engines"][engine.name]["peak_rss_mib"] = measure_memory(
                            engine, model_name, npz_path, onnx_file, batch, n_threads, args.dtype)
                rows.append(row)
                print_row(row, args.memory)
                if args.per_op:
                    for engine in engines:
                        if isinstance(engine, VitnpEngine):
                            breakdowns.append((row, engine.name, per_op_breakdown(engine.model, x, engine.repeats)))
    for row, engine_name, breakdown in breakdowns:
        print_per_op(row, engine_name, *breakdown)
    return rows


def print_table_header(args, engines):
    timed = ", ".join(f"{e.name} {e.repeats}" for e in engines)
    peers = ", ".join(p for p in PEERS if p in {e.name for e in engines}) or "(no peer timed)"
    print(f"\n{args.dtype}; medians of timed forwards ({timed}), engines alternating, after each engine's first "
          f"forward and {args.warmup} warm-up forwards (vitnp reference: none); / fastest peer: the engine's time over "
          f"the fastest of {peers}" + ("; peak RSS: a fresh process, one forward" if args.memory else ""))
    cols = ["model", "batch", "threads", "engine", "ms/batch", "images/s", "GFLOP/s", "/ torch eager",
            "/ fastest peer", "max abs logit diff vs torch"] + (["peak RSS MiB"] if args.memory else [])
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols), flush=True)


def print_row(row, memory):
    def ratio(value):
        return "-" if value is None else f"{value:.2f}"

    for name, e in row["engines"].items():
        cells = [row["model"], str(row["batch"]), str(row["threads"]), name, f"{e['ms_per_batch']:.1f}",
                 f"{e['images_per_s']:.2f}", f"{e['gflops']:.{0 if e['gflops'] >= 10 else 2}f}", ratio(e["over_torch"]),
                 ratio(e["over_fastest_peer"]), "-" if name == "torch eager" else f"{e['max_abs_logit_diff']:.1e}"]
        if memory:
            cells.append(f"{e['peak_rss_mib']:.0f}")
        print("| " + " | ".join(cells) + " |", flush=True)


SUMMARY_ENGINES = ("vitnp fast", "vitnp reference", "torch eager", "onnxruntime", "openvino")


def print_summary(rows, memory):
    """The rows again with the engines side by side, as benchmarks/README.md shows them: times and ratios, and with
    --memory the peak RSS ('-': an engine not timed)."""

    def cell(row, engine, key, digits):
        value = row["engines"].get(engine, {}).get(key)
        return "-" if value is None else f"{value:.{digits}f}"

    def over(row, numerator, denominator):
        engines = row["engines"]
        if numerator not in engines or denominator not in engines:
            return "-"
        return f"{engines[numerator]['ms_per_batch'] / engines[denominator]['ms_per_batch']:.2f}"

    print("\nsummary, ms per batch (median) and ratios of times (below 1: the first engine is faster):")
    print("| model | batch | threads | vitnp fast | vitnp reference | torch eager | onnxruntime | openvino "
          "| fast / torch | fast / fastest peer | reference / torch | reference / fast | max abs logit diff vs torch: "
          "fast, reference, onnxruntime, openvino |\n|" + "---|" * 13)
    for row in rows:
        diffs = ", ".join("-" if engine not in row["engines"] else f"{row['engines'][engine]['max_abs_logit_diff']:.1e}"
                          for engine in ("vitnp fast", "vitnp reference", "onnxruntime", "openvino"))
        cells = [row["model"], str(row["batch"]), str(row["threads"])]
        cells += [cell(row, engine, "ms_per_batch", 1) for engine in SUMMARY_ENGINES]
        cells += [over(row, "vitnp fast", "torch eager"), cell(row, "vitnp fast", "over_fastest_peer", 2),
                  over(row, "vitnp reference", "torch eager"), over(row, "vitnp reference", "vitnp fast"), diffs]
        print("| " + " | ".join(cells) + " |")
    if memory:
        print("\nsummary, peak RSS MiB (a fresh process: imports, model, one forward of the batch):")
        columns = ["model", "batch", "threads", *SUMMARY_ENGINES]
        print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
        for row in rows:
            cells = [row["model"], str(row["batch"]), str(row["threads"])]
            cells += [cell(row, engine, "peak_rss_mib", 0) for engine in SUMMARY_ENGINES]
            print("| " + " | ".join(cells) + " |")


# ----------------------------------------------------------------------------------------------- per-op breakdown


class OpProfiler:
    """Wall-clock time of each module call and each op call in a vitnp model's forward.

    Every vitnp ``Module`` subclass's ``__call__`` and every function of the model's ops module (``model.ops``:
    :mod:`vitnp.fast.ops` or :mod:`vitnp.reference.ops`, the same names) is wrapped while profiling. Time is
    *exclusive*: a module's own line is what its ``__call__`` spends outside the calls it makes to wrapped modules and
    ops (for a ViT ``Block``: the residual adds; for ``Attention``: the q scaling, the head reshapes). Labels are
    parameter paths with the block indices folded (``blocks.*.attn.qkv``), and ``path: op`` for an op called by a
    module, so the breakdown works for every family without knowing it. Each thread keeps its own stack: a batch runs
    as one chunk per thread.
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
        self.local = threading.local()  # each thread's stack of [label, start, time in wrapped callees, module label]

    @property
    def stack(self):
        if not hasattr(self.local, "stack"):
            self.local.stack = []
        return self.local.stack

    def _enter(self, label, module_label):
        self.stack.append([label, time.perf_counter(), 0.0, module_label])

    def _exit(self):
        stack = self.stack
        label, start, inner, _ = stack.pop()
        elapsed = time.perf_counter() - start
        with self.lock:
            self.totals[label] = self.totals.get(label, 0.0) + elapsed - inner
            self.calls[label] = self.calls.get(label, 0) + 1
        if stack:
            stack[-1][2] += elapsed

    @contextmanager
    def active(self):
        import vitnp.model

        profiler = self
        ops = self.model.ops
        patched = []

        def module_call(original):
            def __call__(module, *a, **kw):
                label = profiler.paths.get(id(module), type(module).__name__)
                profiler._enter(label, label)
                try:
                    return original(module, *a, **kw)
                finally:
                    profiler._exit()

            return __call__

        def op_call(original, name):
            def call(*a, **kw):
                module_label = profiler.stack[-1][3] if profiler.stack else ""
                profiler._enter(f"{module_label}: {name}", module_label)
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
        for name in ops.__all__:
            value = getattr(ops, name)
            if callable(value) and not isinstance(value, type):
                patched.append((ops, name, value))
                setattr(ops, name, op_call(value, name))
        try:
            yield self
        finally:
            for owner, name, original in reversed(patched):
                setattr(owner, name, original)


def per_op_breakdown(model, x, repeats):
    """(seconds per forward under the profiler, {label: (exclusive seconds per forward, calls per forward)})."""
    profiler = OpProfiler(model)
    with profiler.active():
        start = time.perf_counter()
        for _ in range(repeats):
            model(x)
        total = (time.perf_counter() - start) / repeats
    ops = {label: (t / repeats, profiler.calls[label] // repeats) for label, t in profiler.totals.items()}
    return total, ops


def print_per_op(row, engine_name, total, ops):
    batch = row["batch"]
    waiting = {label: ops.pop(label) for label in list(ops) if label.endswith(": map_batch")}
    measured = sum(t for t, _ in ops.values())
    print(f"\nper-op breakdown of {engine_name}, {row['model']} batch {batch}, {row['threads']} threads: "
          f"{1e3 * total / batch:.2f} ms/image under the profiler (exclusive time per label on the thread that ran "
          f"it, summed over threads: {1e3 * measured / batch:.2f} ms/image)")
    print("| op | thread ms/image | share | calls/forward |\n|---|---|---|---|")
    for label, (t, calls) in sorted(ops.items(), key=lambda item: -item[1][0]):
        print(f"| {label} | {1e3 * t / batch:.3f} | {100 * t / measured:.1f}% | {calls} |")
    for label, (t, _) in waiting.items():
        print(f"(not in the table: {label}, the calling thread waiting for the batch's chunks, "
              f"{1e3 * t / batch:.3f} ms/image)")


# ----------------------------------------------------------------------------------------------- fresh processes

_MEMORY_CODE = {
    "vitnp": VITNP_PRELUDE + """
NAME, NPZ, BATCH, THREADS, DTYPE, BACKEND = sys.argv[1:3] + [int(sys.argv[3]), int(sys.argv[4])] + sys.argv[5:7]
vitnp.set_num_threads(THREADS)
model = vitnp.create_model(NAME, weights=NPZ, dtype=DTYPE, backend=BACKEND)
model(np.zeros((BATCH, model.in_chans, *model.img_size), DTYPE))
""",
    "torch eager": """
import sys
import numpy as np
import torch, timm
NAME, NPZ, BATCH, THREADS, DTYPE = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
torch.set_num_threads(THREADS)
model = timm.create_model(NAME, pretrained=False).eval().to(getattr(torch, DTYPE))
model.load_state_dict({k: torch.from_numpy(v) for k, v in np.load(NPZ).items()})
with torch.inference_mode():
    model(torch.zeros(BATCH, *model.pretrained_cfg["input_size"], dtype=getattr(torch, DTYPE)))
""",
    "onnxruntime": """
import sys
import numpy as np
import onnxruntime
ONNX, BATCH, THREADS = sys.argv[7], int(sys.argv[3]), int(sys.argv[4])
options = onnxruntime.SessionOptions()
options.intra_op_num_threads = THREADS
session = onnxruntime.InferenceSession(ONNX, options, providers=["CPUExecutionProvider"])
shape = [BATCH if isinstance(d, str) else d for d in session.get_inputs()[0].shape]
session.run(None, {session.get_inputs()[0].name: np.zeros(shape, np.float32)})
""",
    "openvino": """
import sys
import numpy as np
import openvino
ONNX, BATCH, THREADS = sys.argv[7], int(sys.argv[3]), int(sys.argv[4])
core = openvino.Core()
model = core.read_model(ONNX)
shape = [BATCH] + [d.get_length() for d in model.inputs[0].get_partial_shape()[1:]]
model.reshape({model.inputs[0].get_any_name(): shape})
config = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": THREADS, "PERFORMANCE_HINT": "LATENCY"}
core.compile_model(model, "CPU", config)({0: np.zeros(shape, np.float32)})
""",
}

# Peak RSS, MiB: VmHWM starts afresh at exec (ru_maxrss would carry the parent's peak over).
_PEAK_RSS_CODE = """
with open("/proc/self/status") as status:
    print(next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024)
"""


def write_npz(model_name, state_dict, workdir):
    """The weights as ``vitnp export`` writes them."""
    from vitnp.weights import save_npz

    path = os.path.join(workdir, f"{model_name}.npz")
    save_npz(path, state_dict)
    return path


_vitnp_children_run = set()  # (model, backend) pairs whose fresh-process kernels are in the Numba cache


def measure_memory(engine, model_name, npz_path, onnx_path, batch, n_threads, dtype):
    """Peak RSS (MiB) of a fresh interpreter that loads the model and runs one forward of ``batch`` images.

    A vitnp interpreter first runs once unmeasured per (model, backend): the read-only weights need kernels compiled
    for them, and LLVM's memory would otherwise count in the first figure.
    """
    backend = getattr(engine, "backend", "")
    code = (_MEMORY_CODE["vitnp"] if backend else _MEMORY_CODE[engine.name]) + _PEAK_RSS_CODE
    argv = [sys.executable, "-c", code, model_name, npz_path, str(batch), str(n_threads), dtype, backend, onnx_path]
    if backend and (model_name, backend) not in _vitnp_children_run:
        one_image = argv[:5] + ["1"] + argv[6:]  # the kernels do not depend on the batch size
        subprocess.run(one_image, capture_output=True, text=True, check=True)
        _vitnp_children_run.add((model_name, backend))
    out = subprocess.run(argv, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------- main


def tuned_settings():
    """The fast engine's float32 settings measured on this CPU (vitnp.fast.tuning); measured now if no run kept them."""
    from vitnp.fast import gemm

    size = gemm.panel_block_bytes("float32")
    return f"GEMM panels in blocks of {'the whole depth' if size == 0 else f'{size >> 10} KiB'} (float32)"


def print_environment(args):
    """Print where and with what the figures are measured; return the measured GEMM peak per thread count."""
    import numpy as np
    import torch

    import vitnp

    unset = os.environ.get("VITNP_BENCH_UNSET") or "none were set"
    print(f"command: python benchmarks/bench_models.py {shlex.join(sys.argv[1:])}")
    print(f"CPU: {cpu_report()}; load average {load_report()}")
    print(f"CPU features for GEMM kernels: {gemm_features() or 'unknown (no /proc/cpuinfo)'}")
    print(f"vitnp's settings measured on this CPU: {tuned_settings()}")
    print(f"python {platform.python_version()}, numpy {np.__version__}, vitnp {vitnp.__version__}, "
          + package_versions(["torch", "timm", "onnxruntime", "openvino", "numba"]))
    print(f"OpenBLAS variables removed for this run: {unset}")
    print("glibc malloc: vitnp.memory.keep_freed_memory() called in this process (all engines) and in every fresh "
          "vitnp interpreter, as the vitnp command does")
    print(f"torch threads {torch.get_num_threads()}, interop {torch.get_num_interop_threads()}")
    print("thread pools (threadpoolctl):")
    for line in blas_report():
        print(f"  {line}")
    print(f"  {numba_report()}")
    peaks = {}
    for n in args.threads:
        vitnp.set_num_threads(n)
        peaks[n] = gemm_peak()
    print("measured GEMM peak (float32 2048^3 through NumPy's BLAS): "
          + ", ".join(f"{n} threads {gflops:.0f} GFLOP/s" for n, gflops in peaks.items()))
    return peaks


def main(argv=None):
    args = parse_args(argv)
    if max(args.threads) > (os.cpu_count() or 1):
        os.environ["NUMBA_NUM_THREADS"] = str(max(args.threads))  # numba.set_num_threads cannot exceed it
    from vitnp.memory import keep_freed_memory

    keep_freed_memory()
    workdir = tempfile.mkdtemp(prefix="vitnp-bench-")
    try:
        gemm_peaks = print_environment(args)
        engines = make_engines(args, workdir)
        rows = run_benchmarks(args, engines, workdir)
        print_summary(rows, args.memory)
        print("\nthread pools after the run:")
        for line in blas_report():
            print(f"  {line}")
        print(f"  {numba_report()}")

        startup = {}
        if not args.no_startup:
            startup_model = args.startup_model or args.models[0]
            startup = {(startup_model, backend, "float32", compile_mode):
                       measure_startup(startup_model, backend, "float32", compile_mode)
                       for backend, compile_mode in STARTUP_COMPILE.items()}
            print("\nstart-up, batch 1, a fresh interpreter each (cold: a new, empty NUMBA_CACHE_DIR; cached: the "
                  "same directory, filled by the cold run)")
            print_startup(startup)

        if args.json:
            with open(args.json, "w") as f:
                startup_rows = [dict(model=m, backend=b, dtype=d, compile=c, **states)
                                for (m, b, d, c), states in startup.items()]
                json.dump(dict(command=sys.argv, cpu=cpu_report(), cpu_gemm_features=gemm_features(),
                               gemm_peak_gflops=gemm_peaks, rows=rows,
                               startup=startup_rows, blas=blas_report(), numba=numba_report()), f, indent=1)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
