import dataclasses

import pytest
import torch

from conftest import tiny_model_config, tiny_objective
from lqae.config import Masking
from lqae.presets import apply_overrides, configure, get_preset
from lqae.errors import ConfigError
from lqae.model import LQAE


def test_forward_shapes_loss_parts_and_masking(tiny_lm_dir):
    objective = tiny_objective(tiny_lm_dir)
    model = objective.model
    images = torch.rand(4, 3, 16, 16)
    out, losses, loss = objective(images, generator=torch.Generator().manual_seed(0))
    assert out.reconstruction.shape == images.shape
    assert out.quantized.token_ids.shape == out.quantized.codes.shape == (4, 16)
    mask = objective.sample_mask(4, "cpu", torch.Generator().manual_seed(0))
    assert mask.shape == (4, 16) and 0.2 < mask.float().mean() < 0.8  # mask.ratio 0.5
    assert losses.mlm > 0  # the tiny BERT has an MLM head
    total = losses.reconstruction + 0.01 * losses.commitment + 1e-4 * losses.mlm
    assert torch.allclose(loss, total)
    assert not model.lm.training and not objective.mlm_head.training  # the frozen LM stays in eval mode
    objective.eval()
    assert objective(images)[1].mlm == 0  # no masking at eval


def test_gradients_reach_encoder_not_lm(tiny_lm_dir):
    objective = tiny_objective(tiny_lm_dir)
    model = objective.model
    objective(torch.rand(2, 3, 16, 16), generator=torch.Generator().manual_seed(0))[2].backward()
    assert all(p.grad is None for p in model.lm.parameters())
    assert all(p.grad is None for p in objective.mlm_head.parameters())
    assert model.encoder.patchify.weight.grad.abs().sum() > 0
    assert model.decoder.to_pixels.weight.grad.abs().sum() > 0


def test_encode_is_deterministic_and_decode_inverts_shapes(tiny_model):
    images = torch.rand(3, 3, 16, 16)
    ids = tiny_model.encode(images)
    assert torch.equal(ids, tiny_model.encode(images))
    assert set(ids.flatten().tolist()) <= set(tiny_model.codebook.code_to_token.tolist())
    decoded = tiny_model.decode(ids)
    assert decoded.shape == images.shape and decoded.min() >= 0 and decoded.max() <= 1
    assert torch.allclose(decoded, tiny_model.reconstruct(images))


def test_lm_without_mlm_head_skips_mlm_loss_with_one_warning_only_when_masking(tiny_lm_no_head_dir, caplog):
    with caplog.at_level("WARNING", logger="lqae"):
        objective = tiny_objective(tiny_lm_no_head_dir)
    assert objective.mlm_head is None and "no MLM head" in caplog.text
    assert objective(torch.rand(2, 3, 16, 16), generator=torch.Generator().manual_seed(0))[1].mlm == 0
    caplog.clear()
    with caplog.at_level("WARNING", logger="lqae"):
        tiny_objective(tiny_lm_no_head_dir, mask=Masking(ratio=0.0))
    assert caplog.text == ""  # no mask, no MLM loss: nothing to warn about (the default path)


def test_bad_config_is_a_clear_error(tiny_lm_dir):
    with pytest.raises(ConfigError, match="divisible by patch size"):
        tiny_model_config(tiny_lm_dir, patch_size=5)
    with pytest.raises(ConfigError, match="vocab is unknown; choose one of: all, words"):
        tiny_model_config(tiny_lm_dir, vocab="subwords")


def test_presets_cover_reference_decisions():
    paper = get_preset("paper")
    m, t = paper.model, paper.train
    assert (m.image_size, m.patch_size, m.encoder_width, m.encoder_depth, m.encoder_heads) == (256, 16, 768, 12, 12)
    assert m.lm_name == "roberta-base" and m.vocab == "all" and t.mask.ratio == 0.5
    assert (m.search_space, m.decoder_input, m.encoder_output, m.decoder_head) == ("embedding", "lm", "linear", "linear")
    assert (t.commitment_weight, t.mask.mlm_weight) == (0.01, 1e-4)
    assert (t.batch_size, t.epochs, t.base_lr, t.weight_decay, t.beta2, t.warmup_fraction) == (512, 100, 1.5e-4, 5e-4, 0.95, 0.05)
    assert get_preset("tiny").model.lm_name == "sentence-transformers/all-MiniLM-L6-v2"
    # the recipe trains without a mask (it passes no gradient through the LM's input); paper keeps 0.5
    assert [get_preset(name).train.mask.ratio for name in ("base", "small", "tiny")] == [0.0, 0.0, 0.0]
    with pytest.raises(ConfigError, match="known presets: paper, base, small, tiny"):
        get_preset("huge")


def test_mask_never_hides_a_global_word_and_follows_its_ratio(tiny_lm_dir):
    config = tiny_model_config(tiny_lm_dir, global_tokens=2, global_vocab_size=8)
    objective = tiny_objective(tiny_lm_dir, config, mask=Masking(ratio=0.9))
    mask = objective.sample_mask(64, "cpu", torch.Generator().manual_seed(0))
    assert mask.shape == (64, 18) and not mask[:, :2].any()
    assert 0.85 < mask[:, 2:].float().mean() < 0.95


def test_the_mask_hides_codes_from_the_lm_only(tiny_lm_dir):
    """With the recipe's decoder input and a mask, the LM reads the mask token where masked and the
    decoder still reads every code's coordinates (as at decode time, where nothing is masked)."""
    config = tiny_model_config(tiny_lm_dir, decoder_input="lm_search", search_space="grid", grid_dim=3)
    objective = tiny_objective(tiny_lm_dir, config, mask=Masking(ratio=0.9))
    model = objective.model
    seen = {}
    model.decoder.register_forward_hook(lambda module, args, out: seen.update(coordinates=args[1].detach()))
    model.lm.register_forward_hook(lambda module, args, kwargs, out: seen.update(lm=kwargs["inputs_embeds"]), with_kwargs=True)
    images = torch.rand(2, 3, 16, 16)
    objective(images, generator=torch.Generator().manual_seed(0))
    mask = objective.sample_mask(2, "cpu", torch.Generator().manual_seed(0))
    assert mask.any() and torch.allclose(seen["lm"][mask], model.mask_embedding.expand(int(mask.sum()), -1))
    assert bool((seen["coordinates"].abs().sum(-1) > 0).all())  # the cube coordinates are positive, masked or not


def test_conv_head_blends_patches_at_their_seams(tiny_lm_dir):
    torch.manual_seed(0)
    config = tiny_model_config(tiny_lm_dir, decoder_head="conv", decoder_head_channels=8)
    model = LQAE(config).eval()
    assert model.decoder(torch.zeros(1, 16, model.config.lm_width)).shape == (1, 3, 16, 16)
    tokens = torch.randn(1, 16, 32, requires_grad=True)  # the decoder's last transformer states
    model.decoder.head(tokens)[0, :, 3, 3].sum().backward()  # the last pixel of patch (0, 0)
    touched = tokens.grad.abs().sum(-1)[0].nonzero().flatten().tolist()
    assert touched == [0, 1, 4, 5]  # two 3x3 convolutions reach into the neighbouring patches
    linear = LQAE(tiny_model_config(tiny_lm_dir)).eval()
    tokens.grad = None
    linear.decoder.head(tokens)[0, :, 3, 3].sum().backward()
    assert tokens.grad.abs().sum(-1)[0].nonzero().flatten().tolist() == [0]  # the reference: its own patch only


def test_the_diagnostic_decoder_reads_the_coordinates_without_the_lm(tiny_lm_dir, monkeypatch):
    torch.manual_seed(0)
    model = LQAE(tiny_model_config(tiny_lm_dir, decoder_input="search", search_space="grid", grid_dim=3)).eval()
    assert model.decoder.from_lm is None
    images = torch.rand(2, 3, 16, 16)
    ids = model.encode(images)
    monkeypatch.setattr(model, "run_lm", lambda *a, **k: pytest.fail("the LM ran"))
    codes = model.codebook.codes_from_token_ids(ids)
    expected = model.decoder(None, model.codebook.code_coordinates(codes)).clamp(0, 1)
    assert torch.allclose(model.decode(ids), expected)
    model.train()(images).reconstruction.sum().backward()
    assert model.encoder.patchify.weight.grad.abs().sum() > 0


def test_standardized_encoder_output_has_the_codebook_statistics(tiny_lm_dir):
    torch.manual_seed(0)
    model = LQAE(tiny_model_config(tiny_lm_dir, encoder_output="standardize")).train()
    codes = model.codebook.embeddings
    images = torch.rand(16, 3, 16, 16)
    z = model.encoder(images).z.flatten(0, 1)  # training mode: batch statistics
    assert torch.allclose(z.mean(0), codes.mean(0), atol=1e-4)
    assert torch.allclose(z.std(0, unbiased=False), codes.std(0), rtol=1e-2)
    out = model(images)
    assert out.quantized.codes.unique().numel() > 8  # spread over the codebook from the first step
    model.eval()  # running statistics: deterministic, independent of the batch
    one = model.encode(images[:1])
    assert torch.equal(one, model.encode(images)[:1])
    stats = model.encoder.standardize
    stats.calibrate([model.encoder(images).projected])
    flat = model.encoder(images).projected.flatten(0, 1)
    assert torch.allclose(stats.running_mean, flat.mean(0), atol=1e-5)
    assert "encoder.standardize.running_mean" in model.trainable_state_dict()  # saved with the weights
    assert "encoder.standardize.target_mean" not in model.trainable_state_dict()  # rebuilt from the LM


def test_apply_overrides_parses_values_and_names_unknown_fields():
    preset = apply_overrides(get_preset("tiny"), ["mask.ratio=0.3", "llm_vocab=null", "encoder_output=linear", "steps=7"])
    assert (preset.train.mask.ratio, preset.model.llm_vocab, preset.model.encoder_output) == (0.3, None, "linear")
    assert preset.train.steps == 7
    assert apply_overrides(get_preset("tiny"), ["distill_teacher_momentum=0.9"]).train.distill.teacher_momentum == 0.9
    assert get_preset("tiny").train.mask.ratio == 0.0  # presets are not mutated
    with pytest.raises(ConfigError, match="unknown config field 'nope'.*model fields: .*grid_dim.*mask.ratio"):
        apply_overrides(get_preset("tiny"), ["nope=1"])
    with pytest.raises(ConfigError, match="expected FIELD=VALUE"):
        apply_overrides(get_preset("tiny"), ["mask.ratio"])
    with pytest.raises(ConfigError, match="mask.ratio must be between 0 and"):
        apply_overrides(get_preset("tiny"), ["mask.ratio=1.5"])


def test_configure_merges_preset_overrides_and_options():
    chosen = configure("tiny", ["mask.ratio=0.3"], lm_name="my-lm", steps=None, base_lr=1e-3, seed=None)
    assert (chosen.train.mask.ratio, chosen.model.lm_name, chosen.train.base_lr) == (0.3, "my-lm", 1e-3)
    assert chosen.train.steps == get_preset("tiny").train.steps and chosen.train.seed == 0  # None keeps the preset's
    assert configure("tiny", mask_ratio=0.2).train.mask.ratio == 0.2  # a group's field as a keyword
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


def test_the_recipes_read_of_the_lm_starts_at_zero_and_learns(tiny_lm_dir):
    config = tiny_model_config(tiny_lm_dir, decoder_input="lm_search", search_space="grid", grid_dim=3)
    objective = tiny_objective(tiny_lm_dir, config, mask=Masking(ratio=0.0))
    model = objective.model
    assert not model.decoder.from_lm.weight.any() and model.decoder.from_codes.weight.abs().sum() > 0
    objective(torch.rand(2, 3, 16, 16))[2].backward()
    assert model.decoder.from_lm.weight.grad.abs().sum() > 0  # it learns to read the LM from the first step
    reference = LQAE(dataclasses.replace(config, decoder_input="lm"))
    assert reference.decoder.from_lm.weight.abs().sum() > 0  # with the LM as the only input: the usual start
