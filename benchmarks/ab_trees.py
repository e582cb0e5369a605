"""A/B of two vitnp source trees, model by model: fresh interpreters, alternating, the same random weights and input.

    python benchmarks/ab_trees.py BEFORE_TREE AFTER_TREE --models vit_base_patch16_224 mobilevit_s --batch 1 8

A source tree is a directory with ``vitnp/`` in it (``git worktree add /tmp/before <commit>`` makes one). Each round
runs one interpreter per tree (the order flipping every round), each timing ``--forwards`` forwards after two warm-up
ones; printed per (model, batch): each tree's median ms per image over all rounds, the ratio after / before of the
medians and the median of the rounds' own ratios (below 1: the after tree is faster). Nothing else runs in these
interpreters, so the ratio is the change's, not another engine's threads'.

The interpreters get only PYTHONPATH (the tree), PATH, NUMBA_CACHE_DIR (a temporary directory the rounds share: the
first round compiles, in its warm-up forwards) and PYTHONDONTWRITEBYTECODE, so that nothing is written into the trees;
no OpenBLAS or VITNP_* variables. Each calls ``vitnp.memory.keep_freed_memory()`` when its tree has it (a tree from
before that module fixed malloc's thresholds on import). ``--backend`` is passed to ``create_model`` only when it is
not 'fast', so a tree from before the two backends (one engine, the fast one) can be either side of an A/B of the fast
backend.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

CHILD = r"""
import importlib.util, inspect, json, sys, time
import numpy as np
import vitnp
if importlib.util.find_spec("vitnp.memory"):
    from vitnp.memory import keep_freed_memory
    keep_freed_memory()
name, backend = sys.argv[1], sys.argv[5]
batch, forwards, threads = (int(a) for a in sys.argv[2:5])
vitnp.set_num_threads(threads)
backend_argument = {}
if backend != "fast":
    if "backend" not in inspect.signature(vitnp.create_model).parameters:
        sys.exit("this tree's create_model takes no backend= (it has the fast engine only)")
    backend_argument = {"backend": backend}
model = vitnp.create_model(name, seed=0, **backend_argument)
x = np.random.default_rng(0).standard_normal((batch, model.in_chans, *model.img_size)).astype(np.float32)
model(x)
model(x)
times = []
for _ in range(forwards):
    start = time.perf_counter()
    model(x)
    times.append((time.perf_counter() - start) * 1e3 / batch)
print(json.dumps(times))
"""


def run_child(tree, model, batch, args, numba_cache):
    """ms per image of each of ``args.forwards`` forwards in a fresh interpreter that imports ``tree``'s vitnp."""
    run = subprocess.run(
        [sys.executable, "-c", CHILD, model, str(batch), str(args.forwards), str(args.threads), args.backend],
        env={"PYTHONPATH": tree, "PATH": "/usr/bin:/bin", "NUMBA_CACHE_DIR": numba_cache,
             "PYTHONDONTWRITEBYTECODE": "1"},
        cwd=tree,  # ``python -c`` puts the working directory first on sys.path: the tree's own
        capture_output=True,
        text=True,
    )
    if run.returncode:
        sys.exit(f"{tree}: {run.stderr}")
    return json.loads(run.stdout)


def print_comparison(trees, model, batch, args, numba_cache):
    """One table row: the two trees on (model, batch) over ``args.rounds`` rounds."""
    times = {side: [] for side in trees}
    round_ratios = []
    for r in range(args.rounds):
        medians = {}
        for side in ("before", "after") if r % 2 == 0 else ("after", "before"):
            round_times = run_child(trees[side], model, batch, args, numba_cache)
            times[side] += round_times
            medians[side] = statistics.median(round_times)
        round_ratios.append(medians["after"] / medians["before"])
    before, after = (statistics.median(times[side]) for side in trees)
    print(f"| {model} | {batch} | {before:.1f} | {after:.1f} | {after / before:.3f} | "
          f"{statistics.median(round_ratios):.3f} |", flush=True)


def main():
    os.environ["VITNP_COMPILE"] = "wait"  # the trees' own kernels, compiled at once when missing (vitnp.compiling)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--models", nargs="+", default=["vit_base_patch16_224"])
    parser.add_argument("--batch", nargs="+", type=int, default=[1])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--forwards", type=int, default=4, help="timed forwards per interpreter")
    parser.add_argument("--backend", choices=["fast", "reference"], default="fast")
    args = parser.parse_args()
    trees = {"before": os.path.abspath(args.before), "after": os.path.abspath(args.after)}
    print(f"before: {trees['before']}, after: {trees['after']}; backend {args.backend}, {args.threads} threads, "
          f"{args.rounds} rounds of {args.forwards} forwards per tree")
    print("| model | batch | before ms/image | after ms/image | ratio of medians | median of round ratios |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="vitnp-ab-numba-cache-") as numba_cache:
        for model in args.models:
            for batch in args.batch:
                print_comparison(trees, model, batch, args, numba_cache)


if __name__ == "__main__":
    main()
