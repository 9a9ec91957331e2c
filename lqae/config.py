"""Configuration dataclasses: what a checkpoint is (`ModelConfig`) and how it was trained (`TrainConfig`).

`ModelConfig` says what a checkpoint is: what encoding and decoding need (the ViT, the frozen LM and
its vocabulary, the codebook, the token layout). `TrainConfig` holds how it was trained, with the
settings of each training-only feature in a group of their own (`mask`, `distill`). The named presets
are `lqae.presets`. Nothing here imports torch: the CLI reads configs for `--help` without loading
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
    precision: str = "auto"  # auto (bf16 autocast on CUDA and on CPUs with bf16 instructions, else fp32) | bf16 | fp32
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


# -- JSON -----------------------------------------------------------------------------------------


def flat_dict(config: Any) -> dict[str, Any]:
    """{path: value} of a config, groups' fields as `group.field`."""
    return {f"{k}.{n}" if isinstance(v, dict) else k: x
            for k, v in to_dict(config).items() for n, x in (v.items() if isinstance(v, dict) else [(k, v)])}


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
