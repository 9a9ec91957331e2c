"""The recipe's search space: FSQ's evenly filled grid (Mentzer et al. 2023, arXiv 2309.15505) made of words.

In hundreds of dimensions even the nearest of tens of thousands of word embeddings is far from an
arbitrary direction, so the chosen word barely follows the encoder output. Here the codebook's top principal
coordinates, each through the normal CDF, fill a unit cube about evenly; the cube is cut into an even
grid of about as many cells as there are words, each cell gets one word, a query takes the word of
the cell it falls in, and the decoder reads the cell's centre (straight-through, as FSQ's codes).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lqae.errors import ConfigError
from lqae.model.codebook.base import LanguageCodebook
from lqae.model.codebook.search import farthest_points

_UNASSIGNED = -1e6  # the last entry of a cell-less word's row: never the nearest


class GridCodebook(LanguageCodebook):
    """"grid": `grid_levels(K, grid_dim)` cells per side; `grid_assignment` gives each cell one word
    (a balanced split along each principal coordinate in turn, so a cell's word sits near it). The
    few words left without a cell are never chosen when encoding (decoding them reads their own cube
    coordinates). The projection and the assignment are saved with the weights, so the search never
    depends on a decomposition computed again.

    Search by dot product: a code's row is [2c, -|c|^2] for its cell centre c and a query is [u, 1]
    for its cube coordinates u, so the largest dot product is the nearest centre, -|u - c|^2 up to a
    constant per query. (The persistent buffers keep the names of the spaces the grid grew out of,
    `pca_*` and `uniform_scale`: checkpoints and their weight fingerprints name them.)"""

    @classmethod
    def options(cls, config) -> dict:
        return {"grid_dim": config.grid_dim}

    def init_space(self, embeddings: torch.Tensor, fit: bool, grid_dim: int = 6) -> None:
        size, width = embeddings.shape
        self.dim = grid_dim
        if fit:
            mean = embeddings.mean(0)
            directions = principal_directions(embeddings - mean, grid_dim)  # (d, D)
        else:
            mean, directions = embeddings.new_zeros(width), embeddings.new_zeros(grid_dim, width)
        self.register_buffer("pca_mean", mean)  # (D,) persistent
        self.register_buffer("pca_directions", directions)  # (d, D) persistent
        if fit:
            self.register_buffer("uniform_scale", self._project(embeddings).std(0))  # (d,)
            cells = grid_assignment(self._cube(self._project(embeddings)), grid_levels(size, grid_dim))
        else:
            self.register_buffer("uniform_scale", embeddings.new_ones(grid_dim))
            cells = torch.full((size,), -1, dtype=torch.long)
        self.register_buffer("grid_cells", cells)  # (K,) persistent: each code's flat cell index, -1 = none
        self._build_rows()

    def _build_rows(self) -> None:
        """The codes' coordinates and search rows from the projection and the assignment."""
        levels = torch.tensor(grid_levels(self.size, self.dim))
        cube = self._cube(self._project(self.embeddings))  # (K, d)
        assigned = self.grid_cells >= 0
        coordinates = torch.where(assigned.unsqueeze(-1), cell_centres(self.grid_cells.clamp_min(0), levels), cube)
        rows = torch.cat([2 * coordinates, -coordinates.pow(2).sum(-1, keepdim=True)], dim=-1)
        rows[~assigned, -1] = _UNASSIGNED
        self.register_buffer("grid_coordinates", coordinates, persistent=False)  # (K, d)
        self.register_buffer("code_rows", rows, persistent=False)  # (K, d + 1)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = nn.Module.load_state_dict(self, state_dict, strict, assign)
        self._build_rows()  # from the saved projection and assignment
        return result

    def _project(self, vectors: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., d) principal coordinates."""
        return (vectors.float() - self.pca_mean) @ self.pca_directions.T

    def _cube(self, projected: torch.Tensor) -> torch.Tensor:
        """Principal coordinates (..., d) -> the unit cube, each through the normal CDF of its
        standardised value: the codebook fills the cube about evenly (as FSQ's grid fills its box)."""
        return 0.5 * (1 + torch.erf(projected / (self.uniform_scale * math.sqrt(2))))

    def queries(self, z: torch.Tensor) -> torch.Tensor:
        cube = self._cube(self._project(z))
        return torch.cat([cube, torch.ones_like(cube[..., :1])], dim=-1)

    def code_vectors(self) -> torch.Tensor:
        return self.code_rows

    def query_coordinates(self, query: torch.Tensor) -> torch.Tensor:
        return query[..., :-1]  # the augmentation dropped

    def code_coordinates(self, codes: torch.Tensor) -> torch.Tensor:
        return self.grid_coordinates[codes]

    def spread_codes(self, count: int) -> torch.Tensor:
        assigned = torch.nonzero(self.grid_cells >= 0).squeeze(1)
        return assigned[farthest_points(self.grid_coordinates[assigned], count, euclidean=True)]


def grid_levels(count: int, dim: int) -> list[int]:
    """Cells per side of a `dim`-d grid of at most `count` cells, as even as possible (the first
    sides one larger where that still fits): 21,745 words in 6-d -> 6,5,5,5,5,5 = 18,750 cells."""
    if count < 2**dim:
        raise ConfigError(f"a {dim}-d grid needs at least {2**dim} codes, the codebook has {count}; lower grid_dim")
    side = int(count ** (1 / dim))
    while (side + 1) ** dim <= count:  # float rounding of the root
        side += 1
    levels = [side] * dim
    for i in range(dim):
        if math.prod(levels) // side * (side + 1) <= count:
            levels[i] += 1
    return levels


def cell_centres(cells: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """(...,) flat cell indices (first side most significant) -> (..., d) centres in the unit cube."""
    strides = torch.cumprod(torch.cat([levels.new_ones(1), levels[1:].flip(0)]), 0).flip(0)  # (d,)
    digits = (cells.unsqueeze(-1) // strides) % levels
    return (digits.float() + 0.5) / levels.float()


def grid_assignment(cube: torch.Tensor, levels: list[int]) -> torch.Tensor:
    """One word per cell of the grid: (K, d) cube coordinates -> (K,) flat cell index or -1.

    Sort all words along the first coordinate and cut them into levels[0] equal groups, cut each
    group along the second coordinate into levels[1], and so on: every cell then holds at least one
    word (K >= cells), and of a cell's words the one nearest its centre takes it. Deterministic."""
    count = cube.shape[0]
    group = torch.zeros(count, dtype=torch.long)
    for axis, side in enumerate(levels):
        order = torch.argsort(cube[:, axis], stable=True)
        order = order[torch.argsort(group[order], stable=True)]  # by group, then by this coordinate
        sizes = torch.bincount(group, minlength=int(group.max()) + 1)
        starts = torch.cumsum(sizes, 0) - sizes
        sorted_group = group[order]
        rank = torch.arange(count) - starts[sorted_group]
        chunk = rank * side // sizes[sorted_group]
        group[order] = sorted_group * side + chunk
    centres = cell_centres(group, torch.tensor(levels))
    distance = (cube.float() - centres).pow(2).sum(-1)
    order = torch.argsort(distance, stable=True)
    order = order[torch.argsort(group[order], stable=True)]  # by cell, nearest first
    first = torch.ones(count, dtype=torch.bool)
    first[1:] = group[order][1:] != group[order][:-1]
    cells = torch.full((count,), -1, dtype=torch.long)
    cells[order[first]] = group[order[first]]
    return cells


def principal_directions(centred: torch.Tensor, count: int) -> torch.Tensor:
    """(count, D) top principal directions of centred (K, D) rows, signs fixed (largest entry positive).
    From the eigenvectors of the (D, D) scatter matrix in float64: the SVD's directions, cheaper for K >> D."""
    centred = centred.double()
    _, vectors = torch.linalg.eigh(centred.T @ centred)  # ascending eigenvalues
    directions = vectors[:, -count:].flip(1).T
    signs = directions.gather(1, directions.abs().argmax(1, keepdim=True)).sign()
    return (directions * signs).float()
