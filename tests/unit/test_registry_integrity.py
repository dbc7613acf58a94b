"""The registry hands over only what was built, against a real MLflow store (SQLite, local
artifacts): a version's files are checked against the manifest registered with it, after the
download and again before a copy on disk is served; a copy pulled before is served while the
tracking server is down; two pulls of one version at once do not tear each other."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

from pipeline import validate
from pipeline.errors import ConfigError, StageError
from pipeline.tracking import registry

NAME = "tiny-integrity"


@pytest.fixture
def registered(tmp_path: Path) -> tuple[str, Path]:
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("e", artifact_location=(tmp_path / "artifacts").as_uri())
    run = client.create_run(experiment)
    repository = tmp_path / "repository"
    (repository / "preprocessing" / "1").mkdir(parents=True)
    (repository / "repository.json").write_text(json.dumps({"models": ["preprocessing"]}))
    (repository / "preprocessing" / "1" / "model.py").write_text("print('the model as built')\n")
    cfg = validate.load(["target=cpu", f"tracking.registered_model={NAME}"])
    version = registry.register(client, run.info.run_id, cfg, repository, "fp-1", {})
    client.set_registered_model_alias(NAME, "production", version)
    return uri, tmp_path


def test_a_pulled_version_is_its_registered_files_and_a_changed_copy_is_refused(registered: tuple[str, Path]) -> None:
    uri, tmp = registered
    into = tmp / "pulled"
    served = registry.download(f"models:/{NAME}@production", uri, into)
    assert (served / "preprocessing" / "1" / "model.py").read_text() == "print('the model as built')\n"
    (served / "preprocessing" / "1" / "model.py").write_text("import os; os.system('evil')\n")
    with pytest.raises(StageError, match=r"does not match its registered manifest.*model.py differs"):
        registry.download(f"models:/{NAME}@production", uri, into)  # checked again before it is served
    (served / "preprocessing" / "1" / "model.py").unlink()
    (served / "preprocessing" / "1" / "model.py").symlink_to("/etc/hostname")
    with pytest.raises(StageError, match="symbolic link"):
        registry.download(f"models:/{NAME}/1", uri, into)


def test_a_version_changed_in_the_artifact_store_is_refused_at_download(registered: tuple[str, Path]) -> None:
    uri, tmp = registered
    (stored,) = (tmp / "artifacts").rglob("triton_repository/preprocessing/1/model.py")
    stored.write_text("print('changed after registration')\n")
    with pytest.raises(StageError, match=r"model\.py differs"):
        registry.download(f"models:/{NAME}@production", uri, tmp / "pulled")
    assert not list((tmp / "pulled" / NAME).glob("1")), "a refused download must not be left in place"


def test_a_pulled_version_is_served_while_the_tracking_server_is_down(registered: tuple[str, Path]) -> None:
    uri, tmp = registered
    into = tmp / "pulled"
    down = "http://127.0.0.1:9"  # nothing answers there
    with pytest.raises(StageError, match="never pulled here"):
        registry.download(f"models:/{NAME}@production", down, into)
    pulled = registry.download(f"models:/{NAME}@production", uri, into)
    assert registry.download(f"models:/{NAME}@production", down, into) == pulled
    assert registry.download(f"models:/{NAME}/1", down, into) == pulled


def test_two_pulls_of_one_version_at_once_both_get_it_whole(registered: tuple[str, Path]) -> None:
    uri, tmp = registered
    results: list[Any] = []

    def pull() -> None:
        try:
            results.append(registry.download(f"models:/{NAME}/1", uri, tmp / "pulled"))
        except Exception as error:
            results.append(error)

    threads = [threading.Thread(target=pull) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({str(r) for r in results}) == 1 and isinstance(results[0], Path), results


@pytest.mark.parametrize(
    "uri", ["models:/../../etc@production", "models:/m/../../1", "models:/m@al/ias", "runs:/x/y", "models:/m/v1"]
)
def test_hostile_model_uris_are_refused_before_anything_is_asked(uri: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        registry.download(uri, "http://127.0.0.1:9", tmp_path)


def test_promote_refuses_a_version_that_failed_the_accuracy_gate_unless_forced(registered: tuple[str, Path]) -> None:
    import mlflow

    uri, _ = registered
    client = mlflow.MlflowClient(uri)
    gate = {"verdict": "fail", "tasks": [{"task": "pipeline_capitals", "delta": -0.2, "ci_low": -0.3, "ci_high": -0.1}]}
    registry.tag_gate(client, NAME, "1", gate)
    with pytest.raises(
        ConfigError, match=r"failed the accuracy gate \(pipeline_capitals -0.2000 \[-0.3000, -0.1000\]\)"
    ):
        registry.promote(client, NAME, "canary", version="1")
    assert registry.promote(client, NAME, "canary", version="1", force=True) == "1"
    assert client.get_model_version(NAME, "1").tags["accuracy_gate.forced"] == "canary by force=true"
    registry.tag_gate(client, NAME, "1", {"verdict": "pass", "tasks": []})
    assert registry.promote(client, NAME, "stable", version="1") == "1"  # a pass needs no force
