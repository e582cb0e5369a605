"""Where the compiled kernels go, and the one-line note while they are compiled: run as a user's process would.

Each case runs a fresh Python with its own empty kernel cache, on the digits ViT and the reference backend (its short
kernels compile in about a second), twice: the first run compiles and says so on stderr, the second loads the cache
and is silent. The read-only cases mount a copy of the package read-only in a private mount namespace (``unshare``);
where the system allows no namespaces they skip, saying so.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from numba.core import types

import vitnp
from vitnp import compiling

from tolerances import assert_close

NOTE = "vitnp: compiling its kernels for this CPU, once"
RUN_DIGITS = (
    "import numpy as np, vitnp\n"
    "vitnp.announce_compiling()\n"
    "model = vitnp.create_model('vit_digits_patch4_32', backend='reference')\n"
    "print(model(np.zeros((1, 1, 32, 32), np.float32)).shape)\n"
)
PACKAGE = Path(vitnp.__file__).parent


def run(code, env, prefix=()):
    """``code`` in a fresh Python, in the root folder (so that vitnp comes from PYTHONPATH or site-packages, not from
    the current folder)."""
    return subprocess.run([*prefix, sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                          cwd="/")


def run_python(code, env, prefix=()):
    """``code`` in a fresh Python: its stderr, once it has succeeded."""
    result = run(code, env, prefix)
    assert result.returncode == 0, result.stderr
    return result.stderr


def run_digits(env, prefix=()):
    """RUN_DIGITS in a fresh Python: its stderr."""
    result = run(RUN_DIGITS, env, prefix)
    assert result.returncode == 0 and result.stdout.strip() == "(1, 10)", result.stderr
    return result.stderr


def clean_env(**values):
    env = {key: value for key, value in os.environ.items() if not key.startswith(("NUMBA_CACHE_DIR", "XDG_"))}
    env.update(values)
    return env


def copy_of_package(tmp_path):
    """vitnp's sources without compiled kernels, in tmp_path/src/vitnp (the tests' Numba cache is not copied)."""
    source = tmp_path / "src"
    shutil.copytree(PACKAGE, source / "vitnp", ignore=shutil.ignore_patterns("__pycache__", "*.npz", "samples"))
    return source


def test_the_note_comes_when_kernels_are_compiled_and_not_when_they_are_loaded(tmp_path):
    env = clean_env(NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    first = run_digits(env)
    assert first.count(NOTE) == 1, first
    assert str(tmp_path / "cache") in first  # it says where the kernels are kept
    assert any((tmp_path / "cache").rglob("*.nbc"))
    second = run_digits(env)
    assert NOTE not in second, second


def test_vitnp_demo_says_it_compiles_on_a_first_run_only(tmp_path):
    """The demo as a new user runs it (fast backend, ``VITNP_COMPILE`` unset): the first run answers on the reference's
    kernels while another process compiles the engine's, and says so; once that process has finished, a run is
    silent and runs the engine's kernels."""
    env = clean_env(NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    for name in ("VITNP_BACKEND", "VITNP_COMPILE"):
        env.pop(name, None)
    first = run("import vitnp.compiling\n"
                "from vitnp.cli import main\n"
                "status = main(['demo'])\n"
                "assert vitnp.compiling.wait_for_kernels(timeout=240)\n"
                "raise SystemExit(status)\n", env)
    assert first.returncode == 0, first.stderr
    assert first.stderr.count(NOTE) == 1 and "accuracy: " in first.stdout
    assert "on the fast backend (its ops on the reference's kernels" in first.stdout
    second = run("from vitnp.cli import command_line; raise SystemExit(command_line(['demo']))", env)
    assert second.returncode == 0, second.stderr
    assert second.stderr == "" and "accuracy: " in second.stdout
    assert "ms per image on the fast backend (one batch" in second.stdout


def test_compile_kernels_fills_the_cache_a_later_run_loads(tmp_path):
    env = clean_env(NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    ahead = ("import vitnp.kernel_cache as kernel_cache\n"
             "kernel_cache.compile_kernels(backends=['reference'], names=['vit_digits_patch4_32'], processes=1)\n")
    run_python(ahead, env)
    assert any((tmp_path / "cache").rglob("*.nbc"))
    assert NOTE not in run_digits(env)


def test_a_change_in_any_kernel_module_recompiles_every_kernel(tmp_path):
    # A kernel compiles the functions it calls from other modules into itself (vecmath's exp into the GEMM), so its
    # cached code is only valid for the sources of every kernel module: a change in one recompiles them all.
    source = copy_of_package(tmp_path)
    env = clean_env(PYTHONPATH=str(source), NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    assert NOTE in run_digits(env)
    assert NOTE not in run_digits(env)
    with open(source / "vitnp" / "reference" / "resample.py", "a") as resample:  # no kernel of its own
        resample.write("\n# a change\n")
    assert NOTE in run_digits(env)


def test_without_announce_compiling_a_library_user_sees_nothing(tmp_path):
    env = clean_env(NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    quiet = run_python(RUN_DIGITS.replace("vitnp.announce_compiling()\n", ""), env)
    assert NOTE not in quiet


@pytest.fixture
def read_only_package(tmp_path):
    """(copy of vitnp's sources, a command prefix that runs its command with them mounted read-only), or skip."""
    source = copy_of_package(tmp_path)
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1) to mount the package read-only")
    mount = f"mount --bind {source} {source} && mount -o remount,bind,ro {source} && exec \"$@\""
    prefix = ("unshare", "--mount", "--map-root-user", "sh", "-c", mount, "sh")
    probe = subprocess.run([*prefix, "touch", str(source / "probe")], capture_output=True, text=True)
    if "Read-only file system" not in probe.stderr:
        pytest.skip(f"this system lets no process mount a folder read-only in a namespace: {probe.stderr.strip()}")
    return source, prefix


def no_home_env(source, temporary):
    """A read-only package with no writable home or cache folder, and ``temporary`` as the temporary directory."""
    temporary.mkdir()
    return clean_env(PYTHONPATH=str(source), HOME=str(source / "no-home"), TMPDIR=str(temporary))


def test_a_read_only_package_keeps_its_kernels_in_the_users_cache_folder(read_only_package, tmp_path):
    source, prefix = read_only_package
    home = tmp_path / "home"
    home.mkdir()
    env = clean_env(PYTHONPATH=str(source), HOME=str(home), TMPDIR=str(tmp_path))
    first = run_digits(env, prefix)
    assert NOTE in first and str(home / ".cache") in first, first
    assert not any(source.rglob("*.nbc"))
    assert any((home / ".cache").rglob("*.nbc"))
    assert NOTE not in run_digits(env, prefix)


def test_with_no_writable_cache_folder_the_kernels_go_to_a_private_temporary_folder(read_only_package, tmp_path):
    source, prefix = read_only_package
    temporary = tmp_path / "tmp"
    env = no_home_env(source, temporary)
    first = run_digits(env, prefix)
    assert NOTE in first and str(temporary) in first, first
    [folder] = temporary.glob("vitnp-kernels-*")
    assert folder.stat().st_mode & 0o077 == 0  # only its user may plant code there
    assert any(folder.rglob("*.nbc"))
    assert NOTE not in run_digits(env, prefix)


def test_a_temporary_folder_another_user_could_write_is_not_used(read_only_package, tmp_path):
    source, prefix = read_only_package
    temporary = tmp_path / "tmp"
    env = no_home_env(source, temporary)
    uid = run("import os; print(os.getuid())", env, prefix).stdout.strip()  # the user the namespace maps this one to
    planted = temporary / f"vitnp-kernels-{uid}"
    planted.mkdir()
    planted.chmod(0o777)
    result = run(RUN_DIGITS, env, prefix)
    assert result.returncode != 0 and "no locator available" in result.stderr
    assert not any(planted.iterdir())


LIST_SPECIALISATIONS = """
import importlib, json, pkgutil
import numpy as np
import vitnp, vitnp.fast
for name in ("vit_digits_patch4_32", "swin_tiny_patch4_window7_224", "mobilevit_xxs"):
    model = vitnp.create_model(name, backend="fast")
    model(np.zeros((1, *vitnp.data_config(name)["input_size"]), np.float32))
latent = np.ones((1, 3, 4), np.float32)  # a read-only input, as an attention pool's latent queries loaded from a file
latent.flags.writeable = False
vitnp.fast.ops.linear(latent, np.ones((8, 4), np.float32))
kernels = {}
for module_info in pkgutil.iter_modules(vitnp.fast.__path__):
    module = importlib.import_module(f"vitnp.fast.{module_info.name}")
    for value in vars(module).values():
        if hasattr(value, "signatures") and value.py_func.__module__ == module.__name__:
            kernels[f"{module.__name__}.{value.py_func.__name__}"] = [str(s) for s in value.signatures]
print(json.dumps(kernels))
"""


TIERED_DIGITS = """
import numpy as np, vitnp
from vitnp.compiling import tiering
from vitnp.demo import WEIGHTS_PATH
vitnp.announce_compiling()
x = np.random.default_rng(0).standard_normal((1, 1, 32, 32)).astype(np.float32)
fast = vitnp.create_model('vit_digits_patch4_32', weights=WEIGHTS_PATH)  # read-only weights, as from any file
first = fast(x)
tiering.wait(timeout=240)
later = fast(x)
reference = vitnp.create_model('vit_digits_patch4_32', weights=WEIGHTS_PATH, backend='reference')(x)
np.save({out!r}, np.stack([first, later, reference]))
print(tiering.states)
"""


def test_on_an_empty_cache_the_fast_backend_answers_at_once_and_compiles_in_the_background(tmp_path):
    env = clean_env(NUMBA_CACHE_DIR=str(tmp_path / "cache"), VITNP_COMPILE="background")
    out = tmp_path / "outputs.npy"
    result = run(TIERED_DIGITS.format(out=str(out)), env)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("vitnp: compiling its kernels") == 1 and "in the background" in result.stderr
    assert result.stdout.strip() == "{'float32': 'ready'}"  # the other process compiled every kernel the forward needs
    first, later, reference = np.load(out)
    np.testing.assert_array_equal(first, reference)  # the first forward ran the reference's ops
    assert not np.array_equal(later, reference)  # the later one the engine's (equal to rounding, not bit for bit)
    assert_close(later, reference, "model")
    # The engine's kernels are in the cache now: a process that would compile them at once has nothing to compile.
    again = run(TIERED_DIGITS.format(out=str(out)), dict(env, VITNP_COMPILE="wait"))
    assert again.returncode == 0 and again.stderr == "", again.stderr
    first, later, _ = np.load(out)
    np.testing.assert_array_equal(first, later)


class FinishedProcess:
    def poll(self):
        return 0


def test_tiering_states_compile_elsewhere_then_here(monkeypatch):
    # A dtype's first miss starts a compiling process and runs the reference's op; once the process has finished,
    # a kernel still missing (one the process's forwards did not need) is compiled here rather than waited for again.
    tiering = compiling.Tiering()
    monkeypatch.setattr(tiering, "forced_mode", "background")
    started = []

    def start_compiler(dtype):
        started.append(dtype)
        tiering.compilers[dtype] = FinishedProcess()
        return "compiling"

    monkeypatch.setattr(tiering, "_start_compiler", start_compiler)
    assert tiering.held_back([types.float32[:, :], types.int64[:]]) == ["float32"]
    assert tiering.held_back([types.int64[:]]) == []  # kernels of no float array compile here, at once
    assert tiering._after_miss(["float32"]) is False and started == ["float32"]
    assert tiering.state("float32") == "ready"
    assert tiering._after_miss(["float32"]) is True and started == ["float32"]
    assert tiering.held_back([types.float32[:, :]]) == [] and tiering.held_back([types.float64[:]]) == ["float64"]
    monkeypatch.setattr(tiering, "forced_mode", "wait")
    assert tiering.held_back([types.float64[:]]) == []


def test_an_unknown_compile_mode_is_refused(monkeypatch):
    monkeypatch.setenv("VITNP_COMPILE", "later")
    with pytest.raises(ValueError, match="VITNP_COMPILE='later'"):
        compiling.Tiering().mode()


def test_one_specialisation_per_kernel_for_a_dtype(tmp_path):
    # A model compiles each kernel it uses once for float32: a literal argument (``f(x, 0)`` from another kernel)
    # would compile a kernel again for Literal[int](0), as the GEMM once was four times. The Winograd input transform
    # takes a tuple of one or two maps (a concatenation), a type of its own each. A read-only input to a Linear is
    # copied, not a GEMM compiled apart for read-only arrays.
    # An empty cache: a kernel that only other kernels call shows the signatures it was compiled for when it is
    # compiled, not when its callers are loaded from the cache.
    result = run(LIST_SPECIALISATIONS, clean_env(NUMBA_CACHE_DIR=str(tmp_path)))
    assert result.returncode == 0, result.stderr
    kernels = json.loads(result.stdout)
    assert "vitnp.fast.gemm.gemm_panels" in kernels and "vitnp.fast.fused._inverted_residual_shared" in kernels
    assert not [name for name, signatures in kernels.items() if any("Literal" in s for s in signatures)]
    several = {name: len(signatures) for name, signatures in kernels.items() if len(signatures) > 1}
    assert several == {"vitnp.fast.winograd._winograd_input_shared": 2}, several
