"""An auditor joins no group by any route: not by a member's membership hints (the header-only
tracker takes membership from them), nor by a KeyPackage it uploaded before it was named an
auditor being handed out to a member."""

from __future__ import annotations

import os

import pytest

from delivery_service.errors import RequestFailed
from delivery_service.server import Config, DeliveryService
from delivery_service.storage import Storage
from delivery_service.tracker import BasicTracker
from mls.client import Client

from . import mlsmsg
from .conftest import serving
from .procs import ds_client
from .test_auditor_names import _service


@pytest.mark.parametrize("pinned", [False, True])
async def test_a_commit_hinting_an_auditor_as_added_is_refused(
    sqlite_storage: Storage, pinned: bool
) -> None:
    auditor_mls = Client(b"auditor", 1)
    keys = {"auditor": auditor_mls.signature_key} if pinned else {}
    async with serving(_service(sqlite_storage, **keys)) as url:
        auditor = ds_client(url, "auditor", auditor_mls)
        await auditor.register()
        owner = ds_client(url, "owner")
        await owner.register()
        gid = os.urandom(16)
        await owner.create_group(gid)
        with pytest.raises(RequestFailed) as info:
            await owner.send(gid, mlsmsg.commit(gid, 0), adds=["auditor"])
        assert (info.value.status, info.value.code) == (403, "forbidden")
        assert "'auditor', an auditor of this service" in info.value.reason
        # nothing changed: no epoch, no member, and the auditor reads no message of the group
        group = await owner.group(gid)
        assert (group["members"], group["epoch"]) == (["owner"], 0)
        with pytest.raises(RequestFailed) as info:
            await auditor.messages(gid)
        assert info.value.status == 403
        for c in (owner, auditor):
            await c.close()


async def test_an_auditors_key_package_from_before_is_not_handed_out(sqlite_storage: Storage) -> None:
    auditor_mls = Client(b"auditor", 1)
    # `auditor` was an ordinary member's name, with KeyPackages stored, before it was named
    async with serving(DeliveryService(sqlite_storage, Config(), BasicTracker())) as url:
        auditor = ds_client(url, "auditor", auditor_mls)
        await auditor.register()
        await auditor.upload_key_packages([auditor_mls.key_package()])
        await auditor.close()
    async with serving(_service(sqlite_storage, auditor=auditor_mls.signature_key)) as url:
        owner = ds_client(url, "owner")
        await owner.register()
        with pytest.raises(RequestFailed) as info:
            await owner.claim_key_package("auditor")
        assert (info.value.status, info.value.code) == (403, "auditor_reads_only")
        assert "'auditor' is an auditor of this service" in info.value.reason
        assert await sqlite_storage.count_key_packages("auditor", 0) == 1  # not used up
        await owner.close()
