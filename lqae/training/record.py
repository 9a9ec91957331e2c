"""RUN/data.json: which images trained a run. A resumed run must train on the images it started on."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from lqae.config import write_json
from lqae.errors import DataError
from lqae.images.files import ArchiveMember
from lqae.run_folder import DATA_FILE

log = logging.getLogger(__name__)


def write_data_record(run_dir: Path, folder, val_folder, resume: bool) -> None:
    """RUN_DIR/data.json: which images trained the model (the model card reports them). A resumed
    run must train on the data the record names (else a DataError); a changed --val is recorded,
    with a warning."""
    def describe(found, unchanged: bool = False) -> dict:
        described = {"folder": str(found.root), "name": Path(found.root).resolve().name, "images": len(found),
                     "classes": list(found.classes), "skipped": len(found.skipped), "digest": _data_digest(found)}
        return {**described, **(_unchanged_marks(found) if unchanged else {})}

    previous = _read_record(run_dir / DATA_FILE) if resume else None
    record = {"train": describe(folder, unchanged=not previous),
              "val": describe(val_folder) if val_folder is not None else None}
    if previous and previous.get("train"):
        _check_same_data(previous["train"], record["train"], run_dir)
        # the same images: the record stays as it was written (a copy's new times taken in)
        record["train"] = {**previous["train"], **_check_unchanged(previous["train"], folder, run_dir)}
        before = previous.get("val")
        if record["val"] and before and before.get("digest") != record["val"]["digest"]:
            log.warning("%s: validating on %s from now on (it was validated on %s)", run_dir,
                        record["val"]["folder"], before.get("folder"))
        record["val"] = record["val"] or before
    write_json(run_dir / DATA_FILE, record)


def _data_digest(found) -> str:
    """A short id of an image folder's content as training sees it: classes, and each image's path
    inside the folder and size (moving the folder keeps it; adding, removing or replacing an image does not)."""
    digest = hashlib.sha256(json.dumps(list(found.classes)).encode())
    for path, label in zip(found.paths, found.labels):
        if isinstance(path, ArchiveMember):  # a tar shard's member: its name and size inside the shard
            where, size = path.where, path.size
        else:
            where, size = Path(path).relative_to(found.root).as_posix(), os.path.getsize(path)
        digest.update(f"{where}\0{size}\0{label}\n".encode())
    return digest.hexdigest()[:16]


CONTENT_LIMIT = 512 << 20  # a training set up to this many bytes is read whole for its content digest
TIME_CHUNK = 1000  # a larger one: one digest of modification times per this many images


def _unchanged_marks(found) -> dict:
    """What tells, at a resume, whether an image was replaced by another of the same name and size:
    the SHA-256 of every byte for a set of up to CONTENT_LIMIT bytes; beyond, a digest of the
    images' modification times per TIME_CHUNK images (reading every byte of a large set at each
    resume would cost minutes)."""
    sizes = [path.size if isinstance(path, ArchiveMember) else os.path.getsize(path) for path in found.paths]
    if sum(sizes) <= CONTENT_LIMIT:
        digest = hashlib.sha256()
        for path in found.paths:
            with (path.open_bytes() if isinstance(path, ArchiveMember) else open(path, "rb")) as handle:
                digest.update(handle.read())
        return {"content_sha256": digest.hexdigest()}
    return {"mtime_chunks": _time_chunks(found)}


def _time_chunks(found) -> list[str]:
    chunks = []
    for start in range(0, len(found.paths), TIME_CHUNK):
        digest = hashlib.sha256()
        for path in found.paths[start : start + TIME_CHUNK]:
            digest.update(str(os.stat(path.archive if isinstance(path, ArchiveMember) else path).st_mtime_ns).encode())
        chunks.append(digest.hexdigest()[:12])
    return chunks


def _check_unchanged(recorded: dict, found, run_dir: Path) -> dict:
    """DataError when an image was replaced since the run started (same names and sizes, other
    content): by content for a small set; by modification times for a large one, where times that
    all changed at once read as a copy of the folder (a warning; the new times are returned, to be
    recorded) and some that changed as replaced images."""
    replaced = f"{run_dir} was trained on other images: {{}} changed since training started; resume on the same images, or train a new --out"
    if "content_sha256" in recorded:
        if _unchanged_marks(found).get("content_sha256", recorded["content_sha256"]) != recorded["content_sha256"]:
            raise DataError(replaced.format("the content of its images (same names and sizes)"))
    elif "mtime_chunks" in recorded:
        now = _time_chunks(found)
        changed = [i for i, (a, b) in enumerate(zip(recorded["mtime_chunks"], now)) if a != b]
        if changed and len(changed) == len(recorded["mtime_chunks"]) > 1:
            log.warning("%s: every image's modification time changed since training started, as a copy of the folder "
                        "does; names and sizes match, so training goes on", run_dir)
            return {"mtime_chunks": now}
        if changed:
            first = changed[0] * TIME_CHUNK
            raise DataError(replaced.format(
                f"images {first} to {first + TIME_CHUNK - 1} (from {found.paths[first]}; their modification times)"
            ))
    return {}


def _check_same_data(recorded: dict, current: dict, run_dir: Path) -> None:
    if "digest" in recorded:
        same = recorded["digest"] == current["digest"]
    else:  # a record from before digests: folder, count and classes
        same = (Path(recorded.get("folder", "")).resolve(), recorded.get("images"), recorded.get("classes")) == (
            Path(current["folder"]).resolve(), current["images"], current["classes"])
    if not same:
        raise DataError(
            f"{run_dir} was trained on {recorded.get('folder')} ({recorded.get('images')} images); {current['folder']} "
            f"({current['images']} images) holds other data: resume on the same images, or train a new --out"
        )


def _read_record(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


