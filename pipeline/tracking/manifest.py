"""A content manifest of a Triton repository: every file's path and sha256.

A registered repository is code (Triton runs its ``model.py`` files), so what is served must be
what was built. ``register`` records the manifest beside the uploaded repository and its digest as
a tag of the model version; a download is checked against both before it is renamed into place,
and a copy already on disk is checked again before it is served.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

CHUNK = 1 << 20


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def manifest(folder: Path) -> dict[str, str]:
    """Repository-relative path -> sha256 of each file (linked files are hashed as what they hold:
    the upload copies their content)."""
    files = {}
    for root, _dirs, names in os.walk(folder, followlinks=True):
        for name in names:
            path = Path(root) / name
            files[path.relative_to(folder).as_posix()] = _sha256(path)
    return dict(sorted(files.items()))


def digest(files: dict[str, str]) -> str:
    """The manifest's own sha256 (what the model version's tag holds)."""
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def problems(folder: Path, expected: dict[str, str]) -> list[str]:
    """What differs between ``folder`` and the manifest: changed, missing or extra files, links,
    and paths that leave the folder."""
    found: list[str] = []
    root = folder.resolve()
    present = set()
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_symlink():
            found.append(f"{rel} is a symbolic link")
        elif not path.resolve().is_relative_to(root):
            found.append(f"{rel} leaves the folder")
        elif path.is_file():
            present.add(rel)
    for rel in sorted(expected):
        if not (Path(rel).parts and ".." not in Path(rel).parts and not Path(rel).is_absolute()):
            found.append(f"the manifest names {rel!r}, outside the folder")
        elif rel not in present:
            found.append(f"{rel} is missing")
        elif _sha256(folder / rel) != expected[rel]:
            found.append(f"{rel} differs from what was registered")
    found += [f"{rel} was not registered" for rel in sorted(present - set(expected))]
    return found
