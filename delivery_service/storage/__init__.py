"""Storage backends behind one interface; `open_storage` picks one from a URL or path."""

from __future__ import annotations

from .base import (
    IdentityRecord,
    KeyPackageRow,
    NewMessage,
    Storage,
    StoredMessage,
    WelcomeRecord,
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
    "make_storage",
]


def make_storage(db: str, schema: str | None = None) -> Storage:
    """`postgresql://...` (or `postgres://`) selects PostgreSQL; anything else is a SQLite path."""
    if db.startswith(("postgresql://", "postgres://")):
        from .postgres import PostgresStorage  # asyncpg is an optional dependency

        return PostgresStorage(db, schema=schema)
    return SQLiteStorage(db)
