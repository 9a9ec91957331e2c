"""Crash-safe file writes: a kill mid-write leaves the old file or the new one, never half of one.

New files get the permissions any file would (0666 less the umask), and temp files that a killed
writer left beside a path are removed on the next write to that path.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from pathlib import Path
from typing import BinaryIO, Callable

from lqae.errors import OutputError

_ORPHAN_AGE = 3600.0  # seconds after which a temp file that names no writer counts as abandoned


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def check_replaceable(path: Path, kind: str, is_kind: Callable[[Path], bool]) -> None:
    """The one rule for every file lqae writes where a user points it: an existing `path` is replaced
    only when it is a file of the kind being written (`is_kind`), so a checkpoint's weights, a
    token dataset or any other file is never lost to a mistyped option. OutputError otherwise."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    if path.is_dir():
        raise OutputError(f"{path} is a folder: name the {kind} file to write")
    if path.is_symlink() or not path.is_file() or not is_kind(path):
        raise OutputError(
            f"{path} exists and is not a {kind}; refusing to overwrite it: choose another name, or delete it first"
        )


def is_png(path: Path) -> bool:
    """Whether the file starts as a PNG does."""
    try:
        with open(path, "rb") as handle:
            return handle.read(len(PNG_SIGNATURE)) == PNG_SIGNATURE
    except OSError:
        return False


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    with writing(path):
        handle, tmp = temp_beside(path)
        try:
            with handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


@contextlib.contextmanager
def writing(target: Path, kept: str = "nothing was changed there"):
    """Report a failed write (disk full, no permission, a folder in the way) as an OutputError that
    names the file the user asked for, not the temp file beside it, and says what was kept."""
    try:
        yield
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise OutputError(f"cannot write {target}: {reason}; {kept}") from exc


def temp_beside(path: Path) -> tuple[BinaryIO, Path]:
    """A new temp file in `path`'s folder, open for writing: `.NAME.PID.RANDOM.tmp`, so a later
    write can tell a dead writer's leftover from a live one's."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    give_default_mode(fd)
    return os.fdopen(fd, "wb"), Path(tmp)


def give_default_mode(fd: int) -> None:
    """The permissions a plainly created file would have (0666 less the umask), for files made by
    writers that create them 0600 (mkstemp, safetensors)."""
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
    except (AttributeError, OSError):  # no fchmod (Windows): keep what the writer gave
        pass


# folder -> names of temp files in it (".*.tmp") when this process first wrote there: a folder is
# listed once per process, not once per write (decoding 10,000 PNGs into one folder stays linear)
_TEMPS_SEEN: dict[str, list[str]] = {}


def remove_stale_temps(path: Path) -> list[Path]:
    """Delete temp files of ours beside `path` whose writer is gone (its pid is not running), or,
    for names without a pid, that nobody touched for an hour. Returns what was removed. Looks at
    what the folder held when this process first wrote to it."""
    path = Path(path)
    folder = os.path.abspath(path.parent)
    if folder not in _TEMPS_SEEN:
        with os.scandir(folder) as entries:
            _TEMPS_SEEN[folder] = [e.name for e in entries if e.name.startswith(".") and e.name.endswith(".tmp")]
    temps = _TEMPS_SEEN[folder]
    prefix = f".{path.name}."
    removed = []
    for name in [n for n in temps if n.startswith(prefix)]:
        candidate = path.parent / name
        middle = name[len(prefix) : -len(".tmp")]
        writer = middle.split(".")[0]
        try:
            if writer.isdigit() and "." in middle:
                if _running(int(writer)):
                    continue
            elif time.time() - candidate.stat().st_mtime < _ORPHAN_AGE:
                continue
            candidate.unlink()
            removed.append(candidate)
        except FileNotFoundError:
            pass  # gone already (its writer finished, or another reader cleaned it)
        except OSError:
            continue
        temps.remove(name)
    return removed


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists, owned by someone else (or cannot tell): leave it
    return True


def current_umask() -> int:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
