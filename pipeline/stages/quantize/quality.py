"""Quality of a quantized model against its unquantized self on held-out text: perplexity of
each, the change in %, mean KL divergence of next-token distributions, and top-1 agreement."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from pipeline.stages.quantize.placement import input_device

if TYPE_CHECKING:
    import torch


def log_probs(model: Any, batches: list[torch.Tensor], vocab: int | None = None) -> list[torch.Tensor]:
    """Next-token log-probabilities (float32, on CPU) for every position of every batch.

    ``vocab`` cuts off rows an exporter padded the vocabulary with (ModelOpt pads it to a multiple
    of 64 for AWQ), so distributions of the padded and the source model are comparable."""
    import torch

    device = input_device(model)
    out = []
    with torch.no_grad():
        for batch in batches:
            logits = model(batch.to(device)).logits[..., :vocab].float()
            out.append(torch.log_softmax(logits, dim=-1).cpu())
    return out


def compare(batches: list[torch.Tensor], base: list[torch.Tensor], quant: list[torch.Tensor]) -> dict[str, float]:
    """Metrics over positions that have a next token (the last position of a window has none)."""

    nll_base = nll_quant = kl = agree = 0.0
    tokens = 0
    for ids, lp_base, lp_quant in zip(batches, base, quant, strict=True):
        targets = ids[:, 1:].unsqueeze(-1)
        lp_base, lp_quant = lp_base[:, :-1], lp_quant[:, :-1]
        nll_base -= lp_base.gather(-1, targets).sum().item()
        nll_quant -= lp_quant.gather(-1, targets).sum().item()
        kl += (lp_base.exp() * (lp_base - lp_quant)).sum().item()
        agree += (lp_base.argmax(-1) == lp_quant.argmax(-1)).sum().item()
        tokens += targets.numel()
    if not tokens:
        return {}
    ppl_base, ppl_quant = math.exp(nll_base / tokens), math.exp(nll_quant / tokens)
    return {
        "perplexity_baseline": round(ppl_base, 4),
        "perplexity_quantized": round(ppl_quant, 4),
        "perplexity_change_pct": round((ppl_quant / ppl_base - 1) * 100, 4),
        "kl_divergence_mean": max(0.0, kl / tokens),  # tiny negatives are float rounding
        "top1_agreement": agree / tokens,
        "tokens_evaluated": tokens,
    }


def agreement(reference: list[torch.Tensor], other: list[torch.Tensor]) -> dict[str, float]:
    """How closely two models' next-token distributions agree, position by position."""
    kl = agree = worst = 0.0
    positions = 0
    for lp_ref, lp_other in zip(reference, other, strict=True):
        kl += (lp_ref.exp() * (lp_ref - lp_other)).sum().item()
        agree += (lp_ref.argmax(-1) == lp_other.argmax(-1)).sum().item()
        worst = max(worst, (lp_ref - lp_other).abs().max().item())
        positions += lp_ref.shape[0] * lp_ref.shape[1]
    return {
        "kl_divergence_mean": max(0.0, kl / positions),
        "top1_agreement": agree / positions,
        "max_abs_logprob_diff": worst,
        "positions": positions,
    }
