import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model_config, tiny_train_config

from lqae import checkpoint as ckpt
from lqae.config import CHOICES
from lqae.errors import ConfigError, TokenError
from lqae.model import LQAE
from lqae.model.quantizer import (
    CODEBOOKS, _MixtureGradient, build_codebook, cell_centres, grid_assignment, grid_levels, _is_whole_word, _word_marker,
    nearest_codes, rotate_onto, select_token_ids,
)


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
    codebook = build_codebook(words, token_ids, chunk_tokens=4)
    z = torch.randn(2, 5, 6, requires_grad=True)
    out = codebook(z)
    assert out.codes.shape == (2, 5) and out.codes.min() >= 0 and out.codes.max() < len(token_ids)
    # the forward value is exactly the raw (un-normalised) LM embedding of the chosen token
    assert torch.allclose(out.quantized, words[out.token_ids])
    assert torch.equal(out.token_ids, torch.tensor(token_ids)[out.codes])
    assert set(out.token_ids.flatten().tolist()) <= set(token_ids)
    # straight-through: the gradient of the quantized value reaches z unchanged
    out.quantized.sum().backward()
    assert torch.allclose(z.grad, torch.ones_like(z))
    # commitment loss is mean((sg(e) - z)^2) and pulls only z
    expected = ((words[out.token_ids] - z.detach()) ** 2).mean()
    assert torch.allclose(out.commitment_loss, expected)


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


def test_rotation_trick_forward_is_the_code_and_gradient_is_rotated():
    torch.manual_seed(0)
    z = (torch.randn(5, 8) * 3).requires_grad_(True)
    target = torch.randn(5, 8)
    out = rotate_onto(z, target)
    assert torch.allclose(out, target)  # forward value: exactly the code
    grad = torch.randn(5, 8)
    out.backward(grad)
    # the gradient goes through s R with R a rotation: its norm scales by s = |e| / |z| exactly
    scale = target.norm(dim=-1) / z.detach().norm(dim=-1)
    assert torch.allclose(z.grad.norm(dim=-1), scale * grad.norm(dim=-1), rtol=1e-4)
    # and the gradient along e's direction arrives along z's direction: R^T e_hat = z_hat
    z.grad = None
    rotate_onto(z, target).backward(F.normalize(target, dim=-1))
    assert torch.allclose(F.normalize(z.grad, dim=-1), F.normalize(z.detach(), dim=-1), atol=1e-5)


def test_unit_output_removes_the_norm_from_the_gradient_and_cosine_commitment():
    torch.manual_seed(0)
    words = torch.randn(30, 6)
    codebook = build_codebook(words, list(range(3, 25)), encoder_output="unit", commitment="cosine")
    z = (torch.randn(2, 5, 6) * 10).requires_grad_(True)
    out = codebook(z)
    assert torch.allclose(out.quantized, words[out.token_ids])  # still the raw embedding of a real token
    assert torch.allclose(out.encoder_norm, z.detach().norm(dim=-1).mean())
    expected = 1 - F.cosine_similarity(z.detach(), words[out.token_ids], dim=-1).mean()
    assert torch.allclose(out.commitment_loss, expected)
    out.quantized.sum().backward()
    radial = (z.grad * z.detach()).sum(-1)  # only the direction is learned: no gradient along z
    assert radial.abs().max() < 1e-4


@pytest.mark.parametrize("space", ["latent", "mapped"])
def test_learned_search_space_picks_nearest_in_that_space_and_trains_its_map(space):
    torch.manual_seed(0)
    words = torch.randn(40, 8)
    codebook = build_codebook(words, list(range(40)), search_space=space, latent_dim=4)
    z = torch.randn(3, 7, 8, requires_grad=True)
    out = codebook(z)
    query, codes = codebook.search_vectors(z.detach())
    assert torch.equal(out.codes, (query @ codes.T).argmax(-1))
    assert torch.allclose(out.quantized, words[out.token_ids])  # the LM still gets the raw embedding
    assert out.codebook_loss > 0
    (out.commitment_loss + out.codebook_loss).backward()
    weights = [p for p in codebook.parameters()]
    assert weights and all(p.grad is not None and p.grad.abs().sum() > 0 for p in weights)
    assert set(codebook.state_dict()) == {name for name, _ in codebook.named_parameters()}  # maps saved, codebook not
    if space == "mapped":  # SimVQ's map starts as the identity: the same codes as the plain search
        plain = build_codebook(words, list(range(40)))
        assert torch.equal(build_codebook(words, list(range(40)), search_space="mapped")(z).codes, plain(z).codes)


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


def test_soft_straight_through_forwards_the_code_and_prefers_codes_that_lower_the_loss():
    torch.manual_seed(0)
    words = torch.randn(30, 6)
    codebook = build_codebook(words, list(range(30)), straight_through="soft", soft_top_k=5, soft_temperature=0.1)
    z = torch.randn(1, 1, 6, requires_grad=True)
    out = codebook(z)
    assert torch.allclose(out.quantized, words[out.token_ids])  # forward: exactly the nearest code
    _, candidates = (F.normalize(z.detach(), dim=-1)[0] @ F.normalize(words, dim=-1).T).topk(5)
    better = candidates[0, 3]  # a candidate that is not the nearest
    # a loss that is lower the closer the LM input is to `better`: one gradient step turns z towards it
    loss = -(out.quantized * words[better]).sum()
    loss.backward()
    step = z.detach() - 0.5 * z.grad
    before = F.cosine_similarity(z.detach().flatten(), words[better], dim=0)
    after = F.cosine_similarity(step.flatten(), words[better], dim=0)
    assert after > before
    codebook.eval()
    assert codebook(z).quantized.requires_grad  # eval: plain nearest code (no top-k work)


def test_mixture_gradient_equals_the_explicit_mixture():
    torch.manual_seed(0)
    embeddings = torch.randn(20, 6)
    candidates = torch.randint(0, 20, (2, 3, 4))
    logits = torch.randn(2, 3, 4, requires_grad=True)
    grad = torch.randn(2, 3, 6)
    weights = logits.softmax(-1)
    explicit = (weights.unsqueeze(-1) * embeddings[candidates]).sum(-2)
    (explicit - explicit.detach()).backward(grad)
    expected, logits.grad = logits.grad.clone(), None
    out = _MixtureGradient.apply(logits.softmax(-1), candidates, embeddings, 2)  # chunks of 2 tokens
    assert torch.equal(out, torch.zeros(2, 3, 6))
    out.backward(grad)
    assert torch.allclose(logits.grad, expected, atol=1e-6)


def test_uniform_search_is_euclidean_nearest_in_the_unit_cube(tiny_lm_dir):
    torch.manual_seed(0)
    model = LQAE(tiny_model_config(tiny_lm_dir, search_space="uniform", latent_dim=4, encoder_output="standardize"))
    codebook = model.codebook
    cube = codebook.code_coordinates(torch.arange(codebook.size))  # (K, 4)
    assert cube.min() > 0 and cube.max() < 1  # inside the unit cube
    assert (cube.mean(0) - 0.5).abs().max() < 0.15  # about evenly filled: centred on each axis
    z = torch.randn(2, 16, model.config.lm_width)
    out = codebook.eval()(z)
    query = codebook._cube((z - codebook.pca_mean) @ codebook.pca_directions.T)  # (2, 16, 4)
    expected = torch.cdist(query.flatten(0, 1), cube).argmin(-1).view(2, 16)
    assert torch.equal(out.codes, expected)
    assert torch.allclose(out.coordinates, cube[expected], atol=1e-6)
    model.train()(torch.rand(2, 3, 16, 16)).loss.backward()  # soft straight-through and usage run


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
    with pytest.raises(ConfigError, match="at least 64 codes.*lower latent_dim"):
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
        tiny_lm_dir, search_space="grid", latent_dim=3, encoder_output="standardize", global_tokens=2, global_vocab_size=8,
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
    model.train()(torch.rand(2, 3, 16, 16)).loss.backward()  # soft straight-through and usage run
    ckpt.save_checkpoint(tmp_path / "run", model, tiny_train_config(), step=1)
    loaded = ckpt.load_model(tmp_path / "run")
    assert torch.equal(loaded.codebook.grid_cells, codebook.grid_cells)  # saved, not refitted
    images = torch.rand(3, 3, 16, 16)
    assert torch.equal(loaded.encode(images), model.eval().encode(images))
    tokens = model.encode(images)
    assert (loaded.decode(tokens) - model.decode(tokens)).abs().max() <= 1e-5


def test_one_codebook_class_per_search_space_and_unknown_spaces_listed():
    assert sorted(CODEBOOKS) == sorted(CHOICES["search_space"])
    words = torch.randn(40, 8)
    for space, cls in CODEBOOKS.items():
        codebook = build_codebook(words, list(range(40)), search_space=space, latent_dim=4)
        assert type(codebook) is cls and codebook.search_space == space
        out = codebook(torch.randn(2, 3, 8))
        assert torch.equal(out.token_ids, codebook.code_to_token[out.codes])
    with pytest.raises(ConfigError, match="choose one of: embedding"):
        build_codebook(words, list(range(40)), search_space="hyperbolic")


def test_no_straight_through_leaves_the_encoder_the_decoders_coordinates(tiny_lm_dir):
    torch.manual_seed(0)
    config = tiny_model_config(
        tiny_lm_dir, straight_through="none", search_space="grid", latent_dim=3, decoder_input="lm_search",
        encoder_output="standardize", mask_ratio=0.0,
    )
    model = LQAE(config).train()
    z = torch.randn(2, 16, model.config.lm_width, requires_grad=True)
    out = model.codebook(z)
    assert out.quantized.grad_fn is None and out.coordinates.grad_fn is not None  # the words carry no gradient
    model(torch.rand(2, 3, 16, 16)).losses.reconstruction.backward()
    assert model.encoder.patchify.weight.grad.abs().sum() > 0  # through the coordinates the decoder reads


def test_no_straight_through_needs_a_decoder_that_reads_the_coordinates(tiny_lm_dir):
    with pytest.raises(ConfigError, match="straight_through=none.*decoder_input=lm .*use decoder_input=lm_search"):
        tiny_model_config(tiny_lm_dir, straight_through="none", decoder_input="lm")
