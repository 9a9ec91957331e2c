"""Image files and folders: which files are images (folders flat or one sub-folder per class),
whether one is readable, opening any of them (any size, RGB or greyscale, EXIF-rotated) as RGB, and
the evaluation transform into tensors."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import unicodedata
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from lqae.errors import DataError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def real_location(path) -> str:
    """Where an image really is (symbolic links resolved), a file or an archive's member alike: two
    paths to the same image give the same string."""
    if isinstance(path, ArchiveMember):
        return f"{os.path.realpath(path.archive)}/{path.name}"
    return os.path.realpath(path)


class ArchiveMember:
    """An image inside an archive (a tar shard's member), opened as a file is: wherever a path is
    accepted, an ArchiveMember is too."""

    name: str  # its name inside the archive
    size: int  # bytes

    @property
    def archive(self) -> str:
        """The archive file's path."""
        raise NotImplementedError

    @property
    def where(self) -> str:
        """The archive's file name and the member's name, as a stable identity for digests."""
        raise NotImplementedError

    def open_bytes(self) -> io.BytesIO:
        raise NotImplementedError


@dataclass
class ImageFolder:
    """Image paths with integer labels; `classes` is empty for a flat folder."""

    root: Path
    paths: list[Path]
    labels: list[int]
    classes: list[str]
    skipped: list[Path] = field(default_factory=list)  # unreadable files left out

    def __post_init__(self) -> None:
        check_class_names(self.classes, self.root)

    def __len__(self) -> int:
        return len(self.paths)


def check_class_names(classes: Sequence[str], where) -> None:
    """The one rule for class names, wherever they are read (class folders, `.cls` labels, token
    datasets, saved probes): they become labels in `PATH<TAB>LABEL` lines and in prompts, so each
    is a non-empty string with no line break, tab or other control character, and names one class."""
    for name in classes:
        if not isinstance(name, str) or not name.strip():
            raise DataError(f"{where} has a class with no name ({name!r}); every class needs one")
        if any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in name):
            raise DataError(
                f"class {ascii(name)} in {where} holds a line break, tab or other control character, which would "
                "forge output and prompt lines; rename it"
            )
    if len(set(classes)) != len(classes):
        raise DataError(f"{where} names a class twice; class names must be distinct")


def scan_image_folder(root: str | Path, check: bool = True) -> ImageFolder:
    """List images under `root` (recursively). Class = first-level sub-folder, if any.

    With `check`, each file's header is opened so corrupt files are skipped (with a warning) up front.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"image folder {root} does not exist")
    if not root.is_dir():
        raise DataError(f"{root} is not a folder")
    files = _image_files(root)
    class_dirs = sorted({p.relative_to(root).parts[0] for p in files if len(p.relative_to(root).parts) > 1})
    flat = [p for p in files if len(p.relative_to(root).parts) == 1]
    classes = class_dirs if class_dirs and not flat else []
    class_index = {name: i for i, name in enumerate(classes)}
    paths, labels, skipped = [], [], []
    for path in files:
        if check and not is_readable_image(path):
            skipped.append(path)
            continue
        paths.append(path)
        labels.append(class_index[path.relative_to(root).parts[0]] if classes else -1)
    warn_skipped(skipped, root)
    if not paths:
        raise DataError(
            f"no readable images in {root} (looked for {', '.join(IMAGE_EXTENSIONS)}"
            + (f"; {len(skipped)} unreadable" if skipped else "") + ")"
        )
    return ImageFolder(root, paths, labels, classes, skipped)


def warn_skipped(skipped: Sequence, where) -> None:
    """One warning naming (up to five of) the unreadable images left out of `where`."""
    if skipped:
        log.warning("skipped %d unreadable image(s) in %s: %s", len(skipped), where, name_some(skipped))


def name_some(paths: Sequence[Path], shown: int = 5) -> str:
    """`a.png, b.png and 3 more`: the first few of a list of files, for a warning."""
    named = ", ".join(str(p) for p in paths[:shown])
    return named + (f" and {len(paths) - shown} more" if len(paths) > shown else "")


def _image_files(root: Path) -> list[Path]:
    """Image files under `root`, sorted, following symlinked folders (each real folder once, so a
    link back up the tree cannot loop)."""
    seen: set[str] = set()
    files: list[Path] = []
    for folder, subfolders, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            subfolders[:] = []
            continue
        seen.add(real)
        subfolders.sort()
        for name in names:
            path = Path(folder) / name
            if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
                files.append(path)
    return sorted(files)


# What opening a bad file can raise: corrupt data, truncation, and PIL's decompression-bomb guard.
_UNREADABLE = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)
_WARNED_LARGE: set[str] = set()  # images already named in a "large image" warning (once per process)


def image_problem(path: Path) -> str | None:
    """Why `path` cannot be an image, from its header (None when it looks readable). A truncated
    file passes: only decoding finds that (see `image_batches`)."""
    if not isinstance(path, ArchiveMember):  # a file
        path = Path(path)
        if not path.is_file():
            return "not a regular file (a pipe or a device?)" if path.exists() else "it does not exist"
    _, source = _image_source(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # open_rgb names it once
            with Image.open(source) as image:
                image.verify()
        return None
    except Image.DecompressionBombError as exc:
        return _too_large(exc)
    except _UNREADABLE:
        return "corrupt or not an image file"


def is_readable_image(path: Path) -> bool:
    return image_problem(path) is None


def _too_large(exc: Exception) -> str:
    return f"too large to decode safely ({exc}); PIL refuses it as a possible decompression bomb"


def _image_source(path) -> tuple:
    """(path, what PIL opens): a file, or the bytes of an archive's member (a tar shard's,
    `lqae.images.shards.ShardMember`). DataError for a path that is missing or not a regular file (a
    pipe is never opened)."""
    if isinstance(path, ArchiveMember):
        return path, path.open_bytes()
    path = Path(path)
    if not path.is_file():
        if path.exists():
            raise DataError(f"{path} is not a regular file (a pipe or a device?): give an image file")
        raise DataError(f"image {path} does not exist")
    return path, path


def open_rgb(path: str | Path, draft: Callable[[tuple[int, int]], tuple[int, int] | None] | None = None) -> Image.Image:
    """Open any image as RGB, upright as its EXIF orientation says (phone photos); a missing or
    corrupt file raises DataError.

    16-bit greyscale is scaled to 8 bits (not clipped); transparency is composited on white.
    `draft(upright stored size)`, when given, may ask for a smaller decode: a JPEG is then decoded
    at the largest DCT reduction (1/2, 1/4, 1/8) that stays at least that size (PIL's `Image.draft`)."""
    path, source = _image_source(path)
    try:
        with _large_image_note(path), Image.open(source) as image:
            if draft is not None:
                turned = image.getexif().get(0x0112, 1) in (5, 6, 7, 8)  # EXIF: a quarter turn
                wanted = draft(image.size[::-1] if turned else image.size)
                if wanted is not None and image.format == "JPEG":
                    image.draft(image.mode, wanted[::-1] if turned else wanted)
            image.load()
            return _to_rgb(_upright(image))
    except Image.DecompressionBombError as exc:
        raise DataError(f"cannot read image {path}: {_too_large(exc)}") from exc
    except _UNREADABLE as exc:
        raise DataError(f"cannot read image {path}: {exc}") from exc


@contextlib.contextmanager
def _large_image_note(path: Path):
    """PIL warns through `warnings` about images past its pixel guard (raw `file:line:` lines on
    stderr); name the image once in a logged warning instead."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", Image.DecompressionBombWarning)
        yield
    for warning in caught:
        if issubclass(warning.category, Image.DecompressionBombWarning):
            if str(path) not in _WARNED_LARGE:
                _WARNED_LARGE.add(str(path))
                log.warning("%s is a very large image (%s); decoding it takes much memory", path, warning.message)
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)


def _upright(image: Image.Image) -> Image.Image:
    """The image as it is meant to be seen: rotated/flipped by its EXIF orientation tag (2-8)."""
    if image.getexif().get(0x0112, 1) in range(2, 9):  # 0x0112: Orientation
        return ImageOps.exif_transpose(image)
    return image


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
        return Image.fromarray(np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> (3, H, W) float in [0, 1] (no mean/std normalisation, as in the reference)."""
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255)


def to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) in [0, 1] -> PIL RGB."""
    array = image.detach().clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Evaluation transform: shorter side to `size` (bicubic), then a centred square crop."""
    width, height = image.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    image = image.resize((new_w, new_h), Image.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return image.crop((left, top, left + size, top + size))


def load_image(path: str | Path, size: int) -> torch.Tensor:
    """Evaluation-time load: (3, size, size) in [0, 1]."""
    return to_tensor(resize_center_crop(open_rgb(path), size))
