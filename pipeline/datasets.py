"""What a stage read as data (the calibration text, the held-out text, the benchmark's prompts),
described the same way everywhere: recorded in the stage's results and logged by the tracking
as the run's MLflow dataset inputs, so two runs fed other data differ visibly in the UI."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Any


def described(context: str, name: str, source: str, rows: Iterable[Sequence[int] | str]) -> dict[str, Any]:
    """``rows``: what was used, token ids or texts, in order; the digest is over exactly that."""
    digest = hashlib.sha256()
    count = tokens = 0
    for row in rows:
        digest.update((row if isinstance(row, str) else ",".join(map(str, row))).encode())
        digest.update(b"\n")
        count += 1
        tokens += len(row) if not isinstance(row, str) else 0
    record: dict[str, Any] = {"context": context, "name": name, "source": source, "digest": digest.hexdigest()[:16]}
    record["rows"] = count
    if tokens:
        record["tokens"] = tokens
    return record
