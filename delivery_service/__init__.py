"""The MLS delivery service: orders, stores and fans out handshake messages it cannot read.

- `server`: the aiohttp application (`/v1/` API, CBOR bodies, one WebSocket per client).
- `client`: the asyncio client library (`DeliveryClient`, `PushStream`).
- `storage`: one interface, SQLite (default) and PostgreSQL backends.
- `tracker`: the service's public view of each group and the check of each handshake message.

Run it with ``python -m delivery_service --db PATH|postgresql://... --host H --port P``; the API
is described in docs/delivery-service-api.md.
"""
