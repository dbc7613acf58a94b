"""The memory planner against hand calculations for Llama 3.1 8B and 70B."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline import validate
from pipeline.config.schema import KVCacheDType, QuantFormat
from pipeline.errors import ConfigError
from pipeline.sizing import memory
from tests.conftest import cli

KIB, GIB = 1024, 2**30


@pytest.mark.parametrize(
    ("model", "kv", "per_token"),
    [
        ("llama8b", None, 128),
        ("llama8b", KVCacheDType.fp8, 64),
        ("llama70b", None, 320),
        ("llama70b", KVCacheDType.fp8, 160),
    ],
)
def test_kv_cache_bytes_per_token_match_upstreams_rule(model: str, kv: KVCacheDType | None, per_token: int) -> None:
    arch = validate.load([f"model={model}"]).model.arch
    total, per_rank = memory.kv_bytes_per_token(arch, tp=1, pp=1, kv=kv)
    assert total == per_rank == per_token * KIB
    # tp=2: 8 KV heads split 4 + 4; all ranks together hold the same total
    total2, rank2 = memory.kv_bytes_per_token(arch, tp=2, pp=1, kv=kv)
    assert (total2, rank2) == (per_token * KIB, per_token * KIB // 2)
    # tp=16 > 8 KV heads: heads are replicated, the total grows
    total16, rank16 = memory.kv_bytes_per_token(arch, tp=16, pp=1, kv=kv)
    assert total16 == 2 * per_token * KIB and rank16 == per_token * KIB // 8


def test_llama8b_bf16_weights_by_hand() -> None:
    arch = validate.load(["model=llama8b"]).model.arch
    # per layer: q 4096x4096, k and v 4096x1024, o 4096x4096, gate/up/down 3 x 4096x14336, 2 norms
    layer = (4096 * 4096 * 2 + 4096 * 1024 * 2 + 3 * 4096 * 14336) * 2 + 2 * 4096 * 2
    edges = 2 * 128256 * 4096 * 2  # embedding and lm_head, bf16
    assert memory.weight_bytes_per_gpu(arch, QuantFormat.none, 1, 1) == 32 * layer + edges
    assert (32 * layer + edges) / GIB == pytest.approx(14.96, abs=0.01)


def test_llama70b_fp8_weights_by_hand_and_split() -> None:
    arch = validate.load(["model=llama70b"]).model.arch
    linear = 8192 * 8192 * 2 + 8192 * 1024 * 2 + 3 * 8192 * 28672  # 855.6M per layer, 1 byte each in FP8
    layer_tp1 = linear * 1.0 + 2 * 8192 * 2
    edges = 2 * 128256 * 8192 * 2
    assert memory.weight_bytes_per_gpu(arch, QuantFormat.fp8, 1, 1) == 80 * layer_tp1 + edges
    layer_tp2 = linear / 2 + 2 * 8192 * 2
    assert memory.weight_bytes_per_gpu(arch, QuantFormat.fp8, 2, 1) == 80 * layer_tp2 + edges / 2


def test_llama70b_fp8_fits_one_h100_and_tp2_gives_more_kv_room() -> None:
    cfg = validate.load(["model=llama70b", "quant=fp8", "target=h100"])
    one, two = memory.plan_for(cfg, 1, 1), memory.plan_for(cfg, 2, 1)
    assert one.fits and one.kv_bytes_per_token_per_gpu == 160 * KIB
    assert 60 < one.weights_gib_per_gpu < 70 and one.kv_cache_gib_per_gpu > 5
    # what the KV cache gets: 95 % of what weights and activations leave (NVIDIA's benchmark setting)
    left = (79.6 - one.weights_gib_per_gpu - one.activations_gib_per_gpu) * 0.95
    assert one.kv_cache_gib_per_gpu == pytest.approx(left)
    assert one.kv_tokens == int(left * GIB // (160 * KIB))
    assert two.kv_tokens > 5 * one.kv_tokens


def test_unquantized_llama70b_on_one_h100_is_refused_with_the_smallest_tp() -> None:
    with pytest.raises(ConfigError, match=r"does not fit h100 \(weights \(131\.4 GiB\).*use parallel\.tp=2"):
        validate.load(["model=llama70b", "quant=none", "target=h100"])


def test_plan_prints_the_table_and_writes_plan_json(tmp_path: Path) -> None:
    result = cli("plan", f"workdir={tmp_path}", "model=llama70b", "quant=fp8", "target=h100")
    assert result.returncode == 0, result.stderr
    assert "fits at tp=1 pp=1: KV cache room for" in result.stdout
    table = result.stdout.split("# memory plan")[1].split("# stages")[0]
    assert any(line.split()[:2] == ["2", "1"] for line in table.splitlines() if line.strip())
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["requested"]["fits"] and [o["tp"] for o in plan["options"]] == [1, 2, 4, 8]
    refused = cli("plan", f"workdir={tmp_path}", "model=llama70b", "quant=none", "target=h100")
    assert refused.returncode == 1 and "use parallel.tp=2" in refused.stderr


def test_quantizing_70b_needs_the_memory_to_hold_it() -> None:
    cfg = validate.load(["model=llama70b", "quant=int4_awq", "target=a100", "target.count=1"])
    problem = memory.quantize_memory_problem(cfg)
    assert problem and "quantizing llama70b needs about 131 GiB" in problem


def test_plan_shows_the_gpu_path_a_user_will_get(tmp_path: Path) -> None:
    """The issue's acceptance command: build flags with NVIDIA's defaults, a quantize step spread over
    the host's GPUs, and engine-model parameters the backend needs to load."""
    result = cli("plan", f"workdir={tmp_path}", "model=llama70b", "quant=fp8", "parallel.tp=2", "target=h100")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for flag in ("--multiple_profiles enable", "--reduce_fusion enable", "--user_buffer enable", "--workers 2"):
        assert flag in out
    assert "# quantize loads the model in bfloat16 spread over the host's 8 GPUs" in out
    for key in ("gpt_model_type", "tokenizer_dir", "guided_decoding_backend", "xgrammar_tokenizer_info_path"):
        assert f"\n{key}: " in out
    refused = cli("plan", f"workdir={tmp_path}", "model=llama70b", "quant=int8_sq", "target=b200")
    assert refused.returncode == 1 and len(refused.stderr.strip().splitlines()) == 1
    assert "not supported on Blackwell" in refused.stderr
