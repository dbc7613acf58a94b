"""The JSONL files users hand the pipeline (benchmark prompts, calibration text), read and checked
line by line, so a bad line is refused at validation, before any download, naming the file and the
line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError

MAX_TOKENS_LIMIT = 1_000_000  # far beyond any context; stops "1e12" before it reaches an int32


def jsonl_rows(path: Path, setting: str, text_keys: tuple[str, ...] = ("text",)) -> list[dict[str, Any]]:
    """Every non-empty line of ``path`` as an object holding a non-empty string under one of
    ``text_keys`` and, if present, a positive integer ``max_tokens``. ``setting`` names the key
    that gave the file, for the error."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{setting}={path} cannot be read: {error}") from error
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{setting}={path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ConfigError(f"{where} is not JSON ({error.msg}): one JSON object per line") from error
        if not isinstance(row, dict):
            raise ConfigError(f"{where} is not a JSON object: one object per line")
        text = next((row[k] for k in text_keys if k in row), None)
        if not isinstance(text, str) or not text:
            raise ConfigError(f"{where} has no {' or '.join(repr(k) for k in text_keys)} string")
        limit = row.get("max_tokens")
        if limit is not None and (
            isinstance(limit, bool) or not isinstance(limit, int) or not 0 < limit <= MAX_TOKENS_LIMIT
        ):
            raise ConfigError(f"{where}: max_tokens={limit!r} must be a whole number in 1..{MAX_TOKENS_LIMIT}")
        rows.append(row)
    if not rows:
        raise ConfigError(f"{setting}={path} holds no lines")
    return rows
