"""`conclave serve`'s auditor cannot be squatted: serve makes (or reads) its key in its state
directory and pins it, `conclave audit` with that state directory reads every log, and a
`join` or an audit under the name with any other key is refused at once, saying why."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from conclave.cli import main
from conclave.errors import ConclaveError
from conclave.participant import Participant
from conclave.services import Services
from delivery_service.storage import IdentityRecord
from mls.client import Client
from tests.conclave.served import conclave_serve, create_room


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """`conclave serve --state DIR/serve` and a room `private` of owner's: the URL, and DIR."""
    state = tmp_path_factory.mktemp("auditor")
    with conclave_serve(state / "serve") as ds_url:
        create_room(ds_url, state / "owner", "owner", "private")
        yield ds_url, state


async def test_a_join_under_the_auditors_name_is_refused_at_once(
    served: tuple[str, Path],
) -> None:
    ds_url, state = served
    mallet = Participant("auditor", ds_url, state_dir=state / "mallet")
    try:
        with pytest.raises(ConclaveError) as info:
            await mallet.start()
    finally:
        await mallet.close()
    assert "the name is reserved for an auditor of that service" in str(info.value)
    assert "joins no call: choose another --name" in str(info.value)
    # The refused new key is not kept: it was never registered, and would fail alike.
    assert not (state / "mallet" / "auditor.state").exists()


def test_audit_with_serves_state_reads_any_log_and_another_key_is_refused(
    served: tuple[str, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # rich: no line breaks inside what is looked for
    ds_url, state = served
    serve_state = state / "serve"
    assert (serve_state / "auditor.state").exists()  # made by serve, before it listened
    argv = ["audit", "--group", "private", "--ds", ds_url]
    assert main([*argv, "--state", str(serve_state)]) == 0
    assert "members at the end of this log: owner" in capsys.readouterr().out
    other = state / "admin"
    assert main([*argv, "--state", str(other)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("conclave audit: 'auditor' is reserved for an auditor of "), err
    assert err.count("\n") == 1
    # the key it made, never registered, is not kept, nor the directory made for it
    assert "a new one, not kept" in err and "--auditor auditor=" not in err
    assert not other.exists()
    assert main([*argv, "--state", str(serve_state)]) == 0  # the real one still reads


async def test_serve_refuses_a_database_where_its_auditor_was_taken(tmp_path: Path) -> None:
    from conclave.services import auditor_identity

    db = str(tmp_path / "ds.sqlite3")
    squatted = Services(db=db)  # a service of before: `auditor` named, not pinned
    await squatted.start()
    await squatted.stop()
    squatter = Client(b"auditor", 1)
    first = Services(db=db)
    await first.start()
    assert await first.service.storage.register_identity(  # type: ignore[union-attr]
        IdentityRecord("auditor", 1, squatter.signature_key))
    await first.stop()
    record, new = auditor_identity(tmp_path / "serve", "auditor")
    assert new
    pinned = Services(db=db, auditors=frozenset(), own_auditors=(record,))
    with pytest.raises(ConclaveError, match="registered in this database .* with another key"):
        await pinned.start()
    assert pinned.service is None  # stopped: nothing serves


def test_serve_does_not_pin_a_members_key_as_its_auditor(served: tuple[str, Path]) -> None:
    from conclave.services import auditor_identity

    _, state = served
    # owner's state holds the call of room `private`: pinned, owner could post to it no more
    with pytest.raises(ConclaveError, match="is the state of a member of room 'private'"):
        auditor_identity(state / "owner", "owner")


def test_an_auditor_given_with_and_without_a_key_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = Client(b"auditor", 1).signature_key.hex()
    argv = ["serve", "--ds-port", "0", "--sfu-port", "0", "--state", str(tmp_path / "s"),
            "--auditor", "auditor", "--auditor", f"auditor={key}"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "'auditor' is given with a key and without one (serve's own): give it once" in err
    assert not (tmp_path / "s").exists()  # refused before anything was made


def test_an_auditor_on_another_machine_is_told_its_key_and_reads_once_pinned(
    served: tuple[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The README's flow: `audit --as NAME --register` elsewhere makes a key and, refused, says
    # what to pin; the operator serves with it; the same audit (its state: an auditor's, no
    # group) then logs in, registering where the service is new to it, and reads.
    monkeypatch.setenv("COLUMNS", "200")
    ds_url, state = served
    remote = tmp_path / "remote"
    argv = ["audit", "--group", "private", "--as", "aud2", "--state", str(remote)]
    assert main([*argv, "--ds", ds_url, "--register"]) == 2
    err = capsys.readouterr().err
    assert "--auditor aud2=" in err, err
    key = err.split("--auditor aud2=")[1].split()[0].rstrip(".;)")
    with conclave_serve(tmp_path / "serve2", "--auditor", f"aud2={key}") as other:
        create_room(other, tmp_path / "owner2", "owner2", "private")
        assert main([*argv, "--ds", other]) == 0, capsys.readouterr().err
    assert "members at the end of this log: owner2" in capsys.readouterr().out
