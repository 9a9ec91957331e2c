import pytest
import torch
import torch.nn.functional as F

from lqae.errors import TokenError
from lqae.quantizer import LanguageCodebook, nearest_codes, select_token_ids


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
    codebook = LanguageCodebook(words, token_ids, chunk_tokens=4)
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
    codebook = LanguageCodebook(torch.randn(10, 4), [1, 2, 3])
    assert codebook.state_dict() == {}


def test_codes_from_token_ids_rejects_non_codes():
    codebook = LanguageCodebook(torch.randn(10, 4), [1, 2, 3])
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
    from lqae.quantizer import _is_whole_word, _word_marker

    tokens = ["Ġthe"] * 10 + ["ing", "Ġ123", "Ġcat", "."]
    marker = _word_marker(tokens)
    assert marker == "Ġ"
    assert [_is_whole_word(t, marker) for t in ["Ġthe", "ing", "Ġ123", "Ġcat", "."]] == [True, False, False, True, False]
