"""Token datasets: a folder of images encoded once into LM token ids, stored as one safetensors file.

Layout: tensors `ids` (N, L) (uint16 when the LM vocabulary fits, else int32) and `labels` (N,)
int32 (-1 = no class); metadata `lqae_token_dataset` (format version), `classes`, `paths`,
`grid` (JSON) and `model_config` (the ModelConfig of the model that wrote it, JSON).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from lqae.errors import DataError

FORMAT = "1"


@dataclass
class TokenDataset:
    ids: torch.Tensor  # (N, L) long, LM vocabulary ids
    labels: torch.Tensor  # (N,) long, -1 when unlabelled
    classes: list[str]  # class names, index = label
    paths: list[str]  # source image path of each row
    model_config: dict  # config of the model that wrote the tokens
    grid: tuple[int, int]  # (rows, columns) of the patch grid; rows * columns = L

    def __len__(self) -> int:
        return self.ids.shape[0]


def is_token_dataset(path: str | Path) -> bool:
    path = Path(path)
    return path.suffix == ".safetensors" and path.is_file()


def write_token_dataset(path: str | Path, dataset: TokenDataset) -> None:
    """Write atomically (temp file + rename)."""
    from safetensors.torch import save

    from lqae.io import atomic_write_bytes

    vocab = int(dataset.model_config.get("lm_vocab_size") or 0)
    dtype = torch.int16 if 0 < vocab <= 32767 else torch.int32
    if 32767 < vocab <= 65535:
        dtype = torch.uint16
    tensors = {"ids": dataset.ids.to(dtype).contiguous(), "labels": dataset.labels.to(torch.int32).contiguous()}
    metadata = {
        "lqae_token_dataset": FORMAT,
        "classes": json.dumps(dataset.classes),
        "paths": json.dumps(dataset.paths),
        "grid": json.dumps(list(dataset.grid)),
        "model_config": json.dumps(dataset.model_config, sort_keys=True),
    }
    atomic_write_bytes(Path(path), save(tensors, metadata=metadata))


def read_token_dataset(path: str | Path) -> TokenDataset:
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise DataError(f"token dataset {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("lqae_token_dataset") != FORMAT:
                raise DataError(f"{path} is not an lqae token dataset (write one with `lqae encode DIR --out FILE`)")
            ids = handle.get_tensor("ids").long()
            labels = handle.get_tensor("labels").long()
    except (SafetensorError, OSError) as exc:
        raise DataError(f"cannot read token dataset {path}: {exc}") from exc
    return TokenDataset(
        ids=ids, labels=labels, classes=json.loads(metadata["classes"]), paths=json.loads(metadata["paths"]),
        model_config=json.loads(metadata["model_config"]), grid=tuple(json.loads(metadata["grid"])),
    )


@torch.no_grad()
def encode_folder(
    model,
    folder,
    batch_size: int = 64,
    progress: Callable[[int], None] | None = None,
) -> TokenDataset:
    """Encode every image of an `ImageFolder` in batches; memory holds one batch of pixels at a time."""
    from lqae.config import to_dict
    from lqae.data import load_image

    device = next(model.encoder.parameters()).device
    size, length = model.config.image_size, model.config.num_tokens
    ids = np.empty((len(folder), length), dtype=np.int64)
    for start in range(0, len(folder), batch_size):
        paths = folder.paths[start : start + batch_size]
        images = torch.stack([load_image(p, size) for p in paths]).to(device)
        ids[start : start + len(paths)] = model.encode(images).cpu().numpy()
        if progress:
            progress(len(paths))
    grid = model.config.grid_size
    return TokenDataset(
        ids=torch.from_numpy(ids), labels=torch.tensor(folder.labels, dtype=torch.long), classes=list(folder.classes),
        paths=[str(p) for p in folder.paths], model_config=to_dict(model.config), grid=(grid, grid),
    )


def load_tokens(source: str | Path, model=None, batch_size: int = 64, progress=None) -> TokenDataset:
    """A token dataset file as is, or an image folder encoded with `model`."""
    from lqae.data import scan_image_folder

    if is_token_dataset(source):
        return read_token_dataset(source)
    if model is None:
        raise DataError(f"{source} is an image folder: a model (--model) is needed to encode it")
    return encode_folder(model, scan_image_folder(source), batch_size, progress)
