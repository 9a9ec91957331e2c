"""bench/gpu_check.sh (the check to run on a GPU) and bench/throughput.py, the parts a CPU can check."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import tiny_model_config, tiny_train_config
from lqae.presets import Preset
from lqae.model import LQAE
from lqae.model.vocab import select_token_ids

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.sh"
sys.path.insert(0, str(REPO / "bench"))

from throughput import StandInTokenizer, measure  # noqa: E402


def test_gpu_check_script_parses_and_asks_for_the_peak():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    done = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.startswith("usage: bash bench/gpu_check.sh PEAK_BF16_TFLOPS")


@pytest.mark.slow
def test_gpu_check_runs_every_step_at_toy_size_on_cpu(tmp_path):
    """Every step of the GPU check, tiny and on CPU: each bench ends in one JSON object."""
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(SCRIPT), "--cpu-smoke", str(tmp_path)], capture_output=True, text=True,
                          env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads(line) for line in (tmp_path / "gpu_check.jsonl").read_text().splitlines()]
    assert [r["bench"] for r in results] == [
        "cuda_tests", "throughput", "throughput", "torchrun_nproc_per_node_1", "encode_workers",
    ]
    eager, compiled = results[1], results[2]
    assert not eager["compile"] and compiled["compile"] and eager["mfu"] > 0
    assert results[3]["train_steps"] == 2 and results[3]["encoded_rows"] == 24
    assert all(cell["same_ids"] for cell in results[4]["cells"])


def test_throughput_bench_counts_forward_and_backward_and_splits_the_step(tiny_lm_dir, single_thread):
    config = tiny_model_config(tiny_lm_dir)
    result = measure(Preset(config, tiny_train_config()), batch_size=4, steps=2, warmup=1, peak_tflops=1.0,
                     matmul_side=64, breakdown_repeats=1)
    torch.manual_seed(0)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        LQAE(config).train()(torch.rand(4, 3, 16, 16))  # the reference: the LM's backward is counted too
    forward_per_image = counter.get_total_flops() / 4 / 1e9
    assert result["gflops_per_image"] >= 2 * forward_per_image > 0  # backward counted too
    parts = result["gflops_per_image_by_part"]
    assert parts["lm"] > 0 and parts["encoder"] > 0 and parts["decoder"] > 0  # the frozen LM is in the count
    assert sum(parts.values()) <= result["gflops_per_image"] * 1.0001
    assert set(result["breakdown_s"]) == {"encoder", "search", "lm", "decoder", "optimizer"}
    assert result["other_s"] == pytest.approx(result["step_s"] - sum(result["breakdown_s"].values()), abs=1e-3)
    assert result["achieved_tflops"] > 0 and result["utilisation_vs_matmul"] > 0 and result["mfu"] > 0
    # step_s is rounded to 0.1 ms: at a few ms a step that rounding alone moves 4 / step_s by over 1%
    low, high = 4 / (result["step_s"] + 5e-5), 4 / max(result["step_s"] - 5e-5, 1e-9)
    assert low * 0.999 <= result["images_per_s"] <= high * 1.001
    assert result["peak_memory_gb"] > 0


def test_the_stand_in_vocabulary_gives_roberta_base_shapes():
    tokenizer = StandInTokenizer()
    assert len(tokenizer) == 50265 and tokenizer.mask_token_id == 50264
    words = select_token_ids(tokenizer, 50265, "words")
    assert len(words) == 50265 - 5 and 0 not in words and 50264 not in words
    assert len(set(tokenizer.tokens)) == len(tokenizer.tokens)
