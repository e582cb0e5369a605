"""The ``vitnp`` command, a thin front over the API: list, demo, export, inspect, predict, verify, attention, embed.

Each subcommand is one entry of :data:`COMMANDS`: its help line, a function adding its arguments and a function
running it on the parsed arguments. A new subcommand is one more entry. Problems the user can fix raise
:class:`CommandError` (or the API's ValueError) and are printed as one line without a traceback, exit status 1.
"""

import argparse
import difflib
import gc
import os
import sys

from . import compiling, memory
from .backends import BACKENDS


class CommandError(Exception):
    """A problem the user can fix; ``main`` prints it as one line and exits with status 1."""


BACKEND_HELP = ("'fast': the engine (packed GEMMs, fused kernels, threads), for speed; 'reference': the readable "
                "formulas, the most obviously correct computation, slower (default: $VITNP_BACKEND, else fast)")


def add_backend_argument(parser, purpose="the backend the model runs on"):
    parser.add_argument("--backend", choices=BACKENDS, help=f"{purpose}: {BACKEND_HELP}")


# ---- vitnp list ---------------------------------------------------------------------------------------------------


def add_list_arguments(parser):
    parser.add_argument("pattern", nargs="?", default="",
                        help="a word the name contains ('swin'), or a shell-style pattern of the whole name "
                             "('deit_*'); case is ignored (default: all)")


def run_list(args):
    """Print the matching names; none matching is an error (exit 1) with the closest names as a hint."""
    from .registry import list_models

    names = list_models(args.pattern)
    if not names:
        close = difflib.get_close_matches(args.pattern.lower(), list_models(), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else "; vitnp list shows them all"
        raise CommandError(f"no model matches {args.pattern!r}{hint}")
    for name in names:
        print(name)
    return 0


# ---- vitnp demo ---------------------------------------------------------------------------------------------------


def add_demo_arguments(parser):
    add_backend_argument(parser)


def run_demo(args):
    from .demo import run_demo

    run_demo(backend=args.backend)
    return 0


# ---- vitnp compile ------------------------------------------------------------------------------------------------


def add_compile_arguments(parser):
    parser.add_argument("--backend", dest="backends", nargs="+", choices=BACKENDS, default=list(BACKENDS),
                        help="the backends whose kernels to compile (default: both)")
    parser.add_argument("--dtype", dest="dtypes", nargs="+", choices=("float32", "float64"), default=["float32"],
                        help="the dtypes to compile them for (default: float32)")
    parser.add_argument("--processes", type=int, metavar="N", help="compile in N processes at once (default: one "
                                                                     "per core)")


def run_compile(args):
    from .kernel_cache import compile_kernels

    def report(name, backend, dtype, seconds):
        print(f"{seconds:7.1f} s  {name} ({backend}, {dtype})", flush=True)

    compile_kernels(args.backends, args.dtypes, args.processes, report)
    print("the kernels the registered models use are compiled for this CPU: later runs load them from the cache")
    return 0


# ---- vitnp export -------------------------------------------------------------------------------------------------

_NEEDS_TORCH = ("exporting a timm model by name needs PyTorch and timm, which vitnp itself does not: "
                "pip install torch timm")


def add_export_arguments(parser):
    parser.add_argument("source", metavar="NAME_OR_FILE",
                        help="a timm model name (e.g. vit_base_patch16_224), a checkpoint file (.pth / .pt / .bin / "
                             ".ckpt / .safetensors / .npz) or a Hugging Face model folder, in any layout vitnp reads")
    parser.add_argument("-o", "--out", required=True, metavar="OUT.npz", help="the .npz file to write")
    parser.add_argument("--model", metavar="NAME",
                        help="a vitnp model name: check the weights load into it (strictly) before keeping the file")
    parser.add_argument("--pretrained", action="store_true",
                        help="with a timm name: timm's pretrained weights (downloads them); default: random init")


def run_export(args):
    """Read any layout, convert it to timm's names, write an .npz that loads without torch (config included).

    OUT gets '.npz' appended when it lacks it; an existing folder receives <source name>.npz. The file is written
    whole beside OUT, checked (--model), then renamed to OUT: OUT may be the source itself, and a failed export leaves
    it as it was. With --pretrained, an unreachable hub fails at once, saying how to export elsewhere.
    """
    from .layouts import export_npz

    if _is_path(args.source):
        if args.pretrained:
            raise CommandError("--pretrained goes with a timm model name, not with a checkpoint file")
        source = args.source
    else:
        if args.pretrained:
            check_hub_reachable(args.source)
        source = timm_state_dict(args.source, args.pretrained)
    out = args.out
    if os.path.isdir(out):  # W.pth, a folder W or a timm name W -> OUT/W.npz
        name = os.path.splitext(os.path.basename(os.path.normpath(args.source)))[0]
        out = os.path.join(out, name + ".npz")
    elif not out.endswith(".npz"):
        out += ".npz"
    check = (lambda written: check_loads(written, args.model)) if args.model else None
    try:
        checkpoint = export_npz(source, out, check)
    except OSError as error:
        raise CommandError(f"cannot write {out}: {error.strerror or error}") from error
    params = sum(int(a.size) for a in checkpoint.state_dict.values())
    print(f"wrote {len(checkpoint.state_dict)} tensors, {params:,} parameters ({checkpoint.layout.name} layout) "
          f"to {out}")
    return 0


def _is_path(source):
    return os.path.exists(source) or os.sep in source or "." in os.path.basename(source)


HUB_TIMEOUT = 3.0  # seconds the reachability check of the Hugging Face Hub waits for a connection


def check_hub_reachable(name):
    """Fail at once, saying how to export on a connected machine, when the Hugging Face Hub that timm downloads from
    (``HF_ENDPOINT``, else huggingface.co; the ``HTTPS_PROXY`` when one is set) takes no TCP connection within
    :data:`HUB_TIMEOUT` (timm would spend a minute in retries). With ``HF_HUB_OFFLINE`` set timm reads its cache
    without the network: no check then."""
    import socket
    import threading
    from urllib.parse import urlsplit

    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return
    endpoint = (os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy") or os.environ.get("HF_ENDPOINT")
                or "https://huggingface.co")
    url = urlsplit(endpoint if "://" in endpoint else "http://" + endpoint)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    failures = [TimeoutError("timed out")]  # until the attempt ends; the name lookup itself takes no timeout

    def connect():
        try:
            socket.create_connection((host, port), timeout=HUB_TIMEOUT).close()
            failures.clear()
        except OSError as error:
            failures[0] = error

    attempt = threading.Thread(target=connect, daemon=True)
    attempt.start()
    attempt.join(HUB_TIMEOUT)
    error = next(iter(failures), None)
    if error is not None:
        raise CommandError(
            f"cannot reach {host}:{port} to download timm's pretrained weights for {name} "
            f"({error.strerror or error}); on a machine with network access run `vitnp export {name} "
            f"--pretrained -o {name}.npz`, copy {name}.npz here and pass it as --weights (weights already in the "
            "Hugging Face cache: set HF_HUB_OFFLINE=1)"
        ) from error


def timm_state_dict(name, pretrained):
    """``timm.create_model(name, pretrained=pretrained).state_dict()``, with one-line errors."""
    import importlib

    try:
        importlib.import_module("torch")
        timm = importlib.import_module("timm")
    except ImportError as error:
        raise CommandError(_NEEDS_TORCH) from error
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise CommandError(f"{name!r} is neither a file nor a timm model name{hint}")
    try:
        model = timm.create_model(name, pretrained=pretrained)
    except Exception as error:  # hub / network / cache errors come in many types
        if pretrained:
            raise CommandError(
                f"cannot get timm's pretrained weights for {name} (offline?): {_first_line(error)}; "
                "download the checkpoint file and export that instead"
            ) from error
        raise CommandError(f"timm cannot build {name}: {_first_line(error)}") from error
    return model.state_dict()


def check_loads(path, name):
    """Load the written file strictly into vitnp's ``name``; remove the file when it does not fit."""
    from .registry import create_model

    try:
        create_model(name, weights=path)
    except ValueError as error:
        os.remove(path)
        raise CommandError(f"the weights do not fit vitnp's {name}, nothing written: {error}") from error


def _first_line(error):
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


# ---- vitnp inspect ------------------------------------------------------------------------------------------------


def add_inspect_arguments(parser):
    parser.add_argument("path", metavar="FILE_OR_FOLDER",
                        help="a weight file (.npz, .safetensors, .pth / .pt / .bin / .ckpt) or a Hugging Face folder")


def run_inspect(args):
    from .layouts import describe
    from .registry import family_tables

    info = describe(args.path, family_tables)
    rows = [
        ("file", info["path"]),
        ("layout", f"{info['layout']} ({info['description']})"),
        ("family", info["family"]),
        ("architecture", " ".join(f"{k}={v}" for k, v in info["architecture"].items()) or "-"),
        ("fits", ", ".join(info["models"]) or "no registered name with these sizes (pass them as overrides)"),
        ("from weights", " ".join(f"{k}={v}" for k, v in info["config"].items()) or "-"),
        ("parameters", f"{info['num_params']:,} in {info['num_tensors']} stored tensors"),
        ("dtypes", ", ".join(f"{k}: {n}" for k, n in info["dtypes"].items())),
        ("labels", str(info["labels"]) if info["labels"] else "-"),
        ("notes", "; ".join(info["notes"]) or "-"),
    ]
    for label, value in rows:
        print(f"{label:<13} {value}")
    return 0


# ---- vitnp predict ------------------------------------------------------------------------------------------------


WEIGHTS_REQUIRED, WEIGHTS_OR_RANDOM, WEIGHTS_OPTIONAL = "required", "or random", "optional"


def add_model_arguments(parser, weights=WEIGHTS_REQUIRED, backend_purpose="the backend the model runs on"):
    """--model, --weights and --backend. ``weights``: WEIGHTS_REQUIRED; WEIGHTS_OR_RANDOM for the commands that
    show a model's output (--weights, or --random-weights on purpose: :func:`create_model_from`); WEIGHTS_OPTIONAL
    where random weights make a fair test (verify compares two computations with the same weights)."""
    parser.add_argument("--model", required=True, metavar="NAME", help="a registered model name (vitnp list)")
    parser.add_argument("--weights", required=weights == WEIGHTS_REQUIRED, metavar="FILE",
                        help="weights file or Hugging Face folder, in any layout vitnp reads" +
                             (" (default: the model's seeded random init)" if weights == WEIGHTS_OPTIONAL else ""))
    if weights == WEIGHTS_OR_RANDOM:
        parser.add_argument("--random-weights", action="store_true",
                            help="run the model's seeded random init instead of --weights, on purpose (demos, tests): "
                                 "its output means nothing")
    add_backend_argument(parser, backend_purpose)


def create_model_from(args, **options):
    """The model of --model / --weights / --backend (``options``: more of create_model's arguments). A command that
    shows a model's output refuses to run without weights unless --random-weights asks for it, and then says on
    stderr that the weights are random."""
    from .registry import create_model

    random_weights = getattr(args, "random_weights", False)
    if random_weights and args.weights:
        raise CommandError("--weights and --random-weights exclude each other: pass one")
    if hasattr(args, "random_weights") and not random_weights and not args.weights:
        raise CommandError(f"no weights for {args.model}: pass --weights FILE (vitnp export writes one from a timm "
                           "model or a checkpoint), or --random-weights to run its random init on purpose")
    model = create_model(args.model, weights=args.weights, backend=args.backend, **options)
    if random_weights:
        print(f"vitnp {args.command}: warning: {args.model} runs with RANDOM weights (--random-weights): its output "
              "means nothing", file=sys.stderr)
    return model


def add_predict_arguments(parser):
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files, folders or glob patterns")
    add_model_arguments(parser, weights=WEIGHTS_OR_RANDOM)
    parser.add_argument("--topk", type=int, default=5, help="how many classes per image (default 5)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default 8)")
    parser.add_argument("-o", "--out", metavar="OUT",
                        help="write the results to a .csv or a .jsonl file (default: print them)")


def run_predict(args):
    """Top-k classes of each image; unreadable files are reported and skipped; exit 1 when any was."""
    from contextlib import nullcontext

    from .predict import ResultsFile, expand_inputs, predict_files

    if args.topk < 1 or args.batch_size < 1:
        raise CommandError("--topk and --batch-size must be at least 1")
    if args.out and not args.out.lower().endswith(ResultsFile.FORMATS):
        raise CommandError(f"--out must end in .csv or .jsonl, got {args.out}")
    paths = expand_inputs(args.images)
    if not paths:
        raise CommandError("no image files found in " + " ".join(args.images))
    model = create_model_from(args)
    results = predict_files(model, paths, topk=args.topk, batch_size=args.batch_size)  # computed as iterated
    failed = written = 0
    progress = Progress(len(paths)) if args.out else None
    with ResultsFile(args.out) if args.out else nullcontext() as out:  # created before the first image is computed
        for result in results:
            if "error" in result:
                failed += 1
                message = f"vitnp predict: skipped {result['path']}: {result['error']}"
                if progress:
                    progress.note(message)
                else:
                    print(message, file=sys.stderr)
            elif out is None:
                tops = ", ".join(f"{label} {p:.4f}" for _, label, p in result["top"])
                print(f"{result['path']}: {tops}")
            if out is not None:
                out.write(result)
                written += "error" not in result
                progress.step()
    if args.out:
        skipped = f" ({failed} unreadable)" if failed else ""
        print(f"wrote {written} predictions to {args.out}{skipped}")
    return 1 if failed else 0


class Progress:
    """A one-line text progress bar on stderr: ``[#####.....] 5/10``."""

    def __init__(self, total, width=30):
        self.total, self.width, self.done = total, width, 0

    def step(self):
        self.done += 1
        self._draw()

    def note(self, message):
        """A message on its own line: the bar is wiped, the message printed, the bar drawn again below it."""
        print(f"\r{' ' * (self.width + 2 + 2 * len(str(self.total)) + 2)}\r{message}", file=sys.stderr)
        if self.done:
            self._draw()

    def _draw(self):
        filled = self.width * self.done // self.total
        end = "\n" if self.done == self.total else ""
        print(f"\r[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total}", end=end, file=sys.stderr)


# ---- vitnp verify -------------------------------------------------------------------------------------------------


def add_verify_arguments(parser):
    add_model_arguments(parser, weights=WEIGHTS_OPTIONAL,
                        backend_purpose="with --reference or --torch, the backend the model runs on")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--reference", metavar="REF.npz",
                        help="arrays exported from another implementation, named as forward_trace names them, and "
                             "the input under 'input' (B, C, H, W)")
    source.add_argument("--torch", action="store_true",
                        help="run timm's model of the same name with the same weights in this process (needs torch + "
                             "timm) on a random input")
    source.add_argument("--compare-backends", action="store_true",
                        help="run the model on both backends, same weights, same seeded random input, and check the "
                             "fast backend against the reference backend layer by layer (no torch; any family)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--image-size", type=int, metavar="N",
                        help="with --torch or --compare-backends: the input size N x N (default: the model's)")


def run_verify(args):
    """Per-layer max abs / relative error against a reference; exit 1 when any layer breaks the tolerance."""
    import numpy as np

    from .verify import compare_backends, compare_traces, format_table, read_reference, torch_reference

    if args.compare_backends and args.backend:
        raise CommandError("--compare-backends runs the model on both backends: --backend goes with --reference or "
                           "--torch")
    if args.reference and not args.weights:
        raise CommandError("--reference compares with arrays computed with some weights: pass those with "
                           "--weights FILE")
    model = create_model_from(args, dtype=np.dtype(args.dtype))
    if args.compare_backends:
        rows = compare_backends(model, args.image_size)
    else:
        x, reference = torch_reference(model, args.image_size) if args.torch else read_reference(args.reference)
        rows = compare_traces(model.forward_trace(x), reference, model.dtype)
    print(format_table(rows))
    failing = [row for row in rows if not row["ok"]]
    if failing:
        print(f"FAIL: first layer out of tolerance: {failing[0]['name']} ({len(failing)} of {len(rows)} layers fail)")
        return 1
    print(f"OK: {len(rows)} layers within tolerance")
    return 0


# ---- vitnp attention ----------------------------------------------------------------------------------------------


def add_attention_arguments(parser):
    parser.add_argument("image", metavar="IMAGE")
    add_model_arguments(parser, weights=WEIGHTS_OR_RANDOM)
    parser.add_argument("-o", "--out", required=True, metavar="OUT.png")
    parser.add_argument("--image-size", type=int, default=None, metavar="N",
                        help="resize the image to N x N first, as DINO's visualize_attention (default: the model's "
                             "eval preprocessing)")
    parser.add_argument("--threshold", type=float, default=None, metavar="T",
                        help="DINO's mask: keep the patches holding the top T of each head's attention mass (e.g. 0.6)")
    parser.add_argument("--rollout", action="store_true",
                        help="attention rollout over all blocks (Abnar & Zuidema) instead of the last block's")


def run_attention(args):
    from .attention_map import attention_figure

    model = create_model_from(args)
    attention_figure(model, args.image, args.out, image_size=args.image_size, threshold=args.threshold,
                     rollout=args.rollout)
    print(f"wrote {args.out}")
    return 0


# ---- vitnp embed --------------------------------------------------------------------------------------------------


def add_embed_arguments(parser):
    parser.add_argument("source", metavar="SOURCE",
                        help="a folder (searched recursively), a glob, a text file of paths, or any of these as an "
                             "fsspec URL")
    add_model_arguments(parser, backend_purpose="the backend the workers run the model on (recorded in DIR's "
                                                "manifest: a DIR resumes only on the same backend)")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder of Parquet shards + _manifest.json")
    parser.add_argument("--what", choices=("features", "logits", "topk"), default="features",
                        help="pre-logits features (default), logits, or the top-k labels and probabilities")
    parser.add_argument("--topk", type=int, default=5, metavar="K", help="with --what topk: classes per image")
    parser.add_argument("--batch", type=int, default=8, metavar="N", help="images per forward pass (default 8)")
    parser.add_argument("--shard-size", type=int, default=256, metavar="N", help="images per task and file")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--scheduler", metavar="ADDRESS", help="a running Dask scheduler, e.g. tcp://host:8786")
    where.add_argument("--workers", type=int, metavar="N",
                       help="local worker processes (default: one per core); 0 runs in this process without Dask")
    parser.add_argument("--shard-timeout", type=float, metavar="SECONDS",
                        help="restart a worker whose task runs longer and run the task again (default: 5 x the median "
                             "shard time, at least 60 s, once shards have finished)")


def run_embed(args):
    """Embed a collection on Dask; resumes a previous run into the same DIR; exit 1 when shards failed or no image
    could be read."""
    from .embed import embed

    result = embed(args.source, args.model, args.weights, args.out, what=args.what, topk=args.topk,
                   batch_size=args.batch, shard_size=args.shard_size, scheduler=args.scheduler, workers=args.workers,
                   backend=args.backend, shard_timeout=args.shard_timeout)
    skipped = f", {len(result['skipped'])} already done" if result["skipped"] else ""
    print(f"wrote {result['rows']} rows in {result['shards']} shards to {result['out']} ({len(result['computed'])} "
          f"computed{skipped}, {result['images_per_s']:.1f} images/s)")
    if result["errors"]:
        print(f"{result['errors']} unreadable images listed in {result['errors_file']}")
    for index in result["failed"]:
        print(f"vitnp embed: shard {index} failed: {result['failures'][index]}", file=sys.stderr)
    if result["failed"]:
        print(f"vitnp embed: {len(result['failed'])} shards failed; run the same command again to retry them",
              file=sys.stderr)
        return 1
    if result["rows"] == 0:
        print(f"vitnp embed: none of the {result['images']} images could be read (see {result['errors_file']})",
              file=sys.stderr)
        return 1
    return 0


# ---- the command --------------------------------------------------------------------------------------------------

# name -> (help, add_arguments(parser) or None, run(args) -> exit status)
COMMANDS = {
    "list": ("list the registered model names", add_list_arguments, run_list),
    "demo": ("classify the shipped digit images with the shipped digits ViT (no download)", add_demo_arguments,
             run_demo),
    "compile": ("compile the kernels of every registered model for this CPU now (after installing, or in a container "
                "image's build), so that no later run waits for them", add_compile_arguments, run_compile),
    "export": ("write a timm model's or a PyTorch checkpoint's weights as an .npz (needs torch + timm)",
               add_export_arguments, run_export),
    "inspect": ("tell a checkpoint's layout, architecture, parameter count and dtypes (no torch needed for "
                ".npz / .safetensors / HF safetensors folders)", add_inspect_arguments, run_inspect),
    "predict": ("top-k ImageNet (or the checkpoint's) classes of images, folders or globs; CSV / JSON lines output",
                add_predict_arguments, run_predict),
    "verify": ("compare every named intermediate (forward_trace) with another implementation's arrays, with timm, or "
               "between vitnp's two backends", add_verify_arguments, run_verify),
    "attention": ("draw the class token's attention per head (DINO / ViT / DeiT) as a PNG grid",
                  add_attention_arguments, run_attention),
    "embed": ("features, logits or top-k classes of a whole image collection on a Dask cluster, to Parquet shards "
              "(resumable; needs vitnp[scale])", add_embed_arguments, run_embed),
}

# The subcommands that run a model: ``main`` fixes malloc's thresholds for them (:func:`vitnp.memory.keep_freed_memory`)
# and has vitnp say so on stderr when it compiles its kernels (:func:`vitnp.compiling.announce_compiling`)
RUNS_A_MODEL = ("demo", "predict", "verify", "attention", "embed")


def build_parser():
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="vitnp", description="Vision Transformers in NumPy + Numba, equal to PyTorch."
    )
    parser.add_argument("--version", action="version", version=f"vitnp {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, (help_line, add_arguments, run) in COMMANDS.items():
        subparser = subparsers.add_parser(name, help=help_line, description=help_line)
        if add_arguments:
            add_arguments(subparser)
        subparser.set_defaults(run=run)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.command in RUNS_A_MODEL:
        memory.keep_freed_memory()
        compiling.announce_compiling()
    try:
        return args.run(args)
    except (CommandError, ValueError) as error:
        message = "; ".join(line.strip() for line in str(error).splitlines() if line.strip())
        print(f"vitnp {args.command}: error: {message}", file=sys.stderr)
        return 1


def command_line(argv=None):
    """The ``vitnp`` command (and ``python -m vitnp.cli``): :func:`main`, then the heap frozen before the interpreter
    exits. Numba's compiler leaves a few hundred thousand objects behind (its typing and lowering registries), and
    the collections of the interpreter's exit would walk them all: ~0.2 s of a cached ``vitnp demo`` of ~0.6 s. Frozen,
    they are left to the operating system, as at any process exit."""
    try:
        return main(argv)
    finally:
        gc.freeze()


if __name__ == "__main__":
    sys.exit(command_line())
