"""Shared fixtures: real images from scikit-learn's digits (no downloads), tiny and fast."""
from __future__ import annotations

import numpy as np
import pytest


def digits_rgb(n: int | None = None, side: int = 32, seed: int | None = None) -> np.ndarray:
    """scikit-learn's 8x8 digits as uint8 RGB images upscaled to side x side (nearest), shape (n, side, side, 3)."""
    from sklearn.datasets import load_digits

    x = load_digits().images  # (1797, 8, 8) in 0..16
    if seed is not None:
        x = x[np.random.default_rng(seed).permutation(len(x))]
    if n is not None:
        x = x[:n]
    x = (x / 16.0 * 255.0).round().astype(np.uint8)
    rep = side // 8
    x = x.repeat(rep, axis=1).repeat(rep, axis=2)
    return np.repeat(x[..., None], 3, axis=3)


@pytest.fixture
def digits32():
    return digits_rgb(200, 32)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models: one intra-op thread is faster and, on a shared 2-core box, far less noisy. Restored after."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
