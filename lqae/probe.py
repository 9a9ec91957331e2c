"""Linear probe (LQAE paper, linear classification): frozen features -> LayerNorm + Linear.

Features of an image: its code ids run through the frozen LM with no masking, every chosen hidden
state mean-pooled over tokens, the chosen layers concatenated (optionally encoder layers too).
Features are computed once per split and cached in memory; only the head trains. The same head is
trained on two baselines so the number means something: raw pixels at the model's resolution, and
the same architecture with a freshly initialised (seeded) encoder feeding the same frozen LM.

Layer selectors (`--layers`): `lm` = every LM hidden state (embedding output = lm:0, then one per
layer), `encoder` = every encoder hidden state (patch embedding + position = enc:0, then one per
block), `all` = both, or a comma-separated list such as `lm:0,lm:-1,enc:2` (negative indices count
from the last state; `lm` and `encoder` may appear in the list as groups).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lqae.data import IMAGE_EXTENSIONS, load_image, scan_image_folder
from lqae.errors import CheckpointError, ConfigError, DataError

log = logging.getLogger(__name__)

PROBE_FORMAT = "lqae-probe-1"
PROBE_WEIGHTS = "probe.safetensors"
PROBE_CONFIG = "probe.json"
BASELINES = ("pixels", "random-encoder")
LAYER_GROUPS = {"lm": ("lm",), "encoder": ("enc",), "enc": ("enc",), "all": ("lm", "enc")}

# progress(stage, advanced, total): stage is e.g. "features train"; the CLI draws the bars.
Progress = Callable[[str, int, int], None]


@dataclass
class ProbeConfig:
    """How features are chosen and how the head trains (the backbone never trains)."""

    layers: str = "lm"  # lm | encoder | all | comma list like "lm:0,lm:-1,enc:2"
    baselines: tuple[str, ...] = BASELINES  # subset of BASELINES, trained with the same head recipe
    epochs: int = 100  # passes over the cached training features
    batch_size: int = 256  # head minibatch
    lr: float = 3e-3  # AdamW peak lr, linear warm-up then cosine to 0
    weight_decay: float = 1e-4  # on the linear weight only
    warmup_fraction: float = 0.05
    feature_batch_size: int = 64  # images per forward pass during feature extraction
    seed: int = 0  # head init, minibatch order and the random-encoder baseline

    def __post_init__(self) -> None:
        unknown = [b for b in self.baselines if b not in BASELINES]
        if unknown:
            raise ConfigError(f"unknown baseline {unknown[0]!r}; choose from: {', '.join(BASELINES)} (or none)")
        if self.epochs < 1 or self.batch_size < 1 or self.feature_batch_size < 1:
            raise ConfigError("epochs and batch sizes must be positive")
        if self.lr <= 0:
            raise ConfigError(f"lr must be positive, got {self.lr}")


# -- layer selection -------------------------------------------------------------------------------
def layer_counts(model) -> dict[str, int]:
    """Hidden states available per source: LM layers + 1 (embedding output), encoder blocks + 1."""
    return {"lm": int(model.lm.config.num_hidden_layers) + 1, "enc": len(model.encoder.transformer.blocks) + 1}


def parse_layers(spec: str, counts: dict[str, int]) -> list[str]:
    """Canonical layer names (`lm:3`, `enc:0`, non-negative, in the given order, no repeats)."""
    names: list[str] = []
    items = [item.strip() for item in spec.split(",") if item.strip()]
    if not items:
        raise ConfigError("--layers is empty; use lm, encoder, all or a list like lm:0,lm:-1,enc:2")
    for item in items:
        key = item.lower()
        if key in LAYER_GROUPS:
            for source in LAYER_GROUPS[key]:
                names.extend(f"{source}:{i}" for i in range(counts[source]))
            continue
        source, _, index = key.partition(":")
        source = "enc" if source == "encoder" else source
        if source not in counts or not index.lstrip("-").isdigit():
            raise ConfigError(
                f"unknown layer selector {item!r}; use lm, encoder, all or a comma list of lm:I / enc:I "
                f"(this model has lm:0..lm:{counts['lm'] - 1} and enc:0..enc:{counts['enc'] - 1})"
            )
        position = int(index)
        if not -counts[source] <= position < counts[source]:
            raise ConfigError(
                f"layer {item!r} is out of range: this model has {source}:0..{source}:{counts[source] - 1}"
            )
        names.append(f"{source}:{position % counts[source]}")
    return list(dict.fromkeys(names))


def uses_encoder(layers: list[str]) -> bool:
    return any(name.startswith("enc:") for name in layers)


def feature_dim(model, layers: list[str]) -> int:
    widths = {"lm": int(model.lm.config.hidden_size), "enc": int(model.config.encoder_width)}
    return sum(widths[name.split(":")[0]] for name in layers)


# -- data ------------------------------------------------------------------------------------------
@dataclass
class ProbeSplit:
    """A labelled split: an image folder or a token dataset (then `ids` holds its code ids)."""

    source: Path
    kind: str  # "images" or "tokens"
    paths: list[Path]
    labels: torch.Tensor  # (N,) long
    classes: list[str]
    ids: torch.Tensor | None = None  # (N, L) LM ids for token datasets
    model_config: dict | None = None  # config of the model that wrote a token dataset
    weights: str | None = None  # fingerprint of the weights that wrote a token dataset

    def __len__(self) -> int:
        return len(self.paths)

    def class_counts(self) -> dict[str, int]:
        counts = torch.bincount(self.labels, minlength=len(self.classes)).tolist()
        return dict(zip(self.classes, counts))


def load_split(source: str | Path, role: str = "TRAIN") -> ProbeSplit:
    """Read an image folder (one sub-folder per class) or a token dataset written by `lqae encode --out`."""
    from lqae.tokendata import is_token_dataset, read_token_dataset

    source = Path(source)
    if is_token_dataset(source):
        data = read_token_dataset(source)
        split = ProbeSplit(
            source, "tokens", [Path(p) for p in data.paths], data.labels.long(), list(data.classes), data.ids,
            data.model_config, data.weights,
        )
    else:
        if source.is_file():
            raise DataError(f"{role} {source} is neither an image folder nor a token dataset (.safetensors)")
        folder = scan_image_folder(source)
        empty = _empty_class_dirs(source)
        if folder.classes and empty:
            raise DataError(f"class folder {empty[0]!r} in {role} {source} has no images; add images or remove it")
        split = ProbeSplit(source, "images", list(folder.paths), torch.tensor(folder.labels, dtype=torch.long), list(folder.classes))
    _check_labels(split, role)
    return split


def _empty_class_dirs(root: Path) -> list[str]:
    return [
        d.name for d in sorted(root.iterdir())
        if d.is_dir() and not d.name.startswith(".")
        and not any(p.suffix.lower() in IMAGE_EXTENSIONS for p in d.rglob("*") if p.is_file())
    ]


def _check_labels(split: ProbeSplit, role: str) -> None:
    if not split.classes or (split.labels < 0).any():
        raise DataError(
            f"{role} {split.source} has no classes: a probe needs one sub-folder per class "
            "(or a token dataset encoded from such a folder)"
        )
    if len(split.classes) < 2:
        raise DataError(f"{role} {split.source} has a single class ({split.classes[0]}); a probe needs at least two")
    empty = [name for name, count in split.class_counts().items() if count == 0]
    if empty:
        raise DataError(f"class {empty[0]!r} in {role} {split.source} has no (readable) images")


def match_classes(train: ProbeSplit, val: ProbeSplit) -> ProbeSplit:
    """VAL must have exactly TRAIN's classes; returns VAL with labels in TRAIN's class order."""
    if set(train.classes) != set(val.classes):
        missing = sorted(set(train.classes) - set(val.classes))
        extra = sorted(set(val.classes) - set(train.classes))
        detail = "; ".join(
            part for part in (
                f"missing in VAL: {', '.join(missing)}" if missing else "",
                f"only in VAL: {', '.join(extra)}" if extra else "",
            ) if part
        )
        raise DataError(f"class folders differ between TRAIN {train.source} and VAL {val.source} ({detail})")
    if train.classes == val.classes:
        return val
    order = torch.tensor([train.classes.index(name) for name in val.classes])
    return ProbeSplit(val.source, val.kind, val.paths, order[val.labels], list(train.classes), val.ids, val.model_config)


def _require_images(split: ProbeSplit, role: str, why: str) -> None:
    if split.kind == "images":
        return
    missing = next((p for p in split.paths if not p.is_file()), None)
    if missing is not None:
        raise DataError(
            f"{role} {split.source} is a token dataset and its source image {missing} is not found, but {why} needs "
            "the images; pass the image folder instead, or --baseline none (and LM-only --layers)"
        )


# -- features --------------------------------------------------------------------------------------
def random_encoder(model, seed: int, calibration: ProbeSplit | None = None, batch_size: int = 64) -> nn.Module:
    """The model's encoder architecture, freshly initialised (seeded, global RNG untouched). An
    output standardisation gets the model's target statistics and running statistics measured on
    (up to 1,024 of) the `calibration` images, as the trained encoder's were on its training data."""
    from lqae.vit import Encoder, init_weights

    cfg = model.config
    device = next(model.encoder.parameters()).device
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = Encoder(
            image_size=cfg.image_size, patch_size=cfg.patch_size, channels=cfg.channels, width=cfg.encoder_width,
            depth=cfg.encoder_depth, heads=cfg.encoder_heads, mlp_ratio=cfg.mlp_ratio, out_width=cfg.lm_width,
            standardize=model.encoder.standardize is not None,
        )
        init_weights(encoder)
    encoder = encoder.to(device).eval()
    if encoder.standardize is not None:
        trained = model.encoder.standardize
        encoder.standardize.set_target(trained.target_mean, trained.target_std)
        if calibration is not None:
            paths = calibration.paths[:1024]
            batches = (
                encoder.features(torch.stack([load_image(p, cfg.image_size) for p in paths[i : i + batch_size]]).to(device))
                for i in range(0, len(paths), batch_size)
            )
            with torch.no_grad():
                encoder.standardize.calibrate(batches)
    return encoder


@torch.no_grad()
def extract_features(
    model,
    split: ProbeSplit,
    layers: list[str],
    batch_size: int = 64,
    encoder: nn.Module | None = None,
    progress: Progress | None = None,
    stage: str = "features",
) -> torch.Tensor:
    """(N, feature_dim) float32 on the CPU: the chosen hidden states, each mean-pooled over tokens.

    Token datasets feed their ids straight to the LM (no image is re-encoded) unless encoder layers
    or a replacement `encoder` (the random-encoder baseline) need the pixels.
    """
    model.eval()
    encoder = encoder if encoder is not None else model.encoder
    need_images = uses_encoder(layers) or encoder is not model.encoder or split.ids is None
    if need_images:
        _require_images(split, "input", "encoder layers or the random-encoder baseline")
    device = next(model.encoder.parameters()).device
    size = model.config.image_size
    selected = [(name.split(":")[0], int(name.split(":")[1])) for name in layers]
    features = torch.empty(len(split), feature_dim(model, layers), dtype=torch.float32)
    for start in range(0, len(split), batch_size):
        stop = min(start + batch_size, len(split))
        encoder_states: list[torch.Tensor] = []
        if need_images:
            images = torch.stack([load_image(p, size) for p in split.paths[start:stop]]).to(device)
            z, encoder_states = encoder(images, return_hidden=True)  # (B, N, D), list of (B, N, W)
            ids = model.codebook(z).token_ids  # (B, N)
        else:
            ids = split.ids[start:stop].to(device)
        lm_states = model.lm_hidden_states(ids) if any(s == "lm" for s, _ in selected) else ()
        pooled = [
            (lm_states if source == "lm" else encoder_states)[index].float().mean(dim=1)  # (B, D)
            for source, index in selected
        ]
        features[start:stop] = torch.cat(pooled, dim=1).cpu()
        if progress:
            progress(stage, stop - start, len(split))
    return features


def pixel_features(
    split: ProbeSplit, size: int, progress: Progress | None = None, stage: str = "pixels"
) -> torch.Tensor:
    """(N, 3 * size * size) raw pixels in [0, 1] at the model's resolution (eval transform)."""
    _require_images(split, "input", "the pixels baseline")
    features = torch.empty(len(split), 3 * size * size, dtype=torch.float32)
    for start in range(0, len(split), 64):
        chunk = split.paths[start : start + 64]
        features[start : start + len(chunk)] = torch.stack([load_image(p, size).flatten() for p in chunk])
        if progress:
            progress(stage, len(chunk), len(split))
    return features


# -- head ------------------------------------------------------------------------------------------
class ProbeHead(nn.Module):
    """Fixed per-feature standardisation (train statistics) -> LayerNorm -> Linear.

    Concatenated LM layers differ in scale and a few dimensions are outliers; standardising with the
    training mean/std first lets LayerNorm and one learning rate treat every layer alike.
    """

    def __init__(self, feature_dim: int, num_classes: int) -> None:
        super().__init__()
        self.register_buffer("feature_mean", torch.zeros(feature_dim))  # (F,)
        self.register_buffer("feature_std", torch.ones(feature_dim))  # (F,)
        self.norm = nn.LayerNorm(feature_dim)
        self.linear = nn.Linear(feature_dim, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, F) -> logits (B, C)."""
        return self.linear(self.norm((features - self.feature_mean) / self.feature_std))

    @property
    def num_classes(self) -> int:
        return self.linear.out_features


def train_head(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    config: ProbeConfig,
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
    stage: str = "head",
) -> ProbeHead:
    """AdamW on cached features, warm-up then cosine; deterministic under `config.seed`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        head = ProbeHead(features.shape[1], num_classes)
    head.feature_mean.copy_(features.mean(dim=0))
    head.feature_std.copy_(features.std(dim=0, unbiased=False).clamp_min(1e-6))
    head.to(device).train()
    decay = [head.linear.weight]
    no_decay = [head.linear.bias, head.norm.weight, head.norm.bias]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr, betas=(0.9, 0.999),
    )
    steps_per_epoch = math.ceil(len(features) / config.batch_size)
    total = config.epochs * steps_per_epoch
    warmup = max(1, round(config.warmup_fraction * total))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: (step + 1) / warmup if step < warmup
        else 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))),
    )
    generator = torch.Generator().manual_seed(config.seed)
    x_all, y_all = features.to(device), labels.to(device)
    for _ in range(config.epochs):
        order = torch.randperm(len(features), generator=generator).to(device)
        for start in range(0, len(features), config.batch_size):
            batch = order[start : start + config.batch_size]
            loss = F.cross_entropy(head(x_all[batch]), y_all[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        if progress:
            progress(stage, 1, config.epochs)
    return head.eval()


@dataclass
class ProbeScores:
    """One probe's figures; accuracies are fractions in [0, 1]."""

    feature_dim: int
    train_top1: float
    top1: float
    top5: float | None  # only with more than 5 classes
    per_class: dict[str, float]  # val top-1 per class name
    feature_seconds: float  # extraction time for train + val
    head_seconds: float = 0.0  # head training time

    def as_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def predict(head: ProbeHead, features: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
    """Logits (N, C) on the CPU."""
    device = head.linear.weight.device
    return torch.cat([head(features[i : i + batch_size].to(device)).cpu() for i in range(0, len(features), batch_size)])


def accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int = 1) -> float:
    """Fraction of rows whose label is among the k highest logits."""
    topk = logits.topk(min(k, logits.shape[1]), dim=1).indices  # (N, k)
    return _fraction((topk == labels.unsqueeze(1)).any(dim=1))


def _fraction(hits: torch.Tensor) -> float:
    return int(hits.sum()) / max(1, hits.numel())


def score_head(
    head: ProbeHead, train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
    classes: list[str], seconds: float,
) -> ProbeScores:
    val_logits = predict(head, val_x)
    hits = val_logits.argmax(dim=1) == val_y
    per_class = {name: _fraction(hits[val_y == c]) for c, name in enumerate(classes)}
    return ProbeScores(
        feature_dim=train_x.shape[1],
        train_top1=accuracy(predict(head, train_x), train_y),
        top1=accuracy(val_logits, val_y),
        top5=accuracy(val_logits, val_y, 5) if len(classes) > 5 else None,
        per_class=per_class,
        feature_seconds=seconds,
    )


# -- the whole protocol ----------------------------------------------------------------------------
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
    progress: Progress | None = None,
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
            _require_images(split, role, f"the {name} baseline")
    device = next(model.encoder.parameters()).device
    classes = train.classes

    def fit(name: str, extract: Callable[[ProbeSplit, str], torch.Tensor]) -> tuple[ProbeScores, ProbeHead]:
        started = time.perf_counter()
        train_x, val_x = extract(train, f"{name} train"), extract(val, f"{name} val")
        seconds = time.perf_counter() - started
        head = train_head(train_x, train.labels, len(classes), config, device, progress, f"{name} head")
        scores = score_head(head, train_x, train.labels, val_x, val.labels, classes, seconds)
        scores.head_seconds = time.perf_counter() - started - seconds
        return scores, head

    batch = config.feature_batch_size
    scores, head = fit("probe", lambda s, stage: extract_features(model, s, layers, batch, progress=progress, stage=stage))
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
        majority_top1=_fraction(val.labels == majority),
        probe=scores, baselines=baselines, config=asdict(config),
    )
    return report, head


def _check_token_source(model, split: ProbeSplit, role: str, allow_foreign: bool) -> None:
    """Token ids only mean something to the LM and the weights that wrote them."""
    from lqae.tokendata import check_ids_fit, check_same_weights

    fix = "re-encode it with this model or pass the image folder"
    source = f"{role} {split.source}"
    check_ids_fit(split.model_config or {}, split.ids.shape[1], model.config, source, fix)
    check_same_weights(split.weights, model.weights_fingerprint, source, "this model's", fix, allow_foreign)


def _warn_shared_images(train: ProbeSplit, val: ProbeSplit) -> None:
    """A held-out score means little when VAL holds TRAIN's images."""
    seen = {os.path.realpath(p) for p in train.paths}
    shared = [p for p in val.paths if os.path.realpath(p) in seen]
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


# -- save, load, apply -----------------------------------------------------------------------------
@dataclass
class LoadedProbe:
    head: ProbeHead
    layers: list[str]
    classes: list[str]
    feature_dim: int
    model: str  # checkpoint folder the probe was trained on
    model_config: dict


def save_probe(folder: str | Path, head: ProbeHead, report: ProbeReport, model) -> None:
    """Write FOLDER/probe.safetensors (head weights) and FOLDER/probe.json (what is needed to apply it)."""
    from safetensors.torch import save

    from lqae.config import to_dict, write_json
    from lqae.io import atomic_write_bytes

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
    from safetensors import SafetensorError
    from safetensors.torch import load_file

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
    return LoadedProbe(
        head.eval(), list(meta["layers"]), list(meta["classes"]), int(meta["feature_dim"]),
        meta.get("model", ""), meta.get("model_config", {}),
    )


@dataclass
class Prediction:
    path: str
    label: str  # class name
    score: float  # softmax probability of that class


def collect_images(inputs: list[str | Path]) -> list[Path]:
    """Image files as given, and every image under the given folders (sorted)."""
    paths: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            paths.extend(scan_image_folder(item, check=False).paths)
        elif item.is_file():
            paths.append(item)
        else:
            raise DataError(f"image {item} does not exist")
    if not paths:
        raise DataError("no images given to classify")
    return paths


def apply_probe(
    model, probe: LoadedProbe, images: list[str | Path], batch_size: int = 64, progress: Progress | None = None
) -> list[Prediction]:
    """Classify images with a saved probe and the model it was trained on."""
    counts = layer_counts(model)
    try:
        layers = [parse_layers(name, counts)[0] for name in probe.layers]
    except ConfigError as exc:
        raise CheckpointError(f"the probe's layers do not exist in this model ({exc}); pass --model {probe.model}") from exc
    if feature_dim(model, layers) != probe.feature_dim:
        raise CheckpointError(
            f"this model gives {feature_dim(model, layers)} features for layers {','.join(layers)}, the probe "
            f"expects {probe.feature_dim}; pass the model it was trained on (--model {probe.model})"
        )
    from lqae.config import to_dict

    if probe.model_config and _shape_keys(probe.model_config) != _shape_keys(to_dict(model.config)):
        log.warning("the probe was trained on a model with another config (%s); predictions may be meaningless", probe.model)
    paths = collect_images(images)
    split = ProbeSplit(Path("."), "images", paths, torch.zeros(len(paths), dtype=torch.long), probe.classes)
    features = extract_features(model, split, layers, batch_size, progress=progress, stage="features")
    probe.head.to(next(model.encoder.parameters()).device)
    probabilities = predict(probe.head, features).softmax(dim=1)
    best = probabilities.max(dim=1)
    return [
        Prediction(str(path), probe.classes[int(index)], float(score))
        for path, index, score in zip(paths, best.indices, best.values)
    ]


def _shape_keys(config: dict) -> dict:
    keys = ("image_size", "patch_size", "encoder_width", "encoder_depth", "lm_vocab_size", "lm_width", "codebook_size", "vocab")
    return {k: config.get(k) for k in keys}
