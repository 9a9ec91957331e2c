"""Shared fixtures: a tiny BERT (with MLM head) and tokenizer written in-process, tiny LQAE
configs and checkpoints, and small synthetic image folders. Everything offline, CPU, seconds."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_fewshot_helpers import one_thread

from lqae.checkpoint import save_checkpoint
from lqae.config import ModelConfig, TrainConfig
from lqae.model import LQAE
from lqae.model.lm import load_frozen_lm
from lqae.training.objective import Objective

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
SYLLABLES = ["ba", "ko", "mi", "tu", "re", "sa", "lo", "ne", "di", "fu", "ga", "pe"]


def tiny_vocab() -> list[str]:
    words = ["".join(p) for p in itertools.product(SYLLABLES, repeat=2)]  # 144 whole words
    pieces = ["##" + s for s in SYLLABLES]  # subword continuations
    punctuation = [".", ",", "!", "?", "-", "0", "1", "2"]
    return SPECIALS + words + pieces + punctuation


def write_tiny_lm(folder: Path, with_mlm_head: bool = True, hidden: int = 32) -> Path:
    """A 2-layer BERT and its WordPiece tokenizer, saved like any HF model folder."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import WordPiece
    from transformers import BertConfig, BertForMaskedLM, BertModel, PreTrainedTokenizerFast

    vocab = tiny_vocab()
    backend = Tokenizer(WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix="##")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]",
    )
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=2 * hidden, max_position_embeddings=128, pad_token_id=0,
    )
    model = BertForMaskedLM(config) if with_mlm_head else BertModel(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory) -> Path:
    return write_tiny_lm(tmp_path_factory.mktemp("tiny_lm"))


@pytest.fixture(scope="session")
def tiny_lm_no_head_dir(tmp_path_factory) -> Path:
    return write_tiny_lm(tmp_path_factory.mktemp("tiny_lm_nohead"), with_mlm_head=False)


# The tiny preset's 8 global tokens x 64 words need 512 codes; the test LM has 144 words, so CLI
# tests that train with the preset's defaults give each global token 16 (128 codes)
SMALL_GLOBAL_SETS = ("--set", "global_vocab_size=16")


def tiny_model_config(lm_dir: Path, **overrides):
    fields = dict(
        image_size=16, patch_size=4, encoder_width=32, encoder_depth=1, encoder_heads=2,
        decoder_width=32, decoder_depth=1, decoder_heads=2, lm_name=str(lm_dir), vocab="words",
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def tiny_train_config(**overrides):
    fields = dict(
        batch_size=8, steps=4, base_lr=1e-3, num_workers=0, log_every=1, sample_every=2, save_every=2,
        val_every=2, seed=0,
    )
    fields.update(overrides)
    return TrainConfig(**fields)


def tiny_objective(lm_dir: Path, model_config=None, seed: int = 0, **train_overrides):
    """A tiny LQAE inside its training objective (with the tiny BERT's MLM head), as the trainer builds it."""
    torch.manual_seed(seed)
    lm = load_frozen_lm(str(lm_dir), with_mlm_head=True)
    model = LQAE(model_config or tiny_model_config(lm_dir), lm=lm)
    return Objective(model, tiny_train_config(**train_overrides), lm.mlm_head).train()


@pytest.fixture
def tiny_model(tiny_lm_dir):
    torch.manual_seed(0)
    return LQAE(tiny_model_config(tiny_lm_dir)).eval()


def save_tiny_checkpoint(tiny_lm_dir: Path, run: Path, seed: int) -> Path:
    """An untrained tiny LQAE, initialised from `seed`, saved as a checkpoint folder."""
    torch.manual_seed(seed)
    save_checkpoint(run, LQAE(tiny_model_config(tiny_lm_dir)), tiny_train_config(), step=0)
    return run


@pytest.fixture
def tiny_checkpoint(tiny_lm_dir, tmp_path) -> Path:
    """An (untrained) tiny LQAE saved as a checkpoint folder."""
    return save_tiny_checkpoint(tiny_lm_dir, tmp_path / "run", seed=0)


@pytest.fixture
def other_checkpoint(tiny_lm_dir, tmp_path) -> Path:
    """A second tiny checkpoint of exactly the same config as `tiny_checkpoint`, other weights."""
    return save_tiny_checkpoint(tiny_lm_dir, tmp_path / "other_run", seed=1)


def write_class_images(root: Path, classes=("red", "blue"), per_class: int = 6, size: int = 20, seed: int = 0) -> Path:
    """Synthetic colour images, one sub-folder per class; classes differ in their dominant colour
    (linearly separable in pixel space). Mixed sizes and a grayscale file exercise loading."""
    rng = np.random.default_rng(seed)
    palette = {"red": (200, 40, 40), "blue": (40, 40, 200), "green": (40, 200, 40), "gray": (128, 128, 128)}
    for c, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        base = np.array(palette.get(name, (60 * c % 255, 90, 30 * c % 255)), dtype=np.float32)
        for i in range(per_class):
            side = size + (i % 3) * 4
            noise = rng.normal(0, 25, size=(side, side, 3))
            pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
            image = Image.fromarray(pixels)
            if i == 0:
                image = image.convert("L")
            image.save(folder / f"{name}_{i:03d}.png")
    return root


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return write_class_images(tmp_path / "images")


@pytest.fixture(scope="module")
def single_thread():
    """torch on one thread for a test module (tiny models, busy machines); see test_fewshot_helpers.one_thread."""
    with one_thread():
        yield
