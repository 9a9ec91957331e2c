"""Checkpoints are folders: config.json + model.safetensors (+ train_state.safetensors). No pickle.

A save first writes every file into RUN_DIR/.saving/, marks it complete (the marker records each
file's size and SHA-256), then moves the files into place. A kill at any moment leaves either the
previous checkpoint or a complete journal, which the next lock holder rolls forward to the end
from wherever the moves stopped (a file already moved is recognised by its recorded hash). A
journal whose files do not check out is discarded while nothing has moved (the previous checkpoint
is whole), and kept aside once something has (its files are the only copies). Never a mix of two steps.

Weights are verified on load against the fingerprint recorded at save (a flipped byte is refused,
not loaded), and non-finite weights are neither saved nor loaded.

One process trains a run folder at a time (`lqae.run_lock.RunLock`).
Readers never delete or roll a journal while a trainer holds the lock: they read the last
checkpoint in place, retrying while the trainer is mid-move.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from lqae import legacy
from lqae.config import ModelConfig, TrainConfig, from_dict, to_dict
from lqae.errors import CheckpointError, ConfigError
from lqae.io import fsync_dir, give_default_mode, writing
from lqae.model.autoencoder import LQAE
from lqae.model.lm import FrozenLM
from lqae.run_folder import CONFIG_FILE, JOURNAL_DIR, MODEL_FILE, TRAIN_STATE_FILE, resolve_run
from lqae.run_lock import RunLock

log = logging.getLogger(__name__)

_COMPLETE = "COMPLETE"  # the journal's marker: every file written and recorded
CHECKPOINT_FORMAT = "lqae-checkpoint-1"  # config.json's `format`; absent in checkpoints written before it
LEGACY_VERSION = legacy.LAST_VERSION


def save_checkpoint(
    run_dir: Path,
    model,
    train_config: TrainConfig | None = None,
    step: int = 0,
    train_state: dict[str, torch.Tensor] | None = None,
    train_meta: dict[str, Any] | None = None,
) -> str:
    """Write config, trainable weights and (optionally) optimiser/RNG state for `step` atomically;
    returns the weights' fingerprint.

    Non-finite weights are refused (CheckpointError) before anything is written. A failed write
    (a full disk) removes the unfinished journal and keeps the previous checkpoint (OutputError)."""
    run_dir = Path(run_dir)
    weights = {k: v.detach().contiguous().cpu() for k, v in model.trainable_state_dict().items()}
    broken = non_finite_tensors(weights)
    if broken:
        raise CheckpointError(
            f"refusing to save non-finite weights at step {step} ({len(broken)} of {len(weights)} tensors hold "
            f"NaN or inf, e.g. {broken[0]}); {run_dir} keeps its previous checkpoint"
        )
    journal = run_dir / JOURNAL_DIR
    shutil.rmtree(journal, ignore_errors=True)
    try:
        _write_journal(journal, run_dir, model, weights, train_config, step, train_state, train_meta)
    except BaseException:
        shutil.rmtree(journal, ignore_errors=True)  # unfinished: the previous checkpoint stays
        raise
    roll_forward(run_dir)
    return weights_fingerprint(weights)


def _write_journal(journal: Path, run_dir: Path, model, weights, train_config, step, train_state, train_meta) -> None:
    """Every file of the checkpoint into the journal, fsynced, then the COMPLETE marker that records
    them. A failed write (a full disk) is an OutputError naming the checkpoint file it was writing."""
    kept = "its previous checkpoint is kept"
    with writing(run_dir / JOURNAL_DIR, kept):
        journal.mkdir(parents=True)
    config = {"model": to_dict(model.config), "step": step, "format": CHECKPOINT_FORMAT}
    if train_config is not None:
        config["train"] = to_dict(train_config)
    with writing(run_dir / CONFIG_FILE, kept):
        (journal / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    with writing(run_dir / MODEL_FILE, kept):
        save_file(weights, journal / MODEL_FILE, metadata={"step": str(step), "fingerprint": weights_fingerprint(weights)})
    if train_state is not None:
        meta = {"step": str(step), "meta": json.dumps(train_meta or {}, sort_keys=True)}
        tensors = {k: v.detach().contiguous().cpu() for k, v in train_state.items()}
        with writing(run_dir / TRAIN_STATE_FILE, kept):
            save_file(tensors, journal / TRAIN_STATE_FILE, metadata=meta)
    files = {}
    for name in sorted(os.listdir(journal)):
        with writing(run_dir / name, kept), open(journal / name, "rb") as handle:
            give_default_mode(handle.fileno())  # safetensors writes 0600 whatever the umask
            os.fsync(handle.fileno())
        files[name] = _file_identity(journal / name)
    with writing(run_dir / JOURNAL_DIR / _COMPLETE, kept), open(journal / _COMPLETE, "w") as marker:
        marker.write(json.dumps({"step": step, "files": files}, sort_keys=True))
        marker.flush()
        os.fsync(marker.fileno())
        fsync_dir(journal)


def non_finite_tensors(weights: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors that hold a NaN or an infinity."""
    return [
        name for name, tensor in sorted(weights.items())
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
    ]


def weights_fingerprint(weights: dict[str, torch.Tensor]) -> str:
    """A short id of trainable weights (names, dtypes, shapes and values): token ids written by one set
    of weights mean nothing to another, even of the same config. Recorded in model.safetensors at save;
    computed the same way for checkpoints written before it was recorded."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        tensor = weights[name].detach().contiguous().cpu()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _file_identity(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return {"size": path.stat().st_size, "sha256": digest.hexdigest()}


_SAVED_FILES = (TRAIN_STATE_FILE, MODEL_FILE, CONFIG_FILE)  # the order of the moves: config.json last


def _pending_moves(run_dir: Path, journal: Path) -> list[str] | None:
    """The files of a complete journal still to move into place, in order; None when the journal
    does not check out. Every file the COMPLETE marker lists must be either in the journal or,
    moved already by an interrupted roll-forward, in place with its recorded size and hash."""
    try:
        files = json.loads((journal / _COMPLETE).read_text())["files"]
        if not files or not set(files) <= set(_SAVED_FILES):
            return None
        pending = []
        for name in _SAVED_FILES:
            if name not in files:
                continue
            if (journal / name).exists():
                if _file_identity(journal / name) != files[name]:
                    return None
                pending.append(name)
            elif not (run_dir / name).is_file() or _file_identity(run_dir / name) != files[name]:
                return None
        return pending
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _moves_started(journal: Path) -> bool:
    """Whether a file the COMPLETE marker lists has left the journal already."""
    try:
        files = json.loads((journal / _COMPLETE).read_text())["files"]
        return any(not (journal / name).exists() for name in files)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def roll_forward(run_dir: Path) -> None:
    """Finish an interrupted save whose files all check out, from wherever its moves stopped;
    discard any other journal. Only the lock holder calls this (the trainer, or a reader that took
    the free lock)."""
    journal = run_dir / JOURNAL_DIR
    if not journal.is_dir():
        return
    if not (journal / _COMPLETE).exists():
        shutil.rmtree(journal, ignore_errors=True)
        return
    pending = _pending_moves(run_dir, journal)
    if pending is None:
        if _moves_started(journal):  # the files still in it are the only copies of that save's: kept
            kept = run_dir / f"{JOURNAL_DIR}.unmatched-{time.strftime('%Y%m%d-%H%M%S')}"
            os.replace(journal, kept)
            log.warning("%s: a checkpoint journal was half moved into place and a moved file no longer matches its "
                        "record; the files it still held are kept in %s", run_dir, kept.name)
            return
        log.warning("%s: discarding a checkpoint journal whose files do not match its record; the previous "
                    "checkpoint stays", run_dir)
        shutil.rmtree(journal, ignore_errors=True)
        return
    for name in pending:
        os.replace(journal / name, run_dir / name)
    fsync_dir(run_dir)
    (journal / _COMPLETE).unlink()  # first, so a kill inside rmtree leaves no marker without its files
    shutil.rmtree(journal, ignore_errors=True)


def recover(run_dir: Path) -> None:
    """Roll a journal left by a dead trainer forward (or discard it), but only when no process holds
    the run folder's lock: a live trainer's journal is its own business."""
    if not (Path(run_dir) / JOURNAL_DIR).is_dir():
        return
    lock = RunLock(run_dir)
    try:
        if not lock.acquire(raise_if_held=False):
            return
    except OSError:  # a read-only run folder: read what is there
        return
    try:
        roll_forward(Path(run_dir))
    finally:
        lock.release()


class SavedConfig(NamedTuple):
    model: ModelConfig
    train: TrainConfig | None  # None: saved without its training config
    step: int
    unresumable: list[str]  # options of an older lqae that changed only the training, at removed values


def read_config(run_dir: Path) -> tuple[ModelConfig, TrainConfig | None, int]:
    """Read config.json of a checkpoint folder (or hub id): (model config, train config or None, step)."""
    saved = read_saved_config(run_dir)
    return saved.model, saved.train, saved.step


def read_saved_config(run_dir: Path) -> SavedConfig:
    """config.json of a checkpoint folder (or hub id), an older lqae's mapped by `lqae.legacy`."""
    run_dir = resolve_run(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"checkpoint folder {run_dir} does not exist; train one with `lqae train`")
    recover(run_dir)
    path = run_dir / CONFIG_FILE
    if not path.is_file() or not (run_dir / MODEL_FILE).is_file():
        raise CheckpointError(
            f"{run_dir} is not an lqae checkpoint: expected {CONFIG_FILE} and {MODEL_FILE} (train one with `lqae train`)"
        )
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ConfigError("not a JSON object")
        written = data.get("format", CHECKPOINT_FORMAT)
        if written != CHECKPOINT_FORMAT:
            raise CheckpointError(
                f"{path} is checkpoint format {written!r}; this lqae reads {CHECKPOINT_FORMAT!r}: upgrade lqae to load it"
            )
        data, unresumable = legacy.upgrade(data)
        model_config = from_dict(ModelConfig, data["model"])
        train_config = from_dict(TrainConfig, data["train"]) if "train" in data else None
        step = data.get("step", 0)
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ConfigError(f"step must be a whole number, got {step!r}")
    except (json.JSONDecodeError, KeyError, TypeError, ConfigError) as exc:
        raise CheckpointError(f"{path} is not a valid lqae config: {exc}") from exc
    return SavedConfig(model_config, train_config, step, unresumable)


def load_model(
    run_dir: Path, device: str | torch.device = "cpu", lm_name: str | None = None, encode_only: bool = False
) -> LQAE:
    """Rebuild an LQAE from a checkpoint folder, or a hub id `org/name[@revision]` that is not a local
    folder; the frozen LM comes from its name (or `lm_name`).

    `encode_only`: the LM's layers are not loaded, only its embedding matrix and tokenizer, read
    from its files without transformers where they allow it (seconds faster; `encode` gives the
    same ids). Decoding or LM features then raise CheckpointError."""
    model_config, weights, fingerprint = _consistent_read(resolve_run(run_dir))
    if lm_name is not None:
        model_config.lm_name = lm_name
    model = None
    saved_ids = weights.get("codebook.code_to_token")  # an llm_vocab filter's choice
    code_ids = saved_ids.tolist() if saved_ids is not None else None
    light = FrozenLM.for_encoding(model_config.lm_name) if encode_only else None
    if light is not None:
        try:
            model = LQAE(model_config, lm=light, for_loading=True, code_ids=code_ids)
        except CheckpointError as exc:  # the light reading disagrees with the checkpoint: let transformers decide
            log.debug("encoding-only load of %s failed (%s); loading the whole LM", model_config.lm_name, exc)
    if model is None:
        model = LQAE(model_config, for_loading=True, code_ids=code_ids)
    model.load_trainable_state_dict(weights)
    model.weights_fingerprint = fingerprint
    return model.to(device).eval()


def _consistent_read(run_dir: Path, attempts: int = 20, pause: float = 0.25):
    """Config, weights and the weights' fingerprint (verified against the recorded one), all of one
    step. A trainer moving a new checkpoint into place can be caught between two files: read again
    until both name the same step."""
    for attempt in range(attempts):
        model_config, _, step = read_config(run_dir)
        weights, metadata = _load_tensors_with_metadata(run_dir / MODEL_FILE)
        weights_step = metadata.get("step")
        weights_step = int(weights_step) if weights_step is not None and str(weights_step).isdigit() else None
        if weights_step is None or weights_step == step:
            return model_config, weights, verified_fingerprint(run_dir / MODEL_FILE, weights, metadata)
        time.sleep(pause)
    raise CheckpointError(
        f"{run_dir}: config.json is at step {step} but model.safetensors at step {weights_step}; "
        "was one of them copied from another run?"
    )


def _load_tensors_with_metadata(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    return _load_tensors(path), weights_metadata(path)


def weights_metadata(path: Path) -> dict[str, str]:
    """The header metadata of a safetensors file (`step`, `fingerprint`), without reading tensors."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return handle.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc


def load_trainable_from(run_dir: Path) -> dict[str, torch.Tensor]:
    """The trainable weights of a checkpoint folder, verified (see `verified_fingerprint`)."""
    path = Path(run_dir) / MODEL_FILE
    weights, metadata = _load_tensors_with_metadata(path)
    verified_fingerprint(path, weights, metadata)
    return weights


def verified_fingerprint(path: Path, weights: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """The fingerprint computed from the weights' values; CheckpointError when it differs from the
    one recorded at save (a corrupt or edited file) or when a tensor holds NaN or inf (a diverged
    run). Checkpoints from before fingerprints were recorded are checked for finiteness only."""
    computed = weights_fingerprint(weights)
    recorded = metadata.get("fingerprint")
    if recorded is not None and recorded != computed:
        raise CheckpointError(
            f"{path} does not match the fingerprint recorded when it was saved ({recorded}; its values give "
            f"{computed}): the file is corrupt or was edited; restore it from a copy or retrain"
        )
    broken = non_finite_tensors(weights)
    if broken:
        raise CheckpointError(
            f"{path} holds non-finite weights ({len(broken)} of {len(weights)} tensors with NaN or inf, e.g. "
            f"{broken[0]}): the run diverged before this save; use an earlier checkpoint or retrain with a lower lr"
        )
    return computed


def load_train_state(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], int]:
    """Optimiser/RNG tensors, their JSON metadata and the step they belong to."""
    path = Path(run_dir) / TRAIN_STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} not found: this checkpoint cannot be resumed (no training state saved)")
    tensors = _load_tensors(path)
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
