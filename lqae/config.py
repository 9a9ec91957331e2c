"""Configuration dataclasses and named presets.

Nothing here imports torch: the CLI reads presets for `--help` without loading the model stack.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from lqae.errors import ConfigError
from lqae.io import atomic_write_bytes

VOCAB_CHOICES = ("all", "words")
PRECISIONS = ("auto", "bf16", "fp32")
CHOICES = {  # string-valued fields and their allowed values (lqae.model.quantizer implements the quantizer ones)
    "vocab": VOCAB_CHOICES,
    "encoder_output": ("linear", "unit", "standardize"),
    "commitment": ("mse", "cosine"),
    "straight_through": ("identity", "rotation", "soft", "none"),
    "search_space": ("embedding", "latent", "mapped", "pca", "uniform", "grid"),
    "decoder_input": ("lm", "lm_skip", "lm_search", "embeddings", "search"),
    "decoder_head": ("linear", "conv"),
    "global_balance": ("centre", "sinkhorn"),
}


# Ranges of the numeric fields, (lowest, highest) inclusive; None leaves a side open. Generous: they
# exist to turn a typo (patch_size 0, image_size 10**9) into one clear line instead of a division by
# zero or an exabyte allocation, not to forbid unusual experiments.
MODEL_LIMITS: dict[str, tuple[float | None, float | None]] = {
    "image_size": (1, 8192), "patch_size": (1, 8192), "channels": (1, 4),
    "encoder_width": (1, 16384), "encoder_depth": (1, 256), "encoder_heads": (1, 1024),
    "decoder_width": (1, 16384), "decoder_depth": (1, 256), "decoder_heads": (1, 1024),
    "mlp_ratio": (1e-3, 64), "mask_ratio": (0, 1), "mask_ratio_min": (0, 1),
    "commitment_weight": (0, None), "recon_weight": (0, None), "mlm_weight": (0, None),
    "soft_top_k": (1, 65536), "soft_temperature": (1e-6, None), "latent_dim": (1, 16384),
    "codebook_weight": (0, None), "usage_weight": (0, None), "usage_temperature": (1e-6, None),
    "usage_sample_tokens": (1, 1 << 20), "search_chunk_tokens": (1, 1 << 20),
    "lm_vocab_size": (1, None), "lm_width": (1, None), "codebook_size": (1, None),
    "decoder_head_channels": (1, 4096), "usage_top_k": (0, 65536), "global_tokens": (0, 1024),
    "global_vocab_size": (1, 65536), "global_queue": (0, 1 << 20), "invariance_weight": (0, None), "teacher_temperature": (1e-6, None),
    "student_temperature": (1e-6, None), "centre_momentum": (0, 1),
}
MAX_TOKENS_PER_IMAGE = 65536  # (image_size / patch_size)^2: far beyond any LM's context


def check_fields(config: Any, limits: dict[str, tuple[float | None, float | None]]) -> None:
    """Every field of a config dataclass has its annotated type (an int field takes no 32.0 and no
    "abc", a bool field no "no") and lies in its range; one ConfigError names every bad field."""
    hints = typing.get_type_hints(type(config))
    problems = []
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        problem = _type_problem(value, hints[field.name]) or _range_problem(value, limits.get(field.name))
        if problem:
            problems.append(f"{field.name} {problem}, got {value!r}")
    if problems:
        raise ConfigError("; ".join(problems))
    if isinstance(config, ModelConfig) and (config.image_size // config.patch_size) ** 2 > MAX_TOKENS_PER_IMAGE:
        raise ConfigError(
            f"image_size {config.image_size} / patch_size {config.patch_size} gives "
            f"{(config.image_size // config.patch_size) ** 2:,} tokens per image; at most {MAX_TOKENS_PER_IMAGE:,}"
        )


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
        if high is None:
            return f"must be at least {low}"
        return f"must be between {low} and {high}"
    return None


@dataclass
class ModelConfig:
    """Everything needed to rebuild an LQAE (the frozen LM is rebuilt from `lm_name`)."""

    image_size: int = 256  # square input side in pixels
    patch_size: int = 16  # ViT patch side; image_size // patch_size squared = tokens per image
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
    mask_ratio: float = 0.5  # per-token probability of the LM's mask embedding during training (0 at eval)
    mask_ratio_min: float | None = None  # set: each image draws its ratio uniformly from [mask_ratio_min, mask_ratio]
    commitment_weight: float = 0.01  # reference: beta=0.005 counted twice, so 0.01 effective
    recon_weight: float = 1.0  # pixel MSE
    mlm_weight: float = 1e-4  # LM head cross-entropy at masked positions (skipped when the LM has no MLM head)
    encoder_output: str = "linear"  # "unit": direction only, at the codebook's mean norm (no norm drift);
    # "standardize": per-feature batch standardisation onto the codebook's mean/std (no drift, no index collapse)
    standardize_running: bool = False  # "standardize": normalise with the running statistics in training too
    # (each batch only moves them, no gradient through them): training quantizes exactly as encoding does
    commitment: str = "mse"  # "cosine": 1 - cos(z, e), matching the angle the search uses
    straight_through: str = "identity"  # "rotation": the rotation trick (Fifty et al. 2024); "soft": see below;
    # "none": no gradient through the LM's input (the encoder learns from the decoder's code coordinates, as FSQ's)
    soft_top_k: int = 32  # "soft": the gradient flows through a softmax over this many nearest codes
    soft_temperature: float = 0.05  # "soft": softmax temperature over their cosine similarities
    search_space: str = "embedding"  # "latent": two learned maps (official quantizer_latent_dim); "mapped": SimVQ;
    # "pca": the codebook's top latent_dim principal directions (a dense, fixed search space);
    # "uniform": those coordinates through the normal CDF into the unit cube, nearest by Euclidean distance;
    # "grid": that cube cut into an even grid (FSQ's), one word per cell, the decoder reads cell centres
    latent_dim: int = 32  # width of the "latent" / "pca" / "uniform" / "grid" search space
    codebook_weight: float = 1.0  # latent/mapped search only: pulls the mapped code towards the encoder output
    decoder_input: str = "lm"  # "lm_skip": the LM's last hidden state plus its input (the masked code embeddings);
    # "lm_search": the LM's last hidden state plus a learned map of each code's search-space vector (none where
    # masked); diagnostics that skip the LM: "embeddings" (the code embeddings), "search" (the search vectors only)
    decoder_reads_masked: bool = False  # "lm_search": the decoder also reads the masked codes' search vectors
    # (the mask then hides codes from the LM only; at encode/decode time nothing is masked either way;
    # the other decoder inputs ignore it)
    decoder_lm_zero_init: bool = False  # "lm_search": the decoder's read of the LM starts at zero, so it starts
    # from the codes' coordinates and takes in the LM's features as far as they help (others ignore it)
    decoder_head: str = "linear"  # "linear": each token's pixels from one linear map (the reference);
    # "conv": each token unpatchifies to decoder_head_channels feature maps, then 3x3 convs blend the patch seams
    decoder_head_channels: int = 32  # "conv" head: feature maps per pixel before the convolutions
    global_tokens: int = 0  # G global tokens per image (learned encoder queries), read by the LM before the patch
    # tokens and written first in the token text; 0 = the published method (patch tokens only)
    decoder_reads_global: bool = True  # the decoder reads the global positions too (False: the patch positions
    # only; the LM still reads the global words first, so its patch states carry them)
    global_vocab_size: int = 64  # words each global token chooses among (disjoint sets spread over the search space)
    invariance_weight: float = 1.0  # self-distillation: two augmented views must choose the same global words
    teacher_temperature: float = 0.04  # sharpens the EMA teacher's word distribution (DINO)
    student_temperature: float = 0.1  # the student's word distribution
    centre_momentum: float = 0.9  # EMA of the teacher's mean scores, subtracted before sharpening (no collapse)
    global_balance: str = "sinkhorn"  # how the teacher's targets are kept from collapsing onto a few words:
    # "sinkhorn" (SwAV: Sinkhorn-Knopp spreads each batch evenly over the words, three iterations) or
    # "centre" (DINO: subtract a running mean; at batch 32 it left each global token 2-4 words)
    global_queue: int = 0  # "sinkhorn": teacher scores of this many earlier views join each batch's balancing
    # (SwAV's queue for small batches: the batch's images may share words the queue's images leave free)
    usage_weight: float = 0.0  # code-usage (entropy) regulariser; 0 in the reference. Ours: counters code collapse
    usage_temperature: float = 0.01  # softmax temperature over cosine similarities for that regulariser
    usage_sample_tokens: int = 1024  # tokens per step the regulariser looks at (bounds its memory)
    usage_top_k: int = 0  # > 0: each token's soft assignment spans its nearest usage_top_k codes only (faster)
    search_chunk_tokens: int = 4096  # tokens per nearest-code matmul chunk; bounds memory to chunk x codebook floats
    # Filled in at training time from the loaded LM, checked on load so a wrong --lm fails loudly.
    lm_vocab_size: int | None = None  # rows of the LM's input embedding matrix
    lm_width: int | None = None  # columns of that matrix
    codebook_size: int | None = None  # number of codes after the vocabulary filter

    def __post_init__(self) -> None:
        check_fields(self, MODEL_LIMITS)
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"image size {self.image_size} is not divisible by patch size {self.patch_size}; "
                "pick a patch size that divides the image size"
            )
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"unknown {name} {getattr(self, name)!r}; choose one of: {', '.join(allowed)}")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ConfigError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")
        if self.mask_ratio_min is not None and not 0.0 <= self.mask_ratio_min <= self.mask_ratio:
            raise ConfigError(f"mask_ratio_min must be in [0, mask_ratio={self.mask_ratio}], got {self.mask_ratio_min}")
        if self.straight_through == "none" and self.decoder_input not in ("lm_search", "search"):
            raise ConfigError(
                f"straight_through=none passes no gradient through the LM's input, so with decoder_input="
                f"{self.decoder_input} the encoder would not learn; use decoder_input=lm_search (or search)"
            )
        for name in ("encoder", "decoder"):
            width, heads = getattr(self, f"{name}_width"), getattr(self, f"{name}_heads")
            if width % heads:
                raise ConfigError(f"{name} width {width} is not divisible by its {heads} heads")

    @property
    def search_dim(self) -> int | None:
        """Width of the search space (the codes' coordinates); None until lm_width is known."""
        if self.search_space in ("pca", "latent", "uniform", "grid"):
            return self.latent_dim
        return self.lm_width

    @property
    def grid_size(self) -> int:
        """Patches per image side."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """Patch tokens per image."""
        return self.grid_size**2

    @property
    def num_tokens(self) -> int:
        """Tokens per image (the LM sequence length): the global tokens, then the patch tokens."""
        return self.global_tokens + self.num_patches


TRAIN_LIMITS: dict[str, tuple[float | None, float | None]] = {
    "batch_size": (1, None), "grad_accum": (1, None), "epochs": (1e-6, None), "steps": (1, None),
    "base_lr": (1e-12, None), "weight_decay": (0, None), "beta1": (0, 0.999999), "beta2": (0, 0.999999),
    "warmup_fraction": (0, 1), "mask_warmup_fraction": (0, 1), "mask_cooldown_fraction": (0, 1),
    "teacher_momentum": (0, 1), "min_lr_fraction": (0, 1), "grad_clip": (0, None),
    "crop_scale_min": (1e-6, 1), "num_workers": (-1, 1024), "log_every": (1, None), "sample_every": (1, None),
    "save_every": (1, None), "val_every": (1, None), "seed": (0, 2**31 - 1),
}


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping for `lqae train`."""

    batch_size: int = 512  # images per optimiser step, summed over devices and accumulation
    grad_accum: int = 1  # micro-batches per optimiser step
    epochs: float = 100.0  # used when steps is None
    steps: int | None = None  # optimiser steps; overrides epochs
    base_lr: float = 1.5e-4  # peak lr = base_lr * batch_size / 256 (MAE/LQAE scaling rule)
    weight_decay: float = 5e-4
    beta1: float = 0.9
    beta2: float = 0.95
    warmup_fraction: float = 0.05  # reference: 5 of 100 epochs, then cosine to 0
    mask_warmup_fraction: float = 0.0  # the mask ratio ramps linearly from 0 over this fraction of training
    mask_cooldown_fraction: float = 0.0  # ... and linearly down to 0 over this last fraction
    teacher_momentum: float = 0.99  # global tokens: EMA rate of the self-distillation teacher encoder
    min_lr_fraction: float = 0.0  # cosine floor as a fraction of the peak lr
    grad_clip: float = 0.0  # max grad norm; 0 disables (the reference does not clip)
    crop_scale_min: float = 0.2  # RandomResizedCrop scale range (0.2, 1)
    hflip: bool = True
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32
    compile: bool = False  # torch.compile the trainable encoder/decoder
    num_workers: int = -1  # data-loading processes; -1 picks from the CPU count
    log_every: int = 10  # steps between metric lines
    sample_every: int = 500  # steps between reconstruction grids
    save_every: int = 1000  # steps between checkpoints
    val_every: int = 1000  # steps between validation passes (with --val)
    seed: int = 0

    def __post_init__(self) -> None:
        check_fields(self, TRAIN_LIMITS)
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ConfigError("batch size and gradient accumulation must be positive")
        if self.batch_size % self.grad_accum:
            raise ConfigError(
                f"batch size {self.batch_size} is not divisible by grad_accum {self.grad_accum}"
            )
        if self.precision not in PRECISIONS:
            raise ConfigError(f"unknown precision {self.precision!r}; choose one of: {', '.join(PRECISIONS)}")

    @property
    def peak_lr(self) -> float:
        return self.base_lr * self.batch_size / 256


@dataclass
class Preset:
    model: ModelConfig
    train: TrainConfig
    summary: str = ""


# The recipe shared by the base, small and tiny presets (bench/quality.py and the README's ablation
# table measured each part; `paper` keeps the reference decisions). Each entry, and why:
RECIPE: dict[str, Any] = {
    # per-feature batch standardisation onto the codebook's statistics: the raw output's norm drifts
    # (x60 in 600 steps) and all its tokens start parallel, so only a handful of codes are ever nearest
    "encoder_output": "standardize",
    # FSQ's evenly filled grid made of words: the codebook's top 6 principal coordinates, each through
    # the normal CDF into the unit cube, cut into 6x5x5x5x5x5 cells of one word each; the decoder reads
    # the cell's centre (+0.57 dB on the digits over the words' own cube coordinates)
    "search_space": "grid",
    "latent_dim": 6,
    # no gradient through the LM's input: the encoder learns through the cell coordinates the decoder
    # reads, as FSQ's does (+0.15 dB digits over a softmax over the 32 nearest codes, 1.4x faster steps)
    "straight_through": "none",
    # no mask: with no gradient through the LM's input (above) the mask trained nothing upstream of
    # the LM, it only perturbed the decoder's read of it; the LM now reads each image's words in
    # training as it does at encode time (+0.09 to +0.28 dB on the four bench sets and 5-way overlap
    # -0.7 to +3.6 points over drawing each image's ratio from [0, 0.5]); the MLM loss goes with it
    "mask_ratio": 0.0,
    # no code-usage regulariser (the reference's 0, named here): on the grid an entropy term at 0.005
    # (rounds two and three) cost 0.48 dB on the digits (0.86 with the previous search) for twice the codes
    "usage_weight": 0.0,
    # the decoder reads the LM's output plus each code's search coordinates; with a mask set, masked
    # codes' too, so the mask hides codes from the LM only (+1.92 dB digits, +0.89 shapes in round three)
    "decoder_input": "lm_search",
    "decoder_reads_masked": True,
    # the decoder's read of the LM starts at zero: it starts from the coordinates (+0.26 dB shapes)
    "decoder_lm_zero_init": True,
    # unpatchify to feature maps, then 3x3 convolutions: no 8x8 seams; with the two above, +1.3 to
    # +3.3 dB on all four visible bench sets (bench/quality.py, README "Model quality")
    "decoder_head": "conv",
}


def _presets() -> dict[str, Preset]:
    minilm_words = dict(lm_name="sentence-transformers/all-MiniLM-L6-v2", vocab="words", **RECIPE)
    return {
        "paper": Preset(
            ModelConfig(),
            TrainConfig(),
            "the reference: ViT-B/16 at 256px, roberta-base, batch 512, 100 epochs",
        ),
        "base": Preset(
            ModelConfig(vocab="words", **RECIPE),
            TrainConfig(batch_size=256, epochs=50),
            "ViT-B/16 at 256px, roberta-base, word vocabulary, batch 256",
        ),
        "small": Preset(
            ModelConfig(
                image_size=128, patch_size=16, encoder_width=384, encoder_depth=6, encoder_heads=6,
                decoder_width=384, decoder_depth=6, decoder_heads=6, **minilm_words,
            ),
            TrainConfig(batch_size=128, epochs=50, base_lr=5e-4, sample_every=250, save_every=500),
            "ViT-S/16 at 128px over MiniLM-L6; one consumer GPU",
        ),
        "tiny": Preset(
            ModelConfig(
                image_size=32, patch_size=8, encoder_width=128, encoder_depth=2, encoder_heads=4,
                # decoding a 16-token code needs more than the encoder: +1.3 dB over 128 wide x 2 deep
                decoder_width=256, decoder_depth=4, decoder_heads=8, **minilm_words,
                # 8 view-invariant global words first: with 4, 5-way overlap +9.6 to +17 points and the
                # probe up to +14.5 on the four bench sets, PSNR -0.07 to +0.30 dB; 8 add +4.3 points
                # of overlap and +6.2 of probe on the digits at -0.03 dB (README "Model quality")
                global_tokens=8,
            ),
            TrainConfig(
                batch_size=32,  # twice the steps of batch 64 in the same time: +0.5 dB on the bench
                steps=1200,
                base_lr=4e-3,  # peak lr 5e-4 at batch 32
                warmup_fraction=0.05,
                weight_decay=0.05,
                # crops of 40-100% of the image (DINO's global crops), not 20-100%: PSNR +0.89 / -0.01 /
                # 0.00 / +0.15 dB on digits / photos / shapes / edges, 5-way overlap +4.3 / -5.0 / +7.0 /
                # -8.4 points: the global words of digits and shapes agree more within a class, those
                # of the texture crops less (README "Model quality", round six)
                crop_scale_min=0.4,
                log_every=10,
                sample_every=100,
                save_every=100,
                val_every=100,
            ),
            "32px, 4x4 patches of 8px over MiniLM-L6; trains on 2 CPU cores in minutes",
        ),
    }


PRESETS: dict[str, Preset] = _presets()


def get_preset(name: str) -> Preset:
    """Return a fresh copy of a named preset; unknown names list the known ones."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    preset = PRESETS[name]
    return Preset(dataclasses.replace(preset.model), dataclasses.replace(preset.train), preset.summary)


def apply_overrides(preset: Preset, pairs: list[str]) -> Preset:
    """Apply `field=value` strings to a preset's ModelConfig or TrainConfig (values parse as JSON
    when they can: `mask_ratio=0.3`, `mask_ratio_min=null`, `encoder_output=unit`); unknown fields
    are answered with the known ones."""
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    model, train = {}, {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"expected FIELD=VALUE, got {pair!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        if key in model_fields:
            model[key] = value
        elif key in train_fields:
            train[key] = value
        else:
            raise ConfigError(
                f"unknown config field {key!r}; model fields: {', '.join(sorted(model_fields))}; "
                f"training fields: {', '.join(sorted(train_fields))}"
            )
    try:
        return Preset(dataclasses.replace(preset.model, **model), dataclasses.replace(preset.train, **train), preset.summary)
    except TypeError as exc:
        raise ConfigError(f"bad override: {exc}") from exc


def configure(preset: str, overrides: Sequence[str] = (), **options: Any) -> Preset:
    """What `lqae train` trains: the named preset, then `field=value` overrides (`--set`), then the
    named options that are not None (each a ModelConfig or TrainConfig field, e.g. lm_name=...,
    steps=...). Epochs without steps train by epochs: the preset's step count is dropped."""
    chosen = apply_overrides(get_preset(preset), list(overrides))
    given = {name: value for name, value in options.items() if value is not None}
    if "epochs" in given and "steps" not in given:
        given["steps"] = None
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(given) - model_fields - train_fields)
    if unknown:
        raise ConfigError(f"unknown config field {unknown[0]!r}")
    return Preset(
        dataclasses.replace(chosen.model, **{k: v for k, v in given.items() if k in model_fields}),
        dataclasses.replace(chosen.train, **{k: v for k, v in given.items() if k in train_fields}),
        chosen.summary,
    )


# What `--resume` may change: bookkeeping that leaves the weights a run produces as they are.
RESUME_CHANGES = frozenset({
    "steps", "epochs", "num_workers", "log_every", "sample_every", "save_every", "val_every", "compile",
    "search_chunk_tokens",
})
_FILLED_AT_TRAINING = frozenset({"lm_vocab_size", "lm_width", "codebook_size"})


def asked_fields(overrides: Sequence[str] = (), **options: Any) -> set[str]:
    """The config fields a command line chose: `--set` keys and the options that are not None
    (`configure`'s rule included: epochs without steps chooses steps too)."""
    asked = {pair.partition("=")[0].strip() for pair in overrides}
    asked |= {name for name, value in options.items() if value is not None}
    if "epochs" in asked:
        asked.add("steps")
    return asked


def resumed_configs(
    saved_model: "ModelConfig", saved_train: "TrainConfig | None", model: "ModelConfig", train: "TrainConfig",
    asked: set[str] | None = None,
) -> tuple["ModelConfig", "TrainConfig"]:
    """What a resumed run continues with: the saved configs, with the fields of RESUME_CHANGES
    taken from the request. Any other field the request chose (`asked`; every field when None) that
    differs from the saved run is refused: one ConfigError lists each difference."""
    refused, changes = [], {}
    for saved, requested in ((saved_model, model), (saved_train, train)):
        if saved is None:  # a checkpoint saved without its training config: the request's stands
            continue
        for field in dataclasses.fields(saved):
            name = field.name
            if name in _FILLED_AT_TRAINING or (asked is not None and name not in asked):
                continue
            old, new = getattr(saved, name), getattr(requested, name)
            if old == new or (name == "steps" and new is None and asked is None):  # None: the saved count
                continue
            if name in RESUME_CHANGES:
                changes[name] = new
            else:
                refused.append(f"{name} (trained with {old!r}, asked {new!r})")
    if refused:
        raise ConfigError(
            "--resume continues a run with the configuration it was trained with, and these options differ: "
            + ", ".join(refused) + "; drop them to resume, or train a new run with another --out"
        )
    model_changes = {k: v for k, v in changes.items() if k in {f.name for f in dataclasses.fields(ModelConfig)}}
    train_changes = {k: v for k, v in changes.items() if k not in model_changes}
    resumed_train = dataclasses.replace(saved_train, **train_changes) if saved_train is not None else train
    return dataclasses.replace(saved_model, **model_changes), resumed_train


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Build a config, rejecting unknown keys so a corrupt or foreign config.json fails loudly."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} fields in config: {', '.join(unknown)}")
    return cls(**data)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write JSON with sorted keys atomically (temp file + rename)."""
    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())
