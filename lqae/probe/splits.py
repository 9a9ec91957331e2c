"""Labelled splits for the probe: an image folder (one sub-folder per class) or a token dataset,
checked for usable classes, VAL's classes matched to TRAIN's."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from lqae.errors import DataError
from lqae.images.files import IMAGE_EXTENSIONS
from lqae.images.shards import is_shard_source
from lqae.images.source import scan_images
from lqae.tokendata import is_token_dataset, read_token_dataset


@dataclass
class ProbeSplit:
    """A labelled split: an image folder or a token dataset (then `ids` holds its code ids)."""

    source: Path
    kind: str  # "images" or "tokens"
    paths: list[Path]
    labels: torch.Tensor  # (N,) long
    classes: list[str]
    ids: torch.Tensor | None = None  # (N, L) LM ids for token datasets
    model_config: dict | None = None  # config of the model that wrote a token dataset
    weights: str | None = None  # fingerprint of the weights that wrote a token dataset

    def __len__(self) -> int:
        return len(self.paths)

    def class_counts(self) -> dict[str, int]:
        counts = torch.bincount(self.labels, minlength=len(self.classes)).tolist()
        return dict(zip(self.classes, counts))


def load_split(source: str | Path, role: str = "TRAIN") -> ProbeSplit:
    """Read an image folder (one sub-folder per class), tar shards or a token dataset written by
    `lqae encode --out`."""
    source = Path(source)
    if is_token_dataset(source):
        data = read_token_dataset(source)
        split = ProbeSplit(
            source, "tokens", [Path(p) for p in data.paths], data.labels.long(), list(data.classes), data.ids,
            data.model_config, data.weights,
        )
    else:
        if source.is_file() and not is_shard_source(source):
            raise DataError(f"{role} {source} is neither images (a folder or tar shards) nor a token dataset (.safetensors)")
        folder = scan_images(source)
        empty = _empty_class_dirs(source) if source.is_dir() else []
        if folder.classes and empty:
            raise DataError(f"class folder {empty[0]!r} in {role} {source} has no images; add images or remove it")
        labels = torch.tensor(folder.labels, dtype=torch.long)  # (N,)
        split = ProbeSplit(source, "images", list(folder.paths), labels, list(folder.classes))
    _check_labels(split, role)
    return split


def _empty_class_dirs(root: Path) -> list[str]:
    return [
        d.name for d in sorted(root.iterdir())
        if d.is_dir() and not d.name.startswith(".")
        and not any(p.suffix.lower() in IMAGE_EXTENSIONS for p in d.rglob("*") if p.is_file())
    ]


def _check_labels(split: ProbeSplit, role: str) -> None:
    if not split.classes or (split.labels < 0).any():
        raise DataError(
            f"{role} {split.source} has no classes: a probe needs one sub-folder per class "
            "(or a token dataset encoded from such a folder)"
        )
    if len(split.classes) < 2:
        raise DataError(f"{role} {split.source} has a single class ({split.classes[0]}); a probe needs at least two")
    empty = [name for name, count in split.class_counts().items() if count == 0]
    if empty:
        raise DataError(f"class {empty[0]!r} in {role} {split.source} has no (readable) images")


def match_classes(train: ProbeSplit, val: ProbeSplit) -> ProbeSplit:
    """VAL must have exactly TRAIN's classes; returns VAL with labels in TRAIN's class order."""
    if set(train.classes) != set(val.classes):
        missing = sorted(set(train.classes) - set(val.classes))
        extra = sorted(set(val.classes) - set(train.classes))
        detail = "; ".join(
            part for part in (
                f"missing in VAL: {', '.join(missing)}" if missing else "",
                f"only in VAL: {', '.join(extra)}" if extra else "",
            ) if part
        )
        raise DataError(f"class folders differ between TRAIN {train.source} and VAL {val.source} ({detail})")
    if train.classes == val.classes:
        return val
    order = torch.tensor([train.classes.index(name) for name in val.classes])
    return replace(val, labels=order[val.labels], classes=list(train.classes))


def require_images(split: ProbeSplit, role: str, why: str) -> None:
    """A token dataset can stand in for its images only while the images it was encoded from exist."""
    if split.kind == "images":
        return
    missing = next((p for p in split.paths if not p.is_file()), None)
    if missing is not None:
        raise DataError(
            f"{role} {split.source} is a token dataset and its source image {missing} is not found, but {why} needs "
            "the images; pass the image folder instead, or --baseline none (and LM-only --layers)"
        )
