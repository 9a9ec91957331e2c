"""The resumable results file of a few-shot run (JSON lines), and the fingerprint that ties it to one run."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from lqae.errors import ConfigError
from lqae.io import writing

try:
    import fcntl
except ImportError:  # no flock (Windows): no protection against a second writer
    fcntl = None


class ResultsFile:
    """JSON lines, one per finished episode or query, each tagged with the run's fingerprint.

    A rerun with the same settings skips what is there. The whole file is checked before anything
    in it is touched: a file that is not this run's results (another run's, or any other file) is
    refused as it is. Only then is a half-written last line (a kill mid-write) cut off, and only
    while this run holds the file's lock: a second writer of the same file is refused, never cut.
    """

    def __init__(self, path: str | Path, run: str, key: str | tuple[str, ...]) -> None:
        """run: the fingerprint; key: the field (or fields) that name a record ("episode", or
        ("query", "content") so that a changed image at the same path is answered again)."""
        self.path, self.run, self.key = Path(path), run, key
        self._handle = None

    def load(self) -> dict:
        """The records already written, by their key."""
        if not self.path.exists() and not self.path.is_symlink():
            return {}
        if not self.path.is_file():
            raise ConfigError(f"--out {self.path} is not a regular file; name a results file (JSON lines)")
        self._lock()
        raw = self.path.read_bytes()
        complete = raw[: raw.rfind(b"\n") + 1]
        done = self._records(complete)
        tail = raw[len(complete):]
        if not tail:
            return done
        if self._is_json(tail):  # a whole line without its line break: not what this writer leaves
            done.update(self._records(tail))  # refused unless it is this run's record
            with writing(self.path, "the records before are kept"):
                self._handle.write(b"\n")
                self._handle.flush()
            return done
        if not done or not tail.startswith(b'{"'):  # only a file of this run's results may lose a cut line
            raise ConfigError(
                f"{self.path} ends in an unfinished line and holds no complete results of this run; "
                "remove it or use another --out"
            )
        with writing(self.path, "the records before are kept"):
            self._handle.truncate(len(complete))  # a line this run's writer was killed in the middle of
        return done

    @staticmethod
    def _is_json(data: bytes) -> bool:
        try:
            json.loads(data)
            return True
        except ValueError:
            return False

    def _records(self, complete: bytes) -> dict:
        done = {}
        try:
            lines = complete.decode("utf-8").splitlines()
        except UnicodeDecodeError:
            raise ConfigError(f"{self.path} is not a results file (not UTF-8 text); use another --out") from None
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise ConfigError(f"{self.path} line {number} is not JSON ({exc}); remove it or use another --out") from exc
            if not isinstance(record, dict) or record.get("run") != self.run:
                other = record.get("run") if isinstance(record, dict) else None
                raise ConfigError(
                    f"{self.path} holds results of another run (other settings, model weights or data: run "
                    f"{other}, this run {self.run}); use another --out, or delete the file to start over"
                )
            done[self.record_key(record)] = record
        return done

    def record_key(self, record: dict):
        return tuple(record.get(k) for k in self.key) if isinstance(self.key, tuple) else record[self.key]

    def append(self, record: dict) -> None:
        if self._handle is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._lock()

        with writing(self.path, "the records before are kept (a rerun resumes after them)"):
            self._handle.write((json.dumps(record, sort_keys=True, allow_nan=False) + "\n").encode("utf-8"))
            self._handle.flush()
            os.fsync(self._handle.fileno())

    def _lock(self) -> None:
        """Open the file for appending and hold an exclusive lock on it until `close`."""
        if self._handle is not None:
            return
        handle = open(self.path, "a+b")
        try:
            if fcntl is not None:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise ConfigError(
                f"{self.path} is being written by another lqae fewshot run; wait for it, or use another --out"
            ) from None
        self._handle = handle

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()  # drops the lock
            self._handle = None

    def __enter__(self) -> "ResultsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def fingerprint(**parts) -> str:
    """A short id of everything that decides a run's results (not the episode count: a longer rerun resumes)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]
