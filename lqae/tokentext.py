"""An image's LM token ids written as text, and read back with every check `decode` needs.

Three written forms of the same (L,) ids, L = tokens per image (the global tokens first, when the
model has them, then the patches in row order):
- "tokens": the LM's token strings joined by single spaces (`##ing`, `Ġthe` kept as they are).
  Token strings hold no whitespace, so this form round-trips exactly.
- "text": the tokenizer's decoded string, as the paper prints it
  (`international international vegetation shards ...`). It reads back only when re-tokenising
  gives exactly L codes, which holds for whole-word vocabularies (the tiny/small presets).
- "ids": the integers.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from enum import Enum
from typing import Sequence

from lqae.errors import TokenError
from lqae.layout import TokenLayout

_LINE_BREAKS = re.compile(r"[\r\n\t\v\f\x1c-\x1e\x85\u2028\u2029]")


def decode_text(tokenizer, ids: Sequence[int]) -> str:
    """The "text" form of (L,) ids: the tokenizer's decoded string, special tokens kept, on one line
    (line breaks inside tokens become spaces). `lqae encode` prints it and few-shot prompts show it."""
    decoded = tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return _LINE_BREAKS.sub(" ", decoded).strip()


class TokenForm(str, Enum):
    text = "text"
    tokens = "tokens"
    ids = "ids"
    jsonl = "jsonl"


class InputForm(str, Enum):
    auto = "auto"  # the `tokens` form when every piece is a vocabulary token, else re-tokenised text
    tokens = "tokens"
    text = "text"
    ids = "ids"


@dataclass
class TokenLine:
    """One image's ids read from a line of input; `path` is the source image when the line named one."""

    ids: list[int]  # (L,) LM vocabulary ids, checked against the codebook
    path: str | None = None
    line: int = 1  # 1-based line number in the input


class TokenText:
    """Render ids as token text and parse token text back into ids, for one model.

    tokenizer: the LM's HF tokenizer; token_to_code: (V,) tensor mapping LM ids to codebook
    indices (-1 = not a code); layout: an image's tokens, the global words first, then the grid.
    """

    def __init__(self, tokenizer, token_to_code, layout: TokenLayout, lm_name: str = "the LM") -> None:
        self.tokenizer = tokenizer
        self.is_code = [code >= 0 for code in token_to_code.tolist()]  # indexed by LM id
        self.layout = layout
        self.length = layout.length
        self.lm_name = lm_name
        self._vocab: dict[str, int] | None = None

    @classmethod
    def for_model(cls, model) -> "TokenText":
        return cls(model.tokenizer, model.codebook.token_to_code, model.config.layout, model.config.lm_name)

    @property
    def vocab(self) -> dict[str, int]:
        if self._vocab is None:
            self._vocab = self.tokenizer.get_vocab()
        return self._vocab

    # -- ids -> text -----------------------------------------------------------------------------
    def tokens(self, ids: Sequence[int]) -> list[str]:
        return self.tokenizer.convert_ids_to_tokens(list(ids))

    def text(self, ids: Sequence[int]) -> str:
        """The tokenizer's decoded string, on one line (see `decode_text`)."""
        return decode_text(self.tokenizer, ids)

    def render(self, ids: Sequence[int], form: TokenForm | str, path: str | None = None) -> str:
        """One line for one image in `form`; jsonl carries path, ids, tokens, text and grid shape."""
        form = TokenForm(form)
        ids = [int(i) for i in ids]
        if form is TokenForm.text:
            return self.text(ids)
        if form is TokenForm.tokens:
            return " ".join(self.tokens(ids))
        if form is TokenForm.ids:
            return " ".join(map(str, ids))
        grid = self.layout.grid
        record = {"path": path, "ids": ids, "tokens": self.tokens(ids), "text": self.text(ids), "grid": [grid, grid]}
        if self.layout.global_tokens:  # the first ids are global words (absent: none, as in the published method)
            record["global_tokens"] = self.layout.global_tokens
        return json.dumps(record, ensure_ascii=False)

    # -- text -> ids -----------------------------------------------------------------------------
    @property
    def max_line_chars(self) -> int:
        """The longest line one image's token text can need (a jsonl line with a long path), with room
        to spare; longer input is refused before the tokenizer sees it (megabytes of text cost it
        gigabytes)."""
        return 256 * self.length + 8192

    def parse(self, text: str, form: InputForm | str = InputForm.auto) -> list[int]:
        """Token text of one image -> its L ids; TokenError names the problem and the expected count."""
        form = InputForm(form)
        self._check_size(text)
        if not text.strip():
            raise TokenError(f"no tokens given; this model expects {self._expected()}")
        if form is InputForm.ids:
            return self.check_ids(_parse_int_ids(text, self._expected()))
        if form is InputForm.text:
            ids, reason = self._from_text(text)
            if reason:
                raise TokenError(
                    f"text {_clip(text)!r} does not re-tokenise to this model's sequence: {reason}; "
                    f"this model expects {self._expected()}"
                )
            return ids
        pieces = text.split()
        unknown = [(i, piece) for i, piece in enumerate(pieces) if piece not in self.vocab]
        if not unknown:
            return self.check_ids([self.vocab[piece] for piece in pieces], kind="token")
        position, piece = unknown[0]
        problem = f"unknown token {piece!r} at position {position} (not in the vocabulary of {self.lm_name}"
        problem += f"; {len(unknown)} unknown in all)" if len(unknown) > 1 else ")"
        if form is InputForm.tokens:
            got = f", got {len(pieces)}" if len(pieces) != self.length else ""
            raise TokenError(f"{problem}; this model expects {self._expected()}{got}")
        ids, reason = self._from_text(text)  # maybe the `text` form: words the tokenizer normalises or splits
        if reason:
            raise TokenError(f"{problem}; read as plain text, {reason}; this model expects {self._expected()}")
        return ids

    def parse_lines(self, text: str, form: InputForm | str = InputForm.auto) -> list[TokenLine]:
        """Several images, one per non-empty line: `TOKENS`, `PATH<TAB>TOKENS` (as `lqae encode`
        prints for several images) or a JSON object with "ids" (`--format jsonl`)."""
        numbered = [(n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
        for number, line in numbered:
            self._check_size(line, f"line {number} " if len(numbered) > 1 else "")
        if not numbered:
            raise TokenError(f"no tokens given; this model expects {self._expected()}")
        lines: list[TokenLine] = []
        for number, line in numbered:
            path = None
            try:
                if line.lstrip().startswith("{"):
                    ids, path = self._parse_json_line(line)
                else:
                    if "\t" in line:
                        path, line = line.rsplit("\t", 1)
                    ids = self.parse(line, form)
            except TokenError as exc:
                if len(numbered) == 1:
                    raise
                raise TokenError(f"line {number}: {exc}") from None
            lines.append(TokenLine(ids, path, number))
        return lines

    def check_ids(self, ids: Sequence[int], kind: str = "id") -> list[int]:
        """The ids as a list when they are exactly L codes of this model's codebook; else TokenError."""
        ids = [int(i) for i in ids]
        reason = self._problem(ids, kind)
        if reason:
            raise TokenError(f"{reason}; this model expects {self._expected()}")
        return ids

    # -- helpers ---------------------------------------------------------------------------------
    def _check_size(self, text: str, where: str = "") -> None:
        if len(text) > self.max_line_chars:
            raise TokenError(
                f"{where or 'the token text '}is {len(text):,} characters long; one image's token text is at most "
                f"{self.max_line_chars:,} here: this model expects {self._expected()} per line"
            )

    def _expected(self) -> str:
        return f"{self.length} tokens ({self.layout.describe()})"

    def _problem(self, ids: list[int], kind: str) -> str | None:
        """What keeps `ids` from being one image of this model, or None."""
        for position, token_id in enumerate(ids):
            if not 0 <= token_id < len(self.is_code):
                last = len(self.is_code) - 1
                return f"unknown {kind} {token_id} at position {position} ({self.lm_name} has ids 0..{last})"
        if len(ids) != self.length:
            return f"got {len(ids)} {kind}s"
        for position, token_id in enumerate(ids):
            if not self.is_code[token_id]:
                token = self.tokenizer.convert_ids_to_tokens(token_id)
                label = f"token {token!r} (id {token_id})" if kind == "token" else f"id {token_id} ({token!r})"
                return (
                    f"{label} at position {position} is not a code of this model's codebook "
                    "(special, or left out by its vocabulary filter)"
                )
        return None

    def _from_text(self, text: str) -> tuple[list[int], str | None]:
        """Re-tokenise text: (ids, None) when it gives exactly L codes, else ([], the first reason)."""
        text = text.strip()
        first_reason = None
        # BPE vocabularies mark a word start with a leading space, which the printed text lost.
        for candidate in (text, " " + text):
            encoded = self.tokenizer(candidate, add_special_tokens=False, return_offsets_mapping=True)
            ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
            reason = self._unknown_words(candidate, ids, offsets) or self._problem(ids, "token")
            if reason is None:
                return ids, None
            if reason.startswith("got "):
                reason = f"it gives {len(ids)} tokens" + self._split_word(candidate)
            first_reason = first_reason or reason
        return [], first_reason

    def _split_word(self, text: str) -> str:
        """` ('word' splits into 3 tokens: a ##b ##c)` for the first word that is not one token."""
        for word in text.split():
            pieces = self.tokenizer.tokenize(word)
            if len(pieces) != 1:
                return f" ({word!r} splits into {len(pieces)} tokens: {' '.join(pieces)})"
        return ""

    def _unknown_words(self, text: str, ids: list[int], offsets) -> str | None:
        unk = self.tokenizer.unk_token_id
        if unk is None or self.is_code[unk]:
            return None
        words = [text[start:end] for token_id, (start, end) in zip(ids, offsets) if token_id == unk]
        if not words:
            return None
        return f"{words[0]!r} is not in the vocabulary of {self.lm_name}" + (
            f" ({len(words)} such words)" if len(words) > 1 else ""
        )

    def _parse_json_line(self, line: str) -> tuple[list[int], str | None]:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TokenError(f"not valid JSON ({exc.msg}); expected an object with \"ids\"") from None
        if not isinstance(record, dict) or not isinstance(record.get("ids"), list):
            raise TokenError(f"a JSON line needs an \"ids\" list; this model expects {self._expected()}")
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in record["ids"]):
            raise TokenError(f"\"ids\" must hold integers; this model expects {self._expected()}")
        path = record.get("path")
        return self.check_ids(record["ids"]), path if isinstance(path, str) else None


def _parse_int_ids(text: str, expected: str) -> list[int]:
    ids = []
    for position, piece in enumerate(text.replace(",", " ").split()):
        try:
            ids.append(int(piece))
        except ValueError:
            message = f"{piece!r} at position {position} is not an integer id; this model expects {expected}"
            raise TokenError(message) from None
    return ids


def _clip(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
