import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_train_config, write_tiny_lm
from lqae import checkpoint as ckpt
from lqae.errors import CheckpointError


def test_save_load_round_trip(tiny_model, tmp_path):
    ckpt.save_checkpoint(tmp_path / "run", tiny_model, tiny_train_config(), step=7)
    loaded = ckpt.load_model(tmp_path / "run")
    images = torch.rand(2, 3, 16, 16)
    assert (loaded.reconstruct(images) - tiny_model.reconstruct(images)).abs().max() <= 1e-5
    assert torch.equal(loaded.encode(images), tiny_model.encode(images))
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["step"] == 7 and config["model"]["codebook_size"] == 144
    assert list(config) == sorted(config)
    weights = load_file(tmp_path / "run" / "model.safetensors")
    assert all(k.startswith(("encoder.", "decoder.")) for k in weights)  # no LM, no codebook


def test_mismatched_lm_is_a_clear_error(tiny_model, tmp_path):
    ckpt.save_checkpoint(tmp_path / "run", tiny_model)
    other_lm = write_tiny_lm(tmp_path / "wide_lm", hidden=48)
    with pytest.raises(CheckpointError, match="width 48.*trained with vocab .* width 32.*--lm"):
        ckpt.load_model(tmp_path / "run", lm_name=str(other_lm))


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        ckpt.load_model(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not an lqae checkpoint"):
        ckpt.load_model(tmp_path / "empty")


def test_interrupted_save_keeps_previous_checkpoint(tiny_model, tmp_path):
    run = tmp_path / "run"
    ckpt.save_checkpoint(run, tiny_model, step=1)
    before = (run / "model.safetensors").read_bytes()
    # a save killed before it completed: files in the journal, no COMPLETE marker
    journal = run / ".saving"
    journal.mkdir()
    (journal / "model.safetensors").write_bytes(b"half a file")
    assert ckpt.read_config(run)[2] == 1
    assert (run / "model.safetensors").read_bytes() == before and not journal.exists()


def test_completed_journal_is_rolled_forward(tiny_model, tmp_path):
    run = tmp_path / "run"
    ckpt.save_checkpoint(run, tiny_model, step=1)
    ckpt.save_checkpoint(tmp_path / "next", tiny_model, step=2)
    journal = run / ".saving"
    journal.mkdir()
    for name in ("config.json", "model.safetensors"):
        (journal / name).write_bytes((tmp_path / "next" / name).read_bytes())
    (journal / "COMPLETE").write_text("2")  # killed after marking complete, before moving files
    assert ckpt.read_config(run)[2] == 2


def test_optimizer_state_round_trip(tiny_model):
    params = [p for p in tiny_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    tiny_model.train()
    tiny_model(torch.rand(2, 3, 16, 16)).loss.backward()
    optimizer.step()
    tensors, meta = ckpt.optimizer_state_tensors(optimizer)
    json.dumps(meta)  # plain JSON, no pickle
    fresh = torch.optim.AdamW(params, lr=5.0)
    ckpt.restore_optimizer(fresh, tensors, meta)
    assert fresh.param_groups[0]["lr"] == 1e-3
    first = optimizer.state[params[0]]
    assert torch.equal(fresh.state[params[0]]["exp_avg"], first["exp_avg"])


def test_learned_search_map_round_trips(tiny_lm_dir, tmp_path):
    from conftest import tiny_model_config
    from lqae.model import LQAE

    torch.manual_seed(0)
    model = LQAE(tiny_model_config(tiny_lm_dir, search_space="latent", latent_dim=8))
    with torch.no_grad():
        model.codebook.input_to_latent.weight.normal_()  # not the init: the load must restore it
    ckpt.save_checkpoint(tmp_path / "run", model, tiny_train_config(), step=1)
    weights = load_file(tmp_path / "run" / "model.safetensors")
    assert {"codebook.input_to_latent.weight", "codebook.code_to_latent.weight"} <= set(weights)
    loaded = ckpt.load_model(tmp_path / "run")
    images = torch.rand(4, 3, 16, 16)
    assert torch.equal(loaded.encode(images), model.encode(images))


def test_checkpoint_from_before_the_recipe_fields_loads_with_reference_behaviour(tiny_model, tmp_path):
    run = tmp_path / "run"
    ckpt.save_checkpoint(run, tiny_model, tiny_train_config(), step=3)
    config = json.loads((run / "config.json").read_text())
    new_fields = ("encoder_output", "commitment", "straight_through", "search_space", "latent_dim",
                  "codebook_weight", "decoder_input", "mask_ratio_min")
    for name in new_fields:
        config["model"].pop(name)
    config["train"].pop("mask_warmup_fraction")
    (run / "config.json").write_text(json.dumps(config))
    loaded = ckpt.load_model(run)
    c = loaded.config
    assert (c.encoder_output, c.commitment, c.straight_through, c.search_space, c.decoder_input) == (
        "linear", "mse", "identity", "embedding", "lm")
    assert c.mask_ratio_min is None
    images = torch.rand(2, 3, 16, 16)
    assert torch.equal(loaded.encode(images), tiny_model.encode(images))
