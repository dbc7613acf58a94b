"""Fixtures shared by the integration tests that talk to a real Triton: one server per package
run, serving the CPU repository of SmolLM2. No test stops it: its teardown stops it and checks
that nothing it started is left running, so the tests that share it may run in any order."""

from __future__ import annotations

import contextlib
import functools
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from pipeline import app, runner, validate
from pipeline.app import NO_JOB_RUNNER
from pipeline.config import schema
from pipeline.deploy import server
from pipeline.stages import STAGES
from tests.conftest import REPO_ROOT, free_ports


class Served:
    def __init__(
        self, running: server.Server, cfg: schema.PipelineConfig, final: Path, overrides: list[str], log: Path
    ):
        self.server, self.cfg, self.final, self.log = running, cfg, final, log
        self.overrides = overrides  # the served build's, for commands run against it

    @functools.cached_property
    def tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.final / "repository" / "preprocessing" / "tokenizer")

    def chat_ids(self, question: str, system: str | None = None) -> list[int]:
        tokenizer = self.tokenizer
        messages = [{"role": "system", "content": system}] if system else []
        return list(
            tokenizer.apply_chat_template(
                [*messages, {"role": "user", "content": question}], add_generation_prompt=True
            )
        )

    def post(self, path: str, body: dict[str, Any]) -> tuple[int, str]:
        request = urllib.request.Request(f"{self.server.url}{path}", data=json.dumps(body).encode())
        try:
            with urllib.request.urlopen(request) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    def generate(self, model: str = "ensemble", **body: Any) -> dict[str, Any]:
        status, text = self.post(f"/v2/models/{model}/generate", body)
        assert status == 200, text
        return json.loads(text)


def smollm2_checkpoint(workdir: Path) -> Path:
    (checkpoint,) = (workdir / "fetch").glob("*/checkpoint")
    return checkpoint


@pytest.fixture(scope="package")
def smollm2_adapters(smollm2_workdir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two LoRA adapters for SmolLM2: ``pirate``, trained by the project's own script (a few steps:
    its answers open with "Ahoy!"), and ``noisy``, PEFT's layout with random matrices (answers that
    differ from the base model's, for mixed batches)."""
    import importlib.util

    import peft
    import torch
    from transformers import AutoModelForCausalLM

    spec = importlib.util.spec_from_file_location("train_adapter", REPO_ROOT / "examples" / "train_adapter.py")
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    folder, checkpoint = tmp_path_factory.mktemp("adapters"), smollm2_checkpoint(smollm2_workdir)
    script.BATCH = 4
    script.train(checkpoint, folder / "pirate", steps=8, rank=4, seed=0, lr=6e-3)
    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    noisy = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, weight in noisy.named_parameters():
            if "lora_B" in name:
                weight.normal_(0, 0.05)
    noisy.save_pretrained(folder / "noisy")
    return {"pirate": folder / "pirate", "noisy": folder / "noisy"}


@pytest.fixture(scope="package")
def served(smollm2_workdir: Path, smollm2_adapters: dict[str, Path]) -> Iterator[Served]:
    http, grpc, metrics = free_ports(3)
    adapters = ",".join(f"{{name: {name}, path: {path}}}" for name, path in smollm2_adapters.items())
    overrides = [
        # shipped in the repository; the engine keeps one loaded, so the other is sent again on use
        f"lora.adapters=[{adapters}]",
        "lora.cache_adapters=1",
        f"workdir={smollm2_workdir}",
        "target=cpu",
        "quant=none",
        "triton=bls",
        "build.max_batch_size=8",
        "build.max_beam_width=4",
        "triton.exit_timeout_s=3",  # the last test stops the server: in-flight work need not drain
        "until=triton_repo",
        f"triton.http_port={http}",
        f"triton.grpc_port={grpc}",
        f"triton.metrics_port={metrics}",
    ]
    cfg = validate.load(overrides)
    steps = runner.build(cfg, STAGES)
    target = app.built_target(cfg)
    launch = server.launch_for(cfg.triton, target.repo, False, 1, smollm2_workdir)
    log = smollm2_workdir / "server.log"
    with server.Server(launch, cfg.triton, log) as running:
        yield Served(running, cfg, steps[-1].dirs.final, overrides, log)
        assert running.process is not None, "a test stopped the shared server"
        leader = psutil.Process(running.process.process.pid)
        family = [leader, *leader.children(recursive=True)]
        assert len(family) >= 4  # tritonserver and one python stub per python model
    alive = [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"stopping Triton left {alive} running"
    assert not server.busy_ports(cfg.triton)


@contextlib.contextmanager
def running_mlflow_server(folder: Path, port: int) -> Iterator[tuple[str, Any]]:
    """``mlflow server`` on ``port`` with its store and artifacts in ``folder`` (so a restart on the
    same folder and port is the same server), and a function that kills it outright (its whole
    process group: the server runs its workers as children)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    argv = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{folder / 'store.db'}",
        "--artifacts-destination",
        str(folder / "artifacts"),
    ]
    env = {**os.environ, **NO_JOB_RUNNER}
    with (folder / "server.log").open("ab") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    url = f"http://127.0.0.1:{port}"

    def kill(sig: int = signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        process.wait(timeout=30)

    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                assert process.poll() is None, (folder / "server.log").read_text()[-2000:]
                time.sleep(0.5)
        yield url, kill
    finally:
        kill(signal.SIGTERM)


@pytest.fixture(scope="package")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real tracking server with proxied artifact storage (what teams share), for this package."""
    (port,) = free_ports(1)
    with running_mlflow_server(tmp_path_factory.mktemp("mlflow_server"), port) as (url, _):
        yield url


# The tracking tests' builds: small loads, an SLO, no evaluation (test_eval.py evaluates) and no
# registration (test_registry.py registers; uploading SmolLM2's repository costs seconds).
SECRET = "hf_pipelinetestsecret0123456789"
SMALL_FP8 = (
    "quant.kv_cache_dtype=null",
    "quant.calib.num_samples=2",
    "quant.calib.max_length=32",
    "quant.eval_tokens=256",
)


def tracked_overrides(workdir: Path, store: Path) -> list[str]:
    http, grpc, metrics = free_ports(3)
    return [
        f"workdir={workdir}",
        "target=cpu",
        f"tracking.uri=sqlite:///{store / 'mlflow.db'}",
        "tracking.experiment=tests",
        "benchmark.concurrency=[1,2]",
        "benchmark.requests_per_point=3",
        "benchmark.warmup_requests=1",
        "workload.input_tokens=16",
        "workload.output_tokens=6",
        "slo.ttft_ms_p99=60000",
        "eval=none",
        "tracking.register=false",
        f"triton.http_port={http}",
        f"triton.grpc_port={grpc}",
        f"triton.metrics_port={metrics}",
    ]


class TrackedSweep:
    """A two-format sweep (``build -m quant=none,fp8``) of SmolLM2 recorded in a store of its own."""

    def __init__(self, store: Path, overrides: list[str]):
        self.store, self.overrides = store, overrides
        self.uri = f"sqlite:///{store / 'mlflow.db'}"

    def client(self) -> Any:
        from mlflow.tracking import MlflowClient

        return MlflowClient(self.uri)

    def runs(self) -> tuple[Any, dict[str, Any]]:
        """The sweep's parent run and its children by format."""
        client = self.client()
        found = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
        (parent,) = [r for r in found if r.data.tags.get("pipeline.sweep") == "true"]
        return parent, {r.data.params["quant"]: r for r in found if r is not parent}


@pytest.fixture(scope="package")
def tracked_sweep(smollm2_workdir: Path, tmp_path_factory: pytest.TempPathFactory) -> TrackedSweep:
    from tests.conftest import cli

    store = tmp_path_factory.mktemp("mlflow")
    overrides = [*tracked_overrides(smollm2_workdir, store), *SMALL_FP8]
    # system metrics every second: the short builds here still sample a few times
    env = {"HF_TOKEN": SECRET, "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1"}
    result = cli("build", "-m", "quant=none,fp8", *overrides, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return TrackedSweep(store, overrides)
