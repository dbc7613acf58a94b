"""The ``tune`` command: the candidate table, the trials, the decision, the registry hand-off."""

from __future__ import annotations

import logging
from typing import Any

from pipeline import launchers
from pipeline.config.schema import PipelineConfig
from pipeline.errors import PipelineError
from pipeline.tracking import registry, runs
from pipeline.tune import decision
from pipeline.tune.search import Search, Trial, refuse_unless_runnable, trial_loads

log = logging.getLogger(__name__)

PARETO = "pareto.png"
CARD = "deployment_card.md"
TRIALS = "trials.txt"
PARENT_ATTR = "mlflow_parent_run"


def tune(cfg: PipelineConfig, overrides: list[str]) -> None:
    refuse_unless_runnable(cfg)
    search = Search(cfg, overrides)
    ranked = search.ranking()
    dropped = [c for c in search.candidates if c.dropped]
    print(f"# {len(search.candidates)} candidates, {len(dropped)} dropped before any build, {len(ranked)} ranked")
    print(decision.candidate_table(ranked))
    if dropped:
        print("\n# dropped")
        reasons: dict[str, int] = {}
        for c in dropped:
            assert c.dropped is not None
            reasons[c.dropped] = reasons.get(c.dropped, 0) + 1
        for reason, count in sorted(reasons.items(), key=lambda item: -item[1]):
            print(f"  {count:>3} x {reason}")
    if cfg.dry_run:
        print(f"\n# trials it would run (tune.max_trials={cfg.tune.max_trials}; re-ranked as measurements calibrate)")
        for index, c in enumerate(search.planned(), 1):
            loads = ",".join(map(str, trial_loads(c)))
            print(f"  {index}. {c.key}   loads c={loads}")
        print(f"dry run: nothing was built (study: {search.folder})")
        return
    if not ranked:
        raise PipelineError("every candidate was dropped before any build (see the list above): widen the search")
    parent_attr = f"{PARENT_ATTR}:{_asked(cfg)}"  # one tune run per SLO asked of the study
    resume = search.study.user_attrs.get(parent_attr)
    name = f"tune: {cfg.model.name} on {cfg.target.name} {cfg.workload.input_tokens}/{cfg.workload.output_tokens}"
    with runs.parent_run(cfg, name, {"pipeline.tune": "true"}, resume=resume) as opened:
        assert opened is not None  # refuse_unless_runnable: tracking is on
        client, parent = opened
        search.study.set_user_attr(parent_attr, parent)
        if not resume:
            for key, value in cfg.slo.limits().items():
                client.log_param(parent, f"slo_{key}", value)
        before = len(search.trials)
        launcher = launchers.chosen_launcher(overrides)
        trials = search.run(parent, None if launcher in launchers.IN_PROCESS else launcher)
        for trial in trials[before:]:  # those measured now (the others were recorded when they were)
            _record_trial(client, trial)
        outcomes = [decision.outcome(t, search.by_key[t.key], cfg) for t in trials if t.key in search.by_key]
        print("\n# trials: predicted against measured")
        table = decision.trial_table(outcomes)
        print(table)
        (search.folder / TRIALS).write_text(table + "\n")
        decision.pareto_chart(outcomes, cfg, search.folder / PARETO)
        client.log_artifact(parent, str(search.folder / PARETO))
        client.log_artifact(parent, str(search.folder / TRIALS))
        best = decision.winner(outcomes)
        if best is None:
            raise PipelineError(_no_winner(outcomes, cfg))
        text = decision.card(cfg, best, outcomes, cfg.tune.alias)
        (search.folder / CARD).write_text(text)
        client.log_artifact(parent, str(search.folder / CARD))
        client.set_tag(parent, "mlflow.note.content", text)
        version = _promote(client, cfg, best, text)
    print(f"\n{text}")
    print(f"models:/{registry.model_name(cfg)}@{cfg.tune.alias} -> version {version}")
    print(f"serve it with: python -m pipeline serve model_uri=models:/{registry.model_name(cfg)}@{cfg.tune.alias}")
    print(f"(the study, the Pareto chart and the card are in {search.folder})")


def _record_trial(client: Any, trial: Trial) -> None:
    """The model's figures beside the measured ones in the trial's own run, per load (step =
    concurrency), and the residuals (measured - predicted): the model's error."""
    if not trial.run_id:
        return
    from mlflow.entities import Metric

    metrics = []
    for point in trial.points:
        c = point.get("concurrency")
        predicted = trial.predicted.get(str(c))
        if not c or not predicted:
            continue
        for key in ("ttft_ms_p99", "itl_ms_p99", "output_tokens_per_s"):
            guess, got = predicted.get(key), point.get(key)
            if guess is None:
                continue
            metrics.append(Metric(f"predicted/{key}", float(guess), 0, int(c)))
            if got is not None and got == got:  # a load whose requests all failed has no residual
                metrics.append(Metric(f"residual/{key}", float(got) - float(guess), 0, int(c)))
    client.log_batch(trial.run_id, metrics=metrics)
    client.set_tag(trial.run_id, "pipeline.tune_trial", str(trial.number))
    client.set_tag(trial.run_id, "pipeline.tune_gate", trial.gate)


def _promote(client: Any, cfg: PipelineConfig, best: decision.Outcome, text: str) -> str:
    """The winner's registered version: its gate verdict (inherited where it was), the card as
    its description, and the alias."""
    name = registry.model_name(cfg)
    assert best.trial.run_id is not None
    version = registry.version_of(client, name, best.trial.run_id)
    if version is None:
        raise PipelineError(f"trial {best.trial.number} registered no version of {name}: keep tracking.register=true")
    gate = {"verdict": best.trial.gate, "tasks": best.trial.gate_tasks} if best.trial.gate != "skipped" else None
    registry.tag_gate(client, name, version, gate)
    client.update_model_version(name, version, description=text)
    client.set_model_version_tag(name, version, "pipeline.tuned_for", _asked(cfg))
    if gate is None:
        log.warning("eval=none: version %s of %s becomes %s without an accuracy gate", version, name, cfg.tune.alias)
    registry.promote(client, name, cfg.tune.alias, version=version, force=gate is None)
    return version


def _asked(cfg: PipelineConfig) -> str:
    slo = ", ".join(f"{k}<={v:g}" for k, v in cfg.slo.limits().items()) or "no SLO"
    return f"{cfg.workload.input_tokens}/{cfg.workload.output_tokens} tokens, {slo}"


def _no_winner(outcomes: list[decision.Outcome], cfg: PipelineConfig) -> str:
    near = decision.closest(outcomes)
    if near is not None:
        label = " ".join(f"{k}={v}" for k, v in near.candidate.describe().items())
        return f"no candidate met the SLO; the closest, trial {near.trial.number} ({label}), {near.why_not}"
    failed = [o for o in outcomes if o.trial.gate == "fail"]
    if failed:
        first = failed[0]
        return f"every measured candidate failed the accuracy gate (trial {first.trial.number} {first.why_not})"
    return "no trial was measured: raise tune.max_trials or tune.time_budget_min"
