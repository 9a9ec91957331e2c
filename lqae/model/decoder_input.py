"""What the decoder reads, and so what the LM is fed and where the encoder's gradient comes from:
one class per `ModelConfig.decoder_input`, chosen once when the model is built."""

from __future__ import annotations

import torch
from torch import nn


class DecoderInput:
    """"lm", the reference: the decoder reads the LM's last hidden state of the code sequence; the LM
    reads the codes' embeddings through a straight-through estimator, z + sg(e - z), so the encoder
    learns through the LM."""

    reads_lm = True  # the LM runs, and the decoder reads its last hidden state
    reads_codes = False  # the decoder reads each code's search coordinates

    def lm_input(self, z: torch.Tensor, embedded: torch.Tensor) -> torch.Tensor:
        """(B, L, D) what the LM reads, from the encoder output z and the codes' embeddings."""
        return z + (embedded - z).detach()

    def init(self, decoder: nn.Module) -> None:
        """Set the decoder's input layers' starting weights, after the usual initialisation."""


class LMAndCodes(DecoderInput):
    """"lm_search", the recipe: the LM's last hidden state plus a learned map of each code's search
    coordinates. The encoder learns through the coordinates (straight-through there, as FSQ's), so
    no gradient goes through the LM's input: the LM only reads words, and its backward pass is
    skipped. The read of the LM starts at zero: the decoder starts from the coordinates and takes in
    the LM's features as far as they help."""

    reads_codes = True

    def lm_input(self, z: torch.Tensor, embedded: torch.Tensor) -> torch.Tensor:
        return embedded

    def init(self, decoder: nn.Module) -> None:
        nn.init.zeros_(decoder.from_lm.weight)


class CodesOnly(LMAndCodes):
    """"search", a diagnostic: the decoder reads the coordinates only and the LM does not run, which
    measures what the LM's read adds to the recipe."""

    reads_lm = False

    def init(self, decoder: nn.Module) -> None:
        pass


DECODER_INPUTS: dict[str, type[DecoderInput]] = {"lm": DecoderInput, "lm_search": LMAndCodes, "search": CodesOnly}
