"""bench/peers.py: the peer bottlenecks train with the preset's recipe and report like lqae's bench rows."""

import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_model_config, tiny_train_config, write_class_images

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from peers import FSQ_LEVELS, PEERS, PeerAutoencoder, train_peer  # noqa: E402

from lqae.presets import Preset  # noqa: E402


@pytest.fixture
def preset(tiny_lm_dir):
    return Preset(tiny_model_config(tiny_lm_dir), tiny_train_config(steps=3, batch_size=4))


@pytest.mark.parametrize("kind", PEERS)
def test_peers_train_and_report(kind, preset, tmp_path):
    folder = tmp_path / "data"
    write_class_images(folder / "train", per_class=4, size=16)
    write_class_images(folder / "val", per_class=2, size=16, seed=1)
    figures = train_peer(kind, folder, tmp_path / kind, preset)
    assert set(figures) >= {"psnr", "ssim", "unique_codes", "train_seconds", "grid"}
    assert 0 < figures["psnr"] < 100 and Path(figures["grid"]).is_file()
    assert (figures["unique_codes"] > 0) == (kind != "continuous")


def test_fsq_peer_has_the_configured_grid(preset):
    model = PeerAutoencoder(preset, "fsq")
    expected = 1
    for level in FSQ_LEVELS:
        expected *= level
    assert model.codebook_size == expected == 15360
    reconstruction, codes, _ = model(torch.rand(2, 3, 16, 16))
    assert reconstruction.shape == (2, 3, 16, 16) and codes.shape == (2, 16) and int(codes.max()) < expected


def test_peers_have_the_patch_tokens_only_under_a_global_token_recipe(tiny_lm_dir):
    config = tiny_model_config(
        tiny_lm_dir, global_tokens=2, global_vocab_size=8, decoder_input="lm_search", search_space="grid", grid_dim=3,
    )
    model = PeerAutoencoder(Preset(config, tiny_train_config()), "fsq")
    _, codes, _ = model(torch.rand(2, 3, 16, 16))
    assert codes.shape == (2, 16)  # lqae's global words come on top of the peers' 16 tokens
