"""Global tokens: G learned queries quantized to their own word sets, first in every sequence,
trained by self-distillation between two views; and what reads them (token text, datasets, few-shot)."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from conftest import tiny_model_config, tiny_objective, tiny_train_config
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from lqae import checkpoint as ckpt
from lqae.images.files import scan_image_folder
from lqae.config import Distillation
from lqae.model.distill import SelfDistillation, sinkhorn
from lqae.errors import ConfigError, TokenError
from lqae.fewshot.backends.base import Request
from lqae.fewshot.backends.overlap import OverlapBackend
from lqae.fewshot.budget import load_tiktoken
from lqae.fewshot.episodes import pool_from_dataset
from lqae.fewshot.image_text import PromptImageText
from lqae.layout import TokenLayout
from lqae.model import LQAE
from lqae.probe import ProbeConfig, run_probe
from lqae.probe.features import pool
from lqae.probe.layers import feature_dim
from lqae.model.codebook.search import farthest_points
from lqae.model.vocab import select_token_ids
from lqae.tokendata import encode_folder_to_file, read_token_dataset
from lqae.tokentext import TokenText
from lqae.training import train
from lqae_cli.app import app

G, WORDS = 2, 8


def global_config(lm_dir, **overrides):
    fields = dict(global_tokens=G, global_vocab_size=WORDS)
    fields.update(overrides)
    return tiny_model_config(lm_dir, **fields)


@pytest.fixture
def global_model(tiny_lm_dir):
    torch.manual_seed(0)
    return LQAE(global_config(tiny_lm_dir)).eval()


def test_global_words_come_first_and_from_their_own_sets(global_model):
    config = global_model.config
    assert config.num_tokens == G + config.layout.grid**2 and config.layout.global_tokens == G
    sets = global_model.codebook.global_codes  # (G, V_g) code indices
    assert sets.shape == (G, WORDS)
    assert len(set(sets.flatten().tolist())) == G * WORDS  # disjoint
    images = torch.rand(5, 3, 16, 16)
    ids = global_model.encode(images)
    assert ids.shape == (5, config.num_tokens)
    codes = global_model.codebook.codes_from_token_ids(ids)
    for g in range(G):
        assert set(codes[:, g].tolist()) <= set(sets[g].tolist())
    assert global_model.decode(ids).shape == (5, 3, 16, 16)


def test_farthest_points_spread_the_sets():
    torch.manual_seed(0)
    rows = torch.nn.functional.normalize(torch.randn(500, 8), dim=-1)
    chosen = farthest_points(rows, 20)
    assert len(set(chosen.tolist())) == 20
    spread = rows[chosen] @ rows[chosen].T
    random_pick = rows[:20] @ rows[:20].T
    off = ~torch.eye(20, dtype=torch.bool)
    assert spread[off].max() < random_pick[off].max()  # farther apart than 20 arbitrary rows


def test_invariance_loss_needs_a_second_view_and_trains_the_student(tiny_lm_dir):
    objective = tiny_objective(tiny_lm_dir, global_config(tiny_lm_dir))
    model, distill = objective.model, objective.distill
    images = torch.rand(4, 3, 16, 16)
    assert objective(images)[1].invariance == 0
    _, losses, loss = objective(images, images.flip(-1))
    assert losses.invariance > 0 and torch.isfinite(loss)
    losses.invariance.backward()
    assert model.encoder.global_encoder.queries.grad.abs().sum() > 0  # the student learns
    patch_grads = [p.grad for p in model.encoder.transformer.parameters()]
    assert all(g is None or not g.any() for g in patch_grads)  # the patches' encoder is untouched
    assert all(p.grad is None for p in distill.teacher.parameters())  # the teacher only follows
    assert set(distill.state_dict()) == {f"teacher.{k}" for k in model.encoder.global_encoder.state_dict()}


def test_teacher_follows_the_student_by_ema(tiny_lm_dir):
    torch.manual_seed(0)
    model = LQAE(global_config(tiny_lm_dir))
    distill = SelfDistillation(model, Distillation(teacher_momentum=0.75))
    before = distill.teacher.queries.detach().clone()
    with torch.no_grad():
        model.encoder.global_encoder.queries.add_(1.0)
    distill.update_teacher(model.encoder.global_encoder)
    assert torch.allclose(distill.teacher.queries, before + 0.25, atol=1e-6)


def test_a_sharper_match_to_the_teacher_costs_less(tiny_lm_dir):
    distill = SelfDistillation(LQAE(global_config(tiny_lm_dir)), Distillation())
    teacher = torch.eye(WORDS).unsqueeze(1).expand(WORDS, G, WORDS).clone()  # image i: the teacher picks word i
    agreeing, disagreeing = teacher.clone(), torch.roll(teacher, 1, dims=-1)
    assert distill.loss(agreeing, agreeing, teacher, teacher) < distill.loss(disagreeing, disagreeing, teacher, teacher)


def test_sinkhorn_spreads_a_batch_evenly_over_the_words():
    torch.manual_seed(0)
    logits = torch.randn(64, 2, 8) * 2
    logits[..., 0] += 8.0  # left alone, every image would choose word 0
    q = sinkhorn(logits, iterations=50)
    assert torch.allclose(q.sum(-1), torch.ones(64, 2), atol=1e-5)  # one assignment per image and token
    assert torch.allclose(q.sum(0), torch.full((2, 8), 64 / 8), atol=1e-3)  # each word gets its share
    assert (q.argmax(-1) != 0).any()


def test_sinkhorn_stays_finite_for_sharp_scores():
    # Euclidean-style scores over a temperature of 0.04 span thousands: the plain form underflowed to 0/0
    logits = torch.randn(32, 4, 64) * 400
    logits[..., 5] -= 5000.0
    q = sinkhorn(logits)
    assert torch.isfinite(q).all() and torch.allclose(q.sum(-1), torch.ones(32, 4), atol=1e-5)


def test_training_with_global_tokens_resumes_exactly(tiny_lm_dir, image_folder, tmp_path):
    config = global_config(tiny_lm_dir)
    train(image_folder, tmp_path / "straight", config, tiny_train_config(steps=4, save_every=100))
    train(image_folder, tmp_path / "resumed", config, tiny_train_config(steps=2))
    state, _, _ = ckpt.load_train_state(tmp_path / "resumed")
    assert any(k.startswith("distill.teacher.") for k in state)  # the teacher is training state
    train(image_folder, tmp_path / "resumed", config, tiny_train_config(steps=4), resume=True)
    straight = load_file(tmp_path / "straight" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "model.safetensors")
    assert max((straight[k].double() - resumed[k].double()).abs().max().item() for k in straight) <= 1e-6
    metrics = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert all(m["invariance_loss"] > 0 for m in metrics if "invariance_loss" in m)


def test_checkpoint_round_trip_keeps_the_global_sets(tiny_lm_dir, tmp_path):
    torch.manual_seed(3)
    model = LQAE(global_config(tiny_lm_dir)).eval()
    ckpt.save_checkpoint(tmp_path / "run", model, tiny_train_config(), step=0)
    loaded = ckpt.load_model(tmp_path / "run")
    assert torch.equal(loaded.codebook.global_codes, model.codebook.global_codes)
    images = torch.rand(3, 3, 16, 16)
    assert torch.equal(loaded.encode(images), model.encode(images))
    assert (loaded.decode(model.encode(images)) - model.decode(model.encode(images))).abs().max() <= 1e-5
    light = ckpt.load_model(tmp_path / "run", encode_only=True)
    assert torch.equal(light.encode(images), model.encode(images))


def test_models_without_global_tokens_are_unchanged(tiny_lm_dir, tiny_checkpoint):
    model = ckpt.load_model(tiny_checkpoint)
    assert model.config.global_tokens == 0 and model.encoder.global_encoder is None
    assert "codebook.global_codes" not in model.trainable_state_dict()
    assert model.encode(torch.rand(2, 3, 16, 16)).shape == (2, 16)


def test_token_text_and_datasets_know_the_global_tokens(tiny_lm_dir, image_folder, tmp_path):
    torch.manual_seed(0)
    model = LQAE(global_config(tiny_lm_dir)).eval()
    text = TokenText.for_model(model)
    with pytest.raises(TokenError, match=r"18 tokens \(2 global \+ 4x4 grid\)"):
        text.check_ids([5] * 16)
    encode_folder_to_file(model, scan_image_folder(image_folder), tmp_path / "t.safetensors")
    dataset = read_token_dataset(tmp_path / "t.safetensors")
    assert dataset.ids.shape[1] == 18 and dataset.global_tokens == G
    assert pool_from_dataset(dataset, "t").global_tokens == G
    record = json.loads(text.render(dataset.ids[0].tolist(), "jsonl"))
    assert record["global_tokens"] == G and record["grid"] == [4, 4]


class Words:
    """A tokenizer for prompt text: id i is the word w<i>."""

    def decode(self, ids, skip_special_tokens=False, clean_up_tokenization_spaces=False):
        return " ".join(f"w{i}" for i in ids)


def test_prompt_text_modes_put_global_words_first():
    ids = [7, 8, 1, 2, 2, 3, 3, 3]  # two global words, then patches
    layout = TokenLayout(2, 2)  # (a 2x2 grid would have 4 patch words; the prompt text takes any number)
    assert PromptImageText(Words(), "sequence", layout)(ids) == "w7 w8 w1 w2 w2 w3 w3 w3"
    assert PromptImageText(Words(), "frequent", layout)(ids) == "w7 w8 w3 w2 w1"
    assert PromptImageText(Words(), "global", layout)(ids) == "w7 w8"
    assert PromptImageText(Words(), "sequence", layout)(ids, 3) == "w7 w8 w1"  # a cut drops patches first
    assert PromptImageText(Words(), "global", layout).full_length(8) == 2
    assert PromptImageText(Words(), "sequence", layout, global_weight=4.0).bag(ids) == Counter(
        {7: 4.0, 8: 4.0, 1: 1, 2: 2, 3: 3}
    )
    with pytest.raises(ConfigError, match="global_tokens 0"):
        PromptImageText(Words(), "global", TokenLayout(0, 2))


def test_overlap_weighs_a_shared_global_word():
    # the query shares its global word (9) with support 0, and two patch words with support 1
    supports = [[9, 1, 2, 3, 4], [8, 5, 6, 3, 4]]
    query = [9, 5, 6, 7, 7]

    def answer(weight: float) -> int:
        request = Request([], ["a", "b"], supports, [0, 1], [query], layout=TokenLayout(1, 2), global_weight=weight)
        return OverlapBackend().constrained(request)[0]

    assert answer(1.0) == 1 and answer(4.0) == 0


def test_fewshot_and_show_with_a_global_model(tiny_lm_dir, image_folder, tmp_path):
    torch.manual_seed(0)
    ckpt.save_checkpoint(tmp_path / "run", LQAE(global_config(tiny_lm_dir)), tiny_train_config(), step=0)
    runner = CliRunner()
    image = next(iter(sorted((image_folder / "red").glob("*.png"))))
    shown = runner.invoke(app, ["encode", str(image), "-m", str(tmp_path / "run"), "--show", str(tmp_path / "s.png")])
    assert shown.exit_code == 0, shown.output
    assert len(shown.stdout.split()) >= 18  # the token text: 2 global + 16 patch words
    picture = Image.open(tmp_path / "s.png")
    assert picture.height > picture.width // 2 > 0  # two images side by side, the global words above
    grid = runner.invoke(app, ["encode", str(image), "-m", str(tmp_path / "run"), "--grid"])
    assert grid.exit_code == 0 and "global:" in grid.stdout
    result = runner.invoke(app, [
        "fewshot", "--support", str(image_folder), "--query", str(image_folder), "-m", str(tmp_path / "run"),
        "--llm", "overlap", "--episodes", "5", "--image-text", "global", "--json",
    ])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["episodes"] == 5


def test_llm_vocab_keeps_one_token_words_and_is_saved_with_the_weights(tiny_lm_dir, tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = LQAE(tiny_model_config(tiny_lm_dir, llm_vocab="tiktoken:cl100k_base"))
    encoding = load_tiktoken(None)
    words = select_token_ids(model.tokenizer, len(model.tokenizer), "words")
    expected = [i for i in words if len(encoding.encode(" " + model.tokenizer.decode([i]).strip())) == 1]
    assert 0 < len(expected) < len(words)
    assert model.codebook.code_to_token.tolist() == expected and model.config.codebook_size == len(expected)
    ckpt.save_checkpoint(tmp_path / "run", model, tiny_train_config(), step=0)
    assert "codebook.code_to_token" in load_file(tmp_path / "run" / "model.safetensors")

    def refuse(*args, **kwargs):
        raise AssertionError("loading a checkpoint must not need the LLM's tokenizer")

    monkeypatch.setattr("lqae.model.vocab.single_token_words", refuse)
    images = torch.rand(2, 3, 16, 16)
    for loaded in (ckpt.load_model(tmp_path / "run"), ckpt.load_model(tmp_path / "run", encode_only=True)):
        assert loaded.codebook.code_to_token.tolist() == expected
        assert torch.equal(loaded.encode(images), model.eval().encode(images))


def test_llm_vocab_names_its_tokenizer_like_llm(tiny_lm_dir):
    with pytest.raises(ConfigError, match="tiktoken:cl100k_base"):
        LQAE(tiny_model_config(tiny_lm_dir, llm_vocab="cl100k_base"))


def test_probe_pools_global_tokens_apart(tiny_lm_dir, image_folder):
    states = torch.arange(30, dtype=torch.float32).view(1, 5, 6)  # (B, L=5, D=6): 1 global word, 2x2 grid
    assert torch.equal(pool(states, TokenLayout(1, 2)), torch.cat([states[:, 0], states[:, 1:].mean(1)], dim=1))
    assert torch.equal(pool(states, TokenLayout(0, 2)), states.mean(1))  # no global words
    assert torch.equal(pool(states[:, 1:], TokenLayout(1, 2)), states[:, 1:].mean(1))  # the encoder's: patches only
    torch.manual_seed(0)
    model = LQAE(global_config(tiny_lm_dir)).eval()
    assert feature_dim(model, ["lm:0"]) == 2 * model.config.lm_width
    assert feature_dim(model, ["lm:0", "enc:1"]) == 2 * model.config.lm_width + model.config.encoder_width
    report, _ = run_probe(model, image_folder, image_folder, ProbeConfig(layers="lm:0,lm:-1", epochs=2, baselines=()))
    assert report.probe.feature_dim == 4 * model.config.lm_width
    report, _ = run_probe(model, image_folder, image_folder, ProbeConfig(layers="enc:1", epochs=2, baselines=()))
    assert report.probe.feature_dim == model.config.encoder_width  # the encoder's states: the patches only
