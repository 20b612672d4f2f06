"""Ingest: load images into the images table, one item per row (docs/catalogues.md). From a folder (one sub-folder
per class; files at the top level are unlabelled) or a manifest (manifest.py); every source goes through
`ingest_items`, so the checks, the rejected_files records and re-running are the same."""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..core.images import MAX_FILE_BYTES, BadImageError, inspect_image
from ..errors import BadInput, NotFound
from ..store import NewImage, Store


@dataclass
class IngestReport:
    """What an ingest of `source` did: images added (and how many of them replaced a key's image), already stored,
    and files skipped with the reason."""

    source: str = ""
    """What was ingested: a folder, a manifest, the view."""
    added: int = 0
    already_stored: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    replaced: int = 0
    unlabelled: int = 0
    """Of the images added, those without a label."""


@dataclass(frozen=True)
class Item:
    """One item to ingest: its image (a file or bytes), label (None: unlabelled), key and metadata; or `problem`,
    the reason a source row cannot be ingested (recorded, never read)."""

    name: str
    label: str | None
    source: Path | bytes | None
    key: str | None = None
    metadata: dict[str, Any] | None = None
    problem: str | None = None


def ingest_bytes(store: Store, name: str, label: str | None, data: bytes, key: str | None = None,
                 metadata: dict[str, Any] | None = None) -> tuple[int | None, str | None]:
    """Validate and store one image; return (new id or None, reason it was skipped or None). Bytes already
    stored under the key (or, without a key, anywhere) are not decoded again: re-running an ingest is cheap."""
    sha256 = hashlib.sha256(data).hexdigest()
    stored = store.find_key(key) if key is not None else store.find_sha256(sha256)
    if stored is not None and stored.sha256 == sha256:
        if key is None and (stored.name, stored.label) != (name, label):
            return None, f"identical to stored image {stored.name!r} (label {stored.label!r})"
        return None, None
    try:
        info, _ = inspect_image(data)
    except BadImageError as err:
        return None, str(err)
    image = NewImage(name=name, label=label, data=data, format=info.format, width=info.width, height=info.height,
                     mode=info.mode, sha256=info.sha256, dhash=info.dhash, key=key, metadata=metadata)
    return store.add_image(image), None


def class_files(folder: Path) -> list[tuple[str, str | None, Path]]:
    """(name relative to folder, label, path) of every file, sorted; the label is the top-level sub-folder, None
    for a file at the top level (unlabelled)."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for file in sorted(files):
            if file.startswith("."):
                continue
            path = Path(root) / file
            rel = path.relative_to(folder)
            found.append((rel.as_posix(), rel.parts[0] if len(rel.parts) > 1 else None, path))
    return found


def ingest_one(store: Store, name: str, label: str | None, source: Path | bytes, stage: str = "ingest",
               key: str | None = None, metadata: dict[str, Any] | None = None) -> tuple[int | None, str | None]:
    """Check, validate and store one image (a file or its bytes); return (new id or None, reason it was skipped
    or None). A skipped image is recorded in rejected_files under `stage`."""
    image_id, reason = None, None
    try:
        size = source.stat().st_size if isinstance(source, Path) else len(source)
        if size > MAX_FILE_BYTES:
            reason = f"file too large: {size} bytes (limit {MAX_FILE_BYTES})"
        else:
            data = source.read_bytes() if isinstance(source, Path) else source
            image_id, reason = ingest_bytes(store, name, label, data, key, metadata)
    except OSError as err:
        reason = f"cannot read file: {err.strerror or err}"
    if reason:
        store.record_rejected(name, label, reason, stage=stage)
    return image_id, reason


def ingest_items(store: Store, items: Iterable[Item], source: str, total: int | None = None, progress: bool = True,
                 stage: str = "ingest") -> IngestReport:
    """Ingest the items of `source` one by one as they come (memory stays flat); bad ones are skipped and recorded,
    never fatal."""
    report = IngestReport(source)
    for item in tqdm(items, total=total, desc=stage, unit="item", disable=not progress):
        if item.problem is not None or item.source is None:
            reason = item.problem or "no image"
            store.record_rejected(item.name, item.label, reason, stage=stage)
            report.skipped.append((item.name, reason))
            continue
        before = store.find_key(item.key) if item.key is not None else None
        image_id, reason = ingest_one(store, item.name, item.label, item.source, stage, item.key, item.metadata)
        if image_id is not None:
            report.added += 1
            report.replaced += before is not None
            report.unlabelled += item.label is None
        elif reason:
            report.skipped.append((item.name, reason))
        else:
            report.already_stored += 1
    return report


def json_object(value: Any) -> dict[str, Any]:
    """An item's attributes from JSON text (a manifest's JSON line, the view's metadata) or from the object a
    database's json column gives; BadInput when it is not JSON or not an object."""
    if isinstance(value, (str, bytes)):
        try:
            value = json.loads(value)
        except ValueError as err:
            raise BadInput(f"not JSON: {getattr(err, 'msg', err)}") from None
    if not isinstance(value, dict):
        raise BadInput("not a JSON object")
    return value


def view_item(key: str, label: str | None, data: bytes | None, metadata: Any) -> Item:
    """The item of one row of the view image_source; a row whose metadata is not a JSON object is refused."""
    name = f"image_source/{key}"
    try:
        attributes = None if metadata is None else json_object(metadata)
    except BadInput as err:
        return Item(name, label or None, None, key, problem=f"metadata: {err}")
    return Item(name, label or None, data, key, attributes or None)


def ingest_view(store: Store, progress: bool = True) -> IngestReport:
    """Ingest every row of the view `image_source (item_key, label, data[, metadata])` the database's owner created
    (issue 29): the view's name and columns are fixed, so no SQL text or name from a user is ever run. Safe to
    re-run."""
    items = (view_item(*row) for batch in store.source_rows() for row in batch)
    return ingest_items(store, items, "the view image_source", None, progress)


def ingest(store: Store, folder: str | Path, progress: bool = True) -> IngestReport:
    """Ingest every image under `folder` (sub-folders are classes; top-level files are unlabelled). Safe to re-run."""
    folder = Path(folder)
    if not folder.is_dir():
        raise NotFound(f"not a folder: {folder}")
    files = class_files(folder)
    return ingest_items(store, (Item(name, label, path) for name, label, path in files), str(folder), len(files),
                        progress)
