"""A first `conclave join` that fails at registration: what its state directory keeps, and what
the user is told. A key the service refused is not kept; one it may not have seen is, and the
next run registers it; a registered state is never deleted."""

from __future__ import annotations

import asyncio
from pathlib import Path

import cbor2
import pytest

from conclave.cli import main
from conclave.errors import ConclaveError
from conclave.participant import Participant
from conclave.services import Services
from delivery_service.errors import RequestFailed
from tests.conclave.served import conclave_serve
from tests.delivery_service.procs import free_port


def _saved(state: Path, name: str) -> dict:
    return cbor2.loads((state / f"{name}.state").read_bytes())


def _register(ds_url: str, state: Path, name: str) -> str:
    """`name` registered with a new key kept in `state`; its fingerprint."""
    async def run() -> str:
        p = Participant(name, ds_url, state_dir=state)
        try:
            await p.start()
            return p.key_fingerprint
        finally:
            await p.close()

    return asyncio.run(run())


def _join(ds_url: str, state: Path, name: str) -> list[str]:
    return ["join", "--room", "r", "--name", name, "--ds", ds_url, "--state", str(state),
            "--sfu", f"http://127.0.0.1:{free_port()}/v1/signal", "--no-audio", "--no-commands"]


def test_a_first_join_refused_for_a_taken_name_keeps_no_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Before: elsewhere/alice.state kept the refused key, which every later run there used.
    with conclave_serve(tmp_path / "served") as ds_url:
        _register(ds_url, tmp_path / "home", "alice")
        registered = (tmp_path / "home" / "alice.state").read_bytes()
        assert main(_join(ds_url, tmp_path / "elsewhere", "alice")) == 2
        err = capsys.readouterr().err
        assert err == (
            f"conclave join: the delivery service at {ds_url} refused to register alice: the "
            "name is registered with another key: join with the state directory that "
            "registered it (--state), or choose another --name (this run's new key was never "
            "registered: nothing was saved)\n"
        )
        assert not (tmp_path / "elsewhere" / "alice.state").exists()
        assert not (tmp_path / "elsewhere" / "alice.lock").exists()
        # the registered one is untouched, and still alice
        assert (tmp_path / "home" / "alice.state").read_bytes() == registered
        _register(ds_url, tmp_path / "home", "alice")


def test_a_first_join_with_the_service_down_keeps_its_key_for_the_next_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    down = f"http://127.0.0.1:{free_port()}"
    assert main(_join(down, state, "bob")) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"conclave join: cannot reach the delivery service at {down}: ")
    assert err.endswith(f"; the new key of bob is kept in {state / 'bob.state'}, not registered "
                        "yet: the next run with this state directory registers it\n")
    assert err.count("\n") == 1 and "Traceback" not in err
    assert _saved(state, "bob")["registered"] is False
    # Still down: the same again, the same key.
    key = _saved(state, "bob")["client"]
    assert main(_join(down, state, "bob")) == 2
    assert "not registered yet" in capsys.readouterr().err
    assert _saved(state, "bob")["client"] == key
    # Up: the next run registers that key, and the state says so.
    with conclave_serve(tmp_path / "served") as ds_url:
        fingerprint = _register(ds_url, state, "bob")
        assert _saved(state, "bob")["registered"] is True
        assert _register(ds_url, state, "bob") == fingerprint  # the same key, registered


async def test_a_refusal_other_than_a_taken_name_keeps_the_new_key(
    services: Services, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def refuse(self: object) -> None:
        raise RequestFailed(503, "unavailable", "the database is unreachable")

    monkeypatch.setattr("delivery_service.client.DeliveryClient.register", refuse)
    carol = Participant("carol", services.ds_url, state_dir=tmp_path)
    with pytest.raises(ConclaveError) as info:
        await carol.start()
    await carol.close()
    assert str(info.value) == (
        f"the delivery service at {services.ds_url} refused to register carol: the database "
        f"is unreachable: try again later; the new key of carol is kept in {tmp_path / 'carol.state'}, not "
        "registered yet: the next run with this state directory registers it"
    )
    assert _saved(tmp_path, "carol")["registered"] is False
    monkeypatch.undo()
    again = Participant("carol", services.ds_url, state_dir=tmp_path)
    await again.start()
    await again.close()
    assert again.key_fingerprint == carol.key_fingerprint
    assert _saved(tmp_path, "carol")["registered"] is True


async def test_a_registered_state_stays_when_another_service_refuses_it(
    tmp_path: Path, two_services: tuple[Services, Services]
) -> None:
    one, two = two_services
    home = tmp_path / "home"
    dave = Participant("dave", one.ds_url, state_dir=home)
    await dave.start()
    await dave.create("r")
    await dave.close()
    other = Participant("dave", two.ds_url, state_dir=tmp_path / "other")
    await other.start()
    await other.close()
    before = (home / "dave.state").read_bytes()
    lost = Participant("dave", two.ds_url, state_dir=home)
    with pytest.raises(ConclaveError) as info:
        await lost.start()
    await lost.close()
    assert str(info.value) == (
        f"the delivery service at {two.ds_url} refused to register dave: the name is "
        f"registered with another key than the one in {home / 'dave.state'}: join with the "
        "state directory that registered it (--state), or choose another --name"
    )
    assert (home / "dave.state").read_bytes() == before  # its call and its key


async def test_an_earlier_runs_unregistered_key_is_kept_and_explained(
    services: Services, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    first = Participant("erin", f"http://127.0.0.1:{free_port()}", state_dir=state)
    with pytest.raises(ConclaveError, match="not registered yet"):
        await first.start()
    await first.close()
    before = (state / "erin.state").read_bytes()
    # Meanwhile erin registers from another state directory.
    elsewhere = Participant("erin", services.ds_url, state_dir=tmp_path / "elsewhere")
    await elsewhere.start()
    await elsewhere.close()
    # The key of the first run may be registered on the service it tried (its answer lost):
    # not deleted, but the user learns it was never confirmed.
    again = Participant("erin", services.ds_url, state_dir=state)
    with pytest.raises(ConclaveError, match="no service confirmed registering that key") as info:
        await again.start()
    await again.close()
    assert "move the file away unless another delivery service knows erin" in str(info.value)
    assert (state / "erin.state").read_bytes() == before
