"""The one way to run external programs (trtllm-build, tritonserver, mpirun): output streamed to
a log file and to our logger, a timeout, and the whole process group stopped on timeout, error,
Ctrl-C, SIGTERM or SIGHUP so nothing is left running. Secrets in the output are redacted before
they are written, and the children get an environment without them.

A parent killed outright (SIGKILL, the OOM killer) runs no cleanup, so two more guards: each child
is started with a parent-death signal (it gets SIGKILL when we die), and each process group is
recorded next to its log (``<log>.pgid``) until it is stopped, so the next run that reuses that
folder reaps whatever survived (grandchildren, such as Triton's python stubs, do not inherit the
parent-death signal)."""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import shlex
import signal
import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.errors import StageError
from pipeline.redact import redact, secret_env_vars

log = logging.getLogger(__name__)
TAIL_LINES = 20


def quote(argv: Sequence[str]) -> str:
    return " ".join(shlex.quote(a) for a in argv)


def stop_group(process: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    """SIGTERM the process group, then SIGKILL whatever is still alive after ``grace_s``.

    A second Ctrl-C or SIGTERM while stopping must not leave the group running, so the stopping
    signals are ignored until the group is gone; children (python backend stubs) are killed with
    the group even when the leader exits first."""
    shielded = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in STOP_SIGNALS} if shielded else {}
    try:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(grace_s)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # stragglers of the group, if any
        process.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
STOP_GRACE_S = 15.0  # the most a stop waits before SIGKILL: SIGTERM and Ctrl-C end within it
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _libc_prctl() -> Any:
    with contextlib.suppress(OSError, AttributeError):
        return ctypes.CDLL(None, use_errno=True).prctl
    return None


# resolved here, in the parent: between fork and exec the child only calls it (loading a library
# there, in a process with threads, can deadlock on a lock another thread held at the fork)
_PRCTL = _libc_prctl()


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL when the parent dies (Linux; elsewhere a no-op)."""
    if _PRCTL is not None:
        _PRCTL(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def child_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Our environment without the credentials (a server or a builder needs none), plus ``extra``."""
    secret = secret_env_vars()
    clean = {k: v for k, v in os.environ.items() if k not in secret}
    return {**clean, **(extra or {})}


def _record_file(log_file: Path) -> Path:
    return log_file.with_name(log_file.name + ".pgid")


def _record(process: subprocess.Popen[bytes], log_file: Path) -> None:
    import psutil

    with contextlib.suppress(OSError, psutil.Error):
        started = psutil.Process(process.pid).create_time()
        owner = {"owner": os.getpid(), "owner_started": psutil.Process().create_time()}
        _record_file(log_file).write_text(json.dumps({"pgid": process.pid, "started": started, **owner}))


def _forget(log_file: Path) -> None:
    with contextlib.suppress(OSError):
        _record_file(log_file).unlink()


def _owner_alive(data: dict[str, Any]) -> bool:
    """Whether the run that recorded a group still runs (its pid, started when it was): a live
    server of another run in the same folder is never reaped."""
    import psutil

    try:
        owner = psutil.Process(int(data["owner"]))
        return abs(owner.create_time() - float(data["owner_started"])) <= 1 and owner.status() != psutil.STATUS_ZOMBIE
    except (KeyError, ValueError, TypeError, psutil.Error):
        return False


def reap_recorded(folder: Path) -> int:
    """Kill the survivors of process groups recorded under ``folder`` by a run that died without
    stopping them (never those of a run still alive); returns how many processes were killed."""
    import psutil

    killed = 0
    for record in folder.rglob("*.pgid") if folder.is_dir() else []:
        try:
            data = json.loads(record.read_text())
            pgid, started = int(data["pgid"]), float(data["started"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if _owner_alive(data):
            continue
        for candidate in psutil.process_iter(["pid", "create_time"]):
            with contextlib.suppress(psutil.Error, OSError):
                # a recycled pid is told apart by its start time: members of our group started
                # after its leader, and the leader at exactly the recorded time
                if os.getpgid(candidate.pid) != pgid or candidate.info["create_time"] < started - 1:
                    continue
                if candidate.pid == pgid and abs(candidate.info["create_time"] - started) > 1:
                    continue
                if candidate.status() == psutil.STATUS_ZOMBIE:  # dead already, waiting for a reaper
                    continue
                log.warning("stopping %s (pid %d), left running by an earlier run", candidate.name(), candidate.pid)
                candidate.kill()
                killed += 1
        with contextlib.suppress(OSError):
            record.unlink()
    return killed


class Background:
    """A long-running program (a server): output pumped into a log file, stopped with its whole
    process group by ``stop()``."""

    def __init__(self, argv: Sequence[str], log_file: Path, env: dict[str, str] | None = None, cwd: Path | None = None):
        self.argv, self.log_file = list(argv), log_file
        self.tail: list[str] = []
        self.process = _spawn(self.argv, log_file, env, cwd)
        _record(self.process, log_file)
        self._reader = threading.Thread(target=_pump, args=(self.process, log_file, self.tail), daemon=True)
        self._reader.start()

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, grace_s: float = STOP_GRACE_S) -> int | None:
        stop_group(self.process, grace_s)
        _forget(self.log_file)
        self._reader.join(5)
        return self.process.returncode


def _spawn(argv: list[str], log_file: Path, env: dict[str, str] | None, cwd: Path | None) -> subprocess.Popen[bytes]:
    log.info("running: %s", redact(quote(argv)))
    log_file.parent.mkdir(parents=True, exist_ok=True)
    try:
        # a session of its own: stop_group reaches every child (mpirun ranks, python stubs).
        # The parent-death signal fires when the thread that forks exits: every caller starts
        # children from the main thread.
        return subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=child_environment(env),
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
    except FileNotFoundError as error:
        raise StageError(f"{argv[0]} is not installed or not on PATH") from error


def _pump(process: subprocess.Popen[bytes], log_file: Path, tail: list[str]) -> None:
    """Read the child's output to the end, whatever happens to the log: a child whose pipe fills
    blocks, so a failed write (a full disk, a removed folder) stops the logging, never the reading."""
    assert process.stdout is not None
    sink = None
    with contextlib.suppress(OSError):
        sink = log_file.open("a", encoding="utf-8")
    for raw in process.stdout:
        line = redact(raw.decode(errors="replace").rstrip())
        tail.append(line)
        del tail[:-TAIL_LINES]
        log.debug("%s", line)
        if sink is None:
            continue
        try:
            sink.write(line + "\n")
            sink.flush()
        except OSError as error:
            log.warning("cannot write %s (%s): the output is still read, no longer kept", log_file, error)
            with contextlib.suppress(OSError):
                sink.close()
            sink = None
    if sink is not None:
        with contextlib.suppress(OSError):
            sink.close()


def run(
    argv: Sequence[str],
    log_file: Path,
    timeout_s: float | None = None,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> None:
    """Run ``argv`` to completion; raise StageError naming the command and quoting the log's end."""
    tail: list[str] = []
    process = _spawn(list(argv), log_file, env, cwd)
    _record(process, log_file)
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
        _forget(log_file)
    if code != 0:
        last = " | ".join(line for line in tail[-3:] if line.strip())
        raise StageError(f"{Path(argv[0]).name} failed with exit status {code}: {last[-400:]} (full log: {log_file})")
