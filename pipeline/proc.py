"""The one way to run external programs (trtllm-build, tritonserver, mpirun): output streamed to
a log file and to our logger, a timeout, and the whole process group stopped on timeout, error or
Ctrl-C so nothing is left running. Secrets in the output are redacted before they are written."""

from __future__ import annotations

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
    """SIGTERM the process group, then SIGKILL whatever is still alive after ``grace_s``."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        pass


def run(
    argv: Sequence[str],
    log_file: Path,
    timeout_s: float | None = None,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> None:
    """Run ``argv`` to completion; raise StageError naming the command and quoting the log's end."""
    log.info("running: %s", redact(quote(argv)))
    log_file.parent.mkdir(parents=True, exist_ok=True)
    tail: list[str] = []
    try:
        process = subprocess.Popen(
            list(argv),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
    except FileNotFoundError as error:
        raise StageError(f"{argv[0]} is not installed or not on PATH") from error

    def pump() -> None:
        assert process.stdout is not None
        with log_file.open("a", encoding="utf-8") as sink:
            for raw in process.stdout:
                line = redact(raw.decode(errors="replace").rstrip())
                sink.write(line + "\n")
                sink.flush()
                tail.append(line)
                del tail[:-TAIL_LINES]
                log.debug("%s", line)

    reader = threading.Thread(target=pump, daemon=True)
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
