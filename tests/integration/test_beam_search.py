"""Beam search of the reference runtime on the tiny Llama, against exhaustive search and against the
log probabilities of each returned sequence recomputed from scratch (no KV cache)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from pipeline.runtime.beam import beam_search
from pipeline.runtime.checkpoint import load_model
from pipeline.runtime.generate import Request

pytestmark = pytest.mark.slow  # a real Triton (14 s to start)

PROMPT = [1, 7, 3, 9]


@pytest.fixture(scope="module")
def model(tiny_engine: Path) -> Any:
    return load_model(tiny_engine)


def _log_prob(model: Any, prompt: list[int], continuation: list[int]) -> float:
    """log p(continuation | prompt), one full forward pass, no cache."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + continuation])).logits[0].float()
    log_probs = torch.log_softmax(logits, dim=-1)
    return sum(float(log_probs[len(prompt) - 1 + i, token]) for i, token in enumerate(continuation))


def test_a_beam_as_wide_as_the_vocabulary_finds_the_most_likely_continuation(model: Any) -> None:
    vocab = model.config.vocab_size
    (best, *_) = beam_search(model, Request(PROMPT, max_new_tokens=2), beam_width=vocab)
    with torch.no_grad():  # exhaustive: every pair of tokens
        first = torch.log_softmax(model(input_ids=torch.tensor([PROMPT])).logits[0, -1].float(), -1)
        pairs = torch.tensor([[*PROMPT, t] for t in range(vocab)])
        second = torch.log_softmax(model(input_ids=pairs).logits[:, -1].float(), -1)
    totals = first[:, None] + second
    expected = divmod(int(torch.argmax(totals)), vocab)
    assert tuple(best.output_ids) == expected
    assert best.cum_log_prob == pytest.approx(float(totals.max()), abs=1e-4)


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_beams_come_best_first_with_their_true_log_probabilities(model: Any, length_penalty: float) -> None:
    beams = beam_search(model, Request(PROMPT, max_new_tokens=5, end_id=2), beam_width=4, length_penalty=length_penalty)
    assert len(beams) == 4 and len({tuple(b.output_ids) for b in beams}) == 4
    scores = [b.score(length_penalty) for b in beams]
    assert scores == sorted(scores, reverse=True)
    for beam in beams:  # the cache reordering kept every beam on its own history
        ended = [2] if beam.finish_reason == "end" else []
        assert beam.cum_log_prob == pytest.approx(_log_prob(model, PROMPT, beam.output_ids + ended), abs=1e-3)
        assert sum(beam.log_probs) == pytest.approx(_log_prob(model, PROMPT, beam.output_ids), abs=1e-3)


def test_one_step_beams_are_the_top_tokens(model: Any) -> None:
    beams = beam_search(model, Request(PROMPT, max_new_tokens=1), beam_width=3)
    with torch.no_grad():
        top = torch.topk(model(input_ids=torch.tensor([PROMPT])).logits[0, -1], 3).indices.tolist()
    assert [b.output_ids[0] for b in beams] == top


def test_searching_past_early_stopping_can_only_find_better_hypotheses(model: Any) -> None:
    """early_stopping=-1 keeps searching with the same beams after early_stopping=1 would stop, so
    its best hypothesis scores at least as well."""
    request = Request(PROMPT, max_new_tokens=6, end_id=2)
    stopped = beam_search(model, request, beam_width=2, early_stopping=1)
    never = beam_search(model, request, beam_width=2, early_stopping=-1)
    assert never[0].score(1.0) >= stopped[0].score(1.0) - 1e-6
