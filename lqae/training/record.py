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
    def describe(found) -> dict:
        return {"folder": str(found.root), "name": Path(found.root).resolve().name, "images": len(found),
                "classes": list(found.classes), "skipped": len(found.skipped), "digest": _data_digest(found)}

    record = {"train": describe(folder), "val": describe(val_folder) if val_folder is not None else None}
    previous = _read_record(run_dir / DATA_FILE) if resume else None
    if previous and previous.get("train"):
        _check_same_data(previous["train"], record["train"], run_dir)
        record["train"] = previous["train"]  # the same images: the record stays as it was written
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


