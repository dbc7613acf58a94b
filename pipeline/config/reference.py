"""The configuration reference, generated from the schema so that it cannot drift from it: every
key with its type, default and the comment the schema gives it, and the presets of each config
group under ``conf/``. The docs site builds its page from ``markdown()`` (docs/gen_reference.py).
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import tokenize
import typing
from enum import Enum
from pathlib import Path
from typing import Any

from pipeline.config import schema

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
GROUPS = ("model", "quant", "target", "build", "triton", "benchmark", "tracking")


def field_comments(cls: type) -> dict[str, str]:
    """The comment of each field of a dataclass: the one on its line, or the lines just above it."""
    source = inspect.getsource(cls)
    comments: dict[str, str] = {}
    above: list[str] = []
    names = {f.name for f in dataclasses.fields(cls)}
    lines = source.splitlines()
    for row, line in enumerate(lines):
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("# "))
            continue
        name = stripped.split(":", 1)[0].strip()
        if name in names and ":" in stripped:
            trailing = _trailing_comment(lines[row])
            comments[name] = " ".join([*above, *([trailing] if trailing else [])])
        above = []
    return comments


def _trailing_comment(line: str) -> str | None:
    try:
        for token in tokenize.generate_tokens(io.StringIO(line.strip() + "\n").readline):
            if token.type == tokenize.COMMENT:
                return token.string.lstrip("# ")
    except (tokenize.TokenError, IndentationError):
        return None
    return None


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return " \\| ".join(str(member.value) for member in annotation)
    text = getattr(annotation, "__name__", None) if isinstance(annotation, type) else None
    return text or str(annotation).replace("typing.", "").replace("|", "\\|")


def _default(item: dataclasses.Field[Any]) -> str:
    if item.default is not dataclasses.MISSING:
        value = item.default
    elif item.default_factory is not dataclasses.MISSING:
        value = item.default_factory()
    else:
        return "(required)"
    if value == "???":  # OmegaConf's MISSING: the group's preset sets it
        return "(set by the preset)"
    if isinstance(value, Enum):
        value = value.value
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return f"`{value}`" if value != "" else '`""`'


def _rows(cls: type, prefix: str) -> tuple[list[str], list[tuple[str, type]]]:
    """The table rows of a config class, and the nested config classes under it."""
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    rows, nested = [], []
    for item in dataclasses.fields(cls):
        annotation = hints[item.name]
        key = f"{prefix}{item.name}"
        if dataclasses.is_dataclass(annotation):
            nested.append((key, typing.cast(type, annotation)))
            continue
        comment = comments.get(item.name, "").replace("|", "\\|")
        rows.append(f"| `{key}` | {_type_name(annotation)} | {_default(item)} | {comment} |")
    return rows, nested


def _section(title: str, cls: type, prefix: str) -> list[str]:
    rows, nested = _rows(cls, prefix)
    doc = inspect.getdoc(cls) or ""
    out = [f"## `{title}`", ""]
    if doc and not doc.startswith(cls.__name__ + "("):  # dataclasses write a signature when undocumented
        out += [" ".join(doc.split()), ""]
    group = title if title in GROUPS else None
    if group:
        presets = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
        out += [f"Presets: {', '.join(f'`{group}={p}`' for p in presets)}.", ""]
    if rows:
        out += ["| key | type | default | what it does |", "|---|---|---|---|", *rows, ""]
    for key, child in nested:
        out += _section(key, child, f"{key}.")
    return out


def markdown() -> str:
    """The whole reference page."""
    top_rows, nested = _rows(schema.PipelineConfig, "")
    lines = [
        "# Configuration reference",
        "",
        "Generated from `pipeline/config/schema.py` when the site is built: every key, its type, its",
        "default and what it does. Set any of them on the command line (`key=value`), choose a preset",
        "of a group (`quant=fp8`), or see the resolved whole with `python -m pipeline plan`.",
        "",
        "## Top level",
        "",
        "| key | type | default | what it does |",
        "|---|---|---|---|",
        *top_rows,
        "",
    ]
    for key, cls in nested:
        lines += _section(key, cls, f"{key}.")
    return "\n".join(lines).rstrip() + "\n"
