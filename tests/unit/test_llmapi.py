"""backend=pytorch without a GPU: validation per backend, the LLM API's arguments against the pinned
version's names, upstream's LLM-API layout against the contract, and the commands that serve it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline import artifacts, runner, validate
from pipeline.deploy import llmapi, server
from pipeline.errors import ConfigError
from pipeline.stages import STAGES
from pipeline.stages.triton_repo import render
from pipeline.stages.triton_repo import stage as triton_repo
from tests.conftest import cli

CONTRACT = json.loads((Path(__file__).parents[2].parent / "shared/reference/trtllm_backend_contract.json").read_text())
PYTORCH_GPU = ["model=llama70b", "quant=fp8", "parallel.tp=2", "target=h100", "backend=pytorch"]


def _type_name(value: int) -> str:
    from tritonclient.grpc import model_config_pb2

    return model_config_pb2.DataType.Name(value)


def _refusal(overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as error:
        validate.load(overrides)
    return str(error.value)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["backend=pytorch", "quant=int8_sq"], "serves no W8A8 SmoothQuant checkpoint"),
        (["backend=pytorch", "quant=fp8", "quant.kv_cache_dtype=int8"], "has FP8 KV caches only"),
        (["backend=pytorch", "target=h100", "target.sm=75"], "needs Ampere or newer (SM >= 80)"),
        (["backend=pytorch", "build.extra_args=[--strip_plan]"], "backend=pytorch builds no engine"),
        (["serve.frontend=trtllm-serve"], "add backend=pytorch"),
        (["backend=pytorch", "serve.frontend=trtllm-serve", "target=cpu"], "needs TensorRT-LLM on a GPU target"),
        (["serve.frontend=vllm"], "use serve.frontend=triton or serve.frontend=trtllm-serve"),
        (["backend=onnx"], "backend"),
    ],
)
def test_each_backend_refuses_what_it_cannot_serve_in_one_line(overrides: list[str], expected: str) -> None:
    message = _refusal(["model=llama8b", *overrides])
    assert expected in message and "\n" not in message


def test_blackwell_refusals_of_the_engine_builder_do_not_apply_to_the_pytorch_backend() -> None:
    assert "not supported on Blackwell" in _refusal(["model=llama8b", "quant=int4_awq", "target=b200"])
    validate.load(["model=llama8b", "quant=int4_awq", "target=b200", "backend=pytorch"])


@pytest.mark.parametrize(
    "overrides",
    [
        PYTORCH_GPU,
        ["backend=pytorch", "target=cpu", "triton.max_tokens_in_paged_kv_cache=8192", "triton.guided_decoding=false"],
        ["backend=pytorch", "model=llama8b", "target=h100", "build.cuda_graphs=false", "triton=bls"],
    ],
)
def test_every_llm_api_argument_written_is_a_name_of_the_pinned_version(overrides: list[str]) -> None:
    cfg = validate.load(overrides)
    chosen = llmapi.options(cfg)
    assert llmapi.unknown_names(chosen) == []
    assert chosen["tensor_parallel_size"] == cfg.parallel.tp and chosen["max_batch_size"] == cfg.build.max_batch_size
    assert chosen["kv_cache_config"]["free_gpu_memory_fraction"] == cfg.triton.kv_cache_free_gpu_mem_fraction
    assert chosen["scheduler_config"] == {"capacity_scheduler_policy": "GUARANTEED_NO_EVICT"}
    assert ("cuda_graph_config" in chosen) == cfg.build.cuda_graphs
    assert yaml.safe_load(llmapi.options_yaml(chosen)) == chosen


def test_a_misspelt_or_retired_argument_is_caught() -> None:
    wrong = {"use_cuda_graph": True, "kv_cache_config": {"free_gpu_mem_fraction": 0.9, "enable_block_reuse": True}}
    assert llmapi.unknown_names(wrong) == ["use_cuda_graph", "kv_cache_config.free_gpu_mem_fraction"]


def _llmapi_config(overrides: list[str]) -> Any:
    cfg = validate.load(overrides)
    configs = render.rendered_configs(cfg)
    assert list(configs) == ["tensorrt_llm"]
    return cfg, render.parse(configs["tensorrt_llm"], "tensorrt_llm")


@pytest.mark.parametrize("streaming", ["true", "false"])
def test_the_llmapi_model_declares_the_contracts_inputs_and_outputs_exactly(streaming: str) -> None:
    """100% of upstream's names, data types and dims, nothing more on GPU targets (the CPU target's
    model adds the engine path's two guided-decoding inputs); max_batch_size and decoupled in
    config.pbtxt equal to model.yaml's triton_config (the two launch styles read different ones)."""
    contract = CONTRACT["llmapi/tensorrt_llm"]
    upstream = {e["name"]: (e["data_type"], e["dims"], e["optional"]) for e in contract["inputs"]}
    _, gpu = _llmapi_config([*PYTORCH_GPU, f"triton.streaming={streaming}"])
    assert {t.name: (_type_name(t.data_type), list(t.dims), t.optional) for t in gpu.input} == upstream
    cfg, config = _llmapi_config(["backend=pytorch", "target=cpu", f"triton.streaming={streaming}"])
    inputs = {t.name: (_type_name(t.data_type), list(t.dims), t.optional) for t in config.input}
    guides = {name: ("TYPE_STRING", [1], True) for name in ("guided_decoding_guide_type", "guided_decoding_guide")}
    assert inputs == {**upstream, **guides}
    outputs = {t.name: (_type_name(t.data_type), list(t.dims)) for t in config.output}
    assert outputs == {e["name"]: (e["data_type"], e["dims"]) for e in contract["outputs"]}
    assert config.backend == "python" and not config.HasField("dynamic_batching")
    assert [(g.count, g.kind) for g in config.instance_group] == [(1, 2)]  # KIND_CPU
    settings = render.model_yaml(cfg)
    assert config.max_batch_size == settings["triton_config"]["max_batch_size"] == 0
    assert config.model_transaction_policy.decoupled == settings["triton_config"]["decoupled"] == (streaming == "true")
    assert settings["model"] == artifacts.REPO_CHECKPOINT_DIR  # relative to the repository root


def test_gpu_llmapi_repository_copies_upstreams_model_and_reads_only_model_yaml(tmp_path: Path) -> None:
    upstream = tmp_path / "llmapi" / "tensorrt_llm" / "1"
    overrides = [*PYTORCH_GPU, f"triton.llmapi_model_dir={upstream}"]
    cfg = validate.load(overrides)
    assert "not found in" in triton_repo.preflight(cfg)[0]
    upstream.mkdir(parents=True)
    for name in ("model.py", "helpers.py"):
        (upstream / name).write_text(f"# upstream's {name}\n")
    assert triton_repo.preflight(cfg) == []
    assert render.code_files(cfg) == {f"tensorrt_llm/1/{n}": upstream / n for n in ("model.py", "helpers.py")}
    _, config = _llmapi_config(overrides)
    assert not config.parameters  # upstream's model takes every setting from model.yaml
    settings = render.model_yaml(cfg)
    assert settings["tensor_parallel_size"] == 2 and settings["backend"] == "pytorch"
    # trtllm-serve's options file, written from a repository's model.yaml, says the same
    assert {k: v for k, v in settings.items() if k not in ("model", "triton_config")} == llmapi.options(cfg)
    assert "threads" not in json.dumps(settings)  # nothing of the CPU stand-in reaches the LLM API


def test_the_quantize_fingerprint_of_the_pytorch_backend_ignores_parallelism(tmp_path: Path) -> None:
    """A unified checkpoint is split when it is served: tp and pp are the engine stage's."""

    def fingerprints(*overrides: str) -> dict[str, str]:
        cfg = validate.load([f"workdir={tmp_path}", "model=llama8b", "target=h100", *overrides])
        return {step.name: step.fingerprint for step in runner.plan(cfg, STAGES)}

    one, two = fingerprints("backend=pytorch"), fingerprints("backend=pytorch", "parallel.tp=2")
    assert one["quantize"] == two["quantize"] and one["engine"] != two["engine"]
    engines = fingerprints(), fingerprints("parallel.tp=2")
    assert engines[0]["quantize"] != engines[1]["quantize"]  # a TensorRT-LLM checkpoint is sharded per rank
    assert fingerprints()["quantize"] != one["quantize"]


@pytest.mark.parametrize(
    ("version", "refused"),
    [(None, "needs the tensorrt_llm package"), ("0.21.0", "predates"), ("1.2.1", "predates"), ("1.3.0", None)],
)
def test_the_pytorch_backend_needs_tensorrt_llm_1_3_as_the_dockerfile_does(
    version: str | None, refused: str | None
) -> None:
    problem = llmapi.version_problem(version)
    assert (problem is None) if refused is None else (refused in str(problem))
    assert f"v >= {llmapi.MIN_VERSION}" in (Path(__file__).parents[2] / "Dockerfile").read_text()


def test_launch_commands_of_the_llmapi_repository(tmp_path: Path) -> None:
    cfg = validate.load(PYTORCH_GPU)
    one = server.gpu_launch(cfg.triton, tmp_path, 1, llmapi=True).argv
    # under mpirun at one rank too, as upstream's launcher starts it (no MPI singleton spawn as root)
    assert one[:5] == ["mpirun", "--allow-run-as-root", "-n", "1", "tritonserver"]
    assert "--disable-auto-complete-config" in one
    two = server.gpu_launch(cfg.triton, tmp_path, 2, llmapi=True).argv
    assert two[:5] == ["mpirun", "--allow-run-as-root", "-n", "2", "trtllm-llmapi-launch"] and two[5] == "tritonserver"
    serve = llmapi.trtllm_serve_argv(cfg, tmp_path / "engine", tmp_path / llmapi.OPTIONS_FILE, "127.0.0.1", 8000)
    assert serve[:2] == ["trtllm-serve", str(tmp_path / "engine")]
    flags = dict(zip(serve[2::2], serve[3::2], strict=True))
    assert flags == {
        "--backend": "pytorch",
        "--host": "127.0.0.1",
        "--port": "8000",
        "--tp_size": "2",
        "--pp_size": "1",
        "--extra_llm_api_options": str(tmp_path / llmapi.OPTIONS_FILE),
    }


def test_plan_prints_the_llm_api_arguments_and_both_ways_to_serve(tmp_path: Path) -> None:
    result = cli("plan", f"workdir={tmp_path}", *PYTORCH_GPU)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "# LLM API arguments" in out and "tensor_parallel_size: 2" in out
    assert "tritonserver --model-repository=" in out and "trtllm-serve " in out and "--extra_llm_api_options" in out


GOLDEN = Path(__file__).parents[1] / "golden" / "llama70b_fp8_tp2_h100_pytorch"


def test_golden_gpu_llmapi_repository() -> None:
    """The rendered LLM-API repository of Llama 3.1 70B FP8 TP2 on H100 (config.pbtxt and
    model.yaml), file by file. UPDATE_GOLDEN=1 rewrites them after a deliberate change."""
    cfg = validate.load(PYTORCH_GPU)
    files = {
        "tensorrt_llm/config.pbtxt": render.rendered_configs(cfg)["tensorrt_llm"],
        artifacts.REPO_MODEL_YAML: yaml.safe_dump(render.model_yaml(cfg), sort_keys=False),
    }
    if os.environ.get("UPDATE_GOLDEN") == "1":
        for rel, text in files.items():
            (GOLDEN / rel).parent.mkdir(parents=True, exist_ok=True)
            (GOLDEN / rel).write_text(text)
    assert sorted(files) == sorted(str(p.relative_to(GOLDEN)) for p in GOLDEN.rglob("*") if p.is_file())
    for rel, text in files.items():
        assert text == (GOLDEN / rel).read_text(), rel


def test_trtllm_serve_flags_are_options_of_the_pinned_version(tmp_path: Path) -> None:
    cfg = validate.load(PYTORCH_GPU)
    argv = llmapi.trtllm_serve_argv(cfg, tmp_path, tmp_path / llmapi.OPTIONS_FILE, "0.0.0.0", 8000)
    flags = [arg for arg in argv if arg.startswith("--")]
    assert flags and set(flags) <= llmapi.TRTLLM_SERVE_FLAGS


def test_plan_of_the_pytorch_backend_shows_no_engine_build_and_one_unified_export(tmp_path: Path) -> None:
    from pipeline.sizing import memory
    from pipeline.stages.engine import stage as engine

    cfg = validate.load([*PYTORCH_GPU, "parallel.tp=2"])
    assert engine.command(cfg, {"quantize": tmp_path}, tmp_path, tmp_path) is None  # nothing for plan to print
    placement = memory.quantize_placement(cfg)
    assert "unified Hugging Face checkpoint" in placement and "shards it for tp=2 pp=1" in placement
