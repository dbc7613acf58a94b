"""The benchmark's endpoints and its AIPerf cross-check: what is sent, what is refused, and how
AIPerf's export is read. Pure functions; the runs themselves are in tests/integration/test_gateway.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline import validate
from pipeline.config.schema import Endpoint
from pipeline.redact import url_without_credentials
from pipeline.stages.benchmark import aiperf, loadgen
from pipeline.stages.benchmark import stage as benchmark

TOKENIZER = Path("/models/tok")


def _cfg(*overrides: str):  # type: ignore[no-untyped-def]
    return validate.load(["target=cpu", "quant=none", *overrides])


def test_url_credentials_are_dropped_and_everything_else_kept() -> None:
    assert url_without_credentials("https://me:s3cret@host.example:8443/v1?x=1") == "https://host.example:8443/v1?x=1"
    assert url_without_credentials("http://host/v1") == "http://host/v1"


@pytest.mark.parametrize(
    ("overrides", "url", "fix"),
    [
        (["benchmark.endpoint=openai"], "127.0.0.1:8001", "http://127.0.0.1:9000/v1"),
        ([], "http://127.0.0.1:9000/v1", "benchmark.endpoint=openai"),
        (["benchmark.tool=aiperf"], "127.0.0.1:8001", "AIPerf needs its HTTP address"),
        (["benchmark.endpoint=openai", "benchmark.tool=aiperf"], "http://u:p@h:1/v1", "openai.api_key_env"),
    ],
)
def test_a_url_the_endpoint_cannot_take_is_refused_naming_the_fix(overrides: list[str], url: str, fix: str) -> None:
    (problem,) = benchmark.url_problems(_cfg(*overrides), url)
    assert fix in problem


def test_a_matching_url_passes() -> None:
    assert benchmark.url_problems(_cfg("benchmark.endpoint=openai"), "https://api.example/v1") == []
    assert benchmark.url_problems(_cfg(), "127.0.0.1:8001") == []


def test_the_openai_request_sends_extensions_only_when_they_change_something() -> None:
    prompt = loadgen.Prompt("hello", 1, 8)
    plain = loadgen.completion_body(prompt, loadgen.Sampling(ignore_eos=False), 3, "m")
    assert plain == {
        "model": "m",
        "prompt": "hello",
        "max_tokens": 8,
        "seed": 3,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0.0,
    }
    full = loadgen.completion_body(prompt, loadgen.Sampling(0.7, 40, 0.9, True), 3, "m")
    assert (full["top_k"], full["top_p"], full["ignore_eos"]) == (40, 0.9, True)


def _argv(cfg, endpoint: loadgen.Endpoint, point: dict, http_url: str | None = None) -> list[str]:  # type: ignore[no-untyped-def,type-arg]
    return aiperf.argv(endpoint, http_url, cfg.benchmark, point, TOKENIZER, Path("/out/p.jsonl"), Path("/out"))


def _option(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_aiperf_gets_the_same_endpoint_load_and_sampling(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(aiperf, "executable", lambda: "aiperf")
    cfg = _cfg("benchmark.endpoint=openai", "benchmark.requests_per_point=16", "benchmark.warmup_requests=2")
    endpoint = loadgen.Endpoint(Endpoint.openai, "https://gw.example:9443/prefix/v1", "smollm2-135m")
    args = _argv(cfg, endpoint, {"load": "c=8", "concurrency": 8, "rate": None, "ramp_up_s": 6.54})
    assert _option(args, "--url") == "https://gw.example:9443"
    assert _option(args, "--custom-endpoint") == "/prefix/v1/completions"
    assert _option(args, "--endpoint-type") == "completions" and "--streaming" in args
    assert json.loads(_option(args, "--extra-inputs")) == {"temperature": 0.0, "ignore_eos": True}
    # our ramp-up: 8 more requests, no warm-up phase (it would drain, and the measured phase would
    # open with a burst of 8 that ours leaves out)
    assert _option(args, "--concurrency") == "8" and _option(args, "--request-count") == "24"
    assert "--warmup-request-count" not in args
    assert _option(args, "--concurrency-ramp-duration") == "6.5"  # ours, as measured
    assert aiperf.prompt_count(cfg.benchmark, {"concurrency": 8}) == 24
    assert _option(args, "--input-file") == "/out/p.jsonl" and _option(args, "--tokenizer") == str(TOKENIZER)
    assert "--api-key" not in args


def test_aiperf_reaches_triton_through_its_generate_stream_template(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(aiperf, "executable", lambda: "aiperf")
    cfg = _cfg("benchmark.rates=[2.5]", "benchmark.concurrency=[]", "benchmark.temperature=0.5")
    endpoint = loadgen.Endpoint(Endpoint.triton, "127.0.0.1:8001", "ensemble")
    args = _argv(cfg, endpoint, {"load": "rate=2.5", "concurrency": None, "rate": 2.5}, "http://127.0.0.1:8000")
    assert _option(args, "--custom-endpoint") == "/v2/models/ensemble/generate_stream"
    assert _option(args, "--request-rate") == "2.5" and _option(args, "--arrival-pattern") == "poisson"
    # an open loop has no ramp-up: AIPerf's warm-up phase, then the measured requests
    assert _option(args, "--warmup-request-count") == "2" and _option(args, "--request-count") == "16"
    assert aiperf.prompt_count(cfg.benchmark, {"concurrency": None}) == 18
    extra = json.loads(_option(args, "--extra-inputs"))
    assert extra["response_field"] == "text_output"
    import jinja2

    body = json.loads(jinja2.Template(extra["payload_template"]).render(text='say "hi"', max_tokens=5))
    assert body == {
        "text_input": 'say "hi"',
        "max_tokens": 5,
        "stream": True,
        "temperature": 0.5,
        "top_k": 0,
        "top_p": 0.0,
        "end_id": -1,
    }


def test_aiperf_figures_and_their_differences_from_ours(tmp_path: Path) -> None:
    export = tmp_path / aiperf.EXPORT
    export.write_text(
        json.dumps(
            {
                "time_to_first_token": {"unit": "ms", "avg": 420.0, "p50": 400.0},
                "inter_token_latency": {"unit": "ms", "p50": 50.0},
                "request_latency": {"unit": "ms", "p50": 2000.0},
                "output_token_throughput": {"unit": "tokens/sec", "avg": 20.0},
                "request_throughput": {"avg": 0.5},
                "error_summary": [{"count": 2}],
            }
        )
    )
    found = aiperf.figures(tmp_path)
    assert found["aiperf_ttft_ms_p50"] == 400.0 and found["aiperf_errors"] == 2.0
    ours = {"ttft_ms_p50": 420.0, "itl_ms_p50": 45.0, "e2e_ms_p50": 2000.0, "output_tokens_per_s": 21.0}
    diff = aiperf.differences({**ours, "requests_per_s": float("nan"), **found})
    assert diff["aiperf_diff_pct_ttft_ms_p50"] == pytest.approx(5.0)
    assert diff["aiperf_diff_pct_itl_ms_p50"] == pytest.approx(-10.0)
    assert "aiperf_diff_pct_requests_per_s" not in diff  # ours is NaN: no difference to report
    assert "TTFT p50 420.0 vs AIPerf 400.0 (+5.0%)" in aiperf.summary({**ours, **found, **diff})


def _record(phase: str, start_s: float, ttft: float, itl: float, error: bool = False) -> str:
    """A request of 32 output tokens."""
    latency = ttft + 31 * itl
    metrics = {
        "time_to_first_token": {"value": ttft, "unit": "ms"},
        "inter_token_latency": {"value": itl, "unit": "ms"},
        "request_latency": {"value": latency, "unit": "ms"},
        "output_token_count": {"value": 32, "unit": "tokens"},
    }
    times = {"request_start_ns": int(start_s * 1e9), "request_end_ns": int((start_s + latency / 1000) * 1e9)}
    record: dict = {"metadata": {"benchmark_phase": phase, **times}, "metrics": metrics}  # type: ignore[type-arg]
    if error:
        record["error"] = {"message": "boom"}
    return json.dumps(record)


def test_aiperf_latencies_leave_out_the_first_request_of_each_worker_as_ours_do(tmp_path: Path) -> None:
    summary = {"time_to_first_token": {"p50": 999.0}, "output_token_throughput": {"avg": 30.0}}
    (tmp_path / aiperf.EXPORT).write_text(json.dumps(summary))
    burst = [_record("profiling", 0.05 + i / 1000, 1000.0 + 100 * i, 200.0) for i in range(4)]  # the opening burst
    steady = [_record("profiling", 5.0 + i, ttft, 100.0) for i, ttft in enumerate([300.0, 500.0, 400.0])]
    failed = _record("profiling", 9.05, 1.0, 1.0, error=True)
    (tmp_path / aiperf.RECORDS).write_text("\n".join([*reversed(burst), *steady, failed]) + "\n")
    found = aiperf.figures(tmp_path, ramp_up=4)
    assert found["aiperf_ttft_ms_p50"] == 400.0 and found["aiperf_itl_ms_p50"] == 100.0
    assert found["aiperf_e2e_ms_p50"] == 400.0 + 3100.0
    # throughput as ours, while every worker is busy: from the first measured start (5 s) to the
    # last start (the failed request, 9.05 s), the tokens streamed inside, each request's 32
    # evenly spaced from its first to its end. Burst: first tokens at 1.05-1.35 s, 0.2 s apart,
    # so 12, 12, 13 and 13 of them from 5 s on; measured: first at 5.3, 6.5 and 7.4 s, 0.1 s
    # apart, so all 32, then 26 (6.5-9.0 s) and 17 (7.4-9.0 s)
    inside = 12 + 12 + 13 + 13 + 32 + 26 + 17
    assert found["aiperf_output_tokens_per_s"] == pytest.approx(inside / 4.05)
    no_ramp = aiperf.figures(tmp_path)  # no ramp-up: AIPerf's summary
    assert no_ramp["aiperf_ttft_ms_p50"] == 999.0 and no_ramp["aiperf_output_tokens_per_s"] == 30.0


def test_an_aiperf_that_wrote_nothing_is_an_error_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="AIPerf wrote no readable results"):
        aiperf.figures(tmp_path)
    (tmp_path / aiperf.EXPORT).write_text("{}")
    with pytest.raises(Exception, match="AIPerf wrote no readable per-request records"):
        aiperf.figures(tmp_path, ramp_up=2)


def test_aiperf_missing_is_refused_before_the_build_naming_the_make_target(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(aiperf, "VENV_BIN", Path("/nonexistent/aiperf"))
    monkeypatch.setenv("PATH", "/nonexistent")
    (problem,) = benchmark.preflight(_cfg("benchmark.tool=aiperf"))
    assert "make aiperf" in problem
    assert benchmark.preflight(_cfg()) == []
