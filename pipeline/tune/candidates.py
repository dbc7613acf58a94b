"""The candidates ``tune`` considers: every combination of the search space, each checked by the
same rules and memory planner as a build (``validate.validate``) before anything is built, and
the survivors predicted by the performance model (``sizing/perf.py``).

GPU targets: formats the target allows, KV cache dtypes, every valid tp/pp whose world size fits
``target.count`` (the rest of the node's GPUs run replicas), and engine limits around the sized
ones (``tune.batch_scales``). The CPU target: format and the reference runtime's knobs.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field
from typing import Any

from pipeline import validate
from pipeline.config.schema import KVCacheDType, PipelineConfig, QuantFormat
from pipeline.errors import ConfigError
from pipeline.sizing import limits, perf, rules
from pipeline.tracking import metrics

KV_CHOICES = {"none": None, "fp8": KVCacheDType.fp8, "int8": KVCacheDType.int8}


@dataclass
class Candidate:
    """One deployment: the overrides that build it, and what the model predicts of it."""

    overrides: list[str]
    cfg: PipelineConfig
    replicas: int = 1
    dropped: str | None = None  # why it was left out before any build
    prediction: perf.Prediction | None = None
    misses: dict[str, float] = field(default_factory=dict)  # SLO limits its best load breaks (predicted)

    @property
    def key(self) -> str:
        return " ".join(self.overrides)

    @property
    def shape(self) -> tuple[str, ...]:
        """What a trial of it tells about its neighbours: numerics and parallelism."""
        cfg = self.cfg
        return (*self.numerics, str(cfg.parallel.tp), str(cfg.parallel.pp))

    @property
    def numerics(self) -> tuple[str, str]:
        """What the accuracy gate judges: the format and the KV cache dtype."""
        return str(self.cfg.quant.format), str(self.cfg.quant.kv_cache_dtype)

    @property
    def gpus(self) -> int:
        """GPUs the deployment takes (the CPU target: 1, a host)."""
        return max(1, self.cfg.parallel.world_size * self.replicas) if self.cfg.target.is_gpu else 1

    def deployment(self) -> perf.Deployment:
        cfg = self.cfg
        hw = perf.hardware_for(cfg.target)
        assert hw is not None
        return perf.Deployment(
            cfg.model.arch,
            cfg.quant.format,
            cfg.quant.kv_cache_dtype,
            cfg.parallel.tp,
            cfg.parallel.pp,
            hw,
            cfg.build.batch,
            cfg.triton.cpu_max_num_tokens if not cfg.target.is_gpu else cfg.build.tokens,
        )

    def score(self) -> float:
        """What ranks candidates: predicted output tokens/s per GPU at the best load within the
        SLO (0 when none is), the cheapest per token first."""
        if self.prediction is None or self.misses:
            return 0.0
        return self.prediction.tokens_per_s_per_gpu

    def cost_per_million(self) -> float | None:
        """USD per million output tokens at the predicted load, where the target has a price."""
        tokens_per_s = self.prediction.output_tokens_per_s if self.prediction else None
        return metrics.cost_per_million_tokens(self.cfg, tokens_per_s)

    def describe(self) -> dict[str, Any]:
        cfg = self.cfg
        row: dict[str, Any] = {
            "format": str(cfg.quant.format),
            "kv": str(cfg.quant.kv_cache_dtype or "none"),
            "max_batch_size": cfg.build.batch,
        }
        if cfg.target.is_gpu:
            row.update(tp=cfg.parallel.tp, pp=cfg.parallel.pp, replicas=self.replicas, max_num_tokens=cfg.build.tokens)
        else:
            row.update(
                cpu_max_num_tokens=cfg.triton.cpu_max_num_tokens,
                cpu_threads=cfg.triton.cpu_threads,
                chunk=cfg.triton.cpu_context_chunk_tokens,
            )
        return row


def _formats(cfg: PipelineConfig) -> list[QuantFormat]:
    if cfg.tune.formats:
        return [QuantFormat(name) for name in cfg.tune.formats]
    if not cfg.target.is_gpu:
        return [QuantFormat.none, QuantFormat.fp8]
    return list(QuantFormat)


def _kv_dtypes(cfg: PipelineConfig) -> list[KVCacheDType | None]:
    names = cfg.tune.kv_cache_dtypes or (["none", "fp8"] if cfg.target.is_gpu else ["default"])
    if names == ["default"]:  # the CPU target: the format's own KV cache (FP8 for quant=fp8)
        return []
    return [KV_CHOICES[name] for name in names]


def _parallel(cfg: PipelineConfig) -> list[tuple[int, int]]:
    """(tp, pp) pairs whose world size fits one node's GPUs (the CPU target: 1, 1)."""
    if not cfg.target.is_gpu:
        return [(1, 1)]
    count, layers = max(1, cfg.target.count), cfg.model.arch.num_hidden_layers or 1
    pairs = []
    for tp in rules.valid_tp_sizes(cfg.model.arch):
        for pp in (1, 2, 4, 8):
            if tp * pp <= count and pp <= layers:
                pairs.append((tp, pp))
    return pairs


def space_problems(cfg: PipelineConfig) -> list[str]:
    """The search space's own settings, refused in one line before anything is enumerated."""
    problems = []
    known = {f.value for f in QuantFormat}
    wrong = [name for name in cfg.tune.formats if name not in known]
    if wrong:
        problems.append(f"tune.formats: {wrong} are not formats: use some of {sorted(known)}")
    wrong = [name for name in cfg.tune.kv_cache_dtypes if name not in KV_CHOICES]
    if wrong:
        problems.append(f"tune.kv_cache_dtypes: {wrong} are not KV cache dtypes: use some of {sorted(KV_CHOICES)}")
    if cfg.tune.max_trials < 1 or cfg.tune.time_budget_min <= 0:
        problems.append("tune.max_trials must be at least 1 and tune.time_budget_min above 0")
    if any(scale <= 0 for scale in cfg.tune.batch_scales) or not cfg.tune.batch_scales:
        problems.append("tune.batch_scales must be positive multipliers, e.g. [0.5,1.0,2.0]")
    return problems


def _variant(base: PipelineConfig, changes: dict[str, Any]) -> tuple[PipelineConfig, list[str]]:
    """A copy of ``base`` with ``changes`` ({"quant.format": fp8, ...}) and the overrides saying so."""
    cfg = copy.deepcopy(base)
    overrides = []
    for key, value in changes.items():
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
        overrides.append(f"{key}={'null' if value is None else value}")
    return cfg, overrides


def enumerate_candidates(base: PipelineConfig) -> list[Candidate]:
    """Every combination, dropped ones included (with their reason)."""
    out: list[Candidate] = []
    kv_choices: list[KVCacheDType | str | None] = [*_kv_dtypes(base)] or ["default"]
    for fmt, kv in itertools.product(_formats(base), kv_choices):
        if kv == "default":  # the format's preset KV cache: FP8 beside FP8 weights
            kv = KVCacheDType.fp8 if fmt is QuantFormat.fp8 else None
        numerics = {"quant.format": fmt, "quant.kv_cache_dtype": kv}
        if base.target.is_gpu:
            out += _gpu_candidates(base, numerics)
        else:
            out += _cpu_candidates(base, numerics)
    return out


def _gpu_candidates(base: PipelineConfig, numerics: dict[str, Any]) -> list[Candidate]:
    out = []
    for tp, pp in _parallel(base):
        shape = {**numerics, "parallel.tp": tp, "parallel.pp": pp}
        probe, _ = _variant(base, {**shape, "build.max_batch_size": None, "build.max_num_tokens": None})
        sized = limits.size(probe)
        for scale in base.tune.batch_scales:
            batch = max(1, round(sized.max_batch_size * scale))
            tokens = limits.round_tokens(sized.max_num_tokens * max(1.0, scale))
            cfg, overrides = _variant(base, {**shape, "build.max_batch_size": batch, "build.max_num_tokens": tokens})
            replicas = max(1, base.target.count // (tp * pp))
            out.append(_checked(Candidate(overrides, cfg, replicas)))
    return out


def _cpu_candidates(base: PipelineConfig, numerics: dict[str, Any]) -> list[Candidate]:
    out = []
    tune = base.tune
    space = itertools.product(
        tune.cpu_max_batch_size, tune.cpu_max_num_tokens, tune.cpu_threads, tune.cpu_context_chunk_tokens
    )
    for batch, tokens, threads, chunk in space:
        changes = {
            **numerics,
            "build.max_batch_size": batch,
            "triton.cpu_max_num_tokens": tokens,
            "triton.cpu_threads": threads,
            "triton.cpu_context_chunk_tokens": chunk,
        }
        cfg, overrides = _variant(base, changes)
        out.append(_checked(Candidate(overrides, cfg)))
    return out


def _checked(candidate: Candidate) -> Candidate:
    """The build's own rules and memory plan decide whether it is kept."""
    problems = validate.validate(candidate.cfg)
    if problems:
        candidate.dropped = problems[0]
    return candidate


def predict_all(candidates: list[Candidate], calibration: perf.Calibration | None = None) -> None:
    """Each kept candidate's best load within the SLO (or its closest miss), predicted."""
    for candidate in candidates:
        if candidate.dropped:
            continue
        base = candidate.cfg
        prediction, misses = perf.best_under_slo(candidate.deployment(), base.workload, base.slo, calibration)
        candidate.prediction, candidate.misses = prediction, misses


def ranked(candidates: list[Candidate]) -> list[Candidate]:
    """Kept candidates, the most promising first: meeting the SLO, then tokens/s per GPU, then
    fewer GPUs."""
    kept = [c for c in candidates if not c.dropped and c.prediction is not None]
    return sorted(kept, key=lambda c: (bool(c.misses), -c.score(), c.gpus, _closeness(c), c.cfg.build.batch))


def _closeness(candidate: Candidate) -> float:
    return sum(candidate.misses.values())


def check(cfg: PipelineConfig) -> None:
    problems = space_problems(cfg)
    if problems:
        raise ConfigError("; ".join(problems))
