"""Whether a tracking server answers at all, asked once and briefly: MLflow's own client retries
an unreachable server call by call, for minutes."""

from __future__ import annotations


def unreachable(tracking_uri: str, timeout_s: float = 5.0) -> str | None:
    """Why an HTTP tracking server does not answer (its first line), or None when it answers
    anything; a local store (a file or database URI) always answers."""
    if not tracking_uri.startswith(("http://", "https://")):
        return None
    import requests

    try:
        requests.get(tracking_uri.rstrip("/") + "/health", timeout=timeout_s)
    except requests.RequestException as error:
        return str(error).splitlines()[0] if str(error) else type(error).__name__
    return None


def reachable(tracking_uri: str, timeout_s: float = 5.0) -> bool:
    return unreachable(tracking_uri, timeout_s) is None
