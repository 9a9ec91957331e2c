import json
import os

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_model_config, tiny_objective, tiny_train_config, write_tiny_lm
from lqae import checkpoint as ckpt
from lqae.errors import CheckpointError
from lqae.run_lock import RunLock
from lqae.training import train


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


def test_a_checkpoint_of_another_format_is_refused_and_one_without_the_key_loads(tiny_model, tmp_path):
    ckpt.save_checkpoint(tmp_path / "run", tiny_model, step=3)
    path = tmp_path / "run" / "config.json"
    config = json.loads(path.read_text())
    assert config["format"] == ckpt.CHECKPOINT_FORMAT
    path.write_text(json.dumps({**config, "format": "lqae-checkpoint-2"}))
    with pytest.raises(CheckpointError, match="format 'lqae-checkpoint-2'.*upgrade lqae"):
        ckpt.read_config(tmp_path / "run")
    del config["format"]  # written before the key was
    path.write_text(json.dumps(config))
    assert ckpt.read_config(tmp_path / "run")[2] == 3


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


def _journal_of_step_2(run, tiny_model, monkeypatch):
    """A save of step 2 killed after its COMPLETE marker, before any file moved into place."""
    ckpt.save_checkpoint(run, tiny_model, step=1)
    with monkeypatch.context() as patch:
        patch.setattr(ckpt, "roll_forward", lambda run_dir: None)
        ckpt.save_checkpoint(run, tiny_model, step=2)
    assert (run / ".saving" / "COMPLETE").exists()
    return run / ".saving"


def test_completed_journal_is_rolled_forward(tiny_model, tmp_path, monkeypatch):
    run = tmp_path / "run"
    _journal_of_step_2(run, tiny_model, monkeypatch)
    assert ckpt.read_config(run)[2] == 2
    assert not (run / ".saving").exists()


def test_completed_journal_with_a_truncated_file_is_discarded(tiny_model, tmp_path, monkeypatch):
    run = tmp_path / "run"
    journal = _journal_of_step_2(run, tiny_model, monkeypatch)
    before = (run / "model.safetensors").read_bytes()
    weights = journal / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # the marker says complete, the file is not
    assert ckpt.read_config(run)[2] == 1
    assert (run / "model.safetensors").read_bytes() == before and not journal.exists()
    ckpt.load_model(run)


def test_reader_leaves_a_live_trainers_journal_alone(tiny_model, tmp_path, monkeypatch):
    run = tmp_path / "run"
    journal = _journal_of_step_2(run, tiny_model, monkeypatch)
    with RunLock(run):  # a trainer holds the folder (flock: another open file = another holder)
        assert ckpt.read_config(run)[2] == 1
        ckpt.load_model(run)
        assert (journal / "COMPLETE").exists()
        incomplete = journal / "COMPLETE"
        incomplete.unlink()  # mid-save, before the marker: still not the reader's to delete
        ckpt.read_config(run)
        assert journal.is_dir()


def test_second_trainer_is_refused_with_the_holders_pid(tmp_path):
    run = tmp_path / "run"
    with RunLock(run):
        with pytest.raises(CheckpointError, match=rf"process {os.getpid()}.*another --out"):
            RunLock(run).acquire()
    with RunLock(run):  # released on exit
        pass


def test_reader_gets_config_and_weights_of_one_step(tiny_model, tmp_path, monkeypatch):
    run = tmp_path / "run"
    ckpt.save_checkpoint(run, tiny_model, step=1)
    ckpt.save_checkpoint(tmp_path / "next", tiny_model, step=2)
    (run / "config.json").write_bytes((tmp_path / "next" / "config.json").read_bytes())
    monkeypatch.setattr(ckpt.time, "sleep", lambda seconds: None)
    with pytest.raises(CheckpointError, match="config.json is at step 2 but model.safetensors at step 1"):
        ckpt.load_model(run)


def test_optimizer_state_round_trip(tiny_lm_dir):
    objective = tiny_objective(tiny_lm_dir)
    params = [p for p in objective.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    objective(torch.rand(2, 3, 16, 16), generator=torch.Generator().manual_seed(0))[2].backward()
    optimizer.step()
    tensors, meta = ckpt.optimizer_state_tensors(optimizer)
    json.dumps(meta)  # plain JSON, no pickle
    fresh = torch.optim.AdamW(params, lr=5.0)
    ckpt.restore_optimizer(fresh, tensors, meta)
    assert fresh.param_groups[0]["lr"] == 1e-3
    first = optimizer.state[params[0]]
    assert torch.equal(fresh.state[params[0]]["exp_avg"], first["exp_avg"])


# lqae 0.1.0's config fields beside today's, at the values its presets used (the recipe's, where they differ)
OLD_MODEL = {
    "mask_ratio": 0.0, "mask_ratio_min": None, "commitment_weight": 0.01, "recon_weight": 1.0, "mlm_weight": 1e-4,
    "standardize_running": False, "commitment": "mse", "straight_through": "identity", "soft_top_k": 32,
    "soft_temperature": 0.05, "latent_dim": 32, "codebook_weight": 1.0, "decoder_reads_masked": True,
    "decoder_lm_zero_init": True, "decoder_reads_global": True, "invariance_weight": 1.0,
    "teacher_temperature": 0.04, "student_temperature": 0.1, "centre_momentum": 0.9, "global_balance": "sinkhorn",
    "global_queue": 0, "usage_weight": 0.0, "usage_temperature": 0.01, "usage_sample_tokens": 1024, "usage_top_k": 0,
    "search_chunk_tokens": 4096,
}
OLD_TRAIN = {"mask_warmup_fraction": 0.0, "mask_cooldown_fraction": 0.0, "teacher_momentum": 0.99, "min_lr_fraction": 0.0}


def as_old_checkpoint(run, **changes):
    """Rewrite a checkpoint's config.json as lqae 0.1.0 wrote it (training settings in the model config,
    every experiment a field), with `changes` to the old model fields."""
    config = json.loads((run / "config.json").read_text())
    train = config["train"]
    for group in ("mask", "distill"):
        train.pop(group)
    config["model"].pop("grid_dim")
    config["model"].update({**OLD_MODEL, **changes})
    train.update(OLD_TRAIN)
    (run / "config.json").write_text(json.dumps(config))


def test_a_checkpoint_of_lqae_0_1_0_loads_encodes_alike_and_resumes(tiny_lm_dir, image_folder, tmp_path):
    run = tmp_path / "run"
    train(image_folder, run, tiny_model_config(tiny_lm_dir), tiny_train_config(steps=2))
    images = torch.rand(3, 3, 16, 16)
    ids = ckpt.load_model(run).encode(images)
    as_old_checkpoint(run, mask_ratio=0.5, decoder_lm_zero_init=False, decoder_reads_masked=False)
    model, train_config, step = ckpt.read_config(run)
    assert step == 2 and train_config.mask.ratio == 0.5 and train_config.distill.teacher_momentum == 0.99
    assert torch.equal(ckpt.load_model(run).encode(images), ids)
    train(image_folder, run, tiny_model_config(tiny_lm_dir), tiny_train_config(steps=3), resume=True)
    assert ckpt.read_config(run)[2] == 3


def test_a_removed_option_that_changes_what_the_weights_compute_is_refused(tiny_model, tmp_path):
    run = tmp_path / "run"
    ckpt.save_checkpoint(run, tiny_model, tiny_train_config(), step=1)
    as_old_checkpoint(run, encoder_output="unit")
    with pytest.raises(CheckpointError, match="trained with encoder_output='unit', an option removed after lqae 0.1.0"):
        ckpt.load_model(run)


def test_a_removed_training_option_loads_but_does_not_resume(tiny_lm_dir, image_folder, tmp_path):
    run = tmp_path / "run"
    train(image_folder, run, tiny_model_config(tiny_lm_dir), tiny_train_config(steps=2))
    images = torch.rand(3, 3, 16, 16)
    ids = ckpt.load_model(run).encode(images)
    as_old_checkpoint(run, usage_weight=0.005, straight_through="rotation")
    assert torch.equal(ckpt.load_model(run).encode(images), ids)  # the weights compute what they did
    with pytest.raises(CheckpointError, match=r"removed after lqae 0.1.0 \(straight_through, usage_weight\)"):
        train(image_folder, run, tiny_model_config(tiny_lm_dir), tiny_train_config(steps=3), resume=True)


def test_checkpoint_from_before_the_recipe_fields_loads_with_reference_behaviour(tiny_model, tmp_path):
    run = tmp_path / "run"
    ckpt.save_checkpoint(run, tiny_model, tiny_train_config(), step=3)
    config = json.loads((run / "config.json").read_text())
    for name in ("encoder_output", "search_space", "grid_dim", "decoder_input", "decoder_head"):
        config["model"].pop(name)
    (run / "config.json").write_text(json.dumps(config))
    c = ckpt.load_model(run).config
    assert (c.encoder_output, c.search_space, c.decoder_input, c.decoder_head) == ("linear", "embedding", "lm", "linear")
    images = torch.rand(2, 3, 16, 16)
    assert torch.equal(ckpt.load_model(run).encode(images), tiny_model.encode(images))
