"""Two builds that start at once in a fresh workdir share one MLflow store: one creates its tables
and the experiment, the other waits and finds them (real sqlite store, real processes)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow  # two processes importing MLflow: seconds each

OPEN_STORE = """
import sys
from pipeline import validate
from pipeline.tracking import runs
cfg = validate.load([f"workdir={sys.argv[1]}", "target=cpu", "quant=none"])
client, experiment = runs._client_and_experiment(cfg)
print(experiment)
"""


def test_two_builds_starting_at_once_create_the_store_once(tmp_path: Path) -> None:
    starts = [
        subprocess.Popen(
            [sys.executable, "-c", OPEN_STORE, str(tmp_path)], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120)[0].strip() for p in starts]
    assert [p.returncode for p in starts] == [0, 0]
    assert outs[0] == outs[1] != ""
