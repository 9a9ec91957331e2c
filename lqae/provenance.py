"""Provenance: token ids mean something only to the LM and the weights that wrote them. The checks
`lqae decode`, `probe` and `fewshot` make before they read ids that another run wrote."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from lqae import legacy
from lqae.config import to_dict
from lqae.errors import CheckpointError, TokenError

if TYPE_CHECKING:
    from lqae.tokendata import TokenDataset

log = logging.getLogger(__name__)


def check_compatible(
    dataset: TokenDataset, model, source: str | Path = "the token dataset", allow_foreign: bool = False
) -> None:
    """Raise when `model` cannot decode the dataset's ids or other weights wrote them; warn when
    another config wrote them."""
    fix = "decode it with the model that wrote it"
    check_ids_fit(dataset.model_config, dataset.ids.shape[1], model.config, source, fix)
    check_same_weights(dataset.weights, model.weights_fingerprint, source, "this model's", fix, allow_foreign)


def check_same_weights(
    written: str | None, current: str | None, source: str | Path, current_name: str, fix: str, allow_foreign: bool
) -> None:
    """Token ids are bound to the weights that wrote them: two checkpoints of one config give
    unrelated ids for the same image. Raise when both fingerprints are known and differ (a warning
    with `allow_foreign`); files from before fingerprints were recorded are not checked."""
    if not written or not current or written == current:
        return
    message = f"{source} was encoded by other weights (fingerprint {written}) than {current_name} ({current})"
    if allow_foreign:
        log.warning("%s; using it anyway (--allow-foreign-tokens)", message)
        return
    raise TokenError(f"{message}: {fix}, or pass --allow-foreign-tokens if you know why they match")


def check_ids_fit(written: dict, length: int, config, source: str | Path, fix: str) -> None:
    """Token ids written by a model with config `written` (a dict) mean something to the model of
    `config` only when both share the LM (vocabulary and width) and the sequence length. Raise when
    they do not (the message ends with `fix`); warn when other config fields differ."""
    current = to_dict(config)
    written, _ = legacy.upgrade_model(written)  # an older lqae's fields, mapped as for its checkpoints
    lm_written = (written.get("lm_vocab_size"), written.get("lm_width"))
    lm_current = (current.get("lm_vocab_size"), current.get("lm_width"))
    if None not in lm_written and None not in lm_current and lm_written != lm_current:
        raise CheckpointError(
            f"{source} holds ids of LM {written.get('lm_name')!r} (vocab {lm_written[0]} x width {lm_written[1]}); "
            f"this model uses {config.lm_name!r} (vocab {lm_current[0]} x width {lm_current[1]}): {fix}"
        )
    if length != config.num_tokens:
        raise TokenError(
            f"{source} holds {length} tokens per image, this model expects {config.num_tokens} "
            f"({config.layout.describe()}): {fix}"
        )
    differing = sorted(k for k in set(written) | set(current) if written.get(k) != current.get(k))
    if differing:
        log.warning(
            "%s was written by a model with a different config (%s); using it anyway", source, ", ".join(differing[:5])
        )
