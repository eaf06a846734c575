"""Browsers as SFU participants: headless Chromium or Firefox runs `browser/participant.html`.

The page signals with the SFU as any WebRTC client would (WebSocket JSON, the SFU's offers
answered by the browser's own RTCPeerConnection) and publishes the browser's fake camera and
microphone: real VP8 and Opus from libwebrtc (Chromium) or Firefox's own stack, with their own
header extensions, RTCP and ICE. This server hands the page its participants and commands and
takes back what each one sees (`getStats`), every 200 ms.

Chromium runs on loopback. Firefox never pairs its ICE candidates with a loopback one, so it
runs in a network namespace of the test's, joined to this one by a veth pair (`Namespace`).
Both come from Debian's packages (`.ci/browsers.sh`); without them (or, for Firefox, without
root and iproute2) these tests skip, except under CI, where they fail.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import quote

import pytest
from aiohttp import web

PAGE = Path(__file__).with_name("browser") / "participant.html"
WAIT = 30.0  # seconds for what a browser should see (a cold Chromium start takes a few)


ENGINES = ("chromium", "firefox")
# Where each engine is looked for, after $CONCLAVE_CHROMIUM / $CONCLAVE_FIREFOX.
_EXECUTABLES = {"chromium": ("chromium",), "firefox": ("firefox-esr", "firefox")}


def skip_or_fail(why: str) -> NoReturn:
    """A browser test cannot run here: fail under CI (which installs what they need), else
    skip."""
    if os.environ.get("CI"):
        pytest.fail(f"CI is set but {why}: run .ci/browsers.sh")
    pytest.skip(why)


def executable(engine: str) -> str:
    """The engine's executable, or skip/fail."""
    path = os.environ.get(f"CONCLAVE_{engine.upper()}")
    for name in () if path else _EXECUTABLES[engine]:
        path = shutil.which(name)
        if path:
            break
    if not path:
        skip_or_fail(
            f"{engine} is not installed (Debian's {_EXECUTABLES[engine][0]} package, or set "
            f"CONCLAVE_{engine.upper()})"
        )
    return path


class Namespace:
    """A network namespace joined to this one by a veth pair, for a browser that will not use
    127.0.0.1: Firefox never pairs its own candidates with a loopback one, whatever its prefs
    say. The SFU then listens and offers ICE candidates at `host` (this side of the pair), and
    the browser runs in the namespace (`prefix`), at `peer`. Needs root and iproute2."""

    _made = 0

    def __init__(self) -> None:
        Namespace._made += 1
        tag = f"{os.getpid():x}x{Namespace._made}"
        self.name = f"conclave-{tag}"
        self.link = f"cv{tag}"  # + "a"/"b": interface names are at most 15 bytes
        self.prefix = ["ip", "netns", "exec", self.name]
        self.host = self.peer = ""
        self._created = False

    @staticmethod
    def _remove_stale() -> None:
        """Delete the namespaces of test runs that were killed before they could."""
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        for line in listed.splitlines():
            name = line.split()[0] if line.split() else ""
            if not name.startswith("conclave-") or "x" not in name:
                continue
            try:
                os.kill(int(name[len("conclave-") :].split("x")[0], 16), 0)
            except ProcessLookupError:
                subprocess.run(["ip", "netns", "delete", name], capture_output=True)
            except (ValueError, PermissionError):
                pass

    @staticmethod
    def _free_block() -> int:
        """A /30 of 10.231/16 that no interface of this machine has an address in."""
        shown = subprocess.run(["ip", "-o", "-4", "addr"], capture_output=True, text=True).stdout
        used = {
            int(a.split(".")[2]) << 6 | int(a.split(".")[3].split("/")[0]) >> 2
            for a in shown.split()
            if a.startswith("10.231.")
        }
        start = os.getpid() * 7 + Namespace._made
        return next(
            b for i in range(1 << 14) if (b := (start + i) % (1 << 14)) not in used
        )

    def create(self) -> None:
        if os.geteuid() != 0 or shutil.which("ip") is None:
            skip_or_fail("Firefox's tests need root and iproute2 (a network namespace)")
        self._remove_stale()
        base = (10 << 24) | (231 << 16) | (self._free_block() << 2)
        self.host = ".".join(str((base + 1) >> s & 255) for s in (24, 16, 8, 0))
        self.peer = ".".join(str((base + 2) >> s & 255) for s in (24, 16, 8, 0))
        steps = [
            ["ip", "netns", "add", self.name],
            ["ip", "link", "add", f"{self.link}a", "type", "veth", "peer", "name", f"{self.link}b"],
            ["ip", "link", "set", f"{self.link}b", "netns", self.name],
            ["ip", "addr", "add", f"{self.host}/30", "dev", f"{self.link}a"],
            ["ip", "link", "set", f"{self.link}a", "up"],
            [*self.prefix, "ip", "addr", "add", f"{self.peer}/30", "dev", f"{self.link}b"],
            [*self.prefix, "ip", "link", "set", f"{self.link}b", "up"],
            [*self.prefix, "ip", "link", "set", "lo", "up"],
        ]
        self._created = True
        for step in steps:
            done = subprocess.run(step, capture_output=True, text=True)
            if done.returncode:
                self.delete()
                pytest.fail(f"{' '.join(step)} failed: {done.stderr.strip()}")

    def delete(self) -> None:
        if self._created:  # deleting the namespace deletes the veth pair
            subprocess.run(["ip", "netns", "delete", self.name], capture_output=True)
            self._created = False


# Chromium's flags for a throwaway headless browser on a machine without network, with fake
# media devices; `--allow-loopback-in-peer-connection` lets WebRTC use 127.0.0.1, where the SFU
# of the tests listens, and mDNS host names (which aioice cannot resolve here) are turned off.
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
# Firefox's preferences (the profile's user.js) for the same: fake devices, no prompts, host
# addresses in the clear, no first-run pages or background traffic.
FIREFOX_PREFS = {
    "media.navigator.streams.fake": True,
    "media.navigator.permission.disabled": True,
    "media.peerconnection.ice.obfuscate_host_addresses": False,
    "media.autoplay.default": 0,
    "browser.shell.checkDefaultBrowser": False,
    "browser.aboutwelcome.enabled": False,
    "browser.startup.homepage_override.mstone": "ignore",
    "datareporting.policy.dataSubmissionEnabled": False,
    "toolkit.telemetry.reportingpolicy.firstRun": False,
    "app.update.auto": False,
    "network.captive-portal-service.enabled": False,
    "network.connectivity-service.enabled": False,
    # a namespace without a default route looks offline, and an offline Firefox refuses new
    # peer connections
    "network.manage-offline-status": False,
}


class Browser:
    """One headless browser whose page holds any number of participants of one room."""

    def __init__(
        self,
        engine: str,
        signal_url: str,
        room: str,
        token: Callable[[str], str],
        netns: Namespace | None = None,
        audio_file: Path | None = None,
    ) -> None:
        """`engine`: "chromium" or "firefox"; `netns`: the namespace to run it in (the page is
        served at its `host`, else at 127.0.0.1); `audio_file`: a WAV file Chromium's fake
        microphone plays, looping (else its beep: a short tone once a second)."""
        self.engine = engine
        self.signal_url = signal_url.replace("http://", "ws://", 1)
        self.netns = netns
        self.host = netns.host if netns else "127.0.0.1"
        self.audio_file = audio_file
        self.room = room
        self.token = token
        self.report: dict[str, Any] = {}
        self.reports = 0
        self._commands: list[dict[str, Any]] = []
        self._runner: web.AppRunner | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._profile = tempfile.TemporaryDirectory(
            prefix="conclave-browser-", ignore_cleanup_errors=True
        )
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
        path = executable(self.engine)
        app = web.Application()
        app.router.add_get("/participant.html", self._page)
        app.router.add_get("/commands", self._give_commands)
        app.router.add_post("/report", self._take_report)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        config = {"url": self.signal_url, "room": self.room, "participants": list(participants)}
        url = f"http://{self.host}:{port}/participant.html#{quote(json.dumps(config))}"
        profile = self._profile.name
        if self.engine == "firefox":
            # the page's origin is not localhost: have it count as secure (getUserMedia, crypto)
            settings = {**FIREFOX_PREFS, "dom.securecontext.allowlist": self.host}
            prefs = "".join(
                f"user_pref({json.dumps(k)}, {json.dumps(v)});\n" for k, v in settings.items()
            )
            Path(profile, "user.js").write_text(prefs)
            command = [path, "--headless", "--no-remote", "--profile", profile, url]
        else:
            extra = []
            if self.audio_file:
                extra.append(f"--use-file-for-fake-audio-capture={self.audio_file}")
            if self.netns is not None:  # the page's origin is not localhost: count it secure
                extra.append(f"--unsafely-treat-insecure-origin-as-secure=http://{self.host}:{port}")
            command = [path, *FLAGS, f"--user-data-dir={profile}", *extra, url]
        if self.netns is not None:
            command = [*self.netns.prefix, *command]
        with open(self._stderr, "wb") as stderr:
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,  # one process group to stop in `close`
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
            # The browser and every process it started (its own session): a child still
            # writing into the profile after the browser exits would make its removal fail.
            self._signal_all(signal.SIGTERM)
            try:
                await asyncio.to_thread(self._process.wait, 10)
            except subprocess.TimeoutExpired:
                pass
            self._signal_all(signal.SIGKILL)
            await asyncio.to_thread(self._process.wait)
        if self._runner is not None:
            await self._runner.cleanup()
        for _ in range(20):  # a killed child's last writes may still land: try again briefly
            try:
                shutil.rmtree(self._profile.name)
                break
            except FileNotFoundError:
                break
            except OSError:
                await asyncio.sleep(0.1)
        self._profile.cleanup()  # whatever is left; with ignore_cleanup_errors it never raises

    def _signal_all(self, signum: int) -> None:
        assert self._process is not None
        try:
            os.killpg(self._process.pid, signum)
        except ProcessLookupError:  # all gone already
            pass
