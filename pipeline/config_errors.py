"""Turn Hydra's and OmegaConf's multi-line complaints about overrides into one line that names the
problem and the fix (valid choices, the closest known key, how to sweep)."""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence

from omegaconf import DictConfig


def _chain(error: BaseException) -> list[BaseException]:
    chain = [error]
    while chain[-1].__cause__ is not None:
        chain.append(chain[-1].__cause__)
    return chain


def _default_config() -> DictConfig | None:
    from hydra import compose, initialize_config_dir

    from pipeline.config import CONF_DIR

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name="config")
    except Exception:  # the defaults themselves are broken: say nothing more than the error
        return None


def unknown_key(key: str) -> str:
    """One line for a key the config does not have, with the nearest valid key."""
    node = _default_config()
    parts = key.split(".")
    walked: list[str] = []
    for part in parts[:-1]:
        if not isinstance(node, DictConfig) or part not in node:
            break
        node = node[part]
        walked.append(part)
    missing = parts[len(walked)]
    prefix = ".".join(walked)
    if not isinstance(node, DictConfig):
        return f"unknown config key '{key}': '{prefix}' has no sub-keys"
    keys = sorted(str(k) for k in node)
    where = f"under '{prefix}'" if prefix else "at the top level"
    guess = difflib.get_close_matches(missing, keys, n=1)
    hint = f"did you mean '{'.'.join([*walked, guess[0]])}'? " if guess else ""
    return f"unknown config key '{key}': {hint}valid keys {where}: {', '.join(keys)}"


def describe(error: BaseException, overrides: Sequence[str]) -> str:
    from pipeline.config import SCHEMA_SUFFIX, group_options

    chain = _chain(error)
    text = "\n".join(str(e) for e in chain)  # outer messages name the override, inner ones the cause
    innermost = str(chain[-1]) or type(chain[-1]).__name__
    first = innermost.splitlines()[0]

    if found := re.search(r"Could not find '([^/']+)/([^']+)'", text):
        group, name = found.groups()
        options = [o for o in group_options(group) if not o.endswith(SCHEMA_SUFFIX)]
        return f"unknown {group} '{name}': valid choices are {group}={'|'.join(options)}"
    if found := re.search(r"Could not override '([^']+)'", text):
        return unknown_key(found.group(1))
    if found := re.search(r"Ambiguous value for argument '([^']+)'", text):
        arg = found.group(1)
        return f"'{arg}' lists several values: add -m to run one job per value, or write [a,b] for a list"
    if found := re.search(r"Error parsing override '([^']*)'", text):
        return f"cannot read override '{found.group(1)}': write key=value, e.g. model=llama8b parallel.tp=2"
    if found := re.search(r"full_key: (\S+)", innermost):
        return f"{found.group(1)}: {first}"
    return first
