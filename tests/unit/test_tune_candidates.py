"""tune's candidates: the search space, what is dropped and why, the ranking, and the dry run."""

from __future__ import annotations

from pathlib import Path

from pipeline import validate
from pipeline.tune import candidates as cands
from pipeline.tune import search
from tests.conftest import cli

H100_ASK = [
    "model=llama70b",
    "target=h100",
    "target.count=8",
    "workload.input_tokens=2048",
    "workload.output_tokens=256",
    "slo.ttft_ms_p99=1000",
    "slo.itl_ms_p99=30",
]


def _base(overrides: list[str]) -> validate.PipelineConfig:
    return validate.load(overrides, check_memory=False)


def test_gpu_candidates_are_checked_by_the_builds_own_rules() -> None:
    found = cands.enumerate_candidates(_base(H100_ASK))
    dropped = [c for c in found if c.dropped]
    kept = [c for c in found if not c.dropped]
    # NVFP4 is Blackwell's, an unquantized 70B does not fit one H100, a KV dtype needs a format
    assert any("quant=nvfp4 needs Blackwell" in (c.dropped or "") for c in dropped)
    assert any("does not fit h100" in (c.dropped or "") and c.cfg.parallel.tp == 1 for c in dropped)
    assert all(c.cfg.parallel.world_size <= 8 for c in found)
    assert all(c.replicas == 8 // c.cfg.parallel.world_size for c in kept)
    assert {c.cfg.parallel.tp for c in kept} >= {2, 4, 8}
    # limits around the sized ones: three batch sizes per shape
    shape = [c for c in kept if c.shape == ("fp8", "fp8", "2", "1")]
    assert len({c.cfg.build.batch for c in shape}) == 3


def test_ranking_meets_the_slo_first_and_predicts_every_kept_candidate() -> None:
    found = cands.enumerate_candidates(_base(H100_ASK))
    cands.predict_all(found)
    ranked = cands.ranked(found)
    assert ranked and all(c.prediction is not None for c in ranked)
    meeting = [c for c in ranked if not c.misses]
    assert ranked[: len(meeting)] == meeting
    top = ranked[0].prediction
    assert top is not None and top.itl_ms_p99 <= 30 and top.ttft_ms_p99 <= 1000
    scores = [c.score() for c in meeting]
    assert scores == sorted(scores, reverse=True)


def test_an_unknown_format_in_the_space_is_refused_in_one_line() -> None:
    result = cli("tune", "tune.formats=[fp8,fp9]", "dry_run=true")
    assert result.returncode == 1
    assert "tune.formats: ['fp9'] are not formats" in result.stderr


def test_dry_run_prints_the_ranked_table_the_drops_and_the_trials(tmp_path: Path) -> None:
    result = cli("tune", *H100_ASK, "dry_run=true", f"workdir={tmp_path}")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "candidates," in out and "dropped before any build" in out
    assert "TTFT p99" in out and "tok/s/GPU" in out and "$/1M tok" in out
    assert "# dropped" in out and "needs Blackwell" in out
    trials = out.split("# trials it would run", 1)[1]
    assert trials.count("parallel.tp=") == 4  # tune.max_trials, each a different shape first
    assert "dry run: nothing was built" in out
    assert not list(tmp_path.glob("**/mlflow.db"))  # nothing recorded


def test_cpu_space_is_the_reference_runtimes_knobs() -> None:
    found = cands.enumerate_candidates(_base(["target=cpu"]))
    assert {c.cfg.quant.format.value for c in found} == {"none", "fp8"}
    assert all(not c.dropped for c in found)
    keys = {o.split("=")[0] for c in found for o in c.overrides}
    assert {"triton.cpu_max_num_tokens", "build.max_batch_size", "triton.cpu_threads"} <= keys
    loads = search.trial_loads(found[0])
    assert loads[0] == 1 and loads[-1] == found[0].cfg.build.batch and len(loads) <= search.CPU_LOADS
