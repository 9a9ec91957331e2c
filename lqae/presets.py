"""Named presets, and what a command line does to them: `--set` overrides and options by field path
(`mask.ratio`, or `mask_ratio` as a keyword), and what `--resume` may change. Nothing here imports torch."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Sequence

from lqae.config import GROUPS, Masking, ModelConfig, TrainConfig, flat_dict, from_dict, to_dict
from lqae.errors import ConfigError


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


# -- fields by path: --set, options, --resume ----------------------------------------------------


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


# What `--resume` may change: bookkeeping that leaves the weights a run produces as they are, and
# the three ways out of a diverged run that the NaN error names (a lower lr, clipping, fp32).
RESUME_CHANGES = frozenset({
    "steps", "epochs", "num_workers", "log_every", "sample_every", "save_every", "val_every", "compile",
    "base_lr", "grad_clip", "precision",
})
_FILLED_AT_TRAINING = frozenset({"lm_vocab_size", "lm_width", "codebook_size"})


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
