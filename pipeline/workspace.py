"""The stage contract (``Stage``, ``StageWorkspace``), where each stage's artifacts live and how
they become "done".

Layout under the workdir::

    <workdir>/<stage>/<fingerprint>/            finished artifacts, manifest.json inside
    <workdir>/<stage>/.<fingerprint>.partial/   being written; never read as a result
    <workdir>/<stage>/.<fingerprint>.lock       held while a process works on that fingerprint

A stage writes into the partial folder; the runner writes ``manifest.json`` last and renames the
folder into place. A rename is atomic, so a killed run leaves either nothing or a finished folder,
and the next run removes the stale partial folder and starts that stage again.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

from pipeline import proc
from pipeline.config.schema import PipelineConfig
from pipeline.errors import StageError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FINGERPRINT_CHARS = 16


def canonical_json(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)


def fingerprint(
    stage: str, version: int, depends_on: dict[str, Any], upstream: str | None, tools: dict[str, str]
) -> str:
    """Identity of a stage's output: what it reads from the config, what came before it, the tool
    versions that produce it, and the stage's own output-format version."""
    payload = {"stage": stage, "version": version, "depends_on": depends_on, "upstream": upstream, "tools": tools}
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()[:FINGERPRINT_CHARS]


def installed_version(distribution: str) -> str | None:
    """A Python distribution's installed version, from its metadata (no import, so it is fast)."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def tool_versions(distributions: tuple[str, ...]) -> dict[str, str]:
    return {name: installed_version(name) or "absent" for name in distributions}


def file_identity(path: Path, sample: int = 1 << 20) -> str:
    """A cheap content identity for large files: size plus a hash of the first and last MiB.
    Modification times are avoided on purpose: reinstalling a package or copying a checkpoint
    changes them without changing the content."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as handle:
        digest.update(handle.read(sample))
        if size > sample:
            handle.seek(max(sample, size - sample))
            digest.update(handle.read(sample))
    return f"{size}:{digest.hexdigest()[:16]}"


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON so that readers see the old file or the new one, never a torn one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("w") as handle:
        json.dump(data, handle, indent=2, sort_keys=True, default=str)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def no_space(error: BaseException) -> StageError | None:
    """A full disk anywhere in ``error``'s chain as one line naming the folder, else None."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            where = Path(seen.filename).parent if seen.filename else "the disk"
            return StageError(f"no space left on {where}: {seen.strerror}; free space there or set workdir= elsewhere")
        seen = seen.__cause__ or seen.__context__
    return None


def require_space(folder: Path, needed_bytes: float | None, what: str) -> None:
    """Refuse to start ``what`` when ``folder``'s disk cannot hold about ``needed_bytes`` (+10%)."""
    if not needed_bytes:
        return
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < needed_bytes * 1.1:
        raise StageError(
            f"no space left on {folder}: about {needed_bytes / 1e9:.1f} GB are needed for {what} and "
            f"{free / 1e9:.1f} GB are free; free space there or set workdir= elsewhere"
        )


def copy_atomic(source: Path, dest: Path) -> None:
    """Copy so that readers (and a server running the old file) see the old file or the new one,
    never a half-written one: a temporary copy beside ``dest``, then a rename."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.copy2(source, tmp)
    os.replace(tmp, dest)


def read_json(path: Path) -> Any:
    with path.open() as handle:
        return json.load(handle)


def list_files(folder: Path) -> dict[str, int]:
    """Relative path -> size of every regular file below ``folder`` (manifest excluded)."""
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            files[path.relative_to(folder).as_posix()] = path.stat().st_size
    return files


@dataclass(frozen=True)
class StageDirs:
    """The three paths that belong to one fingerprint of one stage."""

    root: Path  # <workdir>/<stage>
    fingerprint: str

    @property
    def final(self) -> Path:
        return self.root / self.fingerprint

    @property
    def partial(self) -> Path:
        return self.root / f".{self.fingerprint}.partial"

    @property
    def lock(self) -> Path:
        return self.root / f".{self.fingerprint}.lock"

    def manifest(self) -> dict[str, Any] | None:
        """The manifest of a finished, intact result; None if there is none or files are missing."""
        path = self.final / MANIFEST
        try:
            manifest = read_json(path)
        except (OSError, ValueError):
            return None
        expected = manifest.get("files", {})
        for rel, size in expected.items():
            file = self.final / rel
            if not file.is_file() or file.stat().st_size != size:
                log.warning("%s: cached artifact %s is missing or changed; redoing the stage", self.final, rel)
                return None
        return manifest

    def is_done(self) -> bool:
        return self.manifest() is not None

    def start(self) -> Path:
        """A clean partial folder to write into (whatever a killed run left is removed)."""
        self.root.mkdir(parents=True, exist_ok=True)
        if self.partial.exists():
            proc.reap_recorded(self.partial)  # a builder or server a killed run left writing here
            log.info("removing unfinished output of an earlier run: %s", self.partial)
            shutil.rmtree(self.partial)
        self.partial.mkdir()
        return self.partial

    def commit(self, manifest: dict[str, Any]) -> Path:
        """Seal the partial folder with its manifest (written last) and rename it into place."""
        manifest = {**manifest, "files": list_files(self.partial)}
        write_json_atomic(self.partial / MANIFEST, manifest)
        if self.final.exists():  # an earlier result that failed its integrity check, or force=true
            trash = self.root / f".{self.fingerprint}.old-{os.getpid()}"
            os.replace(self.final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(self.partial, self.final)
        _fsync_dir(self.root)
        return self.final


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Exclusive lock on ``path`` for the duration, so two builds of the same artifact never
    write it at once (the second waits, then finds it done). The kernel drops the lock if the
    holder is killed, so a stale lock never blocks."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another process is producing %s; waiting for it", path.stem.lstrip("."))
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _size_gb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and not f.is_symlink()) / 1e9


def remove_stale(workdir: Path, stage_names: Sequence[str]) -> list[Path]:
    """Remove the unfinished (``.<fp>.partial``) and replaced (``.<fp>.old-<pid>``) folders that
    killed or failed runs left, whatever their settings, unless a running build holds their lock:
    a changed setting must not strand gigabytes. Returns what was removed."""
    removed = []
    for name in stage_names:
        root = workdir / name
        if not root.is_dir():
            continue
        for folder in sorted(root.glob(".*.partial")) + sorted(root.glob(".*.old-*")):
            fingerprint = folder.name[1:].split(".")[0]
            with (root / f".{fingerprint}.lock").open("a+") as handle:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # another build is writing it
                try:
                    proc.reap_recorded(folder)
                    size = _size_gb(folder)
                    shutil.rmtree(folder, ignore_errors=True)
                    log.info("removed %s, left by an earlier run (%.2f GB)", folder, size)
                    removed.append(folder)
                finally:
                    fcntl.flock(handle, fcntl.LOCK_UN)
    return removed


def link_or_copy(source: Path, target: Path) -> None:
    """Hard-link a file (instant, no extra disk) and copy only across file systems."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


@dataclass(frozen=True)
class StageWorkspace:
    """What a running stage sees: the folder it writes to and the finished folders of the stages
    before it, by name."""

    out: Path
    inputs: dict[str, Path]
    workdir: Path

    def input(self, stage: str) -> Path:
        return self.inputs[stage]


class Stage(Protocol):
    """A stage is a module with these names (see ``pipeline/stages``); optional ones are
    ``preflight``, ``verify``, ``command``, ``ALWAYS_RUN`` and ``KEEP_ON_ERROR`` (see ``runner``)."""

    NAME: str
    VERSION: int  # bump when the stage's output changes for the same inputs
    TOOLS: tuple[str, ...]  # Python distributions whose versions shape the output

    def depends_on(self, cfg: PipelineConfig) -> dict[str, Any]: ...

    def run(self, cfg: PipelineConfig, ws: StageWorkspace) -> dict[str, Any]: ...
