"""Features of a split: mean-pooled hidden states of the frozen LM (and encoder), raw pixels, and
the random-encoder baseline's freshly initialised encoder. Returned as (N, F) float32 on the CPU."""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from lqae.images.batches import image_batches
from lqae.layout import TokenLayout
from lqae.probe.config import ProgressCallback
from lqae.probe.layers import feature_dim, uses_encoder
from lqae.probe.splits import ProbeSplit, require_images
from lqae.model.vit import Encoder, Standardize, init_weights

CALIBRATION_IMAGES = 1024  # images that set the random encoder's output statistics


def random_encoder(model, seed: int, calibration: ProbeSplit | None = None, batch_size: int = 64) -> nn.Module:
    """The model's encoder architecture, freshly initialised (seeded, global RNG untouched). An
    output standardisation gets the model's target statistics and running statistics measured on
    (up to 1,024 of) the `calibration` images, as the trained encoder's were on its training data."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = Encoder(model.config)
        init_weights(encoder)
    encoder = encoder.to(model.device).eval()
    if isinstance(encoder.standardize, Standardize):
        trained = model.encoder.standardize
        encoder.set_output_target(trained.target_mean, trained.target_std)
        if calibration is not None:
            batches = image_batches(
                calibration.paths[:CALIBRATION_IMAGES], model.config.image_size, batch_size, model.device
            )
            encoder.calibrate_output(images for _, images in batches)
    return encoder


@torch.no_grad()
def extract_features(
    model,
    split: ProbeSplit,
    layers: list[str],
    batch_size: int = 64,
    encoder: nn.Module | None = None,
    progress: ProgressCallback | None = None,
    stage: str = "features",
) -> torch.Tensor:
    """(N, feature_dim) float32 on the CPU: the chosen hidden states, each mean-pooled over tokens
    (with global tokens: the global positions and the patch positions pooled apart, side by side,
    as a ViT probe reads the class token beside the mean patch).

    Token datasets feed their ids straight to the LM (no image is re-encoded) unless encoder layers
    or a replacement `encoder` (the random-encoder baseline) need the pixels.
    """
    model.eval()
    encoder = encoder if encoder is not None else model.encoder
    need_images = uses_encoder(layers) or encoder is not model.encoder or split.ids is None
    if need_images:
        require_images(split, "input", "encoder layers or the random-encoder baseline")
    selected = [(name.split(":")[0], int(name.split(":")[1])) for name in layers]
    features = torch.empty(len(split), feature_dim(model, layers), dtype=torch.float32)
    start = 0
    for ids, encoder_states in _token_batches(model, split, encoder, batch_size, need_images):
        stop = start + len(ids)
        lm_states = model.lm_hidden_states(ids) if any(s == "lm" for s, _ in selected) else ()
        pooled = [
            pool((lm_states if source == "lm" else encoder_states)[index].float(), model.layout)
            for source, index in selected
        ]
        features[start:stop] = torch.cat(pooled, dim=1).cpu()
        if progress:
            progress(stage, stop - start, len(split))
        start = stop
    return features


def pool(states: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """(B, L, D) hidden states -> (B, D) mean over tokens, or with global words in the sequence
    (B, 2D) [global mean, patch mean]. The encoder's hidden states hold the patches only."""
    if not layout.global_tokens or states.shape[1] != layout.length:
        return states.mean(dim=1)
    global_states, patch_states = layout.split(states, 1)
    return torch.cat([global_states.mean(dim=1), patch_states.mean(dim=1)], dim=1)


def _token_batches(
    model, split: ProbeSplit, encoder: nn.Module, batch_size: int, need_images: bool
) -> Iterator[tuple[torch.Tensor, tuple[torch.Tensor, ...]]]:
    """Per batch: LM ids (B, N) and the encoder's hidden states (each (B, N, W); none for a token
    dataset read as it is)."""
    if not need_images:
        for start in range(0, len(split), batch_size):
            yield split.ids[start : start + batch_size].to(model.device), ()
        return
    for _, images in image_batches(split.paths, model.config.image_size, batch_size, model.device):
        out = encoder(images)
        yield model.codebook(out.z).token_ids, out.hidden_states


def pixel_features(
    split: ProbeSplit, size: int, progress: ProgressCallback | None = None, stage: str = "pixels"
) -> torch.Tensor:
    """(N, 3 * size * size) raw pixels in [0, 1] at the model's resolution (eval transform)."""
    require_images(split, "input", "the pixels baseline")
    features = torch.empty(len(split), 3 * size * size, dtype=torch.float32)
    start = 0
    for chunk, images in image_batches(split.paths, size, 64):
        features[start : start + len(chunk)] = images.flatten(1)  # (b, 3 * size * size)
        start += len(chunk)
        if progress:
            progress(stage, len(chunk), len(split))
    return features
