"""Configuration dataclasses and named presets.

`ModelConfig` says what a checkpoint is: what encoding and decoding need (the ViT, the frozen LM and
its vocabulary, the codebook, the token layout). `TrainConfig` holds how it was trained, with the
settings of each training-only feature in a group of their own (`mask`, `distill`). Presets are
named pairs of them. Nothing here imports torch: the CLI reads presets for `--help` without loading
the model stack.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from lqae.errors import ConfigError
from lqae.io import atomic_write_bytes
from lqae.layout import TokenLayout
from lqae.model.codebook import SEARCH_SPACES

VOCAB_CHOICES = ("all", "words")
PRECISIONS = ("auto", "bf16", "fp32")
CHOICES: dict[str, Sequence[str]] = {  # string-valued fields and their allowed values
    "vocab": VOCAB_CHOICES,
    "encoder_output": ("linear", "standardize"),
    "search_space": SEARCH_SPACES,  # the codebook registry: one module per search space
    "decoder_input": ("lm", "lm_search", "search"),  # lqae.model.decoder_input
    "decoder_head": ("linear", "conv"),
    "precision": PRECISIONS,
}

# Ranges of the numeric fields, (lowest, highest) inclusive; None leaves a side open. Generous: they
# exist to turn a typo (patch_size 0, image_size 10**9) into one clear line instead of a division by
# zero or an exabyte allocation, not to forbid unusual experiments. Nested fields by their path.
LIMITS: dict[str, tuple[float | None, float | None]] = {
    "image_size": (1, 8192), "patch_size": (1, 8192), "channels": (1, 4),
    "encoder_width": (1, 16384), "encoder_depth": (1, 256), "encoder_heads": (1, 1024),
    "decoder_width": (1, 16384), "decoder_depth": (1, 256), "decoder_heads": (1, 1024),
    "mlp_ratio": (1e-3, 64), "grid_dim": (1, 16), "decoder_head_channels": (1, 4096),
    "global_tokens": (0, 1024), "global_vocab_size": (1, 65536),
    "lm_vocab_size": (1, None), "lm_width": (1, None), "codebook_size": (1, None),
    "batch_size": (1, None), "grad_accum": (1, None), "epochs": (1e-6, None), "steps": (1, None),
    "base_lr": (1e-12, None), "weight_decay": (0, None), "beta1": (0, 0.999999), "beta2": (0, 0.999999),
    "warmup_fraction": (0, 1), "grad_clip": (0, None), "crop_scale_min": (1e-6, 1), "num_workers": (-1, 1024),
    "log_every": (1, None), "sample_every": (1, None), "save_every": (1, None), "val_every": (1, None),
    "seed": (0, 2**31 - 1), "commitment_weight": (0, None),
    "mask.ratio": (0, 0.999999), "mask.mlm_weight": (0, None),
    "distill.weight": (0, None), "distill.teacher_temperature": (1e-6, None),
    "distill.student_temperature": (1e-6, None), "distill.teacher_momentum": (0, 1),
}
MAX_TOKENS_PER_IMAGE = 65536  # (image_size / patch_size)^2: far beyond any LM's context


@dataclass
class ModelConfig:
    """Everything needed to rebuild an LQAE for encoding and decoding (the frozen LM is rebuilt from
    `lm_name`). Defaults are the reference's decisions (the `paper` preset)."""

    image_size: int = 256  # square input side in pixels
    patch_size: int = 16  # ViT patch side; (image_size / patch_size)^2 patch tokens per image
    channels: int = 3  # images are always converted to RGB
    encoder_width: int = 768  # ViT-Base
    encoder_depth: int = 12
    encoder_heads: int = 12
    decoder_width: int = 768  # same stack as the encoder in the reference
    decoder_depth: int = 12
    decoder_heads: int = 12
    mlp_ratio: float = 4.0  # MLP hidden = width * mlp_ratio (3072 for ViT-Base)
    lm_name: str = "roberta-base"  # frozen LM: local dir, offline package or HF hub name
    vocab: str = "all"  # codebook tokens: "all" (every non-special token) or "words" (whole alphabetic words)
    llm_vocab: str | None = None  # keep only words this LLM's tokenizer reads as one token after a space
    # (hf:NAME, openai:MODEL or tiktoken:ENCODING; lqae.model.vocab); the chosen ids are saved with the weights
    exclude_special_tokens: bool = True  # the reference kept them; a code equal to [MASK]/[PAD] makes LM input ambiguous
    encoder_output: str = "linear"  # "standardize": per-feature batch standardisation onto the codebook's
    # statistics (running statistics at encode time), so the output's norm cannot drift and its tokens start spread
    search_space: str = "embedding"  # where the nearest code is looked up (lqae.model.codebook): "embedding",
    # cosine among the word embeddings (the reference); "grid", FSQ's even grid made of words
    grid_dim: int = 6  # "grid": dimensions of the grid (the codebook's top principal coordinates)
    decoder_input: str = "lm"  # what the decoder reads (lqae.model.decoder_input): "lm", the LM's last hidden
    # state (the reference); "lm_search", that plus each code's search coordinates; "search", the coordinates
    # only (a diagnostic without the LM, which measures what the LM's read adds)
    decoder_head: str = "linear"  # "linear": each token's pixels from one linear map (the reference);
    # "conv": each token unpatchifies to decoder_head_channels feature maps, then 3x3 convs blend the patch seams
    decoder_head_channels: int = 32  # "conv" head: feature maps per pixel before the convolutions
    global_tokens: int = 0  # G global words per image, read by the LM before the patch words and written first
    # in the token text (learned queries over the image); 0 = the published method (patch words only)
    global_vocab_size: int = 64  # words each global token chooses among (disjoint sets spread over the search space)
    # Filled in at training time from the loaded LM, checked on load so a wrong --lm fails loudly.
    lm_vocab_size: int | None = None  # rows of the LM's input embedding matrix
    lm_width: int | None = None  # columns of that matrix
    codebook_size: int | None = None  # number of codes after the vocabulary filter

    def __post_init__(self) -> None:
        check_fields(self)
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"image size {self.image_size} is not divisible by patch size {self.patch_size}; "
                "pick a patch size that divides the image size"
            )
        if self.layout.patches > MAX_TOKENS_PER_IMAGE:
            raise ConfigError(
                f"image_size {self.image_size} / patch_size {self.patch_size} gives {self.layout.patches:,} "
                f"tokens per image; at most {MAX_TOKENS_PER_IMAGE:,}"
            )
        for name in ("encoder", "decoder"):
            width, heads = getattr(self, f"{name}_width"), getattr(self, f"{name}_heads")
            if width % heads:
                raise ConfigError(f"{name} width {width} is not divisible by its {heads} heads")

    @property
    def layout(self) -> TokenLayout:
        """The token sequence of one image: the global words, then the patch grid."""
        return TokenLayout(self.global_tokens, self.image_size // self.patch_size)

    @property
    def num_tokens(self) -> int:
        """Tokens per image (the LM's sequence length)."""
        return self.layout.length


@dataclass
class Masking:
    """The reference's masking of the LM's input in training, and its masked-LM loss."""

    ratio: float = 0.5  # per-token probability of the LM's mask embedding (never a global word; 0 at encode time)
    mlm_weight: float = 1e-4  # LM-head cross-entropy at masked positions (skipped when the LM has no MLM head)


@dataclass
class Distillation:
    """The global words' self-distillation between two augmented views (DINO, Caron et al. 2021), the
    teacher's targets balanced over each batch by Sinkhorn-Knopp (SwAV, Caron et al. 2020)."""

    weight: float = 1.0  # of the invariance loss: two views of an image must choose the same global words
    teacher_temperature: float = 0.04  # sharpens the EMA teacher's word distribution
    student_temperature: float = 0.1  # the student's word distribution
    teacher_momentum: float = 0.99  # EMA rate of the teacher encoder


@dataclass
class TrainConfig:
    """Optimisation, augmentation, losses and bookkeeping for `lqae train`."""

    batch_size: int = 512  # images per optimiser step, summed over devices and accumulation
    grad_accum: int = 1  # micro-batches per optimiser step
    epochs: float = 100.0  # used when steps is None
    steps: int | None = None  # optimiser steps; overrides epochs
    base_lr: float = 1.5e-4  # peak lr = base_lr * batch_size / 256 (MAE/LQAE scaling rule)
    weight_decay: float = 5e-4
    beta1: float = 0.9
    beta2: float = 0.95
    warmup_fraction: float = 0.05  # reference: 5 of 100 epochs, then cosine to 0
    grad_clip: float = 0.0  # max grad norm; 0 disables (the reference does not clip)
    crop_scale_min: float = 0.2  # RandomResizedCrop scale range (crop_scale_min, 1)
    hflip: bool = True
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32
    compile: bool = False  # torch.compile the trainable encoder/decoder
    num_workers: int = -1  # data-loading processes; -1 picks from the CPU count
    log_every: int = 10  # steps between metric lines
    sample_every: int = 500  # steps between reconstruction grids
    save_every: int = 1000  # steps between checkpoints
    val_every: int = 1000  # steps between validation passes (with --val)
    seed: int = 0
    commitment_weight: float = 0.01  # the loss is pixel MSE + this x commitment (+ mask and distill terms);
    # the reference's beta = 0.005 counted twice
    mask: Masking = field(default_factory=Masking)
    distill: Distillation = field(default_factory=Distillation)  # with global tokens only

    def __post_init__(self) -> None:
        check_fields(self)
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"batch size {self.batch_size} is not divisible by grad_accum {self.grad_accum}")

    @property
    def peak_lr(self) -> float:
        return self.base_lr * self.batch_size / 256


GROUPS = {"mask": Masking, "distill": Distillation}  # TrainConfig's nested groups


# -- checking values ------------------------------------------------------------------------------


def check_fields(config: Any, prefix: str = "") -> None:
    """Every field of a config dataclass has its annotated type (an int field takes no 32.0 and no
    "abc", a bool field no "no"), lies in its range and, for string choices, is a known value; one
    ConfigError names every bad field. Groups are checked by their own __post_init__."""
    hints = typing.get_type_hints(type(config))
    problems = []
    for item in dataclasses.fields(config):
        value, path = getattr(config, item.name), prefix + item.name
        if dataclasses.is_dataclass(hints[item.name]):
            if not isinstance(value, hints[item.name]):
                problems.append(f"{path} must be a group of {', '.join(f.name for f in dataclasses.fields(hints[item.name]))}")
            else:
                check_fields(value, path + ".")
            continue
        problem = _type_problem(value, hints[item.name]) or _range_problem(value, LIMITS.get(path))
        if not problem and item.name in CHOICES and value not in CHOICES[item.name]:
            problem = f"is unknown; choose one of: {', '.join(CHOICES[item.name])}"
        if problem:
            problems.append(f"{path} {problem}, got {value!r}")
    if problems:
        raise ConfigError("; ".join(problems))


def _type_problem(value: Any, hint: Any) -> str | None:
    allowed = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if value is None:
        return None if type(None) in allowed else "must not be null"
    kind = next(t for t in allowed if t is not type(None))
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    else:
        ok = isinstance(value, kind)
    if ok:
        return None
    names = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}
    return f"must be {names.get(kind, kind.__name__)}" + (" or null" if type(None) in allowed else "")


def _range_problem(value: Any, limits: tuple[float | None, float | None] | None) -> str | None:
    if limits is None or value is None:
        return None
    low, high = limits
    if (low is not None and value < low) or (high is not None and value > high):
        return f"must be at least {low}" if high is None else f"must be between {low} and {high}"
    return None


# -- presets --------------------------------------------------------------------------------------


@dataclass
class Preset:
    model: ModelConfig
    train: TrainConfig
    summary: str = ""


# The recipe shared by the base, small and tiny presets; `paper` keeps the reference decisions. Why
# each differs from the reference: docs/results.md, "The recipe".
RECIPE: dict[str, Any] = dict(encoder_output="standardize", search_space="grid", decoder_input="lm_search",
                              decoder_head="conv")
RECIPE_MASK = Masking(ratio=0.0)  # nothing upstream of the LM learns through its input: no mask, no MLM loss
MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def _presets() -> dict[str, Preset]:
    def recipe_train(**fields: Any) -> TrainConfig:
        return TrainConfig(mask=dataclasses.replace(RECIPE_MASK), **fields)

    return {
        "paper": Preset(
            ModelConfig(), TrainConfig(), "the reference: ViT-B/16 at 256px, roberta-base, batch 512, 100 epochs",
        ),
        "base": Preset(
            ModelConfig(vocab="words", **RECIPE), recipe_train(batch_size=256, epochs=50),
            "ViT-B/16 at 256px, roberta-base, word vocabulary, batch 256",
        ),
        "small": Preset(
            ModelConfig(
                image_size=128, patch_size=16, encoder_width=384, encoder_depth=6, encoder_heads=6,
                decoder_width=384, decoder_depth=6, decoder_heads=6, lm_name=MINILM, vocab="words", **RECIPE,
            ),
            recipe_train(batch_size=128, epochs=50, base_lr=5e-4, sample_every=250, save_every=500),
            "ViT-S/16 at 128px over MiniLM-L6; one consumer GPU",
        ),
        "tiny": Preset(
            ModelConfig(
                image_size=32, patch_size=8, encoder_width=128, encoder_depth=2, encoder_heads=4,
                # decoding a 16-token code takes more than encoding it: a wider, deeper decoder
                decoder_width=256, decoder_depth=4, decoder_heads=8, lm_name=MINILM, vocab="words", **RECIPE,
                global_tokens=8,
            ),
            recipe_train(
                batch_size=32, steps=1200, base_lr=4e-3, warmup_fraction=0.05, weight_decay=0.05,
                # a higher lr and weight decay than the reference: minutes of training, not epochs; crops of
                # 40-100% of the image, DINO's global crops: the global words see whole objects
                crop_scale_min=0.4, log_every=10, sample_every=100, save_every=100, val_every=100,
            ),
            "32px, 4x4 patches of 8px and 8 global words over MiniLM-L6; trains on 2 CPU cores in minutes",
        ),
    }


PRESETS: dict[str, Preset] = _presets()


def get_preset(name: str) -> Preset:
    """Return a fresh copy of a named preset; unknown names list the known ones."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    preset = PRESETS[name]
    return Preset(dataclasses.replace(preset.model), from_dict(TrainConfig, to_dict(preset.train)), preset.summary)


# -- fields by path: --set, options, --resume -----------------------------------------------------


def field_paths(cls: type) -> list[str]:
    """Every settable field of a config class, groups' fields as `group.field`."""
    paths = []
    for item in dataclasses.fields(cls):
        group = GROUPS.get(item.name) if cls is TrainConfig else None
        paths += [f"{item.name}.{f.name}" for f in dataclasses.fields(group)] if group else [item.name]
    return paths


def field_path(name: str) -> str:
    """The path of a field named `name`: a path itself (`mask.ratio`), or a group's field written
    with an underscore (`mask_ratio`, as keyword arguments must be). ConfigError lists the known ones."""
    known = set(field_paths(ModelConfig)) | set(field_paths(TrainConfig))
    if name in known:
        return name
    group, _, rest = name.partition("_")
    if f"{group}.{rest}" in known:
        return f"{group}.{rest}"
    raise ConfigError(
        f"unknown config field {name!r}; model fields: {', '.join(field_paths(ModelConfig))}; "
        f"training fields: {', '.join(field_paths(TrainConfig))}"
    )


def with_values(preset: Preset, values: dict[str, Any]) -> Preset:
    """A copy of the preset with fields set by path (`steps`, `mask.ratio`); checked as built."""
    model_paths = set(field_paths(ModelConfig))
    model = {k: v for k, v in values.items() if k in model_paths}
    train = to_dict(preset.train)
    for path, value in values.items():
        if path not in model_paths:
            group, _, name = path.rpartition(".")
            (train[group] if group else train)[name] = value
    try:
        return Preset(dataclasses.replace(preset.model, **model), from_dict(TrainConfig, train), preset.summary)
    except TypeError as exc:
        raise ConfigError(f"bad override: {exc}") from exc


def parse_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """`field=value` strings -> {path: value}; values parse as JSON when they can (`mask.ratio=0.3`,
    `llm_vocab=null`, `encoder_output=linear`)."""
    values = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"expected FIELD=VALUE, got {pair!r}")
        try:
            values[field_path(key.strip())] = json.loads(raw)
        except json.JSONDecodeError:
            values[field_path(key.strip())] = raw
    return values


def apply_overrides(preset: Preset, pairs: Sequence[str]) -> Preset:
    """The preset with `field=value` strings applied (see `parse_overrides`)."""
    return with_values(preset, parse_overrides(pairs))


def configure(preset: str, overrides: Sequence[str] = (), **options: Any) -> Preset:
    """What `lqae train` trains: the named preset, then `field=value` overrides (`--set`), then the
    named options that are not None (each a field, a group's written `group_field`: lm_name=...,
    steps=..., mask_ratio=...). Epochs without steps train by epochs: the preset's step count is dropped."""
    chosen = apply_overrides(get_preset(preset), overrides)
    given = {field_path(name): value for name, value in options.items() if value is not None}
    if "epochs" in given and "steps" not in given:
        given["steps"] = None
    return with_values(chosen, given)


def asked_fields(overrides: Sequence[str] = (), **options: Any) -> set[str]:
    """The field paths a command line chose: `--set` keys and the options that are not None
    (`configure`'s rule included: epochs without steps chooses steps too)."""
    asked = set(parse_overrides(overrides)) | {field_path(n) for n, v in options.items() if v is not None}
    if "epochs" in asked:
        asked.add("steps")
    return asked


# What `--resume` may change: bookkeeping that leaves the weights a run produces as they are.
RESUME_CHANGES = frozenset({
    "steps", "epochs", "num_workers", "log_every", "sample_every", "save_every", "val_every", "compile",
})
_FILLED_AT_TRAINING = frozenset({"lm_vocab_size", "lm_width", "codebook_size"})


def flat_dict(config: Any) -> dict[str, Any]:
    """{path: value} of a config, groups' fields as `group.field`."""
    return {f"{k}.{n}" if isinstance(v, dict) else k: x
            for k, v in to_dict(config).items() for n, x in (v.items() if isinstance(v, dict) else [(k, v)])}


def resumed_configs(
    saved_model: ModelConfig, saved_train: TrainConfig | None, model: ModelConfig, train: TrainConfig,
    asked: set[str] | None = None,
) -> tuple[ModelConfig, TrainConfig]:
    """What a resumed run continues with: the saved configs, with the fields of RESUME_CHANGES
    taken from the request. Any other field the request chose (`asked`: paths; every field when
    None) that differs from the saved run is refused: one ConfigError lists each difference."""
    refused, changes = [], {}
    for saved, requested in ((saved_model, model), (saved_train, train)):
        if saved is None:  # a checkpoint saved without its training config: the request's stands
            continue
        old_values, new_values = flat_dict(saved), flat_dict(requested)
        for path, old in old_values.items():
            new = new_values[path]
            if path in _FILLED_AT_TRAINING or (asked is not None and path not in asked) or old == new:
                continue
            if path == "steps" and new is None and asked is None:  # None: the saved count
                continue
            if path in RESUME_CHANGES:
                changes[path] = new
            else:
                refused.append(f"{path} (trained with {old!r}, asked {new!r})")
    if refused:
        raise ConfigError(
            "--resume continues a run with the configuration it was trained with, and these options differ: "
            + ", ".join(refused) + "; drop them to resume, or train a new run with another --out"
        )
    resumed = with_values(Preset(saved_model, saved_train or train), changes)
    return resumed.model, resumed.train


# -- JSON -----------------------------------------------------------------------------------------


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Build a config from its JSON form, rejecting unknown keys so a corrupt or foreign config.json
    fails loudly (older forms go through `lqae.legacy` first)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{cls.__name__} must be a JSON object, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} fields in config: {', '.join(unknown)}")
    groups = GROUPS if cls is TrainConfig else {}
    values = {k: from_dict(groups[k], v) if k in groups and isinstance(v, dict) else v for k, v in data.items()}
    return cls(**values)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write JSON with sorted keys atomically (temp file + rename)."""
    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())
