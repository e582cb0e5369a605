"""A/B of two vitnp source trees on one model: fresh interpreters, alternating, the same random weights and input.

    python benchmarks/ab_trees.py BEFORE_TREE AFTER_TREE --model vit_base_patch16_224 --batch 1 --rounds 6

Each round runs one interpreter per tree (in turn), each timing ``--forwards`` forwards after two warm-up ones at 2
threads; the medians over all rounds and their ratio after / before are printed. A source tree is a directory with
``vitnp/`` in it (``git worktree add /tmp/before <commit>`` makes one). Nothing else runs in these interpreters,
so the ratio is the change's, not another engine's threads'.
"""

import argparse
import json
import statistics
import subprocess
import sys

CHILD = r"""
import json, sys, time
import numpy as np
import vitnp
vitnp.set_num_threads(2)
model = vitnp.create_model(sys.argv[1], seed=0)
x = np.random.default_rng(0).standard_normal((int(sys.argv[2]), 3, *model.img_size)).astype(np.float32)
model(x)
model(x)
times = []
for _ in range(int(sys.argv[3])):
    start = time.perf_counter()
    model(x)
    times.append((time.perf_counter() - start) * 1e3 / len(x))
print(json.dumps(times))
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--forwards", type=int, default=4)
    args = parser.parse_args()
    times = {args.before: [], args.after: []}
    for _ in range(args.rounds):
        for tree in times:
            run = subprocess.run(
                [sys.executable, "-c", CHILD, args.model, str(args.batch), str(args.forwards)],
                env={"PYTHONPATH": tree, "PATH": "/usr/bin:/bin"},
                capture_output=True,
                text=True,
            )
            if run.returncode:
                sys.exit(f"{tree}: {run.stderr}")
            times[tree] += json.loads(run.stdout)
    for tree, t in times.items():
        print(f"{tree}: median {statistics.median(t):.1f} ms/img (min {min(t):.1f})")
    ratio = statistics.median(times[args.after]) / statistics.median(times[args.before])
    print(f"after / before, medians: {ratio:.3f}")


if __name__ == "__main__":
    main()
