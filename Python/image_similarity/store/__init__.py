"""Stores: the engine's tables in a database. `connect` picks one from a path or URL."""
from __future__ import annotations

from pathlib import Path

from .base import PROCEDURES, VECTOR_SEARCH, EvaluationRecord, ImageRow, ModelRecord, NewImage, Store, StoreError
from .mssql import MSSQLStore
from .postgres import PostgresStore
from .sqlite import SQLiteStore

DEFAULT_DB = "image_similarity.sqlite"

__all__ = [
    "DEFAULT_DB",
    "EvaluationRecord",
    "ImageRow",
    "ModelRecord",
    "NewImage",
    "PROCEDURES",
    "SQLiteStore",
    "Store",
    "StoreError",
    "VECTOR_SEARCH",
    "connect",
]


def connect(db: str | Path = DEFAULT_DB) -> Store:
    """Open the store named by a file path or a URL (`sqlite:///path`, `postgresql://[user@]host[:port]/database`,
    `mssql://[user@]host[:port]/database`)."""
    text = str(db)
    if text.startswith("sqlite:///"):
        return SQLiteStore(text.removeprefix("sqlite:///"))
    if text.startswith(("postgresql://", "postgres://")):  # issue 5: PostgreSQL + pgvector
        return PostgresStore(text)
    if text.startswith("mssql://"):  # issue 4: SQL Server
        return MSSQLStore(text)
    if "://" in text:
        scheme = text.split("://", 1)[0]
        raise StoreError(f"unsupported database URL scheme {scheme!r}: "
                         "use a file path, sqlite:///path, postgresql:// or mssql://")
    return SQLiteStore(text)
