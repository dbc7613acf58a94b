"""How the pipeline's MLflow experiments and sweep runs present themselves in MLflow's UI, against a
real sqlite store."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pipeline import validate
from pipeline.tracking import card, metrics, runs, ui


def test_a_sweep_is_named_by_what_varies() -> None:
    jobs = [["quant=none", "workdir=/a/b", "parallel.tp=1"], ["quant=fp8", "workdir=/a/b", "parallel.tp=1"]]
    assert runs.sweep_name(jobs) == "sweep: quant=none,fp8"
    two = [["quant=none", "parallel.tp=1"], ["quant=fp8", "parallel.tp=2"]]
    assert runs.sweep_name(two) == "sweep: quant=none,fp8 parallel.tp=1,2"
    assert runs.sweep_name([["workdir=/x"], ["workdir=/x"]]) == "sweep: 2 jobs"


def test_experiments_are_model_development_ones_and_older_ones_are_marked(tmp_path: Path) -> None:
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = validate.load([f"workdir={tmp_path}", "target=cpu", f"tracking.uri={uri}"])
    client = mlflow.MlflowClient(uri)
    older = client.create_experiment("made-before", artifact_location=(tmp_path / "a").as_uri())
    chosen = client.create_experiment("chosen-in-the-ui", artifact_location=(tmp_path / "b").as_uri())
    client.set_experiment_tag(chosen, "mlflow.experimentKind", "finetuning")
    for name in ("new-one", "made-before", "chosen-in-the-ui"):
        cfg.tracking.experiment = name
        _, experiment_id = runs._client_and_experiment(cfg)
        kind = client.get_experiment(experiment_id).tags["mlflow.experimentKind"]
        assert kind == ("finetuning" if name == "chosen-in-the-ui" else "custom_model_development"), name
    assert client.get_experiment(older).tags["mlflow.experimentKind"] == "custom_model_development"
    view = json.loads(client.get_experiment(older).tags[ui.VIEW_TAG])  # the headline view, for the links
    assert view["selectedColumns"] == view["columnOrder"] and view["orderByKey"] == "metrics.`output_tok_s`"


def _points() -> list[dict[str, Any]]:
    def point(c: int, tok_s: float, ttft: float) -> dict[str, Any]:
        return {"load": f"c={c}", "concurrency": c, "output_tokens_per_s": tok_s, "ttft_ms_p50": ttft / 2,
                "ttft_ms_p99": ttft, "itl_ms_p50": 20.0, "itl_ms_p99": 30.0, "goodput_requests_per_s": 1.5,
                "meets_slo": True, "error_kinds": {}}  # fmt: skip

    return [point(1, 100.0, 50.0), point(8, 700.123456, 80.0)]


GATE = {"verdict": "pass", "tasks": [
    {"task": "arithmetic", "accuracy": 0.5, "reference": 0.55, "delta": -0.05, "ci_low": -0.1, "ci_high": 0.0,
     "agreement": 0.9},
    {"task": "capitals", "accuracy": 0.9, "reference": 0.9, "delta": 0.0, "ci_low": -0.02, "ci_high": 0.02,
     "agreement": 1.0},
]}  # fmt: skip


def test_the_headline_is_the_highest_loads_figures_under_short_names(tmp_path: Path) -> None:
    cpu = validate.load([f"workdir={tmp_path}", "target=cpu"])
    found = metrics.headline(cpu, _points(), {"perplexity_change_pct": 1.25}, GATE, server_peak_rss_mb=1536)
    assert found == {"output_tok_s": 700.1, "ttft_p50_ms": 40.0, "ttft_p99_ms": 80.0, "itl_p50_ms": 20.0,
                     "itl_p99_ms": 30.0, "accuracy_delta": -0.05, "ppl_change_pct": 1.25,
                     "server_peak_rss_gb": 1.5}  # fmt: skip
    assert list(found) == [name for name in metrics.HEADLINE_NAMES if name in found]  # logged in this order
    # a priced GPU deployment with an SLO: per GPU, the cost and the goodput too
    gpu = validate.load([f"workdir={tmp_path}", "target=h100", "quant=fp8", "parallel.tp=3",
                         "target.price_per_gpu_hour=3.6", "slo.ttft_ms_p99=1000"])  # fmt: skip
    priced = metrics.headline(gpu, _points())
    assert priced["output_tok_s_per_gpu"] == 233.4 and priced["goodput_req_s"] == 1.5
    assert priced["usd_per_mtok"] == pytest.approx(3.6 * 3 / 3600 / 700.123456 * 1e6, rel=1e-3)
    assert metrics.headline(cpu, []) == {}


def test_the_detail_sorts_under_prefixes_and_the_sweep_is_a_series(tmp_path: Path) -> None:
    cfg = validate.load([f"workdir={tmp_path}", "target=cpu"])
    rate = {"load": "rate=2.5", "concurrency": None, "output_tokens_per_s": 9.0}
    flat, series = metrics.benchmark_metrics([*_points(), rate], cfg)
    assert flat["load/c8/ttft_ms_p99"] == 80.0 and flat["load/rate2_5/output_tokens_per_s"] == 9.0
    assert "load/c8/meets_slo" not in flat and "load/c8/error_kinds" not in flat  # numbers only
    assert ("sweep/output_tokens_per_s", 700.123456, 8) in series and len({s for _, _, s in series}) == 2
    assert metrics.gate_metrics(GATE)["eval/arithmetic/delta"] == -0.05
    assert metrics.stage_metrics("quantize", 3.5, {"quality": {"kl": 0.1}, "costs": {"load": {"seconds": 1.0}}}) == {
        "stage/quantize_seconds": 3.5, "quality/kl": 0.1, "cost/load_seconds": 1.0}  # fmt: skip


def test_a_build_card_says_what_was_built_how_it_did_and_how_to_serve_it(tmp_path: Path) -> None:
    cfg = validate.load([f"workdir={tmp_path}", "target=cpu", "quant=fp8"])
    headline = metrics.headline(cfg, _points(), {"perplexity_change_pct": 1.25}, GATE)
    facts = card.BuildFacts(headline, _points(), {"perplexity_change_pct": 1.25, "top1_agreement": 0.97}, GATE,
                            "0123abcd", tmp_path / "repository", "3")  # fmt: skip
    text = card.build_card(cfg, "runid", facts, "smollm2-135m")
    assert text.startswith("**smollm2-135m** · fp8, KV fp8 · tp1 pp1 · cpu · tensorrt backend")
    assert "at revision `0123abcd`" in text and "At c=8, the benchmark's highest load" in text
    assert "| output tok/s | TTFT p50 ms |" in text and "| 700 | 40.0 | 80.0 | 20.0 | 30.0 | -0.05 | 1.25 |" in text
    assert "**Quality**: perplexity +1.25 % on held-out text, top-1 agreement 97.0%." in text
    assert "**Accuracy gate**: pass against the unquantized build: arithmetic 0.500 vs 0.550 (-0.050" in text
    assert "![latency and throughput](get-artifact?path=benchmark%2Flatency_throughput.png&run_uuid=runid)" in text
    assert "`python -m pipeline serve model_uri=models:/smollm2-135m/3`" in text
    unevaluated = card.build_card(cfg, "runid", card.BuildFacts({}, []), "smollm2-135m")
    assert "not evaluated (eval=none)" in unevaluated and "![" not in unevaluated


def test_links_open_the_runs_in_model_training_mode_with_the_headline_view() -> None:
    assert ui.base_url("http://user:secret@mlflow.internal:5000/") == "http://mlflow.internal:5000"
    assert ui.base_url("sqlite:///artifacts/mlflow.db") == "http://127.0.0.1:5000"
    runs_link = ui.runs_url("http://h:5000", "7")
    assert (
        runs_link
        == "http://h:5000/#/experiments/7/runs?workflowType=machine_learning&viewStateShareKey=pipeline-headline"
    )
    assert ui.run_url("http://h:5000", "7", "abc").endswith("/#/experiments/7/runs/abc?workflowType=machine_learning")
    columns = json.loads(ui.view_state())["selectedColumns"]
    assert columns[: len(metrics.HEADLINE_NAMES)] == [f"metrics.`{n}`" for n in metrics.HEADLINE_NAMES]
