"""Whether a tracking server answers at all, asked once and briefly: MLflow's own client retries
an unreachable server call by call."""

from __future__ import annotations


def reachable(tracking_uri: str, timeout_s: float = 5.0) -> bool:
    """True for a local store (a file or database URI), or an HTTP server that answers anything."""
    if not tracking_uri.startswith(("http://", "https://")):
        return True
    import requests

    try:
        requests.get(tracking_uri.rstrip("/") + "/health", timeout=timeout_s)
    except requests.RequestException:
        return False
    return True
