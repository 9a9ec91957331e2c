"""The Language Quantized AutoEncoder (Liu, Yan & Abbeel 2023, arXiv 2302.00902)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from lqae.config import ModelConfig
from lqae.errors import CheckpointError, TokenError
from lqae.model import vocab
from lqae.model.codebook import codebook_class
from lqae.model.codebook.base import LanguageCodebook, Quantized
from lqae.model.decoder_input import DECODER_INPUTS
from lqae.model.lm import FrozenLM, load_frozen_lm
from lqae.model.vit import Decoder, Encoder, init_weights

TRAINABLE_MODULES = ("encoder", "decoder", "codebook")  # the codebook's: the grid's projection, the global words


@dataclass
class LQAEOutput:
    """Result of `LQAE.forward` for a batch of B images of L = G global + N patch tokens."""

    reconstruction: torch.Tensor  # (B, C, H, W), unclamped
    quantized: Quantized  # codes, LM ids, embeddings, coordinates, commitment loss, global word scores
    lm_hidden: torch.Tensor | None  # (B, L, D) the LM's last hidden state (None when the LM does not run)
    encoder_norm: torch.Tensor  # scalar, mean L2 norm of the encoder output


class LQAE(nn.Module):
    """ViT encoder -> nearest frozen LM word (the codebook) -> frozen LM -> ViT decoder."""

    def __init__(
        self, config: ModelConfig, lm: FrozenLM | None = None, for_loading: bool = False,
        code_ids: list[int] | None = None,
    ) -> None:
        """`lm`: the frozen LM (default: loaded from config.lm_name without its MLM head).
        `for_loading`: every trainable weight will come from a checkpoint, so skip the random
        initialisation and fitting the search space (start-up time). `code_ids`: the LM ids of the
        codes, as a checkpoint with an `llm_vocab` filter saved them (else the vocabulary filter
        chooses them)."""
        super().__init__()
        lm = lm or load_frozen_lm(config.lm_name, with_mlm_head=False)
        word_embeddings = lm.input_embeddings
        vocab_rows, lm_width = word_embeddings.shape
        _check_lm_shape(config, vocab_rows, lm_width)
        token_ids = list(code_ids) if code_ids is not None else vocab.codebook_ids(lm.tokenizer, vocab_rows, config)
        if config.codebook_size is not None and config.codebook_size != len(token_ids):
            raise CheckpointError(
                f"the vocabulary filter {config.vocab!r} gives {len(token_ids)} codes with this LM, but the "
                f"checkpoint was trained with {config.codebook_size}; load it with the tokenizer it was trained with"
            )
        # a copy: the caller's config is left as given
        config = dataclasses.replace(config, lm_vocab_size=vocab_rows, lm_width=lm_width, codebook_size=len(token_ids))
        self.config, self.layout = config, config.layout
        self.weights_fingerprint: str | None = None  # set by checkpoint.load_model; token datasets record it
        self.tokenizer = lm.tokenizer
        self.lm = lm.backbone
        self.position_offset = lm.position_offset
        space = codebook_class(config.search_space)
        self.codebook: LanguageCodebook = space(
            word_embeddings, token_ids, self.layout, config.global_vocab_size, save_token_ids=config.llm_vocab is not None,
            fit=not for_loading, **space.options(config),
        )
        mask_id = lm.tokenizer.mask_token_id
        mask_embedding = word_embeddings[mask_id].detach().float().clone() if mask_id is not None else None
        self.register_buffer("mask_embedding", mask_embedding, persistent=False)  # (D,) or None: no mask token
        self.reads = DECODER_INPUTS[config.decoder_input]()
        self.encoder = Encoder(config)
        self.decoder = Decoder(config, self.reads, self.codebook.dim)
        if not for_loading:
            init_weights(self.encoder)
            init_weights(self.decoder)
            self.reads.init(self.decoder)
        codes = self.codebook.embeddings
        self.encoder.set_output_target(codes.mean(0), codes.std(0))

    @property
    def device(self) -> torch.device:
        """Where the trainable weights live (inputs go there)."""
        return self.encoder.patchify.weight.device

    # -- frozen LM -------------------------------------------------------------------------
    def train(self, mode: bool = True) -> "LQAE":
        super().train(mode)
        if self.lm is not None:
            self.lm.eval()  # frozen: dropout stays off whatever the caller does
        return self

    def run_lm(self, embeddings: torch.Tensor, output_hidden_states: bool = False):
        """Run the frozen LM on `inputs_embeds` (B, N, D): no BOS/EOS, all-ones attention mask."""
        if self.lm is None:
            raise CheckpointError(
                "this model was loaded for encoding only, without its LM's layers; load it with "
                "checkpoint.load_model(RUN_DIR) to decode or read LM features"
            )
        batch, length = embeddings.shape[:2]
        positions = torch.arange(length, device=embeddings.device) + self.position_offset
        return self.lm(
            inputs_embeds=embeddings,
            attention_mask=torch.ones(batch, length, dtype=torch.long, device=embeddings.device),
            position_ids=positions.unsqueeze(0).expand(batch, length),
            output_hidden_states=output_hidden_states,
        )

    def lm_hidden_states(self, token_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Every LM hidden state (embedding output + each layer), each (B, N, D), for the given ids."""
        codes = self.codebook.codes_from_token_ids(token_ids)
        return self.run_lm(self.codebook.embeddings[codes], output_hidden_states=True).hidden_states

    # -- main API --------------------------------------------------------------------------
    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> LQAEOutput:
        """images: (B, C, H, W) in [0, 1]; `mask` (B, L) bool: where the LM reads its mask token
        instead of the code (training only; `lqae.objective` draws it)."""
        z = self.encoder(images).z  # (B, L, D)
        quantized = self.codebook(z)
        lm_hidden = None
        if self.reads.reads_lm:
            lm_input = self.reads.lm_input(z, quantized.embedded)  # (B, L, D)
            if mask is not None:
                lm_input = torch.where(mask.unsqueeze(-1), self.mask_embedding.to(lm_input.dtype), lm_input)
            lm_hidden = self.run_lm(lm_input).last_hidden_state
        reconstruction = self.decoder(lm_hidden, quantized.coordinates)
        return LQAEOutput(reconstruction, quantized, lm_hidden, z.detach().float().norm(dim=-1).mean())

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) in [0, 1] -> LM token ids (B, L), deterministic."""
        return self.codebook(self.encoder(images).z).token_ids

    @torch.no_grad()
    def decode(self, token_ids: torch.Tensor) -> torch.Tensor:
        """LM token ids (B, L) -> images (B, C, H, W) clamped to [0, 1]."""
        if token_ids.shape[-1] != self.layout.length:
            raise TokenError(f"got {token_ids.shape[-1]} tokens, this model expects {self.layout.length}")
        codes = self.codebook.codes_from_token_ids(token_ids)
        lm_hidden = self.run_lm(self.codebook.embeddings[codes]).last_hidden_state if self.reads.reads_lm else None
        return self.decoder(lm_hidden, self.codebook.code_coordinates(codes)).clamp(0, 1)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """Encode then decode: (B, C, H, W) -> (B, C, H, W) in [0, 1]."""
        return self.decode(self.encode(images))

    # -- weights ---------------------------------------------------------------------------
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The saved weights: encoder, decoder and the codebook's own (the grid's projection and
        assignment, the global words, LLM-chosen code ids); the frozen LM and the codebook's
        embeddings are rebuilt from the LM name."""
        return {
            f"{name}.{key}": value
            for name in TRAINABLE_MODULES
            for key, value in getattr(self, name).state_dict().items()
        }

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = self.trainable_state_dict()
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if missing or unexpected:
            raise CheckpointError(
                f"checkpoint weights do not match the model config (missing {missing[:3]}, "
                f"unexpected {unexpected[:3]}); was config.json edited?"
            )
        for key, value in state.items():
            if value.shape != expected[key].shape:
                raise CheckpointError(f"weight {key} has shape {tuple(value.shape)}, config expects {tuple(expected[key].shape)}")
        for name in TRAINABLE_MODULES:
            prefix = f"{name}."
            getattr(self, name).load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})


def _check_lm_shape(config: ModelConfig, vocab_rows: int, lm_width: int) -> None:
    if config.lm_vocab_size is None:
        return
    if (config.lm_vocab_size, config.lm_width) != (vocab_rows, lm_width):
        raise CheckpointError(
            f"language model {config.lm_name!r} has vocab {vocab_rows} x width {lm_width}, but the checkpoint was "
            f"trained with vocab {config.lm_vocab_size} x width {config.lm_width}; pass --lm with the LM it was "
            "trained with"
        )
