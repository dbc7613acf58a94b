"""A build explained in a few lines of markdown: the run's description in the MLflow UI (its
``mlflow.note.content`` tag, rendered on the run page), the registered version's description,
and a sweep parent's table of its children.

What it says: the model and revision, format, tp/pp, target and backend; the headline numbers at
the load they were measured at; the quality report and the accuracy gate in one line each; the
latency-throughput plot (the run's own artifact, which the UI serves); where the repository is
and how to serve the registered version.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from pipeline import artifacts
from pipeline.config.schema import PipelineConfig
from pipeline.redact import redact
from pipeline.tracking.metrics import HEADLINE, highest_load

NOTE_TAG = "mlflow.note.content"
NOTE_LIMIT = 7500  # MLflow keeps a tag value of up to 8000 characters


@dataclass
class BuildFacts:
    """What a build did, as the card tells it."""

    headline: dict[str, float]
    points: list[dict[str, Any]]
    quality: dict[str, Any] | None = None
    gate: dict[str, Any] | None = None
    revision: str | None = None
    repository: Path | None = None
    version: str | None = None  # the registered model's version
    adapters: list[dict[str, Any]] = field(default_factory=list)  # the LoRA adapters the repository ships


def _number(value: float) -> str:
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"


def table(rows: list[dict[str, Any]], first: list[str]) -> str:
    """A markdown table of ``first`` columns then every headline metric any row has."""
    present = [h for h in HEADLINE if any(h.name in row for row in rows)]
    head = first + [h.label for h in present]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [str(row.get(column, "")) for column in first]
        cells += [_number(row[h.name]) if h.name in row else "-" for h in present]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_link(run_id: str, path: str) -> str:
    """An artifact of the run as the MLflow server serves it, relative to the UI's address (so a
    server behind a prefix or a proxy serves it too)."""
    return f"get-artifact?path={quote(path, safe='')}&run_uuid={run_id}"


def _quality_line(quality: dict[str, Any] | None) -> str | None:
    if not quality or "perplexity_change_pct" not in quality:
        return None
    parts = [f"perplexity {quality['perplexity_change_pct']:+.2f} % on held-out text"]
    if "kl_divergence_mean" in quality:
        parts.append(f"KL divergence {quality['kl_divergence_mean']:.4f}")
    if "top1_agreement" in quality:
        parts.append(f"top-1 agreement {quality['top1_agreement']:.1%}")
    return "**Quality**: " + ", ".join(parts) + "."


def _gate_line(gate: dict[str, Any] | None) -> str:
    if gate is None:
        return "**Accuracy gate**: not evaluated (eval=none)."
    tasks = [
        f"{task['task']} {task['accuracy']:.3f} vs {task['reference']:.3f} "
        f"({task['delta']:+.3f} [{task['ci_low']:+.3f}, {task['ci_high']:+.3f}])"
        for task in gate.get("tasks", [])
    ]
    return f"**Accuracy gate**: {gate['verdict']} against the unquantized build: " + "; ".join(tasks) + "."


def title(cfg: PipelineConfig) -> str:
    kv = f", KV {cfg.quant.kv_cache_dtype}" if cfg.quant.kv_cache_dtype else ""
    return (
        f"**{cfg.model.name}** · {cfg.quant.format}{kv} · tp{cfg.parallel.tp} pp{cfg.parallel.pp} · "
        f"{cfg.target.name}{' ' + cfg.target.gpu if cfg.target.gpu else ''} · {cfg.backend} backend"
    )


def build_card(cfg: PipelineConfig, run_id: str, facts: BuildFacts, registered_model: str) -> str:
    source = cfg.model.repo_id or cfg.model.path or cfg.model.file
    lines = [title(cfg), ""]
    lines.append(f"Model `{source}`" + (f" at revision `{facts.revision}`" if facts.revision else "") + ".")
    top = highest_load(facts.points)
    if facts.headline:
        lines += ["", table([facts.headline], [])]
    if top is not None:
        work = cfg.workload
        lines += ["", f"At {top['load']}, the benchmark's highest load; {work.input_tokens} input and "
                  f"{work.output_tokens} output tokens a request."]  # fmt: skip
    quality = _quality_line(facts.quality)
    lines += ["", *([quality] if quality else []), _gate_line(facts.gate)]
    if facts.points:
        lines += ["", f"![latency and throughput]({plot_link(run_id, f'benchmark/{artifacts.PLOT}')})"]
    if facts.repository is not None:
        lines += ["", f"**Triton repository**: `{facts.repository}`"]
        if facts.adapters:
            served = ", ".join(f"`{entry['name']}` (rank {entry['rank']})" for entry in facts.adapters)
            lines.append(f"with LoRA adapters served by name beside the base model: {served}")
    if facts.version is not None:
        uri = f"models:/{registered_model}/{facts.version}"
        lines.append(f"registered as `{uri}`; serve it with `python -m pipeline serve model_uri={uri}`")
    return redact("\n".join(lines))[:NOTE_LIMIT]


def sweep_card(name: str, children: list[Any]) -> str:
    """A sweep parent's description: its children side by side, headline metrics first."""
    rows = []
    for run in sorted(children, key=lambda r: r.info.start_time or 0):
        row: dict[str, Any] = {"run": run.info.run_name or run.info.run_id[:8], "status": run.info.status}
        row["gate"] = run.data.tags.get("accuracy_gate", "-")
        row.update({h.name: run.data.metrics[h.name] for h in HEADLINE if h.name in run.data.metrics})
        rows.append(row)
    text = f"**{name}**: {len(rows)} builds\n\n" + table(rows, ["run", "status", "gate"])
    return redact(text)[:NOTE_LIMIT]
