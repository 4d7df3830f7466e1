"""Tiled L2 of Carlini et al. 2023, "Extracting Training Data from Diffusion Models" (USENIX Security 2023).

Carlini et al. call a generation a copy of a training image when the two are close *in every region*: the image is
divided into non-overlapping tiles (16 tiles, a 4x4 grid) and the distance is the **maximum over tiles** of the
per-tile L2 distance between corresponding tiles, with the L2 normalised by the dimension,
``l2(a, b) = sqrt(sum_i (a_i - b_i)^2 / d)`` (the RMS difference, pixels in [0, 1]).

Embedding layout (this module's decision, documented so metrics can rely on it):

* the image is resized like the pixel embedder (antialiased bilinear, RGB/255) to ``size`` whose height and width
  are multiples of ``grid`` (native size when all images share it and fit ``max_native``, rounded to the nearest
  multiple, else 64x64);
* the vector is the concatenation of the ``grid*grid`` tiles in row-major tile order, each tile flattened in HWC
  order and **divided by sqrt(tile_dim)** (tile_dim = 3 * tile_h * tile_w). Every tile therefore has the same length
  ``dim / tiles``, and the plain L2 distance between two tile slices is the RMS distance of Carlini et al.

Consequences:

* ``tiled_l2(a, b, tiles)`` = max over tiles of ``||a_t - b_t||`` = Carlini's tiled L2 (RMS per tile, max over tiles);
* the plain L2 over the whole vector (metric "l2", what an index searches) is ``sqrt(sum_t ||a_t - b_t||^2)``, so
  ``plain / sqrt(tiles) <= tiled_l2 <= plain``. An index finds candidates by plain L2; ``tiled_l2`` re-scores them.
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from .pixel import PixelEmbedder

log = logging.getLogger(__name__)


def tiled_l2(a, b, tiles: int = 16, *, pairwise: bool = True, chunk: int = 1024) -> np.ndarray:
    """Max over tiles of the per-tile L2 distance between tiled embedding vectors (Carlini et al. 2023).

    Args:
        a: (na, dim) tiled vectors (a single vector (dim,) is accepted).
        b: (nb, dim) tiled vectors.
        tiles: number of tiles per vector (``grid * grid``, 16 by default); ``dim`` must be divisible by it.
        pairwise: True -> (na, nb) matrix of all pairs; False -> row-wise (n,) for ``a[i]`` vs ``b[i]``
            (na == nb), the shape used to re-score index candidates.
        chunk: at most this many rows of ``a`` at a time in pairwise mode (also capped so that a chunk's
            ``rows * nb * tiles`` float64 intermediates stay under ~256 MB).

    Returns:
        float32 distances (>= 0), computed in float64 chunk by chunk (pairwise mode holds ``b`` in float64).
    """
    a = np.atleast_2d(np.asarray(a))
    b = np.atleast_2d(np.asarray(b))
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError(f"tiled_l2: a and b must be 2-D (n, dim); got shapes {a.shape} and {b.shape}")
    tiles = int(tiles)
    if tiles < 1:
        raise ValueError(f"tiles={tiles!r}: must be a positive int (grid*grid, e.g. 16)")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"tiled_l2: a and b must have the same dim; got {a.shape[1]} and {b.shape[1]}")
    dim = a.shape[1]
    if dim % tiles:
        raise ValueError(f"tiles={tiles}: dim {dim} is not divisible by the number of tiles")
    L = dim // tiles
    at = a.reshape(len(a), tiles, L)
    bt = b.reshape(len(b), tiles, L)
    if not pairwise:
        if len(a) != len(b):
            raise ValueError(f"tiled_l2(pairwise=False): a and b need the same number of rows; got {len(a)}, {len(b)}")
        out = np.empty(len(a), np.float32)
        step = max(1, (1 << 22) // max(1, dim))  # ~32 MB of float64 differences per chunk
        for s in range(0, len(a), step):
            diff = at[s : s + step].astype(np.float64) - bt[s : s + step]
            d2 = (diff**2).sum(axis=2)
            out[s : s + step] = np.sqrt(d2.max(axis=1))
        return out
    out = np.empty((len(a), len(b)), np.float32)
    bt = bt.astype(np.float64)
    bn = (bt**2).sum(axis=2)  # (nb, T)
    bt_t = np.ascontiguousarray(bt.transpose(1, 2, 0))  # (T, L, nb)
    step = max(1, min(int(chunk), (1 << 25) // max(1, tiles * len(b))))  # ~256 MB of float64 per chunk at most
    for s in range(0, len(a), step):
        ac = at[s : s + step].astype(np.float64)  # (c, T, L)
        an = (ac**2).sum(axis=2)  # (c, T)
        cross = np.matmul(ac.transpose(1, 0, 2), bt_t)  # (T, c, nb)
        d2 = an.T[:, :, None] + bn.T[:, None, :] - 2.0 * cross  # (T, c, nb)
        out[s : s + step] = np.sqrt(np.maximum(d2.max(axis=0), 0.0))
    return out


class TiledEmbedder(PixelEmbedder):
    """Tiled pixel vectors for Carlini et al.'s tiled L2 (see module docstring for the exact layout).

    Args:
        grid: tiles per side (4 -> 16 tiles).
        size: side or (h, w), multiples of ``grid``; None: native size (rounded) when shared and at most
            ``max_native`` (128), else 64x64.
    """

    metric = "l2"
    default_threshold = None
    kind = "tiled"
    copy_rule = "extraction"  # Carlini et al.'s calibrated ratio (diffaudit.metrics.rules)
    rescores = True  # the index finds plain-L2 candidates; distance() (tiled L2) scores them

    def __init__(
        self, grid: int = 4, size=None, *, max_native: int = 128, batch_size: int = 256, device: str | None = None
    ) -> None:
        try:
            self.grid = int(grid)
        except (TypeError, ValueError):
            raise ValueError(f"grid={grid!r}: expected a positive int (tiles per side)") from None
        if self.grid < 1:
            raise ValueError(f"grid={grid!r}: expected a positive int (tiles per side)")
        super().__init__(size, max_native=max_native, batch_size=batch_size, device=device)
        if self.size is not None and (self.size[0] % self.grid or self.size[1] % self.grid):
            raise ValueError(f"size={size!r}: height and width must be multiples of grid={self.grid}")

    @property
    def tiles(self) -> int:
        return self.grid * self.grid

    def _fit_size(self, hw: tuple[int, int]) -> tuple[int, int]:
        g = self.grid
        return tuple(max(g, int(round(v / g)) * g) for v in hw)  # type: ignore[return-value]

    @property
    def name(self) -> str:  # type: ignore[override]
        if self.size is None:
            return f"tiled-{self.grid}x{self.grid}-auto"
        return f"tiled-{self.grid}x{self.grid}-{self.size[0]}x{self.size[1]}"

    def embed_batch(self, images: Sequence[np.ndarray]) -> np.ndarray:
        import torch

        if len(images) == 0:
            return np.zeros((0, self.dim or 0), np.float32)
        g = self.grid
        with torch.inference_mode():
            x = self._hwc(images)  # (N, H, W, 3) float32
        n, h, w, c = x.shape
        th, tw = h // g, w // g
        t = x.reshape(n, g, th, g, tw, c).transpose(0, 1, 3, 2, 4, 5)  # (N, gy, gx, th, tw, C): tiles, HWC inside
        t = t.reshape(n, g * g, th * tw * c) * np.float32(1.0 / np.sqrt(th * tw * c))
        return np.ascontiguousarray(t.reshape(n, -1), dtype=np.float32)

    def distance(self, a, b, *, pairwise: bool = True) -> np.ndarray:
        """Carlini's tiled L2 between vectors of this embedder (``tiled_l2`` with this grid)."""
        return tiled_l2(a, b, self.tiles, pairwise=pairwise)

    def describe(self) -> dict:
        d = super().describe()
        h, w = self.size if self.size is not None else (None, None)
        d["preprocessing"] = (
            f"RGB uint8/255; resize to {h}x{w} with torch interpolate bilinear antialias=True; "
            f"{self.grid}x{self.grid} tiles, each flattened HWC and divided by sqrt(tile dim) "
            "(per-tile L2 = RMS distance); score = max over tiles (tiled_l2)"
        )
        d["tiles"] = self.tiles
        return d
