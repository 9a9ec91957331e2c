"""Linear probe (LQAE paper, linear classification): frozen features -> LayerNorm + Linear.

Features of an image: its code ids run through the frozen LM with no masking, every chosen hidden
state mean-pooled over tokens, the chosen layers concatenated (optionally encoder layers too).
Features are computed once per split and cached in memory; only the head trains. The same head is
trained on two baselines so the number means something: raw pixels at the model's resolution, and
the same architecture with a freshly initialised (seeded) encoder feeding the same frozen LM.

Modules: `config` (ProbeConfig, baselines, progress callback), `layers` (--layers selectors),
`splits` (labelled image folders / token datasets), `features` (LM, encoder and pixel features,
the random encoder), `head` (the head, its training and scores), `run` (the whole protocol),
`saved` (save, load and apply a trained probe). torch loads only with the modules that need it.
"""

from __future__ import annotations

from lqae.lazy import lazy_exports

_LAZY = {  # submodule -> the public names it provides: the one list of this package's names
    "lqae.probe.config": ("BASELINES", "ProbeConfig", "ProgressCallback"),
    "lqae.probe.layers": ("LAYER_GROUPS", "feature_dim", "layer_counts", "parse_layers", "uses_encoder"),
    "lqae.probe.splits": ("ProbeSplit", "load_split", "match_classes"),
    "lqae.probe.features": ("extract_features", "pixel_features", "random_encoder"),
    "lqae.probe.head": ("ProbeHead", "ProbeScores", "accuracy", "head_logits", "score_head", "train_head"),
    "lqae.probe.run": ("ProbeReport", "run_probe"),
    "lqae.probe.saved": ("PROBE_FORMAT", "LoadedProbe", "ProbePrediction", "apply_probe", "load_probe", "save_probe"),
}

__all__, __getattr__ = lazy_exports(__name__, _LAZY)
