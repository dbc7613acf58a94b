"""The CPU reference runtime: exported TensorRT-LLM checkpoints of any tp/pp and quant format run
with transformers' Llama code and reproduce the source model (or ModelOpt's quantized model)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from pipeline import runner, validate
from pipeline.runtime.checkpoint import load_model, unpack_int4_rows
from pipeline.runtime.generate import Request, generate
from pipeline.stages import STAGES
from tests.conftest import cli

UP_TO_ENGINE = STAGES[:3]  # fetch, quantize, engine
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def source_model(smollm2_workdir: Path) -> tuple[Any, Any]:
    """The fetched SmolLM2 in float32 with its tokenizer, loaded once for the module."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    (checkpoint,) = smollm2_workdir.glob("fetch/*/checkpoint")
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(checkpoint)


def _engine(workdir: Path, *overrides: str) -> Path:
    cfg = validate.load([f"workdir={workdir}", "target=cpu", *overrides])
    steps = runner.build(cfg, UP_TO_ENGINE)
    return steps[-1].dirs.final / "engine"


def test_int4_unpacking_inverts_modelopts_packing() -> None:
    from modelopt.torch.export.quant_utils import pack_int4_in_uint8

    values = torch.randint(-8, 8, (6, 8)).float()
    packed = pack_int4_in_uint8(values, torch.ones(6, 1), 8)
    assert torch.equal(unpack_int4_rows(packed.view(torch.int8)).float(), values)


@pytest.mark.slow
@pytest.mark.parametrize(("tp", "pp"), [(1, 1), (3, 2)])  # 3x2 merges tensor shards and orders stages at once
def test_unquantized_checkpoints_reproduce_the_source_model(
    smollm2_workdir: Path, source_model: tuple[Any, Any], tp: int, pp: int
) -> None:
    source, tokenizer = source_model
    # quant.eval_tokens=0: no quality report, the test compares the logits itself
    mapping = ("quant=none", "quant.eval_tokens=0", f"parallel.tp={tp}", f"parallel.pp={pp}")
    reference = load_model(_engine(smollm2_workdir, *mapping))
    ids = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt")
    with torch.no_grad():
        expected, actual = source(ids).logits, reference(ids).logits
    assert torch.allclose(expected, actual, atol=1e-4, rtol=1e-4), (expected - actual).abs().max()
    request = Request(ids[0].tolist(), max_new_tokens=12, end_id=tokenizer.eos_token_id)
    (ours,) = generate(reference, [request])
    with torch.no_grad():
        theirs = source.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1] :].tolist()
    # transformers may stop earlier, at any of the generation config's end tokens: compare that prefix
    theirs = theirs[: next((i for i, t in enumerate(theirs) if t == tokenizer.eos_token_id), len(theirs))]
    assert ours.output_ids[: len(theirs)] == theirs and len(theirs) >= 6
    assert "Paris" in tokenizer.decode(ours.output_ids)


@pytest.mark.slow
def test_tp3_pp2_reference_engine_answers_paris(smollm2_workdir: Path, source_model: tuple[Any, Any]) -> None:
    result = cli(
        "build",
        f"workdir={smollm2_workdir}",
        "target=cpu",
        "quant=none",
        "quant.eval_tokens=0",
        "parallel.tp=3",
        "parallel.pp=2",
        "until=engine",
        "tracking=none",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    mapping = ["quant=none", "quant.eval_tokens=0", "parallel.tp=3", "parallel.pp=2"]
    cfg = validate.load([f"workdir={smollm2_workdir}", "target=cpu", *mapping])
    final = next(s for s in runner.plan(cfg, UP_TO_ENGINE) if s.name == "engine").dirs.final
    assert json.loads((final / "engine.json").read_text())["runtime"] == "reference"
    _, tokenizer = source_model
    ids = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True)
    (answer,) = generate(load_model(final / "engine"), [Request(ids, 30, end_id=tokenizer.eos_token_id)])
    assert tokenizer.decode(answer.output_ids, skip_special_tokens=True) == "The capital of France is Paris."
    assert answer.finish_reason == "end"


# One small SmolLM2 quantization per format, shared with test_quantize.py's quality check (same
# overrides, so the second test finds it built): tp=3 pp=2 exports six ranks.
SMALL_CALIBRATION = (
    "quant.kv_cache_dtype=null",
    "quant.calib.num_samples=2",
    "quant.calib.max_length=32",
    "quant.eval_tokens=256",
    "parallel.tp=3",
    "parallel.pp=2",
)


@pytest.mark.slow
# FP8 and INT4-AWQ on the real model (int8_sq's export is checked on the tiny model's matrix in
# test_quantize.py and timed by `make bench`; a third SmolLM2 quantization costs 17 s of the suite)
@pytest.mark.parametrize("fmt", ["fp8", "int4_awq"])
def test_quantized_exports_match_modelopts_model(smollm2_workdir: Path, fmt: str) -> None:
    # Faithfulness compares the export with ModelOpt's own quantized model, whatever it was
    # calibrated on: a small calibration set (2 x 32 tokens) halves AWQ's CPU search, and 256
    # held-out tokens score both models alike.
    extra = [*SMALL_CALIBRATION] + (["quant.awq_block_size=64"] if fmt == "int4_awq" else [])
    _engine(smollm2_workdir, f"quant={fmt}", *extra)
    cfg = validate.load([f"workdir={smollm2_workdir}", "target=cpu", f"quant={fmt}", *extra])
    report = json.loads((runner.plan(cfg, UP_TO_ENGINE)[1].dirs.final / "quality.json").read_text())
    faithful = report["faithfulness"]
    # the weights the reference runtime dequantizes are ModelOpt's fake-quantized weights
    assert faithful["weights_vs_modelopt"]["layers"] == 30 * 7
    assert faithful["weights_vs_modelopt"]["equal_fraction"] > 0.99, faithful
    # and the deployed model loses about what ModelOpt's model loses against the source
    assert faithful["vs_source"]["kl_divergence_mean"] < 1.5 * report["kl_divergence_mean"] + 0.01, report
    assert faithful["vs_source"]["top1_agreement"] > report["top1_agreement"] - 0.05, report


def test_batched_generation_equals_one_by_one(tiny_checkpoint: Path, tmp_path: Path) -> None:
    engine_dir = _engine(tmp_path, "model=local", f"model.path={tiny_checkpoint}", "quant=none", "parallel.tp=3")
    model = load_model(engine_dir)
    prompts = [[1, 5, 9, 3], [1, 7], [1, 4, 4, 8, 10, 12, 2, 6]]
    requests = [Request(p, max_new_tokens=6) for p in prompts]
    batched = generate(model, requests)
    alone = [generate(model, [r])[0] for r in requests]
    assert [r.output_ids for r in batched] == [r.output_ids for r in alone]
    assert all(len(r.output_ids) == 6 and r.finish_reason == "length" for r in batched)


def test_sampling_stop_and_bad_words_and_streaming(tiny_engine: Path) -> None:
    model = load_model(tiny_engine)
    prompt = [1, 5, 9, 3]
    (greedy,) = generate(model, [Request(prompt, max_new_tokens=8)])
    first = greedy.output_ids[0]
    (banned,) = generate(model, [Request(prompt, max_new_tokens=8, bad_words=[[first]])])
    assert banned.output_ids[0] != first
    (stopped,) = generate(model, [Request(prompt, max_new_tokens=8, stop_words=[greedy.output_ids[:2]])])
    assert stopped.output_ids == greedy.output_ids[:2] and stopped.finish_reason == "stop"
    (ended,) = generate(model, [Request(prompt, max_new_tokens=8, end_id=greedy.output_ids[1])])
    assert ended.output_ids == greedy.output_ids[:1] and ended.finish_reason == "end"

    sample = Request(prompt, max_new_tokens=8, temperature=1.5, top_k=10, top_p=0.9, seed=7, return_log_probs=True)
    seen: list[tuple[int, int]] = []
    (one,) = generate(model, [sample], on_token=lambda row, token, _: seen.append((row, token)))
    (two,) = generate(model, [sample])
    assert one.output_ids == two.output_ids  # same seed, same tokens
    assert seen == [(0, t) for t in one.output_ids]
    assert len(one.log_probs) == 8 and all(lp <= 0 for lp in one.log_probs)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"input_ids": []}, "input_ids is empty"),
        ({"input_ids": [1, 99]}, "outside the vocabulary"),
        ({"end_id": 64}, "end_id=64 is outside"),
        ({"pad_id": -1}, "pad_id=-1 is outside"),
        ({"temperature": float("nan")}, "must be a finite number >= 0"),
        ({"top_k": -1}, "runtime_top_k=-1"),
        ({"top_p": 1.5}, "runtime_top_p=1.5"),
        ({"max_new_tokens": 60}, "exceed the engine's max_seq_len=64"),
        ({"stop_words": [[70]]}, "stop_words_list/bad_words_list"),
        ({"repetition_penalty": 0.0}, "repetition_penalty=0.0 must lie in [0.001, 1000]"),
        ({"presence_penalty": float("inf")}, "presence_penalty=inf must lie in [-1000, 1000]"),
        ({"min_tokens": -1}, "min_tokens=-1 must be >= 0"),
        ({"input_ids": [1] * 40}, "40 input tokens exceed the engine's max_input_len=32"),
    ],
)
def test_requests_that_would_break_a_batch_are_named(change: dict[str, Any], message: str) -> None:
    request = Request(**{"input_ids": [1, 5, 9, 3, 7], "max_new_tokens": 8, "end_id": -1, **change})
    problems = request.problems(vocab_size=64, max_seq_len=64, max_input_len=32)
    assert len(problems) == 1 and message in problems[0], problems
    assert Request([1, 5, 9], max_new_tokens=8, end_id=-1, pad_id=0).problems(64, 64) == []


def test_penalties_follow_tensorrt_llms_kernel_exactly() -> None:
    """Temperature first; then, for every token seen in prompt or output, repetition (divide a
    positive logit, multiply a negative one), presence once, frequency per occurrence."""
    from pipeline.runtime.generate import _penalize

    request = Request(
        [0, 1],
        temperature=2.0,
        repetition_penalty=2.0,
        presence_penalty=0.5,
        frequency_penalty=0.25,
        min_tokens=3,
        end_id=3,
    )
    scores = _penalize(torch.tensor([2.0, -2.0, 1.0, 4.0]), request, generated=[1])
    # token 0 (seen once): 2/2=1 -> 1/2 -> -0.5 -> -0.25; token 1 (twice): -2/2=-1 -> -2 -> -2.5 -> -3.0
    # token 2 (unseen): 1/2; token 3: the end id, masked while fewer than min_tokens are out
    assert scores.tolist() == [-0.25, -3.0, 0.5, float("-inf")]
    assert _penalize(torch.tensor([2.0, -2.0, 1.0, 4.0]), request, generated=[1, 2, 2])[3] == 2.0


def test_penalties_and_min_tokens_change_generation_as_defined(tiny_engine: Path) -> None:
    model = load_model(tiny_engine)
    prompt = [1, 5, 9, 3]

    def repeats(tokens: list[int]) -> int:
        return len(tokens) - len(set(tokens))

    (plain,) = generate(model, [Request(prompt, max_new_tokens=16)])
    assert repeats(plain.output_ids) > 4  # the tiny random model loops
    for penalty in ({"repetition_penalty": 3.0}, {"presence_penalty": 5.0}, {"frequency_penalty": 5.0}):
        (penalized,) = generate(model, [Request(prompt, max_new_tokens=16, **penalty)])
        assert repeats(penalized.output_ids) < repeats(plain.output_ids), penalty
    end = plain.output_ids[0]  # greedy's first choice made the end token: it ends at once ...
    (ended,) = generate(model, [Request(prompt, max_new_tokens=16, end_id=end)])
    assert ended.output_ids == [] and ended.finish_reason == "end"
    (held,) = generate(model, [Request(prompt, max_new_tokens=16, end_id=end, min_tokens=5)])
    assert len(held.output_ids) >= 5 and end not in held.output_ids[:5]  # ... unless min_tokens holds it


def test_a_clients_pad_id_never_enters_the_batch(tiny_engine: Path) -> None:
    model = load_model(tiny_engine)
    # -1 would be an invalid embedding index if the batch were padded with it
    short, long = Request([1, 5], max_new_tokens=4, pad_id=-1), Request([1, 4, 4, 8, 10], max_new_tokens=4, pad_id=9)
    alone = [generate(model, [r])[0].output_ids for r in (short, long)]
    assert [r.output_ids for r in generate(model, [short, long])] == alone


@pytest.mark.slow
def test_smollm2_fp8_is_close_to_the_original(smollm2_workdir: Path) -> None:
    # the same build as the export test of fp8: quantized once
    overrides = ("quant=fp8", *SMALL_CALIBRATION, "target=cpu", "until=engine", "tracking=none")
    result = cli("build", f"workdir={smollm2_workdir}", *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    step = runner.plan(validate.load([f"workdir={smollm2_workdir}", *overrides]), STAGES)[1]
    quality = step.dirs.final / "quality.json"
    report = json.loads(quality.read_text())
    assert 0 < report["kl_divergence_mean"] < 0.1
    assert report["top1_agreement"] > 0.8
    assert abs(report["perplexity_change_pct"]) < 10
    assert len(list(quality.parent.glob("checkpoint/rank*.safetensors"))) == 6
    again = cli("build", f"workdir={smollm2_workdir}", *overrides)
    assert again.returncode == 0 and again.stdout.count("cached") == 3  # fetch, quantize, engine
