"""mobilevit_s batch 1, stage by stage: vitnp against onnxruntime's own profiler, same weights, same thread count.

    python benchmarks/mobilevit_stages.py --threads 2 --rounds 40

vitnp: the stem, each block of ``model.stages`` and the final conv with the head, called in turn as forward_features
calls them, each timed on its own (median over the rounds, warm, back to back). onnxruntime: the timm model exported
as bench_models.py exports it, run with ``enable_profiling``; each node's kernel time summed by the stage its name
names (``/stages/stages.2/...``), nodes naming none (the input's and output's reorders) apart. The profiler adds its
own time to each node, so onnxruntime's stage times run a little above its plain forward's; its forward time is
printed beside them.
"""

import argparse
import collections
import json
import os
import re
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_models  # (imports no NumPy)

if __name__ == "__main__":
    bench_models.restart_without_openblas_overrides(__file__)

import numpy as np

MODEL = "mobilevit_s"


def vitnp_stages(model, x, rounds):
    """{stage: median ms} over ``rounds`` forwards, each part timed as forward_features runs it."""
    parts = [("stem", model.stem)]
    for s, stage in enumerate(model.stages._modules.values()):
        parts += [(f"stages.{s}", block) for block in stage._modules.values()]
    times = collections.defaultdict(list)
    for r in range(rounds + 2):
        sums = collections.Counter()
        h = model.check_input(x)
        for name, part in parts:
            start = time.perf_counter()
            h = part(h)
            sums[name] += time.perf_counter() - start
        start = time.perf_counter()
        model.forward_head(np.ascontiguousarray(model.final_conv(h).transpose(0, 3, 1, 2)))
        sums["final_conv + head"] += time.perf_counter() - start
        if r >= 2:  # two warm-up forwards
            for name, seconds in sums.items():
                times[name].append(seconds * 1e3)
    return {name: statistics.median(v) for name, v in times.items()}


def onnxruntime_stages(path, x, threads, rounds):
    """({stage: ms per forward}, median ms of a plain forward) from onnxruntime's profiler."""
    import onnxruntime

    def session(profile):
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.enable_profiling = profile
        options.profile_file_prefix = os.path.join(tempfile.mkdtemp(prefix="vitnp_ort_"), "profile")
        return onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    plain = session(False)
    for _ in range(2):
        plain.run(None, {"images": x})
    forwards = []
    for _ in range(rounds):
        start = time.perf_counter()
        plain.run(None, {"images": x})
        forwards.append((time.perf_counter() - start) * 1e3)
    profiled = session(True)
    for _ in range(rounds + 2):
        profiled.run(None, {"images": x})
    with open(profiled.end_profiling()) as f:
        events = json.load(f)
    stages = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            found = re.search(r"(stem|final_conv|head|stages\.\d)", event["name"])
            stage = found.group(1) if found else "(reorders, not in a stage)"
            if stage in ("final_conv", "head"):
                stage = "final_conv + head"
            stages[stage] += event["dur"] / 1e3 / (rounds + 2)
    return dict(stages), statistics.median(forwards)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()

    import vitnp

    timm_model, state_dict = bench_models.build_case(MODEL, "float32")
    model = vitnp.create_model(MODEL)
    model.load_state_dict(state_dict)
    vitnp.set_num_threads(args.threads)
    path = bench_models.OnnxRuntimeEngine(tempfile.mkdtemp(prefix="vitnp_stages_")).export(MODEL, timm_model)
    x = np.random.default_rng(0).standard_normal((1, 3, *model.img_size)).astype(np.float32)
    for line in bench_models.blas_report():
        print(line)
    print(f"OpenBLAS variables unset for this run: {os.environ.get('VITNP_BENCH_UNSET') or 'none were set'}")
    ours = vitnp_stages(model, x, args.rounds)
    theirs, forward = onnxruntime_stages(path, x, args.threads, args.rounds)
    print(f"{MODEL} batch 1, {args.threads} threads, ms (vitnp: median of {args.rounds} forwards, each part timed; "
          f"onnxruntime: profiler's node time per forward, its plain forward {forward:.1f} ms)")
    print("| stage | vitnp | onnxruntime | vitnp - onnxruntime |\n|---|---|---|---|")
    for stage in sorted(set(ours) | set(theirs), key=lambda s: (s.startswith("("), s == "final_conv + head", s != "stem", s)):
        a, b = ours.get(stage, 0.0), theirs.get(stage, 0.0)
        print(f"| {stage} | {a:.2f} | {b:.2f} | {a - b:+.2f} |")
    total_ours, total_theirs = sum(ours.values()), sum(theirs.values())
    print(f"| all | {total_ours:.2f} | {total_theirs:.2f} | {total_ours - total_theirs:+.2f} |")


if __name__ == "__main__":
    main()
