"""Old `config.json` files, mapped onto today's configs in one place.

lqae 0.1.0 kept every experiment of its recipe rounds as a config field, and training settings
inside the model config. Since then the model config says what a checkpoint computes and the
training config how it was trained; the experiments that lost were deleted (their measured rows are
in docs/results.md with the commit that ran them). A checkpoint of 0.1.0 loads when it computes
what today's code computes: a removed option at another value than the one kept is refused with one
line naming it, for encoding and decoding where it changes what the weights compute, and for
`--resume` where it only changed how they were trained.
"""

from __future__ import annotations

from typing import Any, Callable

from lqae.errors import ConfigError

LAST_VERSION = "0.1.0"  # the last release that had the removed options

# model fields of 0.1.0 that are training settings now: old name -> path in TrainConfig
MOVED_TO_TRAIN = {
    "mask_ratio": "mask.ratio", "mlm_weight": "mask.mlm_weight", "commitment_weight": "commitment_weight",
    "invariance_weight": "distill.weight", "teacher_temperature": "distill.teacher_temperature",
    "student_temperature": "distill.student_temperature",
}
RENAMED_IN_TRAIN = {"teacher_momentum": "distill.teacher_momentum"}


def _reads_codes(model: dict) -> bool:
    return model.get("decoder_input", "lm") in ("lm_search", "search")


# Model fields (kept or removed) whose removed values change what the weights compute: field ->
# whether a config's value is one today's code computes (judged with the whole old model dict).
CHANGE_THE_MODEL: dict[str, Callable[[Any, dict], bool]] = {
    "encoder_output": lambda v, m: v != "unit",
    "search_space": lambda v, m: v not in ("latent", "mapped", "pca", "uniform"),
    "decoder_input": lambda v, m: v not in ("lm_skip", "embeddings"),
    "decoder_reads_global": lambda v, m: v is True,
}
# Removed fields that changed only how the weights were trained (each judged with the whole old
# model dict, after the moved fields were taken out of it); absent fields hold their kept value.
CHANGE_THE_TRAINING: dict[str, Callable[[Any, dict], bool]] = {
    "standardize_running": lambda v, m: v is False,
    "mask_ratio_min": lambda v, m: v is None,
    "commitment": lambda v, m: v == "mse",
    # the straight-through estimator follows the decoder input now: none where the decoder reads the codes
    "straight_through": lambda v, m: v == ("none" if _reads_codes(m) else "identity"),
    "usage_weight": lambda v, m: v == 0,
    "codebook_weight": lambda v, m: True,  # read only by the removed learned search spaces
    "global_balance": lambda v, m: v == "sinkhorn",
    "global_queue": lambda v, m: v == 0,
    "recon_weight": lambda v, m: v == 1.0,
    # the mask hides codes from the LM only now: the decoder reads every code's coordinates
    "decoder_reads_masked": lambda v, m: v is True or m.get("decoder_input", "lm") != "lm_search",
    "decoder_lm_zero_init": lambda v, m: True,  # how the weights started, not what they compute
}
IGNORED = ("soft_top_k", "soft_temperature", "usage_temperature", "usage_sample_tokens", "usage_top_k",
           "centre_momentum", "search_chunk_tokens", "latent_dim")
REMOVED_TRAIN = {"mask_warmup_fraction": 0.0, "mask_cooldown_fraction": 0.0, "min_lr_fraction": 0.0}


def upgrade(data: dict) -> tuple[dict, list[str]]:
    """A config.json's content in today's form, and the training-only options it used at removed
    values (a run that cannot be resumed as it was trained). ConfigError for a removed option that
    changes what the weights compute."""
    model, train = dict(data.get("model") or {}), data.get("train")
    if not isinstance(model, dict) or (train is not None and not isinstance(train, dict)):
        return data, []
    train = dict(train) if train is not None else None
    moved = {path: model.pop(name) for name, path in MOVED_TO_TRAIN.items() if name in model}
    upgraded_model, unresumable = upgrade_model(model, strict=True)
    if train is not None:
        moved.update({path: train.pop(name) for name, path in RENAMED_IN_TRAIN.items() if name in train})
        for name, kept in REMOVED_TRAIN.items():
            if name in train and train.pop(name) != kept:
                unresumable.append(name)
        for path, value in moved.items():
            group, _, name = path.rpartition(".")
            (train.setdefault(group, {}) if group else train)[name] = value
    return {**data, "model": upgraded_model, **({"train": train} if train is not None else {})}, unresumable


def upgrade_model(model: dict, strict: bool = False) -> tuple[dict, list[str]]:
    """An old model config dict in today's form (moved and removed fields dropped) and the removed
    training options it used at other values. `strict`: a removed option that changes what the
    weights compute is a ConfigError (without: the dict is returned as far as it maps)."""
    model = {k: v for k, v in model.items() if k not in MOVED_TO_TRAIN}
    if model.get("search_space") == "grid" and "latent_dim" in model:
        model["grid_dim"] = model["latent_dim"]
    for name, kept in CHANGE_THE_MODEL.items():
        if strict and name in model and not kept(model[name], model):
            raise ConfigError(
                f"this checkpoint was trained with {name}={model[name]!r}, an option removed after lqae "
                f"{LAST_VERSION}: load it with lqae {LAST_VERSION} (pip install lqae=={LAST_VERSION})"
            )
    unresumable = [name for name, kept in CHANGE_THE_TRAINING.items() if name in model and not kept(model[name], model)]
    drop = set(CHANGE_THE_TRAINING) | set(IGNORED) | {"decoder_reads_global"}
    return {k: v for k, v in model.items() if k not in drop}, unresumable
