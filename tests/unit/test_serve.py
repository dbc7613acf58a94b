"""The commands that start Triton: one server, one server per rank under mpirun (upstream's
launcher), and the CPU target's bundled server; ports checked before starting."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from pipeline import validate
from pipeline.deploy import server, serving
from pipeline.errors import StageError
from tests.conftest import cli

REPO = Path("/models/repo")


def test_single_server_binds_localhost_and_uses_configured_ports() -> None:
    triton = validate.load(["triton.http_port=9000", "triton.grpc_port=9001", "triton.metrics_port=9002"]).triton
    argv = server.tritonserver_argv(triton, REPO)
    assert argv[0] == "tritonserver" and "--model-repository=/models/repo" in argv
    assert {"--http-port=9000", "--grpc-port=9001", "--metrics-port=9002"} <= set(argv)
    assert {"--http-address=127.0.0.1", "--grpc-address=127.0.0.1"} <= set(argv)


def test_mpirun_runs_one_server_per_rank_like_upstream() -> None:
    triton = validate.load([]).triton
    argv = server.mpirun_argv(triton, REPO, world_size=2)
    assert argv[:2] == ["mpirun", "--allow-run-as-root"]
    ranks = " ".join(argv[2:]).split(" : ")
    assert len(ranks) == 2
    assert all(r.startswith("-n 1 tritonserver --model-repository=/models/repo") for r in ranks)
    assert "--model-control-mode=explicit" not in ranks[0]
    assert "--model-control-mode=explicit --load-model=tensorrt_llm" in ranks[1]
    for rank, text in enumerate(ranks):
        assert f"--backend-config=python,shm-region-prefix-name=prefix{rank}_" in text
        assert "--disable-auto-complete-config" in text


def test_gpu_launch_runs_in_the_repository_root() -> None:
    launch = server.gpu_launch(validate.load([]).triton, REPO, world_size=1)
    assert launch.cwd == REPO and launch.argv[0] == "tritonserver"


def test_busy_port_is_refused_with_the_override_to_change(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        triton = validate.load([f"triton.http_port={port}"]).triton
        assert server.busy_ports(triton) == [port]
        refused = server.Server(server.Launch(["true"]), triton, tmp_path / "log")
        with pytest.raises(StageError, match=rf"port {port} .* in use.*triton.http_port"):
            refused.start()


def test_plan_shows_the_mpirun_command_for_a_tp2_engine() -> None:
    result = cli("plan", "model=llama70b", "quant=fp8", "parallel.tp=2", "target=h100")
    assert result.returncode == 0, result.stderr
    serve_line = result.stdout.split("# serve (python -m pipeline serve)")[1]
    assert "mpirun --allow-run-as-root -n 1 tritonserver" in serve_line
    assert "--load-model=tensorrt_llm" in serve_line


def test_serve_without_a_build_says_what_to_run(tmp_path: Path) -> None:
    result = cli("serve", f"workdir={tmp_path}", "target=cpu")
    assert result.returncode == 1
    assert "run `python -m pipeline build` with the same overrides first" in result.stderr
    missing = cli("serve", f"repo={tmp_path}", "target=cpu")
    assert missing.returncode == 1 and "is not a model repository" in missing.stderr


def test_one_serving_context_picks_the_frontend_the_target_can_take(tmp_path: Path) -> None:
    """serving() serves trtllm-serve only for the LLM-API layout on a GPU target; a copied engine
    repository served with serve.frontend=trtllm-serve is refused before anything starts."""
    cfg = validate.load(["model=llama8b", "target=h100", "backend=pytorch", "serve.frontend=trtllm-serve"])
    llmapi = server.Target(REPO, True, 1, "tensorrt_llm", tmp_path, backend="pytorch")
    engine = server.Target(REPO, True, 1, "ensemble", tmp_path)
    assert serving.frontend_of(cfg, llmapi) == "trtllm-serve"
    with pytest.raises(StageError, match="serves backend=pytorch builds of GPU targets"):
        serving.frontend_of(cfg, engine)
    assert serving.frontend_of(validate.load(["model=llama8b", "target=h100"]), engine) == "triton"
    lines = serving.banner(llmapi, serving.Endpoints("trtllm-serve", "tensorrt_llm", tmp_path / "log", lambda: True,
                                                     openai_url="http://127.0.0.1:8000/v1"))  # fmt: skip
    assert "trtllm-serve" in lines[0] and "http://127.0.0.1:8000/v1" in lines[1]
