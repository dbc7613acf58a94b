"""Start, health-check and stop Triton for a rendered repository.

GPU targets run ``tritonserver`` from the TensorRT-LLM container; for world_size > 1 one server per
rank under one ``mpirun``, as upstream's launcher does (rank 0 serves every model, the other ranks
load only the engine model). The LLM-API repository of ``backend=pytorch`` runs one
``tritonserver``, under ``mpirun ... trtllm-llmapi-launch`` for world_size > 1 (rank 0 serves,
the others are the LLM API's workers). The CPU target runs the ``tritonserver`` bundled in the
``nvidia-pytriton`` wheel with its python backend. Commands are built by pure functions.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import proc
from pipeline.artifacts import (
    ENGINE_MODEL,
    REPO_CHECKPOINT_DIR,
    REPO_TOKENIZER_DIR,
    REPOSITORY_JSON,
    serve_logs,
    triton_backends,
)
from pipeline.config.schema import TritonConfig
from pipeline.errors import StageError
from pipeline.workspace import copy_atomic

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Launch:
    """Everything needed to start the server: argv, extra environment, working directory."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None


def _ports(triton: TritonConfig) -> list[str]:
    """Where the server listens, and how long it drains on stop."""
    return [
        f"--exit-timeout-secs={triton.exit_timeout_s}",
        f"--http-port={triton.http_port}",
        f"--grpc-port={triton.grpc_port}",
        f"--metrics-port={triton.metrics_port}",
        f"--http-address={triton.host}",
        f"--grpc-address={triton.host}",
    ]


def tritonserver_argv(triton: TritonConfig, repo: Path, binary: str = "tritonserver") -> list[str]:
    """One server for the whole repository."""
    return [binary, f"--model-repository={repo}", *_ports(triton), "--disable-auto-complete-config"]


def mpirun_argv(triton: TritonConfig, repo: Path, world_size: int, binary: str = "tritonserver") -> list[str]:
    """One ``tritonserver`` per rank under one ``mpirun`` (upstream's launch_triton_server.py):
    every rank gets its own python-backend shared-memory prefix; ranks > 0 load only the engine."""
    argv = ["mpirun", "--allow-run-as-root"]
    for rank in range(world_size):
        argv += ["-n", "1", binary, f"--model-repository={repo}"]
        if rank > 0:
            argv += ["--model-control-mode=explicit", f"--load-model={ENGINE_MODEL}"]
        argv += [*_ports(triton), "--disable-auto-complete-config"]
        argv += [f"--backend-config=python,shm-region-prefix-name=prefix{rank}_", ":"]
    return argv[:-1]


def llmapi_argv(triton: TritonConfig, repo: Path, world_size: int) -> list[str]:
    """The LLM-API repository: one server under ``mpirun``, as upstream's launch_triton_server.py
    starts it (also at world_size 1: without mpirun the LLM's worker would come from an MPI
    singleton spawn, which Open MPI may refuse as root in a container). With world_size > 1 under
    ``trtllm-llmapi-launch``, which runs it on rank 0 and makes the other ranks the LLM API's MPI
    workers."""
    launcher = ["trtllm-llmapi-launch"] if world_size > 1 else []
    return ["mpirun", "--allow-run-as-root", "-n", str(world_size), *launcher, *tritonserver_argv(triton, repo)]


def gpu_launch(triton: TritonConfig, repo: Path, world_size: int, llmapi: bool = False) -> Launch:
    if llmapi:
        return Launch(llmapi_argv(triton, repo, world_size), cwd=repo)
    argv = tritonserver_argv(triton, repo) if world_size == 1 else mpirun_argv(triton, repo, world_size)
    # the engine path inside the repository is relative to its root
    return Launch(argv, cwd=repo)


def _pytriton_server() -> Path:
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise StageError("the CPU target serves with the tritonserver of nvidia-pytriton: run `make venv`")
    return Path(next(iter(spec.submodule_search_locations))) / "tritonserver"


def cpu_backend_dir(workdir: Path, create: bool = True) -> Path:
    """A backends folder whose python backend has the stub for the running Python (the wheel ships
    one stub per Python version beside the backend, not in it)."""
    if not create:
        return triton_backends(workdir)
    server = _pytriton_server()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = server / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise StageError(f"nvidia-pytriton has no python backend stub for Python {version}: use Python 3.8-3.13")
    target = triton_backends(workdir) / "python"
    target.mkdir(parents=True, exist_ok=True)
    for source in [*(server / "backends" / "python").glob("*.*"), stub]:
        dest = target / source.name
        if not dest.exists() or dest.stat().st_size != source.stat().st_size:
            copy_atomic(source, dest)  # a server of another build may be running the old stub
    return target.parent


def cpu_launch(triton: TritonConfig, repo: Path, workdir: Path, create: bool = True) -> Launch:
    server = _pytriton_server()
    backends = cpu_backend_dir(workdir, create)
    libs = server.parent.parent / "nvidia_pytriton.libs"
    argv = [*tritonserver_argv(triton, repo, str(server / "bin" / "tritonserver")), f"--backend-directory={backends}"]
    env = {
        # the python stub finds numpy, torch and transformers in this environment
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "LD_LIBRARY_PATH": f"{libs}{os.pathsep}{os.environ.get('LD_LIBRARY_PATH', '')}",
    }
    return Launch(argv, env, cwd=repo)


def launch_for(
    triton: TritonConfig,
    repo: Path,
    on_gpu: bool,
    world_size: int,
    workdir: Path,
    create: bool = True,
    llmapi: bool = False,
) -> Launch:
    if on_gpu:
        return gpu_launch(triton, repo, world_size, llmapi)
    return cpu_launch(triton, repo, workdir, create)


def port_busy(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host if host != "0.0.0.0" else "", port))
        except OSError:
            return True
    return False


def busy_ports(triton: TritonConfig) -> list[int]:
    ports = (triton.http_port, triton.grpc_port, triton.metrics_port)
    return [port for port in ports if port_busy(triton.host, port)]


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host if host != "0.0.0.0" else "", 0))
        return int(probe.getsockname()[1])


def with_free_ports(triton: TritonConfig) -> TritonConfig:
    """``triton`` with free ports in place of busy ones: a server started for a benchmark may sit
    beside another build's (``serve`` keeps its configured ports and refuses busy ones)."""
    busy = busy_ports(triton)
    if not busy:
        return triton
    http, grpc, metrics = (free_port(triton.host) for _ in range(3))
    log.warning(
        "port %s on %s is in use (another server?): this server takes HTTP %d, gRPC %d, metrics %d instead",
        ", ".join(map(str, busy)),
        triton.host,
        http,
        grpc,
        metrics,
    )
    return dataclasses.replace(triton, http_port=http, grpc_port=grpc, metrics_port=metrics)


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


class Server:
    """A running Triton. Use as a context manager: the server and every process it started are
    stopped on exit, error or Ctrl-C."""

    def __init__(self, launch: Launch, triton: TritonConfig, log_file: Path):
        self.launch, self.triton, self.log_file = launch, triton, log_file
        host = "127.0.0.1" if triton.host in ("0.0.0.0", "") else triton.host
        self.url = f"http://{host}:{triton.http_port}"
        self.grpc_url = f"{host}:{triton.grpc_port}"
        self.metrics_url = f"http://{host}:{triton.metrics_port}/metrics"
        self.process: proc.Background | None = None

    def __enter__(self) -> Server:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def start(self) -> None:
        busy = busy_ports(self.triton)
        if busy:
            raise StageError(
                f"port {', '.join(map(str, busy))} on {self.triton.host} is in use (another server?): stop it or "
                "set triton.http_port / triton.grpc_port / triton.metrics_port"
            )
        proc.reap_recorded(self.log_file.parent)  # what a killed run left serving from this folder
        log.info("starting Triton (log: %s)", self.log_file)
        self.process = proc.Background(self.launch.argv, self.log_file, self.launch.env, self.launch.cwd)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + self.triton.ready_timeout_s
        while time.monotonic() < deadline:
            if _ready(self.url):
                log.info("Triton is ready: HTTP %s, gRPC %s, metrics %s", self.url, self.grpc_url, self.metrics_url)
                return
            if not self.process.alive():
                raise StageError(f"Triton exited while loading the models: {self._log_excerpt()}")
            time.sleep(0.5)
        raise StageError(
            f"Triton was not ready after {self.triton.ready_timeout_s} s (raise triton.ready_timeout_s for large "
            f"engines): {self._log_excerpt()}"
        )

    def _log_excerpt(self) -> str:
        assert self.process is not None
        time.sleep(0.5)  # let the log pump catch up
        lines = [line for line in self.process.tail if line.strip()]
        errors = [line for line in lines if "error" in line.lower() or "failed" in line.lower()]
        return f"{' | '.join((errors or lines)[-3:])[-600:]} (full log: {self.log_file})"

    def alive(self) -> bool:
        return self.process is not None and self.process.alive()

    def stop(self) -> None:
        if self.process is not None:
            # Triton waits up to its exit timeout for in-flight requests, then says it exits at
            # once, yet a stub still answering one can hold it for good: 5 s after that, it is killed
            code = self.process.stop(grace_s=min(proc.STOP_GRACE_S, self.triton.exit_timeout_s + 5))
            log.info("Triton stopped (exit status %s)", code)
            self.process = None


def wait_until_interrupted(alive: Callable[[], bool], name: str) -> bool:
    """Block until Ctrl-C or SIGTERM (True) or until the server dies (False)."""
    print("Ctrl-C stops the server", flush=True)
    try:
        while alive():
            time.sleep(1)
    except KeyboardInterrupt:
        print(f"stopping {name}", flush=True)
        return True
    return False


class TrtllmServe:
    """trtllm-serve (backend=pytorch on GPUs) as a context manager: started from ``argv``, ready when
    its ``/health`` answers, stopped with every process it started."""

    def __init__(self, argv: list[str], host: str, port: int, log_file: Path, ready_timeout_s: float):
        self.argv, self.log_file, self.ready_timeout_s = argv, log_file, ready_timeout_s
        self.url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}"
        self.process: proc.Background | None = None

    def __enter__(self) -> TrtllmServe:
        proc.reap_recorded(self.log_file.parent)
        self.process = proc.Background(self.argv, self.log_file)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def _wait_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if not self.process.alive():
                tail = " | ".join(line for line in self.process.tail[-3:] if line.strip())
                raise StageError(f"trtllm-serve exited while loading the model: {tail} (full log: {self.log_file})")
            time.sleep(1)
        raise StageError(f"trtllm-serve was not ready after {self.ready_timeout_s:.0f} s (log: {self.log_file})")

    def alive(self) -> bool:
        return self.process is not None and self.process.alive()

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None


@dataclass(frozen=True)
class Target:
    """A repository to serve and how: its path, the engine kind, ranks, where logs go."""

    repo: Path
    on_gpu: bool
    world_size: int
    entry_model: str
    log_dir: Path
    backend: str = "tensorrt"  # pytorch: upstream's LLM-API layout (one model, text in and out)

    @property
    def llmapi(self) -> bool:
        return self.backend == "pytorch"

    @property
    def tokenizer_dir(self) -> Path:
        """The LLM-API layout keeps the tokenizer in the checkpoint, the engine path in preprocessing."""
        return self.repo / (REPO_CHECKPOINT_DIR if self.llmapi else REPO_TOKENIZER_DIR)


def target_of_folder(path: str, workdir: Path) -> Target:
    repo = Path(path).expanduser().resolve()
    if not (repo / REPOSITORY_JSON).is_file():
        raise StageError(f"{repo} is not a model repository rendered by this pipeline (no repository.json)")
    return target_of_repository(repo, serve_logs(workdir, "external"))


def target_of_repository(repo: Path, log_dir: Path) -> Target:
    path = repo / REPOSITORY_JSON  # written by the triton_repo stage
    try:
        info = json.loads(path.read_text())
        on_gpu = info["runtime"] in ("tensorrt_llm", "pytorch")
        backend = str(info.get("backend", "tensorrt"))
        return Target(repo, on_gpu, int(info["world_size"]), str(info["entry_model"]), log_dir, backend)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise StageError(
            f"{path} is missing or damaged ({type(error).__name__}: {error}): render the repository again "
            "(python -m pipeline build with the same overrides, force=true)"
        ) from error
