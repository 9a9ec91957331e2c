"""The whole probe protocol (`lqae probe`): read and check both splits, extract features once, train
and score the head, then the same head recipe on each baseline; returns a `ProbeReport`."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from lqae.errors import ConfigError
from lqae.images.files import real_location
from lqae.probe.config import ProbeConfig, ProgressCallback
from lqae.probe.features import extract_features, pixel_features, random_encoder
from lqae.probe.head import ProbeHead, ProbeScores, hit_rate, score_head, train_head
from lqae.probe.layers import layer_counts, parse_layers, uses_encoder
from lqae.probe.splits import ProbeSplit, load_split, match_classes, require_images
from lqae.provenance import check_ids_fit, check_same_weights

log = logging.getLogger(__name__)


@dataclass
class ProbeReport:
    """Everything `lqae probe` prints; `as_dict` is its `--json` object."""

    model: str  # checkpoint folder
    layers: list[str]
    classes: list[str]
    inputs: dict[str, str]  # split -> "images" | "tokens"
    train_size: int
    val_size: int
    class_counts: dict[str, dict[str, int]]  # split -> class -> count
    majority_top1: float  # val accuracy of always answering the most frequent train class
    probe: ProbeScores
    baselines: dict[str, ProbeScores] = field(default_factory=dict)
    config: dict = field(default_factory=dict)

    @property
    def feature_seconds_per_1000(self) -> float:
        return self.probe.feature_seconds / max(1, self.train_size + self.val_size) * 1000

    def as_dict(self) -> dict:
        probe = self.probe.as_dict()
        return {
            "model": self.model,
            "layers": self.layers,
            "classes": self.classes,
            "inputs": self.inputs,
            "train_size": self.train_size,
            "val_size": self.val_size,
            "class_counts": self.class_counts,
            "majority_top1": self.majority_top1,
            **probe,
            "feature_seconds_per_1000": self.feature_seconds_per_1000,
            "baselines": {name: scores.as_dict() for name, scores in self.baselines.items()},
            "config": self.config,
        }


def run_probe(
    model,
    train_source: str | Path,
    val_source: str | Path,
    config: ProbeConfig | None = None,
    progress: ProgressCallback | None = None,
    model_dir: str | Path = "",
    allow_foreign_tokens: bool = False,
) -> tuple[ProbeReport, ProbeHead]:
    """Extract features once, train the head on TRAIN, score it on VAL, then the same for each baseline.

    Token datasets must come from the model's own weights (and TRAIN's and VAL's from the same ones)
    unless `allow_foreign_tokens`."""
    config = config or ProbeConfig()
    layers = parse_layers(config.layers, layer_counts(model))
    train = load_split(train_source, "TRAIN")
    val = match_classes(train, load_split(val_source, "VAL"))
    _warn_imbalance(train.class_counts())
    _warn_shared_images(train, val)
    for split, role in ((train, "TRAIN"), (val, "VAL")):
        if split.kind == "tokens":
            _check_token_source(model, split, role, allow_foreign_tokens)
            if uses_encoder(layers):
                raise ConfigError(
                    f"{role} {split.source} is a token dataset: encoder layers need the images; use LM layers "
                    "(--layers lm or lm:I,...) or pass the image folder"
                )
    for name in config.baselines:  # fail before any slow work
        for split, role in ((train, "TRAIN"), (val, "VAL")):
            require_images(split, role, f"the {name} baseline")
    classes = train.classes

    def fit(name: str, extract: Callable[[ProbeSplit, str], torch.Tensor]) -> tuple[ProbeScores, ProbeHead]:
        started = time.perf_counter()
        train_x, val_x = extract(train, f"{name} train"), extract(val, f"{name} val")
        seconds = time.perf_counter() - started
        head = train_head(train_x, train.labels, len(classes), config, model.device, progress, f"{name} head")
        scores = score_head(head, train_x, train.labels, val_x, val.labels, classes, seconds)
        scores.head_seconds = time.perf_counter() - started - seconds
        return scores, head

    batch = config.feature_batch_size
    scores, head = fit(
        "probe", lambda s, stage: extract_features(model, s, layers, batch, progress=progress, stage=stage)
    )
    baselines: dict[str, ProbeScores] = {}
    if "pixels" in config.baselines:
        size = model.config.image_size
        baselines["pixels"] = fit("pixels", lambda s, stage: pixel_features(s, size, progress, stage))[0]
    if "random-encoder" in config.baselines:
        encoder = random_encoder(model, config.seed, train, config.feature_batch_size)
        baselines["random-encoder"] = fit(
            "random-encoder",
            lambda s, stage: extract_features(model, s, layers, batch, encoder=encoder, progress=progress, stage=stage),
        )[0]
    majority = int(torch.bincount(train.labels, minlength=len(classes)).argmax())
    report = ProbeReport(
        model=str(model_dir), layers=layers, classes=classes, inputs={"train": train.kind, "val": val.kind},
        train_size=len(train), val_size=len(val),
        class_counts={"train": train.class_counts(), "val": val.class_counts()},
        majority_top1=hit_rate(val.labels == majority),
        probe=scores, baselines=baselines, config=asdict(config),
    )
    return report, head


def _check_token_source(model, split: ProbeSplit, role: str, allow_foreign: bool) -> None:
    """Token ids only mean something to the LM and the weights that wrote them."""
    fix = "re-encode it with this model or pass the image folder"
    source = f"{role} {split.source}"
    check_ids_fit(split.model_config or {}, split.ids.shape[1], model.config, source, fix)
    check_same_weights(split.weights, model.weights_fingerprint, source, "this model's", fix, allow_foreign)


def _warn_shared_images(train: ProbeSplit, val: ProbeSplit) -> None:
    """A held-out score means little when VAL holds TRAIN's images."""
    seen = {real_location(p) for p in train.paths}
    shared = [p for p in val.paths if real_location(p) in seen]
    if shared:
        log.warning(
            "%d of %d VAL images are also in TRAIN (e.g. %s): the VAL score is not a held-out score",
            len(shared), len(val), shared[0],
        )


def _warn_imbalance(counts: dict[str, int]) -> None:
    values = list(counts.values())
    if max(values) > 3 * min(values):
        log.warning(
            "training classes are imbalanced (%d to %d images per class); compare top-1 with majority_top1",
            min(values), max(values),
        )
