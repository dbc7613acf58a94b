"""lm-evaluation-harness against an OpenAI-compatible endpoint, its per-item results kept.

The harness's ``local-completions`` model sends token ids to ``/v1/completions`` (so context lengths
are exact): generation tasks as completions, log-likelihood tasks as ``echo`` with ``logprobs``. An
endpoint that cannot echo log probabilities would make log-likelihood tasks score at chance without
a word, so it is asked once first and those tasks are refused by name.
"""

from __future__ import annotations

import json
import logging
import os
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError, StageError
from pipeline.stages.evaluate import tasks as builtin

log = logging.getLogger(__name__)

CHANCE_SIGMAS = 2.0  # a score within this many standard errors of chance is suspect


@dataclass
class TaskScore:
    task: str
    metric: str
    score: float
    stderr: float
    items: int
    chance: float | None  # None: unknown for a task of lm-eval's own
    loglikelihood: bool

    @property
    def at_chance(self) -> bool:
        """Within noise of answering at random: never a pass."""
        return self.chance is not None and self.score - self.chance <= CHANCE_SIGMAS * max(self.stderr, 1e-9)


def task_names(names: list[str]) -> list[str]:
    return list(names) or list(builtin.BUILTINS)


def task_problems(names: list[str]) -> list[str]:
    """Task names lm-evaluation-harness does not know, before anything is served."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        return ["eval needs lm-evaluation-harness (lm-eval): run `make venv`"]
    unknown = [n for n in task_names(names) if n not in builtin.BUILTINS]
    if not unknown:
        return []
    manager = TaskManager()
    known = set(manager.all_tasks)
    problems = [f"eval.tasks: {n!r} is not a task of lm-evaluation-harness (see `lm_eval ls tasks`)"
                for n in unknown if n not in known]  # fmt: skip
    absent = [n for n in unknown if n in known and not _data_at_hand(manager, n)]
    if absent and not _hub_reachable():
        problems += [
            f"eval.tasks: the data of {', '.join(absent)} is not at hand: the Hugging Face Hub is not reachable and "
            "HF_DATASETS_CACHE holds no copy (fill the cache on a connected machine, or use the pipeline's own tasks)"
        ]
    return problems


def _data_at_hand(manager: Any, name: str) -> bool:
    """Whether the task loads from the local datasets cache alone (both libraries read their
    offline switches at call time from these attributes, set only for the check)."""
    import datasets.config
    import huggingface_hub.constants
    from lm_eval.tasks import get_task_dict

    switches = [(datasets.config, "HF_HUB_OFFLINE"), (huggingface_hub.constants, "HF_HUB_OFFLINE")]
    saved = [getattr(module, key) for module, key in switches]
    for module, key in switches:
        setattr(module, key, True)
    try:
        get_task_dict([name], manager)
        return True
    except Exception:  # datasets raises a ConnectionError, a FileNotFoundError or its own errors
        return False
    finally:
        for (module, key), value in zip(switches, saved, strict=True):
            setattr(module, key, value)


def _hub_reachable() -> bool:
    try:
        with urllib.request.urlopen(os.environ.get("HF_ENDPOINT", "https://huggingface.co"), timeout=5):
            return True
    except (urllib.error.URLError, OSError, ValueError):
        return False


def can_score_prompts(base_url: str, model: str, api_key: str | None) -> str | None:
    """None when the endpoint answers echo with logprobs; else what it said."""
    body = {"model": model, "prompt": "The capital of France is", "max_tokens": 1, "logprobs": 1, "echo": True,
            "temperature": 0}  # fmt: skip
    request = urllib.request.Request(
        f"{base_url.rstrip('/')}/completions",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json", **({"authorization": f"Bearer {api_key}"} if api_key else {})},
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            choice = json.loads(response.read())["choices"][0]
        values = (choice.get("logprobs") or {}).get("token_logprobs") or []
        return None if len(values) > 1 and values[1] is not None else "its echo returned no prompt log probabilities"
    except urllib.error.HTTPError as error:
        return f"{error.code}: {error.read().decode(errors='replace')[:300]}"
    except (urllib.error.URLError, OSError, ValueError, KeyError, IndexError) as error:
        return str(error)


def evaluate(
    base_url: str,
    model: str,
    tokenizer_dir: Path,
    names: list[str],
    limit: int | None,
    num_concurrent: int,
    timeout_s: float,
    work: Path,
    api_key: str | None = None,
) -> tuple[list[TaskScore], list[dict[str, Any]]]:
    """Every task scored through the endpoint: the scores and one record per item."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    names = task_names(names)
    # indexing lm-eval's own 14 000 task files takes seconds: only when a task of its own is named
    own = all(n in builtin.BUILTINS for n in names)
    manager = TaskManager(include_path=str(builtin.write(work / "tasks")), include_defaults=not own)
    loglikelihood = [n for n in names if _is_loglikelihood(manager, n)]
    if loglikelihood:
        refused = can_score_prompts(base_url, model, api_key)
        if refused:
            raise ConfigError(
                f"eval.tasks {loglikelihood} score prompt log probabilities, which {base_url} cannot give "
                f"(echo with logprobs on /v1/completions: {refused}); drop them or serve a backend=tensorrt build"
            )
    if api_key:
        os.environ["OPENAI_API_KEY"] = api_key  # how local-completions sends a key (never logged)
    log.info("evaluating %s through %s (%s items per task)", ", ".join(names), base_url, limit or "all")
    try:
        results = lm_eval.simple_evaluate(
            model="local-completions",
            model_args={
                "base_url": f"{base_url.rstrip('/')}/completions",
                "model": model,
                "tokenizer": str(tokenizer_dir),
                "tokenizer_backend": "huggingface",
                "tokenized_requests": True,
                "num_concurrent": num_concurrent,
                "max_retries": 1,
                "timeout": timeout_s,
            },
            tasks=names,
            task_manager=manager,
            limit=limit,
            log_samples=True,
            random_seed=0,
            numpy_random_seed=0,
            torch_random_seed=0,
            fewshot_random_seed=0,
        )
    except (ConfigError, StageError):
        raise
    except Exception as error:  # the harness raises what its HTTP client raised (aiohttp, tenacity)
        first = str(error).splitlines()[0][:300] if str(error) else type(error).__name__
        raise StageError(f"lm-evaluation-harness failed against {base_url}: {first}") from error
    if results is None:
        raise StageError("lm-evaluation-harness returned no results")
    scores = [_score(name, results["results"][name], name in loglikelihood) for name in names]
    items = [_item(name, sample) for name in names for sample in results["samples"][name]]
    return scores, items


def _is_loglikelihood(manager: Any, name: str) -> bool:
    if name in builtin.BUILTINS:
        return builtin.BUILTINS[name].loglikelihood
    from lm_eval.tasks import get_task_dict

    task = get_task_dict([name], manager)[name]
    return str(getattr(task, "OUTPUT_TYPE", "")) in ("loglikelihood", "multiple_choice", "loglikelihood_rolling")


def _score(name: str, result: dict[str, Any], loglikelihood: bool) -> TaskScore:
    key = next(k for k in result if "," in k and "_stderr" not in k)
    stderr = result.get(key.replace(",", "_stderr,", 1))
    known = builtin.BUILTINS.get(name)
    return TaskScore(
        task=name,
        metric=key.split(",")[0],
        score=float(result[key]),
        stderr=float(stderr) if isinstance(stderr, int | float) else 0.0,
        items=int(result.get("sample_len", 0)),
        chance=known.chance if known else None,
        loglikelihood=loglikelihood,
    )


def _item(task: str, sample: dict[str, Any]) -> dict[str, Any]:
    """One item: its id, prompt, reference answer, what the model answered and its score."""
    metric = sample["metrics"][0]
    responses = sample["filtered_resps"]
    if responses and isinstance(responses[0], list | tuple) and len(responses[0]) == 2:
        # multiple choice: the choice with the highest log likelihood is the answer
        answer: Any = max(range(len(responses)), key=lambda i: responses[i][0])
    else:
        answer = responses[0] if responses else None
    first = sample["arguments"][0]
    return {
        "task": task,
        "doc_id": int(sample["doc_id"]),
        "prompt": first[0] if isinstance(first, list | tuple) else str(first),
        "target": sample["target"],
        "answer": answer,
        "score": float(sample[metric]),
    }


def as_json(scores: list[TaskScore]) -> list[dict[str, Any]]:
    return [{**asdict(s), "at_chance": s.at_chance} for s in scores]
