"""Chromium as an SFU participant: a headless browser runs `browser/participant.html`.

The page signals with the SFU as any WebRTC client would (WebSocket JSON, the SFU's offers
answered by the browser's own RTCPeerConnection) and publishes Chromium's fake camera and
microphone (`--use-fake-device-for-media-stream`): real VP8 and Opus from libwebrtc, with its
own header extensions, RTCP and ICE. This server hands the page its participants and
commands and takes back what each one sees (`getStats`), every 200 ms.

Chromium comes from Debian's package (`.ci/chromium.sh`); without it these tests skip, except
under CI, where they fail.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from aiohttp import web

PAGE = Path(__file__).with_name("browser") / "participant.html"
WAIT = 30.0  # seconds for what a browser should see (a cold Chromium start takes a few)


def chromium_path() -> str:
    """Chromium's executable (CONCLAVE_CHROMIUM, else `chromium` on PATH), or skip/fail."""
    path = os.environ.get("CONCLAVE_CHROMIUM") or shutil.which("chromium")
    if path:
        return path
    if os.environ.get("CI"):
        pytest.fail("CI is set but chromium is not installed: run .ci/chromium.sh")
    pytest.skip("no chromium on PATH (install Debian's chromium package, or set CONCLAVE_CHROMIUM)")


# The flags of a throwaway headless browser on a machine without network, with fake media
# devices; `--allow-loopback-in-peer-connection` lets WebRTC use 127.0.0.1, where the SFU of the
# tests listens, and mDNS host names (which aioice cannot resolve here) are turned off.
FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
    "--autoplay-policy=no-user-gesture-required",
    "--allow-loopback-in-peer-connection",
    "--disable-features=WebRtcHideLocalIpsWithMdns",
)


class Browser:
    """One headless Chromium whose page holds any number of participants of one room."""

    def __init__(
        self,
        signal_url: str,
        room: str,
        token: Callable[[str], str],
        audio_file: Path | None = None,
    ) -> None:
        """`audio_file`: a WAV file the fake microphone plays, looping (else Chromium's beep:
        a short tone once a second)."""
        self.signal_url = signal_url.replace("http://", "ws://", 1)
        self.audio_file = audio_file
        self.room = room
        self.token = token
        self.report: dict[str, Any] = {}
        self.reports = 0
        self._commands: list[dict[str, Any]] = []
        self._runner: web.AppRunner | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._profile = tempfile.TemporaryDirectory(prefix="conclave-chromium-")
        self._stderr = Path(self._profile.name) / "stderr.log"

    def spec(
        self, identity: str, publish: Iterable[str] = ("audio", "video"), trickle: bool = False
    ) -> dict[str, Any]:
        return {
            "identity": identity,
            "token": self.token(identity),
            "publish": list(publish),
            "trickle": trickle,
        }

    async def start(self, *participants: dict[str, Any]) -> None:
        executable = chromium_path()
        app = web.Application()
        app.router.add_get("/participant.html", self._page)
        app.router.add_get("/commands", self._give_commands)
        app.router.add_post("/report", self._take_report)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        config = {"url": self.signal_url, "room": self.room, "participants": list(participants)}
        url = f"http://127.0.0.1:{port}/participant.html#{quote(json.dumps(config))}"
        with open(self._stderr, "wb") as stderr:
            self._process = subprocess.Popen(
                [
                    executable,
                    *FLAGS,
                    f"--user-data-dir={self._profile.name}",
                    *(
                        [f"--use-file-for-fake-audio-capture={self.audio_file}"]
                        if self.audio_file
                        else []
                    ),
                    url,
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )

    async def _page(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(PAGE)

    async def _give_commands(self, request: web.Request) -> web.Response:
        commands, self._commands = self._commands, []
        return web.json_response(commands)

    async def _take_report(self, request: web.Request) -> web.Response:
        self.report = await request.json()
        self.reports += 1
        return web.Response(text="ok")

    def join(self, spec: dict[str, Any]) -> None:
        self._commands.append({"do": "join", "spec": spec})

    def leave(self, identity: str) -> None:
        self._commands.append({"do": "leave", "identity": identity})

    def seen(self, identity: str) -> dict[str, Any]:
        """What participant `identity` sees now (empty before its first report)."""
        return self.report.get(identity, {})

    def inbound(self, identity: str, publisher: str, kind: str) -> dict[str, Any]:
        """`identity`'s receiving stats for `publisher`'s stream of `kind` (empty if none)."""
        for stream in self.seen(identity).get("inbound", {}).values():
            if stream["publisher"] == publisher and stream["kind"] == kind:
                return dict(stream)
        return {}

    async def until(self, condition: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
        """Wait for `condition` over the reports; fail with what the page saw."""
        deadline = time.monotonic() + timeout
        while not condition():
            if self._process is not None and self._process.poll() is not None:
                pytest.fail(f"chromium exited ({self._process.returncode}) {self._tail()}")
            if time.monotonic() > deadline:
                pytest.fail(f"not within {timeout:g} s: {what}\n{self._describe()}")
            await asyncio.sleep(0.05)

    def _describe(self) -> str:
        if not self.reports:
            return f"the page never reported {self._tail()}"
        lines = []
        for identity, seen in self.report.items():
            lines.append(
                f"{identity}: {seen['state']}, {seen['offers']} offers answered, "
                f"errors {seen['errors']}, directions {seen['directions']}"
            )
            for ssrc, stream in sorted(seen["inbound"].items()):
                lines.append(f"  in  {ssrc}: {stream}")
            for mid, stream in sorted(seen["outbound"].items()):
                lines.append(f"  out {mid}: {stream}")
            lines.extend(f"  log {entry}" for entry in seen["log"][-10:])
        return "\n".join(lines)

    def _tail(self) -> str:
        try:
            text = self._stderr.read_text(errors="replace")
        except OSError:
            return ""
        return "(chromium's stderr ends with:)\n" + "\n".join(text.splitlines()[-20:])

    async def close(self) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                await asyncio.to_thread(self._process.wait, 10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                await asyncio.to_thread(self._process.wait)
        if self._runner is not None:
            await self._runner.cleanup()
        self._profile.cleanup()
