"""Bad input is refused before any work, in one line that names the key and the fix, and no secret
reaches the output: the reliability review's input and secret findings, each as a user meets it."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from pipeline import validate
from pipeline.config.schema import Endpoint
from pipeline.errors import ConfigError
from pipeline.redact import redact
from tests.conftest import cli


def _refusal(*overrides: str) -> str:
    with pytest.raises(ConfigError) as refused:
        validate.load(["target=cpu", "quant=none", *overrides])
    return str(refused.value)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("quant.calib.batch_size=0", "quant.calib.batch_size=0 must be at least 1"),
        ("quant.eval_tokens=-3", "quant.eval_tokens=-3 must be at least 0"),
        ("benchmark.temperature=nan", "benchmark.temperature=nan must be a finite number"),
        ("benchmark.top_p=5", "benchmark.top_p=5 must lie in 0..1"),
        ("benchmark.warmup_requests=-2", "benchmark.warmup_requests=-2 must be at least 0"),
        ("benchmark.timeout_s=0", "benchmark.timeout_s=0 must be at least 1"),
        ("triton.ready_timeout_s=-1", "triton.ready_timeout_s=-1 must be at least 1"),
        ("triton.host=foo.invalid", "triton.host=foo.invalid does not resolve"),
        ("tracking.uri=foo://bar", "tracking.uri=foo://bar: the scheme must be one of"),
    ],
)
def test_a_bad_number_host_or_store_is_refused_naming_the_key(override: str, message: str) -> None:
    problem = _refusal(override)
    assert message in problem and problem.count("\n") == 0


def test_a_key_already_checked_is_reported_once() -> None:
    problem = _refusal("build.max_batch_size=0")
    assert problem.count("build.max_batch_size") == 1


@pytest.mark.parametrize("repo_id", ["bad id!!", "../../etc", "org/a/b", "noslash"])
def test_a_repo_id_that_is_not_org_name_is_refused_before_the_hub_is_asked(repo_id: str) -> None:
    problem = _refusal("model=hf", f"model.repo_id='{repo_id}'")
    assert f"model.repo_id={repo_id} is not a Hub repository id" in problem


def test_a_local_model_folder_needs_config_json_at_its_top(tmp_path: Path) -> None:
    (tmp_path / "nested").mkdir()
    (tmp_path / "nested" / "config.json").write_text("{}")
    assert "has no config.json at its top" in _refusal("model=local", f"model.path={tmp_path}")


def test_prompts_and_calibration_files_are_checked_line_by_line(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"text": "hi"}\n{"text": "hi", "max_tokens": "many"}\n')
    assert f"workload.prompts_file={prompts}:2: max_tokens='many'" in _refusal(f"workload.prompts_file={prompts}")
    prompts.write_text('{"text": "hi", "max_tokens": 1e12}\n')
    assert f"{prompts}:1: max_tokens=1000000000000.0 must be a whole number" in _refusal(
        f"workload.prompts_file={prompts}"
    )
    calib = tmp_path / "calib.jsonl"
    calib.write_text('{"text": "fine"}\n{oops\n')
    problem = _refusal("quant=fp8", f"quant.calib.dataset={calib}")
    assert f"quant.calib.dataset={calib}:2 is not JSON" in problem
    csv = tmp_path / "calib.csv"
    csv.write_text("text\nhello\n")
    assert "is not a .txt or .jsonl file" in _refusal("quant=fp8", f"quant.calib.dataset={csv}")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("tracking.experiment=$(MLFLOW_TRACKING_PASSWORD)", "Kubernetes would expand it"),
        ("hydra.launcher.partition=gpu\n#SBATCH --wrap=evil", "cannot hold a line break"),
    ],
)
def test_overrides_that_manifests_or_batch_scripts_would_execute_are_refused(override: str, message: str) -> None:
    from pipeline.__main__ import refuse_interpolation

    with pytest.raises(ConfigError, match=message):
        refuse_interpolation([override])


@pytest.mark.slow  # the whole CLI in this process
def test_interpolation_in_an_override_is_refused(tmp_path: Path) -> None:
    result = cli("plan", f"workdir={tmp_path}", "tracking.experiment=${oc.env:HF_TOKEN}", env={"HF_TOKEN": "hf_x" * 4})
    assert result.returncode == 1 and "tracking.experiment: overrides cannot use ${...} interpolation" in result.stderr
    assert "hf_x" not in result.stdout + result.stderr


@pytest.mark.slow  # the whole CLI in this process
def test_url_credentials_never_reach_the_output(tmp_path: Path) -> None:
    result = cli("plan", f"workdir={tmp_path}", "target=cpu", "tracking.uri=https://bob:pa55word@mlflow.example")
    assert result.returncode == 0, result.stderr
    assert "pa55word" not in result.stdout + result.stderr and "https://***@mlflow.example" in result.stdout
    assert redact("see http://u:p4ss@h:5000/x and https://user@h") == "see http://***@h:5000/x and https://user@h"


def test_a_gateway_key_in_any_variable_is_a_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline import proc

    monkeypatch.setenv("TEAM_GATEWAY_KEY", "sk-team-key-0123456789")
    validate.load(["target=cpu", "openai.api_key_env=TEAM_GATEWAY_KEY"])
    assert redact("--api-key sk-team-key-0123456789") == "--api-key ***"
    assert "TEAM_GATEWAY_KEY" not in proc.child_environment()


def test_the_token_hf_auth_login_saved_is_redacted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "token").write_text("hf_savedbylogin0123456789\n")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_TOKEN_PATH", raising=False)
    assert redact("Authorization: Bearer hf_savedbylogin0123456789") == "Authorization: Bearer ***"


@pytest.mark.slow  # the whole CLI in this process
def test_a_debug_traceback_is_redacted(tmp_path: Path) -> None:
    secret = "hf_tracebacksecret0123456789"
    env = {"PIPELINE_DEBUG": "1", "HF_TOKEN": secret}
    result = cli("build", f"workdir={tmp_path}", "model=hf", f"model.repo_id={secret}x", env=env)
    assert result.returncode == 1 and "Traceback" in result.stderr and secret not in result.stderr


@pytest.mark.slow  # the whole CLI in this process
def test_a_damaged_repository_or_a_workdir_that_is_a_file_is_one_line(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "repository.json").write_text("{}")
    damaged = cli("serve", f"workdir={tmp_path}", f"repo={repo}")
    assert (
        damaged.returncode == 1
        and damaged.stderr.count("\n") == 1
        and "repository.json is missing or damaged" in damaged.stderr
    )
    afile = tmp_path / "afile"
    afile.write_text("")
    result = cli("manifests", f"workdir={afile}")
    assert result.returncode == 1 and result.stderr.startswith("error: ") and "Traceback" not in result.stderr


@pytest.mark.slow  # the whole CLI in this process
def test_plan_prints_the_memory_table_then_refuses_a_layout_that_does_not_fit(tmp_path: Path) -> None:
    result = cli("plan", f"workdir={tmp_path}", "model=llama70b", "target=h100", "quant=none", "parallel.tp=1")
    assert result.returncode == 1 and "does not fit h100" in result.stderr
    assert "# memory plan" in result.stdout and "weights/GPU" in result.stdout


@pytest.mark.slow  # the whole CLI in this process
def test_a_refused_build_opens_no_mlflow_run(tmp_path: Path) -> None:
    """The GPU target's preflight (no trtllm-build here) refuses before the run is created."""
    result = cli("build", f"workdir={tmp_path}", "model=llama8b", "target=h100", "quant=none")
    assert result.returncode == 1 and "MLflow run" not in result.stderr
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.slow  # the whole CLI in this process
def test_an_unreachable_tracking_server_is_refused_in_seconds(tmp_path: Path) -> None:
    started = time.monotonic()
    result = cli("compare", f"workdir={tmp_path}", "tracking.uri=http://127.0.0.1:9")
    assert result.returncode == 1 and "tracking.uri=http://127.0.0.1:9 does not answer" in result.stderr
    assert time.monotonic() - started < 15


def test_a_benchmark_request_that_raises_is_an_error_of_that_request() -> None:
    """A request the client cannot even build is counted as an error, never lost from the point
    (the gRPC channel connects lazily: no server is reached before the inputs are built)."""
    from pipeline.stages.benchmark import loadgen

    endpoint = loadgen.Endpoint(Endpoint.triton, "127.0.0.1:9", "ensemble")
    prompts = [loadgen.Prompt("hi", 1, "many"), loadgen.Prompt("hi", 1, None)]  # type: ignore[arg-type]
    results, _, ended = loadgen.run_point(endpoint, prompts, loadgen.Sampling(), concurrency=1, timeout_s=5)
    assert ended is None and [m.error.split(":")[0] for m in results if m.error] == ["ValueError", "TypeError"]


def test_the_headline_commands_needs_are_installed_by_the_set_up() -> None:
    """`build model=llama70b quant=fp8` calibrates on cnn_dailymail: the set-up installs `datasets`
    (pyproject, and the image), so the quantize stage's environment check passes."""
    from pipeline.sizing import calibration
    from pipeline.stages.quantize import stage as quantize

    cfg = validate.load(["model=llama70b", "quant=fp8", "target=h100", "parallel.tp=2"])
    assert calibration.calibration_sizes(cfg).dataset == "cnn_dailymail"
    assert [p for p in quantize.preflight(cfg) if "datasets" in p] == []


def test_a_local_model_too_large_to_quantize_here_is_refused_before_any_work(tmp_path: Path) -> None:
    """The memory to quantize a local checkpoint is known from its config.json: a 70B-sized one is
    refused on this host before any weight is read."""
    from pipeline.stages.quantize import stage as quantize

    config = {
        "architectures": ["LlamaForCausalLM"],
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "vocab_size": 128256,
        "max_position_embeddings": 8192,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    cfg = validate.load(["model=local", f"model.path={tmp_path}", "target=cpu", "quant=fp8"])
    assert cfg.model.arch.num_hidden_layers == 80
    (problem,) = quantize.preflight(cfg)
    assert problem.startswith("quantizing") and "GiB" in problem
