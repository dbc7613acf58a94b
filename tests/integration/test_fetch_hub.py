"""fetch from a Hub: a real huggingface_hub client against a local server that speaks the Hub API
(see tests/fixtures/hub_server.py), through the real command line."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, run_cli
from tests.fixtures.hub_server import HubServer
from tests.fixtures.tiny_model import adapter_files, write_tiny_adapter

pytestmark = pytest.mark.slow  # a subprocess per case (about 2 minutes in all): make test runs them

TOKEN = "hf_testsecret_4f9a1c2e7b"
SHA = "a" * 40


def _files(checkpoint: Path, extra: dict[str, bytes] | None = None) -> dict[str, bytes]:
    files = {p.name: p.read_bytes() for p in checkpoint.iterdir() if p.is_file()}
    return {**files, **(extra or {})}


@pytest.fixture
def hub() -> Iterator[HubServer]:
    with HubServer() as server:
        yield server


def _fetch(
    hub: HubServer,
    workdir: Path,
    repo: str,
    *extra: str,
    env: dict[str, str] | None = None,
    timeout: float = 120,
    tracked: bool = False,
    until: str = "fetch",
) -> subprocess.CompletedProcess[str]:
    """A fetch in a fresh process (huggingface_hub reads HF_ENDPOINT on import). Without MLflow unless
    ``tracked``: creating a sqlite store takes seconds and these tests are about the Hub."""
    return run_cli(
        "build",
        f"workdir={workdir}",
        f"until={until}",
        "model=hf",
        f"model.repo_id={repo}",
        *([] if tracked else ["tracking=none"]),
        *extra,
        env={"HF_ENDPOINT": hub.url, **(env or {})},
        timeout=timeout,
    )


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:  # renamed into place meanwhile
        return 0


def _manifest(workdir: Path) -> dict:
    (manifest,) = (workdir / "fetch").glob("*/manifest.json")
    return json.loads(manifest.read_text())


def test_downloads_allowed_files_at_resolved_sha(hub: HubServer, tiny_checkpoint: Path, tmp_path: Path) -> None:
    files = _files(
        tiny_checkpoint, {"pytorch_model.bin": b"pickle", "original/consolidated.00.pth": b"x", "README.md": b"# card"}
    )
    hub.add("org/tiny", files, sha=SHA)
    result = _fetch(hub, tmp_path, "org/tiny")
    assert result.returncode == 0, result.stderr
    manifest = _manifest(tmp_path)
    assert manifest["results"]["revision_sha"] == SHA
    assert manifest["results"]["revision"] == "main"
    checkpoint = tmp_path / "fetch" / manifest["fingerprint"] / "checkpoint"
    taken = sorted(p.name for p in checkpoint.iterdir())
    assert taken == sorted(p.name for p in tiny_checkpoint.iterdir())  # no .bin, no original/, no README
    assert (checkpoint / "model.safetensors").read_bytes() == files["model.safetensors"]
    # files were fetched at the resolved commit, never at the moving branch name
    downloads = [r.path for r in hub.requests_for("", "GET") if "/resolve/" in r.path]
    assert downloads and all(f"/resolve/{SHA}/" in path for path in downloads)
    assert not any(path.endswith((".bin", ".pth", "README.md")) for path in downloads)
    # the Hugging Face cache under HF_HOME holds the blobs (hard-linked, not copied)
    assert (checkpoint / "model.safetensors").stat().st_nlink == 2

    again = _fetch(hub, tmp_path, "org/tiny")
    assert again.returncode == 0 and "cached" in again.stdout


def test_pickle_only_weights_are_refused_unless_allowed(hub: HubServer, tiny_checkpoint: Path, tmp_path: Path) -> None:
    files = {k: v for k, v in _files(tiny_checkpoint).items() if not k.endswith(".safetensors")}
    hub.add("org/pickled", {**files, "pytorch_model.bin": b"not really a pickle"})
    refused = _fetch(hub, tmp_path, "org/pickled")
    assert refused.returncode == 1
    assert "model.allow_pickle=true" in refused.stderr
    assert not hub.requests_for("pytorch_model.bin")  # refused before any download
    allowed = _fetch(hub, tmp_path, "org/pickled", "model.allow_pickle=true")
    assert allowed.returncode == 0, allowed.stderr
    assert len(hub.requests_for("pytorch_model.bin")) == 1


@pytest.mark.parametrize(
    ("repo", "extra", "expected"),
    [
        ("org/missing", (), "org/missing not found"),
        ("org/tiny", ("model.revision=v9",), "revision 'v9' not found"),
        ("org/gated", (), "org/gated is gated"),
    ],
)
def test_hub_errors_are_one_line(
    hub: HubServer, tiny_checkpoint: Path, tmp_path: Path, repo: str, extra: tuple[str, ...], expected: str
) -> None:
    hub.add("org/tiny", _files(tiny_checkpoint))
    hub.add("org/gated", _files(tiny_checkpoint), gated=True)
    result = _fetch(hub, tmp_path, repo, *extra)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not list((tmp_path / "fetch").glob("*/manifest.json"))


def test_gated_repo_with_token_sends_it_and_never_writes_it(
    hub: HubServer, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    hub.add("org/gated", _files(tiny_checkpoint), gated=True)
    hub.state.tokens.add(TOKEN)
    wrong = _fetch(hub, tmp_path, "org/gated", env={"HF_TOKEN": "hf_wrong_token_123"})
    assert wrong.returncode == 1 and "is gated" in wrong.stderr

    # tracked: the MLflow store in the workdir is among the files the token must never reach
    result = _fetch(hub, tmp_path, "org/gated", env={"HF_TOKEN": TOKEN, "PIPELINE_DEBUG": "1"}, tracked=True)
    assert result.returncode == 0, result.stderr
    downloads = [r for r in hub.requests_for("model.safetensors")]
    assert downloads and all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in downloads)
    assert TOKEN not in result.stdout + result.stderr + wrong.stdout + wrong.stderr
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path


def test_unreachable_hub_fails_fast_with_one_line(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port with nothing listening
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    started = time.monotonic()
    result = run_cli(
        "build",
        f"workdir={tmp_path}",
        "model=llama70b",
        "tracking=none",
        "until=fetch",  # beyond fetch, a small host is refused first: it cannot hold 70B to quantize it
        env={"HF_ENDPOINT": f"http://127.0.0.1:{port}"},
        timeout=60,
    )
    assert time.monotonic() - started < 30
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: cannot reach the Hugging Face Hub")
    assert "Traceback" not in result.stderr


def test_silent_hub_times_out_within_30_seconds(tmp_path: Path) -> None:
    with socket.socket() as sock:  # accepts connections, never answers
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        started = time.monotonic()
        result = run_cli(
            "build",
            f"workdir={tmp_path}",
            "model=llama8b",
            "tracking=none",
            "until=fetch",
            # a 3 s metadata timeout (10 s by default) keeps the wait short
            env={"HF_ENDPOINT": f"http://127.0.0.1:{sock.getsockname()[1]}", "PIPELINE_HUB_TIMEOUT_S": "3"},
            timeout=60,
        )
    assert time.monotonic() - started < 30
    assert result.returncode == 1
    assert "timed out" in result.stderr.splitlines()[-1]


def test_killed_download_resumes_with_range_request(
    hub: HubServer, tiny_checkpoint: Path, tmp_path: Path, hermetic_env: Path
) -> None:
    # huggingface_hub writes in 10 MB chunks: serve 24 MiB slowly so the kill lands after the first
    weights = os.urandom(24 << 20)
    hub.add("org/big", _files(tiny_checkpoint, {"model.safetensors": weights}))
    hub.state.bytes_per_second = 8 << 20
    argv = [
        sys.executable,
        "-m",
        "pipeline",
        "build",
        f"workdir={tmp_path}",
        "until=fetch",
        "model=hf",
        "model.repo_id=org/big",
        "tracking=none",
    ]
    process = subprocess.Popen(
        argv,
        cwd=REPO_ROOT,
        env={**os.environ, "HF_ENDPOINT": hub.url},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    partial: list[Path] = []
    while time.monotonic() < deadline and not partial:
        time.sleep(0.05)
        # the weights' first chunk is on disk (small files have .incomplete names for a moment too)
        partial = [p for p in hermetic_env.rglob("*.incomplete") if _size(p) > 1 << 20]
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert partial, "the download never started"
    assert not list((tmp_path / "fetch").glob("*/manifest.json"))

    hub.state.bytes_per_second = None
    result = _fetch(hub, tmp_path, "org/big")
    assert result.returncode == 0, result.stderr
    ranges = [r.headers.get("range", "") for r in hub.requests_for("model.safetensors")]
    assert any(r.startswith("bytes=") and r != "bytes=0-" for r in ranges), ranges
    (checkpoint,) = (tmp_path / "fetch").glob("*/checkpoint")
    assert (checkpoint / "model.safetensors").read_bytes() == weights


@pytest.mark.parametrize(
    ("architecture", "extra", "expected"),
    [
        ("GPT2LMHeadModel", (), "is a GPT2LMHeadModel, which the TensorRT-LLM export does not support"),
        ("Qwen2ForCausalLM", ("target=cpu",), "the CPU target's reference runtime runs only"),
    ],
)
def test_unsupported_architecture_is_refused_before_any_weight_is_downloaded(
    hub: HubServer, tiny_checkpoint: Path, tmp_path: Path, architecture: str, extra: tuple[str, ...], expected: str
) -> None:
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    hub.add(
        "org/other",
        _files(tiny_checkpoint, {"config.json": json.dumps({**config, "architectures": [architecture]}).encode()}),
        sha=SHA,
    )
    result = _fetch(hub, tmp_path, "org/other", *extra)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 1 and len(errors) == 1 and expected in errors[0], result.stderr
    downloads = [r.path for r in hub.requests_for("", "GET") if "/resolve/" in r.path]
    assert downloads == [f"/org/other/resolve/{SHA}/config.json"]  # config.json only, at the resolved commit
    assert not (tmp_path / "fetch").exists() or not any((tmp_path / "fetch").rglob("*.safetensors"))


def test_a_download_larger_than_the_free_disk_is_refused_naming_the_folder(
    hub: HubServer, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """The Hub's file sizes are checked against the cache's free space before any weight moves."""
    hub.add("org/huge", _files(tiny_checkpoint), sha=SHA, declared_sizes={"model.safetensors": 10**18})
    result = _fetch(hub, tmp_path, "org/huge", env={"HF_HOME": str(tmp_path / "hf")})
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 1 and len(errors) == 1, result.stderr
    assert f"no space left on {tmp_path / 'hf' / 'hub'}" in errors[0] and "the download of org/huge" in errors[0]
    assert not [r for r in hub.requests_for("", "GET") if r.path.endswith(".safetensors")]


def test_a_hub_model_too_large_to_quantize_here_is_refused_before_any_weight(
    hub: HubServer, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """The sizes in the Hub's config.json give the memory the quantize stage needs: a 70B model is
    refused on this host before its weights are asked for."""
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    seventy_b = {
        "num_hidden_layers": 80,
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "head_dim": 128,
    }
    hub.add("org/big", _files(tiny_checkpoint, {"config.json": json.dumps({**config, **seventy_b}).encode()}), sha=SHA)
    result = _fetch(hub, tmp_path, "org/big", until="quantize")
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 1 and len(errors) == 1, result.stderr
    assert "needs about" in errors[0] and "GiB to hold the model" in errors[0], errors[0]
    downloads = [r.path for r in hub.requests_for("", "GET") if "/resolve/" in r.path]
    assert downloads == [f"/org/big/resolve/{SHA}/config.json"]


ADAPTER_SHA = "b" * 40


def test_a_hub_adapter_is_fetched_at_its_commit_and_shipped_in_the_repository(
    hub: HubServer, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    hub.add("org/tiny", _files(tiny_checkpoint), sha=SHA)
    files = {**adapter_files(write_tiny_adapter(tiny_checkpoint, tmp_path / "made", 4)), "README.md": b"# an adapter"}
    hub.add("org/tiny-lora", files, sha=ADAPTER_SHA)
    adapter = "lora.adapters=[{name: helper, source: org/tiny-lora, revision: main}]"
    result = _fetch(hub, tmp_path, "org/tiny", adapter, "quant=none", "quant.eval_tokens=0", until="triton_repo")
    assert result.returncode == 0, result.stderr[-3000:]
    (info_file,) = (tmp_path / "triton_repo").glob("*/repository.json")
    (shipped,) = json.loads(info_file.read_text())["adapters"]
    assert shipped["source"] == "org/tiny-lora" and shipped["revision"] == ADAPTER_SHA and shipped["task_id"] == 1
    repository = info_file.parent / "repository"
    assert (repository / shipped["tensors"] / "model.lora_weights.npy").is_file()
    assert sorted(p.name for p in (repository / shipped["path"]).iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors"]  # fmt: skip
    asked = {r.path for r in hub.requests_for("", "GET") if r.path.startswith("/org/tiny-lora/resolve/")}
    assert asked == {f"/org/tiny-lora/resolve/{ADAPTER_SHA}/{name}"
                     for name in ("adapter_config.json", "adapter_model.safetensors")}  # fmt: skip


def test_a_hub_adapter_that_cannot_work_is_refused_before_the_base_model_is_downloaded(
    hub: HubServer, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    hub.add("org/tiny", _files(tiny_checkpoint), sha=SHA)
    hub.add("org/big-lora", adapter_files(write_tiny_adapter(tiny_checkpoint, tmp_path / "made", 16)), sha=ADAPTER_SHA)
    adapter = "lora.adapters=[{name: big, source: org/big-lora}]"
    result = _fetch(hub, tmp_path, "org/tiny", adapter, "lora.max_rank=8", until="triton_repo")
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 1 and len(errors) == 1, result.stderr
    assert "lora adapter big" in errors[0] and "rank 16 is above lora.max_rank=8: raise lora.max_rank" in errors[0]
    assert not [r for r in hub.requests_for("", "GET") if r.path.startswith("/org/tiny/resolve/") and
                r.path.endswith(".safetensors")]  # fmt: skip
    missing = _fetch(hub, tmp_path, "org/tiny", "lora.adapters=[{name: x, source: org/nothing}]", until="triton_repo")
    assert missing.returncode == 1 and "org/nothing not found" in missing.stderr
    assert "check lora.adapters[0].source" in missing.stderr
