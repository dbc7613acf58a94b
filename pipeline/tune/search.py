"""``tune``: from a workload and a latency SLO to the deployment that meets it at the lowest cost,
searched, measured, gated on accuracy and promoted.

1. Candidates (``candidates.py``): the search space, each checked by the build's rules and memory
   planner, the survivors predicted by the performance model and ranked.
2. Trials: an Optuna study (``<workdir>/tune/<key>/study.db``) holds them, so a killed ``tune``
   run again continues it and measures nothing twice. The first half of the budget goes to the
   model's ranking (re-ranked after every measurement, as the model is calibrated on what was
   measured); then Optuna's TPE sampler proposes (a repeat of a measured candidate is replaced by
   the best-ranked unmeasured one). Each trial is a ``build`` (cached stages are reused) whose
   benchmark sweeps the workload at the candidate's loads: an MLflow child run of the tune's run,
   with the predicted figures and their residuals beside the measured ones.
3. The accuracy gate: each numerics (format and KV cache dtype) is evaluated once, by its first
   trial; trials that change only limits, parallelism or threads inherit that verdict.
4. The decision (``decision.py``): the winner meets every SLO limit at its load and passes the gate;
   the most output tokens/s per GPU wins (the lowest $/1M tokens where priced), ties broken by
   fewer GPUs. It is registered under ``tune.alias`` with a deployment card.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import app, artifacts, launchers, runner, validate
from pipeline.config.schema import PipelineConfig, SLOConfig, to_dict
from pipeline.errors import PipelineError
from pipeline.sizing import perf
from pipeline.stages import STAGES
from pipeline.stages.benchmark import report
from pipeline.tracking import runs
from pipeline.tune import candidates as cands

log = logging.getLogger(__name__)

STUDY_FILE = "study.db"
# the CPU target's default loads per trial: enough to find the knee, few enough for a 2-core host
CPU_LOADS = 3


@dataclass
class Trial:
    """A measured candidate, as the study stores it (``user_attrs``)."""

    number: int  # 1, 2, ... in the order they were measured
    key: str
    points: list[dict[str, Any]]
    gate: str  # pass | fail | skipped
    gate_tasks: list[dict[str, Any]] = field(default_factory=list)
    run_id: str | None = None
    predicted: dict[str, Any] = field(default_factory=dict)  # the model's figures at the measured loads
    inherited_gate_from: int | None = None

    def operating_point(self, slo: SLOConfig) -> dict[str, Any] | None:
        """The measured load with the most output tokens/s that meets every SLO limit."""
        good = [p for p in self.points if not report.slo_misses(p, slo)]
        return max(good, key=lambda p: p["output_tokens_per_s"]) if good else None

    def to_attrs(self) -> dict[str, Any]:
        """What the study keeps (the number is the trial's place in the study, not stored)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "number"}

    @classmethod
    def from_attrs(cls, number: int, attrs: dict[str, Any]) -> Trial:
        return cls(number=number, **attrs)


# overrides that do not change what a trial measures: a study asked again with other values of
# these continues (a stricter SLO is judged on the loads already measured, then searched further)
NOT_MEASURED = (
    "workdir=", "dry_run=", "tune.max_trials=", "tune.time_budget_min=", "tune.alias=", "slo.", "hydra",
    "tune.parallel_trials=",
)  # fmt: skip


HOW_IT_RUNS = ("max_trials", "time_budget_min", "alias", "parallel_trials")


def study_dir(cfg: PipelineConfig, user_overrides: list[str]) -> Path:
    """One study per measurement asked: model, target, workload, search space and the user's other
    overrides name its folder; the SLO does not (it judges measurements, it does not change them)."""
    asked = {
        "overrides": sorted(o for o in user_overrides if not o.startswith(NOT_MEASURED)),
        "workload": to_dict(cfg.workload),
        "space": {k: v for k, v in to_dict(cfg.tune).items() if k not in HOW_IT_RUNS},
    }  # fmt: skip
    digest = hashlib.sha256(json.dumps(asked, sort_keys=True).encode()).hexdigest()[:12]
    return cfg.workdir_path / "tune" / f"{cfg.model.name}-{cfg.target.name}-{digest}"


def trial_loads(candidate: cands.Candidate) -> list[int]:
    """The concurrencies a trial's benchmark sweeps: ``tune.concurrency``, else powers of two up
    to the candidate's batch limit (on the CPU target, the top few)."""
    cfg = candidate.cfg
    if cfg.tune.concurrency:
        return sorted(set(cfg.tune.concurrency))
    levels = perf.concurrency_levels(cfg.build.batch)
    if not cfg.target.is_gpu and len(levels) > CPU_LOADS:
        levels = [levels[0], *levels[-(CPU_LOADS - 1) :]]
    return levels


def trial_overrides(base_overrides: list[str], candidate: cands.Candidate, loads: list[int], gate: bool) -> list[str]:
    """A trial's build: the user's overrides, the candidate's, and a benchmark of the workload at
    the trial's loads. ``gate``: evaluate it (the first trial of its numerics)."""
    cfg = candidate.cfg
    own = [o for o in base_overrides if not o.startswith(("dry_run=", "benchmark=", "eval.enabled="))]
    bench = [
        f"benchmark.concurrency=[{','.join(map(str, loads))}]",
        "benchmark.rates=[]",
        f"benchmark.requests_per_point={cfg.tune.requests_per_point}",
        "benchmark.enabled=true",
        "eval.gate=warn",  # tune decides; a failed gate drops the candidate, it does not stop the search
        f"eval.enabled={'true' if gate and cfg.eval.enabled else 'false'}",
    ]
    return [*own, *candidate.overrides, *bench]


class Search:
    """One tune: its candidates, its study and what was measured."""

    def __init__(self, cfg: PipelineConfig, user_overrides: list[str]):
        import optuna

        self.cfg, self.user_overrides = cfg, user_overrides
        self.folder = study_dir(cfg, user_overrides)
        self.candidates = cands.enumerate_candidates(cfg)
        self.by_key = {c.key: c for c in self.candidates if not c.dropped}
        cands.predict_all(self.candidates)
        self.calibration = perf.Calibration()
        self.folder.mkdir(parents=True, exist_ok=True)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.study = optuna.create_study(
            study_name="tune",
            storage=f"sqlite:///{self.folder / STUDY_FILE}",
            direction="maximize",
            load_if_exists=True,
            sampler=optuna.samplers.TPESampler(seed=cfg.tune.seed),
        )
        self._settle_interrupted()
        self.trials = self._measured()
        self._calibrate()

    # the study's state --------------------------------------------------------------------------
    def _settle_interrupted(self) -> None:
        """A trial left RUNNING was killed with the last tune: failed, so its candidate is tried again."""
        from optuna.trial import TrialState

        for trial in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            log.info("trial %d was interrupted (%s): it is measured again", trial.number, trial.params)
            self.study.tell(trial.number, state=TrialState.FAIL)

    def _measured(self) -> list[Trial]:
        from optuna.trial import TrialState

        done = self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        attrs = [t.user_attrs["trial"] for t in sorted(done, key=lambda t: t.number) if "trial" in t.user_attrs]
        return [Trial.from_attrs(index, found) for index, found in enumerate(attrs, 1)]

    def measured_keys(self) -> set[str]:
        return {t.key for t in self.trials}

    def _calibrate(self) -> None:
        """Fit the model's two constants to every measured load, then rank again."""
        pairs = []
        for trial in self.trials:
            candidate = self.by_key.get(trial.key)
            if candidate is None:
                continue
            for point in trial.points:
                if point.get("concurrency") and point.get("itl_ms_p50") == point.get("itl_ms_p50"):
                    raw = perf.predict(candidate.deployment(), self.cfg.workload, int(point["concurrency"]))
                    pairs.append((raw.itl_ms_p50, float(point["itl_ms_p50"])))
        if pairs and not self.cfg.target.is_gpu:  # GPU figures keep the published-figure constants
            self.calibration = perf.Calibration.fit(pairs)
            cands.predict_all(self.candidates, self.calibration)

    def ranking(self) -> list[cands.Candidate]:
        return cands.ranked(self.candidates)

    def next_candidate(self, also_taken: tuple[str, ...] = ()) -> cands.Candidate | None:
        """The best-ranked candidate not measured yet (None: all were), preferring a shape (format,
        KV cache dtype, tp, pp) not measured yet: candidates that differ only in their limits are
        often predicted alike, and one measurement of the shape says more than two."""
        taken = self.measured_keys() | set(also_taken)
        # a format that failed the accuracy gate cannot win with other limits: not measured again
        eligible = self._eligible()
        left = [c for c in self.ranking() if c.key not in taken and c.key in eligible]
        shapes = {self.by_key[k].shape for k in taken if k in self.by_key}
        fresh = [c for c in left if c.shape not in shapes]
        chosen = fresh or left
        return chosen[0] if chosen else None

    def _eligible(self) -> set[str]:
        failed = {_numerics(self.by_key.get(t.key)) for t in self.trials if t.gate == "fail"}
        return {key for key, c in self.by_key.items() if _numerics(c) not in failed}

    def planned(self) -> list[cands.Candidate]:
        """What the budget would measure, in order, before any calibration."""
        picks: list[cands.Candidate] = []
        for _ in range(max(0, self.cfg.tune.max_trials - len(self.trials))):
            pick = self.next_candidate(tuple(c.key for c in picks))
            if pick is None:
                break
            picks.append(pick)
        return picks

    # running ------------------------------------------------------------------------------------
    def run(self, parent_run: str | None, launcher: str | None = None) -> list[Trial]:
        """Measure trials until the budget is spent: here, one at a time, or with a Hydra
        ``launcher`` (SLURM, Ray, local processes) ``tune.parallel_trials`` at a time, one job each."""
        from optuna.trial import TrialState

        started, budget_s = time.monotonic(), self.cfg.tune.time_budget_min * 60
        width = max(1, self.cfg.tune.parallel_trials) if launcher else 1
        if self.trials:
            log.info("resuming: %d trial(s) already measured in %s", len(self.trials), self.folder)
        while len(self.trials) < self.cfg.tune.max_trials:
            if time.monotonic() - started > budget_s:
                log.warning("tune.time_budget_min=%g reached: no new trial starts", self.cfg.tune.time_budget_min)
                break
            batch = self._next_batch(min(width, self.cfg.tune.max_trials - len(self.trials)))
            if not batch:
                log.info("every candidate has been measured")
                break
            for index, (_, candidate) in enumerate(batch, len(self.trials) + 1):
                log.info("trial %d/%d: %s", index, self.cfg.tune.max_trials, candidate.key)
            measured = self._measure(batch, parent_run, launcher)
            for (trial, candidate), result in zip(batch, measured, strict=True):
                if result is None:  # its job failed: the candidate may be tried again
                    self.study.tell(trial, state=TrialState.FAIL)
                    continue
                trial.set_user_attr("trial", result.to_attrs())
                point = result.operating_point(self.cfg.slo)
                self.study.tell(trial, _objective(candidate, point, result.gate), state=TrialState.COMPLETE)
                self.trials.append(result)
            if not any(measured):
                raise PipelineError("every trial of the last batch failed (see the log above): nothing to go on with")
            self._calibrate()
        return self.trials

    def _next_batch(self, width: int) -> list[tuple[Any, cands.Candidate]]:
        """Up to ``width`` (Optuna trial, candidate) pairs, asked of the study in the order chosen."""
        from optuna.trial import TrialState

        batch: list[tuple[Any, cands.Candidate]] = []
        for _ in range(4 * width):  # a trial left waiting by a killed run may come first: pruned
            if len(batch) == width:
                break
            candidate = self._choose(tuple(c.key for _, c in batch))
            if candidate is None:
                break
            self.study.enqueue_trial({"candidate": candidate.key})
            trial = self.study.ask()
            key = trial.suggest_categorical("candidate", sorted(self.by_key))  # the enqueued one, or one left waiting
            if key in self.measured_keys() or key not in self.by_key or key in {c.key for _, c in batch}:
                self.study.tell(trial, state=TrialState.PRUNED)
                continue
            batch.append((trial, self.by_key[key]))
        return batch

    def _choose(self, also_taken: tuple[str, ...] = ()) -> cands.Candidate | None:
        """The model's best-ranked unmeasured candidate for the first half of the budget; then
        Optuna's sampler, a repeat of a measured one replaced by the model's choice."""
        ranked_phase = len(self.trials) + len(also_taken) < math.ceil(self.cfg.tune.max_trials / 2)
        chosen = self.next_candidate(also_taken)
        if ranked_phase or chosen is None:
            return chosen
        import optuna

        probe = self.study.ask()  # what the sampler proposes, told back as pruned
        proposed = probe.suggest_categorical("candidate", sorted(self.by_key))
        self.study.tell(probe, state=optuna.trial.TrialState.PRUNED)
        pick = self.by_key.get(proposed)
        taken = self.measured_keys() | set(also_taken)
        if pick is None or pick.key in taken or pick.key not in self._eligible():
            pick = chosen
        return pick

    def _measure(
        self, batch: list[tuple[Any, cands.Candidate]], parent_run: str | None, launcher: str | None
    ) -> list[Trial | None]:
        """Build and benchmark a batch of candidates (None: the trial's build failed). The first
        trial of a numerics not yet gated is evaluated; the others inherit its verdict."""
        gating = {_numerics(self.by_key.get(t.key)) for t in self.trials if t.gate != "skipped"}
        jobs = []
        for _, candidate in batch:
            evaluate = _numerics(candidate) not in gating
            gating.add(_numerics(candidate))
            overrides = trial_overrides(self.user_overrides, candidate, trial_loads(candidate), gate=evaluate)
            jobs.append((overrides, validate.load(overrides)))
        if launcher is None:
            (overrides, trial_cfg), ((_, candidate),) = jobs[0], batch
            built = app.build_recorded(trial_cfg, sweep_parent=parent_run)
            bench = next((s for s in built.steps if s.name == "benchmark"), None)
            points = (bench.results or {}).get("points", []) if bench else []
            found: list[tuple[list[dict[str, Any]], dict[str, Any] | None, str | None] | None] = [
                (points, built.gate, built.run_id)
            ]
        else:
            found = self._launched(jobs, parent_run)
        results: list[Trial | None] = []
        for number, ((_, candidate), outcome) in enumerate(zip(batch, found, strict=True), len(self.trials) + 1):
            if outcome is None:
                results.append(None)
                continue
            points, gate, run_id = outcome
            results.append(self._trial(candidate, number, points, gate, run_id, results))
        return results

    def _launched(
        self, jobs: list[tuple[list[str], PipelineConfig]], parent_run: str | None
    ) -> list[tuple[list[dict[str, Any]], dict[str, Any] | None, str | None] | None]:
        """The batch's builds as jobs of the Hydra launcher, then what each left: its benchmark's
        points (written since the launch), its accuracy gate, its MLflow run."""
        started = time.time()
        try:
            launchers.launch(jobs, parent=parent_run)
        except PipelineError as error:  # what finished is read back below
            log.error("%s", error)
        found: list[tuple[list[dict[str, Any]], dict[str, Any] | None, str | None] | None] = []
        for _, trial_cfg in jobs:
            steps = runner.plan(trial_cfg, STAGES)
            bench = next(s for s in steps if s.name == "benchmark")
            table = bench.dirs.final / artifacts.BENCHMARK_JSON
            if not table.is_file() or table.stat().st_mtime < started:
                found.append(None)
                continue
            gate = app.accuracy_gate(trial_cfg, steps)
            repository = next(s for s in steps if s.name == "triton_repo")
            run_id = runs.child_run(trial_cfg, parent_run, repository.fingerprint) if parent_run else None
            found.append((json.loads(table.read_text()), gate, run_id))
        return found

    def _trial(
        self,
        candidate: cands.Candidate,
        number: int,
        points: list[dict[str, Any]],
        gate: dict[str, Any] | None,
        run_id: str | None,
        batch: list[Trial | None],
    ) -> Trial:
        loads = trial_loads(candidate)
        predicted = {
            str(c): perf.predict(candidate.deployment(), self.cfg.workload, c, self.calibration).to_dict()
            for c in loads
        }
        if gate is not None:
            return Trial(number, candidate.key, points, str(gate["verdict"]), gate["tasks"], run_id, predicted)
        gated = next(
            (t for t in [*self.trials, *(b for b in batch if b is not None)]
             if _numerics(self.by_key.get(t.key)) == _numerics(candidate) and t.gate != "skipped"),
            None,
        )  # fmt: skip
        if gated is None:  # eval=none: nothing to gate on
            return Trial(number, candidate.key, points, "skipped", [], run_id, predicted)
        return Trial(number, candidate.key, points, gated.gate, gated.gate_tasks, run_id, predicted, gated.number)


def _numerics(candidate: cands.Candidate | None) -> tuple[str, str] | None:
    return candidate.numerics if candidate is not None else None


def _objective(candidate: cands.Candidate, point: dict[str, Any] | None, gate: str) -> float:
    """What the study maximizes: output tokens/s per GPU at the best load within the SLO, 0 for a
    candidate with none or one that failed the accuracy gate."""
    if point is None or gate == "fail":
        return 0.0
    return float(point["output_tokens_per_s"]) / candidate.gpus


def refuse_unless_runnable(cfg: PipelineConfig) -> None:
    """Problems of the tune itself, before any candidate is built (a dry run records nothing)."""
    cands.check(cfg)
    if not cfg.tracking.enabled and not cfg.dry_run:
        raise PipelineError("tune records every trial and registers the winner in MLflow: drop tracking=none")
