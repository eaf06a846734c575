"""Run `python -m delivery_service` as a subprocess on a free loopback port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from delivery_service.client import DeliveryClient, wait_healthy
from mls.client import Client

ROOM_SECRET = "00" * 32


def ds_client(url: str, identity: str, mls: Client | None = None) -> DeliveryClient:
    """A client of the service at `url` for `identity`, with the MLS client's signature key
    (a fresh cipher suite 1 client unless `mls` is given)."""
    mls = mls or Client(identity.encode(), 1)
    return DeliveryClient(url, identity, int(mls.cipher_suite), mls.signature_priv,
                          mls.signature_key)


async def auditor_client(url: str) -> DeliveryClient:
    """The registered `auditor` identity (services in these tests run with --auditor auditor)."""
    auditor = ds_client(url, "auditor")
    await auditor.register()
    return auditor


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServiceProcess:
    def __init__(self, args: list[str], port: int, log: Path) -> None:
        self.args = args
        self.port = port
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, timeout: float = 20) -> None:
        env = {**os.environ, "CONCLAVE_ROOM_SECRET": ROOM_SECRET}
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "delivery_service", *self.args, "--host", "127.0.0.1",
                 "--port", str(self.port), "--log-level", "WARNING"],
                stdout=out, stderr=subprocess.STDOUT, env=env,
            )
        proc = self.proc
        if await wait_healthy(self.url, timeout, alive=lambda: proc.poll() is None):
            return
        if proc.poll() is not None:
            raise RuntimeError(f"service exited: {self.log.read_text()[-2000:]}")
        raise RuntimeError("service did not become healthy")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
