"""Layer selectors (`--layers`): which hidden states become features, and how wide they are.

`lm` = every LM hidden state (embedding output = lm:0, then one per layer), `encoder` = every
encoder hidden state (patch embedding + position = enc:0, then one per block), `all` = both, or a
comma-separated list such as `lm:0,lm:-1,enc:2` (negative indices count from the last state; `lm`
and `encoder` may appear in the list as groups). Canonical names are `lm:I` / `enc:I`, I >= 0.
"""

from __future__ import annotations

from lqae.errors import ConfigError

LAYER_GROUPS = {"lm": ("lm",), "encoder": ("enc",), "enc": ("enc",), "all": ("lm", "enc")}


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
    """Features per image: each layer's width; an LM layer's twice with global words (they are pooled
    apart from the patches; the encoder's states hold the patches only)."""
    pools = 2 if model.layout.global_tokens else 1
    widths = {"lm": pools * int(model.lm.config.hidden_size), "enc": int(model.config.encoder_width)}
    return sum(widths[name.split(":")[0]] for name in layers)
