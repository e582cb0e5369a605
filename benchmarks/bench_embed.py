"""Throughput of ``vitnp embed`` (images/s) with 1 and 2 LocalCluster workers, and in this process for comparison.

    python benchmarks/bench_embed.py [--images 256] [--model vit_tiny_patch16_224] [--workers 1 2] [--shard-size 32]

It writes ``--images`` random 224 x 224 JPEGs and the model's random weights (.npz) to a temporary folder, then for
each worker count runs ``embed(..., workers=N)`` as the command does, cold (LocalCluster start, worker imports, the
model built in each worker, included) and warm (the same cluster again into a new output folder: the steady rate),
and ``workers=0`` (this process, ``vitnp.get_num_threads()`` shards at once). It prints the CPU, the BLAS library and
kernel (threadpoolctl) in this process and in the workers, and the figures.

This process calls ``vitnp.memory.keep_freed_memory()``, as the ``vitnp`` command does; the workers are set up by
``vitnp embed`` itself. OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE are removed from the environment for this run, as
benchmarks/bench_models.py does (the script re-executes itself before NumPy is imported; the workers inherit the
environment).

Needs the scale extra (dask[distributed], pyarrow) and threadpoolctl (the test extra).
"""

import os
import sys

from bench_models import restart_without_openblas_overrides

if __name__ == "__main__":
    restart_without_openblas_overrides(__file__)

import argparse  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import tempfile  # noqa: E402

from bench_models import blas_report, cpu_report, load_report  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=256, help="generated 224 x 224 JPEGs (default 256)")
    p.add_argument("--model", default="vit_tiny_patch16_224", help="a registered name (random weights)")
    p.add_argument("--workers", nargs="+", type=int, default=[1, 2], help="LocalCluster sizes (default 1 2)")
    p.add_argument("--shard-size", type=int, default=32, help="images per task (default 32)")
    p.add_argument("--batch", type=int, default=8, help="images per forward (default 8)")
    return p.parse_args(argv)


def make_collection(folder, count, model_name):
    import numpy as np
    from PIL import Image

    from vitnp.registry import create_model
    from vitnp.weights import save_npz

    images = os.path.join(folder, "images")
    os.makedirs(images)
    rng = np.random.default_rng(0)
    for i in range(count):
        pixels = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(images, f"{i:06d}.jpg"), quality=90)
    weights = os.path.join(folder, "weights.npz")
    save_npz(weights, create_model(model_name).state_dict())
    return images, weights


def main(argv=None):
    args = parse_args(argv)
    import numpy as np
    from distributed import Client

    import vitnp
    from vitnp.embed import embed, local_cluster
    from vitnp.memory import keep_freed_memory

    keep_freed_memory()
    print(f"command: python benchmarks/bench_embed.py {shlex.join(sys.argv[1:])}")
    print(f"CPU: {cpu_report()}; load average {load_report()}")
    print(f"python {platform.python_version()}, numpy {np.__version__}, vitnp {vitnp.__version__}")
    print(f"OpenBLAS overrides unset for this run: {os.environ.get('VITNP_BENCH_UNSET') or 'none were set'}")
    print("glibc malloc: vitnp.memory.keep_freed_memory() called in this process; the workers as vitnp embed sets them")
    print("thread pools in this process (threadpoolctl):")
    for line in blas_report():
        print(f"  {line}")
    print(f"vitnp threads in this process: {vitnp.get_num_threads()}")

    with tempfile.TemporaryDirectory() as folder:
        images, weights = make_collection(folder, args.images, args.model)
        common = dict(what="features", batch_size=args.batch, shard_size=args.shard_size, progress=False)
        print(f"\n{args.images} images 224 x 224 (JPEG), {args.model} random weights, --what features, "
              f"--batch {args.batch}, --shard-size {args.shard_size}")
        print(f"{'run':<34} {'seconds':>8} {'images/s':>9}")
        results = []

        def report(label, result):
            print(f"{label:<34} {result['seconds']:>8.2f} {result['images_per_s']:>9.1f}", flush=True)
            results.append((label, result))

        report("in this process (workers=0)", embed(images, args.model, weights, os.path.join(folder, "here"),
                                                    workers=0, **common))
        for workers in args.workers:
            cold = embed(images, args.model, weights, os.path.join(folder, f"cold{workers}"), workers=workers,
                         **common)
            report(f"{workers} worker(s), cold (cluster start)", cold)
            with local_cluster(workers) as cluster, Client(cluster) as client:
                embed(images, args.model, weights, os.path.join(folder, f"warmup{workers}"), client=client, **common)
                warm = embed(images, args.model, weights, os.path.join(folder, f"warm{workers}"), client=client,
                             **common)
                report(f"{workers} worker(s), warm (same cluster)", warm)
                pools = client.run(lambda: (blas_report(), vitnp.get_num_threads()))
                for address, (lines, threads) in sorted(pools.items()):
                    print(f"  worker {address}: vitnp threads {threads}; " + "; ".join(lines))


if __name__ == "__main__":
    main()
