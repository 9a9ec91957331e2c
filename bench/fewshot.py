"""Few-shot speed: seconds per N-way K-shot episode with and without prefix key/value reuse.

Prints one JSON line: seconds per episode both ways, the speed-up, prompt tokens per episode and
per image (LLM tokens of one image's token text), and whether both paths predicted the same labels.

    python bench/fewshot.py --model runs/digits --support data/digits/train --query data/digits/val
    OMP_NUM_THREADS=1 python bench/fewshot.py ...   # on a busy CPU, one thread is often faster
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import torch

from lqae.fewshot.backends import DEFAULT_HF_MODEL, BackendOptions, make_backend
from lqae.fewshot.episodes import sample_episode
from lqae.fewshot.evaluation import evaluate_episodes
from lqae.fewshot.image_text import PromptImageText
from lqae.fewshot.prompts import load_template
from lqae.fewshot.run import Sources
from lqae.fewshot.settings import FewshotSettings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/digits", help="LQAE checkpoint (to encode image folders)")
    parser.add_argument("--support", default="data/digits/train")
    parser.add_argument("--query", default="data/digits/val")
    parser.add_argument("--llm", default=f"hf:{DEFAULT_HF_MODEL}", help="hf:NAME_OR_PATH (default: SmolLM2-135M)")
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--episodes", type=int, default=5, help="timed episodes per path")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    sources = Sources(args.model, args.device, lambda message: None)
    support, query = sources.pool(args.support, "support"), sources.pool(args.query, "query")
    tokenizer = sources.tokenizer(support.lm_name)
    llm = args.llm
    started = time.perf_counter()
    backend = make_backend(llm, BackendOptions(device=args.device))
    load_seconds = time.perf_counter() - started
    template = load_template("completion")
    # the settings this figure was first measured with: no calibration, supports as drawn
    settings = FewshotSettings(ways=args.ways, shots=args.shots, episodes=1, seed=args.seed + 1000, calibrate=False,
                               order="random")
    evaluate_episodes(support, query, backend, template, settings, tokenizer)  # warm-up, untimed

    timed = replace(settings, episodes=args.episodes, seed=args.seed)
    results = {}
    for reuse in (True, False):
        backend.reuse_prefix = reuse
        backend.clear_cache()
        records = []
        started = time.perf_counter()
        summary = evaluate_episodes(
            support, query, backend, template, timed, tokenizer, on_result=lambda r, *_: records.append(r)
        )
        results[reuse] = (time.perf_counter() - started) / args.episodes, summary, records

    images = set()
    for index in range(args.episodes):
        episode = sample_episode(support, query, args.ways, args.shots, args.seed, index)
        images |= {("s", i) for i in episode.supports} | {("q", episode.query)}
    text = PromptImageText(tokenizer, settings.image_text)
    per_image = [
        backend.count_text(" " + text((support if side == "s" else query).ids[i])) for side, i in sorted(images)
    ]
    fast, slow = results[True], results[False]
    print(json.dumps({
        "bench": "fewshot", "llm": llm, "ways": args.ways, "shots": args.shots, "episodes": args.episodes,
        "sec_per_episode_reuse": round(fast[0], 3), "sec_per_episode_naive": round(slow[0], 3),
        "speedup": round(slow[0] / fast[0], 2), "prompt_tokens_per_episode": round(fast[1].mean_prompt_tokens, 1),
        "prompt_tokens_per_image": round(sum(per_image) / len(per_image), 2),
        "lqae_tokens_per_image": support.tokens_per_image,
        "same_predictions": [r["predicted"] for r in fast[2]] == [r["predicted"] for r in slow[2]],
        "max_score_diff": max(abs(a - b) for r, q in zip(fast[2], slow[2]) for a, b in zip(r["scores"].values(), q["scores"].values())),
        "llm_load_seconds": round(load_seconds, 1), "threads": torch.get_num_threads(), "device": args.device,
    }, sort_keys=True))


if __name__ == "__main__":
    main()
