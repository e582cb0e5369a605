"""Start-up of vitnp: how long a fresh process takes to give its first answer, with an empty kernel cache (cold: as
right after installing) and with the cache the cold run filled (cached: every later run).

    python benchmarks/bench_startup.py [--models NAME ...] [--backends fast reference] [--dtypes float32 float64]
                                       [--compile background wait] [--no-demo] [--json PATH]

For each model, backend and dtype: two fresh interpreters sharing one new, empty NUMBA_CACHE_DIR run import vitnp,
create_model (random weights) and two forwards of one zero image; the first compiles every kernel the model needs, the
second loads them. On the fast backend with ``VITNP_COMPILE=background`` (the default; ``--compile``) the cold run's
first forwards run the reference's kernels while another process compiles the engine's: "fast kernels ready" is when
that process has finished, counted from create_model. Then the ``vitnp demo`` command, cold and cached (once the
process its cold run started has finished compiling), as a whole process. Each row gives the phases' wall-clock
seconds, the whole process's, and the CPU seconds the process used (user + system, which a busy shared machine
disturbs less than the wall clock). Each cold run starts from an empty cache: kernels the models share are compiled
again for each, so every row is that model's first run on a new machine.
Needs only vitnp.
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

# One model of each family module: vit.py (ViT, DeiT with its distillation token, DINO), swin.py, mobilevit.py and
# notes_vit.py's three from the notes (lucidrains' ViT, the pre-norm ViT, nn.TransformerEncoder's).
DEFAULT_MODELS = [
    "vit_base_patch16_224", "deit_tiny_distilled_patch16_224", "dino_vits8", "swin_tiny_patch4_window7_224",
    "mobilevit_s", "lucidrains_vit_patch32_256", "notes_prenorm_vit_patch32_256", "notes_torch_encoder_vit_patch7_28",
]

# The start of every fresh vitnp interpreter: the malloc setting the `vitnp` command makes, then the timer.
VITNP_PRELUDE = """
import json, sys, time
start = time.perf_counter()
import numpy as np
import vitnp
from vitnp.memory import keep_freed_memory
keep_freed_memory()
"""

STARTUP_CODE = VITNP_PRELUDE + """
imported = time.perf_counter()
model = vitnp.create_model(sys.argv[1], backend=sys.argv[2], dtype=sys.argv[3])
created = time.perf_counter()
x = np.zeros((1, model.in_chans, *model.img_size), sys.argv[3])
model(x)
first = time.perf_counter()
model(x)
second = time.perf_counter()
from vitnp.compiling import tiering
tiering.wait()  # the fast kernels compiling in another process, if the first forward started one
ready = time.perf_counter()
print(json.dumps(dict(import_s=imported - start, create_s=created - imported, first_forward_s=first - created,
                      second_forward_s=second - first, ready_s=ready - created)))
"""


def run_child(command, env):
    """Run ``command``; (its stdout, wall seconds, CPU seconds it used)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return out.stdout, wall, cpu


def measure_startup(model_name, backend, dtype="float32", compile_mode="background"):
    """{'cold': phases, 'cached': phases}: two fresh interpreters sharing one new NUMBA_CACHE_DIR, ``VITNP_COMPILE``
    set to ``compile_mode``."""
    results = {}
    with tempfile.TemporaryDirectory(prefix="vitnp-numba-cache-") as cache_dir:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache_dir, "VITNP_COMPILE": compile_mode}
        for state in ("cold", "cached"):
            stdout, wall, cpu = run_child([sys.executable, "-c", STARTUP_CODE, model_name, backend, dtype], env)
            results[state] = {**json.loads(stdout.strip().splitlines()[-1]), "process_s": wall, "cpu_s": cpu}
    return results


def background_compilers(cache_dir):
    """Process ids of vitnp's background compiling processes (:mod:`vitnp.compiling`) filling ``cache_dir``; empty
    where /proc cannot be read."""
    marker = f"NUMBA_CACHE_DIR={cache_dir}".encode()
    pids = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline, open(f"/proc/{entry}/environ", "rb") as environ:
                if b"compile_from_stdin" in cmdline.read() and marker in environ.read().split(b"\0"):
                    pids.append(int(entry))
        except (OSError, ValueError):
            continue
    return pids


def measure_demo(cached_runs=5):
    """{'cold': ..., 'cached': ...} of the ``vitnp demo`` command (its default backend, fast) as a whole process. The
    cold run leaves a process compiling the engine's kernels (``VITNP_COMPILE=background``); the cached runs start once
    it has finished ("kernels ready", counted from the cold run's start), and the median of ``cached_runs`` is given."""
    with tempfile.TemporaryDirectory(prefix="vitnp-numba-cache-") as cache_dir:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache_dir}
        for name in ("VITNP_BACKEND", "VITNP_COMPILE"):
            env.pop(name, None)
        start = time.perf_counter()
        _, wall, cpu = run_child([sys.executable, "-m", "vitnp.cli", "demo"], env)
        cold = {"process_s": wall, "cpu_s": cpu}
        while background_compilers(cache_dir):
            time.sleep(0.1)
        cold["ready_s"] = time.perf_counter() - start
        runs = []
        for _ in range(cached_runs):
            _, wall, cpu = run_child([sys.executable, "-m", "vitnp.cli", "demo"], env)
            runs.append({"process_s": wall, "cpu_s": cpu})
    runs.sort(key=lambda run: run["process_s"])
    cached = {**runs[len(runs) // 2], "runs_s": [run["process_s"] for run in runs]}
    return {"cold": cold, "cached": cached}


def print_startup(rows):
    print("| model | backend | dtype | VITNP_COMPILE | kernel cache | import vitnp s | create_model s "
          "| first forward s | second forward s | fast kernels ready s | whole process s | process CPU s |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|")
    for (model_name, backend, dtype, mode), states in rows.items():
        for state, r in states.items():
            print(f"| {model_name} | {backend} | {dtype} | {mode} | {state} | {r['import_s']:.2f} "
                  f"| {r['create_s']:.2f} | {r['first_forward_s']:.2f} | {r['second_forward_s']:.3f} "
                  f"| {r['ready_s']:.2f} | {r['process_s']:.2f} | {r['cpu_s']:.2f} |")


def print_demo(results):
    cold, cached = results["cold"], results["cached"]
    print("| command | kernel cache | whole process s | process CPU s | fast kernels ready s |\n|---|---|---|---|---|")
    print(f"| `vitnp demo` | cold | {cold['process_s']:.2f} | {cold['cpu_s']:.2f} | {cold['ready_s']:.1f} |")
    runs = ", ".join(f"{seconds:.2f}" for seconds in cached["runs_s"])
    print(f"| `vitnp demo` | cached (median of {runs}) | {cached['process_s']:.2f} | {cached['cpu_s']:.2f} | - |")


def first_cpu_fields():
    """{field: value} of the first CPU in /proc/cpuinfo, or None where it cannot be read."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            fields = [line.split(":", 1) for line in cpuinfo if ":" in line]
    except OSError:
        return None
    first = {}
    for key, value in fields:
        first.setdefault(key.strip(), value.strip())
    return first


# The CPU flags GEMM kernels are chosen by (OpenBLAS, oneDNN in OpenVINO and onnxruntime, vitnp's GEMM)
GEMM_FLAGS = ("fma", "avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16")


def gemm_features():
    """Which of :data:`GEMM_FLAGS` the first CPU has, as 'flag yes / no, ...'; '' where /proc/cpuinfo cannot be
    read."""
    first = first_cpu_fields()
    if first is None:
        return ""
    flags = set(first.get("flags", "").split())
    return ", ".join(f"{flag} {'yes' if flag in flags else 'no'}" for flag in GEMM_FLAGS)


def cpu_report():
    """The CPU's model name, logical CPU count and vector extensions (avx2, avx512f, amx) from /proc/cpuinfo; on
    other systems platform's processor name."""
    first = first_cpu_fields()
    if first is None:
        return f"{platform.processor() or platform.machine()}; {os.cpu_count()} logical CPUs"
    name = first.get("model name", platform.machine())
    if "cpu family" in first:  # a virtual machine's model name may be only "AMD EPYC": family and model say which
        name += f" (family {first['cpu family']}, model {first.get('model', '?')})"
    flags = set(first.get("flags", "").split())
    extensions = ", ".join(f"{label} {'yes' if flag in flags else 'no'}"
                           for label, flag in (("avx2", "avx2"), ("avx512f", "avx512f"), ("amx", "amx_tile")))
    guest = "; virtual machine" if "hypervisor" in flags else ""
    return f"{name}; {os.cpu_count()} logical CPUs; {extensions}{guest}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    p.add_argument("--backends", nargs="+", choices=("fast", "reference"), default=["fast", "reference"])
    p.add_argument("--dtypes", nargs="+", choices=("float32", "float64"), default=["float32"])
    p.add_argument("--compile", nargs="+", choices=("background", "wait"), default=["background"],
                   help="VITNP_COMPILE for the fast backend's rows (the reference compiles its kernels at once anyway)")
    p.add_argument("--no-demo", action="store_true", help="skip the `vitnp demo` command")
    p.add_argument("--json", metavar="PATH", help="also write the figures to PATH as JSON")
    args = p.parse_args(argv)
    print(f"CPU: {cpu_report()}; Python {platform.python_version()}")
    demo = {}
    if not args.no_demo:
        demo = measure_demo()
        print_demo(demo)
        print()
    rows = {}
    for model_name in args.models:
        for backend in args.backends:
            for dtype in args.dtypes:
                for mode in args.compile if backend == "fast" else ["wait"]:
                    states = rows[model_name, backend, dtype, mode] = measure_startup(model_name, backend, dtype, mode)
                    print(f"  {model_name} {backend} {dtype} {mode}: first forward "
                          f"{states['cold']['first_forward_s']:.2f} s cold, {states['cached']['first_forward_s']:.2f} "
                          f"s cached", file=sys.stderr)
    print_startup(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(command=sys.argv, cpu=cpu_report(), demo=demo,
                           startup=[dict(model=m, backend=b, dtype=d, compile=c, **states)
                                    for (m, b, d, c), states in rows.items()]),
                      f, indent=1)


if __name__ == "__main__":
    main()
