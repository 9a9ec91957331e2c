"""The training data loader on ImageNet-like JPEGs: images/s per worker, before and now, in one run.

"before" is the previous augmentation, kept here as the baseline: PIL RandomResizedCrop (bicubic) +
flip into float32 tensors, batched as floats. "now" is `lqae.training.data.TrainDataset`: JPEG draft-mode
decoding when the crop allows it, torch's uint8 bicubic resize, uint8 batches. Both read the same
files through `torch.utils.data.DataLoader` with the trainer's sampler; rounds alternate (before,
now, before, now, ...) so drift of a shared machine hits both alike, and the ratio is taken per round.

Usage: python bench/loader.py [--images 512] [--source 500x375] [--sizes 256,128,32] [--workers 1,2]
       [--rounds 3] [--batches 6] [--pin]
Prints one JSON object on its last line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lqae.images.files import open_rgb, resize_center_crop, scan_image_folder, to_tensor  # noqa: E402
from lqae.training.data import EpochBatchSampler, TrainDataset  # noqa: E402


def write_photos(root: Path, count: int, width: int, height: int, seed: int = 0) -> Path:
    """Photo-like JPEGs (quality 90): smooth gradients, edges and sensor noise, 10 class folders."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    for i in range(count):
        folder = root / f"class{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        fx, fy, phase = rng.uniform(4, 40), rng.uniform(4, 40), rng.uniform(0, 6.3)
        base = np.stack([np.sin(xs / fx + phase), np.cos(ys / fy), np.sin((xs + ys) / (fx + fy))], -1)
        pixels = 128 + 70 * base + rng.normal(0, 18, (height, width, 3))
        pixels[: height // 3, : width // 2] *= 0.5  # an edge
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i:06d}.jpg", quality=90)
    return root


class BeforeDataset(TrainDataset):
    """The augmentation as it was: PIL crop + bicubic resize + flip, float32 (3, S, S) in [0, 1]."""

    def __getitem__(self, item):
        index, seed = item
        rng = random.Random(seed)
        image = open_rgb(self.folder.paths[index])
        width, height = image.size
        area = width * height
        for _ in range(10):
            target_area = area * rng.uniform(*self.crop_scale)
            aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            w, h = round(math.sqrt(target_area * aspect)), round(math.sqrt(target_area / aspect))
            if 0 < w <= width and 0 < h <= height:
                left, top = rng.randint(0, width - w), rng.randint(0, height - h)
                image = image.resize((self.size, self.size), Image.BICUBIC, box=(left, top, left + w, top + h))
                break
        else:
            image = resize_center_crop(image, self.size)
        if self.hflip and rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        return to_tensor(image)


def images_per_second(dataset, images: int, batch_size: int, workers: int, batches: int, pin: bool) -> float:
    sampler = EpochBatchSampler(images, batch_size, seed=0)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers, pin_memory=pin)
    stream = iter(loader)
    for _ in range(max(1, workers)):  # warm-up: every worker started and has delivered once
        next(stream)
    started = time.perf_counter()
    for _ in range(batches):
        batch = next(stream)
        if pin:
            batch = batch.to("cuda", non_blocking=True).float()  # as the trainer does: floats on the device
    if pin:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    del stream
    return batches * batch_size / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--source", default="500x375", help="source JPEG size WxH (ImageNet's typical)")
    parser.add_argument("--sizes", default="256,128,32", help="output sides: base/paper 256, small 128, tiny 32")
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=6, help="timed batches per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="alternating before/now rounds per cell")
    parser.add_argument("--pin", action="store_true", help="pinned memory and a copy to cuda (needs a GPU)")
    args = parser.parse_args()
    width, height = map(int, args.source.lower().split("x"))
    work = Path(tempfile.mkdtemp(prefix="lqae-bench-loader-"))
    load_before = os.getloadavg()[0]
    try:
        folder = scan_image_folder(write_photos(work / "photos", args.images, width, height))
        cells = []
        for size in map(int, args.sizes.split(",")):
            for workers in map(int, args.workers.split(",")):
                before, now = [], []
                for _ in range(args.rounds):
                    for kind, store in ((BeforeDataset, before), (TrainDataset, now)):
                        store.append(images_per_second(kind(folder, size), len(folder), args.batch_size, workers,
                                                       args.batches, args.pin))
                ratios = [n / b for b, n in zip(before, now)]
                cells.append({
                    "size": size, "workers": workers,
                    "before_images_per_s": round(statistics.median(before), 1),
                    "now_images_per_s": round(statistics.median(now), 1),
                    "before_per_worker": round(statistics.median(before) / max(1, workers), 1),
                    "now_per_worker": round(statistics.median(now) / max(1, workers), 1),
                    "ratio_median": round(statistics.median(ratios), 2),
                    "ratio_min": round(min(ratios), 2), "ratio_max": round(max(ratios), 2),
                })
                print(json.dumps(cells[-1]), file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({
        "bench": "loader", "source": f"{width}x{height} JPEG q90", "images": args.images, "batch_size": args.batch_size,
        "pin_memory": args.pin, "cpus": os.cpu_count(), "load_avg_before": round(load_before, 2),
        "load_avg_after": round(os.getloadavg()[0], 2), "cells": cells,
    }))


if __name__ == "__main__":
    main()
