"""The embedder contract shared by every embedder (pixel, tiled, clip, sscd).

An embedder turns a list of decoded images (uint8 HWC RGB numpy arrays, any size) into float32 vectors.
``name`` includes the preprocessing, because it keys the embedding cache: two embedders with the same name must
produce the same vectors for the same image.
"""
from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Literal, Sequence

import numpy as np

from .._util import default_device

__all__ = ["Embedder", "Embeddings", "Metric", "default_device"]

log = logging.getLogger(__name__)

Metric = Literal["l2", "cosine"]




@dataclass
class Embeddings:
    """Vectors for the images of one ImageSet under one embedder.

    ``ids[i]`` is the ImageSet id of row ``i`` of ``vectors``. Images that failed to decode are absent from ``ids``
    and listed in ``skipped`` (:class:`~diffaudit.results.Skipped`, which unpacks as ``(id, reason)``). ``vectors`` is float32 (possibly a read-only memmap).
    """

    ids: list[str]
    vectors: np.ndarray
    embedder: str
    metric: Metric
    skipped: list = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.vectors.ndim != 2 or self.vectors.shape[0] != len(self.ids):
            raise ValueError(
                f"Embeddings: vectors must be (len(ids), dim); got {self.vectors.shape} for {len(self.ids)} ids"
            )

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])


class Embedder(ABC):
    """Base class. Subclasses set ``name``, ``metric``, ``dim`` (after first batch if data-dependent)."""

    #: unique, includes preprocessing, keys the cache; e.g. "pixel-32x32-rgb", "sscd-torchscript-<sha8>-288"
    name: str = "embedder"
    #: "l2" (Euclidean distance, smaller = closer) or "cosine" (similarity in [-1, 1], larger = closer)
    metric: Metric = "l2"
    #: default copy / duplicate threshold from the literature, in this embedder's score units (None: none known)
    default_threshold: float | None = None
    #: images per forward pass
    batch_size: int = 64
    #: the family, for messages and for the searches that depend on the vector layout ("pixel", "tiled", ...)
    kind: str = "custom"
    #: the embedder's own duplicate threshold (score units) for ``find_duplicates``; None: the set-calibrated rule
    duplicate_threshold: float | None = None
    #: where ``duplicate_threshold`` comes from (shown in the duplicate report's rule)
    duplicate_threshold_source: str = ""
    #: True when scores are not the index's plain metric but :meth:`distance` (e.g. Carlini's tiled L2): searches
    #: take plain-L2 candidates from the index and re-score them with :meth:`distance`
    rescores: bool = False

    @property
    def family(self) -> str:
        """The embedder family: ``kind`` when the class sets it, else the first word of ``name`` (the cache-key
        convention ``<family>-<details>``, e.g. ``sscd-torchscript-<sha8>-288``)."""
        return self.kind if self.kind != "custom" else str(self.name).split("-", 1)[0].split(":", 1)[0]

    @property
    def copy_rule(self) -> str:
        """What counts as a copy under this embedder: the name of a :class:`diffaudit.metrics.rules.CopyRule`.
        Default: Gu et al.'s ratio for L2 vectors, Somepalli et al.'s replication for cosine descriptors."""
        return "gu_ratio" if self.metric == "l2" else "replication"

    def distance(self, a, b, *, pairwise: bool = True) -> np.ndarray:
        """The embedder's own distance (only for ``rescores = True`` embedders)."""
        raise NotImplementedError(f"{type(self).__name__} scores with the index's {self.metric} metric")

    @abstractmethod
    def embed_batch(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Embed uint8 HWC RGB arrays (any sizes) -> float32 array (len(images), dim). No grad; model's device."""

    def prepare(self, images: "ImageSet") -> None:  # noqa: F821
        """Optional: look at the ImageSet before embedding (pixel picks its native size here). Default: nothing.

        Called by ``diffaudit.embedders.embed`` before any batch; must be cheap (header data only).
        """

    def describe(self) -> dict:
        """Provenance for reports: name, metric, preprocessing, weights path/hash."""
        return {"name": self.name, "metric": self.metric, "threshold": self.default_threshold}

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"
