"""A first-time user's messages: a delivery service that is not running (connection refused),
an https:// URL of a plain-HTTP service, a --ds or --sfu without its scheme, and the size of
an audio recording in the README."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import aiohttp
import pytest

from conclave.cli import describe_error, main, parse_args
from tests.delivery_service.procs import free_port

README = Path(__file__).resolve().parents[2] / "README.md"


def _audit_ds(url: str, state: Path) -> int:
    return main(["audit", "--group", "standup", "--ds", url, "--state", str(state)])


def _join_ds(url: str, state: Path) -> int:
    return main(["join", "--room", "r", "--name", "n", "--ds", url, "--state", str(state),
                 "--no-commands"])


# -- 1. nothing listens at --ds: say so, and what to check, without aiohttp's "ssl:default"


def _says_nothing_listens(err: str, port: int) -> None:
    assert f"nothing accepts connections at 127.0.0.1:{port} (Connection refused)" in err
    assert "is `conclave serve`" in err and "running, on that port?" in err
    assert "ssl:default" not in err and "Connect call failed" not in err
    assert "Traceback" not in err and err.count("\n") == 1


def test_audit_says_nothing_accepts_connections(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()
    assert _audit_ds(f"http://127.0.0.1:{port}", tmp_path) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"conclave audit: cannot reach the delivery service at "
                          f"http://127.0.0.1:{port}: ")
    _says_nothing_listens(err, port)
    assert "check --ds" in err


def test_join_says_nothing_accepts_connections(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()
    assert _join_ds(f"http://127.0.0.1:{port}", tmp_path / "state") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"conclave join: cannot reach the delivery service at "
                          f"http://127.0.0.1:{port}: ")
    _says_nothing_listens(err, port)


def test_the_password_stays_masked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()
    assert _audit_ds(f"http://user:hunter2@127.0.0.1:{port}", tmp_path) == 2
    err = capsys.readouterr().err
    assert "hunter2" not in err and f"http://user:***@127.0.0.1:{port}" in err
    _says_nothing_listens(err, port)


async def _connect_error(url: str) -> aiohttp.ClientConnectorError:
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientConnectorError) as caught:
            await session.get(url)
    return caught.value


def test_an_error_described_alone_says_it_too() -> None:
    # (describe_error: the words for an error no message of ours wraps)
    port = free_port()
    text = describe_error(asyncio.run(_connect_error(f"http://127.0.0.1:{port}/")))
    assert text.startswith("network error: nothing accepts connections at "
                           f"127.0.0.1:{port} (Connection refused)")
    assert "ssl:default" not in text


# -- 2. https:// to a service in plain HTTP: say it does not speak TLS, and give the http:// URL


class _Answer(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.send_response(404)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - its signature
        pass


@pytest.fixture
def plain_http_port() -> Iterator[int]:
    """A port where a server answers in plain HTTP (no TLS)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Answer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_https_to_a_plain_http_service_suggests_http(
    tmp_path: Path, plain_http_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _audit_ds(f"https://127.0.0.1:{plain_http_port}", tmp_path) == 2
    err = capsys.readouterr().err
    assert f"the server at 127.0.0.1:{plain_http_port} does not speak TLS" in err
    assert f"give its URL as http://127.0.0.1:{plain_http_port}" in err
    assert "WRONG_VERSION_NUMBER" not in err and "ssl:default" not in err


# -- 3. --ds and --sfu without a scheme: suggest the URL with http://


@pytest.mark.parametrize("option", ["--ds", "--sfu"])
@pytest.mark.parametrize("given", ["127.0.0.1:28470", "callhost", "[::1]:8470",
                                   "callhost:8443/v1/signal"])
def test_a_url_without_its_scheme_gets_a_suggestion(
    option: str, given: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_args(["join", "--room", "r", "--name", "n", option, given])
    assert exited.value.code == 2
    assert f"did you mean 'http://{given}'?" in capsys.readouterr().err


@pytest.mark.parametrize("given", ["ftp://callhost", "a b", "http//callhost", "callhost:99999"])
def test_no_suggestion_for_what_is_no_host(
    given: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        parse_args(["join", "--room", "r", "--name", "n", "--ds", given])
    err = capsys.readouterr().err
    assert "not an http:// or https:// URL" in err and "did you mean" not in err


# -- 4. the README says what --record writes for audio, and how much


def test_readme_says_what_an_audio_recording_takes() -> None:
    text = " ".join(README.read_text().split())
    assert "48 kHz stereo" in text and "WAV" in text and "690 MB" in text
