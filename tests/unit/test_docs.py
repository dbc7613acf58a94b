"""The README stays what a newcomer reads, and every relative link of it and of docs/ leads to a
file that exists (a page moved or renamed breaks here, not for the reader)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).parents[2]
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
        if "://" not in target and not (page.parent / target).exists()
    ]
    assert not broken, broken
    linked = {Path(t).name for t in LINK.findall(readme.read_text())}
    assert {p.name for p in pages[1:]} <= linked, "every docs page is on the README's map"
