import dataclasses
import logging

import pytest
import torch

from conftest import tiny_model_config
from lqae.config import TrainConfig, apply_overrides, configure, get_preset
from lqae.errors import ConfigError
from lqae.model import LQAE
from lqae.train import mask_scale_at


def test_forward_shapes_loss_parts_and_masking(tiny_model):
    images = torch.rand(4, 3, 16, 16)
    tiny_model.train()
    generator = torch.Generator().manual_seed(0)
    out = tiny_model(images, generator=generator)
    assert out.reconstruction.shape == images.shape
    assert out.token_ids.shape == out.codes.shape == out.mask.shape == (4, 16)
    assert 0.2 < out.mask.float().mean() < 0.8  # mask_ratio 0.5
    assert out.losses.mlm > 0  # the tiny BERT has an MLM head
    cfg = tiny_model.config
    total = cfg.recon_weight * out.losses.reconstruction + cfg.commitment_weight * out.losses.commitment
    assert torch.allclose(out.loss, total + cfg.mlm_weight * out.losses.mlm)
    assert not tiny_model.lm.training  # frozen LM stays in eval mode
    tiny_model.eval()
    assert not tiny_model(images).mask.any()  # no masking at eval


def test_gradients_reach_encoder_not_lm(tiny_model):
    tiny_model.train()
    tiny_model(torch.rand(2, 3, 16, 16)).loss.backward()
    assert all(p.grad is None for p in tiny_model.lm.parameters())
    assert tiny_model.encoder.patchify.weight.grad is not None
    assert tiny_model.encoder.patchify.weight.grad.abs().sum() > 0
    assert tiny_model.decoder.to_pixels.weight.grad.abs().sum() > 0


def test_encode_is_deterministic_and_decode_inverts_shapes(tiny_model):
    images = torch.rand(3, 3, 16, 16)
    ids = tiny_model.encode(images)
    assert torch.equal(ids, tiny_model.encode(images))
    assert set(ids.flatten().tolist()) <= set(tiny_model.codebook.code_to_token.tolist())
    decoded = tiny_model.decode(ids)
    assert decoded.shape == images.shape and decoded.min() >= 0 and decoded.max() <= 1
    assert torch.allclose(decoded, tiny_model.reconstruct(images))


def test_lm_without_mlm_head_skips_mlm_loss(tiny_lm_no_head_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="lqae"):
        model = LQAE(tiny_model_config(tiny_lm_no_head_dir))
    assert model.mlm_head is None
    assert "no MLM head" in caplog.text
    model.train()
    assert model(torch.rand(2, 3, 16, 16)).losses.mlm == 0


def test_bad_config_is_a_clear_error(tiny_lm_dir):
    with pytest.raises(ConfigError, match="divisible by patch size"):
        tiny_model_config(tiny_lm_dir, patch_size=5)
    with pytest.raises(ConfigError, match="unknown vocab"):
        tiny_model_config(tiny_lm_dir, vocab="subwords")


def test_presets_cover_reference_decisions():
    paper = get_preset("paper")
    m, t = paper.model, paper.train
    assert (m.image_size, m.patch_size, m.encoder_width, m.encoder_depth, m.encoder_heads) == (256, 16, 768, 12, 12)
    assert m.lm_name == "roberta-base" and m.vocab == "all" and m.mask_ratio == 0.5
    assert (m.commitment_weight, m.mlm_weight, m.recon_weight) == (0.01, 1e-4, 1.0)
    assert (t.batch_size, t.epochs, t.base_lr, t.weight_decay, t.beta2, t.warmup_fraction) == (512, 100, 1.5e-4, 5e-4, 0.95, 0.05)
    assert get_preset("tiny").model.lm_name == "sentence-transformers/all-MiniLM-L6-v2"
    # the recipe trains without a mask (it passes no gradient through the LM's input); paper keeps 0.5
    assert [get_preset(name).model.mask_ratio for name in ("base", "small", "tiny")] == [0.0, 0.0, 0.0]
    with pytest.raises(ConfigError, match="known presets: paper, base, small, tiny"):
        get_preset("huge")


def test_per_image_mask_ratio_and_warmup_scale(tiny_lm_dir):
    torch.manual_seed(0)
    model = LQAE(tiny_model_config(tiny_lm_dir, mask_ratio=0.9, mask_ratio_min=0.0)).train()
    images = torch.rand(64, 3, 16, 16)
    mask = model(images, generator=torch.Generator().manual_seed(0)).mask.float().mean(1)  # per image
    assert mask.min() < 0.2 and mask.max() > 0.7  # ratios spread over [0, 0.9]
    assert not model(images, mask_scale=0.0).mask.any()
    fixed = LQAE(tiny_model_config(tiny_lm_dir, mask_ratio=0.5)).train()
    assert 0.4 < fixed(images, generator=torch.Generator().manual_seed(0)).mask.float().mean() < 0.6
    with pytest.raises(ConfigError, match="mask_ratio_min"):
        tiny_model_config(tiny_lm_dir, mask_ratio=0.3, mask_ratio_min=0.5)


def test_mask_warmup_schedule():
    config = TrainConfig(steps=100, mask_warmup_fraction=0.2)
    assert [mask_scale_at(s, 100, config) for s in (0, 10, 20, 50)] == [0.0, 0.5, 1.0, 1.0]
    assert mask_scale_at(0, 100, TrainConfig(steps=100)) == 1.0
    cooldown = TrainConfig(steps=100, mask_cooldown_fraction=0.25)
    assert [mask_scale_at(s, 100, cooldown) for s in (0, 50, 75, 90, 100)] == [1.0, 1.0, 1.0, 0.4, 0.0]


def test_lm_skip_adds_the_lm_input_to_what_the_decoder_reads(tiny_lm_dir):
    torch.manual_seed(0)
    model = LQAE(tiny_model_config(tiny_lm_dir, decoder_input="lm_skip")).eval()
    ids = model.encode(torch.rand(2, 3, 16, 16))
    embedded = model.codebook.embeddings[model.codebook.codes_from_token_ids(ids)]
    expected = model.decoder(model.run_lm(embedded).last_hidden_state + embedded).clamp(0, 1)
    assert torch.allclose(model.decode(ids), expected)


def test_conv_head_blends_patches_at_their_seams(tiny_lm_dir):
    torch.manual_seed(0)
    config = tiny_model_config(tiny_lm_dir, decoder_head="conv", decoder_head_channels=8, decoder_input="embeddings")
    model = LQAE(config).eval()
    assert model.decoder(torch.zeros(1, 16, model.config.lm_width)).shape == (1, 3, 16, 16)
    tokens = torch.randn(1, 16, 32, requires_grad=True)  # the decoder's last transformer states
    model.decoder.head(tokens)[0, :, 3, 3].sum().backward()  # the last pixel of patch (0, 0)
    touched = tokens.grad.abs().sum(-1)[0].nonzero().flatten().tolist()
    assert touched == [0, 1, 4, 5]  # two 3x3 convolutions reach into the neighbouring patches
    linear = LQAE(tiny_model_config(tiny_lm_dir, decoder_input="embeddings")).eval()
    tokens.grad = None
    linear.decoder.head(tokens)[0, :, 3, 3].sum().backward()
    assert tokens.grad.abs().sum(-1)[0].nonzero().flatten().tolist() == [0]  # the reference: its own patch only


def test_decoder_reading_embeddings_skips_the_lm(tiny_lm_dir, monkeypatch):
    torch.manual_seed(0)
    model = LQAE(tiny_model_config(tiny_lm_dir, decoder_input="embeddings", mask_ratio=0.0)).eval()
    images = torch.rand(2, 3, 16, 16)
    ids = model.encode(images)
    monkeypatch.setattr(model, "run_lm", lambda *a, **k: pytest.fail("the LM ran"))
    codes = model.codebook.codes_from_token_ids(ids)
    expected = model.decoder(model.codebook.embeddings[codes]).clamp(0, 1)
    assert torch.allclose(model.decode(ids), expected)


def test_unknown_option_lists_the_choices(tiny_lm_dir):
    with pytest.raises(ConfigError, match="unknown straight_through 'copy'; choose one of: identity, rotation"):
        tiny_model_config(tiny_lm_dir, straight_through="copy")


def test_standardized_encoder_output_has_the_codebook_statistics(tiny_lm_dir):
    torch.manual_seed(0)
    model = LQAE(tiny_model_config(tiny_lm_dir, encoder_output="standardize", mask_ratio=0.0)).train()
    codes = model.codebook.embeddings
    images = torch.rand(16, 3, 16, 16)
    z = model.encoder(images).z.flatten(0, 1)  # training mode: batch statistics
    assert torch.allclose(z.mean(0), codes.mean(0), atol=1e-4)
    assert torch.allclose(z.std(0, unbiased=False), codes.std(0), rtol=1e-2)
    out = model(images)
    assert out.codes.unique().numel() > 8  # spread over the codebook from the first step
    model.eval()  # running statistics: deterministic, independent of the batch
    one = model.encode(images[:1])
    assert torch.equal(one, model.encode(images)[:1])
    stats = model.encoder.standardize
    stats.calibrate([model.encoder(images).projected])
    flat = model.encoder(images).projected.flatten(0, 1)
    assert torch.allclose(stats.running_mean, flat.mean(0), atol=1e-5)
    assert "encoder.standardize.running_mean" in model.trainable_state_dict()  # saved with the weights
    assert "encoder.standardize.target_mean" not in model.trainable_state_dict()  # rebuilt from the LM


def test_running_standardisation_trains_as_it_encodes(tiny_lm_dir):
    """standardize_running: a training forward normalises with the running statistics (after the
    batch has moved them), so a token's code does not depend on the rest of its batch."""
    torch.manual_seed(0)
    config = tiny_model_config(tiny_lm_dir, encoder_output="standardize", standardize_running=True, mask_ratio=0.0)
    model = LQAE(config).train()
    stats = model.encoder.standardize
    images = torch.rand(16, 3, 16, 16)
    before = stats.running_mean.clone()
    projected = model.encoder(images).projected.flatten(0, 1).detach()
    moved = before.lerp(projected.mean(0), stats.momentum)
    assert torch.allclose(stats.running_mean, moved, atol=1e-6)  # the batch moved the statistics
    stats.momentum = 0.0  # hold them still: then a batch of one and a batch of 16 give the same tokens
    trained = model(images).codes
    assert torch.equal(model(images[:1]).codes, trained[:1])
    model.eval()
    assert torch.equal(model.encode(images), model.codebook.code_to_token[trained])  # training quantizes as encoding
    z = model.encoder.train()(images).z
    z.sum().backward()  # the gradient passes the normalisation as a fixed affine
    assert model.encoder.to_lm.weight.grad.abs().sum() > 0


def test_apply_overrides_parses_values_and_names_unknown_fields():
    preset = apply_overrides(get_preset("tiny"), ["mask_ratio=0.3", "mask_ratio_min=null", "encoder_output=unit", "steps=7"])
    assert (preset.model.mask_ratio, preset.model.mask_ratio_min, preset.model.encoder_output) == (0.3, None, "unit")
    assert preset.train.steps == 7
    assert get_preset("tiny").model.mask_ratio == 0.0  # presets are not mutated
    with pytest.raises(ConfigError, match="unknown config field 'nope'.*model fields: .*mask_ratio"):
        apply_overrides(get_preset("tiny"), ["nope=1"])
    with pytest.raises(ConfigError, match="expected FIELD=VALUE"):
        apply_overrides(get_preset("tiny"), ["mask_ratio"])


def test_configure_merges_preset_overrides_and_options():
    chosen = configure("tiny", ["mask_ratio=0.3"], lm_name="my-lm", steps=None, base_lr=1e-3, seed=None)
    assert (chosen.model.mask_ratio, chosen.model.lm_name, chosen.train.base_lr) == (0.3, "my-lm", 1e-3)
    assert chosen.train.steps == get_preset("tiny").train.steps and chosen.train.seed == 0  # None keeps the preset's
    by_epochs = configure("tiny", epochs=2.0)
    assert (by_epochs.train.epochs, by_epochs.train.steps) == (2.0, None)  # epochs without steps: train by epochs
    assert configure("tiny", epochs=2.0, steps=5).train.steps == 5
    with pytest.raises(ConfigError, match="unknown config field 'colour'"):
        configure("tiny", colour="red")
    with pytest.raises(ConfigError, match="unknown preset 'huge'; known presets: paper, base, small, tiny"):
        configure("huge")


def test_the_model_copies_its_config_and_the_encoder_always_returns_its_three_outputs(tiny_lm_dir):
    config = tiny_model_config(tiny_lm_dir)
    model = LQAE(config)
    assert config.lm_width is None and config.codebook_size is None  # the caller's config is left as given
    assert model.config.lm_width == 32 and model.config.codebook_size == model.codebook.size
    out = model.encoder(torch.rand(2, 3, 16, 16))
    assert out.z.shape == out.projected.shape == (2, 16, 32)
    assert torch.equal(out.z, out.projected)  # no output standardisation in this config
    assert len(out.hidden_states) == config.encoder_depth + 1 and out.hidden_states[0].shape == (2, 16, 32)
    assert model.device == torch.device("cpu")


@pytest.mark.parametrize("reads_masked", [False, True])
def test_lm_search_decoder_sees_masked_codes_only_when_asked(tiny_lm_dir, reads_masked):
    torch.manual_seed(0)
    config = tiny_model_config(
        tiny_lm_dir, decoder_input="lm_search", search_space="uniform", latent_dim=4, mask_ratio=0.9,
        decoder_reads_masked=reads_masked,
    )
    model = LQAE(config).train()
    seen = {}
    model.decoder.register_forward_hook(lambda module, args, out: seen.update(coordinates=args[1].detach()))
    out = model(torch.rand(2, 3, 16, 16), generator=torch.Generator().manual_seed(0))
    assert out.mask.any()
    at_masked = seen["coordinates"][out.mask].abs().sum(-1)  # the cube coordinates are positive
    assert bool((at_masked > 0).all()) is reads_masked
    assert bool((seen["coordinates"][~out.mask].abs().sum(-1) > 0).all())


def test_zero_initialised_lm_read_starts_from_the_coordinates_and_learns(tiny_lm_dir):
    torch.manual_seed(0)
    config = tiny_model_config(tiny_lm_dir, decoder_input="lm_search", search_space="grid", latent_dim=3)
    assert LQAE(config).decoder.from_lm.weight.abs().sum() > 0  # the default initialisation
    model = LQAE(dataclasses.replace(config, decoder_lm_zero_init=True)).train()
    assert not model.decoder.from_lm.weight.any() and model.decoder.from_codes.weight.abs().sum() > 0
    model(torch.rand(2, 3, 16, 16)).loss.backward()
    assert model.decoder.from_lm.weight.grad.abs().sum() > 0  # it learns to read the LM from the first step
    on_lm = LQAE(dataclasses.replace(config, decoder_input="lm", decoder_lm_zero_init=True))
    assert on_lm.decoder.from_lm.weight.abs().sum() > 0  # with the LM as the only input: left as it was
