"""One forward pass of a transformers Llama over a packed step: the new tokens of every scheduled
sequence side by side (no padding), keys and values read from and written to the paged cache.

This is how TensorRT-LLM runs a step with ``remove_input_padding``: prompt chunks (context phase)
and single tokens (generation phase) share one pass, so the linear layers see one [tokens, hidden]
matrix whatever the mix. Only attention differs per sequence: generation-phase sequences attend
in padded batches of like length over their gathered blocks, each prompt chunk on its own with a
causal mask offset by what is already cached. The model's own modules do the work (norms, projections with
the checkpoint's quantization hooks, rotary embedding, MLP), so the numbers are the model's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from . import lora
from .kvcache import BlockTable, KVCache


@dataclass
class Span:
    """One sequence's part of a step: positions start..start+count-1, all after ``start`` new."""

    table: BlockTable
    tokens: list[int]  # the new tokens
    start: int  # positions already in the cache
    wants_logits: bool  # the span ends the sequence's known tokens: the next one is chosen from it
    all_logits: bool = False  # logits of every position, not only the last (context logits)
    adapter: lora.Adapter | None = None  # the request's LoRA adapter, applied to its rows alone

    @property
    def stop(self) -> int:
        return self.start + len(self.tokens)


Join = Callable[[], list[Span]]  # spans that join a step under way (none: nobody is waiting)


def forward(model: Any, cache: KVCache, spans: list[Span], join: Join | None = None) -> list[torch.Tensor]:
    """Run ``spans`` through the model, writing their keys and values into ``cache``. Returns, per
    span, float32 logits [rows, vocab]: of every position when it wants all of them, of its last
    position when it wants logits, none otherwise.

    ``join`` is asked between layers for spans that arrived meanwhile: they run through the layers
    already done on their own, then on with the others, and their logits follow those of
    ``spans`` in the result. A request that arrives during a step is then answered in it, not one
    step later: at concurrency 8 on a CPU a step is 100-400 ms, so this is most of the wait a
    newcomer would otherwise see."""
    inner = model.model
    spans = list(spans)
    with torch.no_grad():
        step = _Step(inner, cache, spans)
        hidden = inner.embed_tokens(step.ids)  # [tokens, hidden]
        for index, layer in enumerate(inner.layers):
            hidden = _layer(layer, index, hidden, step, cache)
            joining = join() if join is not None and index + 1 < len(inner.layers) else []
            if joining:
                late = _Step(inner, cache, joining)
                caught_up = inner.embed_tokens(late.ids)
                for done in range(index + 1):
                    caught_up = _layer(inner.layers[done], done, caught_up, late, cache)
                spans += joining
                step = _Step(inner, cache, spans)
                hidden = torch.cat([hidden, caught_up])
        # lm_head (the largest matrix) only on the rows someone reads
        read = [_logit_rows(span, step.offsets[i]) for i, span in enumerate(spans)]
        wanted = torch.tensor([row for span_rows in read for row in span_rows], dtype=torch.long)
        logits = model.lm_head(inner.norm(hidden[wanted])).float()
        return list(logits.split([len(r) for r in read]))


class _Step:
    """Where every token of a step's spans sits: its row, position and cache slot; how the
    generation-phase rows gather their blocks; which rows are prompt chunks."""

    def __init__(self, inner: Any, cache: KVCache, spans: list[Span]):
        size = self.size = cache.block_size
        self.spans = spans
        self.ids = torch.tensor([t for s in spans for t in s.tokens], dtype=torch.long)
        positions = torch.cat([torch.arange(s.start, s.stop) for s in spans])
        # the rotary embedding reads only the dtype and device of its first argument
        cos, sin = inner.rotary_emb(inner.embed_tokens.weight[None], positions[None])  # [1, tokens, head_dim]
        self.cos, self.sin = cos[0], sin[0]
        self.writes = torch.cat([s.table.slots(s.start, s.stop, size) for s in spans])
        self.offsets = [0]
        for span in spans:
            self.offsets.append(self.offsets[-1] + len(span.tokens))
        single = [i for i, s in enumerate(spans) if len(s.tokens) == 1]
        self.chunks = [i for i, s in enumerate(spans) if len(s.tokens) > 1]
        # generation phase: padded gathers of the sequences' blocks (whole blocks: far fewer
        # indices than positions), positions past a sequence's end masked out; sequences of
        # like length share one, so that one long sequence does not pad every short one to it
        widths = [len(spans[i].table.blocks) for i in single]
        self.groups = [
            _Group(spans, [single[j] for j in members], self.offsets, cache) for members in by_length(widths)
        ]
        self.chunk_blocks = {i: torch.tensor(spans[i].table.blocks[: -(-spans[i].stop // size)]) for i in self.chunks}
        # the rows of each adapter in the step (multi-LoRA: every request its own, or none)
        rows: dict[str, list[int]] = {}
        adapters: dict[str, lora.Adapter] = {}
        for i, span in enumerate(spans):
            if span.adapter is not None:
                adapters[span.adapter.name] = span.adapter
                rows.setdefault(span.adapter.name, []).extend(range(self.offsets[i], self.offsets[i + 1]))
        self.adapters = [(adapters[name], torch.tensor(r, dtype=torch.long)) for name, r in rows.items()]
        self.adapted_mlp = any(adapter.touches_mlp for adapter, _ in self.adapters)


class _Group:
    """Generation-phase rows attended together: one padded gather of their blocks."""

    def __init__(self, spans: list[Span], members: list[int], offsets: list[int], cache: KVCache):
        size = cache.block_size
        self.widest = max(len(spans[i].table.blocks) for i in members)
        self.gather = torch.full((len(members), self.widest), cache.padding_block, dtype=torch.long)
        self.visible = torch.zeros((len(members), 1, 1, self.widest * size), dtype=torch.bool)
        for row, i in enumerate(members):
            blocks = spans[i].table.blocks
            self.gather[row, : len(blocks)] = torch.tensor(blocks, dtype=torch.long)
            self.visible[row, ..., : spans[i].stop] = True
        self.rows = torch.tensor([offsets[i] for i in members], dtype=torch.long)


SHARED_PADDING_BLOCKS = 8  # sequences of at most this many blocks always share a gather


def by_length(widths: list[int]) -> list[list[int]]:
    """Indices of ``widths`` (blocks per sequence) in groups of like width: a group's widest has
    at most twice the blocks of its narrowest, or at most SHARED_PADDING_BLOCKS, so padding at
    most about doubles what a group gathers however mixed the lengths; one group when alike."""
    groups: list[list[int]] = []
    for i in sorted(range(len(widths)), key=widths.__getitem__):
        if groups and widths[i] <= max(2 * widths[groups[-1][0]], SHARED_PADDING_BLOCKS):
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def _layer(layer: Any, index: int, hidden: torch.Tensor, step: _Step, cache: KVCache) -> torch.Tensor:
    """One decoder layer over the step's rows, its keys and values written to the cache."""
    attn, size, spans = layer.self_attn, step.size, step.spans
    tokens = len(step.ids)
    x = layer.input_layernorm(hidden)
    q = (
        _proj(attn.q_proj, "q_proj", x, index, step).view(tokens, -1, attn.head_dim).transpose(0, 1)
    )  # [heads, tokens, dim]
    k = _proj(attn.k_proj, "k_proj", x, index, step).view(tokens, -1, attn.head_dim).transpose(0, 1)
    v = _proj(attn.v_proj, "v_proj", x, index, step).view(tokens, -1, attn.head_dim)
    q, k = _rotate(q, k, step.cos, step.sin)
    keys, values = cache.keys[index], cache.values[index]  # [slots, kv_heads, dim]
    keys.index_copy_(0, step.writes, k.transpose(0, 1).to(keys.dtype))
    values.index_copy_(0, step.writes, v.to(values.dtype))
    out = torch.empty_like(q)  # [heads, tokens, dim]
    for group in step.groups:
        paged = (len(group.rows), group.widest * size, *keys.shape[1:])  # [batch, positions, kv_heads, dim]
        # index_select, not indexing: on CPU it gathers rows several times faster
        k_all = _blocks(keys, size, group.gather).view(paged).transpose(1, 2).to(q.dtype)
        v_all = _blocks(values, size, group.gather).view(paged).transpose(1, 2).to(q.dtype)
        q_single = q.index_select(1, group.rows).transpose(0, 1).unsqueeze(2)  # [batch, heads, 1, dim]
        attended = F.scaled_dot_product_attention(
            q_single, k_all, v_all, attn_mask=group.visible, scale=attn.scaling, enable_gqa=True
        )
        out.index_copy_(1, group.rows, attended.squeeze(2).transpose(0, 1))
    for i in step.chunks:
        span, rows = spans[i], slice(step.offsets[i], step.offsets[i + 1])
        # [1, kv_heads, length, dim] from the sequence's whole blocks, cut at its end
        k_seq = _blocks(keys, size, step.chunk_blocks[i]).flatten(0, 1)[: span.stop]
        v_seq = _blocks(values, size, step.chunk_blocks[i]).flatten(0, 1)[: span.stop]
        k_seq = k_seq.transpose(0, 1).unsqueeze(0).to(q.dtype)
        v_seq = v_seq.transpose(0, 1).unsqueeze(0).to(q.dtype)
        # query at position p sees keys 0..p
        mask = torch.arange(span.stop)[None, :] <= torch.arange(span.start, span.stop)[:, None]
        attended = F.scaled_dot_product_attention(
            q[None, :, rows], k_seq, v_seq, attn_mask=mask, scale=attn.scaling, enable_gqa=True
        )
        out[:, rows] = attended[0]
    hidden = hidden + _proj(attn.o_proj, "o_proj", out.transpose(0, 1).reshape(tokens, -1), index, step)
    x = layer.post_attention_layernorm(hidden)
    if not step.adapted_mlp:
        return hidden + layer.mlp(x)
    mlp = layer.mlp  # Llama's: down(act(gate(x)) * up(x)), each projection adapted on its rows
    gated = mlp.act_fn(_proj(mlp.gate_proj, "gate_proj", x, index, step)) * _proj(
        mlp.up_proj, "up_proj", x, index, step
    )
    return hidden + _proj(mlp.down_proj, "down_proj", gated, index, step)


def _proj(linear: Any, name: str, x: torch.Tensor, index: int, step: _Step) -> torch.Tensor:
    """A projection of the base model over every row, plus each adapter's low-rank update on its
    own rows."""
    out = linear(x)
    for adapter, rows in step.adapters:
        update = lora.delta(adapter, index, name, x.index_select(0, rows))
        if update is not None:
            out.index_add_(0, rows, update)
    return out


def _logit_rows(span: Span, offset: int) -> list[int]:
    if span.all_logits:
        return list(range(offset, offset + len(span.tokens)))
    return [offset + len(span.tokens) - 1] if span.wants_logits else []


def _blocks(slots: torch.Tensor, size: int, blocks: torch.Tensor) -> torch.Tensor:
    """The cache blocks ``blocks`` (any shape of block ids) of a [slots, kv_heads, dim] layer cache,
    as [*blocks.shape, size, kv_heads, dim]."""
    paged = slots.view(-1, size, *slots.shape[1:])
    return paged.index_select(0, blocks.flatten()).view(*blocks.shape, size, *slots.shape[1:])


def _rotate(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of [heads, tokens, dim] queries and keys at their own positions."""

    def half_turn(x: torch.Tensor) -> torch.Tensor:
        first, second = x.chunk(2, dim=-1)
        return torch.cat((-second, first), dim=-1)

    return q * cos + half_turn(q) * sin, k * cos + half_turn(k) * sin
