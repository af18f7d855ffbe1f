"""Ports and HTTP readiness checks on this machine."""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable

LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port the OS had free a moment ago (`host=""`: free on every interface)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_free(port: int, host: str = LOOPBACK) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def health_error(url: str, timeout: float) -> str | None:
    """None when GET `url` answers 200 within `timeout` seconds, else why not (one line)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            resp.read()
            return None if resp.status == 200 else f"HTTP {resp.status}"
    except (urllib.error.URLError, OSError) as err:
        return str(getattr(err, "reason", err))


def wait_healthy(url: str, timeout: float, *, alive: Callable[[], bool] = lambda: True,
                 interval: float = 0.3) -> bool:
    """Poll `url` until it answers 200 (True), `alive()` turns false or `timeout` passes (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            return False
        if health_error(url, timeout=2) is None:
            return True
        time.sleep(interval)
    return False
