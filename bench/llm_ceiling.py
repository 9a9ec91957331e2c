"""Can an LLM read token text at all? Synthetic few-shot episodes with controlled within-class consistency.

Each class gets a signature: `--tokens` words drawn from the LM's word vocabulary. An image of
consistency level c takes round(c x tokens) of its words from its class's signature (the same
positions of it) and the rest at random; `--shuffled` also shuffles each image's words, so only
the bag of words carries the class. Supports and queries are drawn like `lqae fewshot`'s episodes
and run through any `--llm` (the completion template, default scoring and calibration), so a user
sees, before paying for an evaluation on real tokens, at which consistency the LLM starts to copy.
Level 1.0 unshuffled is a query word-for-word identical to its class's supports; level 0 is no
signal at all (chance).

Usage: python bench/llm_ceiling.py [--llm overlap|hf:NAME|openai:MODEL] [--levels 0,0.25,0.5,0.75,1]
                                   [--ways 5] [--shots 1] [--episodes 100] [--tokens 16] [--shuffled]
                                   [--no-calibrate] [--order random|similar-last]
                                   [--lm sentence-transformers/all-MiniLM-L6-v2] [--seed 0]
One JSON line per level on stderr, one JSON object (every level) as the last line of stdout.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time

from lqae.fewshot.backends import BackendOptions, make_backend
from lqae.fewshot.episodes import TokenPool
from lqae.fewshot.evaluation import evaluate_episodes
from lqae.fewshot.prompts import load_template
from lqae.fewshot.settings import FewshotSettings
from lqae.model.lm import load_tokenizer
from lqae.model.vocab import select_token_ids

LABELS = ("cat", "dog", "horse", "bird", "fish", "frog", "sheep", "bear", "lion", "mouse")
IMAGES_PER_CLASS = 20  # support pool and query pool each


def synthetic_pools(word_ids: list[int], level: float, ways: int, tokens: int, shuffled: bool, seed: int):
    """(support pool, query pool) of `ways` classes at one consistency level; deterministic."""
    rng = random.Random(f"llm-ceiling:{seed}")  # the same signatures at every level
    signatures = [rng.sample(word_ids, tokens) for _ in range(ways)]
    rng = random.Random(f"llm-ceiling:{seed}:{level}:{shuffled}")
    kept = round(level * tokens)

    def image(label: int) -> list[int]:
        positions = set(rng.sample(range(tokens), kept))
        ids = [signatures[label][i] if i in positions else rng.choice(word_ids) for i in range(tokens)]
        if shuffled:
            rng.shuffle(ids)
        return ids

    pools = []
    for role in ("support", "query"):
        ids, labels, paths = [], [], []
        for label in range(ways):
            for index in range(IMAGES_PER_CLASS):
                ids.append(image(label))
                labels.append(label)
                paths.append(f"{role}/{LABELS[label]}/{index:03d}")
        pools.append(TokenPool(ids, labels, list(LABELS[:ways]), paths, "synthetic"))
    return pools


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llm", default="overlap", help="as `lqae fewshot --llm` (default overlap)")
    parser.add_argument("--levels", default="0,0.25,0.5,0.75,1", help="consistency levels, comma-separated")
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--episodes", type=int, default=100, help="episodes per level")
    parser.add_argument("--tokens", type=int, default=16, help="words per image")
    parser.add_argument("--shuffled", action="store_true", help="shuffle each image's words (a bag of words)")
    parser.add_argument("--lm", default="sentence-transformers/all-MiniLM-L6-v2", help="whose words the images use")
    parser.add_argument("--api-base", default=None, help="openai: the server's base URL")
    parser.add_argument("--calibrate", action=argparse.BooleanOptionalAction, default=None,
                        help="as `lqae fewshot` (default: on for an LLM's loglik scoring)")
    parser.add_argument("--order", default="random", help="as `lqae fewshot`: random or similar-last")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not 2 <= args.ways <= len(LABELS):
        raise SystemExit(f"--ways must be 2..{len(LABELS)}")
    levels = [float(x) for x in args.levels.split(",") if x.strip()]
    if any(not 0 <= level <= 1 for level in levels):
        raise SystemExit("--levels must lie in [0, 1]")

    tokenizer = load_tokenizer(args.lm)
    word_ids = select_token_ids(tokenizer, len(tokenizer), "words")
    backend = make_backend(args.llm, BackendOptions(api_base=args.api_base))
    template = load_template("completion")
    settings = FewshotSettings(ways=args.ways, shots=args.shots, episodes=args.episodes, seed=args.seed,
                               calibrate=args.calibrate, order=args.order)
    result = {"llm": args.llm, "calibrate": args.calibrate, "order": args.order, "ways": args.ways, "shots": args.shots,
              "episodes": args.episodes,
              "tokens": args.tokens, "shuffled": args.shuffled, "chance": round(1 / args.ways, 4), "levels": {}}
    started = time.perf_counter()
    for level in levels:
        support, query = synthetic_pools(word_ids, level, args.ways, args.tokens, args.shuffled, args.seed)
        summary = evaluate_episodes(support, query, backend, template, settings, tokenizer)
        row = {"accuracy": round(summary.accuracy, 4), "interval": [round(x, 4) for x in summary.interval],
               "seconds_per_episode": round(summary.seconds_per_episode, 3),
               "mean_prompt_tokens": round(summary.mean_prompt_tokens or 0, 1)}
        result["levels"][str(level)] = row
        print(json.dumps({"level": level, **row}), file=sys.stderr, flush=True)
    result["total_seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
