"""Where images come from, one entry point for every command: a folder (flat or one sub-folder per
class), one WebDataset tar shard, a folder of shards or a shard pattern (`scan_images`); and the
images a user names on a command line, files and sources mixed (`collect_images`)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from lqae.errors import DataError
from lqae.images.files import ImageFolder, image_problem, scan_image_folder
from lqae.images.shards import is_shard_source, scan_shards


def scan_images(source: str | Path, check: bool = True) -> ImageFolder:
    """The images of a folder or of tar shards (`lqae.images.shards`), as one `ImageFolder` whose
    paths are files or shard members (`check`: read each file's header and leave out, with a
    warning, what is not an image)."""
    return scan_shards(source, check) if is_shard_source(source) else scan_image_folder(source, check)


def collect_images(inputs: Sequence[str | Path]) -> list[Path]:
    """Image files named by a user, folders expanded recursively (sorted), in input order.

    A named file that is missing or unreadable raises DataError before any work; unreadable files
    inside a folder are skipped with a warning, as `lqae train` does."""
    if not inputs:
        raise DataError("no images given: pass image files or folders")
    paths: list[Path] = []
    for item in map(Path, inputs):
        if is_shard_source(item) or item.is_dir():  # a folder or tar shards: its images, in order
            paths.extend(scan_images(item).paths)
        elif not item.exists():
            raise DataError(f"image {item} does not exist")
        else:
            problem = image_problem(item)
            if problem:
                raise DataError(f"cannot read image {item}: {problem}")
            paths.append(item)
    return paths


def found_in_folders(inputs: Sequence[str | Path]) -> Callable[[Path], bool]:
    """For `image_batches`' skip_unreadable: True for images `collect_images` found inside the
    folders among `inputs` (skipped when unreadable), False for files named one by one (an error)."""
    named = {Path(item) for item in inputs if not Path(item).is_dir()}
    return lambda path: Path(path) not in named
