"""Models on the Hugging Face hub: a checkpoint's model card, and pushing it.

A model repo holds exactly what inference needs (`run_folder.HUB_FILES`: config.json,
model.safetensors and README.md, the card); never train_state.safetensors. Loading by hub id is
`run_folder.resolve_run`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
from pathlib import Path

from lqae.checkpoint import read_config, weights_metadata
from lqae.config import ModelConfig, TrainConfig, flat_dict
from lqae.presets import PRESETS
from lqae.errors import CheckpointError, ConfigError, OutputError
from lqae.io import atomic_write_bytes
from lqae.model.codebook import codebook_class
from lqae.run_folder import (
    CARD_FILE, CONFIG_FILE, DATA_FILE, METRICS_FILE, MODEL_FILE, SAMPLES_DIR, parse_hub_id, short,
)

log = logging.getLogger(__name__)


# -- model card ----------------------------------------------------------------------------------
DEFAULT_LICENSE = "apache-2.0"
CARD_TAGS = ("lqae", "image-tokenizer", "vector-quantization", "language-quantized-autoencoder")
_BOOKKEEPING = {"epochs", "steps", "log_every", "sample_every", "save_every", "val_every", "num_workers", "compile"}


def preset_fields() -> list[str]:
    """The config fields that tell the presets apart (model fields, then training fields by path):
    what a card names to say which recipe a checkpoint was trained with."""
    model = [flat_dict(p.model) for p in PRESETS.values()]
    train = [flat_dict(p.train) for p in PRESETS.values()]
    return [k for k in model[0] if len({json.dumps(m[k]) for m in model}) > 1 and k not in _SIZES] + [
        k for k in train[0] if len({json.dumps(t[k]) for t in train}) > 1 and k not in _BOOKKEEPING
    ]


def card_fields(model, train) -> dict:
    """The fields a card lists: those that tell the presets apart, its search space's own options,
    and any other field the run set away from the presets' defaults (sizes and bookkeeping aside)."""
    values = {**flat_dict(model), **(flat_dict(train) if train is not None else {})}
    defaults = {**flat_dict(ModelConfig()), **flat_dict(TrainConfig())}
    chosen = preset_fields() + list(codebook_class(model.search_space).options(model))
    chosen += [k for k, v in values.items() if k in defaults and v != defaults[k] and k not in _SIZES | _BOOKKEEPING]
    return {k: values[k] for k in dict.fromkeys(chosen) if k in values}


_SIZES = {"image_size", "patch_size", "encoder_width", "encoder_depth", "encoder_heads", "decoder_width",
          "decoder_depth", "decoder_heads"}  # on the card's architecture line


def model_card(run_dir: str | Path, repo_id: str | None = None, license: str = DEFAULT_LICENSE) -> str:
    """README.md for a checkpoint folder: YAML metadata (library, tags, the frozen LM as base model,
    license), how to use it, the training data and steps, the recipe, held-out figures from
    metrics.jsonl and the latest sample grid."""
    run_dir = Path(run_dir)
    model, train, step = read_config(run_dir)
    name = repo_id or run_dir.resolve().name
    grid = model.layout.grid
    meta = [
        "---", "library_name: lqae", f"license: {json.dumps(license)}", f"base_model: {json.dumps(model.lm_name)}",
        "tags:", *[f"- {tag}" for tag in CARD_TAGS], "---", "",
    ]
    lines = [
        f"# {name}", "",
        f"A Language Quantized AutoEncoder (lqae, after Liu et al. 2023): it writes a "
        f"{model.image_size}x{model.image_size} image as {model.num_tokens} tokens ({grid}x{grid} patches) of the "
        f"frozen language model `{model.lm_name}` ({model.codebook_size:,} codes of its vocabulary, `{model.vocab}`), "
        "and reads such tokens back into an image, so text-only models can read images.", "",
        "## Use", "", "```bash", "pip install lqae",
        f"lqae encode image.png -m {name}                  # token text",
        f"lqae encode image.png -m {name} -f tokens | lqae decode -m {name} --out back.png",
        f"lqae fewshot --support train/ query.png -m {name}   # label by prompting an LLM with token text",
        "```", "",
    ]
    data = _read_json(run_dir / DATA_FILE)
    lines += ["## Training", ""]
    if data and data.get("train"):
        trained = data["train"]
        classes = f", {len(trained['classes'])} classes" if trained.get("classes") else ""
        lines.append(f"- data: `{trained['name']}` ({trained['images']:,} images{classes})")
        if data.get("val"):
            lines.append(f"- held-out data: `{data['val']['name']}` ({data['val']['images']:,} images)")
    if train is not None:
        lines.append(f"- steps: {step:,} at batch {train.batch_size}, peak lr {train.peak_lr:.2g}, seed {train.seed}")
    else:
        lines.append(f"- steps: {step:,}")
    lines.append(f"- encoder {model.encoder_width}x{model.encoder_depth}, decoder {model.decoder_width}x{model.decoder_depth}")
    lines.append("- recipe: " + ", ".join(f"`{k}={json.dumps(v)}`" for k, v in card_fields(model, train).items()))
    lines.append("")
    held_out = _last_validation(run_dir / METRICS_FILE)
    if held_out:
        lines += [
            "## Held-out figures", "",
            "| step | images | PSNR (dB) | SSIM | codes used | code perplexity |", "|---|---|---|---|---|---|",
            f"| {held_out.get('step', step)} | {held_out.get('val_images', '')} | {held_out.get('val_psnr', 0):.2f} | "
            f"{held_out.get('val_ssim', 0):.3f} | {held_out.get('val_unique_codes', '')} | "
            f"{held_out.get('val_code_perplexity', 0):.1f} |", "",
        ]
    grids = sorted((run_dir / SAMPLES_DIR).glob("step_*.png"))
    if grids:
        lines += ["## Samples", "", f"Originals above reconstructions (`{grids[-1].relative_to(run_dir).as_posix()}` "
                  "of the training run):", "", _inline_image(grids[-1]), ""]
    return "\n".join(meta + lines)


_INLINE_LIMIT = 256 * 1024  # bytes of PNG written into the card itself


def _inline_image(path: Path) -> str:
    """The PNG as a data URI, so the card carries its picture without another uploaded file (a push
    sends only config, weights and card); a large grid is named instead."""
    data = path.read_bytes()
    if len(data) > _INLINE_LIMIT:
        return f"(the grid is {len(data) // 1024} KB: see the file in the training run)"
    return f"![samples](data:image/png;base64,{base64.b64encode(data).decode()})"


_SEAL = re.compile(r"\n<!-- written by lqae card: ([0-9a-f]{16}) -->\n")  # the card's last line, as written


def write_card(run_dir: str | Path, repo_id: str | None = None, license: str = DEFAULT_LICENSE) -> Path:
    """RUN_DIR/README.md, the card `push` uploads; it replaces only a card `lqae card` wrote and no
    one edited since (OutputError otherwise: a README the user wrote or edited is never lost)."""
    if repo_id is not None:
        check_repo_id(repo_id)
    path = Path(run_dir) / CARD_FILE
    state = card_state(path)
    if state == "edited":
        raise OutputError(f"{path} was edited since `lqae card` wrote it; move or delete it to write a fresh card")
    if state == "other":
        raise OutputError(f"{path} exists and is not a card `lqae card` wrote; refusing to overwrite it: move it first")
    text = model_card(run_dir, repo_id, license)
    atomic_write_bytes(path, f"{text}\n<!-- written by lqae card: {_digest(text)} -->\n".encode("utf-8"))
    return path


def card_state(path: Path) -> str:
    """"none" (no file), "lqae" (a card `lqae card` wrote, as written), "edited" (one it wrote, changed
    since) or "other" (any other file)."""
    if not path.exists() and not path.is_symlink():
        return "none"
    try:
        text = path.read_text(encoding="utf-8") if path.is_file() and not path.is_symlink() else ""
    except (OSError, UnicodeDecodeError):
        return "other"
    seal = _SEAL.search(text)
    if seal is None:
        return "other"
    return "lqae" if _digest(text[: seal.start()] + text[seal.end():]) == seal.group(1) else "edited"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def check_repo_id(repo_id: str) -> None:
    """ConfigError unless `repo_id` is a hub repo id, org/name (what `push` and the card may name)."""
    if parse_hub_id(repo_id) is None or "@" in repo_id:
        raise ConfigError(f"{repo_id!r} is not a hub repo id: write it as org/name (the branch goes in --revision)")


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _last_validation(path: Path) -> dict | None:
    last = None
    try:
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                if '"val_psnr"' in line:
                    try:
                        last = json.loads(line)
                    except ValueError:
                        continue
    except OSError:
        return None
    return last


# -- push ----------------------------------------------------------------------------------------
def push(
    run_dir: str | Path, repo_id: str, private: bool = False, revision: str | None = None,
    license: str = DEFAULT_LICENSE,
) -> str:
    """Upload config.json, model.safetensors and the model card (RUN_DIR/README.md when `lqae card`
    wrote one, else a fresh one) to `repo_id` in one commit; never optimiser state. Returns the
    commit URL. The token comes from huggingface_hub (HF_TOKEN or `hf auth login`)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"checkpoint folder {run_dir} does not exist")
    check_repo_id(repo_id)
    _, _, step = read_config(run_dir)
    written = weights_metadata(run_dir / MODEL_FILE).get("step")
    if written is not None and str(written) != str(step):
        raise CheckpointError(
            f"{run_dir / MODEL_FILE} is at step {written} but {CONFIG_FILE} at step {step}: a trainer is writing "
            "this run; push again when it has saved"
        )
    card = run_dir / CARD_FILE
    state = card_state(card)
    if state == "other":
        log.warning("%s is not a card `lqae card` wrote: pushing a fresh card instead", card)
    uploaded = state in ("lqae", "edited")  # a card lqae wrote, as the user left it
    card_bytes = card.read_bytes() if uploaded else model_card(run_dir, repo_id, license).encode("utf-8")
    try:
        from huggingface_hub import CommitOperationAdd, HfApi

        api = HfApi()
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        operations = [
            CommitOperationAdd(CONFIG_FILE, str(run_dir / CONFIG_FILE)),
            CommitOperationAdd(MODEL_FILE, str(run_dir / MODEL_FILE)),
            CommitOperationAdd(CARD_FILE, card_bytes),
        ]
        info = api.create_commit(
            repo_id, operations, commit_message=f"lqae push: step {step}", revision=revision, repo_type="model"
        )
    except Exception as exc:
        hint = ""
        if "401" in str(exc) or "403" in str(exc) or "token" in str(exc).lower():
            hint = "; log in with `hf auth login` or set HF_TOKEN to a token with write access"
        raise CheckpointError(f"cannot push to {repo_id} ({type(exc).__name__}: {short(exc)}){hint}") from exc
    return str(getattr(info, "commit_url", "") or f"{repo_id}")

