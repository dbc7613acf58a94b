"""The closed loop's ramp-up against a real (small) OpenAI-style streaming server: the workers
start one after another, paced by the first request's stream, and throughput is counted while every worker
is busy."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from pipeline.config.schema import Endpoint, SLOConfig
from pipeline.stages.benchmark import loadgen, report

TOKEN_GAP_S = 0.02


class _Streamer(BaseHTTPRequestHandler):
    """Streams ``max_tokens`` completion chunks, one every TOKEN_GAP_S, as server-sent events."""

    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:  # http.server calls it by this name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for _ in range(body["max_tokens"]):
            time.sleep(TOKEN_GAP_S)
            self._chunk(b'data: {"choices": [{"text": "x"}]}\n\n')
        self._chunk(b"data: [DONE]\n\n")
        self._chunk(b"")

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def log_message(self, *args: object) -> None:
        pass


def _count(measured: loadgen.Measured) -> None:
    measured.output_tokens = len(measured.token_times)  # one token per chunk here


@pytest.fixture
def server_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Streamer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_ramped_workers_start_one_after_another_paced_by_the_first_stream(server_url: str) -> None:
    endpoint = loadgen.Endpoint(Endpoint.openai, server_url, "m")
    prompts = [loadgen.Prompt("hi", 1, 16) for _ in range(8)]
    results, seconds, ended = loadgen.run_point(
        endpoint, prompts, loadgen.Sampling(), concurrency=4, on_done=_count, ramp_up=True
    )
    assert ended is None and not [m.error for m in results if m.error]
    ramp = sorted((m for m in results if m.ramp_up), key=lambda m: m.sent)
    assert len(ramp) == 4
    first = ramp[0]
    for k, later in enumerate(ramp[1:], start=1):
        # worker k waits for 16 * k / 4 tokens of the first request
        assert later.sent >= first.token_times[4 * k - 1]
        assert later.sent < first.token_times[4 * k - 1] + 10 * TOKEN_GAP_S
    point = report.summarize({"load": "c=4"}, results, seconds, SLOConfig())
    measured_sends = [m.sent for m in results if not m.ramp_up]
    assert point["requests"] == 4 and point["ramp_up_s"] == pytest.approx(ramp[-1].sent - first.sent)
    assert point["throughput_window_s"] == pytest.approx(max(measured_sends) - min(measured_sends))
    # every worker streams through the window: 4 tokens per TOKEN_GAP_S
    assert point["output_tokens_per_s"] == pytest.approx(4 / TOKEN_GAP_S, rel=0.35)


def test_without_a_ramp_up_every_worker_starts_at_once_and_throughput_spans_the_point(server_url: str) -> None:
    endpoint = loadgen.Endpoint(Endpoint.openai, server_url, "m")
    prompts = [loadgen.Prompt("hi", 1, 8) for _ in range(4)]
    results, seconds, _ = loadgen.run_point(endpoint, prompts, loadgen.Sampling(), concurrency=4, on_done=_count)
    sends = sorted(m.sent for m in results)
    assert sends[-1] - sends[0] < 4 * TOKEN_GAP_S
    point = report.summarize({"load": "c=4"}, results, seconds, SLOConfig())
    assert point["throughput_window_s"] == seconds and point["ramp_up_s"] == 0.0
