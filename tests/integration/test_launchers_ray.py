"""The Ray plugin's own launcher, which starts a Ray instance on this host for the sweep and stops
it after: the same sweep as test_launchers.py's, on make test's serial tier. Ray gives its node a
fixed 30 s to register with its control store (ray/_private/node.py), which the first tier's two
busy workers once made it miss ("The current node timed out during startup")."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.test_launchers import check_sweep

pytestmark = pytest.mark.slow


def test_a_sweep_through_the_ray_launcher_leaves_a_parent_and_two_finished_children(
    tmp_path: Path, tiny_checkpoint: Path, mlflow_server: str
) -> None:
    check_sweep(tmp_path, tiny_checkpoint, mlflow_server, "ray")
