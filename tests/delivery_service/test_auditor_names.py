"""An auditor's name cannot be squatted: a key pinned for it (`--auditor NAME=KEYHEX`) is the only
one the service registers for that name, and auditors read logs but join no group."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from delivery_service.errors import RequestFailed
from delivery_service.server import Config, DeliveryService
from delivery_service.storage import IdentityRecord, Storage
from delivery_service.tracker import BasicTracker
from mls.client import Client

from . import mlsmsg
from .conftest import serving
from .procs import ds_client

READS_ONLY = "'auditor' is an auditor of this service: it reads logs and joins no group"


def _service(storage: Storage, **auditor_keys: bytes) -> DeliveryService:
    """A service naming `auditor`, pinned to the keys given."""
    return DeliveryService(
        storage, Config(auditors=frozenset({"auditor"}), auditor_keys=auditor_keys),
        BasicTracker(),
    )


async def _refused(call, code: str, says: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(RequestFailed) as info:
        await call
    assert (info.value.status, info.value.code) == (403, code), info.value
    assert says in info.value.reason


async def test_a_pinned_auditor_name_refuses_every_other_key(sqlite_storage: Storage) -> None:
    real = Client(b"auditor", 1)
    async with serving(_service(sqlite_storage, auditor=real.signature_key)) as url:
        squatter = ds_client(url, "auditor")
        await _refused(squatter.register(), "reserved_name",
                       "'auditor' is reserved for an auditor of this service")
        assert await sqlite_storage.get_identity("auditor") is None  # nothing registered
        await squatter.close()
        # the pinned key's holder registers, and reads a group it is no member of
        owner = ds_client(url, "owner")
        await owner.register()
        gid = os.urandom(16)
        await owner.create_group(gid)
        await owner.send(gid, mlsmsg.commit(gid, 0))
        auditor = ds_client(url, "auditor", real)
        await auditor.register()
        assert [e.seq for e in await auditor.audit_log(gid)] == [1]
        for c in (owner, auditor):
            await c.close()


async def test_a_name_taken_before_it_was_pinned_gets_nothing(sqlite_storage: Storage) -> None:
    squatter_mls = Client(b"auditor", 1)
    # registered when the service named `auditor` without a key: first come
    await sqlite_storage.register_identity(
        IdentityRecord("auditor", 1, squatter_mls.signature_key))
    async with serving(_service(sqlite_storage)) as url:  # unpinned: the squatter gets a session
        squatter = ds_client(url, "auditor", squatter_mls)
        await squatter.login()
        old_session = squatter.session
    real = Client(b"auditor", 1)
    async with serving(_service(sqlite_storage, auditor=real.signature_key)) as url:
        owner = ds_client(url, "owner")
        await owner.register()
        gid = os.urandom(16)
        await owner.create_group(gid)
        squatter = ds_client(url, "auditor", squatter_mls)
        await _refused(squatter.login(), "reserved_name", "registered with another key")
        squatter.session = old_session  # a session from before the pin is worth nothing now
        await _refused(squatter.audit_log(gid), "reserved_name", "registered with another key")
        for c in (owner, squatter):
            await c.close()


async def test_an_auditor_joins_no_group(sqlite_storage: Storage) -> None:
    async with serving(_service(sqlite_storage)) as url:  # also an auditor named without a key
        auditor_mls = Client(b"auditor", 1)
        auditor = ds_client(url, "auditor", auditor_mls)
        await auditor.register()
        owner = ds_client(url, "owner")
        await owner.register()
        gid = os.urandom(16)
        await owner.create_group(gid)
        await _refused(auditor.upload_key_packages([auditor_mls.key_package()]),
                       "auditor_reads_only", READS_ONLY)
        await _refused(auditor.create_group(os.urandom(16)), "auditor_reads_only", READS_ONLY)
        await _refused(auditor.send(gid, mlsmsg.commit(gid, 0)), "auditor_reads_only",
                       READS_ONLY)
        await _refused(auditor.claim_key_package("owner"), "auditor_reads_only", READS_ONLY)
        # nothing changed: the group is as the owner left it, and no KeyPackage is stored
        assert (await owner.group(gid))["members"] == ["owner"]
        assert await sqlite_storage.count_key_packages("auditor", 0) == 0
        for c in (owner, auditor):
            await c.close()


def test_auditor_options_pin_keys_and_warn_of_unpinned_names(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from delivery_service.__main__ import parse_auditors

    key = Client(b"a", 1).signature_key
    with caplog.at_level(logging.WARNING, "delivery_service"):
        names, keys = parse_auditors(["ops", f"auditor={key.hex()}"])
    assert names == frozenset({"ops", "auditor"}) and keys == {"auditor": key}
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "'ops'" in warnings[0]
    assert "the first to register it becomes" in warnings[0]


@pytest.mark.parametrize("value, says", [
    ("auditor=zz", "not a signature public key in hex"),
    ("auditor=" + "00" * 31, "not a signature public key in hex"),
    ("=" + "00" * 32, "names no identity"),
    ("a/b", "must not contain '/'"),
    ("auditor =" + "00" * 32, "starts or ends with a space"),
    (" auditor", "starts or ends with a space"),
])
def test_a_bad_auditor_option_stops_the_start_with_a_reason(
    value: str, says: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from delivery_service.__main__ import main

    with pytest.raises(SystemExit) as info:
        main(["--db", str(tmp_path / "ds.sqlite3"), "--port", "0", "--auditor", value])
    assert info.value.code == 2  # a usage error (test_auditor_usage)
    err = capsys.readouterr().err
    assert says in err
    assert err.startswith("delivery service: --auditor") and err.count("\n") == 1
    assert not (tmp_path / "ds.sqlite3").exists()  # stopped before anything was made
