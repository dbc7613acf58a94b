"""eval: serve the rendered repository as ``serve`` does (the OpenAI gateway in front), run
lm-evaluation-harness's tasks through its API, stop it.

Reads: the triton_repo stage's ``repository/``; ``eval.*`` (tasks, items per task).
Writes: ``eval.json`` (each task's score, standard error, items and chance level) and
``items.jsonl`` (prompt, reference answer, the deployment's answer and score, per item), the
records the accuracy gate pairs with the unquantized reference's (``paired.py``).
Cached by fingerprint: the unquantized reference of a sweep of formats is evaluated once.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from pipeline.artifacts import EVAL_ITEMS, EVAL_JSON, REPOSITORY
from pipeline.config.schema import Backend, PipelineConfig
from pipeline.deploy import server, serving
from pipeline.deploy.openai import adapters
from pipeline.errors import StageError
from pipeline.stages.evaluate import harness
from pipeline.stages.evaluate import tasks as builtin
from pipeline.workspace import StageWorkspace

NAME = "eval"
VERSION = 1
TOOLS = ("lm_eval", "tritonclient")
KEEP_ON_ERROR = True
LORA_EVAL_DIR = "lora"  # each shipped adapter's scores and items: lora/<name>/

log = logging.getLogger(__name__)


def scoring_problem(cfg: PipelineConfig) -> str | None:
    """Why the served deployment cannot score prompts (log-likelihood tasks), or None."""
    if cfg.backend is Backend.pytorch:
        return "the LLM-API model of backend=pytorch returns no prompt log probabilities"
    if cfg.target.is_gpu and "--gather_context_logits" not in cfg.build.extra_args:
        return "the engine returns context logits only when built with build.extra_args=[--gather_context_logits]"
    return None


def task_names(cfg: PipelineConfig) -> list[str]:
    """The tasks this build is evaluated on: ``eval.tasks``, else the pipeline's own, leaving out
    the log-likelihood one where the deployment cannot score prompts."""
    if cfg.eval.tasks:
        return list(cfg.eval.tasks)
    if scoring_problem(cfg):
        return [name for name, task in builtin.BUILTINS.items() if not task.loglikelihood]
    return list(builtin.BUILTINS)


def depends_on(cfg: PipelineConfig) -> dict[str, Any]:
    if not cfg.eval.enabled:
        return {"enabled": False}
    # the shipped adapters are evaluated too: the repository's fingerprint, an input, covers them
    return {"tasks": task_names(cfg), "limit": cfg.eval.limit}


def preflight(cfg: PipelineConfig) -> list[str]:
    if not cfg.eval.enabled:
        return []
    problems = harness.task_problems(task_names(cfg))
    why = scoring_problem(cfg)
    if why:
        scoring = [n for n in cfg.eval.tasks if n in builtin.BUILTINS and builtin.BUILTINS[n].loglikelihood]
        problems += [f"eval.tasks: {n} scores prompt log probabilities, and {why}: drop it" for n in scoring]
    return problems


def run(cfg: PipelineConfig, ws: StageWorkspace) -> dict[str, Any]:
    if not cfg.eval.enabled:
        return {"skipped": "eval=none"}
    target = server.target_of_repository(ws.input("triton_repo") / REPOSITORY, ws.out)
    scores = evaluate_target(cfg, target, ws.out)
    adapters = {name: harness.as_json(adapted) for name, adapted in scores.items() if name}
    return {"tasks": harness.as_json(scores[""]), **({"adapters": adapters} if adapters else {})}


def adapter_dir(out: Path, adapter: str) -> Path:
    """Where an adapter's scores and items are written, beside the base model's."""
    return out / LORA_EVAL_DIR / adapter


def evaluate_target(cfg: PipelineConfig, target: server.Target, out: Path) -> dict[str, list[harness.TaskScore]]:
    """``target`` served as ``serve`` serves it, evaluated through its OpenAI API into ``out``: the
    base model (key ""), then each LoRA adapter the repository ships, asked for by name, into
    ``out/lora/<name>`` (the accuracy gate pairs each with the same adapter on the unquantized base)."""
    names = task_names(cfg)
    why = scoring_problem(cfg)
    if not cfg.eval.tasks and why:
        log.warning("%s: evaluating %s only (no log-likelihood task)", why, ", ".join(names))
    key = os.environ.get(cfg.openai.api_key_env) or None
    with serving.serving(cfg, target, out / "server.log", openai=True, free_ports=True) as served:
        if served.openai_url is None:
            raise StageError("eval needs the served OpenAI API: it was not started")
        model = served.served_model or serving.served_model(served.openai_url, None)
        key = key if served.frontend == "triton" else None
        scores = {"": evaluate_url(cfg, served.openai_url, model, target.tokenizer_dir, out, names, key)}
        for adapter in adapters.from_repository(target.repo) if served.frontend == "triton" else {}:
            log.info("evaluating LoRA adapter %s", adapter)
            where = adapter_dir(out, adapter)
            scores[adapter] = evaluate_url(cfg, served.openai_url, adapter, target.tokenizer_dir, where, names, key)
        return scores


def evaluate_url(
    cfg: PipelineConfig, url: str, model: str, tokenizer_dir: Path, out: Path, names: list[str], key: str | None
) -> list[harness.TaskScore]:
    """Any OpenAI-compatible server at ``url`` evaluated; scores and items written into ``out``."""
    scores, items = harness.evaluate(
        url, model, tokenizer_dir, names, cfg.eval.limit, cfg.eval.num_concurrent, cfg.eval.timeout_s, out, key
    )
    for score in scores:
        flag = " (within noise of chance: suspect, never a pass)" if score.at_chance else ""
        log.info("%s: %s %.3f +- %.3f over %d items%s", score.task, score.metric, score.score, score.stderr,
                 score.items, flag)  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / EVAL_JSON).write_text(json.dumps(harness.as_json(scores), indent=2) + "\n")
    (out / EVAL_ITEMS).write_text("".join(json.dumps(item, default=str) + "\n" for item in items))
    return scores
