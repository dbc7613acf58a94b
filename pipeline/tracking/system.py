"""MLflow's system metrics for a job: CPU, memory, disk and network, and GPU utilisation and
memory where nvidia-ml-py finds a GPU, under ``system/``, sampled every few seconds while the job
runs, so a compare view shows whether the quantization or the benchmark saturated the machine.

MLflow's monitor logs each sample as it is taken and asks the server for the run's status before
each; here its samplers run in a loop of our own that asks nothing, and the samples are logged
when the job ends (with the times and steps they were taken at). A run's metrics are listed in
the order they were first logged, and MLflow's compare view plots the first: that must be the
build's throughput, logged when the build is recorded, not the CPU load of its first seconds. And
a tracking server that dies mid-job costs the samples, never seconds of the job's own ending.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from typing import Any

from pipeline.tracking.store import reachable

log = logging.getLogger(__name__)
INTERVAL_S = 5  # MLflow's MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides it


@contextlib.contextmanager
def sampled(client: Any, run_id: str, tracking_uri: str) -> Iterator[None]:
    """Sample while the block runs; log the samples after it (best effort: a tracking server that
    is gone costs them, never the job's own outcome)."""
    from mlflow.entities import Metric
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    held: list[Metric] = []

    class Held(SystemMetricsMonitor):
        def monitor(self) -> None:  # sample every interval until stopped; no server call
            step = 0
            while not self._shutdown_event.wait(self.sampling_interval):
                self.collect_metrics()
                now = int(time.time() * 1000)
                metrics = self.aggregate_metrics()
                held.extend(Metric(f"system/{key}", float(value), now, step) for key, value in metrics.items())
                step += 1
                for sampler in self.monitors:
                    sampler.clear_metrics()

    # its start note would crowd the job's log
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    monitor = Held(run_id, sampling_interval=INTERVAL_S, tracking_uri=tracking_uri)
    monitor.start()
    try:
        yield
    finally:
        monitor._shutdown_event.set()
        if monitor._process is not None:
            monitor._process.join()
        try:
            if held and reachable(tracking_uri, timeout_s=2):
                for start in range(0, len(held), 1000):  # MLflow takes at most 1000 metrics per call
                    client.log_batch(run_id, metrics=held[start : start + 1000])
        except Exception as error:  # the samples are not worth the job's own outcome
            log.debug("the system metrics of run %s were not logged: %s", run_id, error)
