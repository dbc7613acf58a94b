"""Running the gateway next to a Triton server: uvicorn on its own thread, stopped with the server."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.artifacts import REPO_CHECKPOINT_DIR, REPO_TOKENIZER_DIR, REPOSITORY_JSON
from pipeline.config.schema import OpenAIConfig
from pipeline.deploy.openai import adapters
from pipeline.deploy.openai.app import GatewaySettings, create_app
from pipeline.deploy.openai.llmapi_entry import LlmApiLayout
from pipeline.errors import StageError

if TYPE_CHECKING:  # uvicorn is imported when the gateway starts
    import uvicorn

log = logging.getLogger(__name__)


def settings_for(
    openai: OpenAIConfig, repo: Path, served_model: str, grpc_url: str, metrics_url: str | None = None
) -> GatewaySettings:
    """The gateway's settings for a rendered repository served at ``grpc_url`` (``metrics_url``:
    Triton's metrics, where the CPU engine's heartbeat is read for ``/health``)."""
    info = json.loads((repo / REPOSITORY_JSON).read_text())
    layout = None
    tokenizer_dir = repo / REPO_TOKENIZER_DIR
    refused = scoring_refusal(info)
    if info.get("backend") == "pytorch":  # the LLM-API layout: one model, text in and out
        entry = str(info["entry_model"])
        layout = llmapi_layout(repo, entry)
        tokenizer_dir = layout.tokenizer_dir
    # the BLS model streams UTF-8-safe text; the ensemble may split a character over two pieces
    elif "tensorrt_llm_bls" in info["models"]:
        entry = "tensorrt_llm_bls"
    else:
        entry = "ensemble"
        log.warning(
            "the repository has no tensorrt_llm_bls model (triton.expose=ensemble): the OpenAI API streams through "
            "the ensemble, which may split a multi-byte character and does not cancel a request whose client left"
        )
    max_seq_len = int(info["max_seq_len"])
    return GatewaySettings(
        served_model=served_model,
        max_model_len=max_seq_len,
        grpc_url=grpc_url,
        entry_model=entry,
        default_max_tokens=openai.default_max_tokens,
        api_key=os.environ.get(openai.api_key_env) or None,
        sampling_defaults=dict(info.get("sampling_defaults", {})),
        request_timeout_s=openai.request_timeout_s,
        max_body_bytes=openai.max_body_bytes or max_seq_len * 64 + 2**20,
        metrics_url=metrics_url,
        llmapi=layout,
        tokenizer_dir=tokenizer_dir,
        scoring_refused=refused,
        adapters=adapters.from_repository(repo, info),
    )


def scoring_refusal(info: dict[str, Any]) -> str | None:
    """Why this repository cannot score prompts (echo with logprobs), or None when it can."""
    if info.get("backend") == "pytorch":
        return (
            "echo: the LLM-API model of backend=pytorch returns no prompt log probabilities; serve a "
            "backend=tensorrt build to score prompts"
        )
    # repositories rendered before the key existed: the CPU engine always returns context logits
    if not info.get("context_logits", info.get("runtime") not in ("tensorrt_llm", "pytorch")):
        return (
            "echo: this engine was built without context logits; rebuild with "
            "build.extra_args=[--gather_context_logits] to score prompts"
        )
    return None


def llmapi_layout(repo: Path, model: str) -> LlmApiLayout:
    """The LLM-API model's declared inputs and streaming mode, from its rendered config."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    config = text_format.Parse((repo / model / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    return LlmApiLayout(
        tokenizer_dir=repo / REPO_CHECKPOINT_DIR,
        inputs=frozenset(tensor.name for tensor in config.input),
        decoupled=config.model_transaction_policy.decoupled,
    )


@dataclass
class Gateway:
    url: str  # the OpenAI base URL, .../v1
    server: uvicorn.Server
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


def start(openai: OpenAIConfig, host: str, settings: GatewaySettings, timeout_s: float = 30) -> Gateway:
    """Start the gateway and wait until it accepts connections."""
    import uvicorn

    bind = openai.host or host
    config = uvicorn.Config(create_app(settings), host=bind, port=openai.port, log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="openai-gateway", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise StageError(
                f"the OpenAI gateway could not listen on {bind}:{openai.port} (in use?): set openai.port, "
                "or openai.enabled=false"
            )
        time.sleep(0.05)
    url = f"http://{bind}:{openai.port}/v1"
    served = ", ".join([settings.served_model, *settings.adapters])
    log.info("OpenAI-compatible API at %s (models %s, via %s)", url, served, settings.entry_model)
    return Gateway(url, server, thread)
