"""The ``vitnp`` command, a thin front over the API: ``vitnp list``, ``vitnp demo``, ``vitnp export``.

Each subcommand is one entry of :data:`COMMANDS`: its help line, a function adding its arguments and a function
running it on the parsed arguments. A new subcommand is one more entry. Problems the user can fix raise
:class:`CommandError` (or the API's ValueError) and are printed as one line without a traceback, exit status 1.
"""

import argparse
import difflib
import fnmatch
import os
import sys


class CommandError(Exception):
    """A problem the user can fix; ``main`` prints it as one line and exits with status 1."""


# ---- vitnp list ---------------------------------------------------------------------------------------------------


def add_list_arguments(parser):
    parser.add_argument("pattern", nargs="?", default="*", help="shell-style filter, e.g. 'deit_*' (default: all)")


def run_list(args):
    from .registry import list_models

    for name in fnmatch.filter(list_models(), args.pattern):
        print(name)
    return 0


# ---- vitnp demo ---------------------------------------------------------------------------------------------------


def run_demo(args):
    from .demo import run_demo

    run_demo()
    return 0


# ---- vitnp export -------------------------------------------------------------------------------------------------

_NEEDS_TORCH = "exporting a timm model by name needs PyTorch and timm, which vitnp itself does not: pip install torch timm"


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
    """Read any layout, convert it to timm's names, write an .npz that loads without torch (config included)."""
    from .layouts import export_npz

    if _is_path(args.source):
        if args.pretrained:
            raise CommandError("--pretrained goes with a timm model name, not with a checkpoint file")
        source = args.source
    else:
        source = timm_state_dict(args.source, args.pretrained)
    out = args.out if args.out.endswith(".npz") else args.out + ".npz"
    try:
        checkpoint = export_npz(source, out)
    except OSError as error:
        raise CommandError(f"cannot write {out}: {error.strerror or error}") from error
    if args.model:
        check_loads(out, args.model)
    params = sum(int(a.size) for a in checkpoint.state_dict.values())
    print(f"wrote {len(checkpoint.state_dict)} tensors, {params:,} parameters ({checkpoint.layout.name} layout) to {out}")
    return 0


def _is_path(source):
    return os.path.exists(source) or os.sep in source or "." in os.path.basename(source)


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

    info = describe(args.path)
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


# ---- the command --------------------------------------------------------------------------------------------------

# name -> (help, add_arguments(parser) or None, run(args) -> exit status)
COMMANDS = {
    "list": ("list the registered model names", add_list_arguments, run_list),
    "demo": ("classify the shipped digit images with the shipped digits ViT (no download)", None, run_demo),
    "export": ("write a timm model's or a PyTorch checkpoint's weights as an .npz (needs torch + timm)",
               add_export_arguments, run_export),
    "inspect": ("tell a checkpoint's layout, architecture, parameter count and dtypes (no torch needed for "
                ".npz / .safetensors / HF safetensors folders)", add_inspect_arguments, run_inspect),
}


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
    try:
        return args.run(args)
    except (CommandError, ValueError) as error:
        message = "; ".join(line.strip() for line in str(error).splitlines() if line.strip())
        print(f"vitnp {args.command}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
