"""The code's layout, as the project states it: no import circle in vitnp/, the reference never reaching the engine
(neither by import nor by running any of its code), the reference built from NumPy and plain Numba only, and no file
too long to read."""

import ast
import sys
from pathlib import Path

import numpy as np
import pytest

import vitnp

PACKAGE = Path(vitnp.__file__).parent
FAST = PACKAGE / "fast"
REFERENCE = PACKAGE / "reference"


def _module_name(path):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in PACKAGE.rglob("*.py")}


def _imports(name):
    """The vitnp modules ``name`` imports anywhere in its source (module level or inside functions), and every other
    top-level package it imports."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:  # `from .pkg import module` imports the module, `from .module import name` it
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return found


GRAPH = {name: {m for m in _imports(name) if m in MODULES and m != name} for name in MODULES}


def test_the_graph_sees_the_imports_it_should():
    # a check of the parser itself: known edges, relative and absolute, module level and inside a function
    assert "vitnp.fast.schedule" in GRAPH["vitnp.fast.pool"]
    assert "vitnp.reference.ops" in GRAPH["vitnp.fast.ops"]
    assert "vitnp.model" in GRAPH["vitnp.layers"]
    assert "vitnp.registry" in GRAPH["vitnp.cli"]  # imported inside the subcommands' functions


def test_no_import_circle_in_vitnp():
    state = {}  # module -> 'open' while on the DFS stack, 'done' after

    def visit(module, path):
        state[module] = "open"
        for imported in sorted(GRAPH[module]):
            if state.get(imported) == "open":
                cycle = path[path.index(imported):] + [imported]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if imported not in state:
                visit(imported, path + [imported])
        state[module] = "done"

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])


def test_the_reference_imports_nothing_of_the_engine_and_only_numpy_and_numba():
    for name in (m for m in MODULES if m.startswith("vitnp.reference")):
        imported = _imports(name)
        assert not {m for m in imported if m.startswith("vitnp.fast")}, f"{name} imports the fast backend"
        outside = {m.split(".")[0] for m in imported if not m.startswith("vitnp.reference")}
        assert outside <= {"math", "numba", "numpy"}, f"{name} imports {sorted(outside)}"


def test_the_fast_package_is_a_leaf_below_its_ops():
    # the protocol the pool and the kernels share imports nothing of vitnp; nothing in the engine imports a model file
    assert not {m for m in _imports("vitnp.fast.schedule") if m.startswith("vitnp")}
    model_files = {"vitnp.model", "vitnp.layers", "vitnp.vit", "vitnp.swin", "vitnp.mobilevit", "vitnp.notes_vit",
                   "vitnp.registry"}
    for name in (m for m in MODULES if m.startswith("vitnp.fast")):
        assert not GRAPH[name] & model_files, f"{name} imports a model file"


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_file_is_too_long_to_read(path):
    lines = len(path.read_text().splitlines())
    limit = 800 if FAST in path.parents else 1000
    assert lines <= limit, f"{path.relative_to(PACKAGE)} has {lines} lines (at most {limit})"


def _python_files_run(function):
    """The source files of every Python function that runs inside ``function()``."""
    files = set()

    def profile(frame, event, arg):
        if event == "call":
            files.add(frame.f_code.co_filename)

    sys.setprofile(profile)
    try:
        function()
    finally:
        sys.setprofile(None)
    return files


@pytest.mark.parametrize(("name", "size"), [
    ("vit_tiny_patch16_224", 64), ("deit_tiny_distilled_patch16_224", 64), ("swin_tiny_patch4_window7_224", 64),
    ("mobilevit_xxs", 64), ("notes_prenorm_vit_patch32_256", 64), ("notes_torch_encoder_vit_patch7_28", 28),
    ("lucidrains_vit_patch32_256", 64),
])  # a model of each family, at a small size
def test_a_reference_forward_runs_no_code_of_the_engine(name, size):
    model = vitnp.create_model(name, backend="reference", img_size=size)
    x = np.random.default_rng(0).standard_normal((2, model.in_chans, size, size)).astype(np.float32)
    model(x)  # the first call compiles the kernels: the profiled call runs only the forward
    files = _python_files_run(lambda: (model(x), model.forward_trace(x)))
    assert any(Path(f).parent == REFERENCE for f in files)  # the profiler sees the reference ops it should
    engine = sorted(f for f in files if FAST in Path(f).parents)
    assert not engine, f"a reference forward of {name} ran {engine}"


def test_a_fast_forward_is_seen_running_the_engine():
    # the check above would pass vacuously if the profiler could not see the engine's Python code
    model = vitnp.create_model("vit_tiny_patch16_224", backend="fast", img_size=64)
    x = np.zeros((1, 3, 64, 64), np.float32)
    model(x)
    assert any(FAST in Path(f).parents for f in _python_files_run(lambda: model(x)))
