"""Config composition, one-line errors for bad overrides, and cross-field validation."""

from __future__ import annotations

import pytest

from pipeline import validate
from pipeline.config import compose, schema
from pipeline.config.schema import Architecture, Source
from pipeline.errors import ConfigError
from pipeline.sizing import rules


def test_defaults_are_the_embedded_model_on_one_rank() -> None:
    cfg = validate.load([])
    assert cfg.model.name == "smollm2-135m" and cfg.model.source is Source.gguf
    assert (cfg.parallel.tp, cfg.parallel.pp) == (1, 1)
    assert cfg.workdir == "./artifacts" and not cfg.force and not cfg.dry_run


@pytest.mark.parametrize("name", ["llama8b", "llama70b", "smollm2-135m"])
def test_named_models_carry_their_architecture(name: str) -> None:
    arch = validate.load([f"model={name}"]).model.arch
    required = {k: v for k, v in schema.to_dict(arch).items() if k != "head_dim"}  # head_dim is derived
    assert all(required.values())


def test_llama70b_numbers() -> None:
    arch = validate.load(["model=llama70b"]).model.arch
    assert (arch.num_hidden_layers, arch.num_attention_heads, arch.num_key_value_heads) == (80, 64, 8)
    assert (arch.hidden_size, arch.intermediate_size, arch.vocab_size) == (8192, 28672, 128256)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["model=nope"], "unknown model 'nope': valid choices are model=hf|llama70b|llama8b|local|smollm2-135m"),
        (["modle=x"], "unknown config key 'modle': did you mean 'model'?"),
        (["parallel.tpp=2"], "did you mean 'parallel.tp'?"),
        (["parallel.tp=two"], "parallel.tp: Value 'two' of type 'str' could not be converted to Integer"),
        (["model.source=s3"], "model.source: Invalid value 's3', expected one of [hf, local, gguf]"),
        (["parallel.tp=1,3"], "add -m to run one job per value"),
        (["workdir"], "cannot read override 'workdir': write key=value"),
        (["+extra=1"], "adding or deleting config keys is not supported"),
    ],
)
def test_bad_overrides_give_one_line(overrides: list[str], expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        validate.load(overrides)
    message = str(caught.value)
    assert expected in message and "\n" not in message


def test_valid_tp_sizes_follow_heads_kv_heads_and_mlp_width() -> None:
    smollm = validate.load([]).model.arch
    assert rules.valid_tp_sizes(smollm) == [1, 3]  # 9 heads, 3 KV heads, 1536 = 3 x 512
    llama = validate.load(["model=llama70b"]).model.arch
    assert rules.valid_tp_sizes(llama) == [1, 2, 4, 8, 16, 32, 64]  # KV heads replicated past 8
    assert rules.valid_tp_sizes(Architecture()) == []  # unknown until fetched


def test_validate_collects_every_problem_with_its_fix() -> None:
    cfg = compose.to_typed(compose.compose(["parallel.tp=2", "parallel.pp=31", "model.arch.vocab_size=0"]))
    problems = validate.validate(cfg)
    assert len(problems) == 3
    assert any("use parallel.tp=1 or 3" in p for p in problems)
    assert any("use parallel.pp<=30" in p for p in problems)
    assert any("model.arch.vocab_size=0 must be positive" in p for p in problems)
    with pytest.raises(ConfigError, match=r"parallel\.tp=2"):
        validate.load(["parallel.tp=2"])


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["model=hf"], "model.source=hf needs model.repo_id"),
        (["model=local"], "model.source=local needs model.path"),
        (["model=local", "model.path=/no/such/dir"], "is not a folder"),
        (["model.package=null"], "model.source=gguf needs model.path"),
    ],
)
def test_source_fields_are_checked(overrides: list[str], expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        validate.load(overrides)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["quant=int8_sq"], "quant=int8_sq engines are not supported on Blackwell"),
        (["quant=fp8", "quant.kv_cache_dtype=int8"], "quant.kv_cache_dtype=int8 is not supported on Blackwell"),
        (["quant=int4_awq", "quant.awq_block_size=64"], "quant=int4_awq engines are not supported on Blackwell"),
        (["quant=w4a8_awq", "quant.awq_block_size=64"], "quant=w4a8_awq engines are not supported on Blackwell"),
    ],
)
def test_blackwell_refuses_what_its_engine_builder_rejects(overrides: list[str], expected: str) -> None:
    """TensorRT-LLM's builder raises for SmoothQuant, weight-only INT4/INT8 and an INT8 KV cache on
    SM 100-119: refused before any download or quantization, in one line."""
    with pytest.raises(ConfigError, match=expected) as error:
        validate.load(["model=llama8b", "target=b200", *overrides])
    assert "\n" not in str(error.value)
    validate.load(["model=llama8b", "target=h100", *overrides])  # fine on Hopper


def test_declared_architectures_are_checked_by_validation() -> None:
    with pytest.raises(ConfigError, match="is a GPT2LMHeadModel, which the TensorRT-LLM export does not support"):
        validate.load(["model=llama8b", "model.arch.architectures=[GPT2LMHeadModel]", "target=h100"])
    with pytest.raises(ConfigError, match="CPU target's reference runtime runs only"):
        validate.load(["model=llama8b", "model.arch.architectures=[Qwen2ForCausalLM]", "target=cpu"])
    validate.load(["model=llama8b", "model.arch.architectures=[Qwen2ForCausalLM]", "target=h100"])
