"""Same-process A/B of two vitnp source trees, kernel by kernel and model by model: both trees imported at once (as
two packages), their calls alternating, paired ratios.

    python benchmarks/ab_kernels.py BEFORE_TREE AFTER_TREE --cases gemm attention rows depthwise conv models --rounds 30

A source tree is a directory with ``vitnp/`` in it (``git worktree add /tmp/before <commit>``); it is copied and
imported under another name, so nothing is written into it. On a shared virtual machine the speed drifts by more than
a few percent between interpreters, so ``ab_trees.py`` (an interpreter per tree) cannot resolve a change of that size
in one kernel; here every round times one call of each tree back to back, the order turning every round, and prints
the ratio after / before of the medians beside the median of the rounds' own ratios. One thread by default: each tree
has its own helper threads, which would spin against each other.

The cases call the engine's kernels: ``vitnp.kernels`` in a tree from before the two backends, the modules of
``vitnp.fast`` in a tree with them (the same functions, the same arguments), and models on the fast backend. malloc's
thresholds are fixed as the ``vitnp`` command fixes them (``vitnp.memory.keep_freed_memory()``, or on import in a tree
from before that module).
"""

import argparse
import importlib
import importlib.util
import os
import shutil
import statistics
import sys
import tempfile
import time
import types

import numpy as np


def gemm_cases(vitnp, kernels):
    """The GEMM with the work done on its tile: SiLU (MobileViT's expanding 1x1 convs), GELU (ViT's and Swin's fc1),
    the residual's add (proj / fc2), a last panel that is half padding (144 output columns)."""
    rng = np.random.default_rng(0)
    cases = {}
    shapes = [
        ("silu", 16384, 32, 128), ("silu", 4096, 64, 256), ("gelu", 197, 768, 3072), ("gelu", 3136, 96, 384),
        ("residual", 3136, 384, 96), ("residual", 197, 3072, 768), ("none", 1024, 144, 144),
    ]  # fmt: skip
    for kind, rows, depth, columns in shapes:
        x = rng.standard_normal((rows, depth)).astype(np.float32)
        packed = kernels.pack_linear_weight((rng.standard_normal((columns, depth)) * 0.05).astype(np.float32))
        bias = np.zeros(columns, np.float32)
        act = kind if kind in ("silu", "gelu") else "none"
        residual = rng.standard_normal((rows, columns)).astype(np.float32) if kind == "residual" else None
        cases[f"linear {rows}x{depth}x{columns} {kind}"] = (
            lambda x=x, packed=packed, bias=bias, act=act, residual=residual: kernels.linear(
                x, packed, bias, act, residual=residual
            )
        )
    return cases


def pointwise_cases(vitnp, kernels):
    """MobileViT's 1x1 convs and transformer Linears at batch 1 (one thread: a transformer's four sequences as one
    batch), the ten with the most multiply-adds, with their BatchNorm's scale and their SiLU or residual's add."""
    rng = np.random.default_rng(0)
    cases = {}
    shapes = [
        ("silu", 16384, 32, 128), ("none", 16384, 64, 32), ("silu", 4096, 64, 256), ("residual", 4096, 256, 64),
        ("none", 1024, 144, 432), ("silu", 1024, 144, 288), ("residual", 1024, 288, 144), ("silu", 1024, 96, 384),
        ("none", 256, 192, 576), ("silu", 256, 192, 384),
    ]  # fmt: skip
    for kind, rows, depth, columns in shapes:
        x = rng.standard_normal((rows, depth)).astype(np.float32)
        packed = kernels.pack_linear_weight((rng.standard_normal((columns, depth)) * 0.05).astype(np.float32))
        scale, shift = np.ones(columns, np.float32), np.zeros(columns, np.float32)
        act = "silu" if kind == "silu" else "none"
        residual = rng.standard_normal((rows, columns)).astype(np.float32) if kind == "residual" else None
        cases[f"linear {rows}x{depth}x{columns} {kind}"] = (
            lambda x=x, packed=packed, shift=shift, act=act, scale=scale, residual=residual: kernels.linear(
                x, packed, shift, act, scale, residual
            )
        )
    return cases


def attention_cases(vitnp, kernels):
    """Attention on MobileViT's (head_dim 36), ViT's (197 keys) and Swin's (49-token windows) heads; Swin's also as its
    blocks run them, with the relative position bias, and the shifted-window mask of stage 1's and stage 3's maps."""
    rng = np.random.default_rng(0)
    cases = {}
    for batch, tokens, heads, head_dim in [(8, 256, 4, 36), (1, 197, 12, 64), (64, 49, 3, 32)]:
        qkv = rng.standard_normal((batch, tokens, 3, heads, head_dim)).astype(np.float32)
        cases[f"attention B{batch} N{tokens} hd{head_dim}"] = lambda qkv=qkv: kernels.attention(qkv, 0.1)
    for side, heads in [(56, 3), (14, 12)]:
        windows = (side // 7) ** 2
        qkv = rng.standard_normal((windows, 49, 3, heads, 32)).astype(np.float32)
        bias = rng.standard_normal((heads, 49, 49)).astype(np.float32)
        mask = vitnp.swin.shifted_window_mask((side, side), (7, 7), (3, 3))
        cases[f"swin attention {side}x{side} map, {heads} heads, bias"] = (
            lambda qkv=qkv, bias=bias: kernels.attention(qkv, 32**-0.5, bias))
        cases[f"swin attention {side}x{side} map, {heads} heads, bias + mask"] = (
            lambda qkv=qkv, bias=bias, mask=mask: kernels.attention(qkv, 32**-0.5, bias, mask))
    return cases


def row_cases(vitnp, kernels):
    """The row kernels: LayerNorm, softmax, Swin's window partition / reverse, the depthwise conv with its SiLU."""
    rng = np.random.default_rng(0)
    tokens = rng.standard_normal((197, 768)).astype(np.float32)
    ones, zeros = np.ones(768, np.float32), np.zeros(768, np.float32)
    scores = rng.standard_normal((256, 256)).astype(np.float32)
    feature_map = rng.standard_normal((4, 56, 56, 96)).astype(np.float32)
    windows = kernels.window_partition(feature_map, (7, 7), (3, 3))
    depthwise_in = rng.standard_normal((1, 64, 64, 256)).astype(np.float32)
    depthwise_weight = (rng.standard_normal((256, 1, 3, 3)) * 0.3).astype(np.float32)
    return {
        "layer_norm 197x768": lambda: kernels.layer_norm(tokens, ones, zeros, 1e-6),
        "softmax 256x256": lambda: kernels.softmax(scores),
        "window_partition 4x56x56x96": lambda: kernels.window_partition(feature_map, (7, 7), (3, 3)),
        "window_reverse + residual": lambda: kernels.window_reverse(windows, (7, 7), 56, 56, (3, 3), feature_map),
        "depthwise 64x64x256 silu": lambda: kernels.depthwise_conv2d(depthwise_in, depthwise_weight, 1, 1, act="silu"),
    }


def depthwise_cases(vitnp, kernels):
    """MobileViT's depthwise 3x3 convs (stage 1's, 2's and 3's maps, strides 1 and 2), alone and with SiLU."""
    rng = np.random.default_rng(0)
    cases = {}
    for size, channels, stride in [(128, 64, 1), (128, 128, 2), (64, 256, 1), (64, 256, 2)]:
        x = rng.standard_normal((1, size, size, channels)).astype(np.float32)
        weight = (rng.standard_normal((channels, 1, 3, 3)) * 0.3).astype(np.float32)
        for act in ("none", "silu"):
            cases[f"depthwise {size}x{size}x{channels} stride {stride} {act}"] = (
                lambda x=x, weight=weight, stride=stride, act=act: kernels.depthwise_conv2d(
                    x, weight, stride, 1, act=act
                )
            )
    return cases


def conv_cases(vitnp, kernels):
    """MobileViT's k x k convs as its Conv2d modules run them (BatchNorm's scale and shift, SiLU): the stem's shape on
    an NHWC map, stage 3's local 3x3 conv, the fusion convs of stages 3, 4 and 5 on their two maps, and the model's
    stem itself."""
    rng = np.random.default_rng(0)
    cases = {}
    for name, size, channels, out, stride in [("stem", 256, (3,), 16, 2), ("kxk", 32, (96,), 96, 1),
                                              ("fusion", 32, (96, 96), 96, 1), ("fusion", 16, (128, 128), 128, 1),
                                              ("fusion", 8, (160, 160), 160, 1)]:
        conv = vitnp.mobilevit.Conv2d(sum(channels), out, 3, stride)
        conv._parameters["weight"] = (rng.standard_normal(conv.weight.shape) * 0.05).astype(np.float32)
        maps = tuple(rng.standard_normal((1, size, size, c)).astype(np.float32) for c in channels)
        x = maps if len(maps) > 1 else maps[0]
        scale, shift = np.ones(out, np.float32), np.zeros(out, np.float32)
        label = f"conv {name} {size}x{size}x{'+'.join(map(str, channels))} -> {out}"
        cases[label] = lambda conv=conv, x=x, scale=scale, shift=shift: conv(x, None, scale, shift, "silu")
    # mobilevit_s's stem as forward_features runs it, on the NCHW images: passed as they are to a stem that
    # ``reads_images`` (a tree from before the two backends), else as their NHWC view (read in place)
    stem = vitnp.create_model("mobilevit_s", seed=0).stem
    images = rng.standard_normal((1, 3, 256, 256)).astype(np.float32)
    stem_input = images if getattr(stem.conv, "reads_images", False) else images.transpose(0, 2, 3, 1)
    cases["mobilevit_s stem on the 256x256 images"] = lambda: stem(stem_input)
    return cases


def model_cases(vitnp, kernels):
    """Whole forwards, batch 1, random weights."""
    cases = {}
    for name in ("mobilevit_s", "swin_tiny_patch4_window7_224", "vit_base_patch16_224", "swinv2_tiny_window8_256",
                 "mobilevitv2_100"):
        if name not in vitnp.list_models():  # a tree from before the family
            continue
        model = vitnp.create_model(name, seed=0)
        x = np.random.default_rng(0).standard_normal((1, 3, *model.img_size)).astype(np.float32)
        cases[f"{name} batch 1"] = lambda model=model, x=x: model(x)
    return cases


def blas_report():
    """The BLAS NumPy uses (the kernels timed here are vitnp's own; NumPy's BLAS only serves a few small products)."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "BLAS: threadpoolctl not installed"
    blas = [f"{i['internal_api']} {i.get('architecture')} {i['num_threads']} threads" for i in threadpool_info()
            if i["user_api"] == "blas"]
    found = [v for v in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE") if v in os.environ]
    found = ", ".join(found) or "neither OpenBLAS variable"
    return f"BLAS: {', '.join(blas) or 'none found'}; set in the environment: {found}"


CASES = {"gemm": gemm_cases, "pointwise": pointwise_cases, "attention": attention_cases, "rows": row_cases,
         "depthwise": depthwise_cases, "conv": conv_cases, "models": model_cases}


def import_tree(tree, name, workdir):
    """The tree's ``vitnp`` package imported as ``name`` (its imports are relative, so a copy under another name is a
    second, independent vitnp), with malloc's thresholds fixed as the ``vitnp`` command fixes them."""
    source, copy = os.path.join(tree, "vitnp"), os.path.join(workdir, name)
    shutil.copytree(source, copy, ignore=shutil.ignore_patterns("__pycache__"))
    package = importlib.import_module(name)
    if importlib.util.find_spec(f"{name}.backends"):
        import_backends_from_copy(name)
    if importlib.util.find_spec(f"{name}.memory"):
        importlib.import_module(f"{name}.memory").keep_freed_memory()
    return package


def import_backends_from_copy(name):
    """Make the copy ``name`` load its backends' ops from itself: ``vitnp.backends.backend_ops`` imports
    ``vitnp.<backend>.ops`` by its absolute name, which is not the copy's. Every module of the copy that holds
    ``backend_ops`` gets one that imports ``<name>.<backend>.ops``."""
    backends = importlib.import_module(f"{name}.backends")
    absolute = backends.backend_ops

    def backend_ops(backend):
        return importlib.import_module(f"{name}.{backends.check_backend(backend)}.ops")

    for module_name, module in list(sys.modules.items()):
        if module_name.startswith(f"{name}.") and getattr(module, "backend_ops", None) is absolute:
            module.backend_ops = backend_ops


def engine_kernels(name):
    """The engine's kernels the cases call, under one namespace: ``vitnp.kernels`` in a tree from before the two
    backends, else the ``vitnp.fast`` modules that hold them (the same functions and arguments)."""
    if importlib.util.find_spec(f"{name}.kernels"):
        return importlib.import_module(f"{name}.kernels")
    gemm, attention, rows, windows, conv = (importlib.import_module(f"{name}.fast.{room}")
                                            for room in ("gemm", "attention", "rows", "windows", "conv"))
    return types.SimpleNamespace(
        pack_linear_weight=gemm.pack_linear_weight, linear=gemm.linear, attention=attention.attention,
        layer_norm=rows.layer_norm, softmax=rows.softmax, window_partition=windows.window_partition,
        window_reverse=windows.window_reverse, depthwise_conv2d=conv.depthwise_conv2d,
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=sorted(CASES))
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    os.environ["VITNP_COMPILE"] = "wait"  # the engine's own kernels, compiled at once when missing (vitnp.compiling)
    os.environ.pop("VITNP_BACKEND", None)  # models on the fast backend, the default, in a tree that has two
    print(blas_report())
    workdir = tempfile.mkdtemp(prefix="vitnp_ab_")
    sys.path.insert(0, workdir)
    trees = {}
    for side, tree in (("before", args.before), ("after", args.after)):
        package = import_tree(tree, f"vitnp_{side}", workdir)
        package.set_num_threads(args.threads)
        trees[side] = (package, engine_kernels(package.__name__))
    print(f"{args.threads} thread(s), {args.rounds} rounds; ratio after / before (< 1: after is faster)")
    print("| case | before ms | after ms | ratio of medians | median of round ratios |")
    print("|---|---|---|---|---|")
    for group in args.cases:
        calls = {side: CASES[group](package, kernels) for side, (package, kernels) in trees.items()}
        for case in calls["before"]:
            pair = {side: calls[side][case] for side in trees}
            for _ in range(2):
                for call in pair.values():
                    call()
            times = {side: [] for side in trees}
            ratios = []
            for r in range(args.rounds):
                for side in (("before", "after") if r % 2 == 0 else ("after", "before")):
                    start = time.perf_counter()
                    pair[side]()
                    times[side].append(time.perf_counter() - start)
                ratios.append(times["after"][-1] / times["before"][-1])
            before, after = (statistics.median(times[side]) * 1e3 for side in trees)
            print(f"| {case} | {before:.3f} | {after:.3f} | {after / before:.3f} | {statistics.median(ratios):.3f} |",
                  flush=True)
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
