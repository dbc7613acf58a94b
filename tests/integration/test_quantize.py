"""quantize: real ModelOpt on a tiny Llama for every format x tp x pp (SmolLM2's quality is in
test_reference_runtime.py, beside the builds it shares)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from safetensors import safe_open

from pipeline import runner, validate
from pipeline.stages import STAGES
from tests.conftest import cli

FORMATS = {  # format -> (quant_algo, kv cache choice, group size)
    "none": (None, None, None),
    "fp8": ("FP8", "fp8", None),
    "int4_awq": ("W4A16_AWQ", None, 128),
    "w4a8_awq": ("W4A8_AWQ", "fp8", 128),
    "int8_sq": ("W8A8_SQ_PER_CHANNEL", "int8", None),
    "nvfp4": ("NVFP4", None, None),
}
MAPPINGS = [(1, 1), (3, 1), (1, 2), (3, 2)]
# The fast tier keeps a diagonal that has each format once and each mapping at least once; the full
# suite adds every format at 3x2, which shards tensors and splits stages at once. (Every format at
# every mapping, 24 builds, cost half a minute for what 3x2 and the diagonal already show.)
DIAGONAL = [(fmt, *MAPPINGS[i % len(MAPPINGS)]) for i, fmt in enumerate(FORMATS)]
MATRIX = [pytest.param(*case, id="-".join(map(str, case))) for case in DIAGONAL] + [
    pytest.param(fmt, 3, 2, id=f"{fmt}-3-2", marks=pytest.mark.slow) for fmt in FORMATS if (fmt, 3, 2) not in DIAGONAL
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("quant_work")


def _build(workdir: Path, model: Path, *overrides: str) -> list[runner.Step]:
    cfg = validate.load(
        [
            f"workdir={workdir}",
            "model=local",
            f"model.path={model}",
            "target=cpu",
            "quant.calib.dataset=builtin",
            "quant.calib.num_samples=4",
            "quant.calib.max_length=64",
            "quant.eval_tokens=256",
            *overrides,
        ]
    )
    return runner.build(cfg, STAGES[:2])  # fetch, quantize


def _shapes(path: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(path), "pt") as handle:
        return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118


@pytest.mark.parametrize(("fmt", "tp", "pp"), MATRIX)
def test_every_format_and_mapping_exports_a_consistent_checkpoint(
    workdir: Path, tiny_checkpoint: Path, fmt: str, tp: int, pp: int
) -> None:
    algo, kv, group = FORMATS[fmt]
    overrides = [f"quant={fmt}", f"parallel.tp={tp}", f"parallel.pp={pp}", f"quant.kv_cache_dtype={kv or 'null'}"]
    step = _build(workdir, tiny_checkpoint, *overrides)[1]
    folder = step.dirs.final / "checkpoint"
    cfg = json.loads((folder / "config.json").read_text())
    assert {k: cfg["mapping"][k] for k in ("world_size", "tp_size", "pp_size")} == {
        "world_size": tp * pp,
        "tp_size": tp,
        "pp_size": pp,
    }
    assert cfg["quantization"]["quant_algo"] == algo
    assert cfg["quantization"]["kv_cache_quant_algo"] == (kv.upper() if kv else None)
    if group:
        assert cfg["quantization"]["group_size"] == group
    ranks = sorted(folder.glob("rank*.safetensors"))
    assert [r.name for r in ranks] == [f"rank{n}.safetensors" for n in range(tp * pp)]

    shapes = [_shapes(r) for r in ranks]
    layers_by_stage = []
    for stage in range(pp):  # rank = pp_rank * tp + tp_rank
        group_shapes = shapes[stage * tp : (stage + 1) * tp]
        assert all(s == group_shapes[0] for s in group_shapes), "tp shards of one stage differ in shape"
        layers_by_stage.append({int(k.split(".")[2]) for k in group_shapes[0] if k.startswith("transformer.layers.")})
    # each pipeline stage holds its share of the layers (numbered locally), the embedding sits in the
    # first stage and the final norm in the last
    assert [len(layers) for layers in layers_by_stage] == [2 // pp] * pp
    assert "transformer.vocab_embedding.weight" in shapes[0]
    assert "transformer.ln_f.weight" in shapes[-1] and ("transformer.ln_f.weight" in shapes[0]) == (pp == 1)
    qkv = next(v for k, v in shapes[0].items() if k.endswith("attention.qkv.weight"))
    full_qkv_rows = (6 + 2 * 3) * 64
    packed_rows = 2 if fmt in ("int4_awq", "w4a8_awq") else 1  # INT4 packs two values per int8 along rows
    assert qkv[0] == full_qkv_rows // tp // packed_rows  # fused q, k, v split by heads across tp ranks


def test_quality_of_none_is_exact_and_costs_are_recorded(workdir: Path, tiny_checkpoint: Path) -> None:
    step = _build(workdir, tiny_checkpoint, "quant=none")[1]
    report = json.loads((step.dirs.final / "quality.json").read_text())
    assert report["kl_divergence_mean"] == 0 and report["top1_agreement"] == 1.0
    assert report["perplexity_change_pct"] == 0 and report["tokens_evaluated"] > 100
    costs = json.loads((step.dirs.final / "manifest.json").read_text())["results"]["costs"]
    assert {"load", "export"} <= set(costs) and all(c["seconds"] >= 0 and c["peak_rss_mb"] > 0 for c in costs.values())


def test_changing_quant_redoes_quantize_but_not_fetch(workdir: Path, tiny_checkpoint: Path) -> None:
    first = _build(workdir, tiny_checkpoint, "quant=fp8")
    second = _build(workdir, tiny_checkpoint, "quant=int8_sq", "quant.kv_cache_dtype=null")
    assert second[0].cached and second[0].fingerprint == first[0].fingerprint
    assert second[1].fingerprint != first[1].fingerprint
    assert all(s.cached for s in _build(workdir, tiny_checkpoint, "quant=fp8"))


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["quant=int4_awq"], "use quant.awq_block_size=64"),
        (["parallel.tp=2"], "use parallel.tp=1 or 3"),
        (["parallel.pp=31"], "use parallel.pp<=30"),
        (["quant=fp8", "target=a100"], "quant=fp8 needs FP8 (SM >= 89)"),
        (["quant=nvfp4", "target=h100"], "quant=nvfp4 needs Blackwell"),
        (["quant=int8_sq", "target=b200"], "quant=int8_sq engines are not supported on Blackwell"),
    ],
)
def test_invalid_combinations_fail_in_seconds_before_loading(
    tmp_path: Path, overrides: list[str], expected: str
) -> None:
    started = time.monotonic()
    result = cli("build", f"workdir={tmp_path}", *overrides)
    assert time.monotonic() - started < 15
    assert result.returncode == 1 and expected in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())
