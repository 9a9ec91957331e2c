"""The frozen language codebook: the search, its invariants, the grid, the vocabulary filter, and
the registry of search spaces."""

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model_config, tiny_train_config

from lqae import checkpoint as ckpt
from lqae.config import CHOICES
from lqae.errors import ConfigError, TokenError
from lqae.layout import TokenLayout
from lqae.model import LQAE
from lqae.model.codebook import SEARCH_SPACES, codebook_class
from lqae.model.codebook.base import LanguageCodebook
from lqae.model.codebook.grid import cell_centres, grid_assignment, grid_levels
from lqae.model.codebook.search import nearest_codes
from lqae.model.vocab import _is_whole_word, _word_marker, select_token_ids


def build_codebook(words, token_ids, search_space="embedding", global_tokens=0, **options):
    layout = TokenLayout(global_tokens, 2)
    return codebook_class(search_space)(words, token_ids, layout, global_vocab_size=2, **options)


def brute_force(vectors, codebook):
    """Reference search: cosine similarity of every pair, one row at a time."""
    out = []
    for v in vectors:
        sims = torch.stack([F.cosine_similarity(v, c, dim=0) for c in codebook])
        out.append(int(sims.argmax()))
    return torch.tensor(out)


def test_nearest_codes_matches_brute_force_and_chunking():
    torch.manual_seed(0)
    codebook = torch.randn(50, 8)
    vectors = torch.randn(37, 8) * 3
    normalized = F.normalize(codebook, dim=-1)
    expected = brute_force(vectors, codebook)
    for chunk in (1, 5, 37, 1000):
        assert torch.equal(nearest_codes(vectors, normalized, chunk), expected)


def test_codebook_forward_invariants():
    torch.manual_seed(0)
    words = torch.randn(30, 6)
    token_ids = [3, 5, 7, 11, 13, 17, 19, 23]
    codebook = build_codebook(words, token_ids)
    codebook.chunk_tokens = 4
    z = torch.randn(2, 5, 6, requires_grad=True)
    out = codebook(z)
    assert out.codes.shape == (2, 5) and out.codes.min() >= 0 and out.codes.max() < len(token_ids)
    # the LM reads exactly the raw (un-normalised) LM embedding of the chosen token, a frozen value
    assert torch.allclose(out.embedded, words[out.token_ids]) and out.embedded.grad_fn is None
    assert torch.equal(out.token_ids, torch.tensor(token_ids)[out.codes])
    assert set(out.token_ids.flatten().tolist()) <= set(token_ids)
    # the coordinates are the chosen codes' unit vectors, straight-through to z
    assert torch.allclose(out.coordinates, F.normalize(words[out.token_ids], dim=-1), atol=1e-6)
    out.coordinates.sum().backward()
    assert z.grad.abs().sum() > 0
    # commitment loss is mean((sg(e) - z)^2) and pulls only z
    expected = ((words[out.token_ids] - z.detach()) ** 2).mean()
    assert torch.allclose(out.commitment, expected)


def test_codebook_is_not_saved_in_state_dict():
    codebook = build_codebook(torch.randn(10, 4), [1, 2, 3])
    assert codebook.state_dict() == {}


def test_codes_from_token_ids_rejects_non_codes():
    codebook = build_codebook(torch.randn(10, 4), [1, 2, 3])
    assert codebook.codes_from_token_ids(torch.tensor([[3, 1]])).tolist() == [[2, 0]]
    with pytest.raises(TokenError, match="not codes"):
        codebook.codes_from_token_ids(torch.tensor([0]))
    with pytest.raises(TokenError, match="out of range"):
        codebook.codes_from_token_ids(torch.tensor([10]))


def test_vocab_filters(tiny_lm_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dir)
    rows = len(tokenizer)
    every = select_token_ids(tokenizer, rows, "all")
    words = select_token_ids(tokenizer, rows, "words")
    tokens_all = tokenizer.convert_ids_to_tokens(every)
    tokens_words = tokenizer.convert_ids_to_tokens(words)
    assert not set(tokenizer.all_special_ids) & set(every)
    assert "##ba" in tokens_all and "." in tokens_all
    assert len(tokens_words) == 144 and all(t.isalpha() and not t.startswith("##") for t in tokens_words)
    with_specials = select_token_ids(tokenizer, rows, "all", exclude_special=False)
    assert tokenizer.mask_token_id in with_specials


def test_word_filter_for_byte_level_bpe():
    tokens = ["Ġthe"] * 10 + ["ing", "Ġ123", "Ġcat", "."]
    marker = _word_marker(tokens)
    assert marker == "Ġ"
    assert [_is_whole_word(t, marker) for t in ["Ġthe", "ing", "Ġ123", "Ġcat", "."]] == [True, False, False, True, False]


def test_top_k_search_is_sorted_and_starts_with_the_nearest():
    torch.manual_seed(0)
    normalized = F.normalize(torch.randn(50, 8), dim=-1)
    vectors = torch.randn(23, 8)
    top = nearest_codes(vectors, normalized, 5, k=4)
    assert top.shape == (23, 4) and torch.equal(top[:, 0], nearest_codes(vectors, normalized, 5))
    sims = F.normalize(vectors, dim=-1) @ normalized.T
    chosen = sims.gather(1, top)
    assert (chosen[:, :-1] >= chosen[:, 1:]).all()
    assert torch.equal(chosen[:, -1], sims.topk(4, dim=-1).values[:, -1])


def test_grid_levels_are_even_and_fit_the_codebook():
    assert grid_levels(21745, 6) == [6, 5, 5, 5, 5, 5]  # MiniLM's words: 18,750 cells
    assert grid_levels(21745, 5) == [8, 7, 7, 7, 7]
    assert grid_levels(144, 4) == [4, 4, 3, 3]
    assert grid_levels(144, 3) == [5, 5, 5]  # the test LM's words: 19 without a cell
    assert grid_levels(81, 4) == [3, 3, 3, 3]  # an exact power
    for count, dim in ((40, 4), (1000, 3), (16, 4)):
        levels = grid_levels(count, dim)
        assert len(levels) == dim and max(levels) - min(levels) <= 1
        assert torch.tensor(levels).prod() <= count
    with pytest.raises(ConfigError, match="at least 64 codes.*lower grid_dim"):
        grid_levels(40, 6)


def test_cell_centres_first_side_most_significant():
    levels = torch.tensor([3, 2, 4])
    centres = cell_centres(torch.tensor([0, 1, 4, 23]), levels)
    expected = torch.tensor([[0, 0, 0], [0, 0, 1], [0, 1, 0], [2, 1, 3]]).float().add(0.5) / levels.float()
    assert torch.allclose(centres, expected)


def test_grid_assignment_gives_each_cell_one_word_and_recovers_a_lattice():
    levels = [3, 4, 2]
    centres = cell_centres(torch.arange(24), torch.tensor(levels))
    shuffle = torch.randperm(24, generator=torch.Generator().manual_seed(0))
    jitter = (torch.rand(24, 3, generator=torch.Generator().manual_seed(1)) - 0.5) * 0.1  # inside each cell
    cells = grid_assignment(centres[shuffle] + jitter, levels)
    assert torch.equal(cells, shuffle)  # every word lands in the cell it sits in
    torch.manual_seed(0)
    cube = torch.rand(100, 3)  # more words than cells: each cell one word, the rest none
    cells = grid_assignment(cube, levels)
    assigned = cells[cells >= 0]
    assert torch.equal(assigned.sort().values, torch.arange(24))
    assert torch.equal(grid_assignment(cube, levels), cells)  # deterministic


def test_grid_search_picks_the_cell_the_query_falls_in(tiny_lm_dir, tmp_path):
    torch.manual_seed(0)
    model = LQAE(tiny_model_config(
        tiny_lm_dir, search_space="grid", grid_dim=3, encoder_output="standardize", global_tokens=2, global_vocab_size=8,
    ))
    codebook = model.codebook
    levels = torch.tensor(grid_levels(codebook.size, 3))  # 144 words: 5,5,5 = 125 cells
    assigned = codebook.grid_cells >= 0
    assert int(assigned.sum()) == 125 and len(set(codebook.grid_cells[assigned].tolist())) == 125
    assert (codebook.grid_cells[codebook.global_codes] >= 0).all()  # global words have cells too
    z = torch.randn(2, 18, model.config.lm_width)  # 2 global + 16 patch tokens
    out = codebook.eval()(z)
    query = codebook._cube((z[:, 2:] - codebook.pca_mean) @ codebook.pca_directions.T)  # (2, 16, 3)
    cell = (query * levels).floor().clamp(max=levels - 1)
    assert torch.allclose(out.coordinates[:, 2:], (cell + 0.5) / levels, atol=1e-6)  # the centre of the query's cell
    assert (codebook.grid_cells[out.codes] >= 0).all()
    model.train()(torch.rand(2, 3, 16, 16)).reconstruction.sum().backward()
    ckpt.save_checkpoint(tmp_path / "run", model, tiny_train_config(), step=1)
    loaded = ckpt.load_model(tmp_path / "run")
    assert torch.equal(loaded.codebook.grid_cells, codebook.grid_cells)  # saved, not refitted
    images = torch.rand(3, 3, 16, 16)
    assert torch.equal(loaded.encode(images), model.eval().encode(images))
    tokens = model.encode(images)
    assert (loaded.decode(tokens) - model.decode(tokens)).abs().max() <= 1e-5


def test_every_registered_search_space_builds_and_unknown_spaces_are_listed():
    assert list(CHOICES["search_space"]) == list(SEARCH_SPACES)
    words = torch.randn(80, 8)
    for space in SEARCH_SPACES:
        codebook = build_codebook(words, list(range(80)), search_space=space, global_tokens=1)
        assert isinstance(codebook, LanguageCodebook) and codebook.dim > 0
        out = codebook(torch.randn(2, 5, 8))
        assert torch.equal(out.token_ids, codebook.code_to_token[out.codes])
        assert out.coordinates.shape == (2, 5, codebook.dim) and out.global_scores.shape == (2, 1, 2)
    with pytest.raises(ConfigError, match="choose one of: embedding, grid"):
        codebook_class("hyperbolic")
    with pytest.raises(ConfigError, match="search_space is unknown; choose one of: embedding, grid"):
        tiny_model_config("lm", search_space="hyperbolic")


class FirstCoordinates(LanguageCodebook):
    """A toy search space: the first `width` coordinates of each embedding, nearest by cosine."""

    @classmethod
    def options(cls, config) -> dict:
        return {"width": config.grid_dim}

    def init_space(self, embeddings, fit, width=2):
        self.dim = width
        self.register_buffer("rows", F.normalize(embeddings[:, :width], dim=-1), persistent=False)

    def queries(self, z):
        return F.normalize(z[..., : self.dim], dim=-1)

    def code_vectors(self):
        return self.rows


def test_a_search_space_is_one_class_and_one_registry_line(tiny_lm_dir, monkeypatch, tmp_path):
    monkeypatch.setitem(SEARCH_SPACES, "first", FirstCoordinates)  # the registry line
    config = tiny_model_config(tiny_lm_dir, search_space="first", grid_dim=3, decoder_input="lm_search")
    torch.manual_seed(0)
    model = LQAE(config)
    assert type(model.codebook) is FirstCoordinates and model.decoder.from_codes.in_features == 3
    images = torch.rand(3, 3, 16, 16)
    out = model.train()(images)
    z = model.encoder(images).z
    expected = (F.normalize(z[..., :3], dim=-1) @ model.codebook.rows.T).argmax(-1)
    assert torch.equal(out.quantized.codes, expected)
    out.reconstruction.sum().backward()
    assert model.encoder.patchify.weight.grad.abs().sum() > 0  # the encoder learns through the coordinates
    ckpt.save_checkpoint(tmp_path / "run", model, tiny_train_config(), step=1)
    loaded = ckpt.load_model(tmp_path / "run")
    assert torch.equal(loaded.encode(images), model.eval().encode(images))


def test_the_recipe_passes_no_gradient_through_the_lms_input(tiny_lm_dir):
    torch.manual_seed(0)
    config = tiny_model_config(
        tiny_lm_dir, search_space="grid", grid_dim=3, decoder_input="lm_search", encoder_output="standardize",
    )
    model = LQAE(config).train()
    z = torch.randn(2, 16, model.config.lm_width, requires_grad=True)
    out = model.codebook(z)
    assert model.reads.lm_input(z, out.embedded).grad_fn is None and out.coordinates.grad_fn is not None
    model(torch.rand(2, 3, 16, 16)).reconstruction.sum().backward()
    assert model.encoder.patchify.weight.grad.abs().sum() > 0  # through the coordinates the decoder reads


def test_the_reference_learns_through_the_lm_by_a_straight_through_estimator(tiny_lm_dir):
    torch.manual_seed(0)
    model = LQAE(tiny_model_config(tiny_lm_dir)).train()
    z = torch.randn(2, 16, model.config.lm_width, requires_grad=True)
    out = model.codebook(z)
    lm_input = model.reads.lm_input(z, out.embedded)
    assert torch.allclose(lm_input, out.embedded, atol=1e-6)  # the value: the code's embedding
    lm_input.sum().backward()
    assert torch.equal(z.grad, torch.ones_like(z))  # the gradient: reaches z unchanged
