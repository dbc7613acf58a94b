"""Downloads from the Hugging Face Hub (or any server that speaks its API, via ``HF_ENDPOINT``).

The revision is resolved to a commit sha first, by one metadata call with a short timeout, so an
unreachable Hub, a missing or gated repository, or pickle-only weights are reported in seconds
before any byte is downloaded. Files then go to the Hugging Face cache (``HF_HOME`` respected),
which resumes partial downloads on the next run. The token comes from ``HF_TOKEN`` and is read by
huggingface_hub itself; it is never passed through our config, logs or files.
"""

from __future__ import annotations

import fnmatch
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import FetchError
from pipeline.workspace import no_space, require_space

log = logging.getLogger(__name__)

# how long a metadata call to the Hub may take; PIPELINE_HUB_TIMEOUT_S raises it behind a slow proxy
METADATA_TIMEOUT_S = float(os.environ.get("PIPELINE_HUB_TIMEOUT_S", "10"))
# Everything a checkpoint needs besides weights: configs, tokenizers (fast, sentencepiece,
# tiktoken, BPE vocab/merges) and chat templates.
SUPPORT_PATTERNS = ("*.json", "tokenizer*", "*.model", "*.tiktoken", "*.txt", "*.jinja")
SAFE_WEIGHTS = ("*.safetensors",)
PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt")
CODE_PATTERNS = ("*.py",)
# Meta's repositories carry a second copy of the weights in their own format.
IGNORE_PATTERNS = ("original/*", "*/original/*")


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatch(name, p) for p in patterns)


def select_files(files: list[str], allow_pickle: bool, trust_remote_code: bool, where: str) -> list[str]:
    """The files of a checkpoint to take; refuses pickle-only weights unless allowed."""
    files = [f for f in files if not matches(f, IGNORE_PATTERNS)]
    patterns = SUPPORT_PATTERNS + SAFE_WEIGHTS + (CODE_PATTERNS if trust_remote_code else ())
    if not any(matches(f, SAFE_WEIGHTS) for f in files):
        if not any(matches(f, PICKLE_WEIGHTS) for f in files):
            raise FetchError(f"{where} has no weights (*.safetensors): check the model source")
        if not allow_pickle:
            raise FetchError(
                f"{where} has only pickle weights (*.bin), which can run code when loaded: "
                "set model.allow_pickle=true only if you trust it"
            )
        patterns += PICKLE_WEIGHTS
    return sorted(f for f in files if matches(f, patterns))


@dataclass(frozen=True)
class Snapshot:
    folder: Path  # the snapshot folder in the Hugging Face cache
    sha: str
    files: list[str]


def _network_reason(error: Exception) -> str:
    """The few words that matter from a deeply nested transport error."""
    text = str(error).lower()
    for needle, reason in (
        ("name or service not known", "name lookup failed"),
        ("failed to resolve", "name lookup failed"),
        ("temporary failure in name resolution", "name lookup failed"),
        ("connection refused", "connection refused"),
        ("timed out", "timed out"),
        ("timeout", "timed out"),
        ("network is unreachable", "network unreachable"),
        ("certificate", "TLS certificate problem"),
    ):
        if needle in text:
            return reason
    return type(error).__name__


def _hub_error(error: Exception, repo_id: str, revision: str, key: str = "model") -> FetchError:
    """One actionable line for anything the Hub or the network can throw at us (``key``: the
    config that names the repository, for the fix)."""
    from huggingface_hub import errors as hf_errors

    url = f"{endpoint()}/{repo_id}"
    full = no_space(error)
    if full is not None:  # a full disk is not a network problem
        return FetchError(str(full))
    if isinstance(error, hf_errors.GatedRepoError):
        return FetchError(
            f"{repo_id} is gated: accept its licence at {url} and set HF_TOKEN to a token that has access"
        )
    if isinstance(error, hf_errors.RevisionNotFoundError):
        return FetchError(
            f"revision '{revision}' not found in {repo_id}: set {key}.revision to a branch, tag or commit of it"
        )
    if isinstance(error, hf_errors.RepositoryNotFoundError):
        return FetchError(
            f"{repo_id} not found on {endpoint()} (or private without a valid HF_TOKEN): "
            f"check {key}.{'repo_id' if key == 'model' else 'source'}, or set HF_TOKEN"
        )
    if isinstance(error, hf_errors.HfHubHTTPError):
        status = getattr(getattr(error, "response", None), "status_code", "?")
        if status in (401, 403):
            return FetchError(
                f"{endpoint()} refused access to {repo_id} (HTTP {status}): set HF_TOKEN to a token with access"
            )
        return FetchError(f"{endpoint()} answered HTTP {status} for {repo_id}: try again later")
    return FetchError(
        f"cannot reach the Hugging Face Hub at {endpoint()} ({_network_reason(error)}): check the network or "
        "HF_ENDPOINT, or download the model elsewhere and use model.source=local model.path=<folder>"
    )


def resolve(
    repo_id: str, revision: str, allow_pickle: bool, trust_remote_code: bool
) -> tuple[str, list[str], dict[str, int]]:
    """Revision -> (commit sha, files to download, their sizes in bytes where the Hub gives them),
    in one short metadata call."""
    from huggingface_hub import HfApi, get_token

    try:
        info = HfApi().model_info(repo_id, revision=revision, timeout=METADATA_TIMEOUT_S, files_metadata=True)
    except Exception as error:
        raise _hub_error(error, repo_id, revision) from error
    if not info.sha:
        raise FetchError(f"{endpoint()} gave no commit for {repo_id}@{revision}: try again later")
    if info.gated and not get_token():  # HF_TOKEN, or a token saved by `hf auth login`
        raise FetchError(f"{repo_id} is gated: accept its licence at {endpoint()}/{repo_id} and set HF_TOKEN")
    names = [s.rfilename for s in info.siblings or []]
    sizes = {s.rfilename: s.size for s in info.siblings or [] if s.size is not None}
    return info.sha, select_files(names, allow_pickle, trust_remote_code, f"{repo_id}@{info.sha[:12]}"), sizes


def read_config(repo_id: str, revision: str) -> dict[str, Any]:
    """The repository's config.json alone (a few kB), at the resolved commit, so the architecture
    can be checked before any weights are downloaded. It lands in the Hugging Face cache, where the
    download reuses it."""
    import json

    from huggingface_hub import hf_hub_download

    sha, files, _ = resolve(repo_id, revision, allow_pickle=True, trust_remote_code=False)
    if "config.json" not in files:
        raise FetchError(f"{repo_id}@{sha[:12]} has no config.json: it is not a Hugging Face checkpoint")
    try:
        path = hf_hub_download(repo_id, "config.json", revision=sha, etag_timeout=METADATA_TIMEOUT_S)
    except Exception as error:
        raise _hub_error(error, repo_id, revision) from error
    config: dict[str, Any] = json.loads(Path(path).read_text())
    return config


def _require_space_for(repo_id: str, sha: str, files: list[str], sizes: dict[str, int]) -> None:
    """Refuse a download the Hugging Face cache's disk cannot hold (files already there count
    for nothing: a resumed fetch needs only the rest)."""
    from huggingface_hub import constants, try_to_load_from_cache

    missing = [name for name in files if not isinstance(try_to_load_from_cache(repo_id, name, revision=sha), str)]
    needed = sum(sizes.get(name, 0) for name in missing)
    require_space(Path(constants.HF_HUB_CACHE), needed, f"the download of {repo_id}")


def download(repo_id: str, revision: str, allow_pickle: bool = False, trust_remote_code: bool = False) -> Snapshot:
    """Download the checkpoint files of ``repo_id`` at ``revision`` into the Hugging Face cache."""
    from huggingface_hub import snapshot_download

    sha, files, sizes = resolve(repo_id, revision, allow_pickle, trust_remote_code)
    log.info("%s@%s resolves to commit %s; fetching %d files", repo_id, revision, sha, len(files))
    _require_space_for(repo_id, sha, files, sizes)
    try:
        folder = snapshot_download(repo_id, revision=sha, allow_patterns=files, etag_timeout=METADATA_TIMEOUT_S)
    except Exception as error:
        raise _hub_error(error, repo_id, revision) from error
    return Snapshot(Path(folder), sha, files)


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")  # a PEFT adapter, as save_pretrained writes it


def download_adapter(repo_id: str, revision: str, key: str) -> Snapshot:
    """A PEFT LoRA adapter's two files at ``revision`` (resolved to a commit sha) into the Hugging
    Face cache: a few MB, fetched before any base weights so that a mismatch is refused first.
    ``key`` names the config entry, for the fix."""
    from huggingface_hub import HfApi, snapshot_download

    try:
        info = HfApi().model_info(repo_id, revision=revision, timeout=METADATA_TIMEOUT_S)
    except Exception as error:
        raise _hub_error(error, repo_id, revision, key) from error
    if not info.sha:
        raise FetchError(f"{endpoint()} gave no commit for {repo_id}@{revision}: try again later")
    names = {s.rfilename for s in info.siblings or []}
    where = f"{key}: {repo_id}@{info.sha[:12]}"
    if ADAPTER_FILES[0] not in names:
        raise FetchError(f"{where} has no {ADAPTER_FILES[0]}: it is not a PEFT adapter (give its repository)")
    if ADAPTER_FILES[1] not in names:
        raise FetchError(
            f"{where} has no {ADAPTER_FILES[1]} (a pickled adapter_model.bin is not loaded: it can run code); "
            "ask for a safetensors export"
        )
    try:
        folder = snapshot_download(repo_id, revision=info.sha, allow_patterns=list(ADAPTER_FILES),
                                   etag_timeout=METADATA_TIMEOUT_S)  # fmt: skip
    except Exception as error:
        raise _hub_error(error, repo_id, revision, key) from error
    log.info("%s: %s@%s resolves to commit %s", key, repo_id, revision, info.sha)
    return Snapshot(Path(folder), info.sha, list(ADAPTER_FILES))
