"""Checkpoints are folders: config.json + model.safetensors (+ train_state.safetensors). No pickle.

A save first writes every file into RUN_DIR/.saving/, marks it complete, then moves the files into
place. A kill at any moment leaves either the previous checkpoint or a complete journal that the
next load rolls forward, never a mix of two steps.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lqae.config import ModelConfig, TrainConfig, from_dict, to_dict
from lqae.errors import CheckpointError, ConfigError
from lqae.io import fsync_dir

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TRAIN_STATE_FILE = "train_state.safetensors"
_JOURNAL = ".saving"
_COMPLETE = "COMPLETE"


def save_checkpoint(
    run_dir: Path,
    model,
    train_config: TrainConfig | None = None,
    step: int = 0,
    train_state: dict[str, torch.Tensor] | None = None,
    train_meta: dict[str, Any] | None = None,
) -> None:
    """Write config, trainable weights and (optionally) optimiser/RNG state for `step` atomically."""
    run_dir = Path(run_dir)
    journal = run_dir / _JOURNAL
    shutil.rmtree(journal, ignore_errors=True)
    journal.mkdir(parents=True)
    config = {"model": to_dict(model.config), "step": step, "format": "lqae-checkpoint-1"}
    if train_config is not None:
        config["train"] = to_dict(train_config)
    (journal / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    weights = {k: v.detach().contiguous().cpu() for k, v in model.trainable_state_dict().items()}
    save_file(weights, journal / WEIGHTS_FILE, metadata={"step": str(step)})
    if train_state is not None:
        meta = {"step": str(step), "meta": json.dumps(train_meta or {}, sort_keys=True)}
        tensors = {k: v.detach().contiguous().cpu() for k, v in train_state.items()}
        save_file(tensors, journal / TRAIN_STATE_FILE, metadata=meta)
    for name in os.listdir(journal):
        with open(journal / name, "rb") as handle:
            os.fsync(handle.fileno())
    (journal / _COMPLETE).write_text(str(step))
    fsync_dir(journal)
    _roll_forward(run_dir)


def _roll_forward(run_dir: Path) -> None:
    """Finish an interrupted save, or discard a save that never completed."""
    journal = run_dir / _JOURNAL
    if not journal.is_dir():
        return
    if not (journal / _COMPLETE).exists():
        shutil.rmtree(journal, ignore_errors=True)
        return
    for name in (TRAIN_STATE_FILE, WEIGHTS_FILE, CONFIG_FILE):
        if (journal / name).exists():
            os.replace(journal / name, run_dir / name)
    fsync_dir(run_dir)
    shutil.rmtree(journal, ignore_errors=True)


def read_config(run_dir: Path) -> tuple[ModelConfig, TrainConfig | None, int]:
    """Read config.json of a checkpoint folder: (model config, train config or None, step)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"checkpoint folder {run_dir} does not exist; train one with `lqae train`")
    _roll_forward(run_dir)
    path = run_dir / CONFIG_FILE
    if not path.is_file() or not (run_dir / WEIGHTS_FILE).is_file():
        raise CheckpointError(
            f"{run_dir} is not an lqae checkpoint: expected {CONFIG_FILE} and {WEIGHTS_FILE} (train one with `lqae train`)"
        )
    try:
        data = json.loads(path.read_text())
        model_config = from_dict(ModelConfig, data["model"])
        train_config = from_dict(TrainConfig, data["train"]) if "train" in data else None
    except (json.JSONDecodeError, KeyError, TypeError, ConfigError) as exc:
        raise CheckpointError(f"{path} is not a valid lqae config: {exc}") from exc
    return model_config, train_config, int(data.get("step", 0))


def load_model(run_dir: Path, device: str | torch.device = "cpu", lm_name: str | None = None):
    """Rebuild an LQAE from a checkpoint folder; the frozen LM comes from its name (or `lm_name`)."""
    from lqae.model import LQAE

    model_config, _, _ = read_config(run_dir)
    if lm_name is not None:
        model_config.lm_name = lm_name
    model = LQAE(model_config, mlm_head=False)  # inference: no MLM loss, so no head to load
    model.load_trainable_state_dict(load_trainable_from(run_dir))
    return model.to(device).eval()


def load_trainable_from(run_dir: Path) -> dict[str, torch.Tensor]:
    """The trainable weights of a checkpoint folder."""
    return _load_tensors(Path(run_dir) / WEIGHTS_FILE)


def load_train_state(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], int]:
    """Optimiser/RNG tensors, their JSON metadata and the step they belong to."""
    path = Path(run_dir) / TRAIN_STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} not found: this checkpoint cannot be resumed (no training state saved)")
    tensors = _load_tensors(path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    return tensors, json.loads(metadata.get("meta", "{}")), int(metadata.get("step", 0))


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc


def optimizer_state_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Flatten an optimiser state dict into tensors + JSON (no pickle)."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, param_state in state["state"].items():
        for key, value in param_state.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    for index, values in meta.get("scalars", {}).items():
        state.setdefault(int(index), {}).update(values)
    try:
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"saved optimiser state does not fit this model: {exc}") from exc
