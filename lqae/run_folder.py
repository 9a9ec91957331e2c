"""A run folder, as `lqae train` writes it: the names of its files, and `resolve_run`, which finds one
locally or on the Hugging Face hub.

    RUN_DIR/config.json               model (and training) config, step        (CONFIG_FILE)
    RUN_DIR/model.safetensors         trainable weights, step, fingerprint     (MODEL_FILE)
    RUN_DIR/train_state.safetensors   optimiser and RNG state, for resuming    (TRAIN_STATE_FILE)
    RUN_DIR/metrics.jsonl             one JSON line per logged step            (METRICS_FILE)
    RUN_DIR/data.json                 which images trained the model           (DATA_FILE)
    RUN_DIR/samples/step_*.png        originals above reconstructions          (SAMPLES_DIR)
    RUN_DIR/README.md                 the model card (`lqae card`)             (CARD_FILE)
    RUN_DIR/.lock, RUN_DIR/.saving/   the trainer's lock and its save journal  (LOCK_FILE, JOURNAL_DIR)

A hub model repo holds exactly what inference needs (HUB_FILES); never train_state.safetensors.
`resolve_run` turns `org/name` or `org/name@revision` into a local folder through huggingface_hub's
cache (HF_HUB_OFFLINE and HF_HUB_CACHE apply as for any model); a local folder of the same spelling
always wins.
"""

from __future__ import annotations

import re
from pathlib import Path

from lqae.errors import CheckpointError

CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
TRAIN_STATE_FILE = "train_state.safetensors"
METRICS_FILE = "metrics.jsonl"
DATA_FILE = "data.json"
SAMPLES_DIR = "samples"
CARD_FILE = "README.md"
LOCK_FILE = ".lock"
JOURNAL_DIR = ".saving"
HUB_FILES = (CONFIG_FILE, MODEL_FILE, CARD_FILE)

_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[^@]*))?$")
# a branch, tag or commit: slash-separated parts of word characters, dots and dashes, none of them
# empty, `.` or `..`, none starting with a dot (git's own rules forbid the rest); never a path outside
_REVISION = re.compile(r"^(?!.*\.\.)(?!\.)(?!.*/\.)[\w.-]+(?:/[\w.-]+)*$")


def parse_hub_id(text: str) -> tuple[str, str | None] | None:
    """("org/name", revision or None) for a hub id, else None. A revision that is not a plain
    branch, tag or commit name (`@../../x`) raises CheckpointError: it never reaches the hub client."""
    match = _HUB_ID.fullmatch(str(text))
    if not match or str(text).endswith((".safetensors", ".json")):
        return None
    revision = match.group("revision")
    if revision is not None and not _REVISION.fullmatch(revision):
        raise CheckpointError(
            f"{text}: {revision!r} is not a branch, tag or commit name (letters, digits, '_', '-', '.' and '/', "
            "no '..' and no part starting with a dot)"
        )
    return match.group("repo"), revision


def resolve_run(run: str | Path) -> Path:
    """A checkpoint folder: `run` itself when it exists locally, else the hub snapshot of that id."""
    local = Path(run).expanduser()
    if local.exists():
        return local
    parsed = parse_hub_id(str(run))
    if parsed is None:
        return local  # the caller reports the missing folder
    repo_id, revision = parsed
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HFValidationError
    except ImportError:  # huggingface_hub comes with transformers; without it there is no hub
        return local
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=list(HUB_FILES)))
    except HFValidationError as exc:
        raise CheckpointError(f"{run} is neither a local checkpoint folder nor a valid hub id ({short(exc)})") from exc
    except Exception as exc:  # not found, gated, offline without a cached copy, network down
        raise CheckpointError(
            f"checkpoint {run} is not a local folder and could not be fetched from the Hugging Face hub "
            f"({type(exc).__name__}: {short(exc)}); check the id and revision, your network, or HF_HUB_OFFLINE"
        ) from exc
    if not (folder / CONFIG_FILE).is_file() or not (folder / MODEL_FILE).is_file():
        raise CheckpointError(f"hub repo {repo_id} has no lqae checkpoint ({CONFIG_FILE} and {MODEL_FILE})")
    return folder


def short(exc: Exception, limit: int = 200) -> str:
    """An exception's first sentence on one line (hub errors can run to pages), cut at a word with
    " ..." when it is longer than `limit`, never in the middle of a word or a quoted name."""
    text = " ".join(str(exc).split())
    first = re.split(r"(?<=[.!?])\s", text, maxsplit=1)[0]
    if len(first) <= limit:
        return first
    words = first[:limit].split(" ")[:-1]
    opened = [i for i, w in enumerate(words) if w.startswith("'") and not w.rstrip(".,:;)").endswith("'")]
    closed = sum(1 for w in words if w.rstrip(".,:;)").endswith("'") and not w.startswith("'"))
    if len(opened) > closed:  # a quoted name cut in two: leave it out whole
        words = words[: opened[-1]]
    return " ".join(words) + " ..."
