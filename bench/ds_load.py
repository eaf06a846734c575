"""Delivery-service load: G groups x C clients on loopback, for SQLite and PostgreSQL.

Each group's members commit one after another (one commit per epoch, the winner's author picks
the next member) while every member holds a WebSocket; all groups run at once. Measured: handshake
messages accepted per second, and post-to-push latency (from the start of the POST to the push
arriving at each other member, the author's own copy left out) p50 / p99. The reference, measured
in the same run on the same loopback with as many concurrent POSTs as there are groups, is a bare
aiohttp endpoint in a child process (as the service is) that answers a CBOR POST without
storage: the ceiling that HTTP and CBOR alone allow. The commits are synthetic (random signature
and tags, an empty Commit), so the service runs with `--tracker basic`: it orders, stores and
fans them out but does not verify them against a public tree.

    python bench/ds_load.py                      # 100 groups x 10 clients (postgres too if
                                                 # CONCLAVE_PG_DSN is set)
    python bench/ds_load.py --groups 20 --seconds 5 --backends sqlite

PostgreSQL needs CONCLAVE_PG_DSN (`bash .ci/postgres.sh && source .ci/postgres.env`).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import cbor2
from _env import at_least, environment, positive
from aiohttp import web

from delivery_service.client import DeliveryClient, Message, PushStream, wait_healthy
from delivery_service.errors import StaleEpochRejected
from mls.client import Client
from mls.commit import Commit
from mls.framing import (
    ContentType,
    FramedContent,
    FramedContentAuthData,
    MLSMessage,
    PublicMessage,
    Sender,
)


def commit(group_id: bytes, epoch: int, leaf: int) -> bytes:
    content = FramedContent(group_id, epoch, Sender.member(leaf), b"", ContentType.commit,
                            commit=Commit())
    auth = FramedContentAuthData(os.urandom(64), os.urandom(32))
    return MLSMessage(PublicMessage(content, auth, os.urandom(32))).encode()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_started(url: str, proc: subprocess.Popen[bytes], log: Path | None = None) -> None:
    if await wait_healthy(url, alive=lambda: proc.poll() is None):
        return
    see = f"; see {log}" if log is not None else ""
    if proc.poll() is not None:
        raise SystemExit(f"the service exited{see}")
    raise SystemExit(f"the service did not start{see}")


def reference_app() -> web.Application:
    """A bare CBOR POST handler (decode the body, answer a small CBOR map), and /healthz."""

    async def handler(request: web.Request) -> web.Response:
        cbor2.loads(await request.read())
        return web.Response(body=cbor2.dumps({"seq": 1, "epoch": 1}),
                            content_type="application/cbor")

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/", handler)
    app.router.add_get("/healthz", healthz)
    return app


async def reference_rate(http: aiohttp.ClientSession, seconds: float, concurrency: int) -> float:
    """Requests per second of a bare CBOR POST handler on loopback, served by a child process
    as the delivery service is (in this process it would share the load generator's CPU)."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--reference-server", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        await wait_started(f"http://127.0.0.1:{port}", proc)
        body = cbor2.dumps({"message": commit(b"g" * 16, 1, 0)})
        count = 0
        deadline = time.monotonic() + seconds

        async def worker() -> None:
            nonlocal count
            while time.monotonic() < deadline:
                async with http.post(f"http://127.0.0.1:{port}/", data=body,
                                     headers={"Content-Type": "application/cbor"}) as r:
                    await r.read()
                count += 1

        start = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return count / (time.monotonic() - start)
    finally:
        proc.terminate()
        proc.wait()


async def run_backend(backend: str, args: argparse.Namespace) -> dict[str, float]:
    tmp = Path(tempfile.mkdtemp(prefix="ds_load_"))
    port = free_port()
    cli = ["--db", str(tmp / "ds.sqlite3")]
    schema = None
    if backend == "postgres":
        dsn = os.environ.get("CONCLAVE_PG_DSN")
        if not dsn:
            raise SystemExit("CONCLAVE_PG_DSN unset: run .ci/postgres.sh and source .ci/postgres.env")
        schema = "ds_bench_" + os.urandom(4).hex()
        cli = ["--db", dsn, "--pg-schema", schema]
    log = (tmp / "service.log").open("wb")  # left in the temporary folder on a failure
    proc = subprocess.Popen(
        [sys.executable, "-m", "delivery_service", *cli, "--host", "127.0.0.1", "--port",
         str(port), "--log-level", "WARNING", "--tracker", "basic"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    ok = False
    try:
        await wait_started(url, proc, tmp / "service.log")
        connector = aiohttp.TCPConnector(limit=args.connections)
        async with aiohttp.ClientSession(connector=connector) as http:
            result = await load(url, http, args)
        ok = True
        return result
    finally:
        proc.terminate()
        proc.wait()
        log.close()
        if ok:
            shutil.rmtree(tmp, ignore_errors=True)
        if schema is not None:
            import asyncpg

            conn = await asyncpg.connect(os.environ["CONCLAVE_PG_DSN"])
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            await conn.close()


async def load(url: str, http: aiohttp.ClientSession, args: argparse.Namespace) -> dict[str, float]:
    groups: list[tuple[bytes, list[DeliveryClient]]] = []
    sem = asyncio.Semaphore(50)

    async def make(name: str) -> DeliveryClient:
        c = Client(name.encode(), 1)
        ds = DeliveryClient(url, name, 1, c.signature_priv, c.signature_key, http=http)
        async with sem:
            await ds.register()
        return ds

    for g in range(args.groups):
        members = await asyncio.gather(*(make(f"g{g}c{i}") for i in range(args.clients)))
        gid = os.urandom(16)
        await members[0].create_group(gid)
        await members[0].send(gid, commit(gid, 0, 0), adds=[m.identity for m in members[1:]])
        groups.append((gid, list(members)))

    sent_at: dict[bytes, float] = {}
    latencies: list[float] = []
    streams: list[PushStream] = []

    async def listen(stream: PushStream, identity: str) -> None:
        async for event in stream:
            # Each other member's push; the author's own copy of its commit is not a delivery.
            if isinstance(event, Message) and event.sender != identity:
                t0 = sent_at.get(event.message)
                if t0 is not None:
                    latencies.append(time.perf_counter() - t0)

    listeners = []
    for gid, members in groups:
        for m in members:
            s = await m.connect()
            await s.subscribe(gid, after=1)
            streams.append(s)
            listeners.append(asyncio.create_task(listen(s, m.identity)))

    accepted = 0
    deadline = time.monotonic() + args.seconds

    async def drive(gid: bytes, members: list[DeliveryClient]) -> None:
        nonlocal accepted
        epoch, turn = 1, 0
        while time.monotonic() < deadline:
            data = commit(gid, epoch, turn)
            sent_at[data] = time.perf_counter()
            try:
                acc = await members[turn].send(gid, data)
            except StaleEpochRejected as exc:
                epoch = exc.current_epoch
                continue
            accepted += 1
            epoch = acc.epoch
            turn = (turn + 1) % len(members)

    start = time.monotonic()
    await asyncio.gather(*(drive(gid, members) for gid, members in groups))
    elapsed = time.monotonic() - start
    await asyncio.sleep(0.5)  # let the last pushes land
    for s in streams:
        await s.close()
    for t in listeners:
        t.cancel()
    q = statistics.quantiles(latencies, n=100) if len(latencies) >= 2 else [math.nan] * 99
    return {"accepted_per_s": accepted / elapsed, "p50_ms": q[49] * 1000, "p99_ms": q[98] * 1000,
            "pushes": len(latencies)}


BACKENDS = ("sqlite", "postgres")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--groups", type=at_least(1), default=100)
    p.add_argument("--clients", type=at_least(2), default=10, help="per group, at least 2")
    p.add_argument("--seconds", type=positive(), default=10.0)
    p.add_argument("--connections", type=at_least(0), default=0,
                   help="HTTP connection pool size (0: unlimited; each WebSocket holds one)")
    p.add_argument("--backends", default=None,
                   help="comma-separated, of sqlite and postgres (default: sqlite, and postgres\n"
                        "too when CONCLAVE_PG_DSN is set)")
    p.add_argument("--reference-server", type=int, help=argparse.SUPPRESS)  # the child process
    args = p.parse_args(argv)
    if args.backends is None:
        args.backends = "sqlite,postgres" if os.environ.get("CONCLAVE_PG_DSN") else "sqlite"
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = sorted(set(backends) - set(BACKENDS))
    if unknown or not backends:
        p.error(f"--backends: unknown backend {', '.join(map(repr, unknown))}; "
                f"choose from {', '.join(BACKENDS)}" if unknown else "--backends: none named")
    if "postgres" in backends and not os.environ.get("CONCLAVE_PG_DSN"):
        p.error("--backends postgres needs CONCLAVE_PG_DSN "
                "(bash .ci/postgres.sh && source .ci/postgres.env)")
    args.backends = backends
    return args


async def main(args: argparse.Namespace) -> None:
    print(environment())
    print(f"{args.groups} groups x {args.clients} clients, {args.seconds:g} s per backend, "
          f"connection pool {args.connections or 'unlimited'}, backends {','.join(args.backends)} "
          "(service --tracker basic: synthetic commits, not verified); "
          f"reference: {args.groups} concurrent POSTs for {min(args.seconds, 5):g} s", flush=True)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=args.connections)) as h:
        ref = await reference_rate(h, min(args.seconds, 5), args.groups)
    rows = []
    for backend in args.backends:
        r = await run_backend(backend, args)
        rows.append((backend, r))
    print(f"\n{args.groups} groups x {args.clients} clients, {args.seconds:g} s, loopback; "
          "push latency: POST start to each other member's push")
    print(f"{'backend':<12}{'accepted/s':>12}{'% of ref':>10}{'push p50 ms':>13}"
          f"{'push p99 ms':>13}{'pushes':>9}")
    print(f"{'reference':<12}{ref:>12.0f}{100:>9.0f}%{'-':>13}{'-':>13}{'-':>9}")
    for backend, r in rows:
        print(f"{backend:<12}{r['accepted_per_s']:>12.0f}{100 * r['accepted_per_s'] / ref:>9.1f}%"
              f"{r['p50_ms']:>13.1f}{r['p99_ms']:>13.1f}{int(r['pushes']):>9}")


def serve_reference(port: int) -> None:
    web.run_app(reference_app(), host="127.0.0.1", port=port, access_log=None, print=None)


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.reference_server is not None:
        serve_reference(arguments.reference_server)
    else:
        asyncio.run(main(arguments))
