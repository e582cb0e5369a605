"""vitnp and onnxruntime on one model, each forward after a pause: once with the caches as the engine's own last
forward left them, once after a sweep over more memory than the L3 cache holds (as after other work).

    python benchmarks/cold_cache.py --model mobilevit_s --threads 2 --rounds 15

bench_models.py times every forward after a pause and after the other engines' forwards, so an engine that slows
down when its data and code are no longer cached shows there; this separates that effect. Both engines run the same
random timm weights (the ONNX file exported as bench_models.py exports it); BLAS and thread pools are reported.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_models  # (imports no NumPy)

if __name__ == "__main__":
    bench_models.restart_without_openblas_overrides(__file__)

import numpy as np

PAUSE_S = 0.1
SWEEP_BYTES = 64 << 20  # twice the 32 MiB L3 cache of these machines


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mobilevit_s")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()

    import vitnp

    timm_model, state_dict = bench_models.build_case(args.model, "float32")
    model = vitnp.create_model(args.model)
    model.load_state_dict(state_dict)
    onnx = bench_models.OnnxRuntimeEngine(tempfile.mkdtemp(prefix="vitnp_cold_"))
    onnx.threads = args.threads
    vitnp.set_num_threads(args.threads)
    x = np.random.default_rng(0).standard_normal((1, 3, *model.img_size)).astype(np.float32)
    forwards = {"vitnp": model, "onnxruntime": onnx.prepare(args.model, timm_model, state_dict, "float32")}
    for line in bench_models.blas_report():
        print(line)
    print(f"OpenBLAS variables unset for this run: {os.environ.get('VITNP_BENCH_UNSET') or 'none were set'}")
    sweep = np.ones(SWEEP_BYTES // 4, np.float32)
    for forward in forwards.values():
        forward(x)
        forward(x)
    samples = {(name, state): [] for name in forwards for state in ("warm", "swept")}
    for r in range(args.rounds):
        for name, forward in forwards.items() if r % 2 == 0 else reversed(forwards.items()):
            for state in ("warm", "swept"):
                if state == "warm":
                    forward(x)
                else:
                    sweep += 1.0
                time.sleep(PAUSE_S)
                start = time.perf_counter()
                forward(x)
                samples[(name, state)].append((time.perf_counter() - start) * 1e3)
    print(f"{args.model} batch 1, {args.threads} threads, median (min) of {args.rounds} forwards, ms:")
    print("| engine | after its own forward and a pause | after a 64 MiB sweep and a pause |\n|---|---|---|")
    for name in forwards:
        warm, swept = samples[(name, "warm")], samples[(name, "swept")]
        print(f"| {name} | {statistics.median(warm):.1f} ({min(warm):.1f}) | "
              f"{statistics.median(swept):.1f} ({min(swept):.1f}) |")


if __name__ == "__main__":
    main()
