"""The one way to run external programs (trtllm-build, tritonserver, mpirun): output streamed to
a log file and to our logger, a timeout, and the whole process group stopped on timeout, error or
Ctrl-C so nothing is left running. Secrets in the output are redacted before they are written."""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import signal
import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path

from pipeline.errors import StageError
from pipeline.redact import redact

log = logging.getLogger(__name__)
TAIL_LINES = 20


def quote(argv: Sequence[str]) -> str:
    return " ".join(shlex.quote(a) for a in argv)


def stop_group(process: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    """SIGTERM the process group, then SIGKILL whatever is still alive after ``grace_s``.

    A second Ctrl-C while stopping must not leave the group running, so SIGINT is ignored until the
    group is gone; children (python backend stubs) are killed with the group even when the leader
    exits first."""
    shielded = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if shielded else None
    try:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(grace_s)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # stragglers of the group, if any
        process.wait()
    finally:
        if shielded:
            signal.signal(signal.SIGINT, previous)


class Background:
    """A long-running program (a server): output pumped into a log file, stopped with its whole
    process group by ``stop()``."""

    def __init__(self, argv: Sequence[str], log_file: Path, env: dict[str, str] | None = None, cwd: Path | None = None):
        self.argv, self.log_file = list(argv), log_file
        self.tail: list[str] = []
        self.process = _spawn(self.argv, env, cwd)
        self._reader = threading.Thread(target=_pump, args=(self.process, log_file, self.tail), daemon=True)
        self._reader.start()

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, grace_s: float = 15.0) -> int | None:
        stop_group(self.process, grace_s)
        self._reader.join(5)
        return self.process.returncode


def _spawn(argv: list[str], env: dict[str, str] | None, cwd: Path | None) -> subprocess.Popen[bytes]:
    log.info("running: %s", redact(quote(argv)))
    try:
        # a session of its own: stop_group reaches every child (mpirun ranks, python stubs)
        return subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
    except FileNotFoundError as error:
        raise StageError(f"{argv[0]} is not installed or not on PATH") from error


def _pump(process: subprocess.Popen[bytes], log_file: Path, tail: list[str]) -> None:
    assert process.stdout is not None
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("a", encoding="utf-8") as sink:
        for raw in process.stdout:
            line = redact(raw.decode(errors="replace").rstrip())
            sink.write(line + "\n")
            sink.flush()
            tail.append(line)
            del tail[:-TAIL_LINES]
            log.debug("%s", line)


def run(
    argv: Sequence[str],
    log_file: Path,
    timeout_s: float | None = None,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> None:
    """Run ``argv`` to completion; raise StageError naming the command and quoting the log's end."""
    tail: list[str] = []
    process = _spawn(list(argv), env, cwd)
    reader = threading.Thread(target=_pump, args=(process, log_file, tail), daemon=True)
    reader.start()
    try:
        code = process.wait(timeout_s)
    except subprocess.TimeoutExpired as error:
        stop_group(process)
        raise StageError(f"{argv[0]} ran past {timeout_s:.0f} s and was stopped; see {log_file}") from error
    except BaseException:
        stop_group(process)
        raise
    finally:
        reader.join(5)
    if code != 0:
        last = " | ".join(line for line in tail[-3:] if line.strip())
        raise StageError(f"{Path(argv[0]).name} failed with exit status {code}: {last[-400:]} (full log: {log_file})")
