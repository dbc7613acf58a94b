"""Multi-LoRA in the reference runtime (``pipeline.runtime.lora``) against PEFT itself: adapters
trained here with PEFT on the tiny Llama, each request's answer from the in-flight scheduler equal
token for token to PEFT's greedy decoding with that adapter, in a batch that mixes two adapters
and the base model; prefixes cached under one adapter are not reused by another; adapters that the
engine path cannot serve are refused in one line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from pipeline.runtime import lora
from pipeline.runtime.checkpoint import load_model
from pipeline.runtime.generate import Request, generate
from pipeline.runtime.scheduler import Scheduler, SchedulerConfig
from tests.integration.test_scheduler import Client, _run

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.slow  # PEFT trains two adapters

PROMPTS = [[1, 5, 9], [1, 4, 4, 8, 10, 12, 2], [1, 7, 3, 3]]


def _train(checkpoint: Path, out: Path, target: int, modules: list[str], seed: int) -> Path:
    """A LoRA adapter that makes the tiny model answer ``target`` after any prompt: a few steps of
    PEFT training, unmistakable in greedy output."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(checkpoint, torch_dtype=torch.float32)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=modules, lora_dropout=0.0)
    model = peft.get_peft_model(base, config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    for _ in range(30):
        for prompt in PROMPTS:
            ids = torch.tensor([prompt + [target] * 4])
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("adapters")
    return {
        "sevens": _train(tiny_checkpoint, folder / "sevens", 7, ["q_proj", "v_proj"], seed=1),
        "elevens": _train(tiny_checkpoint, folder / "elevens", 11, ["q_proj", "k_proj", "v_proj", "o_proj",
                                                                    "gate_proj", "up_proj", "down_proj"], seed=2),
    }  # fmt: skip


def _peft_greedy(
    checkpoint: Path, adapters: dict[str, Path], cases: list[tuple[list[int], str | None]], new: int
) -> list[list[int]]:
    """PEFT's own greedy answer to each (prompt, adapter) case: the base model with every adapter
    loaded, the case's adapter active (none: adapters disabled)."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(checkpoint, torch_dtype=torch.float32)
    first, *rest = adapters
    model = peft.PeftModel.from_pretrained(base, adapters[first], adapter_name=first)
    for name in rest:
        model.load_adapter(adapters[name], adapter_name=name)
    answers = []
    for prompt, name in cases:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            if name is None:
                with model.disable_adapter():
                    out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
            else:
                model.set_adapter(name)
                out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        answers.append(out[0, len(prompt) :].tolist())
    return answers


def test_each_request_gets_its_adapter_in_a_mixed_batch_as_peft_decodes_it(
    tiny_checkpoint: Path, tiny_engine: Path, adapters: dict[str, Path]
) -> None:
    model = load_model(tiny_engine)
    loaded = {name: lora.load(folder, name) for name, folder in adapters.items()}
    scheduler = Scheduler(model, SchedulerConfig(max_batch_size=8, max_num_tokens=64, kv_cache_tokens=1024,
                                                 tokens_per_block=4))  # fmt: skip
    cases = [(prompt, name) for prompt in PROMPTS for name in (None, "sevens", "elevens")]
    clients = [Client() for _ in cases]
    for client, (prompt, name) in zip(clients, cases, strict=True):
        adapter = loaded[name] if name else None
        client.submit(scheduler, Request(list(prompt), max_new_tokens=6, adapter=adapter))
    _run(scheduler, clients)  # all nine in one batch: three adapters' rows in every step
    expected = _peft_greedy(tiny_checkpoint, adapters, cases, 6)
    for client, case, peft_answer in zip(clients, cases, expected, strict=True):
        assert client.result is not None, client.error
        assert client.result.output_ids == peft_answer, case
    answered = [(name, c.result.output_ids) for c, (_, name) in zip(clients, cases, strict=True) if c.result]
    assert all(ids[-3:] == [7, 7, 7] for name, ids in answered if name == "sevens")  # the training shows
    assert all(ids[-3:] == [11, 11, 11] for name, ids in answered if name == "elevens")


def test_a_prefix_cached_under_one_adapter_is_not_reused_by_another(
    tiny_engine: Path, adapters: dict[str, Path]
) -> None:
    model = load_model(tiny_engine)
    sevens = lora.load(adapters["sevens"], "sevens")
    scheduler = Scheduler(model, SchedulerConfig(max_batch_size=2, max_num_tokens=64, kv_cache_tokens=1024,
                                                 tokens_per_block=4))  # fmt: skip
    prompt = [1, 4, 4, 8, 10, 12, 2, 5, 6, 3]
    for adapter, reused in ((None, 0), (sevens, 0), (sevens, 2), (None, 2)):
        client = Client()
        sequence = client.submit(scheduler, Request(list(prompt), max_new_tokens=2, adapter=adapter))
        _run(scheduler, [client])
        assert sequence.table.reused == reused, (adapter, sequence.table.reused)


def test_adapters_the_engine_path_cannot_serve_are_refused_in_one_line(
    adapters: dict[str, Path], tmp_path: Path
) -> None:
    config = json.loads((adapters["sevens"] / lora.CONFIG).read_text())
    for number, (change, said) in enumerate(
        (
            ({"use_dora": True}, "DoRA is not served"),
            ({"bias": "all"}, "bias=all"),
            ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
            ({"target_modules": ["embed_tokens"]}, "['embed_tokens'] are not served"),
            ({"rank_pattern": {"q_proj": 8}}, "rank_pattern"),
        )
    ):
        folder = tmp_path / str(number)
        folder.mkdir()
        (folder / lora.CONFIG).write_text(json.dumps({**config, **change}))
        with pytest.raises(lora.AdapterError, match=re.escape(said)) as refused:
            lora.read_config(folder)
        assert "\n" not in str(refused.value)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / lora.CONFIG).write_text(json.dumps(config))
    (pickled / "adapter_model.bin").write_bytes(b"not loaded")
    with pytest.raises(lora.AdapterError, match=r"pickled adapter_model\.bin is not loaded"):
        lora.load(pickled, "pickled")
    with pytest.raises(ValueError, match="in-flight batching"):  # refused before any model is touched
        generate(object(), [Request([1, 2], adapter=lora.load(adapters["sevens"], "sevens"))])


def test_the_adapter_cache_keeps_the_most_recently_used(adapters: dict[str, Path]) -> None:
    sevens, elevens = lora.load(adapters["sevens"], "sevens"), lora.load(adapters["elevens"], "elevens")
    cache = lora.AdapterCache(1)
    cache.put(7, sevens)
    assert cache.get(7) is sevens
    cache.put(11, elevens)  # one slot: sevens is dropped and must be sent again
    assert cache.get(7) is None and cache.get(11) is elevens
