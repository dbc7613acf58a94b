"""The Triton error for a failed request: the runtime's failure kinds (``reference_runtime/
failures.py``, read from the message's words) mapped onto Triton's codes in one place, for both CPU
engine models (this file is copied beside the LLM-API model too)."""

from __future__ import annotations

from typing import Any

import triton_python_backend_utils as pb_utils
from reference_runtime.failures import Failure, kind_of

# queue full and queue timeout as Triton itself answers them: come back later
CODES = {
    Failure.BUSY: "UNAVAILABLE",
    Failure.UNAVAILABLE: "UNAVAILABLE",
    Failure.CANCELLED: "CANCELLED",
    Failure.INTERNAL: "INTERNAL",
}


def triton_error(message: str) -> Any:
    """The error to close a request with; a message naming no kind is the request's own fault
    (INVALID_ARG, HTTP 400)."""
    kind = kind_of(message)
    if kind is Failure.INTERNAL:  # ours, not the client's: worth a line in the server's log
        pb_utils.Logger.log_error(message)
    elif kind is Failure.CANCELLED:
        pb_utils.Logger.log_info(message)
    code = "INVALID_ARG" if kind is None else CODES[kind]
    return pb_utils.TritonError(message, getattr(pb_utils.TritonError, code, None))
