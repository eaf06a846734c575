"""The SFU-side errors of `conclave join` in words a user can act on, as --ds's are: a --sfu at
the delivery service, one without its path, nothing listening, https:// to a plain-HTTP SFU;
a --video that is no video; the name of the service's auditor."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from conclave.cli import describe_error
from conclave.errors import ConclaveError
from conclave.media import MediaSpec
from delivery_service.errors import RequestFailed
from tests.delivery_service.procs import free_port

from .served import conclave_serve_urls


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    """One `conclave serve` on free ports for the module: its URLs (`ds`, `sfu`) and state."""
    state = tmp_path_factory.mktemp("serve")
    with conclave_serve_urls(state) as (ds, sfu):
        assert sfu.endswith("/v1/signal"), sfu
        yield SimpleNamespace(ds=ds, sfu=sfu, state=state)


def _join(tmp_path: Path, name: str, *options: str) -> str:
    """`conclave join` as `name` (each test its own: the module's service registers it) with
    `options`, refused: its one line of error."""
    done = subprocess.run(
        [sys.executable, "-m", "conclave.cli", "join", "--room", "standup", "--name", name,
         "--state", str(tmp_path / "state"), "--no-audio", "--no-commands", "--duration", "1",
         *options],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2, done
    assert "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    return done.stderr


# -- 1. --sfu at the delivery service, or without the SFU's path


@pytest.mark.parametrize("path", ["/v1/signal", ""])
def test_an_sfu_url_at_the_delivery_service_says_so(
    served: SimpleNamespace, tmp_path: Path, path: str
) -> None:
    # Before: "... did not answer as an SFU's signalling WebSocket (HTTP 404): the SFU's URL
    # ends in /v1/signal": for a URL that ends in it, and is the delivery service's.
    err = _join(tmp_path, f"erin{len(path)}", "--ds", served.ds, "--sfu", served.ds + path)
    host = served.ds.rpartition(":")[0]
    assert err == (
        f"conclave join: {served.ds}{path} is the delivery service, not the SFU: `conclave "
        f"serve` runs the SFU on a port of its own (--sfu-port, default 8443: "
        f"{host}:8443/v1/signal) and prints its URL as \"SFU signalling\" (check --sfu; "
        "nothing was joined)\n"
    )


def test_an_sfu_url_without_its_path_is_given_it(served: SimpleNamespace, tmp_path: Path) -> None:
    # The path is not added for the user (a proxy may serve the SFU under another): suggested.
    origin = served.sfu.removesuffix("/v1/signal")
    err = _join(tmp_path, "frank", "--ds", served.ds, "--sfu", origin)
    assert err == (
        f"conclave join: {origin} did not answer as an SFU's signalling WebSocket (HTTP 404): "
        f"an SFU's signalling URL ends in /v1/signal: did you mean '{served.sfu}'? (check "
        "--sfu; nothing was joined)\n"
    )


# -- 2. nothing listening at --sfu; 3. https:// to an SFU in plain HTTP


def test_nothing_listening_at_the_sfu_is_said_as_for_the_ds(
    served: SimpleNamespace, tmp_path: Path
) -> None:
    # Before: "Cannot connect to host 127.0.0.1:P ssl:default [Connect call failed ...]"
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1/signal"
    err = _join(tmp_path, "grace", "--ds", served.ds, "--sfu", url)
    assert err == (
        f"conclave join: cannot reach the SFU at {url}: nothing accepts connections at "
        f"127.0.0.1:{port} (Connection refused): is `conclave serve` (or the SFU) running, on "
        "that port? (check --sfu; nothing was joined)\n"
    )


def test_https_to_a_plain_http_sfu_gives_the_http_url(
    served: SimpleNamespace, tmp_path: Path
) -> None:
    # Before: "[SSL: WRONG_VERSION_NUMBER] wrong version number (_ssl.c:...)"
    https = served.sfu.replace("http://", "https://")
    where = served.sfu.removeprefix("http://").removesuffix("/v1/signal")
    err = _join(tmp_path, "heidi", "--ds", served.ds, "--sfu", https)
    assert err == (
        f"conclave join: cannot reach the SFU at {https}: the server at {where} does not speak "
        "TLS (https://) there: if it is a plain-HTTP service (as `conclave serve` runs its "
        f"services), give its URL as {served.sfu} (check --sfu; nothing was joined)\n"
    )


# -- 4. --video that is no video


def test_a_video_that_is_no_video_is_named_without_ffmpegs_errno(tmp_path: Path) -> None:
    # Before: "cannot play 'F': [Errno 1094995529] Invalid data found when processing input:
    # 'F'". (Refused before any server is asked.)
    text = tmp_path / "notvideo.txt"
    text.write_text("not a video\n")
    err = _join(tmp_path, "erin", "--ds", f"http://127.0.0.1:{free_port()}", "--video",
                str(text))
    assert err == (
        f"conclave join: cannot play {str(text)!r}: it is not a video (or audio) file that "
        "PyAV/FFmpeg can read\n"
    )


def test_a_missing_video_says_so_without_the_errno(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.mp4")
    with pytest.raises(ConclaveError) as refused:
        MediaSpec(file=missing).tracks()
    assert str(refused.value) == f"cannot play {missing!r}: No such file or directory"


# -- 5. the service's auditor as --name


def test_joining_as_the_services_auditor_says_why_in_words(
    served: SimpleNamespace, tmp_path: Path
) -> None:
    # With serve's state (its auditor's key, as when both use the default state directory).
    # Before: "the delivery service said: 403 auditor_reads_only: 'auditor' is an auditor of
    # this service: it reads logs and joins no group"
    done = subprocess.run(
        [sys.executable, "-m", "conclave.cli", "join", "--room", "standup", "--name", "auditor",
         "--state", str(served.state), "--ds", served.ds, "--sfu", served.sfu, "--no-audio",
         "--no-commands", "--duration", "1"],
        capture_output=True, text=True, timeout=60,
    )
    assert (done.returncode, done.stderr) == (2, (
        f"conclave join: the delivery service at {served.ds} refused auditor: 'auditor' is an "
        "auditor of this service: it reads logs and joins no group: choose another --name\n"
    ))


def test_any_other_refusal_is_told_without_status_and_code() -> None:
    refused = RequestFailed(403, "forbidden", "not a member of this group")
    assert describe_error(refused) == "the delivery service said: not a member of this group"
