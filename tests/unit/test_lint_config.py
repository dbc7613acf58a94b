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
