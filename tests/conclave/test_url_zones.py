"""IPv6 zone identifiers in --ds and --sfu (RFC 6874: `http://[fe80::1%25eth0]:8470`).

aiohttp connects to the host as the URL spells it, so `%25eth0` reached getaddrinfo as the zone
`25eth0` ("Name or service not known"); the CLI takes the URL form and hands on the zone
itself. A link-local address is reached end to end on the loopback of a network namespace of
the test's own (skipped where one cannot be made)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conclave.cli import http_url, main, parse_args


@pytest.mark.parametrize(("given", "used"), [
    ("http://[fe80::1%25eth0]:8470", "http://[fe80::1%eth0]:8470"),
    ("https://u:p@[FE80::1%25en%30]:8470/x?y", "https://u:p@[FE80::1%en0]:8470/x?y"),
    ("http://[fe80::1%eth0]:8470", "http://[fe80::1%eth0]:8470"),  # as curl takes it
    ("http://[fe80::1%253]/", "http://[fe80::1%3]/"),
    ("http://[::1]:8470", "http://[::1]:8470"),
    ("http://127.0.0.1:8470", "http://127.0.0.1:8470"),
])
def test_a_zone_in_the_url_form_is_handed_on_decoded(given: str, used: str) -> None:
    assert http_url(given) == used


@pytest.mark.parametrize(("given", "said"), [
    ("http://[::1%25lo]:8470", "link-local"),
    ("http://[2001:db8::1%25eth0]:8470", "link-local"),
    ("http://[fe80::1%25]:8470", "empty zone"),
    ("http://[fe80::1%25a%2Fb]:8470", "zone"),
    ("http://[fe80::1%25a%20b]:8470", "zone"),
])
def test_a_zone_that_cannot_be_meant_is_refused(given: str, said: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=said) as info:
        http_url(given)
    assert given in str(info.value)


def test_a_refused_zone_is_a_usage_error_that_names_the_option(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["join", "--room", "r", "--name", "alice", "--state", str(tmp_path),
              "--ds", "http://[::1%25lo]:8470"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--ds" in err and "link-local" in err and "Traceback" not in err
    assert not any(tmp_path.iterdir())  # nothing made


def test_the_derived_sfu_keeps_the_zone() -> None:
    args = parse_args(["join", "--room", "r", "--name", "a", "--ds",
                       "http://[fe80::1%25eth0]:8470"])
    assert args.ds == "http://[fe80::1%eth0]:8470"
    assert args.sfu == "http://[fe80::1%eth0]:8443/v1/signal"


# Run in a network namespace of its own: fe80::1 on its loopback, `conclave serve` there, and
# `conclave audit` given the URL form: "no room" is the delivery service's own answer.
IN_NAMESPACE = r"""
import json, subprocess, sys
state = sys.argv[1]
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
subprocess.run(["ip", "-6", "addr", "add", "fe80::1/64", "dev", "lo", "nodad"], check=True)
serve = subprocess.Popen(
    [sys.executable, "-m", "conclave", "serve", "--host", "fe80::1%lo", "--ds-port", "0",
     "--sfu-port", "0", "--state", state + "/serve"],
    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
)
try:
    ds = serve.stdout.readline().split()[-1]  # http://[fe80::1%lo]:PORT
    audit = subprocess.run(
        [sys.executable, "-m", "conclave", "audit", "--group", "r", "--state", state + "/serve",
         "--ds", ds.replace("%", "%25")],
        capture_output=True, text=True, timeout=60,
    )
    print(json.dumps({"ds": ds, "code": audit.returncode, "err": audit.stderr}))
finally:
    serve.terminate()
    serve.wait(timeout=20)
"""


def _namespaces() -> bool:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return False
    probe = subprocess.run(["unshare", "-rn", "ip", "link", "set", "lo", "up"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not sys.platform.startswith("linux") or not _namespaces(),
                    reason="needs a network namespace of its own (unshare -rn)")
def test_a_link_local_delivery_service_is_reached_through_the_url_form(tmp_path: Path) -> None:
    run = subprocess.run(
        ["unshare", "-rn", sys.executable, "-c", IN_NAMESPACE, str(tmp_path)],
        capture_output=True, text=True, timeout=120, env={**os.environ},
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["ds"].startswith("http://[fe80::1%lo]:")
    assert result["code"] == 2
    assert "no room 'r' on the delivery service" in result["err"], result["err"]
