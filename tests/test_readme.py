"""The README's commands, run as a user runs them (bash, in a folder with `data/digits` and a
trained `runs/digits`), against a tiny model: an option the README shows that the CLI lacks, or a
command that fails, fails here. `lqae train` runs through a shim that keeps the README's options
and shrinks the work (the test LM, 16 px, 2 steps). Blocks after a `<!-- not run by
tests/test_readme.py: REASON -->` line are skipped (GPUs, the hub, an LLM server)."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny_model_config, tiny_train_config, write_class_images
from lqae.training import train

REPO = Path(__file__).resolve().parent.parent
SKIP = "<!-- not run by tests/test_readme.py"
SHIM = '''#!{python}
"""lqae, with `train` shrunk to the test LM, 16 px and a few steps (the README's options kept)."""
import os, subprocess, sys
args = sys.argv[1:]
if args[:1] == ["train"]:
    if "--steps" in args:
        args[args.index("--steps") + 1] = "3" if "--resume" in args else "2"
    else:
        args += ["--steps", "2"]
    args += ["--lm", os.environ["README_TEST_LM"], "--image-size", "16", "--patch-size", "4", "--batch-size", "4",
             "--workers", "0", "--set", "global_vocab_size=8", "--sample-every", "100", "--val-every", "2", "--quiet"]
sys.exit(subprocess.call([sys.executable, "-m", "lqae_cli", *args]))
'''


def readme_blocks(kind: str) -> list[str]:
    """The README's ```KIND code blocks that the tests run, in order."""
    text = (REPO / "README.md").read_text()
    blocks = []
    for match in re.finditer(rf"(?P<before>[^\n]*)\n```{kind}\n(?P<body>.*?)\n```", text, re.S):
        if not match.group("before").startswith(SKIP):
            blocks.append(match.group("body"))
    return blocks


@pytest.fixture(scope="module")
def home(tmp_path_factory, tiny_lm_dir):
    """A user's folder: the digits' layout (a few synthetic classes), `digit.png`, `a.png`, `b.png`, a
    trained `runs/digits` and a `bin/lqae` shim first on PATH."""
    home = tmp_path_factory.mktemp("home")
    for split in ("train", "val"):
        write_class_images(home / "data" / "digits" / split, classes=("seven", "one", "red", "blue", "green"), per_class=4,
                           seed=0 if split == "train" else 1)
    seven = next((home / "data/digits/val/seven").iterdir())
    seven.rename(seven.with_name("0044.png"))
    for name in ("digit.png", "a.png", "b.png"):
        shutil.copy(home / "data/digits/val/seven/0044.png", home / name)
    config = tiny_model_config(tiny_lm_dir, global_tokens=2, global_vocab_size=8)
    train(home / "data/digits/train", home / "runs/digits", config, tiny_train_config(steps=2))
    (home / "bin").mkdir()
    shim = home / "bin" / "lqae"
    shim.write_text(SHIM.format(python=sys.executable))
    shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
    (home / "bin" / "python").symlink_to(sys.executable)
    return home


def run_block(home: Path, body: str, tiny_lm_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{home / 'bin'}:{os.environ['PATH']}", "README_TEST_LM": str(tiny_lm_dir),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("LQAE_MODEL", None)
    script = "set -euo pipefail\n" + body
    return subprocess.run(["bash", "-c", script], cwd=home, env=env, capture_output=True, text=True, timeout=600)


def test_the_readme_has_runnable_blocks_and_skips_only_what_needs_the_outside_world():
    text = (REPO / "README.md").read_text()
    skipped = text.count(SKIP)
    assert len(readme_blocks("bash")) >= 7 and 1 <= skipped <= 4
    assert all(re.search(r"GPU|hub|server|LLM", line) for line in text.splitlines() if line.startswith(SKIP))


@pytest.mark.parametrize("index", range(len(readme_blocks("bash"))))
def test_each_bash_block_of_the_readme_runs(home, tiny_lm_dir, index):
    body = readme_blocks("bash")[index]
    if body.startswith("make demo"):  # the quick start: `make demo` is the demo itself; the rest runs
        body = "\n".join(line for line in body.splitlines() if not line.startswith(("make ", "source ")))
    done = run_block(home, body, tiny_lm_dir)
    assert done.returncode == 0, f"README block {index}:\n{body}\n--- stderr:\n{done.stderr[-3000:]}"


def test_the_readmes_python_api_runs(home):
    for body in readme_blocks("python"):
        done = subprocess.run([sys.executable, "-c", body], cwd=home, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert done.returncode == 0, f"{body}\n--- stderr:\n{done.stderr[-3000:]}"
