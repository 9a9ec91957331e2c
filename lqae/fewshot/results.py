"""The resumable results file of a few-shot run (JSON lines), and the fingerprint that ties it to one run."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from lqae.errors import ConfigError


class ResultsFile:
    """JSON lines, one per finished episode or query, each tagged with the run's fingerprint.

    A rerun with the same settings skips what is there; a half-written last line (a kill mid-write)
    is cut off; lines from other settings are an error rather than a silent mix.
    """

    def __init__(self, path: str | Path, run: str, key: str) -> None:
        """run: the fingerprint; key: the field that names a record ("episode" or "query")."""
        self.path, self.run, self.key = Path(path), run, key

    def load(self) -> dict:
        """The records already written, by their key."""
        if not self.path.exists():
            return {}
        raw = self.path.read_bytes()
        complete = raw[: raw.rfind(b"\n") + 1]
        if len(complete) != len(raw):
            with open(self.path, "r+b") as handle:
                handle.truncate(len(complete))
        done = {}
        for number, line in enumerate(complete.decode("utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise ConfigError(f"{self.path} line {number} is not JSON ({exc}); remove it or use another --out") from exc
            if record.get("run") != self.run:
                raise ConfigError(
                    f"{self.path} holds results of another run (other settings, model weights or data: run "
                    f"{record.get('run')}, this run {self.run}); use another --out, or delete the file to start over"
                )
            done[record[self.key]] = record
        return done

    def append(self, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())


def fingerprint(**parts) -> str:
    """A short id of everything that decides a run's results (not the episode count: a longer rerun resumes)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]
