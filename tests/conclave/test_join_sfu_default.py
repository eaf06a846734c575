"""`conclave join`'s --sfu follows --ds: `conclave serve` runs both on one host."""

from __future__ import annotations

from pathlib import Path

import pytest

import conclave.cli as cli
from conclave.cli import join_hint, main, parse_args
from conclave.errors import ConclaveError
from conclave.services import Services
from tests.delivery_service.procs import free_port


def _join(*options: str) -> list[str]:
    return ["join", "--room", "r", "--name", "n", *options]


@pytest.mark.parametrize(("ds", "sfu"), [
    ("http://127.0.0.1:8470", "http://127.0.0.1:8443/v1/signal"),
    ("http://calls.example.org:9000", "http://calls.example.org:8443/v1/signal"),
    ("https://calls.example.org", "https://calls.example.org:8443/v1/signal"),
    ("http://[::1]:8080", "http://[::1]:8443/v1/signal"),
    ("http://[2001:db8::7]/", "http://[2001:db8::7]:8443/v1/signal"),
    # the delivery service's credentials are not the SFU's, and the URL is printed
    ("http://ann:hunter2@10.0.0.5:8470", "http://10.0.0.5:8443/v1/signal"),
])
def test_the_default_sfu_is_on_the_host_of_ds(ds: str, sfu: str) -> None:
    args = parse_args(_join("--ds", ds))
    assert args.sfu == sfu and args.sfu_derived


def test_without_ds_the_sfu_is_the_local_one() -> None:
    args = parse_args(_join())
    assert args.sfu == "http://127.0.0.1:8443/v1/signal" and args.sfu_derived


@pytest.mark.parametrize("ds", [[], ["--ds", "http://[::1]:8080"]])
def test_an_explicit_sfu_wins(ds: list[str]) -> None:
    args = parse_args(_join(*ds, "--sfu", "https://sfu.example.net:7000/v1/signal"))
    assert args.sfu == "https://sfu.example.net:7000/v1/signal" and not args.sfu_derived


def test_the_help_says_where_the_default_sfu_is(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["join", "--help"])
    assert info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # unwrapped
    assert "the scheme and host of --ds, port 8443, path /v1/signal" in out
    assert "http://127.0.0.1:8443/v1/signal for the default --ds" in out


def test_serve_prints_a_join_command_that_finds_its_sfu() -> None:
    # The default SFU port: --ds alone finds it.
    assert join_hint("192.0.2.1", "http://192.0.2.1:8470", "http://192.0.2.1:8443/v1/signal") == [
        "join with         conclave join --room ROOM --name NAME --ds http://192.0.2.1:8470"
    ]
    # Another port: --sfu too, quoted for a shell (brackets glob in zsh).
    [line] = join_hint("::1", "http://[::1]:8470", "http://[::1]:9000/v1/signal")
    assert line.endswith("--ds 'http://[::1]:8470' --sfu 'http://[::1]:9000/v1/signal'")
    # Every interface: what to put for the host from elsewhere.
    lines = join_hint("0.0.0.0", "http://0.0.0.0:8470", "http://0.0.0.0:8443/v1/signal")
    assert "this machine's address for 0.0.0.0" in lines[1]


async def test_a_join_with_ds_alone_calls_the_sfu_on_that_host(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # 127.0.0.2, not the old default's 127.0.0.1: there, nothing listens on the SFU's port.
    services = Services(db=str(tmp_path / "ds.sqlite3"), host="127.0.0.2", sfu_port=free_port())
    await services.start()
    try:
        sfu_port = int(services.sfu_url.split(":")[-1].split("/")[0])
        monkeypatch.setattr(cli, "DEFAULT_SFU_PORT", sfu_port)  # as serve's default would be
        args = parse_args(_join("--ds", services.ds_url, "--state", str(tmp_path / "state"),
                                "--no-audio", "--no-commands", "--rotation", "0",
                                "--duration", "1"))
        assert args.sfu == services.sfu_url
        assert await cli.cmd_join(args) == 0
        out = capsys.readouterr().out
        assert f"calling in to the SFU at {services.sfu_url} (derived from --ds" in out
    finally:
        await services.stop()


async def test_a_derived_sfu_that_cannot_be_reached_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    services = Services(db=str(tmp_path / "ds.sqlite3"))
    await services.start()
    try:
        monkeypatch.setattr(cli, "DEFAULT_SFU_PORT", free_port())  # nothing listens there
        args = parse_args(_join("--ds", services.ds_url, "--state", str(tmp_path / "state"),
                                "--no-audio", "--no-commands"))
        with pytest.raises(ConclaveError) as info:
            await cli.cmd_join(args)
        message = str(info.value)
        assert f"cannot reach the SFU at {args.sfu}" in message
        assert message.endswith(f"(the SFU {args.sfu} was derived from --ds: give --sfu if it "
                                "runs elsewhere; nothing was joined)")
    finally:
        await services.stop()


def test_a_printed_sfu_url_hides_its_password() -> None:
    from conclave.cli import shown_url

    assert shown_url("https://ann:hunter2@sfu.example/v1/signal") == (
        "https://ann:***@sfu.example/v1/signal"
    )
    assert shown_url("http://[::1]:8443/v1/signal") == "http://[::1]:8443/v1/signal"
