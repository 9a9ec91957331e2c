"""A trained probe as a folder (probe.safetensors + probe.json): save, load, and apply it to new
images with the model it was trained on."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from lqae.config import to_dict, write_json
from lqae.images.source import collect_images
from lqae.errors import CheckpointError, ConfigError
from lqae.images.files import check_class_names
from lqae.io import atomic_write_bytes
from lqae.probe.config import ProgressCallback
from lqae.probe.features import extract_features
from lqae.probe.head import ProbeHead, head_logits
from lqae.probe.layers import feature_dim, layer_counts, parse_layers
from lqae.probe.splits import ProbeSplit

if TYPE_CHECKING:
    from lqae.probe.run import ProbeReport

log = logging.getLogger(__name__)

PROBE_FORMAT = "lqae-probe-1"
PROBE_WEIGHTS = "probe.safetensors"
PROBE_CONFIG = "probe.json"
# config fields that decide what the features are; another value makes a saved head meaningless
FEATURE_SHAPE_KEYS = (
    "image_size", "patch_size", "encoder_width", "encoder_depth", "lm_vocab_size", "lm_width", "codebook_size", "vocab",
)


@dataclass
class LoadedProbe:
    head: ProbeHead
    layers: list[str]
    classes: list[str]
    feature_dim: int
    model: str  # checkpoint folder the probe was trained on
    model_config: dict


@dataclass
class ProbePrediction:
    path: str
    label: str  # class name
    score: float  # softmax probability of that class


def save_probe(folder: str | Path, head: ProbeHead, report: ProbeReport, model) -> None:
    """Write FOLDER/probe.safetensors (head weights) and FOLDER/probe.json (what is needed to apply it)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--save {folder} is a file; give a folder")
    tensors = {k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}
    atomic_write_bytes(folder / PROBE_WEIGHTS, save(tensors, metadata={"format": PROBE_FORMAT}))
    meta = {
        "format": PROBE_FORMAT,
        "layers": report.layers,
        "classes": report.classes,
        "feature_dim": report.probe.feature_dim,
        "model": str(Path(report.model).resolve()) if report.model else "",
        "model_config": to_dict(model.config),
        "config": report.config,
        "top1": report.probe.top1,
        "top5": report.probe.top5,
    }
    write_json(folder / PROBE_CONFIG, meta)


def load_probe(folder: str | Path) -> LoadedProbe:
    """Read a folder written by `save_probe`; anything missing or unreadable is a CheckpointError."""
    folder = Path(folder)
    if not (folder / PROBE_CONFIG).is_file() or not (folder / PROBE_WEIGHTS).is_file():
        raise CheckpointError(
            f"{folder} is not a probe folder: expected {PROBE_CONFIG} and {PROBE_WEIGHTS} "
            "(write one with `lqae probe TRAIN --val VAL --save DIR`)"
        )
    try:
        meta = json.loads((folder / PROBE_CONFIG).read_text())
        if meta.get("format") != PROBE_FORMAT:
            raise CheckpointError(f"{folder / PROBE_CONFIG} has format {meta.get('format')!r}, expected {PROBE_FORMAT}")
        state = load_file(str(folder / PROBE_WEIGHTS))
        head = ProbeHead(int(meta["feature_dim"]), len(meta["classes"]))
        head.load_state_dict(state)
    except (json.JSONDecodeError, KeyError, TypeError, RuntimeError, SafetensorError, OSError) as exc:
        raise CheckpointError(f"cannot read probe {folder}: {exc}") from exc
    check_class_names(meta["classes"], folder / PROBE_CONFIG)  # they are printed, one per PATH<TAB>class line
    return LoadedProbe(
        head.eval(), list(meta["layers"]), list(meta["classes"]), int(meta["feature_dim"]),
        meta.get("model", ""), meta.get("model_config", {}),
    )


def apply_probe(
    model, probe: LoadedProbe, images: list[str | Path], batch_size: int = 64, progress: ProgressCallback | None = None
) -> list[ProbePrediction]:
    """Classify images (files, or folders searched recursively) with a saved probe and the model it was trained on."""
    counts = layer_counts(model)
    try:
        layers = [parse_layers(name, counts)[0] for name in probe.layers]
    except ConfigError as exc:
        raise CheckpointError(
            f"the probe's layers do not exist in this model ({exc}); pass --model {probe.model}"
        ) from exc
    if feature_dim(model, layers) != probe.feature_dim:
        raise CheckpointError(
            f"this model gives {feature_dim(model, layers)} features for layers {','.join(layers)}, the probe "
            f"expects {probe.feature_dim}; pass the model it was trained on (--model {probe.model})"
        )
    if probe.model_config and _feature_shape(probe.model_config) != _feature_shape(to_dict(model.config)):
        log.warning(
            "the probe was trained on a model with another config (%s); predictions may be meaningless", probe.model
        )
    paths = collect_images(images)
    split = ProbeSplit(Path("."), "images", paths, torch.zeros(len(paths), dtype=torch.long), probe.classes)
    features = extract_features(model, split, layers, batch_size, progress=progress, stage="features")
    probe.head.to(model.device)
    probabilities = head_logits(probe.head, features).softmax(dim=1)
    best = probabilities.max(dim=1)
    return [
        ProbePrediction(str(path), probe.classes[int(index)], float(score))
        for path, index, score in zip(paths, best.indices, best.values)
    ]


def _feature_shape(config: dict) -> dict:
    return {k: config.get(k) for k in FEATURE_SHAPE_KEYS}
