"""Manifests (issue 29): a CSV file or JSON lines, one item per row: a `path` column (relative to the manifest's
folder, or absolute), optional `label` and `key` columns (empty: none), every other column kept as the item's
metadata. Read row by row, so a manifest of any length ingests in flat memory (docs/catalogues.md)."""
from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import BadInput, NotFound
from ..store import Store
from .ingest import IngestReport, Item, ingest_items, json_object

PATH, LABEL, KEY = "path", "label", "key"
MAX_LABEL, MAX_KEY = 200, 400
"""The longest label and key every database holds (SQL Server's nvarchar(200) and nvarchar(400))."""


def _text(value: Any, what: str, limit: int) -> str | None:
    """A label or key: None when missing or empty; BadInput when not text, or too long."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise BadInput(f"the {what} is not text: {json.dumps(value)[:60]}")
    value = value.strip()
    if len(value) > limit:
        raise BadInput(f"the {what} is longer than {limit} characters")
    return value or None


def item(row: dict[str, Any], folder: Path, where: str) -> Item:
    """The item of one manifest row (`where`: the row for people, e.g. 'items.csv line 7')."""
    path = row.get(PATH)
    if not isinstance(path, str) or not path.strip():
        return Item(where, None, None, problem=f"no {PATH}")
    try:
        label, key = _text(row.get(LABEL), "label", MAX_LABEL), _text(row.get(KEY), "key", MAX_KEY)
    except BadInput as err:
        return Item(path.strip(), None, None, problem=f"{where}: {err}")
    metadata = {k: v for k, v in row.items() if k not in (PATH, LABEL, KEY) and v not in (None, "")}
    return Item(path.strip(), label, folder / path.strip(), key, metadata or None)


def rows(manifest: Path) -> Iterator[tuple[dict[str, Any] | str, str]]:
    """(row as a dict, or the reason it is not one; 'FILE line N') of each row, streamed: JSON lines for
    .jsonl/.ndjson files, else CSV with a header row."""
    with manifest.open(encoding="utf-8-sig", newline="") as f:
        if manifest.suffix.lower() in (".jsonl", ".ndjson"):
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{manifest.name} line {number}"
                try:
                    yield json_object(line), where
                except BadInput as err:
                    yield str(err), where
            return
        reader = csv.DictReader(f)
        if reader.fieldnames is None or PATH not in reader.fieldnames:
            raise BadInput(f"{manifest}: the first row must name the columns, one of them {PATH!r}")
        for row in reader:
            extra = row.pop(None, None)  # values beyond the header's columns
            yield (f"{len(extra)} values more than the header names" if extra else row), \
                f"{manifest.name} line {reader.line_num}"


def count_rows(manifest: Path) -> int:
    """About how many rows the manifest has (its lines, less a CSV header), for the progress bar."""
    with manifest.open("rb") as f:
        lines = sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
    return max(lines - (manifest.suffix.lower() not in (".jsonl", ".ndjson")), 0)


def ingest_manifest(store: Store, manifest: str | Path, progress: bool = True) -> IngestReport:
    """Ingest every row of a manifest; bad rows are recorded in rejected_files with the reason. Safe to re-run."""
    manifest = Path(manifest)
    if not manifest.is_file():
        raise NotFound(f"no manifest file {manifest}")
    folder = manifest.resolve().parent
    items = (Item(where, None, None, problem=row) if isinstance(row, str) else item(row, folder, where)
             for row, where in rows(manifest))
    return ingest_items(store, items, str(manifest), count_rows(manifest), progress)
