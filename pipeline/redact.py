"""Keep secrets out of logs and files: the values of secret environment variables, the token that
``hf auth login`` saved, and the ``user:password@`` of any URL are replaced by ``***`` wherever
text leaves the process: logging (tracebacks included), printed errors, the MLflow job log and the
resolved config."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
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
_REGISTERED: set[str] = set()  # more names, from the configuration (openai.api_key_env)


def register_secret_env(name: str) -> None:
    """Treat the variable ``name`` as a credential too: redacted everywhere, kept from children."""
    if name:
        _REGISTERED.add(name)


def secret_env_vars() -> tuple[str, ...]:
    return SECRET_ENV_VARS + tuple(sorted(_REGISTERED - set(SECRET_ENV_VARS)))


# scheme://user:password@ -> scheme://***@ (a user name alone is kept: it is no secret)
URL_CREDENTIALS = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s:@]+:[^/\s@]+@")


def _saved_hub_token() -> str:
    """The token ``hf auth login`` wrote (a file, so no environment variable carries it)."""
    path = os.environ.get("HF_TOKEN_PATH") or str(
        Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface") / "token"
    )
    try:
        return Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return ""


def secret_values() -> list[str]:
    # Very short values would mask ordinary words; real tokens are long.
    values = [os.environ.get(name, "") for name in secret_env_vars()] + [_saved_hub_token()]
    return [v for v in values if len(v) >= 6]


def redact(text: str) -> str:
    for value in secret_values():
        text = text.replace(value, MASK)
    return URL_CREDENTIALS.sub(rf"\1{MASK}@", text)


class RedactingFilter(logging.Filter):
    """Rewrites each record's final message, and its traceback, so no handler ever sees a secret."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
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
