"""Child processes never outlive the pipeline: SIGTERM and SIGHUP stop them like Ctrl-C, a parent
killed with SIGKILL takes its children along (parent-death signal), and what escaped that (a
grandchild) is reaped by the next run from the record left next to the log. Real processes, real
signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from pipeline import proc

pytestmark = pytest.mark.slow  # real processes and signals, seconds of waiting

# A stand-in for `python -m pipeline`: starts a child through proc.Background (as the server does)
# and waits; the child is a shell whose own child (a grandchild) does not inherit the death signal.
PARENT = """
import sys, time
from pathlib import Path
from pipeline import proc
running = proc.Background(["bash", "-c", "sleep 300 & echo $!; wait"], Path(sys.argv[1]))
print(running.process.pid, flush=True)
time.sleep(300)
"""


def _wait_for(condition, timeout_s: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _start_parent(log: Path) -> tuple[subprocess.Popen[str], int, int]:
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(log)], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    assert _wait_for(lambda: log.is_file() and log.read_text().strip() != "")
    grandchild = int(log.read_text().split()[0])
    return parent, child, grandchild


def test_a_parent_killed_outright_takes_its_child_and_the_next_run_reaps_the_rest(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    parent, child, grandchild = _start_parent(log)
    record = json.loads((tmp_path / "server.log.pgid").read_text())
    assert record["pgid"] == child
    parent.kill()  # SIGKILL: no cleanup runs in the parent
    parent.wait()
    assert _wait_for(lambda: not _alive(child)), "the child outlived its parent (no parent-death signal)"
    assert _alive(grandchild)  # what the death signal cannot reach...
    assert proc.reap_recorded(tmp_path) == 1  # ...the next run that reuses the folder stops
    assert _wait_for(lambda: not _alive(grandchild))
    assert not (tmp_path / "server.log.pgid").exists()


def test_a_recycled_process_group_id_is_left_alone(tmp_path: Path) -> None:
    """A record whose leader started at another time names a group that is gone: nothing is killed."""
    (tmp_path / "old.log.pgid").write_text(json.dumps({"pgid": os.getpgid(0), "started": time.time() + 3600}))
    assert proc.reap_recorded(tmp_path) == 0
    assert not (tmp_path / "old.log.pgid").exists()


def test_a_server_of_a_run_still_alive_is_never_reaped(tmp_path: Path) -> None:
    """Two serves share a log folder: the second must not stop the first's live server."""
    running = proc.Background(["sleep", "60"], tmp_path / "first.log")  # recorded by this (live) process
    try:
        assert proc.reap_recorded(tmp_path) == 0 and running.alive()
        assert (tmp_path / "first.log.pgid").is_file()
    finally:
        running.stop(grace_s=2)


def test_a_stopped_child_leaves_no_record_and_no_secret_in_its_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_secret_for_the_child_0123")
    log = tmp_path / "env.log"
    proc.run(["env"], log)
    assert "HF_TOKEN" not in log.read_text() and "PATH=" in log.read_text()
    running = proc.Background(["sleep", "60"], tmp_path / "sleep.log")
    assert (tmp_path / "sleep.log.pgid").is_file()
    running.stop(grace_s=2)
    assert not (tmp_path / "sleep.log.pgid").exists()


def test_a_child_whose_log_cannot_be_written_still_runs_to_the_end(tmp_path: Path) -> None:
    """A full disk or a removed folder stops the logging, never the child: a child writing into
    a pipe nobody reads would block for ever."""
    log = tmp_path / "gone" / "child.log"
    log.parent.mkdir()
    log.mkdir()  # the log path is a folder: every open fails, as on a full or vanished disk
    started = time.monotonic()
    proc.run([sys.executable, "-c", "import sys; [sys.stdout.write('x' * 1000 + '\\n') for _ in range(2000)]"], log)
    assert time.monotonic() - started < 30


def test_sigterm_is_a_keyboard_interrupt_that_a_second_signal_cannot_cut_short(tmp_path: Path) -> None:
    """The CLI's handler: the first SIGTERM raises (so every `finally` runs), a second one while
    stopping is ignored."""
    script = """
import os, signal, sys, time
from pipeline.__main__ import stop_signals_interrupt
from pipeline.errors import Terminated
try:
    with stop_signals_interrupt():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        finally:
            os.kill(os.getpid(), signal.SIGTERM)  # during the cleanup: ignored
            time.sleep(0.2)
            print("cleaned up", flush=True)
except Terminated as stop:
    os.kill(os.getpid(), signal.SIGTERM)  # on the way out: still ignored
    print("stopped by", signal.Signals(stop.signum).name)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["cleaned", "up", "stopped", "by", "SIGTERM"]


def test_stopping_a_group_survives_a_second_signal(tmp_path: Path) -> None:
    """stop_group ignores SIGTERM and SIGINT until the group is gone."""
    script = """
import os, signal, sys, threading, time
from pathlib import Path
from pipeline import proc

signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
running = proc.Background(["bash", "-c", "trap '' TERM; sleep 300"], Path(sys.argv[1]))
time.sleep(0.5)
threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGTERM)).start()
running.stop(grace_s=1.0)  # the child ignores TERM: only the final SIGKILL ends it
print(running.process.returncode)
"""
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "x.log")], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(-signal.SIGKILL)
