"""The codebook's vocabulary: which LM token ids may be codes.

`select_token_ids` is the filter every model applies (`vocab`: all non-special tokens, or whole
words). An LLM-aligned vocabulary then keeps only the words a prompting LLM reads as exactly one token after a
space, so an image of L tokens costs L LLM tokens and word boundaries survive its tokenisation.

`ModelConfig.llm_vocab` names the LLM's tokenizer as `--llm` does: `hf:NAME_OR_PATH` (a transformers
tokenizer, a folder or a .gguf file), `openai:MODEL` (tiktoken's encoding for MODEL, else
cl100k_base) or `tiktoken:ENCODING`. The chosen token ids are saved with the weights, so loading a
checkpoint never needs the LLM's tokenizer again.
"""

from __future__ import annotations

import re
from typing import Callable, Sequence

from lqae.errors import ConfigError
from lqae.llm_files import DEFAULT_ENCODING, load_tiktoken, resolve_llm
from lqae.model.lm import quiet_transformers

LLM_VOCAB_KINDS = ("hf", "openai", "tiktoken")
_SPECIAL_PATTERN = re.compile(r"^(\[[^\]]*\]|<[^>]*>|madeupword\d+)$")


def codebook_ids(tokenizer, vocab_rows: int, config) -> list[int]:
    """The LM ids a model config's codebook holds: `select_token_ids`, then the `llm_vocab` filter."""
    token_ids = select_token_ids(tokenizer, vocab_rows, config.vocab, config.exclude_special_tokens)
    return single_token_words(tokenizer, token_ids, config.llm_vocab) if config.llm_vocab else token_ids


def select_token_ids(tokenizer, vocab_rows: int, vocab: str = "all", exclude_special: bool = True) -> list[int]:
    """LM token ids that may serve as codes.

    vocab="all": every id with a token string (minus special tokens when exclude_special);
    vocab="words": whole alphabetic words only, no subword continuations, digits or punctuation,
    so token text reads as words and costs fewer tokens for a downstream LLM.
    """
    size = min(vocab_rows, len(tokenizer))
    tokens = tokenizer.convert_ids_to_tokens(list(range(size)))
    special = set(tokenizer.all_special_ids) if exclude_special else set()
    marker = _word_marker(tokens)
    chosen = []
    for token_id, token in enumerate(tokens):
        if token is None or token_id in special:
            continue
        if exclude_special and _SPECIAL_PATTERN.match(token):
            continue
        if vocab == "words" and not _is_whole_word(token, marker):
            continue
        chosen.append(token_id)
    return chosen


def _word_marker(tokens: list[str | None]) -> str | None:
    """The prefix marking a word start in BPE/SentencePiece vocabularies (None for WordPiece)."""
    sample = [t for t in tokens[:5000] if t]
    for marker in ("Ġ", "▁"):
        if sum(t.startswith(marker) for t in sample) > len(sample) // 10:
            return marker
    return None


def _is_whole_word(token: str, marker: str | None) -> bool:
    if marker is None:
        word = token
    elif token.startswith(marker):
        word = token[len(marker):]
    else:
        return False
    return word.isascii() and word.isalpha()


def llm_token_counter(spec: str) -> Callable[[str], int]:
    """A function giving the number of LLM tokens of a text, for a `--llm`-style spec."""
    kind, _, target = spec.partition(":")
    if kind not in LLM_VOCAB_KINDS or not target:
        raise ConfigError(
            f"llm_vocab {spec!r}: expected one of {', '.join(k + ':NAME' for k in LLM_VOCAB_KINDS)} "
            "(e.g. tiktoken:cl100k_base or hf:HuggingFaceTB/SmolLM2-135M-Instruct)"
        )
    if kind == "hf":
        from transformers import AutoTokenizer

        location, gguf_file = resolve_llm(target)
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(location, **({"gguf_file": gguf_file} if gguf_file else {}))
        return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])
    if kind == "tiktoken" and target != DEFAULT_ENCODING:
        import tiktoken

        encoding = tiktoken.get_encoding(target)
    else:
        encoding = load_tiktoken(target if kind == "openai" else None)
    return lambda text: len(encoding.encode(text, disallowed_special=()))


def single_token_words(lm_tokenizer, token_ids: Sequence[int], spec: str) -> list[int]:
    """The ids among `token_ids` whose word (the LM token as text) the LLM of `spec` reads as one
    token after a space, in order."""
    count = llm_token_counter(spec)
    words = [lm_tokenizer.decode([i]).strip() for i in token_ids]
    kept = [i for i, word in zip(token_ids, words) if word and count(" " + word) == 1]
    if not kept:
        raise ConfigError(f"no word of the LM's vocabulary is one token of {spec}; check llm_vocab")
    return kept
