"""How the engine says why a request failed: the first words of its error message, one name for
each kind. The engine models send them, the BLS model relays them, and the OpenAI gateway maps
them onto HTTP statuses (``kind_of``). No imports: this module travels into the model repository
and is imported by the gateway without torch."""

from __future__ import annotations

from enum import Enum

CANCELLED = "request cancelled"  # how an error for a cancelled request begins
FORWARD_FAILED = "the forward pass failed"  # how an error of the server (not the request) begins
SAMPLING_FAILED = "the engine failed on this request"  # a server error confined to one request
SCHEDULER_DOWN = "the engine's scheduler is not running"  # refused at once: health says so too
QUEUE_FULL = "Exceeds maximum queue size"  # Triton's own words for a full queue (clients match them)
# upstream's words (PeftCacheManager) for a lora_task_id whose adapter is not loaded: clients match
# them to send the adapter's weights with the request again
LORA_NOT_CACHED = "not found in cache. Please send LoRA weights with request"
QUEUE_TIMEOUT = "Request timeout expired"  # Triton's words for a request that waited past its queue timeout


class Failure(Enum):
    """Whose fault a failed request is, which decides what a client should do about it."""

    BUSY = "busy"  # the server is at capacity: retry later (429)
    UNAVAILABLE = "unavailable"  # waited too long, or the engine is down: retry, maybe elsewhere (503)
    CANCELLED = "cancelled"  # stopped before it ended (by a stop request or shutdown)
    INTERNAL = "internal"  # our bug or the engine's fault (500)


def kind_of(message: str) -> Failure | None:
    """The kind of an engine error by its words; None when they name none: the request was refused
    by the models' own checks, the client's to fix (400)."""
    if QUEUE_FULL in message:
        return Failure.BUSY
    if QUEUE_TIMEOUT in message or SCHEDULER_DOWN in message:
        return Failure.UNAVAILABLE
    if FORWARD_FAILED in message or SAMPLING_FAILED in message:
        return Failure.INTERNAL
    if message.startswith(CANCELLED) or f": {CANCELLED}" in message:
        return Failure.CANCELLED
    return None
