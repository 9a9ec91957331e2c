"""Linear-probe feature extraction speed: seconds per 1,000 images from an image folder (load +
encoder + LM) and from its token dataset (LM only), plus the load-encoder-LM split of the image path.

Usage: python bench/probe.py RUN_DIR IMAGE_FOLDER [--layers lm] [--batch-size 64] [--images 512] [--repeats 3] [--threads N]
Prints one JSON object on its last line. Other processes on the machine inflate every figure: note the load.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from lqae.checkpoint import load_model
from lqae.images.batches import image_batches
from lqae.probe import ProbeSplit, extract_features, layer_counts, load_split, parse_layers

from _timing import best_time  # noqa: E402 (bench/ is on sys.path when run as a script)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("folder", type=Path, help="image folder with one sub-folder per class")
    parser.add_argument("--layers", default="lm")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--images", type=int, default=512, help="images timed (the first N of the folder)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = load_model(args.run_dir)
    layers = parse_layers(args.layers, layer_counts(model))
    full = load_split(args.folder)
    count = min(args.images, len(full))
    images = ProbeSplit(full.source, "images", full.paths[:count], full.labels[:count], full.classes)
    size = model.config.image_size

    def load_pixels() -> list[torch.Tensor]:
        return [batch for _, batch in image_batches(images.paths, size, args.batch_size)]  # each (b, 3, size, size)

    pixels = load_pixels()
    with torch.no_grad():
        ids = torch.cat([model.encode(batch) for batch in pixels])  # (count, N)
    tokens = ProbeSplit(full.source, "tokens", images.paths, images.labels, full.classes, ids)

    def encoder_only() -> None:
        with torch.no_grad():
            for batch in pixels:
                model.encode(batch)

    per_1000 = 1000 / count
    result = {
        "images": count, "layers": len(layers), "tokens_per_image": model.config.num_tokens,
        "threads": torch.get_num_threads(), "load_average_1min": os.getloadavg()[0],
        "images_s_per_1000": best_time(lambda: extract_features(model, images, layers, args.batch_size), args.repeats) * per_1000,
        "tokens_s_per_1000": best_time(lambda: extract_features(model, tokens, layers, args.batch_size), args.repeats) * per_1000,
        "image_loading_s_per_1000": best_time(load_pixels, args.repeats) * per_1000,
        "encoder_and_search_s_per_1000": best_time(encoder_only, args.repeats) * per_1000,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
