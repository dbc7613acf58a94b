"""The checks that guard the code run the same way everywhere: the pre-commit hooks are make
lint's tools with make lint's arguments, and CI runs make lint."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).parents[2]


def test_the_pre_commit_hooks_are_the_tools_make_lint_runs_and_ci_runs_make_lint() -> None:
    hooks = yaml.safe_load((ROOT / ".pre-commit-config.yaml").read_text())["repos"][0]["hooks"]
    makefile = (ROOT / "Makefile").read_text()
    lint = makefile[makefile.index("\nlint:") :].split("\n\n")[0]
    for hook in hooks:
        tool = hook["entry"].removeprefix(".venv/bin/")
        assert f"$(VENV)/bin/{tool}" in lint, (hook["id"], lint)
    assert {h["id"] for h in hooks} == {"ruff", "ruff-format", "import-linter", "mypy"}
    assert "make lint" in (ROOT / ".ci" / "run").read_text().splitlines()


PROCESS_OR_SERVER = (
    "import subprocess",
    "subprocess.run(",
    "Popen(",
    "Background(",
    "HTTPServer(",
    "running_mlflow_server(",
)


def test_unit_tests_start_no_process_and_no_server() -> None:
    """The folders show the tiers: a test that starts a process or a server is an integration test."""
    starting = [
        f"{path.name}: {needle}"
        for path in sorted((ROOT / "tests" / "unit").glob("test_*.py"))
        if path.name != Path(__file__).name  # this file names them
        for needle in PROCESS_OR_SERVER
        if needle in path.read_text()
    ]
    assert not starting, f"move these to tests/integration/ (and into make test's PARALLEL_TESTS): {starting}"
