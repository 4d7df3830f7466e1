"""diffaudit: audit diffusion models for memorization of their training data.

Public API (these names are a contract: tests and users call them)::

    import diffaudit as da
    train = da.ImageSet.from_folder("data/train")
    emb = da.get_embedder("pixel")
    dups = da.find_duplicates(train, embedder=emb)
    hits = da.match(generated, train, embedder=emb, k=5)
    result = da.audit(checkpoints="runs/ddpm", train=train, heldout=val, embedders=["pixel"], num_samples=512)
    monitor = da.MemorizationMonitor(train=train, heldout=val, embedder="pixel", every_n_steps=500)

Names are imported lazily so ``import diffaudit`` stays cheap (torch, faiss and diffusers load on first use).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "ImageSet": "diffaudit.data",
    "Skipped": "diffaudit.data",
    "Embedder": "diffaudit.embedders",
    "Embeddings": "diffaudit.embedders",
    "get_embedder": "diffaudit.embedders",
    "register_embedder": "diffaudit.embedders",
    "embed": "diffaudit.embedders",
    "EmbeddingCache": "diffaudit.cache",
    "EmbeddingIndex": "diffaudit.index",
    "self_neighbors": "diffaudit.index",
    "duplicate_threshold": "diffaudit.curate",
    "find_duplicates": "diffaudit.curate",
    "match": "diffaudit.curate",
    "DuplicateReport": "diffaudit.curate",
    "Matches": "diffaudit.curate",
    "membership_scores": "diffaudit.membership",
    "discover_checkpoints": "diffaudit.checkpoints",
    "CheckpointSampler": "diffaudit.sampling",
    "audit": "diffaudit.audit",
    "AuditConfig": "diffaudit.audit",
    "AuditResult": "diffaudit.results",
    "CheckpointResult": "diffaudit.results",
    "EmbedderMetrics": "diffaudit.results",
    "ImageRisk": "diffaudit.results",
    "Estimate": "diffaudit.results",
    "MemorizationMonitor": "diffaudit.monitor",
    "OnsetRule": "diffaudit.onset",
    "detect_onset": "diffaudit.onset",
    "loo_scores": "diffaudit.loo",
    "compare_runs": "diffaudit.compare",
    "CompareResult": "diffaudit.results",
    "EmbedderQuality": "diffaudit.results",
    "tau_gen": "diffaudit.onset",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'diffaudit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__


if TYPE_CHECKING:  # pragma: no cover
    from .audit import AuditConfig, audit
    from .cache import EmbeddingCache
    from .checkpoints import discover_checkpoints
    from .curate import DuplicateReport, Matches, duplicate_threshold, find_duplicates, match
    from .membership import membership_scores
    from .data import ImageSet, Skipped
    from .embedders import Embedder, Embeddings, embed, get_embedder, register_embedder
    from .index import EmbeddingIndex, self_neighbors
    from .compare import compare_runs
    from .loo import loo_scores
    from .onset import tau_gen
    from .results import CompareResult, EmbedderQuality
    from .monitor import MemorizationMonitor, OnsetRule, detect_onset
    from .results import AuditResult, CheckpointResult, EmbedderMetrics, Estimate, ImageRisk
    from .sampling import CheckpointSampler
