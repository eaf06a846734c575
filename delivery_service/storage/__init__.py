"""Storage backends behind one interface; `open_storage` picks one from a URL or path."""

from __future__ import annotations

from .base import (
    IdentityRecord,
    KeyPackageRow,
    NewMessage,
    Storage,
    StoredMessage,
    WelcomeRecord,
    is_postgres,
)
from .sqlite import SQLiteStorage

__all__ = [
    "IdentityRecord",
    "KeyPackageRow",
    "NewMessage",
    "SQLiteStorage",
    "Storage",
    "StoredMessage",
    "WelcomeRecord",
    "is_postgres",
    "make_storage",
]


def make_storage(db: str, schema: str | None = None) -> Storage:
    """`postgresql://...` (or `postgres://`, any case) selects PostgreSQL; anything else is a
    SQLite path."""
    if is_postgres(db):
        from .postgres import PostgresStorage  # asyncpg is an optional dependency

        return PostgresStorage(db, schema=schema)
    return SQLiteStorage(db)
