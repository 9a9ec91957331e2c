"""One process trains a run folder at a time: `RunLock`, an flock on RUN_DIR/.lock naming its pid.
Released on exit, and by the OS if the process dies."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from lqae.errors import CheckpointError
from lqae.run_folder import LOCK_FILE

try:
    import fcntl
except ImportError:  # no flock (Windows): no protection
    fcntl = None


class RunLock:
    """Exclusive lock on a run folder for the process that trains it; a second trainer gets a
    CheckpointError naming the holder's pid. Released on exit, and by the OS if the process dies."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self.handle = None

    def acquire(self, raise_if_held: bool = True) -> bool:
        """Take the lock; True when taken (or when the OS has no flock). When another process holds
        it: CheckpointError naming its pid, or False with `raise_if_held=False`."""
        if fcntl is None:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = _open_lock_file(self.path)
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            if raise_if_held:
                raise CheckpointError(
                    f"{self.path.parent} is being trained by process {holder}; wait for it to finish, stop it, "
                    "or choose another --out"
                ) from None
            return False
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self.handle = handle
        return True

    def release(self) -> None:
        if self.handle is not None:
            self.handle.close()  # closing drops the flock
            self.handle = None

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _open_lock_file(path: Path):
    """RUN_DIR/.lock opened for reading and writing, never through a symbolic link (the pid written
    into it would overwrite whatever the link points at) and only when it is a regular file."""
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags | getattr(os, "O_NONBLOCK", 0), 0o666)
    except OSError:
        if path.is_symlink():
            raise CheckpointError(
                f"{path} is a symbolic link; lqae writes its pid into that file and will not write through a "
                "link: remove it"
            ) from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CheckpointError(f"{path} is not a regular file; remove it (lqae keeps its lock there)")
    return os.fdopen(fd, "r+")
