"""The Language Quantized AutoEncoder (Liu, Yan & Abbeel 2023, arXiv 2302.00902)."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from lqae.config import ModelConfig
from lqae.model import vocab
from lqae.errors import CheckpointError, TokenError
from lqae.model.lm import FrozenLM, load_frozen_lm
from lqae.model.quantizer import codebook_from_config, select_token_ids
from lqae.model.vit import Decoder, Encoder, init_weights

if TYPE_CHECKING:
    from lqae.model.distill import SelfDistillation

log = logging.getLogger(__name__)

TRAINABLE_MODULES = ("encoder", "decoder", "codebook")  # the codebook's: a learned search map, the PCA, global words


class LossBreakdown(NamedTuple):
    reconstruction: torch.Tensor  # pixel MSE, unweighted
    commitment: torch.Tensor  # unweighted: quantizer.COMMITMENTS' (MSE or 1 - cosine), plus a learned map's latent one
    mlm: torch.Tensor  # LM-head cross-entropy at masked positions (0 when skipped)
    usage: torch.Tensor  # code-usage regulariser (0 when usage_weight is 0 or at eval)
    codebook: torch.Tensor  # learned search map's codebook loss (0 with the reference search)
    invariance: torch.Tensor  # global tokens' self-distillation loss between two views (0 without a second view)


@dataclass
class LQAEOutput:
    """Result of `LQAE.forward`; shapes for a batch of B images with N tokens each."""

    reconstruction: torch.Tensor  # (B, C, H, W), unclamped
    token_ids: torch.Tensor  # (B, L) LM vocabulary ids, L = G global + N patch tokens
    codes: torch.Tensor  # (B, L) codebook indices
    mask: torch.Tensor  # (B, L) bool, True where the LM saw its mask token (never a global token)
    encoder_norm: torch.Tensor  # scalar, mean L2 norm of the raw encoder output
    loss: torch.Tensor  # weighted total
    losses: LossBreakdown


class LQAE(nn.Module):
    """ViT encoder -> nearest frozen LM token embedding -> frozen LM -> ViT decoder."""

    def __init__(
        self, config: ModelConfig, lm: FrozenLM | None = None, with_mlm_head: bool = True, for_loading: bool = False,
        code_ids: list[int] | None = None,
    ) -> None:
        """`for_loading`: every trainable weight will come from a checkpoint, so skip the random
        initialisation and fitting the search space (start-up time). `code_ids`: the LM ids of the
        codes, as a checkpoint with an `llm_vocab` filter saved them (else the vocabulary filter
        chooses them)."""
        super().__init__()
        lm = lm or load_frozen_lm(config.lm_name, with_mlm_head=with_mlm_head and config.mlm_weight > 0)
        word_embeddings = lm.input_embeddings
        vocab_rows, lm_width = word_embeddings.shape
        _check_lm_shape(config, vocab_rows, lm_width)
        if code_ids is not None:
            token_ids = list(code_ids)
        else:
            token_ids = select_token_ids(lm.tokenizer, vocab_rows, config.vocab, config.exclude_special_tokens)
            if config.llm_vocab:
                token_ids = vocab.single_token_words(lm.tokenizer, token_ids, config.llm_vocab)
        if config.codebook_size is not None and config.codebook_size != len(token_ids):
            raise CheckpointError(
                f"the vocabulary filter {config.vocab!r} gives {len(token_ids)} codes with this LM, but the "
                f"checkpoint was trained with {config.codebook_size}; load it with the tokenizer it was trained with"
            )
        # a copy: the caller's config is left as given
        config = dataclasses.replace(config, lm_vocab_size=vocab_rows, lm_width=lm_width, codebook_size=len(token_ids))
        self.config = config
        self.weights_fingerprint: str | None = None  # set by checkpoint.load_model; token datasets record it
        self.tokenizer = lm.tokenizer
        self.lm = lm.backbone
        self.mlm_head = lm.mlm_head
        self.position_offset = lm.position_offset
        self.codebook = codebook_from_config(config, word_embeddings, token_ids, fit_search_space=not for_loading)
        mask_id = lm.tokenizer.mask_token_id
        if mask_id is None and config.mask_ratio > 0:
            log.warning("LM %s has no mask token: masking disabled", config.lm_name)
        mask_embedding = word_embeddings[mask_id].detach().float().clone() if mask_id is not None else None
        self.register_buffer("mask_embedding", mask_embedding, persistent=False)  # (D,) or None
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        if not for_loading:
            init_weights(self.encoder)
            init_weights(self.decoder)
            if config.decoder_lm_zero_init and config.decoder_input == "lm_search":
                nn.init.zeros_(self.decoder.from_lm.weight)
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
        if self.mlm_head is not None:
            self.mlm_head.eval()
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
    def forward(
        self,
        images: torch.Tensor,
        generator: torch.Generator | None = None,
        mask_scale: float = 1.0,
        second_view: torch.Tensor | None = None,
        distill: "SelfDistillation | None" = None,
    ) -> LQAEOutput:
        """images: (B, C, H, W) in [0, 1]. Masks patch tokens only in training mode, at `mask_scale`
        times the configured ratio (the trainer's mask schedule). With global tokens, a second
        augmented view of the same images (B, C, H, W) and the self-distillation teacher add the
        invariance loss: each view's global tokens must choose the words the teacher chose for the other."""
        z = self.encoder(images).z  # (B, L, D)
        quant = self.codebook(z, usage=self.training and self.config.usage_weight > 0)
        invariance = z.new_zeros((), dtype=torch.float32)
        if distill is not None and second_view is not None and self.config.global_tokens:
            second = self.codebook.global_scores(self.encoder.global_encoder(second_view)[0])  # (B, G, V_g)
            invariance = distill.loss(
                quant.global_scores, second, distill.teacher_scores(images, self.codebook),
                distill.teacher_scores(second_view, self.codebook),
            )
        mask = self._sample_mask(quant.codes.shape, images.device, generator, mask_scale)
        lm_input = quant.quantized
        if mask.any():
            lm_input = torch.where(mask.unsqueeze(-1), self.mask_embedding.to(lm_input.dtype), lm_input)
        reconstruction, lm_hidden = self._decode_from(lm_input, quant.coordinates, mask)
        recon_loss = F.mse_loss(reconstruction.float(), images.float())
        mlm_loss = self._mlm_loss(lm_hidden, quant.token_ids, mask)
        cfg = self.config
        loss = (
            cfg.recon_weight * recon_loss
            + cfg.commitment_weight * quant.commitment_loss
            + cfg.mlm_weight * mlm_loss
            + cfg.usage_weight * quant.usage_loss
            + cfg.codebook_weight * quant.codebook_loss
            + cfg.invariance_weight * invariance
        )
        return LQAEOutput(
            reconstruction, quant.token_ids, quant.codes, mask, quant.encoder_norm, loss,
            LossBreakdown(recon_loss, quant.commitment_loss, mlm_loss, quant.usage_loss, quant.codebook_loss, invariance),
        )

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) in [0, 1] -> LM token ids (B, N), deterministic."""
        return self.codebook(self.encoder(images).z).token_ids

    @torch.no_grad()
    def decode(self, token_ids: torch.Tensor) -> torch.Tensor:
        """LM token ids (B, N) -> images (B, C, H, W) clamped to [0, 1]."""
        if token_ids.shape[-1] != self.config.num_tokens:
            raise TokenError(f"got {token_ids.shape[-1]} tokens, this model expects {self.config.num_tokens}")
        codes = self.codebook.codes_from_token_ids(token_ids)
        coordinates = self.codebook.code_coordinates(codes)
        return self._decode_from(self.codebook.embeddings[codes], coordinates, None)[0].clamp(0, 1)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """Encode then decode without masking: (B, C, H, W) -> (B, C, H, W) in [0, 1]."""
        return self.decode(self.encode(images))

    # -- helpers ---------------------------------------------------------------------------
    def _decode_from(self, lm_input: torch.Tensor, coordinates: torch.Tensor, mask: torch.Tensor | None):
        """(reconstruction (B, C, H, W), the LM's last hidden state or None) from the LM input
        (B, L, D), the codes' search-space vectors (B, L, d) and the mask (B, L) or None.
        The decoder reads the LM's last hidden state (the method); "lm_skip" adds the LM's input to
        it and "lm_search" a learned map of each code's search-space vector (neither shows a masked
        code: the LM input there is the mask embedding, the vector is zeroed, unless
        `decoder_reads_masked`). The diagnostics
        "embeddings" and "search" skip the LM, to separate quantizer limits from LM-channel limits."""
        mode = self.config.decoder_input
        lm_hidden = None if mode in ("embeddings", "search") else self.run_lm(lm_input).last_hidden_state
        hidden = {"lm": lm_hidden, "lm_search": lm_hidden, "embeddings": lm_input, "search": None}.get(mode)
        if mode == "lm_skip":
            hidden = lm_hidden + lm_input
        hides = mode == "search" or (mode == "lm_search" and not self.config.decoder_reads_masked)
        if hides and mask is not None and mask.any():
            coordinates = coordinates.masked_fill(mask.unsqueeze(-1), 0.0)
        return self.decoder(hidden, coordinates), lm_hidden

    def _sample_mask(self, shape, device, generator, scale: float = 1.0) -> torch.Tensor:
        """(B, L) bool, False at the G global tokens. A fixed per-token ratio, or with mask_ratio_min
        a ratio drawn per image from [mask_ratio_min, mask_ratio]. (The official release draws a
        ratio per token, which for independent tokens is the same as a fixed ratio at the range's mean.)"""
        cfg = self.config
        if not self.training or self.mask_embedding is None or cfg.mask_ratio * scale <= 0:
            return torch.zeros(shape, dtype=torch.bool, device=device)
        patches = self._sample_patch_mask((shape[0], shape[1] - cfg.global_tokens), device, generator, scale)
        return torch.cat([patches.new_zeros(shape[0], cfg.global_tokens), patches], dim=1)

    def _sample_patch_mask(self, shape, device, generator, scale: float) -> torch.Tensor:
        cfg = self.config
        sample_device = generator.device if generator else device
        noise = torch.rand(shape, generator=generator, device=sample_device)
        ratio = torch.full((shape[0], 1), cfg.mask_ratio, device=sample_device)
        if cfg.mask_ratio_min is not None:
            ratio = cfg.mask_ratio_min + (cfg.mask_ratio - cfg.mask_ratio_min) * torch.rand(
                shape[0], 1, generator=generator, device=sample_device
            )
        return (noise < ratio * scale).to(device)

    def _mlm_loss(self, hidden: torch.Tensor | None, token_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if hidden is None or self.mlm_head is None or self.config.mlm_weight == 0 or not mask.any():
            return mask.new_zeros((), dtype=torch.float32)
        logits = self.mlm_head(hidden[mask])  # (M, V)
        return F.cross_entropy(logits.float(), token_ids[mask])

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The saved weights: encoder, decoder and the codebook's own (a learned search map, the PCA
        projection, the global tokens' words, LLM-chosen code ids); the frozen LM and the codebook's
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
