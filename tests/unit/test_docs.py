"""The README stays what a newcomer reads, and every relative link of it and of docs/ leads to a
file that exists (a page moved or renamed breaks here, not for the reader); the docs site builds
strictly, and its configuration reference, generated from the schema, names every key."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).parents[2]
GENERATED = "reference/"  # pages the site build writes (docs/gen_reference.py)
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_the_readme_is_short_and_every_relative_link_resolves() -> None:
    readme = ROOT / "README.md"
    assert len(readme.read_text().splitlines()) <= 160, "reference material belongs in docs/"
    pages = [readme, *sorted((ROOT / "docs").glob("*.md"))]
    assert len(pages) > 5
    broken = [
        f"{page.name}: {target}"
        for page in pages
        for target in LINK.findall(page.read_text())
        if "://" not in target and not target.startswith(GENERATED) and not (page.parent / target).exists()
    ]
    assert not broken, broken
    linked = {Path(t).name for t in LINK.findall(readme.read_text())}
    assert {p.name for p in pages[1:] if p.name != "index.md"} <= linked, "every docs page is on the README's map"


def test_the_site_builds_strictly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What make docs runs, in-process: a broken link, a missing anchor or a page outside the nav
    aborts the build."""
    from mkdocs.commands.build import build
    from mkdocs.config import load_config

    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("DISABLE_MKDOCS_2_WARNING", "true")
    monkeypatch.setenv("NO_MKDOCS_2_WARNING", "1")
    build(load_config(str(ROOT / "mkdocs.yml"), site_dir=str(tmp_path / "site"), strict=True))
    page = (tmp_path / "site" / "reference" / "configuration" / "index.html").read_text()
    assert "triton.kv_cache_free_gpu_mem_fraction" in page


def _leaf_keys(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [key for name, value in node.items() for key in _leaf_keys(value, f"{prefix}{name}.")]
    return [prefix.rstrip(".")]


def test_the_configuration_reference_names_every_key_of_the_schema() -> None:
    from pipeline import validate
    from pipeline.config import reference
    from pipeline.config.schema import to_dict

    text = reference.markdown()
    keys = _leaf_keys(to_dict(validate.load([])))
    assert len(keys) > 100
    # a dict-valued key (model.sampling_defaults) is named itself, not its preset's entries
    parents = [[key.rsplit(".", depth)[0] for depth in range(key.count(".") + 1)] for key in keys]
    missing = [names[0] for names in parents if not any(f"`{name}`" in text for name in names[:2])]
    assert not missing, missing
