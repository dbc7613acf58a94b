"""Shared fixtures. Tests are hermetic: a temporary workdir, Hugging Face cache and environment
without tokens; the pipeline runs as a user runs it (``python -m pipeline``) where the environment
matters, since huggingface_hub reads HF_ENDPOINT and HF_HOME when it is imported."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

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
def smollm2_workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workdir where the embedded SmolLM2 has been fetched (GGUF converted) once per session."""
    workdir = tmp_path_factory.mktemp("smollm2")
    result = run_cli("build", f"workdir={workdir}", "target=cpu", "until=fetch", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir
