"""fetch from a local folder, through the real command line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import cli

pytestmark = pytest.mark.slow  # a subprocess per case: make test runs them, make test-fast does not


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _build(workdir: Path, folder: Path, *extra: str):
    overrides = [f"workdir={workdir}", "until=fetch", "model=local", f"model.path={folder}", "tracking=none"]
    return cli("build", *overrides, *extra)


def test_local_checkpoint_is_linked_and_refetched_when_it_changes(tiny_checkpoint: Path, tmp_path: Path) -> None:
    folder = _copy(tiny_checkpoint, tmp_path / "model")
    (folder / "notes.md").write_text("not part of a checkpoint")
    first = _build(tmp_path / "work", folder)
    assert first.returncode == 0, first.stderr
    (checkpoint,) = (tmp_path / "work" / "fetch").glob("*/checkpoint")
    assert sorted(p.name for p in checkpoint.iterdir()) == sorted(p.name for p in tiny_checkpoint.iterdir())
    assert (checkpoint / "model.safetensors").samefile(folder / "model.safetensors") or (
        checkpoint / "model.safetensors"
    ).read_bytes() == (folder / "model.safetensors").read_bytes()

    assert "cached" in _build(tmp_path / "work", folder).stdout
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").unlink()  # break the hard link before editing
    (folder / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-5}))
    changed = _build(tmp_path / "work", folder)
    assert changed.returncode == 0 and "cached" not in changed.stdout
    assert len(list((tmp_path / "work" / "fetch").glob("*/manifest.json"))) == 2


def test_declared_architecture_must_match_the_checkpoint(tiny_checkpoint: Path, tmp_path: Path) -> None:
    result = _build(tmp_path / "work", tiny_checkpoint, "model.arch.num_hidden_layers=3")
    assert result.returncode == 1
    assert "model.arch.num_hidden_layers=3 but the checkpoint has 2" in result.stderr


def test_unsafe_or_incomplete_folders_are_refused(tiny_checkpoint: Path, tmp_path: Path) -> None:
    pickled = _copy(tiny_checkpoint, tmp_path / "pickled")
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    assert "model.allow_pickle=true" in _build(tmp_path / "w1", pickled).stderr

    no_tokenizer = _copy(tiny_checkpoint, tmp_path / "no_tok")
    for path in no_tokenizer.glob("tokenizer*"):
        path.unlink()
    assert "no tokenizer files" in _build(tmp_path / "w2", no_tokenizer).stderr

    custom = _copy(tiny_checkpoint, tmp_path / "custom")
    config = json.loads((custom / "config.json").read_text())
    (custom / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModel": "x.Y"}}))
    assert "model.trust_remote_code=true" in _build(tmp_path / "w3", custom).stderr
