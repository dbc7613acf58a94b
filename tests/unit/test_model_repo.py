"""Rendering the Triton model repository: strict placeholders, configs that parse as Triton's
ModelConfig, the GPU engine model against the TensorRT-LLM backend's contract, and a golden
rendering of one GPU repository."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from pipeline import artifacts, validate
from pipeline.errors import ConfigError, StageError
from pipeline.stages.triton_repo import render

CONTRACT = json.loads((Path(__file__).parents[2].parent / "shared/reference/trtllm_backend_contract.json").read_text())
GOLDEN = Path(__file__).parents[1] / "golden" / "llama70b_fp8_tp2_h100"
GPU = ["model=llama70b", "quant=fp8", "parallel.tp=2", "target=h100"]
# Parameters the backend's C++ reads with no fallback (model_instance_state.cc: GetParameter without
# a try/catch), so a missing key fails the model load with "Cannot find parameter with name". The
# shared contract lists every key the template has; these must be present.
REQUIRED_PARAMETERS = ("gpt_model_type", "tokenizer_dir", "guided_decoding_backend", "xgrammar_tokenizer_info_path")


def _type_name(value: int) -> str:
    from tritonclient.grpc import model_config_pb2

    return model_config_pb2.DataType.Name(value)


def test_strict_rendering_refuses_missing_and_malformed_placeholders() -> None:
    assert render.render("a: ${x}", {"x": "1"}, "t") == "a: 1"
    with pytest.raises(StageError, match=r"uses \$\{y\} with no value"):
        render.render("a: ${x} ${y}", {"x": "1"}, "t")
    with pytest.raises(StageError, match="still holds"):
        render.render("a: ${x} ${ broken", {"x": "1"}, "t")
    with pytest.raises(StageError, match="not a valid Triton model config"):
        render.parse('name: "m" max_batch_size: $', "t")


@pytest.mark.parametrize("target", ["cpu", "h100"])
@pytest.mark.parametrize("expose", ["ensemble", "bls", "both"])
def test_every_config_renders_and_parses(target: str, expose: str) -> None:
    cfg = validate.load([f"target={target}", f"triton.expose={expose}", "triton.streaming=false"])
    configs = render.rendered_configs(cfg)
    assert "ensemble" in configs or expose == "bls"
    for name, text in configs.items():
        parsed = render.parse(text, name)
        assert "${" not in text and parsed.name == name
        if parsed.max_batch_size:
            assert parsed.max_batch_size == cfg.build.max_batch_size
    engine = render.parse(configs["tensorrt_llm"], "tensorrt_llm")
    assert engine.backend == ("tensorrtllm" if target == "h100" else "python")
    assert engine.model_transaction_policy.decoupled is False


@pytest.mark.parametrize("target", ["cpu", "h100"])
def test_postprocessing_keeps_tritons_prefetching(target: str) -> None:
    """Any queue policy (a bound or a timeout) turns off the dynamic batcher's prefetching
    (core's scheduler_utils.cc), and then a streamed token that reaches postprocessing while its
    instance runs waits for the next arrival (measured: one token in four a step late). Upstream's
    postprocessing has no policy either."""
    cfg = validate.load([f"target={target}"])
    postprocessing = render.parse(render.rendered_configs(cfg)["postprocessing"], "postprocessing")
    assert postprocessing.HasField("dynamic_batching")
    assert not postprocessing.dynamic_batching.HasField("default_queue_policy")
    assert not postprocessing.dynamic_batching.priority_queue_policy
    assert CONTRACT["postprocessing"]["dynamic_batching_settings"] == {}


def _declared(tensor: Any) -> dict[str, Any]:
    optional = getattr(tensor, "optional", False)  # outputs have no such field
    return {"data_type": _type_name(tensor.data_type), "dims": list(tensor.dims), "optional": optional}


def _expected(entry: dict[str, Any], output: bool = False) -> dict[str, Any]:
    # data types upstream leaves to its filler (logits, prompt tables, encoder features) may be any type
    data_type = entry["data_type"] if entry["data_type"].startswith("TYPE_") else "filled"
    return {"data_type": data_type, "dims": entry["dims"], "optional": False if output else entry["optional"]}


@pytest.mark.parametrize("target", ["cpu", "h100"])
@pytest.mark.parametrize("model", ["ensemble", "tensorrt_llm_bls", "preprocessing", "postprocessing", "tensorrt_llm"])
def test_every_model_declares_every_input_and_output_of_the_backend_contract(target: str, model: str) -> None:
    """100% of upstream's names, data types, dims and optional flags, so that a client written for
    NVIDIA's backend is never refused by Triton for an input it does not know. Extra tensors may
    only be optional inputs."""
    cfg = validate.load([f"target={target}", "triton.expose=both"])
    config = render.parse(render.rendered_configs(cfg)[model], model)
    contract = CONTRACT[model]
    for kind, declared in (("inputs", config.input), ("outputs", config.output)):
        output = kind == "outputs"
        mine = {t.name: _declared(t) for t in declared}
        for name, entry in ((e["name"], e) for e in contract[kind]):
            assert name in mine, f"{model} does not declare {kind[:-1]} {name}"
            expected, got = _expected(entry, output), dict(mine[name])
            if output:
                got["optional"] = False
            if expected["data_type"] == "filled":
                got["data_type"] = "filled"
            assert got == expected, (model, name)
        extra = set(mine) - {e["name"] for e in contract[kind]}
        assert not extra or (not output and all(mine[n]["optional"] for n in extra)), (model, extra)
    if model == "ensemble":  # every step maps at least what upstream's maps
        steps = {s.model_name: s for s in config.ensemble_scheduling.step}
        for step in contract["ensemble_steps"]:
            assert dict(step["input_map"]).items() <= dict(steps[step["model_name"]].input_map).items()
            assert dict(step["output_map"]).items() <= dict(steps[step["model_name"]].output_map).items()


def test_gpu_engine_model_follows_the_backend_contract() -> None:
    cfg = validate.load(GPU)
    engine = render.parse(render.rendered_configs(cfg)["tensorrt_llm"], "tensorrt_llm")
    contract = CONTRACT["tensorrt_llm"]
    inputs = {i["name"]: i for i in contract["inputs"]}
    for tensor in engine.input:
        assert tensor.HasField("reshape") == ("reshape" in inputs[tensor.name]), tensor.name
    assert set(contract["required_inputs"]) <= {t.name for t in engine.input if not t.optional}
    assert set(engine.parameters) <= set(contract["parameters"])
    required = contract.get("required_parameters", REQUIRED_PARAMETERS)
    assert set(required) <= set(engine.parameters), "the backend refuses to load without these"
    params = {k: v.string_value for k, v in engine.parameters.items()}
    # guided decoding: xgrammar with the tokenizer info the stage writes (relative to the root)
    assert params["guided_decoding_backend"] == "xgrammar"
    assert params["xgrammar_tokenizer_info_path"] == artifacts.REPO_XGRAMMAR_INFO
    off_cfg = validate.load([*GPU, "triton.guided_decoding=false"])
    off = render.parse(render.rendered_configs(off_cfg)["tensorrt_llm"], "e")
    assert off.parameters["guided_decoding_backend"].string_value == ""  # empty: no guided decoding
    assert params["gpt_model_type"] == "inflight_fused_batching"
    assert params["gpt_model_path"] == "tensorrt_llm/1/engine"
    assert engine.model_transaction_policy.decoupled  # streaming is on by default
    assert list(engine.dynamic_batching.preferred_batch_size) == [cfg.build.max_batch_size]


@pytest.mark.parametrize(
    ("overrides", "reuse"),
    [([], "true"), (["triton.chat_template=false"], "false"), (["build.use_paged_context_fmha=false"], "false")],
)
def test_kv_cache_reuse_is_on_for_chat_prompts_with_paged_context_fmha(overrides: list[str], reuse: str) -> None:
    engine = render.parse(render.rendered_configs(validate.load([*GPU, *overrides]))["tensorrt_llm"], "e")
    assert engine.parameters["enable_kv_cache_reuse"].string_value == reuse


def test_engine_path_resolves_from_the_directory_every_rank_starts_in(tmp_path: Path) -> None:
    """gpt_model_path is relative so the repository can move; the backend resolves it against the
    process's working directory, so every launch (one server or mpirun's ranks) starts in the root."""
    from pipeline.deploy import server

    cfg = validate.load(GPU)
    engine = render.parse(render.rendered_configs(cfg)["tensorrt_llm"], "e")
    path = engine.parameters["gpt_model_path"].string_value
    assert not Path(path).is_absolute() and path == artifacts.REPO_ENGINE_DIR
    for world_size in (1, 2):
        launch = server.gpu_launch(cfg.triton, tmp_path, world_size)
        assert launch.cwd == tmp_path
        assert not any(arg in ("-wdir", "--wdir", "-wd", "--wd") for arg in launch.argv)  # nothing moves a rank


def test_ensemble_wires_existing_tensors_of_each_step() -> None:
    cfg = validate.load(GPU)
    configs = {n: render.parse(t, n) for n, t in render.rendered_configs(cfg).items()}
    ensemble = configs["ensemble"]
    produced = {t.name for t in ensemble.input}
    for step in ensemble.ensemble_scheduling.step:
        model = configs[step.model_name]
        model_inputs = {t.name for t in model.input}
        model_outputs = {t.name for t in model.output}
        for key, value in step.input_map.items():
            assert key in model_inputs and value in produced, (step.model_name, key, value)
        for key, value in step.output_map.items():
            assert key in model_outputs, (step.model_name, key)
            produced.add(value)
    assert {t.name for t in ensemble.output} <= produced


def test_golden_gpu_repository() -> None:
    """The rendered GPU repository of Llama 3.1 70B FP8 TP2 on H100, file by file.
    UPDATE_GOLDEN=1 rewrites the golden files after a deliberate change."""
    configs = render.rendered_configs(validate.load(GPU))
    if os.environ.get("UPDATE_GOLDEN") == "1":
        for name, text in configs.items():
            (GOLDEN / name).mkdir(parents=True, exist_ok=True)
            (GOLDEN / name / "config.pbtxt").write_text(text)
    assert sorted(configs) == sorted(p.name for p in GOLDEN.iterdir())
    for name, text in configs.items():
        assert text == (GOLDEN / name / "config.pbtxt").read_text(), name


def test_gpu_repository_carries_no_python_engine_code() -> None:
    files = render.code_files(validate.load(GPU))
    assert "tensorrt_llm/1/model.py" not in files and not any("reference_runtime" in f for f in files)
    cpu = render.code_files(validate.load(["target=cpu"]))
    assert {"tensorrt_llm/1/model.py", "tensorrt_llm/1/reference_runtime/generate.py"} <= set(cpu)


def test_triton_batch_size_must_match_the_engine() -> None:
    with pytest.raises(ConfigError, match=r"differs from the engine's build\.max_batch_size"):
        validate.load(["triton.max_batch_size=8", "build.max_batch_size=64"])


def test_cpu_engine_model_gets_its_thread_count_and_the_engine_limit() -> None:
    cfg = validate.load(["target=cpu"])
    default = render.engine_parameters(cfg)
    assert default["threads"] == "0" and default["max_seq_len"] == str(cfg.build.max_seq_len)
    two = render.engine_parameters(validate.load(["target=cpu", "triton.cpu_threads=2"]))
    assert two["threads"] == "2"
    with pytest.raises(ConfigError, match=r"triton.cpu_threads must be at least 1"):
        validate.load(["target=cpu", "triton.cpu_threads=0"])


def test_the_cpu_scheduler_reads_the_gpu_backends_parameter_names() -> None:
    overrides = ["triton.batch_scheduler_policy=max_utilization", "triton.max_tokens_in_paged_kv_cache=8192"]
    overrides += ["triton.kv_cache_free_gpu_mem_fraction=0.8"]  # (its default differs: 0.95 GPU, 0.9 CPU)
    cpu = render.engine_parameters(validate.load(["target=cpu", "triton.cpu_max_num_tokens=16", *overrides]))
    gpu = render.engine_parameters(validate.load([*GPU, *overrides]))
    shared = ["batch_scheduler_policy", "kv_cache_free_gpu_mem_fraction", "enable_chunked_context"]
    shared += ["enable_kv_cache_reuse", "max_tokens_in_paged_kv_cache", "cancellation_check_period_ms"]
    assert all(cpu[key] == gpu[key] for key in shared)
    assert cpu["max_tokens_in_paged_kv_cache"] == "8192" and cpu["batch_scheduler_policy"] == "max_utilization"
    assert cpu["max_num_tokens"] == "16" and cpu["tokens_per_block"] == "32" and cpu["batching"] == "inflight"
    assert cpu["context_chunk_tokens"] == "32"  # the scheduler caps it at max_num_tokens
    default_cpu = render.engine_parameters(validate.load(["target=cpu"]))
    assert "max_tokens_in_paged_kv_cache" not in default_cpu and default_cpu["kv_cache_free_gpu_mem_fraction"] == "0.9"
    assert render.engine_parameters(validate.load(GPU))["kv_cache_free_gpu_mem_fraction"] == "0.95"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("triton.max_tokens_in_paged_kv_cache=1000", r"cannot hold one 4096-token sequence"),
        ("triton.cpu_max_num_tokens=0", r"triton.cpu_max_num_tokens=0 must lie in 1..8192"),
        ("build.tokens_per_block=48", r"build.tokens_per_block=48 must be a power of two"),
        ("triton.cancellation_check_period_ms=0", r"cancellation_check_period_ms must be at least 1"),
        ("triton.cpu_context_chunk_tokens=0", r"triton.cpu_context_chunk_tokens=0 must be at least 1"),
    ],
)
def test_scheduler_settings_out_of_range_are_refused(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate.load(["target=cpu", override])


def test_the_gpu_backends_xgrammar_tokenizer_info_reads_back_as_the_tokenizer(tiny_checkpoint: Path) -> None:
    """The file the C++ backend builds its xgrammar tokenizer from (vocabulary, serialized fast
    tokenizer, stop id) describes the same tokenizer xgrammar reads from Hugging Face directly."""
    import xgrammar
    from transformers import AutoTokenizer

    from pipeline.stages.triton_repo.stage import xgrammar_tokenizer_info

    info = json.loads(json.dumps(xgrammar_tokenizer_info(tiny_checkpoint)))  # as written to disk
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    direct = xgrammar.TokenizerInfo.from_huggingface(tokenizer)
    metadata = xgrammar.TokenizerInfo._detect_metadata_from_hf(info["tokenizer_str"])  # as the C++ does
    from_file = xgrammar.TokenizerInfo(
        info["encoded_vocab"], metadata["vocab_type"], add_prefix_space=metadata["add_prefix_space"]
    )
    assert from_file.vocab_type == direct.vocab_type and from_file.vocab_size == direct.vocab_size
    assert from_file.decoded_vocab == direct.decoded_vocab
    assert info["stop_token_ids"] == [tokenizer.eos_token_id]
