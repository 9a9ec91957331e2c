"""A plain pre-norm ViT encoder and decoder (MAE-style), readable top to bottom."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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

    def forward(self, x: torch.Tensor, return_hidden: bool = False):
        x = x + self.position
        hidden = [x]
        for block in self.blocks:
            x = block(x)
            hidden.append(x)
        x = self.norm(x)
        return (x, hidden) if return_hidden else x


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
            x.flatten(0, -2).float(), self.running_mean, self.running_var,
            training=self.training, momentum=self.momentum, eps=1e-5,
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


class Encoder(nn.Module):
    """Images (B, C, H, W) in [0, 1] -> continuous tokens (B, N, out_width), N = (H / patch)^2."""

    def __init__(self, image_size, patch_size, channels, width, depth, heads, mlp_ratio, out_width, standardize=False):
        super().__init__()
        num_tokens = (image_size // patch_size) ** 2
        self.patchify = nn.Conv2d(channels, width, kernel_size=patch_size, stride=patch_size)
        self.transformer = Transformer(num_tokens, width, depth, heads, mlp_ratio)
        self.to_lm = nn.Linear(width, out_width)
        self.standardize = Standardize(out_width) if standardize else None

    def forward(self, images: torch.Tensor, return_hidden: bool = False):
        x = self.patchify(images).flatten(2).transpose(1, 2)  # (B, N, W)
        x, hidden = self.transformer(x, return_hidden=True)
        out = self.to_lm(x)  # (B, N, out_width)
        if self.standardize is not None:
            out = self.standardize(out)
        return (out, hidden) if return_hidden else out

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The output before standardisation (what `Standardize.calibrate` needs)."""
        x = self.patchify(images).flatten(2).transpose(1, 2)
        return self.to_lm(self.transformer(x))


class Decoder(nn.Module):
    """LM hidden states (B, N, in_width) -> images (B, C, H, W), unclamped."""

    def __init__(self, image_size, patch_size, channels, width, depth, heads, mlp_ratio, in_width):
        super().__init__()
        self.patch_size, self.channels = patch_size, channels
        self.grid = image_size // patch_size
        self.from_lm = nn.Linear(in_width, width)
        self.transformer = Transformer(self.grid**2, width, depth, heads, mlp_ratio)
        self.to_pixels = nn.Linear(width, patch_size * patch_size * channels)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = self.to_pixels(self.transformer(self.from_lm(hidden)))  # (B, N, p*p*C)
        batch, p, g, c = x.shape[0], self.patch_size, self.grid, self.channels
        x = x.view(batch, g, g, p, p, c)  # (B, gh, gw, ph, pw, C)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(batch, c, g * p, g * p)  # (B, C, H, W)


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
