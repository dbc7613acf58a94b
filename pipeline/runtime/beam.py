"""Beam search over the reference runtime, with TensorRT-LLM's knobs: ``beam_width`` hypotheses
kept per step, ``length_penalty`` (a finished hypothesis scores its cumulative log probability
divided by its length to that power) and ``early_stopping`` (1: stop once ``beam_width`` hypotheses
have finished; 0: stop when no running beam can beat the worst of them any more; below 0: run to
``max_new_tokens``).

Each step scores every running beam's continuations by cumulative log probability (log-softmax of
the logits after the request's own processing: bias, temperature, penalties, bad words), keeps the
``beam_width`` best that do not end, and sets aside those that end (end token or stop word). The
beams share one KV cache batch, reordered to follow their parents. Returned best first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .generate import Request, _ban_bad_words, _penalize, _stopped


@dataclass
class Hypothesis:
    output_ids: list[int]  # generated tokens (an end token excluded)
    cum_log_prob: float
    log_probs: list[float]
    finish_reason: str  # "end" | "stop" | "length"

    def score(self, length_penalty: float) -> float:
        return self.cum_log_prob / max(1, len(self.output_ids)) ** length_penalty


def _step_log_probs(logits: torch.Tensor, request: Request, beams: list[list[int]]) -> torch.Tensor:
    """[beams, vocab] log probabilities of each beam's next token after the request's processing."""
    rows = []
    for row, generated in enumerate(beams):
        scores = _penalize(logits[row].clone(), request, generated)
        _ban_bad_words(scores, generated, request.bad_words)
        rows.append(torch.log_softmax(scores, dim=-1))
    return torch.stack(rows)


def beam_search(
    model: Any, request: Request, beam_width: int, length_penalty: float = 1.0, early_stopping: int = 1
) -> list[Hypothesis]:
    """The ``beam_width`` best hypotheses of ``request``, best first."""
    from transformers import DynamicCache

    cache = DynamicCache()
    ids = torch.tensor([request.input_ids])
    beams: list[list[int]] = [[]]
    cum = torch.zeros(1)
    beam_log_probs: list[list[float]] = [[]]
    finished: list[Hypothesis] = []
    with torch.no_grad():
        for step in range(request.max_new_tokens):
            logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1, :].float()
            log_probs = _step_log_probs(logits, request, beams)
            candidates = (cum[:, None] + log_probs).flatten()
            vocab = log_probs.shape[1]
            order = torch.topk(candidates, min(2 * beam_width, candidates.numel())).indices.tolist()
            parents, tokens, next_cum, next_beams, next_log_probs = [], [], [], [], []
            for flat in order:
                parent, token = divmod(flat, vocab)
                generated = beams[parent] + [token]
                step_log_probs = beam_log_probs[parent] + [float(log_probs[parent, token])]
                if request.end_id is not None and token == request.end_id:
                    finished.append(Hypothesis(beams[parent], float(candidates[flat]), step_log_probs[:-1], "end"))
                elif _stopped(generated, request.stop_words):
                    finished.append(Hypothesis(generated, float(candidates[flat]), step_log_probs, "stop"))
                else:
                    parents.append(parent)
                    tokens.append(token)
                    next_cum.append(float(candidates[flat]))
                    next_beams.append(generated)
                    next_log_probs.append(step_log_probs)
                if len(next_beams) == beam_width:
                    break
            if _done(finished, next_cum, step + 1, beam_width, length_penalty, early_stopping) or not next_beams:
                beams, cum = next_beams, torch.tensor(next_cum)
                beam_log_probs = next_log_probs
                break
            cache.reorder_cache(torch.LongTensor(parents))
            beams, cum, beam_log_probs = next_beams, torch.tensor(next_cum), next_log_probs
            ids = torch.tensor(tokens)[:, None]
    finished += [
        Hypothesis(b, float(c), lp, "length") for b, c, lp in zip(beams, cum.tolist(), beam_log_probs, strict=True)
    ]
    finished.sort(key=lambda h: h.score(length_penalty), reverse=True)
    return finished[:beam_width]


def _done(
    finished: list[Hypothesis],
    running_cum: list[float],
    length: int,
    beam_width: int,
    length_penalty: float,
    early_stopping: int,
) -> bool:
    if len(finished) < beam_width or early_stopping < 0:
        return False
    if early_stopping > 0:
        return True
    # heuristic: the best running beam, scored at its current length, cannot beat the worst kept
    worst = sorted(h.score(length_penalty) for h in finished)[-beam_width]
    return not running_cum or max(running_cum) / length**length_penalty <= worst
