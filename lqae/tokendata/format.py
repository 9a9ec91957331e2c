"""The token dataset file: a folder of images encoded once into LM token ids, stored as one safetensors file.

Layout: tensors `ids` (N, L) (int16 when the LM vocabulary fits, uint16 up to 65,535 ids, else int32)
and `labels` (N,) int32 (-1 = no class); metadata `lqae_token_dataset` (format version), `classes`,
`paths`, `grid` (JSON), `model_config` (the ModelConfig of the model that wrote it, JSON) and
`weights` (the fingerprint of the weights that wrote it; absent in files written before it was
recorded).

Sharded (written by `torchrun ... encode DIR --out FILE`): each rank writes its rows as a token
dataset `STEM-00001-of-00004.safetensors` beside FILE, and FILE is the index: no tensors, metadata
`shards` (file names, in row order), `rows` (per shard) and the shared fields above. Readers take
the index for the one dataset the shards make.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from lqae.errors import DataError
from lqae.images.files import check_class_names
from lqae.io import atomic_write_bytes, fsync_dir, temp_beside, writing

FORMAT = "1"


@dataclass
class TokenDataset:
    ids: torch.Tensor  # (N, L) long, LM vocabulary ids
    labels: torch.Tensor  # (N,) long, -1 when unlabelled
    classes: list[str]  # class names, index = label
    paths: list[str]  # source image path of each row
    model_config: dict  # config of the model that wrote the tokens
    grid: tuple[int, int]  # (rows, columns) of the patch grid; global tokens + rows * columns = L
    weights: str | None = None  # fingerprint of the weights that wrote the ids (checkpoint.weights_fingerprint)

    def __len__(self) -> int:
        return self.ids.shape[0]

    @property
    def global_tokens(self) -> int:
        """How many of each row's ids are global tokens (they come first)."""
        return int(self.model_config.get("global_tokens", 0) or 0)


def is_token_dataset(path: str | Path) -> bool:
    path = Path(path)
    return path.suffix == ".safetensors" and path.is_file()


def write_token_dataset(path: str | Path, dataset: TokenDataset) -> None:
    """Write atomically (temp file + rename); refuses to replace a file that is not a token dataset."""
    check_overwritable(path)
    dtype = ids_dtype(dataset.model_config)
    tensors = {"ids": dataset.ids.to(dtype).contiguous(), "labels": dataset.labels.to(torch.int32).contiguous()}
    metadata = dataset_metadata(dataset.classes, dataset.paths, dataset.grid, dataset.model_config, dataset.weights)
    atomic_write_bytes(Path(path), save(tensors, metadata=metadata))


def ids_dtype(model_config: dict) -> torch.dtype:
    """The smallest integer dtype that holds every id of the LM vocabulary."""
    vocab = int(model_config.get("lm_vocab_size") or 0)
    if 0 < vocab <= 32767:
        return torch.int16
    if 32767 < vocab <= 65535:
        return torch.uint16
    return torch.int32


def dataset_metadata(classes: list[str], paths: list[str], grid, model_config: dict, weights: str | None) -> dict[str, str]:
    metadata = {
        "lqae_token_dataset": FORMAT,
        "classes": json.dumps(classes),
        "paths": json.dumps(paths),
        "grid": json.dumps(list(grid)),
        "model_config": json.dumps(model_config, sort_keys=True),
    }
    if weights:
        metadata["weights"] = weights
    return metadata


def read_token_dataset(path: str | Path, _shard_of: Path | None = None) -> TokenDataset:
    """The token dataset at `path`: one file, or the shards an index names, joined in order."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"token dataset {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("lqae_token_dataset") != FORMAT:
                raise DataError(f"{path} is not an lqae token dataset (write one with `lqae encode DIR --out FILE`)")
            if "shards" in metadata:
                if _shard_of is not None:
                    raise DataError(f"{_shard_of} names {path} as a shard, but it is an index itself; re-encode it")
                return _read_index(path, metadata)
            ids = handle.get_tensor("ids").long()
            labels = handle.get_tensor("labels").long()
    except (SafetensorError, OSError) as exc:
        raise DataError(f"cannot read token dataset {path}: {exc}") from exc
    try:
        dataset = TokenDataset(
            ids=ids, labels=labels, classes=json.loads(metadata["classes"]), paths=json.loads(metadata["paths"]),
            model_config=json.loads(metadata["model_config"]), grid=tuple(json.loads(metadata["grid"])),
            weights=metadata.get("weights"),
        )
    except (KeyError, ValueError, TypeError) as exc:
        raise DataError(f"token dataset {path} has corrupt metadata ({type(exc).__name__}: {exc}); re-encode it") from exc
    problem = dataset_problem(dataset)
    if problem:
        raise DataError(f"token dataset {path} is corrupt or was edited ({problem}); re-encode it")
    return dataset


def dataset_problem(dataset: TokenDataset) -> str | None:
    """What makes a token dataset unusable (None when nothing): the one check every reader (decode,
    probe, fewshot) relies on. Rows, labels and paths agree; paths are strings; labels name classes;
    ids are ids of the LM that wrote them; class names follow `check_class_names`."""
    rows = dataset.ids.shape[0]
    if not isinstance(dataset.model_config, dict) or dataset.ids.ndim != 2:
        return "no model config, or ids that are not one row per image"
    if not isinstance(dataset.paths, list) or not all(isinstance(p, str) for p in dataset.paths):
        return "paths are not a list of strings"
    if len(dataset.paths) != rows or dataset.labels.shape != (rows,):
        return "rows, labels and paths disagree"
    if not isinstance(dataset.classes, list):
        return "classes are not a list"
    try:
        check_class_names(dataset.classes, "the dataset")
    except DataError as exc:
        return str(exc)
    if rows and (int(dataset.labels.min()) < -1 or int(dataset.labels.max()) >= len(dataset.classes)):
        return f"a label outside the {len(dataset.classes)} classes"
    vocab = dataset.model_config.get("lm_vocab_size")
    if rows and (int(dataset.ids.min()) < 0 or (isinstance(vocab, int) and int(dataset.ids.max()) >= vocab)):
        return f"an id outside the LM's vocabulary of {vocab} ids"
    return None


def shard_path(path: str | Path, rank: int, world: int) -> Path:
    """Where rank `rank` of `world` writes its rows of the token dataset indexed at `path`."""
    path = Path(path)
    return path.with_name(f"{path.stem}-{rank + 1:05d}-of-{world:05d}{path.suffix}")


def write_token_index(path: str | Path, shards: list[Path], rows: list[int], dataset_fields: dict[str, str]) -> None:
    """Write the index that makes `shards` (token datasets beside `path`, in row order) one dataset;
    it records each shard's SHA-256, so a shard another encode wrote is never read as one of these."""
    metadata = {
        **dataset_fields, "shards": json.dumps([Path(s).name for s in shards]), "rows": json.dumps(rows),
        "shard_sha256": json.dumps([file_sha256(Path(s)) for s in shards]),
    }
    metadata.pop("paths", None)  # each shard holds its own
    atomic_write_bytes(Path(path), save({}, metadata=metadata))


def _read_index(path: Path, metadata: dict) -> TokenDataset:
    try:
        names, rows = json.loads(metadata["shards"]), json.loads(metadata["rows"])
        digests = json.loads(metadata.get("shard_sha256", "null"))  # None in indexes of lqae 0.1.0
        shared = (json.loads(metadata["classes"]), json.loads(metadata["grid"]), json.loads(metadata["model_config"]))
    except (KeyError, ValueError) as exc:
        raise DataError(
            f"token dataset index {path} has corrupt metadata ({type(exc).__name__}: {exc}); re-encode it"
        ) from exc
    problem = _index_problem(names, rows, digests)
    if problem:
        raise DataError(f"token dataset index {path} is corrupt ({problem}); re-encode it")
    parts = []
    for position, (name, count) in enumerate(zip(names, rows)):
        shard = path.parent / name
        if not shard.is_file():
            raise DataError(f"token dataset {path} indexes shard {shard}, which does not exist; re-encode it")
        part = read_token_dataset(shard, _shard_of=path)
        written = (part.classes, list(part.grid), part.model_config)
        if len(part) != count or written != shared or part.weights != metadata.get("weights") or (
            digests is not None and file_sha256(shard) != digests[position]
        ):
            raise DataError(f"shard {shard} does not match its index {path} (another encode wrote it?); re-encode it")
        parts.append(part)
    first = parts[0]
    return TokenDataset(
        ids=torch.cat([p.ids for p in parts]), labels=torch.cat([p.labels for p in parts]), classes=first.classes,
        paths=[q for p in parts for q in p.paths], model_config=first.model_config, grid=first.grid,
        weights=first.weights,
    )


def _index_problem(names, rows, digests) -> str | None:
    """What is wrong with an index's shard list (None when nothing): shards are plain file names
    beside the index, each once, with a row count (and a digest) each."""
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        return "no list of shard names"
    if not isinstance(rows, list) or len(rows) != len(names) or not all(
        isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in rows
    ):
        return "no row count for each shard"
    if digests is not None and (not isinstance(digests, list) or len(digests) != len(names)):
        return "no digest for each shard"
    outside = [n for n in names if n in ("", ".", "..") or "/" in n or "\\" in n or Path(n).is_absolute()]
    if outside:
        return f"shard {outside[0]!r} is not a file beside the index"
    if len(set(names)) != len(names):
        return "a shard is named twice"
    return None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_overwritable(path: str | Path) -> None:
    """Refuse to write a token dataset over anything but an older token dataset: `--out
    RUN/model.safetensors` must not replace a checkpoint's weights."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path} is a folder; a token dataset is one file: name a FILE.safetensors")
    if path.exists() and not _holds_token_dataset(path):
        raise DataError(
            f"{path} exists and is not a token dataset (checkpoint weights, or another file); refusing to "
            "overwrite it: choose another file name, or delete it first"
        )


def _holds_token_dataset(path: Path) -> bool:
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as handle:
            return (handle.metadata() or {}).get("lqae_token_dataset") is not None
    except (SafetensorError, OSError, ValueError):
        return False


# -- streaming: any number of images in bounded memory ---------------------------------------------

_SAFETENSORS_DTYPES = {torch.int16: ("I16", "<i2"), torch.uint16: ("U16", "<u2"), torch.int32: ("I32", "<i4")}


class TokenDatasetWriter:
    """Write the file `write_token_dataset` writes, one batch of rows at a time.

    Labels and paths of every row are announced up front; each row is then written (`write`) or
    left out (`skip_unwritten`, for images that turned out unreadable). Ids stream to a temp file; when
    every row is accounted for, the final file (header, labels, ids of the rows written) replaces
    `path`. Memory holds one batch whatever the number of rows; on any error nothing is left.
    """

    def __init__(
        self, path: str | Path, labels: list[int], length: int, classes: list[str], paths: list[str],
        model_config: dict, grid: tuple[int, int], weights: str | None = None,
    ) -> None:
        self.path = Path(path)
        check_overwritable(self.path)
        self.rows, self.length = len(labels), length
        self.dtype = ids_dtype(model_config)
        self._tag, self._numpy_dtype = _SAFETENSORS_DTYPES[self.dtype]
        self._labels, self._paths, self._classes = list(labels), list(paths), list(classes)
        self._model_config, self._grid, self._weights = model_config, grid, weights
        self._kept: list[int] = []  # announced rows written, in order
        self._skipped: set[int] = set()
        self._handle = None
        self._tmp: Path | None = None

    @property
    def written(self) -> int:
        return len(self._kept)

    @property
    def id_bytes(self) -> int:
        """Size of the ids tensor of the rows written."""
        return self.written * self.length * np.dtype(self._numpy_dtype).itemsize

    def __enter__(self) -> "TokenDatasetWriter":
        with writing(self.path):
            self._handle, self._tmp = temp_beside(self.path)  # the ids, until the header is known
        return self

    def write(self, ids: torch.Tensor | np.ndarray, rows: list[int] | None = None) -> None:
        """Append rows: (b, L) ids of the announced rows `rows` (default: the next b)."""
        array = ids.numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)
        if array.ndim != 2 or array.shape[1] != self.length:
            raise ValueError(f"expected rows of {self.length} ids, got shape {array.shape}")
        start = self._kept[-1] + 1 if self._kept else 0
        rows = list(range(start, start + array.shape[0])) if rows is None else list(rows)
        if len(rows) != array.shape[0] or (rows and (rows[0] < start or rows[-1] >= self.rows)):
            raise ValueError(f"rows {rows[:3]}... do not follow the {self.written} written of {self.rows} announced")
        with writing(self.path):
            self._handle.write(np.ascontiguousarray(array, dtype=self._numpy_dtype).tobytes())
        self._kept += rows

    def skip_unwritten(self) -> None:
        """Leave every announced row not written out of the file (its image could not be read)."""
        self._skipped = set(range(self.rows)) - set(self._kept)

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None and self.written + len(self._skipped) != self.rows:
                raise DataError(f"only {self.written} of {self.rows} rows were written to {self.path}")
            if exc_type is None:
                with writing(self.path):
                    self._finish()
        finally:
            if not self._handle.closed:
                self._handle.close()
            self._tmp.unlink(missing_ok=True)

    def _finish(self) -> None:
        """The whole file beside `path`, then renamed over it: header, labels, then the streamed ids."""
        self._handle.close()
        label_bytes = 4 * self.written
        header = {  # labels (4-byte) before ids (2 or 4 bytes) keeps both aligned, as safetensors does
            "__metadata__": dataset_metadata(
                self._classes, [self._paths[i] for i in self._kept], self._grid, self._model_config, self._weights
            ),
            "labels": {"dtype": "I32", "shape": [self.written], "data_offsets": [0, label_bytes]},
            "ids": {
                "dtype": self._tag, "shape": [self.written, self.length],
                "data_offsets": [label_bytes, label_bytes + self.id_bytes],
            },
        }
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        final, final_tmp = temp_beside(self.path)
        try:
            with final, open(self._tmp, "rb") as ids:
                final.write(struct.pack("<Q", len(encoded)) + encoded)
                final.write(np.asarray([self._labels[i] for i in self._kept], dtype="<i4").tobytes())
                shutil.copyfileobj(ids, final, 1 << 20)
                final.flush()
                os.fsync(final.fileno())
            os.replace(final_tmp, self.path)
        except BaseException:
            final_tmp.unlink(missing_ok=True)
            raise
        fsync_dir(self.path.parent)


def rows_in(path: Path) -> int:
    """Rows of a token dataset file, read from its header."""
    with safe_open(str(path), framework="pt") as handle:
        return int(handle.get_slice("ids").get_shape()[0])


