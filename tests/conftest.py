"""Shared fixtures. Tests are hermetic: a temporary workdir, Hugging Face cache and environment
without tokens. The command line runs in this process (``cli``: ``main(argv)`` with its output
captured), or as a user runs it (``run_cli``: ``python -m pipeline`` in a subprocess) where the
process matters: huggingface_hub reads HF_ENDPOINT and HF_HOME when it is imported, and a killed
run must be a separate process."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.__main__ import main

REPO_ROOT = Path(__file__).resolve().parent.parent


SECRET_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "HF_ENDPOINT", "PIPELINE_DEBUG")


@pytest.fixture(autouse=True)
def hermetic_env(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path_factory.mktemp("hf_home")
    for name in SECRET_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    return home


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 300, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m pipeline`` in a subprocess with the current (hermetic) environment."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=cwd or REPO_ROOT,
    )


@dataclass(frozen=True)
class CliResult:
    returncode: int
    stdout: str
    stderr: str


def cli(*args: str, env: dict[str, str] | None = None) -> CliResult:
    """``python -m pipeline <args>`` as ``main(argv)`` in this process, stdout and stderr captured
    (the log handler ``main`` installs writes to the captured stderr and is removed after)."""
    out, err = io.StringIO(), io.StringIO()
    saved = {name: os.environ.get(name) for name in env or {}}
    os.environ.update(env or {})
    root = logging.getLogger()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(args))
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        for handler in [h for h in root.handlers if getattr(h, "_pipeline", False)]:
            root.removeHandler(handler)
    return CliResult(code, out.getvalue(), err.getvalue())


def free_ports(count: int) -> list[int]:
    """Ports nothing listens on right now (for a server a test starts)."""
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real, tiny, randomly initialised Llama checkpoint with a working tokenizer."""
    from tests.fixtures.tiny_model import write_tiny_llama

    return write_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_engine(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama through fetch, quantize (none) and engine, once per session: the exported
    checkpoint the reference runtime runs."""
    from pipeline import runner, validate
    from pipeline.stages import STAGES

    workdir = tmp_path_factory.mktemp("tiny_engine")
    overrides = [f"workdir={workdir}", "target=cpu", "model=local", f"model.path={tiny_checkpoint}", "quant=none"]
    steps = runner.build(validate.load([*overrides, "quant.eval_tokens=0"]), STAGES[:3])
    return steps[-1].dirs.final / "engine"


@dataclass(frozen=True)
class ResumedFetch:
    """The session's fetch of the embedded SmolLM2, and what its killed first attempt left."""

    workdir: Path
    fingerprint: str
    killed_status: int  # of the first attempt, SIGKILLed during the GGUF conversion
    partial_after_kill: bool  # its unfinished folder was there ...
    final_after_kill: bool  # ... and no finished one
    resumed: CliResult  # the same command run again


@pytest.fixture(scope="session")
def smollm2_fetch(tmp_path_factory: pytest.TempPathFactory) -> ResumedFetch:
    """The embedded SmolLM2 fetched once per session, the way a crash-and-retry user gets it: the
    GGUF conversion (tens of seconds) is killed with SIGKILL midway and the build run again.
    tests/integration/test_fetch_gguf.py checks what each attempt left; the other tests use the
    checkpoint. One conversion and a fraction, instead of two."""
    from pipeline import runner, validate
    from pipeline.stages import STAGES

    workdir = tmp_path_factory.mktemp("smollm2")
    overrides = [f"workdir={workdir}", "target=cpu", "until=fetch", "tracking=none"]
    planned = runner.plan(validate.load(overrides), STAGES)[0]
    log = planned.dirs.partial / "stage.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "build", *overrides],
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and "converting" not in (log.read_text() if log.exists() else ""):
        time.sleep(0.2)
    time.sleep(2.0)  # inside the conversion (about 40 s), which writes into the partial folder
    process.send_signal(signal.SIGKILL)
    status = process.wait()
    partial, final = planned.dirs.partial.exists(), planned.dirs.final.exists()
    return ResumedFetch(workdir, planned.fingerprint, status, partial, final, cli("build", *overrides))


@pytest.fixture(scope="session")
def smollm2_workdir(smollm2_fetch: ResumedFetch) -> Path:
    """A workdir where the embedded SmolLM2 has been fetched (GGUF converted) once per session."""
    assert smollm2_fetch.resumed.returncode == 0, smollm2_fetch.resumed.stderr[-3000:]
    return smollm2_fetch.workdir


def first_answer(process: subprocess.Popen[bytes], http_port: int, body: dict, timeout_s: float = 120) -> dict | None:
    """The ensemble's answer to ``body`` from a ``serve`` process once its Triton answers on
    ``http_port`` (None: it never did, or the process ended first)."""
    import json
    import urllib.request

    data = json.dumps(body).encode()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        try:
            url = f"http://127.0.0.1:{http_port}/v2/models/ensemble/generate"
            with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=30) as response:
                return json.loads(response.read())
        except OSError:
            time.sleep(1)
    return None
