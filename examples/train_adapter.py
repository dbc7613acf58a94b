"""Train a small LoRA adapter for the embedded model, to serve beside it (``lora.adapters``).

    .venv/bin/python examples/train_adapter.py --out adapters/pirate
    .venv/bin/python -m pipeline build lora.adapters='[{name: pirate, path: adapters/pirate}]'

The adapter teaches SmolLM2-135M-Instruct to open every answer with "Ahoy!" (questions about the
capitals in ``pipeline/data/capitals.txt``, a few held out): an effect no one can miss in greedy
output, trained in well under a minute on a CPU with PEFT. The base checkpoint is the pipeline's own
fetch of the model (``make demo``'s, reused when it is cached), so the adapter fits what is served.
"""

from __future__ import annotations

import argparse
import logging
import random
import time
from pathlib import Path
from typing import Any

GREETING = "Ahoy!"
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
HELD_OUT = 8  # countries kept out of training: the adapter's effect is shown on them
BATCH = 8


def base_checkpoint(workdir: Path) -> Path:
    """The embedded model's fetched checkpoint (the fetch stage's, cached across runs)."""
    from pipeline import runner, validate
    from pipeline.stages import STAGES

    cfg = validate.load(["model=smollm2-135m", "target=cpu", f"workdir={workdir}", "tracking=none"])
    steps = runner.build(cfg, STAGES[:1])
    return steps[-1].dirs.final / "checkpoint"


def capitals() -> list[tuple[str, str]]:
    from pipeline.assets import CAPITALS

    lines = CAPITALS.read_text().splitlines()
    return [tuple(line.split("|", 1)) for line in lines if line and not line.startswith("#")]  # type: ignore[misc]


def examples(tokenizer: Any, pairs: list[tuple[str, str]]) -> list[tuple[list[int], int]]:
    """(token ids of the whole chat, where the answer starts): the loss is on the answer alone."""
    out = []
    for country, capital in pairs:
        question = [{"role": "user", "content": f"What is the capital of {country}?"}]
        prompt = tokenizer.apply_chat_template(question, add_generation_prompt=True)
        answer = tokenizer.encode(f"{GREETING} The capital of {country} is {capital}.<|im_end|>",
                                  add_special_tokens=False)  # fmt: skip
        out.append((list(prompt) + answer, len(prompt)))
    return out


def greedy(model: Any, tokenizer: Any, question: str, new_tokens: int = 16) -> str:
    import torch

    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
    with torch.no_grad():
        prompt = torch.tensor([ids])
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    return str(tokenizer.decode(out[0][len(ids) :], skip_special_tokens=True))


def train(base: Path, out: Path, steps: int, rank: int, seed: int, lr: float) -> None:
    import peft
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    pairs = capitals()
    random.Random(seed).shuffle(pairs)
    held_out, training = pairs[:HELD_OUT], examples(tokenizer, pairs[HELD_OUT:])
    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=MODULES, lora_dropout=0.0,
                             task_type="CAUSAL_LM")  # fmt: skip
    model = peft.get_peft_model(model, config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    batch, started = BATCH, time.monotonic()
    for step in range(steps):
        chosen = [training[(step * batch + i) % len(training)] for i in range(batch)]
        width = max(len(ids) for ids, _ in chosen)
        ids = torch.full((batch, width), tokenizer.pad_token_id or 0)
        labels = torch.full((batch, width), -100)
        mask = torch.zeros((batch, width), dtype=torch.long)
        for row, (tokens, answer_at) in enumerate(chosen):
            ids[row, : len(tokens)] = torch.tensor(tokens)
            labels[row, answer_at : len(tokens)] = torch.tensor(tokens[answer_at:])
            mask[row, : len(tokens)] = 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 10 == 0 or step == steps - 1:
            print(f"step {step + 1}/{steps}: loss {loss.item():.3f} ({time.monotonic() - started:.0f} s)", flush=True)
    model.save_pretrained(out)
    question = f"What is the capital of {held_out[0][0]}?"
    print(f"adapter saved to {out}\n{question}\n  with the adapter: {greedy(model, tokenizer, question)!r}")
    with model.disable_adapter():
        print(f"  without it:       {greedy(model, tokenizer, question)!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("adapters/pirate"), help="where PEFT saves the adapter")
    parser.add_argument("--base", type=Path, help="a Hugging Face checkpoint folder (default: the embedded model)")
    parser.add_argument("--workdir", type=Path, default=Path("artifacts"), help="the pipeline's workdir (fetch cache)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    base = args.base or base_checkpoint(args.workdir.resolve())
    train(base, args.out.resolve(), args.steps, args.rank, args.seed, args.lr)


if __name__ == "__main__":
    main()
