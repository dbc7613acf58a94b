"""Keep secrets out of logs and files: the values of secret environment variables are replaced by
``***`` wherever text leaves the process through logging (and, later, tracking)."""

from __future__ import annotations

import logging
import os
from urllib.parse import urlsplit, urlunsplit

# Environment variables whose values are credentials. Names only: values are read when needed so a
# token set after start-up is still redacted.
SECRET_ENV_VARS = (
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "HUGGINGFACE_TOKEN",
    "NGC_API_KEY",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "AWS_SECRET_ACCESS_KEY",
    "PIPELINE_OPENAI_API_KEY",  # the gateway's key (openai.api_key_env's default)
    "OPENAI_API_KEY",
)
MASK = "***"


def secret_values() -> list[str]:
    # Very short values would mask ordinary words; real tokens are long.
    return [v for name in SECRET_ENV_VARS if len(v := os.environ.get(name, "")) >= 6]


def redact(text: str) -> str:
    for value in secret_values():
        text = text.replace(value, MASK)
    return text


class RedactingFilter(logging.Filter):
    """Rewrites each record's final message so no handler ever sees a secret."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


def url_without_credentials(url: str) -> str:
    """``url`` without a user:password part: what may be logged and recorded."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))
