"""systemd service notifications (sd_notify(3)): READY=1, WATCHDOG=1, STOPPING=1.

Under a unit with `Type=notify` systemd sets NOTIFY_SOCKET; with `WatchdogSec=` it also sets
WATCHDOG_USEC, and kills (and, with `Restart=`, restarts) a service that sends no WATCHDOG=1
for that long. The watchdog is sent from the event loop itself, so a loop stuck in a callback
stops it: that is how a hung worker 0 is caught, which no other process of the SFU watches
(worker 0 watches workers 1..N-1, `sfu.workers`). Only the process systemd started notifies.
Nothing here raises: without systemd, or when the socket is gone, notifying does nothing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket

logger = logging.getLogger(__name__)


def _address() -> str | None:
    path = os.environ.get("NOTIFY_SOCKET", "")
    if not path.startswith(("/", "@")):
        return None  # unset, or a vsock address this module does not speak
    return "\0" + path[1:] if path.startswith("@") else path  # "@": the abstract namespace


def notify(state: str) -> bool:
    """Send `state` (e.g. "READY=1") to systemd: whether it was sent."""
    address = _address()
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), address)
    except OSError as exc:
        logger.warning("cannot notify systemd at %s: %s", address.lstrip("\0"), exc)
        return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 messages (half of WATCHDOG_USEC, as sd_watchdog_enabled(3)
    advises), or None when systemd expects none from this process."""
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
        pid = os.environ.get("WATCHDOG_PID")
        if pid is not None and int(pid) != os.getpid():
            return None  # meant for another process (set for the main one, inherited here)
    except ValueError:
        return None
    if usec <= 0 or _address() is None:
        return None
    return usec / 2e6


async def watchdog(interval: float) -> None:
    """Send WATCHDOG=1 every `interval` seconds for as long as the event loop runs."""
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(interval)
