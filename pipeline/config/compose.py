"""Hydra composition: the schemas go into Hydra's ConfigStore, ``conf/config.yaml`` is composed with
the command line's overrides into a typed config, and Hydra's and OmegaConf's multi-line complaints
become one line that names the problem and the fix (valid choices, the closest known key, how to
sweep)."""

from __future__ import annotations

import difflib
import itertools
import re
from collections.abc import Sequence

from omegaconf import DictConfig, OmegaConf

from pipeline.assets import CONF_DIR
from pipeline.config import schema
from pipeline.config.schema import PipelineConfig
from pipeline.errors import ConfigError

SCHEMA_SUFFIX = "_schema"  # ConfigStore entries that YAML files extend; never a user choice


def register() -> None:
    """Put the schemas in Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(name="pipeline" + SCHEMA_SUFFIX, node=PipelineConfig)
    store.store(group="model", name="model" + SCHEMA_SUFFIX, node=schema.ModelConfig)
    store.store(group="quant", name="quant" + SCHEMA_SUFFIX, node=schema.QuantConfig)
    store.store(group="target", name="target" + SCHEMA_SUFFIX, node=schema.TargetConfig)
    store.store(group="build", name="build" + SCHEMA_SUFFIX, node=schema.BuildConfig)
    store.store(group="triton", name="triton" + SCHEMA_SUFFIX, node=schema.TritonConfig)
    store.store(group="benchmark", name="benchmark" + SCHEMA_SUFFIX, node=schema.BenchmarkConfig)
    store.store(group="tracking", name="tracking" + SCHEMA_SUFFIX, node=schema.TrackingConfig)
    store.store(group="eval", name="eval" + SCHEMA_SUFFIX, node=schema.EvalConfig)


def group_options(group: str) -> list[str]:
    """The choices a user can type for a config group (the YAML files of ``conf/<group>/``)."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def groups() -> list[str]:
    return sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir())


def compose(overrides: Sequence[str]) -> DictConfig:
    """Compose ``conf/config.yaml`` with overrides; any Hydra/OmegaConf complaint becomes one line."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    for override in overrides:
        if override.startswith(("+", "~")):
            raise ConfigError(
                f"'{override}': adding or deleting config keys is not supported; set a known key "
                "(python -m pipeline build --help lists them)"
            )
    register()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return hydra_compose(config_name="config", overrides=list(overrides))
    except Exception as error:  # Hydra raises several unrelated types; all mean "bad override"
        raise ConfigError(describe(error, overrides)) from error


def to_typed(cfg: DictConfig) -> PipelineConfig:
    typed = OmegaConf.to_object(cfg)
    assert isinstance(typed, PipelineConfig)
    return typed


def typed(overrides: Sequence[str] = ()) -> PipelineConfig:
    """Overrides -> typed config, unchecked (``pipeline.validate.load`` checks it)."""
    return to_typed(compose(overrides))


def _chain(error: BaseException) -> list[BaseException]:
    chain = [error]
    while chain[-1].__cause__ is not None:
        chain.append(chain[-1].__cause__)
    return chain


def _default_config() -> DictConfig | None:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return hydra_compose(config_name="config")
    except Exception:  # the defaults themselves are broken: say nothing more than the error
        return None


# keys that moved: the old name is refused with the new one
MOVED = {
    **{f"benchmark.{name}": f"workload.{name}" for name in (
        "input_tokens", "input_tokens_stddev", "output_tokens", "output_tokens_stddev", "prompts_file")},
    **{f"benchmark.slo.{name}": f"slo.{name}_p99" for name in ("ttft_ms", "itl_ms", "e2e_ms")},
}  # fmt: skip


def unknown_key(key: str) -> str:
    """One line for a key the config does not have, with the nearest valid key."""
    if key in MOVED:
        return f"unknown config key '{key}': it is {MOVED[key]} now (one setting for plan, benchmark and tune)"
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


def expand_sweep(overrides: Sequence[str]) -> list[list[str]]:
    """Hydra's sweep syntax (``a=1,2``, ``range()``, ``choice()``) -> one override list per job."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except Exception as error:
        raise ConfigError(describe(error, overrides)) from error
    choices = []
    for override in parsed:
        key = override.get_key_element()
        if override.is_sweep_override():
            choices.append([f"{key}={value}" for value in override.sweep_string_iterator()])
        else:
            choices.append([override.input_line or f"{key}={override.get_value_element_as_str()}"])
    return [list(job) for job in itertools.product(*choices)]
