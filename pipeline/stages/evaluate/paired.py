"""The accuracy gate's statistics: a deployment against its unquantized reference on the same items.

Paired (each item scored by both), so the noise is that of the items the two disagree on, not of
the whole task. Per task: both accuracies with standard errors, the difference with a two-sided
interval at ``confidence``, and a one-sided test of "the loss exceeds the budget": the gate passes
a task when its one-sided lower bound on the difference lies above ``-max_drop`` (the loss is shown
to be within budget) and the score is not within noise of chance. The items a test needs to show
that at 80 % power, for a deployment that truly loses nothing, tell when a task is too small.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Any

POWER = 0.8


@dataclass
class Comparison:
    task: str
    items: int
    accuracy: float
    accuracy_se: float
    reference: float
    reference_se: float
    delta: float  # accuracy - reference
    ci_low: float
    ci_high: float
    agreement: float  # items where both gave the same answer
    max_drop: float
    lower_bound: float  # one-sided, at the gate's confidence
    at_chance: bool
    items_needed: int  # for POWER at this discordance, when nothing is truly lost
    passed: bool

    def verdict(self) -> str:
        """One line: the task, both scores, the difference and its interval, and why it passed or not."""
        head = (
            f"{self.task}: {self.accuracy:.3f} vs reference {self.reference:.3f}, delta {self.delta:+.3f} "
            f"[{self.ci_low:+.3f}, {self.ci_high:+.3f}], agreement {self.agreement:.0%}, n={self.items}"
        )
        if self.at_chance:
            return f"{head}: FAIL (the score is within noise of chance)"
        if self.passed:
            return f"{head}: pass (loss below {self.max_drop:.3f} shown)"
        more = f"; about {self.items_needed} items would tell" if self.items_needed > self.items else ""
        return f"{head}: FAIL (a loss above {self.max_drop:.3f} is not ruled out{more})"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _mean_se(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)


def compare(
    task: str,
    items: list[dict[str, Any]],
    reference: list[dict[str, Any]],
    max_drop: float,
    confidence: float,
    at_chance: bool,
) -> Comparison:
    """The paired comparison of one task's items (matched by ``doc_id``)."""
    theirs = {item["doc_id"]: item for item in reference}
    pairs = [(item, theirs[item["doc_id"]]) for item in items if item["doc_id"] in theirs]
    if not pairs:
        raise ValueError(f"{task}: no item was scored by both the deployment and the reference")
    ours = [a["score"] for a, _ in pairs]
    refs = [b["score"] for _, b in pairs]
    accuracy, accuracy_se = _mean_se(ours)
    ref, ref_se = _mean_se(refs)
    delta, delta_se = _mean_se([a - b for a, b in zip(ours, refs, strict=True)])
    z_two = NormalDist().inv_cdf(0.5 + confidence / 2)
    z_one = NormalDist().inv_cdf(confidence)
    lower = delta - z_one * delta_se
    sd = delta_se * math.sqrt(len(pairs))
    needed = math.ceil(((z_one + NormalDist().inv_cdf(POWER)) * sd / max_drop) ** 2) if sd > 0 else 0
    return Comparison(
        task=task,
        items=len(pairs),
        accuracy=accuracy,
        accuracy_se=accuracy_se,
        reference=ref,
        reference_se=ref_se,
        delta=delta,
        ci_low=delta - z_two * delta_se,
        ci_high=delta + z_two * delta_se,
        agreement=sum(a["answer"] == b["answer"] for a, b in pairs) / len(pairs),
        max_drop=max_drop,
        lower_bound=lower,
        at_chance=at_chance,
        items_needed=needed,
        passed=lower > -max_drop and not at_chance,
    )
