"""The MLflow UI as the place where deployments are compared: links that open on the runs, with
the headline metrics as the runs table's first columns.

MLflow 3.17's UI picks its mode (GenAI or model training) from the link's ``workflowType``
query, else from the browser's last choice (GenAI on a first visit): the experiment's
``mlflow.experimentKind`` tag, which earlier 3.x UIs read, is set too but no longer decides. The
runs table shows no metric columns until someone picks them; a *shared view* (an experiment tag
``mlflow.sharedViewState.<key>`` holding the view's state as JSON, which the UI loads when a link
carries ``viewStateShareKey=<key>``) picks the headline metrics and the build's shape for every
user of the link. Both were read in the UI's sources (MLflow 3.17.2's bundle) and are checked in
a real browser by ``tests/integration/test_mlflow_ui.py``.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlsplit

from pipeline.redact import url_without_credentials
from pipeline.tracking.metrics import HEADLINE_NAMES

VIEW_KEY = "pipeline-headline"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"
MODE = "workflowType=machine_learning"
SHAPE_PARAMS = ("quant", "kv_cache_dtype", "tp", "pp", "target", "backend")
LOCAL_UI = "http://127.0.0.1:5000"  # where `python -m pipeline ui` serves a sqlite store


def answers(base: str, timeout_s: float = 2.0) -> bool:
    """Whether an MLflow server answers its health check at ``base``."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"{base}/health", timeout=timeout_s) as reply:
            return bool(reply.status == 200)
    except OSError:
        return False


def view_state() -> str:
    """The shared view. The table: the headline metrics, then what the build was, as its columns;
    the runs sorted by throughput (a sort by a metric also lists a sweep's children beside the
    others rather than folded under their parent). The charts: a first section of a bar chart
    per headline metric (the UI would put unprefixed metrics after every prefixed section); the
    UI adds the other sections after it."""
    columns = [f"metrics.`{name}`" for name in HEADLINE_NAMES] + [f"params.`{name}`" for name in SHAPE_PARAMS]
    columns.append("attributes.`Dataset`")  # the data each run read, by name and digest
    section = {"uuid": "pipeline-headline", "name": "Headline", "display": True, "isReordered": False}
    charts = [
        {"uuid": f"pipeline-{name}", "type": "BAR", "metricSectionId": section["uuid"], "metricKey": name,
         "isGenerated": False, "deleted": False}
        for name in HEADLINE_NAMES
    ]  # fmt: skip
    state = {
        "selectedColumns": columns,
        "columnOrder": columns,  # in this order: the table sorts a group's columns by name otherwise
        "orderByKey": columns[0],
        "orderByAsc": False,
        "compareRunSections": [section],
        "compareRunCharts": charts,
        "isAccordionReordered": True,  # sections the UI makes go after this one
    }
    return json.dumps(state)


def ensure_view(client: Any, experiment_id: str, tags: dict[str, str]) -> None:
    """Write the shared view (again, when a newer pipeline changed it)."""
    state = view_state()
    if tags.get(VIEW_TAG) != state:
        client.set_experiment_tag(experiment_id, VIEW_TAG, state)


def is_server(tracking_uri: str) -> bool:
    """An MLflow tracking server, which serves its own UI (else a store `python -m pipeline ui` serves)."""
    return urlsplit(tracking_uri).scheme in ("http", "https")


def base_url(tracking_uri: str) -> str:
    """The UI's address: the tracking server's own, or `python -m pipeline ui`'s for a sqlite
    store (no credentials either way)."""
    if is_server(tracking_uri):
        return url_without_credentials(tracking_uri).rstrip("/")
    return LOCAL_UI


def where(tracking_uri: str) -> str:
    """How to reach the UI the links point at."""
    if not is_server(tracking_uri):
        return "in the MLflow UI (`python -m pipeline ui` serves it)"
    return "in the MLflow UI"


def runs_url(base: str, experiment_id: str) -> str:
    return f"{base}/#/experiments/{experiment_id}/runs?{MODE}&viewStateShareKey={VIEW_KEY}"


def run_url(base: str, experiment_id: str, run_id: str) -> str:
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}?{MODE}"


def compare_url(base: str, experiment_id: str, run_ids: list[str]) -> str:
    runs = json.dumps(run_ids, separators=(",", ":"))
    return f"{base}/#/compare-runs?runs={runs}&experiments={json.dumps([experiment_id])}&{MODE}"
