"""The CUDA paths, on a GPU: bf16 training through the pinned-memory loader, encoding with workers,
the throughput bench. Skipped without a GPU; `bench/gpu_check.sh` runs them (`pytest -m cuda`)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_model_config, tiny_train_config
from lqae.checkpoint import load_model
from lqae.presets import Preset
from lqae.codec import encode_images
from lqae.images.files import scan_image_folder
from lqae.training import train

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from throughput import measure  # noqa: E402

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_bf16_training_on_cuda_with_workers_and_pinned_memory(tiny_lm_dir, image_folder, tmp_path):
    config = tiny_train_config(steps=3, precision="bf16", num_workers=2, batch_size=4)
    result = train(image_folder, tmp_path / "run", tiny_model_config(tiny_lm_dir), config, device="cuda")
    assert result.step == 3 and torch.isfinite(torch.tensor(result.last_metrics["loss"]))
    assert all(t.dtype == torch.float32 for t in load_file(tmp_path / "run" / "model.safetensors").values())


def test_encoding_on_cuda_with_workers_gives_the_ids_without(tiny_checkpoint, image_folder):
    paths = scan_image_folder(image_folder).paths
    gpu = load_model(tiny_checkpoint, "cuda", encode_only=True)
    by_workers = {w: torch.cat([ids for _, ids in encode_images(gpu, paths, 4, workers=w)]) for w in (0, 2)}
    assert torch.equal(by_workers[0], by_workers[2])
    cpu = torch.cat([ids for _, ids in encode_images(load_model(tiny_checkpoint, encode_only=True), paths, 4)])
    assert (cpu == by_workers[0]).float().mean() >= 0.9  # cuDNN may round convolutions differently


def test_throughput_bench_on_cuda_reports_mfu(tiny_lm_dir):
    result = measure(Preset(tiny_model_config(tiny_lm_dir), tiny_train_config()), 8, "cuda", "bf16", steps=2, warmup=1, peak_tflops=100.0,
                     matmul_side=1024, breakdown_repeats=1)
    assert result["mfu"] > 0 and result["peak_memory_gb"] > 0 and result["images_per_s"] > 0
