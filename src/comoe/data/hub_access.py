"""Whether the Hugging Face hub can be used now: the offline flags, and a bounded TCP probe of the
endpoint (or the proxy), whose failures are remembered for a minute."""

from __future__ import annotations

import os
import socket
import threading
import time
from urllib.parse import urlparse

CONNECT_TIMEOUT_S = 3.0
_NEGATIVE_CACHE_S = 60.0
_TRUTHY = {"1", "on", "yes", "true"}


class HubUnavailableError(ConnectionError):
    """The Hugging Face hub cannot be used (offline mode or no connection)."""


_probe_cache: dict[tuple[str, int], tuple[float, bool]] = {}


def offline_flag() -> str | None:
    """``VAR=value`` of the first offline flag set (``HF_HUB_OFFLINE``, ``HF_DATASETS_OFFLINE``), or None."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in _TRUTHY:
            return f"{var}={os.environ[var]}"
    return None


def hub_unavailable_reason(timeout: float = CONNECT_TIMEOUT_S) -> str | None:
    """Why the hub cannot be used right now, or None when it answers."""
    flag = offline_flag()
    if flag:
        return f"{flag} is set"
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    proxy = next(
        (
            os.environ[v]
            for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
            if os.environ.get(v)
        ),
        None,
    )
    url = urlparse(proxy if proxy and "://" in proxy else f"http://{proxy}" if proxy else endpoint)
    host = url.hostname or "huggingface.co"
    port = url.port or (443 if url.scheme == "https" else 80)
    if _reachable(host, port, timeout):
        return None
    via = f" through the proxy {host}:{port}" if proxy else f" ({host}:{port})"
    return f"no connection to {endpoint}{via} within {timeout:g} s"


def _reachable(host: str, port: int, timeout: float) -> bool:
    """TCP connect, bounded by ``timeout`` including name resolution; failures are cached for a minute."""
    cached = _probe_cache.get((host, port))
    if cached and not cached[1] and time.monotonic() - cached[0] < _NEGATIVE_CACHE_S:
        return False
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    ok = bool(result and result[0])
    _probe_cache[(host, port)] = (time.monotonic(), ok)
    return ok
