"""WebDataset-style tar shards as an image source: `*.tar` files of `KEY.jpg` (or .png, .webp, ...)
with an optional `KEY.cls` label, read with the standard library's `tarfile`.

Accepted wherever `lqae train` and `lqae encode` take an image folder: one shard (`data.tar`), a
folder holding only shards, or WebDataset's brace form (`train-{000000..000146}.tar`). A sample's
key is its member name up to the first dot of the file name, as WebDataset reads it. Members are
read by offset, so any image is reached without reading the shard from the start (training draws
images at random, from worker processes).

Labels: `KEY.cls` holds a class index (`3`, WebDataset's convention: classes are then named `0` to
`K-1`) or a class name (classes sorted by name, as class sub-folders are). Either every sample has
one or none has.
"""

from __future__ import annotations

import io
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

from lqae.errors import DataError
from lqae.images.files import IMAGE_EXTENSIONS, ArchiveMember, ImageFolder, is_readable_image, warn_skipped
from lqae.io import temp_beside

SHARD_SUFFIX = ".tar"
MAX_CLASS_INDEX = 1_000_000  # a .cls index names classes 0..index: a typo must not make millions
_BRACES = re.compile(r"\{(\d+)\.\.(\d+)\}")
_IMAGE_EXTS = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)


@dataclass(frozen=True)
class ShardMember(ArchiveMember):
    """One image inside a tar shard; `lqae.images.files.open_rgb` and friends open it like a file."""

    shard: str  # path of the .tar
    name: str  # member name inside it
    offset: int  # where its bytes start in the .tar
    size: int

    def __str__(self) -> str:  # how paths are shown and stored in token datasets
        return f"{self.shard}/{self.name}"

    @property
    def where(self) -> str:
        return f"{Path(self.shard).name}/{self.name}"

    @property
    def archive(self) -> str:
        return self.shard

    @property
    def suffix(self) -> str:
        return Path(self.name).suffix

    def open_bytes(self) -> io.BytesIO:
        with open(self.shard, "rb") as handle:
            handle.seek(self.offset)
            data = handle.read(self.size)
        if len(data) != self.size:
            raise OSError(f"{self.shard} ends before member {self.name}")
        return io.BytesIO(data)


def is_shard_source(path: str | Path) -> bool:
    """True for a .tar file, a brace pattern of them, or a folder holding .tar files and no images."""
    path = Path(path)
    if _BRACES.search(path.name):
        return True
    if path.is_file():
        return path.name.endswith(SHARD_SUFFIX)
    if path.is_dir():
        shards = False
        for entry in path.iterdir():
            if entry.is_dir() or _is_image(entry):
                return False  # an image folder (its .tar files, if any, are not images)
            shards = shards or _is_shard_file(entry)
        return shards
    return False


def shard_files(source: str | Path) -> list[Path]:
    """The shards a source names, in order; DataError for a missing one."""
    source = Path(source)
    match = _BRACES.search(source.name)
    if match:
        low, high = match.group(1), match.group(2)
        width = len(low) if len(low) == len(high) or low.startswith("0") else 0
        names = [_BRACES.sub(str(i).zfill(width), source.name, count=1) for i in range(int(low), int(high) + 1)]
        files = [source.parent / name for name in names]
    elif source.is_dir():
        files = sorted(p for p in source.iterdir() if _is_shard_file(p))
    else:
        files = [source]
    missing = [f for f in files if not f.is_file()]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise DataError(f"tar shard {missing[0]} does not exist{more} (from {source})")
    return files


def scan_shards(source: str | Path, check: bool = True) -> ImageFolder:
    """Every image sample of the shards, with labels from `.cls` members. With `check`, each image's
    header is opened so corrupt ones are skipped with a warning, as in a folder."""
    members, labels_text, skipped = [], [], []
    for shard in shard_files(source):
        for member, label in _samples(shard):
            if check and not is_readable_image(member):
                skipped.append(member)
                continue
            members.append(member)
            labels_text.append(label)
    warn_skipped(skipped, source)
    if not members:
        raise DataError(
            f"no readable images in the tar shards {source} (looked for KEY.{', KEY.'.join(_IMAGE_EXTS)}"
            + (f"; {len(skipped)} unreadable" if skipped else "") + ")"
        )
    labels, classes = _labels(labels_text, source)
    return ImageFolder(Path(source), members, labels, classes, skipped)


def _samples(shard: Path) -> list[tuple[ShardMember, str | None]]:
    """(image member, its .cls text or None) per sample key, in stored order. A key that names two
    images or two labels, and a shard that does not end where its last member ends (cut short), are
    DataErrors: a sample is never read half right."""
    images: dict[str, ShardMember] = {}
    labels: dict[str, str] = {}
    try:
        with tarfile.open(shard, "r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                key, _, ext = _split_key(info.name)
                ext = ext.lower()
                if ext in _IMAGE_EXTS or ext == "cls":
                    found = images if ext in _IMAGE_EXTS else labels
                    if key in found:
                        raise DataError(
                            f"tar shard {shard} holds sample {ascii(key)} twice ({ascii(info.name)} again): one image "
                            "and at most one .cls per key; re-write the shard"
                        )
                if ext in _IMAGE_EXTS:
                    images[key] = ShardMember(str(shard), info.name, info.offset_data, info.size)
                elif ext == "cls":
                    labels[key] = tar.extractfile(info).read().decode("utf-8", "replace").strip()
            _check_complete(shard, tar.offset)
    except tarfile.ReadError as exc:
        if _starts_as_tar(shard):
            raise DataError(f"tar shard {shard} is cut short or damaged ({exc}); copy or write it again") from exc
        raise DataError(
            f"cannot read tar shard {shard}: {exc} (shards must be uncompressed .tar files, as WebDataset writes them)"
        ) from exc
    except OSError as exc:
        raise DataError(f"cannot read tar shard {shard}: {exc}") from exc
    return [(member, labels.get(key)) for key, member in images.items()]


def _starts_as_tar(shard: Path) -> bool:
    """Whether the file opens with a valid tar header (a tar archive, whatever happened to its end)."""
    try:
        with open(shard, "rb") as handle:
            tarfile.TarInfo.frombuf(handle.read(tarfile.BLOCKSIZE), tarfile.ENCODING, "surrogateescape")
        return True
    except (tarfile.HeaderError, OSError):
        return False


def _check_complete(shard: Path, end: int) -> None:
    """A tar archive ends with two zero blocks after its last member; `tarfile` takes a header cut
    short for that end and stops, so a truncated shard would lose its last samples in silence."""
    with open(shard, "rb") as handle:
        handle.seek(end)
        marker = handle.read(2 * tarfile.BLOCKSIZE)
    if len(marker) < 2 * tarfile.BLOCKSIZE or marker.strip(b"\0"):
        raise DataError(
            f"tar shard {shard} is cut short or damaged after byte {end:,} (its end-of-archive blocks are missing); "
            "copy or write it again"
        )


def _split_key(name: str) -> tuple[str, str, str]:
    """WebDataset's split: `dir/abc.seg.jpg` -> key `dir/abc`, field `seg.jpg`."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), dot, ext


def _labels(texts: list[str | None], source) -> tuple[list[int], list[str]]:
    given = [t for t in texts if t is not None]
    if not given:
        return [-1] * len(texts), []
    if len(given) != len(texts):
        raise DataError(
            f"{len(texts) - len(given)} of {len(texts)} samples in {source} have no .cls label; label every "
            "sample or none"
        )
    empty = sum(1 for t in given if not t)
    if empty:
        raise DataError(f"{empty} .cls label(s) in {source} are empty; write a class index or name in each")
    if all(re.fullmatch(r"[0-9]+", t) for t in given):
        indices = [int(t) for t in given]
        if max(indices) >= MAX_CLASS_INDEX:
            raise DataError(
                f"a .cls label in {source} is class index {max(indices):,}; indices must be below {MAX_CLASS_INDEX:,} "
                "(classes are named 0 to the largest index): write class names instead"
            )
        return indices, [str(i) for i in range(max(indices) + 1)]
    classes = sorted(set(given))
    index = {name: i for i, name in enumerate(classes)}
    return [index[t] for t in given], classes


def _is_shard_file(path: Path) -> bool:
    return path.name.endswith(SHARD_SUFFIX) and path.is_file()


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def write_shards(folder: ImageFolder, out_dir: str | Path, per_shard: int = 1000, prefix: str = "shard") -> list[Path]:
    """Write an image folder as tar shards (`PREFIX-000000.tar`, ...), in folder order: `KEY.EXT`
    (the file's own bytes) and, for class folders, `KEY.cls` (the class index). The inverse of
    `scan_shards` for files: the same images, in the same order, with the same labels."""
    out_dir = Path(out_dir)
    written = []
    for number, start in enumerate(range(0, len(folder), per_shard)):
        path = out_dir / f"{prefix}-{number:06d}{SHARD_SUFFIX}"
        handle, tmp = temp_beside(path)
        with handle, tarfile.open(fileobj=handle, mode="w") as tar:
            for i in range(start, min(start + per_shard, len(folder))):
                source = Path(folder.paths[i])
                key = f"{i:09d}"
                tar.add(source, arcname=key + source.suffix.lower())
                if folder.classes:
                    label = str(folder.labels[i]).encode()
                    info = tarfile.TarInfo(key + ".cls")
                    info.size = len(label)
                    tar.addfile(info, io.BytesIO(label))
        tmp.replace(path)
        written.append(path)
    return written
