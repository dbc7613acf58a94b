"""What ``tune`` concludes from its trials: the winner (or why there is none), the table of
predicted against measured figures, the Pareto chart, and the deployment card."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config.schema import PipelineConfig, SLOConfig
from pipeline.stages.benchmark.report import slo_misses
from pipeline.tables import aligned
from pipeline.tracking import metrics
from pipeline.tune import candidates as cands
from pipeline.tune.search import Trial


@dataclass
class Outcome:
    trial: Trial
    candidate: cands.Candidate
    point: dict[str, Any] | None  # the measured load with the most output tok/s meeting the SLO
    tokens_per_s_per_gpu: float
    usd_per_million: float | None
    why_not: str | None  # None: it qualifies

    @property
    def qualifies(self) -> bool:
        return self.why_not is None


def outcome(trial: Trial, candidate: cands.Candidate, cfg: PipelineConfig) -> Outcome:
    point = trial.operating_point(cfg.slo)
    per_gpu = float(point["output_tokens_per_s"]) / candidate.gpus if point else 0.0
    cost = metrics.cost_per_million_tokens(candidate.cfg, point["output_tokens_per_s"] if point else None)
    why = None
    if trial.gate == "fail":
        failed = [t for t in trial.gate_tasks if not t.get("passed", True)] or trial.gate_tasks
        worst = min(failed, key=lambda t: t["lower_bound"], default=None)
        lost = ""
        if worst is not None:
            chance = ", within noise of chance" if worst.get("at_chance") else ""
            lost = f": {worst['task']} {worst['delta']:+.3f} (budget -{worst['max_drop']:.3f}{chance})"
        why = f"failed the accuracy gate{lost}"
    elif point is None:
        why = _closest_miss(trial, cfg.slo)
    return Outcome(trial, candidate, point, per_gpu, cost, why)


def _closest_miss(trial: Trial, slo: SLOConfig) -> str:
    """The limit its least loaded point breaks, and by how much."""
    if not trial.points:
        return "no load point was measured"
    lightest = min(trial.points, key=lambda p: p.get("concurrency") or 0)
    misses = slo_misses(lightest, slo)
    if lightest.get("errors"):
        return f"c={lightest.get('concurrency')}: {lightest['errors']} requests failed"
    limits = slo.limits()
    parts = [
        f"{key} {lightest.get(key, math.nan):.0f} ms > {limits[key]:g} ms (by {over:.0f} ms, {over / limits[key]:.0%})"
        for key, over in misses.items()
    ]
    return f"misses the SLO even at c={lightest.get('concurrency')}: " + "; ".join(parts)


def winner(outcomes: list[Outcome]) -> Outcome | None:
    """The most output tokens/s per GPU among those that qualify; the cheapest, then the fewest
    GPUs, on a tie."""
    good = [o for o in outcomes if o.qualifies]
    if not good:
        return None
    return max(good, key=lambda o: (round(o.tokens_per_s_per_gpu, 6), -(o.usd_per_million or 0), -o.candidate.gpus))


def closest(outcomes: list[Outcome]) -> Outcome | None:
    """Of those that missed the SLO (passing the gate), the one that missed it by the least."""
    missed = [o for o in outcomes if o.trial.gate != "fail" and o.point is None and o.trial.points]
    if not missed:
        return None

    def relative_miss(o: Outcome) -> float:
        lightest = min(o.trial.points, key=lambda p: p.get("concurrency") or 0)
        limits = o.candidate.cfg.slo.limits()
        return sum(over / limits[k] for k, over in slo_misses(lightest, o.candidate.cfg.slo).items())

    return min(missed, key=relative_miss)


def trial_table(outcomes: list[Outcome]) -> str:
    """Every trial: the candidate, the model's figures against the measured ones at each load."""
    rows = [("trial", "candidate", "load", "pred ITL p99", "meas ITL p99", "pred TTFT p99", "meas TTFT p99",
             "pred tok/s/GPU", "meas tok/s/GPU", "gate", "verdict")]  # fmt: skip
    for o in outcomes:
        label = " ".join(f"{k}={v}" for k, v in o.candidate.describe().items())
        for point in sorted(o.trial.points, key=lambda p: p.get("concurrency") or 0):
            c = point.get("concurrency")
            pred = o.trial.predicted.get(str(c), {})
            chosen = o.point is not None and point is o.point
            rows.append(
                (
                    str(o.trial.number),
                    label,
                    f"c={c}" + (" *" if chosen else ""),
                    _ms(pred.get("itl_ms_p99")),
                    _ms(point.get("itl_ms_p99")),
                    _ms(pred.get("ttft_ms_p99")),
                    _ms(point.get("ttft_ms_p99")),
                    _num(pred.get("tokens_per_s_per_gpu")),
                    _num(point.get("output_tokens_per_s", 0) / o.candidate.gpus),
                    _gate(o.trial),
                    "meets SLO" if not slo_misses(point, o.candidate.cfg.slo) else "misses SLO",
                )
            )
    return "\n".join(aligned(rows)) + "\n  (* the load each trial operates at: the most tokens/s within the SLO)"


def candidate_table(ranked: list[cands.Candidate], limit: int = 20) -> str:
    rows = [("rank", "candidate", "GPUs", "best load", "TTFT p99", "ITL p99", "tok/s/GPU", "tok/s/user", "$/1M tok",
             "SLO")]  # fmt: skip
    for index, c in enumerate(ranked[:limit], 1):
        p = c.prediction
        assert p is not None
        cost = c.cost_per_million()
        rows.append(
            (
                str(index),
                " ".join(f"{k}={v}" for k, v in c.describe().items()),
                str(c.gpus),
                f"c={p.concurrency}",
                _ms(p.ttft_ms_p99),
                _ms(p.itl_ms_p99),
                _num(p.tokens_per_s_per_gpu),
                _num(p.tokens_per_s_per_user),
                f"{cost:.3f}" if cost is not None else "-",
                "meets" if not c.misses else "misses " + ",".join(c.misses),
            )
        )
    more = f"\n  ... and {len(ranked) - limit} more" if len(ranked) > limit else ""
    return "\n".join(aligned(rows)) + more


def _gate(trial: Trial) -> str:
    inherited = trial.inherited_gate_from
    return trial.gate + (f" (trial {inherited})" if inherited is not None else "")


def _ms(value: Any) -> str:
    return f"{value:.1f} ms" if isinstance(value, int | float) and value == value else "-"


def _num(value: Any) -> str:
    return f"{value:,.1f}" if isinstance(value, int | float) and value == value else "-"


def pareto_chart(outcomes: list[Outcome], cfg: PipelineConfig, path: Path) -> None:
    """Tokens/s per user against tokens/s per GPU, every measured load of every trial, the
    frontier drawn and the SLO's ITL limit marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(8, 5))
    everything = []
    for o in outcomes:
        xs, ys = [], []
        for point in sorted(o.trial.points, key=lambda p: p.get("concurrency") or 0):
            itl = point.get("itl_ms_p50")
            if not itl or itl != itl:
                continue
            xs.append(1000 / itl)
            ys.append(point["output_tokens_per_s"] / o.candidate.gpus)
        everything += list(zip(xs, ys, strict=True))
        style = "o-" if o.qualifies else "x--"
        axis.plot(xs, ys, style, label=f"trial {o.trial.number}" + (f" ({o.why_not[:40]})" if o.why_not else ""))
    frontier, best = [], -1.0
    for x, y in sorted(everything, reverse=True):  # from the fastest per user down
        if y > best:
            frontier.append((x, y))
            best = y
    if frontier:
        axis.plot(*zip(*frontier, strict=True), "k-", alpha=0.3, linewidth=4, label="Pareto frontier")
    itl_limit = cfg.slo.itl_ms_p99
    if itl_limit:
        axis.axvline(1000 / itl_limit, color="red", linestyle=":", label=f"SLO: ITL p99 {itl_limit:g} ms")
    axis.set_xlabel("output tokens/s per user (1000 / ITL p50)")
    axis.set_ylabel("output tokens/s per GPU" if cfg.target.is_gpu else "output tokens/s (one host)")
    axis.set_title(
        f"tune: {cfg.model.name} on {cfg.target.name}, {cfg.workload.input_tokens}/{cfg.workload.output_tokens} tokens"
    )
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def card(cfg: PipelineConfig, best: Outcome, outcomes: list[Outcome], alias: str) -> str:
    """The deployment card: what was asked, what won, how it did and why the others lost."""
    point = best.point or {}
    slo = cfg.slo.limits()
    lines = [
        f"# Deployment card: {cfg.model.name} on {cfg.target.name}",
        "",
        f"**Workload**: {cfg.workload.input_tokens} input / {cfg.workload.output_tokens} output tokens per request.",
        "**SLO**: " + (", ".join(f"{k} <= {v:g} ms" for k, v in slo.items()) or "none (the highest throughput wins)"),
        "",
        f"## Winner (alias `{alias}`): trial {best.trial.number}",
        "",
        "| setting | value |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in best.candidate.describe().items()],
        f"| GPUs | {best.candidate.gpus} |",
        "",
        f"Measured at concurrency {point.get('concurrency')}: {point.get('output_tokens_per_s', 0):.1f} output tok/s "
        f"({best.tokens_per_s_per_gpu:.1f} per GPU), "
        f"goodput {point.get('goodput_requests_per_s', math.nan):.2f} req/s, "
        f"TTFT p50/p99 {point.get('ttft_ms_p50', math.nan):.0f}/{point.get('ttft_ms_p99', math.nan):.0f} ms, "
        f"ITL p50/p99 {point.get('itl_ms_p50', math.nan):.1f}/{point.get('itl_ms_p99', math.nan):.1f} ms.",
    ]
    if best.usd_per_million is not None:
        lines.append(f"Cost: ${best.usd_per_million:.3f} per million output tokens.")
    lines += ["", f"Accuracy gate: **{best.trial.gate}**"]
    for task in best.trial.gate_tasks:
        lines.append(
            f"- {task['task']}: {task['accuracy']:.3f} against {task['reference']:.3f} unquantized, delta "
            f"{task['delta']:+.3f} [{task['ci_low']:+.3f}, {task['ci_high']:+.3f}]"
        )
    if best.trial.inherited_gate_from is not None:
        lines.append(f"(the verdict of trial {best.trial.inherited_gate_from}, the same format and KV cache dtype)")
    others = [o for o in outcomes if o is not best]
    if others:
        lines += ["", "## Runners-up", "", "| trial | candidate | tok/s per GPU | why it lost |", "|---|---|---|---|"]
        for o in sorted(others, key=lambda o: -o.tokens_per_s_per_gpu):
            label = " ".join(f"{k}={v}" for k, v in o.candidate.describe().items())
            reason = o.why_not or f"fewer tokens/s per GPU ({o.tokens_per_s_per_gpu:.1f})"
            lines.append(f"| {o.trial.number} | {label} | {o.tokens_per_s_per_gpu:.1f} | {reason} |")
    return "\n".join(lines) + "\n"
