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

import pytest

import vitnp

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
    env = clean_env(NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    env.pop("VITNP_BACKEND", None)
    runs = [run("from vitnp.cli import main; raise SystemExit(main(['demo']))", env) for _ in range(2)]
    assert [run.returncode for run in runs] == [0, 0], runs[0].stderr
    assert runs[0].stderr.count(NOTE) == 1 and "accuracy: " in runs[0].stdout
    assert runs[1].stderr == "" and "accuracy: " in runs[1].stdout


def test_compile_kernels_fills_the_cache_a_later_run_loads(tmp_path):
    env = clean_env(NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    ahead = ("import vitnp.kernel_cache as kernel_cache\n"
             "kernel_cache.compile_kernels(backends=['reference'], names=['vit_digits_patch4_32'], processes=1)\n")
    run_python(ahead, env)
    assert any((tmp_path / "cache").rglob("*.nbc"))
    assert NOTE not in run_digits(env)


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
kernels = {}
for module_info in pkgutil.iter_modules(vitnp.fast.__path__):
    module = importlib.import_module(f"vitnp.fast.{module_info.name}")
    for value in vars(module).values():
        if hasattr(value, "signatures") and value.py_func.__module__ == module.__name__:
            kernels[f"{module.__name__}.{value.py_func.__name__}"] = [str(s) for s in value.signatures]
print(json.dumps(kernels))
"""


def test_one_specialisation_per_kernel_for_a_dtype():
    # A model compiles each kernel it uses once for float32: a literal argument (``f(x, 0)`` from another kernel)
    # would compile a kernel again for Literal[int](0), as the GEMM once was four times. The Winograd input transform
    # takes a tuple of one or two maps (a concatenation), a type of its own each.
    result = run(LIST_SPECIALISATIONS, clean_env())
    assert result.returncode == 0, result.stderr
    kernels = json.loads(result.stdout)
    assert "vitnp.fast.gemm.gemm_panels" in kernels and "vitnp.fast.fused._inverted_residual_shared" in kernels
    assert not [name for name, signatures in kernels.items() if any("Literal" in s for s in signatures)]
    several = {name: len(signatures) for name, signatures in kernels.items() if len(signatures) > 1}
    assert several == {"vitnp.fast.winograd._winograd_input_shared": 2}, several
