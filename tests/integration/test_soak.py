"""A short soak of the served CPU repository (``make soak`` runs the 5-minute one): concurrent
streams with cancellations and a burst of streams dropped as soon as they are sent. Nothing fails
that was not cancelled or refused, the server's threads stay flat, and a fresh request's time to
first token is back to normal within 10 s of the burst."""

from __future__ import annotations

import pytest

from benchmarks import soak
from tests.integration.conftest import Served

pytestmark = pytest.mark.slow


def test_a_short_soak_with_a_burst_of_dropped_streams(served: Served) -> None:
    # the burst comes early, so that probes go on after it; idle request threads of the BLS pool
    # end after 3 s, before the server is measured again
    result = soak.run(served.server, seconds=10, streams=8, burst=60, settle_s=4, burst_after_s=2)
    assert result["errors"] == 0, result["error_examples"]
    assert result["completed"] > 0
    assert result["checks"]["threads do not grow (< 10%)"], result["server_threads"]
    assert result["checks"]["TTFT back within 10 s"], {k: v for k, v in result.items() if "probe" in k or "ttft" in k}
