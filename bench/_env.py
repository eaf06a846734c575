"""What a benchmark result depends on besides its own parameters, as one line to print first.

Shared by the bench/ scripts (run as `python bench/<script>.py`, so this folder is on sys.path).
The line has single spaces only, so `conclave bench` never mistakes it for a table row.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
from collections.abc import Callable
from pathlib import Path


def positive(kind: Callable[[str], float] = float) -> Callable[[str], float]:
    """An argparse type: a finite number above zero (a usage error naming it otherwise)."""

    def parse(text: str) -> float:
        value = kind(text)  # a ValueError: argparse says "invalid float value: 'x'"
        if not (value > 0 and math.isfinite(value)):  # nan and inf too
            raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer of at least `minimum`."""

    def integer(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    integer.__name__ = "int"
    return integer


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return " ".join(line.split(":", 1)[1].split())
    except OSError:
        pass
    return platform.processor() or platform.machine()


def idle_policy(sys_root: Path = Path("/sys")) -> str | None:
    """How the kernel idles its CPUs (Linux cpuidle), None where it does not say.

    A process woken for every packet, as the SFU is at low rates, also pays for the CPU's way
    back from idle. On a VM guest with the haltpoll driver, `guest_halt_poll_ns` is how long an
    idle vCPU polls before it halts (a VM exit; the host may run something else on the core
    meanwhile): at 0 every wake-up comes from a halt. Printed so that runs on differently
    configured machines are not compared as if alike."""
    try:
        driver = (sys_root / "devices/system/cpu/cpuidle/current_driver").read_text().strip()
    except OSError:
        return None
    if driver != "haltpoll":
        return f"cpuidle {driver}"
    try:
        ns = int((sys_root / "module/haltpoll/parameters/guest_halt_poll_ns").read_text())
    except (OSError, ValueError):
        return "cpuidle haltpoll"
    return f"cpuidle haltpoll (guest halt poll {ns // 1000} us)"


def environment() -> str:
    """Python, OS, CPU (model, cores, load, idle policy) and the crypto library: one line."""
    parts = [
        f"{platform.python_implementation()} {platform.python_version()}",
        f"{platform.system()} {platform.release()} {platform.machine()}",
        f"CPU {cpu_model()} x{os.cpu_count()}",
    ]
    try:
        load = os.getloadavg()
        parts.append(f"load {load[0]:.2f}")
    except OSError:
        pass
    if (idle := idle_policy()) is not None:
        parts.append(idle)
    try:
        import cryptography
        from cryptography.hazmat.backends.openssl.backend import backend

        parts.append(f"cryptography {cryptography.__version__} ({backend.openssl_version_text()})")
    except ImportError:
        pass
    return "environment: " + ", ".join(" ".join(p.split()) for p in parts)
