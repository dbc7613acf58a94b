"""The real runner and workspace, driven by two small stages (tests/fixtures/toy_stages.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import runner, validate
from pipeline.errors import StageError
from pipeline.workspace import MANIFEST, fingerprint, locked, no_space, require_space
from tests.conftest import REPO_ROOT
from tests.fixtures.toy_stages import PAYLOAD, STAGES, runs


def _build(workdir: Path, *overrides: str) -> list[runner.Step]:
    return runner.build(validate.load([f"workdir={workdir}", *overrides]), STAGES)


def test_second_build_is_a_cache_hit(tmp_path: Path) -> None:
    first = _build(tmp_path)
    second = _build(tmp_path)
    assert [s.fingerprint for s in first] == [s.fingerprint for s in second]
    assert all(s.cached for s in second) and runs(tmp_path, "first") == runs(tmp_path, "second") == 1
    assert second[1].results == {"upstream_bytes": len(PAYLOAD)}  # results come back from the manifest


def test_force_redoes_every_stage(tmp_path: Path) -> None:
    _build(tmp_path)
    _build(tmp_path, "force=true")
    assert runs(tmp_path, "first") == runs(tmp_path, "second") == 2


def test_fingerprint_changes_only_with_the_relevant_slice(tmp_path: Path) -> None:
    base = _build(tmp_path)
    tp3 = _build(tmp_path, "parallel.tp=3")
    assert tp3[0].fingerprint == base[0].fingerprint and tp3[0].cached  # first ignores tp
    assert tp3[1].fingerprint != base[1].fingerprint and not tp3[1].cached
    renamed = _build(tmp_path, "model.name=other")
    assert renamed[0].fingerprint != base[0].fingerprint
    assert renamed[1].fingerprint != base[1].fingerprint  # upstream changed, so downstream too
    assert runs(tmp_path, "first") == 2 and runs(tmp_path, "second") == 3


def test_fingerprint_covers_versions_and_upstream() -> None:
    args = ("fetch", 1, {"a": 1}, None, {"torch": "2.13.0"})
    assert fingerprint(*args) == fingerprint(*args)
    assert fingerprint("fetch", 1, {"a": 1}, None, {"torch": "2.9.1"}) != fingerprint(*args)
    assert fingerprint("fetch", 2, {"a": 1}, None, {"torch": "2.13.0"}) != fingerprint(*args)
    assert fingerprint("fetch", 1, {"a": 1}, "up", {"torch": "2.13.0"}) != fingerprint(*args)


def test_manifest_records_timing_and_files(tmp_path: Path) -> None:
    steps = _build(tmp_path)
    manifest = json.loads((steps[0].dirs.final / MANIFEST).read_text())
    assert manifest["seconds"] >= 0 and manifest["fingerprint"] == steps[0].fingerprint
    assert manifest["files"]["data.bin"] == len(PAYLOAD)
    assert manifest["tools"] == {"pytest": __import__("pytest").__version__}
    assert (steps[0].dirs.final / "stage.log").is_file()


def test_damaged_result_is_redone(tmp_path: Path) -> None:
    steps = _build(tmp_path)
    (steps[0].dirs.final / "data.bin").write_bytes(b"truncated")
    again = _build(tmp_path)
    assert not again[0].cached and runs(tmp_path, "first") == 2
    assert (again[0].dirs.final / "data.bin").read_bytes() == PAYLOAD


def test_run_killed_mid_write_completes_when_run_again(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "tests.fixtures.toy_stages", f"workdir={tmp_path}"]
    killed = subprocess.run(
        argv, cwd=REPO_ROOT, capture_output=True, env={**os.environ, "TOY_KILL_AFTER_BYTES": "500000"}
    )
    assert killed.returncode == -9
    planned = runner.plan(validate.load([f"workdir={tmp_path}"]), STAGES)
    assert not planned[0].cached and planned[0].dirs.partial.exists()  # half-written, not done
    assert planned[0].dirs.partial.joinpath("data.bin").stat().st_size < len(PAYLOAD)

    subprocess.run(argv, cwd=REPO_ROOT, check=True, capture_output=True)
    done = runner.plan(validate.load([f"workdir={tmp_path}"]), STAGES)
    assert [s.fingerprint for s in done] == [s.fingerprint for s in planned]
    assert all(s.cached for s in done) and not done[0].dirs.partial.exists()
    assert (done[0].dirs.final / "data.bin").read_bytes() == PAYLOAD
    assert runs(tmp_path, "first") == 2 and runs(tmp_path, "second") == 1


def test_concurrent_builds_do_the_work_once(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "tests.fixtures.toy_stages", f"workdir={tmp_path}"]
    processes = [subprocess.Popen(argv, cwd=REPO_ROOT, stderr=subprocess.PIPE) for _ in range(2)]
    assert [p.wait(timeout=120) for p in processes] == [0, 0]
    assert runs(tmp_path, "first") == 1 and runs(tmp_path, "second") == 1


def test_until_stops_after_the_named_stage(tmp_path: Path) -> None:
    steps = _build(tmp_path, "until=first")
    assert [s.name for s in steps] == ["first"] and runs(tmp_path, "second") == 0


def test_a_build_with_other_settings_removes_what_killed_runs_left(tmp_path: Path) -> None:
    """Changing a setting must not strand a killed run's partial output (or a replaced result's
    trash); a folder whose lock another build holds is left alone."""
    argv = [sys.executable, "-m", "tests.fixtures.toy_stages", f"workdir={tmp_path}"]
    killed = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, env={**os.environ, "TOY_KILL_AFTER_BYTES": "1"})
    assert killed.returncode == -9
    (stale,) = (tmp_path / "first").glob(".*.partial")
    trash = tmp_path / "first" / ".0123abcd.old-4242"
    busy = tmp_path / "first" / ".feedbeef.partial"
    trash.mkdir()
    busy.mkdir()
    with locked(tmp_path / "first" / ".feedbeef.lock"):
        _build(tmp_path, "model.name=other")
    assert not stale.exists() and not trash.exists()
    assert busy.exists()


def test_a_full_disk_is_one_line_naming_the_folder(tmp_path: Path) -> None:
    """A real ENOSPC (/dev/full refuses every write) anywhere in an error's chain."""
    try:
        with open("/dev/full", "w") as full:
            full.write("x" * 10)
    except OSError as error:
        error.filename = str(tmp_path / "quantize" / ".abc.partial" / "rank0.safetensors")
        try:
            raise RuntimeError("export failed") from error
        except RuntimeError as wrapped:
            found = no_space(wrapped)
    assert found is not None and str(found).startswith(f"no space left on {tmp_path / 'quantize' / '.abc.partial'}")
    with pytest.raises(StageError, match=r"no space left on .*: about 1000000\.0 GB are needed for the engines"):
        require_space(tmp_path, 1e15, "the engines")
    require_space(tmp_path, 1e3, "a small file")
