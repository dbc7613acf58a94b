"""A tracking server that dies mid-run, against a real ``mlflow server``: the job's failure comes
out within seconds (not minutes of MLflow's retries), the run that could not be marked is
recorded in the workdir and marked FAILED once the server answers again, and the CLI says it in
one line."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from pipeline import validate
from pipeline.tracking import runs
from tests.conftest import cli, free_ports
from tests.integration.conftest import running_mlflow_server

pytestmark = pytest.mark.slow


def test_a_server_that_dies_mid_run_costs_seconds_and_the_run_is_marked_when_it_is_back(tmp_path: Path) -> None:
    from mlflow.exceptions import MlflowException

    (port,) = free_ports(1)
    store = tmp_path / "server"
    store.mkdir()
    cfg = validate.load(["target=cpu", f"workdir={tmp_path / 'work'}", f"tracking.uri=http://127.0.0.1:{port}"])
    with running_mlflow_server(store, port) as (_, kill):
        started = time.monotonic()
        with pytest.raises(MlflowException), runs.job_run(cfg) as run:
            assert run is not None
            run_id = run.run_id
            kill()
            run.client.log_param(run_id, "after", "the server died")
        assert time.monotonic() - started < 45, "MLflow's retries held the failure for minutes"
    assert (tmp_path / "work" / runs.UNFINISHED / f"{run_id}.json").is_file()
    # the server back: the next build here reaches its store (directly, to spare a second start)
    back = validate.load(["target=cpu", f"workdir={tmp_path / 'work'}", f"tracking.uri=sqlite:///{store / 'store.db'}"])
    client, _ = runs._client_and_experiment(back)
    ended = client.get_run(run_id)
    assert ended.info.status == "FAILED" and "unreachable" in ended.data.tags["pipeline.ended_while"]
    assert not (tmp_path / "work" / runs.UNFINISHED / f"{run_id}.json").exists()


def test_a_tracking_server_that_fails_its_api_is_one_line_at_the_cli(tmp_path: Path) -> None:
    """A server that answers its health check and fails every call (a store that is down behind
    it): the command ends in one line, without MLflow's traceback."""
    import http.server
    import threading

    class Broken(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/health" else 503)
            self.end_headers()

        do_POST = do_GET

        def log_message(self, *_args: object) -> None:
            pass

    broken = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Broken)
    threading.Thread(target=broken.serve_forever, daemon=True).start()
    try:
        uri = f"tracking.uri=http://127.0.0.1:{broken.server_address[1]}"
        result = cli("compare", f"workdir={tmp_path}", "target=cpu", uri)
    finally:
        broken.shutdown()
    assert result.returncode == 1 and "error: the tracking server failed" in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
