"""Images as token ids in pools, and N-way K-shot episodes drawn from them (Frozen / mini-ImageNet protocol).

Episode i is a pure function of (seed, i) and the two pools, so a rerun, a longer run or a resumed
run sees exactly the same episodes.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

from lqae.errors import ConfigError, DataError
from lqae.layout import NO_LAYOUT, TokenLayout

# Nonsense labels for the "open" variant of the protocol (Frozen used "dax" and "blicket").
OPEN_LABELS = (
    "dax", "blicket", "wug", "toma", "fep", "zorp", "kiki", "bouba", "glorp", "mib",
    "tufa", "gazzer", "jop", "pilk", "rask", "vorn", "quib", "snerd", "lupe", "tesh",
)


@dataclass
class TokenPool:
    """Images as LQAE token ids with class labels: the support or the query side of a run."""

    ids: list[list[int]]  # (N, L) LM token ids per image
    labels: list[int]  # class index per image, -1 when unlabelled
    classes: list[str]  # class names (folder names), index = label
    paths: list[str]  # source image of each row
    lm_name: str  # the LM whose tokenizer turns ids into token text
    weights: str | None = None  # fingerprint of the LQAE weights that wrote the ids, when known
    global_tokens: int = 0  # how many of each row's ids are global tokens (they come first)

    @property
    def layout(self) -> TokenLayout:
        """Each row's token layout: its global words, then its patch words."""
        return TokenLayout.of(self.global_tokens, self.tokens_per_image)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def tokens_per_image(self) -> int:
        return len(self.ids[0]) if self.ids else 0

    def class_name(self, index: int) -> str:
        return self.classes[self.labels[index]]

    def digest(self) -> str:
        """A short id of the pool's content: ids, labels, classes and paths."""
        content = json.dumps([self.ids, self.labels, self.classes, self.paths], separators=(",", ":"))
        return hashlib.sha256(content.encode()).hexdigest()[:16]

    def indices_by_class(self) -> dict[str, list[int]]:
        groups: dict[str, list[int]] = {name: [] for name in self.classes}
        for index, label in enumerate(self.labels):
            if label >= 0:
                groups[self.classes[label]].append(index)
        return groups


def pool_from_dataset(dataset, source: str, need_classes: bool = True) -> TokenPool:
    """A TokenPool from a `TokenDataset`; support and query sides need class sub-folders."""
    if need_classes and not dataset.classes:
        raise DataError(f"{source} has no classes: it needs one sub-folder per class (the folder name is the label)")
    lm_name = str(dataset.model_config.get("lm_name", ""))
    return TokenPool(
        ids=dataset.ids.tolist(), labels=dataset.labels.tolist(), classes=list(dataset.classes),
        paths=[str(p) for p in dataset.paths], lm_name=lm_name, weights=dataset.weights,
        global_tokens=dataset.global_tokens,
    )


@dataclass(frozen=True)
class Episode:
    """One N-way K-shot episode: pool indices, class names, and the labels the LLM is shown."""

    index: int
    classes: tuple[str, ...]  # the N classes, in the order the instruction lists them
    shown: tuple[str, ...]  # label shown for each class: the class name, or a nonsense word ("open")
    supports: tuple[int, ...]  # support-pool indices in prompt order (one block; repeats are added at render)
    query: int  # query-pool index
    target: str  # class name of the query


def episode_classes(support: TokenPool, query: TokenPool, shots: int, same_pool: bool) -> list[str]:
    """Classes with a query image and enough support images for `shots`, sorted by name."""
    support_groups, query_groups = support.indices_by_class(), query.indices_by_class()
    need = shots + (1 if same_pool else 0)  # the query image is never its own support
    return sorted(c for c in support_groups if len(support_groups[c]) >= need and query_groups.get(c))


def check_episode_setup(support: TokenPool, query: TokenPool, ways: int, shots: int) -> list[str]:
    """The eligible classes, or a ConfigError saying why N-way K-shot episodes cannot be drawn."""
    if ways < 2:
        raise ConfigError(f"--ways must be at least 2, got {ways}")
    if shots < 1:
        raise ConfigError(f"--shots must be at least 1, got {shots}")
    same_pool = _shares_images(support, query)
    eligible = episode_classes(support, query, shots, same_pool)
    if len(eligible) < ways:
        counts = {c: len(v) for c, v in support.indices_by_class().items()}
        shared = sorted(set(support.classes) & set(query.classes))
        raise ConfigError(
            f"{ways}-way {shots}-shot episodes need {ways} classes with a query image and {shots} support image(s); "
            f"only {len(eligible)} qualify ({', '.join(eligible) or 'none'}). Classes in both folders: "
            f"{', '.join(shared) or 'none'}; support images per class: "
            + ", ".join(f"{c} {n}" for c, n in sorted(counts.items()))
        )
    return eligible


def sample_episode(
    support: TokenPool, query: TokenPool, ways: int, shots: int, seed: int, index: int,
    eligible: Sequence[str] | None = None, open_labels: bool = False,
) -> Episode:
    """Episode `index` of the run with `seed`: N classes, K supports each, one query from one of them."""
    if eligible is None:
        eligible = check_episode_setup(support, query, ways, shots)
    if open_labels and ways > len(OPEN_LABELS):
        raise ConfigError(f"--labels open has {len(OPEN_LABELS)} nonsense words; {ways} ways need more")
    rng = random.Random(f"lqae-fewshot:{seed}:{index}")
    classes = rng.sample(list(eligible), ways)
    target = rng.choice(classes)
    query_index = rng.choice(query.indices_by_class()[target])
    query_path = query.paths[query_index]
    groups = support.indices_by_class()
    chosen = []
    for name in classes:
        candidates = [i for i in groups[name] if support.paths[i] != query_path]
        chosen += rng.sample(candidates, shots)
    rng.shuffle(chosen)
    shown = tuple(rng.sample(OPEN_LABELS, ways)) if open_labels else tuple(classes)
    return Episode(index, tuple(classes), shown, tuple(chosen), query_index, target)


def labelling_supports(support: TokenPool, shots: int | None, seed: int) -> list[int]:
    """Support images for classifying new queries: `shots` per class (all when None), interleaved at random."""
    rng = random.Random(f"lqae-fewshot-predict:{seed}")
    chosen = []
    for name, indices in support.indices_by_class().items():
        if not indices:
            continue
        chosen += rng.sample(indices, min(shots, len(indices))) if shots else list(indices)
    if not chosen:
        raise DataError("the support set has no labelled images (it needs one sub-folder per class)")
    rng.shuffle(chosen)
    return chosen


def shared_tokens(a: Counter, b: Counter) -> float:
    """Token overlap of two images: the size of the multiset intersection of their ids (bags from
    `token_bag` count a global word `global_weight` times)."""
    return sum((a & b).values())


def token_bag(ids: Sequence[int], layout: TokenLayout = NO_LAYOUT, global_weight: float = 1.0) -> Counter:
    """An image's ids as the multiset overlap compares; its global words (the layout's first ids)
    count `global_weight` times each, the patch words once."""
    global_ids, patch_ids = layout.split(list(ids))
    bag = Counter(patch_ids)
    for token in global_ids:
        bag[token] += global_weight
    return bag


def letter_labels(count: int) -> list[str]:
    """A, B, C, ...: labels of one token in any tokenizer (`--labels letters`)."""
    if count > 26:
        raise ConfigError(f"--labels letters has 26 letters; {count} classes need more")
    return [chr(ord("A") + i) for i in range(count)]


def open_label_names(classes: Sequence[str], seed: int) -> list[str]:
    """Fixed nonsense words for `classes` (labelling with --labels open)."""
    if len(classes) > len(OPEN_LABELS):
        raise ConfigError(f"--labels open has {len(OPEN_LABELS)} nonsense words; {len(classes)} classes need more")
    return random.Random(f"lqae-fewshot-open:{seed}").sample(OPEN_LABELS, len(classes))


def _shares_images(support: TokenPool, query: TokenPool) -> bool:
    return bool(set(support.paths) & set(query.paths))
