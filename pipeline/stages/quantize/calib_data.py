"""Calibration and evaluation text, turned into token windows.

Datasets: ``builtin`` (our own text in ``pipeline/data/calibration.txt``: no network), a local
``.txt`` file (paragraphs split on blank lines) or ``.jsonl`` file (a ``text`` field per line), or
``cnn_dailymail`` (NVIDIA's default, through the ``datasets`` package). Evaluation always uses
``pipeline/data/heldout.txt``, text that no calibration set contains.

Sizes come from ``pipeline.sizing.calibration``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline import datasets, textfiles
from pipeline.assets import CALIBRATION_TEXT, HELDOUT_TEXT
from pipeline.errors import ConfigError
from pipeline.sizing.calibration import BUILTIN, CalibrationSizes

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def _paragraphs(text: str) -> list[str]:
    return [p.strip() for p in text.split("\n\n") if p.strip()]


def load_texts(dataset: str, limit: int) -> list[str]:
    if dataset == BUILTIN:
        return _paragraphs(CALIBRATION_TEXT.read_text())
    path = Path(dataset).expanduser()
    if path.suffix in (".txt", ".jsonl"):
        if not path.is_file():
            raise ConfigError(f"quant.calib.dataset={dataset} is not a file: give a .txt or .jsonl file")
        if path.suffix == ".txt":
            return _paragraphs(path.read_text())
        return [row["text"] for row in textfiles.jsonl_rows(path, "quant.calib.dataset")]
    if dataset == "cnn_dailymail":
        return _cnn_dailymail(limit)
    raise ConfigError(f"quant.calib.dataset={dataset}: use builtin, cnn_dailymail, or a .txt/.jsonl file")


def _cnn_dailymail(limit: int) -> list[str]:
    fix = "set quant.calib.dataset=builtin or quant.calib.dataset=/path/to/text.txt (or .jsonl with a text field)"
    try:
        import datasets
    except ImportError as error:
        raise ConfigError(
            f"calibrating on cnn_dailymail needs the `datasets` package: pip install datasets, or {fix}"
        ) from error
    try:
        rows = datasets.load_dataset("abisee/cnn_dailymail", "3.0.0", split=f"train[:{limit}]")
    except Exception as error:  # network, auth or cache problems all mean the same to the user
        raise ConfigError(f"cannot load cnn_dailymail ({type(error).__name__}): {fix}") from error
    return [row["article"] for row in rows]


def source_of(dataset: str) -> str:
    """Where calibration text comes from, as the run's dataset input names it."""
    if dataset == BUILTIN:
        return f"pipeline/data/{CALIBRATION_TEXT.name}"  # shipped with the package
    if dataset == "cnn_dailymail":
        return "hf://datasets/abisee/cnn_dailymail@3.0.0"
    return str(Path(dataset).expanduser().resolve())


def described(context: str, dataset: str, source: str, rows: list[torch.Tensor]) -> dict[str, object]:
    """The batches as the run's dataset input (the digest is over the token ids used)."""
    return datasets.described(context, dataset, source, (row for batch in rows for row in batch.tolist()))


def windows(token_ids: list[int], count: int, length: int) -> list[list[int]]:
    """``count`` windows of ``length`` tokens spread evenly over the text. When the text is short,
    windows overlap, so a small built-in text still yields the requested number of samples."""
    if len(token_ids) <= length:
        return [token_ids] if token_ids else []
    last_start = len(token_ids) - length
    if count == 1:
        return [token_ids[:length]]
    starts = sorted({round(i * last_start / (count - 1)) for i in range(count)})
    return [token_ids[s : s + length] for s in starts]


def token_windows(tokenizer: object, texts: list[str], count: int, length: int) -> list[list[int]]:
    eos = getattr(tokenizer, "eos_token", None) or "\n\n"
    ids = tokenizer(eos.join(texts), add_special_tokens=False)["input_ids"]  # type: ignore[operator]
    return windows(ids, count, length)


def batches(rows: list[list[int]], batch_size: int) -> list[torch.Tensor]:
    """Equal-length windows stacked into batches (windows from one text all have one length)."""
    import torch

    by_length: dict[int, list[list[int]]] = {}
    for row in rows:
        by_length.setdefault(len(row), []).append(row)
    out = []
    for group in by_length.values():
        for start in range(0, len(group), batch_size):
            out.append(torch.tensor(group[start : start + batch_size], dtype=torch.long))
    return out


def calibration_batches(tokenizer: object, calib: CalibrationSizes) -> list[torch.Tensor]:
    texts = load_texts(calib.dataset, calib.num_samples)
    rows = token_windows(tokenizer, texts, calib.num_samples, calib.max_length)
    if not rows:
        raise ConfigError(f"quant.calib.dataset={calib.dataset} holds no text")
    log.info("calibration: %d samples of up to %d tokens from %s", len(rows), calib.max_length, calib.dataset)
    return batches(rows, calib.batch_size)


def heldout_batches(tokenizer: object, tokens: int, length: int = 256) -> list[torch.Tensor]:
    """About ``tokens`` tokens of held-out text, in non-overlapping windows."""
    ids = tokenizer(HELDOUT_TEXT.read_text(), add_special_tokens=False)["input_ids"]  # type: ignore[operator]
    length = min(length, tokens, len(ids))
    rows = [ids[s : s + length] for s in range(0, min(tokens, len(ids)) - length + 1, length)]
    return batches(rows, 1)
