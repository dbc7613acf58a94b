"""A short soak of the served CPU repository (``make soak`` runs the 5-minute one): concurrent
streams with cancellations and a burst of streams dropped as soon as they are sent. Nothing fails
that was not cancelled or refused, and the server's threads do not grow."""

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
    # Not asserted: a fresh request's TTFT after the burst. The BLS stops a dropped stream's engine
    # request only at its first response, so the burst is prefilled before it is stopped; in a
    # loaded suite the recovery misses 10 s (issue 15's open soak finding; `make soak` checks it).
    assert result["probes"] > 0
