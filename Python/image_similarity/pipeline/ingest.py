"""Ingest: load a folder of labelled images (one sub-folder per class) into the images table."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from ..core.images import MAX_FILE_BYTES, BadImageError, inspect_image
from ..errors import NotFound
from ..store import NewImage, Store


@dataclass
class IngestReport:
    """What an ingest did: images added, already stored, and files skipped with the reason."""

    added: int = 0
    already_stored: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)


def ingest_bytes(store: Store, name: str, label: str, data: bytes) -> tuple[int | None, str | None]:
    """Validate and store one image; return (new id or None, reason it was skipped or None)."""
    try:
        info, _ = inspect_image(data)
    except BadImageError as err:
        return None, str(err)
    image = NewImage(name=name, label=label, data=data, format=info.format, width=info.width,
                     height=info.height, mode=info.mode, sha256=info.sha256, dhash=info.dhash)
    image_id = store.add_image(image)
    if image_id is not None:
        return image_id, None
    twin = store.find_sha256(info.sha256)
    if twin is not None and (twin.name, twin.label) != (name, label):
        return None, f"identical to stored image {twin.name!r} (label {twin.label!r})"
    return None, None


def class_files(folder: Path) -> list[tuple[str, str, Path]]:
    """(name relative to folder, label, path) of every file, sorted; the label is the top-level sub-folder."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for file in sorted(files):
            if file.startswith("."):
                continue
            path = Path(root) / file
            rel = path.relative_to(folder)
            label = rel.parts[0] if len(rel.parts) > 1 else ""
            found.append((rel.as_posix(), label, path))
    return found


def ingest_one(store: Store, name: str, label: str, source: Path | bytes,
               stage: str = "ingest") -> tuple[int | None, str | None]:
    """Check, validate and store one labelled image (a file or its bytes); return (new id or None, reason it was
    skipped or None). A skipped image is recorded in rejected_files under `stage`."""
    image_id, reason = None, None
    if not label:
        reason = "no label: file is not inside a class folder"
    else:
        try:
            size = source.stat().st_size if isinstance(source, Path) else len(source)
            if size > MAX_FILE_BYTES:
                reason = f"file too large: {size} bytes (limit {MAX_FILE_BYTES})"
            else:
                data = source.read_bytes() if isinstance(source, Path) else source
                image_id, reason = ingest_bytes(store, name, label, data)
        except OSError as err:
            reason = f"cannot read file: {err.strerror or err}"
    if reason:
        store.record_rejected(name, label, reason, stage=stage)
    return image_id, reason


def ingest(store: Store, folder: str | Path, progress: bool = True) -> IngestReport:
    """Ingest every image under `folder`; bad files are skipped and recorded, never fatal. Safe to re-run."""
    folder = Path(folder)
    if not folder.is_dir():
        raise NotFound(f"not a folder: {folder}")
    report = IngestReport()
    for name, label, path in tqdm(class_files(folder), desc="ingest", unit="file", disable=not progress):
        image_id, reason = ingest_one(store, name, label, path)
        if image_id is not None:
            report.added += 1
        elif reason:
            report.skipped.append((name, reason))
        else:
            report.already_stored += 1
    return report
