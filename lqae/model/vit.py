"""A plain pre-norm ViT encoder and decoder (MAE-style), readable top to bottom."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from lqae.config import ModelConfig
from lqae.model.decoder_input import DecoderInput


class Attention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        qkv = self.qkv(x).view(batch, length, 3, self.heads, width // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, N, head_dim)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, head_dim)
        return self.proj(out.transpose(1, 2).reshape(batch, length, width))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """Learned position embedding, a stack of blocks, final LayerNorm; (B, N, W) -> (B, N, W)."""

    def __init__(self, num_tokens: int, width: int, depth: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.position = nn.Parameter(torch.zeros(1, num_tokens, width))
        nn.init.trunc_normal_(self.position, std=0.02)
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=1e-6)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """(the normalised output, every hidden state: input + position, then one per block)."""
        x = x + self.position
        hidden = [x]
        for block in self.blocks:
            x = block(x)
            hidden.append(x)
        return self.norm(x), tuple(hidden)


class Standardize(nn.Module):
    """Per-feature standardisation over every token of the batch (BatchNorm without a learned affine;
    running statistics at eval), then a fixed affine onto target statistics (the codebook's).

    Counters index collapse by matching the encoder output's distribution to the codebook's, as the
    affine re-parameterisation of Huh et al. 2023 ("Straightening out the straight-through
    estimator") does from the codebook side; here the codebook is frozen, so the encoder side moves.
    """

    def __init__(self, width: int, momentum: float = 0.1) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("running_mean", torch.zeros(width))
        self.register_buffer("running_var", torch.ones(width))
        self.register_buffer("target_mean", torch.zeros(width), persistent=False)
        self.register_buffer("target_std", torch.ones(width), persistent=False)

    def set_target(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.target_mean.copy_(mean)
        self.target_std.copy_(std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = F.batch_norm(
            x.flatten(0, -2).float(), self.running_mean, self.running_var, training=self.training,
            momentum=self.momentum, eps=1e-5,
        )  # (B*N, D), zero mean and unit variance per feature
        return (flat * self.target_std + self.target_mean).view(x.shape).to(x.dtype)

    @torch.no_grad()
    def calibrate(self, outputs) -> None:
        """Set the running statistics to the exact mean/variance of the given (..., D) batches
        (an iterable), e.g. for a freshly initialised encoder used as a baseline."""
        count, total, squares = 0, 0.0, 0.0
        for batch in outputs:
            flat = batch.flatten(0, -2).double()
            count, total, squares = count + flat.shape[0], total + flat.sum(0), squares + flat.pow(2).sum(0)
        mean = total / count
        self.running_mean.copy_(mean)
        self.running_var.copy_(squares / count - mean.pow(2))


def _output_map(config: ModelConfig) -> nn.Module:
    """The encoder output's last step: the standardisation, or none (the reference)."""
    return Standardize(config.lm_width) if config.encoder_output == "standardize" else nn.Identity()


class EncoderOutput(NamedTuple):
    z: torch.Tensor  # (B, L, D) the continuous tokens the codebook reads, D = the LM's width
    projected: torch.Tensor  # (B, L, D) before the output standardisation (equals z without one)
    hidden_states: tuple[torch.Tensor, ...]  # patch embedding + position, then one per block, each (B, N, W)


class Encoder(nn.Module):
    """Images (B, C, H, W) in [0, 1] -> continuous tokens (B, L, D), D = config.lm_width, laid out as
    config.layout: the global tokens (from `GlobalEncoder`), then the (H / patch)^2 patches."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.lm_width is None:
            raise ValueError("config.lm_width is unset: the LQAE fills it in from its LM before building the encoder")
        width, patch = config.encoder_width, config.patch_size
        self.layout = config.layout
        self.patchify = nn.Conv2d(config.channels, width, kernel_size=patch, stride=patch)
        self.transformer = Transformer(
            self.layout.patches, width, config.encoder_depth, config.encoder_heads, config.mlp_ratio
        )
        self.to_lm = nn.Linear(width, config.lm_width)
        self.standardize = _output_map(config)
        self.global_encoder = GlobalEncoder(config) if self.layout.global_tokens else None

    def forward(self, images: torch.Tensor) -> EncoderOutput:
        x = self.patchify(images).flatten(2).transpose(1, 2)  # (B, N, W)
        x, hidden = self.transformer(x)
        projected = self.to_lm(x)  # (B, N, D)
        z = self.standardize(projected)
        if self.global_encoder is not None:
            global_z, global_projected = self.global_encoder(images)  # (B, G, D) each
            z, projected = torch.cat([global_z, z], dim=1), torch.cat([global_projected, projected], dim=1)
        return EncoderOutput(z, projected, hidden)

    def set_output_target(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """The statistics the standardised output is mapped onto (the codebook's)."""
        for encoder in (self, self.global_encoder):
            if encoder is not None and isinstance(encoder.standardize, Standardize):
                encoder.standardize.set_target(mean, std)

    @torch.no_grad()
    def calibrate_output(self, images) -> None:
        """Running statistics of the output standardisation(s) measured on batches of images (an
        iterable of (B, C, H, W)), e.g. for a freshly initialised encoder used as a baseline."""
        if not isinstance(self.standardize, Standardize):
            return
        parts = [self.layout.split(self(batch).projected, 1) for batch in images]  # (global, patches) each
        self.standardize.calibrate(patches for _, patches in parts)
        if self.global_encoder is not None:
            self.global_encoder.standardize.calibrate(first for first, _ in parts)


class GlobalEncoder(nn.Module):
    """Images (B, C, H, W) -> G global tokens (B, G, D): G learned queries (as ViT's class token)
    read the image's patches in a ViT of their own, so the self-distillation that trains them
    (`lqae.model.distill`) never pulls on the patch tokens' encoder. Returns (z, projected), as `Encoder`."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        width, patch = config.encoder_width, config.patch_size
        self.global_tokens = config.global_tokens
        self.patchify = nn.Conv2d(config.channels, width, kernel_size=patch, stride=patch)
        self.queries = nn.Parameter(torch.zeros(1, config.global_tokens, width))
        nn.init.trunc_normal_(self.queries, std=0.02)
        self.transformer = Transformer(
            config.num_tokens, width, config.encoder_depth, config.encoder_heads, config.mlp_ratio
        )
        self.to_lm = nn.Linear(width, config.lm_width)
        self.standardize = _output_map(config)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.patchify(images).flatten(2).transpose(1, 2)  # (B, N, W)
        x = torch.cat([self.queries.expand(x.shape[0], -1, -1), x], dim=1)  # (B, G + N, W)
        x, _ = self.transformer(x)
        projected = self.to_lm(x[:, : self.global_tokens])  # (B, G, D)
        return self.standardize(projected), projected


class Decoder(nn.Module):
    """What the decoder input reads (B, L, ...) -> images (B, C, H, W), unclamped. It reads all L
    positions of config.layout and draws the patch positions (the global words are read, not drawn).

    `reads` (`lqae.model.decoder_input`) says which inputs it has: the LM's last hidden state (width
    config.lm_width), each code's search coordinates (width `codes_dim`), or both, summed.
    The "linear" head maps each token to its patch's pixels (the reference); the "conv" head maps it
    to `decoder_head_channels` feature maps over its patch, then two 3x3 convolutions over the whole
    image turn them into pixels, so a patch's edge sees its neighbours' (no seams between patches)."""

    def __init__(self, config: ModelConfig, reads: DecoderInput, codes_dim: int | None = None) -> None:
        super().__init__()
        if config.lm_width is None:
            raise ValueError("config.lm_width is unset: the LQAE fills it in from its LM before building the decoder")
        self.patch_size, self.layout = config.patch_size, config.layout
        width = config.decoder_width
        self.from_lm = nn.Linear(config.lm_width, width) if reads.reads_lm else None
        self.from_codes = nn.Linear(codes_dim, width) if reads.reads_codes else None
        self.transformer = Transformer(
            self.layout.length, width, config.decoder_depth, config.decoder_heads, config.mlp_ratio
        )
        conv = config.decoder_head == "conv"
        self.maps = config.decoder_head_channels if conv else config.channels  # per-pixel outputs of to_pixels
        self.to_pixels = nn.Linear(width, config.patch_size**2 * self.maps)
        self.refine = (
            nn.Sequential(
                nn.Conv2d(self.maps, self.maps, 3, padding=1), nn.GELU(),
                nn.Conv2d(self.maps, config.channels, 3, padding=1),
            )
            if conv else nn.Identity()
        )

    def forward(self, lm_hidden: torch.Tensor | None, coordinates: torch.Tensor | None = None) -> torch.Tensor:
        """lm_hidden: (B, L, D) the LM's last hidden state; coordinates: (B, L, d) the codes' search
        coordinates (each None where this decoder does not read it)."""
        x = self.from_lm(lm_hidden) if self.from_lm is not None else 0
        if self.from_codes is not None:
            x = x + self.from_codes(coordinates)
        x, _ = self.transformer(x)  # (B, L, W)
        return self.head(self.layout.split(x, 1)[1])

    def head(self, tokens: torch.Tensor) -> torch.Tensor:
        """Patch tokens (B, N, W) -> pixels (B, C, H, W)."""
        x = self.to_pixels(tokens)  # (B, N, p*p*maps)
        batch, p, g, c = x.shape[0], self.patch_size, self.layout.grid, self.maps
        x = x.view(batch, g, g, p, p, c)  # (B, gh, gw, ph, pw, maps)
        x = x.permute(0, 5, 1, 3, 2, 4).reshape(batch, c, g * p, g * p)  # (B, maps, H, W)
        return self.refine(x)  # (B, C, H, W)


def init_weights(module: nn.Module) -> None:
    """MAE initialisation: xavier-uniform linears, zero biases, unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
            nn.init.zeros_(m.bias)
