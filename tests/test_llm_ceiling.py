"""bench/llm_ceiling.py: synthetic episodes whose within-class consistency is set, run through a backend."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from llm_ceiling import synthetic_pools  # noqa: E402


def test_levels_set_how_many_words_an_image_shares_with_its_class():
    words = list(range(100, 400))
    support, query = synthetic_pools(words, 1.0, ways=3, tokens=8, shuffled=False, seed=0)
    by_class = {label: {tuple(ids) for ids, lab in zip(support.ids, support.labels) if lab == label} for label in range(3)}
    assert all(len(rows) == 1 for rows in by_class.values())  # level 1: every image is its class's signature
    assert {tuple(ids) for ids, lab in zip(query.ids, query.labels) if lab == 0} == by_class[0]
    half, _ = synthetic_pools(words, 0.5, ways=3, tokens=8, shuffled=False, seed=0)
    signature = next(iter(by_class[0]))
    shared = [sum(a == b for a, b in zip(ids, signature)) for ids, lab in zip(half.ids, half.labels) if lab == 0]
    assert min(shared) >= 4  # half the positions come from the signature (a random word may match too)
    shuffled, _ = synthetic_pools(words, 1.0, ways=3, tokens=8, shuffled=True, seed=0)
    assert sorted(shuffled.ids[0]) == sorted(signature) and len(set(map(tuple, shuffled.ids[:20]))) > 1


def test_overlap_reads_a_perfect_copy_and_nothing_else(tiny_lm_dir):
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "llm_ceiling.py"), "--llm", "overlap", "--lm", str(tiny_lm_dir),
         "--levels", "0,1", "--episodes", "40", "--ways", "5"],
        capture_output=True, text=True, check=True,
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["levels"]["1.0"]["accuracy"] == 1.0
    assert result["levels"]["0.0"]["accuracy"] < 0.5 and result["chance"] == 0.2
