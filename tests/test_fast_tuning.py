"""The engine's settings measured on the CPU once (vitnp.fast.tuning): which candidate wins, where the choice is kept,
and what overrides it. The timings here are made up (a timer that returns given seconds), so that the rules are tested,
not this machine's speed; that the choices change no bit of a result is tested with the kernels they set
(test_fast_kernels.py)."""

import numpy as np
import pytest

from vitnp.fast import gemm, tuning

CANDIDATES = (0, 16, 32)


@pytest.fixture(autouse=True)
def measuring_process(monkeypatch):
    # each test as a process that measures (not a compiling one) and has no override in its environment
    monkeypatch.setattr(tuning, "_measuring", True)
    monkeypatch.delenv("VITNP_SETTING", raising=False)


def setting(folder, seconds=None, calls=None, **options):
    """A MeasuredSetting named 'setting' whose timer gives ``seconds[dtype name][candidate]`` (or
    ``seconds[candidate]`` for every dtype), each run noted in ``calls``; a timer that fails the test if None."""

    def make_timer(dtype):
        if seconds is None:
            raise AssertionError("measured, where the choice should have been read or set")
        times = seconds.get(dtype.name, seconds)

        def time_one(candidate):
            if calls is not None:
                calls.append((dtype.name, candidate))
            return times[candidate]

        return time_one

    return tuning.MeasuredSetting("setting", CANDIDATES, make_timer, lambda: str(folder), **options)


def kept_settings(folder):
    return tuning._read_settings(tuning._settings_path(str(folder)))


def test_the_fastest_candidate_is_chosen_and_kept_for_the_next_process(tmp_path):
    calls = []
    assert setting(tmp_path, {0: 1.0, 16: 0.5, 32: 0.8}, calls)(np.float32) == 16
    assert len(calls) == 6 * len(CANDIDATES)  # a warm-up run and five rounds of each
    kept = kept_settings(tmp_path)
    assert kept["setting/float32"]["choice"] == 16 and kept["cpu"] == tuning.cpu_description()
    assert kept["setting/float32"]["seconds"] == {"0": 1.0, "16": 0.5, "32": 0.8}
    assert setting(tmp_path)(np.float32) == 16  # the next process reads it


def test_a_gain_within_the_margin_keeps_the_default(tmp_path):
    seconds = {"float32": {0: 1.0, 16: 0.98, 32: 0.99}, "float64": {0: 1.0, 16: 0.98, 32: 0.9}}
    measured = setting(tmp_path, seconds)
    assert measured(np.float32) == 0
    assert measured(np.float64) == 32


def test_the_best_of_the_rounds_counts(tmp_path):
    # one slow run of the default (the machine busy for a moment) does not make another candidate win
    runs = iter([5.0, 1.0, 1.0] + [5.0, 1.0, 1.0] + [1.0, 1.0, 1.0] * 4)  # warm-up, then rounds of (0, 16, 32)
    measured = tuning.MeasuredSetting("setting", CANDIDATES, lambda dtype: lambda candidate: next(runs),
                                      lambda: str(tmp_path))
    assert measured(np.float32) == 0


def test_once_per_process_and_dtype_however_the_dtype_is_named(tmp_path):
    calls = []
    measured = setting(tmp_path, {0: 1.0, 16: 2.0, 32: 2.0}, calls)
    for dtype in (np.float32, "float32", np.dtype(np.float32), np.float32):
        assert measured(dtype) == 0
    assert len(calls) == 18
    measured(np.float64)
    assert len(calls) == 36 and {dtype for dtype, _ in calls} == {"float32", "float64"}


@pytest.mark.parametrize("kept", ['{"setting/float32": {"choice": 12345}}', '{"setting/float32": 7}', "[1, 2]",
                                  '{"setting/float32": {"choice": 0.0}}', '{"setting/float32": {"choice": true}}',
                                  '{"setting/float32": {"choice": "16"}}', "[" * 100_000, "{not json", "",
                                  b"\xff\xfe".decode("latin-1")])
def test_a_kept_file_that_does_not_hold_a_candidate_is_measured_again(tmp_path, kept):
    with open(tuning._settings_path(str(tmp_path)), "w") as file:
        file.write(kept)
    assert setting(tmp_path, {0: 1.0, 16: 1.0, 32: 0.5})(np.float32) == 32
    assert kept_settings(tmp_path)["setting/float32"]["choice"] == 32


def test_another_cpu_keeps_its_own_file(tmp_path, monkeypatch):
    setting(tmp_path, {0: 1.0, 16: 0.5, 32: 1.0})(np.float32)
    monkeypatch.setattr(tuning, "cpu_description", lambda: "another CPU")
    assert setting(tmp_path, {0: 1.0, 16: 1.0, 32: 0.5})(np.float32) == 32
    assert len(list(tmp_path.glob("vitnp-tuning-*.json"))) == 2


def test_a_folder_that_cannot_be_written_keeps_nothing_but_the_choice_stands(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("")  # a file where the folder would be
    assert setting(blocked / "cache", {0: 1.0, 16: 0.5, 32: 1.0})(np.float32) == 16
    assert blocked.read_text() == "" and [p.name for p in tmp_path.iterdir()] == ["file"]


def test_the_environment_sets_a_choice_without_measuring(tmp_path, monkeypatch):
    monkeypatch.setenv("VITNP_SETTING", "32")
    assert setting(tmp_path)(np.float32) == 32
    assert not list(tmp_path.iterdir())
    for wrong in ("8", "fast", ""):
        monkeypatch.setenv("VITNP_SETTING", wrong)
        with pytest.raises(ValueError, match=f"VITNP_SETTING='{wrong}': expected one of 0, 16, 32"):
            setting(tmp_path)(np.float32)


def test_a_compiling_process_defers_to_the_default_and_keeps_nothing(tmp_path, monkeypatch):
    tuning.defer_measuring()
    deferred = setting(tmp_path)
    assert deferred(np.float32) == 0
    assert not list(tmp_path.iterdir())
    monkeypatch.setattr(tuning, "_measuring", True)  # another process measures and keeps its choice
    setting(tmp_path, {0: 1.0, 16: 0.5, 32: 1.0})(np.float32)
    monkeypatch.setattr(tuning, "_measuring", False)
    assert deferred(np.float32) == 16  # the deferring one reads it on its next call: the default was not for good


def test_the_gemm_measures_its_depth_blocks_on_this_cpu(monkeypatch):
    # The real timer on the real kernel: a candidate comes back, kept with the GEMM's kernel cache (measured here, or
    # read from there if this machine's choice is kept already).
    monkeypatch.delenv("VITNP_GEMM_PANEL_BLOCK", raising=False)
    monkeypatch.setattr(gemm.panel_block_bytes, "chosen", {})
    choice = gemm.panel_block_bytes(np.float32)
    assert choice in gemm.PANEL_BLOCK_CANDIDATES
    kept = kept_settings(gemm.gemm_panels._cache.cache_path)
    assert kept["gemm_panel_block/float32"]["choice"] == choice
    assert set(map(int, kept["gemm_panel_block/float32"]["seconds"])) == set(gemm.PANEL_BLOCK_CANDIDATES)


def test_vitnp_compile_measures_in_its_own_process_after_the_workers(monkeypatch):
    # The workers defer (they time nothing against one another); the process that ran them measures once they are done,
    # for each dtype it compiled the fast backend's kernels for, and not for the reference backend alone.
    from vitnp import kernel_cache

    measured = []
    monkeypatch.setattr(gemm, "panel_block_bytes", measured.append)
    kernel_cache.compile_kernels(backends=("reference",), dtypes=("float32",), names=())
    assert measured == []
    kernel_cache.compile_kernels(backends=("fast", "reference"), dtypes=("float32", "float64"), names=())
    assert measured == ["float32", "float64"]
    monkeypatch.setattr(kernel_cache.compiling, "compile_in_foreground", lambda: None)
    kernel_cache._compile_worker()
    assert not tuning._measuring
