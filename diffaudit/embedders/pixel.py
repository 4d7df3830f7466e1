"""Pixel embedder: images resized to a fixed size, RGB in [0, 1], flattened; Euclidean (L2) metric.

This is the embedded default and the space of Gu et al. 2023 ("On Memorization in Diffusion Models"): a sample is
memorized when d(nearest training image) / d(second nearest) < 1/3 with d the L2 distance between these vectors.

Vector layout: ``image.reshape(-1)`` of the resized float image in HWC order, i.e. row-major over
(row, column, channel), values ``uint8 / 255``. When an image already has the target size no resampling happens, so
the vector is exactly ``img.astype(float32).reshape(-1) / 255``.

Resampling: ``torch.nn.functional.interpolate(mode="bilinear", antialias=True, align_corners=False)`` on float32
tensors in [0, 1] (no rounding back to uint8). For downscaling this is the same triangle filter with support scaled
by the reduction factor that PIL's ``Image.resize(..., BILINEAR)`` uses (torchvision's tensor ``Resize`` with
``antialias=True``); for upscaling it is plain bilinear. Whole batches of equal-size images are resized in one
vectorised call.

When no resampling is needed the whole batch is converted in numpy (single-threaded, no torch threads woken).

This module also holds the small helpers the other embedders share (uint8 HWC list -> uint8 NCHW batch, uint8
antialiased resize, ToTensor + Normalize in one pass, shortest-edge resize sizes, centre crop).
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from .base import Embedder, default_device

log = logging.getLogger(__name__)

#: side used when images do not share one size and none was given
DEFAULT_SIDE = 64


# ----------------------------------------------------------------------------------------------------------------
# shared helpers (used by tiled, clip, sscd). The model embedders (clip, sscd) resize uint8 tensors with torch's
# vectorised antialiased kernels (PIL's filters, which their reference transforms use), then do ToTensor + Normalize
# in one pass on the target device. Pixel/tiled resample in float32 (no rounding to uint8).
# ----------------------------------------------------------------------------------------------------------------
def as_rgb_uint8(img: np.ndarray, index: int = 0) -> np.ndarray:
    """Check one image and return it as uint8 HWC with 3 channels (HW and HW1 grayscale are repeated to RGB)."""
    a = np.asarray(img)
    if a.dtype != np.uint8:
        raise TypeError(f"images[{index}]: dtype must be uint8 (HWC RGB), got {a.dtype}")
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 3) or a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"images[{index}]: shape must be (H, W, 3), (H, W, 1) or (H, W); got {a.shape}")
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    return a


def group_by_shape(images: Sequence[np.ndarray]) -> dict[tuple[int, int], list[int]]:
    """Indices of the images grouped by (height, width), in first-seen order."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, a in enumerate(images):
        groups.setdefault((int(a.shape[0]), int(a.shape[1])), []).append(i)
    return groups


def uint8_nchw(images: Sequence[np.ndarray]):
    """Equal-size uint8 HWC arrays -> uint8 tensor (N, 3, H, W) on CPU (a channels-last view of ``np.stack``)."""
    import torch

    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)


def resize_uint8(u, size: tuple[int, int], mode: str = "bilinear"):
    """Antialiased resize of a uint8 NCHW CPU tensor with torch's vectorised uint8 kernels (PIL's filters; results
    within 1/255 of ``PIL.Image.resize`` for bilinear); a no-op when the size already matches."""
    import torch.nn.functional as F

    if tuple(u.shape[-2:]) == tuple(size):
        return u
    return F.interpolate(u, size=tuple(size), mode=mode, antialias=True)


def normalize_uint8(u, mean, std, device: str = "cpu"):
    """uint8 NCHW -> float32 contiguous NCHW ``(u / 255 - mean) / std`` on ``device`` (ToTensor + Normalize)."""
    import torch

    m = torch.tensor([255.0 * v for v in mean], dtype=torch.float32, device=device).view(1, 3, 1, 1)
    inv = torch.tensor([1.0 / (255.0 * v) for v in std], dtype=torch.float32, device=device).view(1, 3, 1, 1)
    x = u.to(device, non_blocking=True).float()
    return x.sub_(m).mul_(inv).contiguous()


def resize_float_hwc(arr: np.ndarray, size: tuple[int, int], device: str = "cpu") -> np.ndarray:
    """uint8 (N, H, W, 3) -> float32 (N, h, w, 3) in [0, 1]: antialiased bilinear in float32 (no uint8 rounding);
    plain numpy (no resampling, torch not even imported) when the size already matches."""
    if tuple(arr.shape[1:3]) == tuple(size):
        return np.divide(arr, np.float32(255.0), dtype=np.float32)
    import torch
    import torch.nn.functional as F

    x = np.ascontiguousarray(arr.transpose(0, 3, 1, 2), dtype=np.float32)
    x /= np.float32(255.0)
    y = F.interpolate(torch.from_numpy(x).to(device), size=tuple(size), mode="bilinear", antialias=True,
                      align_corners=False)
    return np.ascontiguousarray(y.cpu().numpy().transpose(0, 2, 3, 1))


def shortest_edge_size(h: int, w: int, side: int) -> tuple[int, int]:
    """Output (h, w) of torchvision ``Resize(side)`` (smaller edge -> side, the other edge scaled and truncated)."""
    if h <= w:
        return side, max(1, int(side * w / h))
    return max(1, int(side * h / w)), side


def center_crop(x, size: tuple[int, int]):
    """torchvision ``CenterCrop`` on a NCHW tensor (pads with zeros when the crop is larger than the image)."""
    import torch.nn.functional as F

    th, tw = size
    h, w = x.shape[-2:]
    if th > h or tw > w:
        ph, pw = max(th - h, 0), max(tw - w, 0)
        x = F.pad(x, [pw // 2, (pw + 1) // 2, ph // 2, (ph + 1) // 2], value=0.0)
        h, w = x.shape[-2:]
    top = int(round((h - th) / 2.0))
    left = int(round((w - tw) / 2.0))
    return x[..., top : top + th, left : left + tw]


def parse_size(size, arg: str = "size") -> tuple[int, int] | None:
    """None | int | (h, w) | "32" | "32x48" -> (h, w) or None; a clear ValueError otherwise."""
    if size is None:
        return None
    try:
        if isinstance(size, str):
            parts = size.lower().split("x")
            vals = [int(p) for p in parts]
        elif isinstance(size, (int, np.integer)):
            vals = [int(size)]
        else:
            vals = [int(v) for v in size]
        if len(vals) == 1:
            vals = vals * 2
        if len(vals) != 2 or min(vals) < 1:
            raise ValueError
    except (TypeError, ValueError):
        raise ValueError(f"{arg}={size!r}: expected a positive int side or (height, width)") from None
    return vals[0], vals[1]


def native_size(images) -> tuple[int, int] | None:
    """The (h, w) shared by every image of an ImageSet (from headers), or None when sizes differ / set is empty."""
    try:
        sizes = set(tuple(int(v) for v in s) for s in images.sizes())
    except Exception as e:  # pragma: no cover - defensive: a broken header should not stop the embedder
        log.warning("could not read image sizes (%s); using the default size", e)
        return None
    return next(iter(sizes)) if len(sizes) == 1 else None


# ----------------------------------------------------------------------------------------------------------------
class PixelEmbedder(Embedder):
    """Resize to ``size`` (default: native size when all images share it, else 64x64), RGB/255, flatten. L2 metric.

    Args:
        size: side (int) or (height, width). None: chosen by :meth:`prepare` (native size when every image of the
            ImageSet has the same size and its longer side is at most ``max_native``, else 64x64). Once set it is
            never changed, so an audit prepares on the training set and embeds generated samples in the same space.
        max_native: largest native side used as is (default 128: 49,152 dims). Larger shared sizes (e.g. 512x512
            photos, 786k dims, 3 MB per image) fall back to 64x64 so that 100k vectors still fit in memory; pass
            ``size=`` to choose.
        batch_size: images per batch.
        device: torch device (default: CUDA when available, else CPU).
    """

    metric = "l2"
    default_threshold = None
    kind = "pixel"

    def __init__(
        self, size=None, *, max_native: int = 128, batch_size: int = 256, device: str | None = None
    ) -> None:
        self.size: tuple[int, int] | None = parse_size(size)
        self.max_native = int(max_native)
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r}: must be >= 1")
        self._device = device

    @property
    def device(self) -> str:
        """Where images are resized; decided on first use (torch is imported only when an image needs resizing)."""
        if self._device is None:
            self._device = default_device()
        return self._device

    @device.setter
    def device(self, value: str | None) -> None:
        self._device = value

    # -- size -----------------------------------------------------------------------------------------------------
    def _fit_size(self, hw: tuple[int, int]) -> tuple[int, int]:
        """Hook for subclasses (tiled rounds to a multiple of its grid)."""
        return hw

    def prepare(self, images) -> None:
        if self.size is not None:
            return
        self.size = self._fit_size(self._default_size(native_size(images)))

    def _default_size(self, hw: tuple[int, int] | None) -> tuple[int, int]:
        if hw is None:
            log.info("%s: images have different sizes; resizing all to %dx%d", self.kind, DEFAULT_SIDE, DEFAULT_SIDE)
            return DEFAULT_SIDE, DEFAULT_SIDE
        if max(hw) > self.max_native:
            log.info("%s: native size %dx%d is larger than max_native=%d; resizing to %dx%d (pass size= to choose)",
                     self.kind, hw[0], hw[1], self.max_native, DEFAULT_SIDE, DEFAULT_SIDE)
            return DEFAULT_SIDE, DEFAULT_SIDE
        return hw

    def _ensure_size(self, images: Sequence[np.ndarray]) -> tuple[int, int]:
        if self.size is None:  # embed_batch called without prepare(): decide from this first batch, then keep it
            shapes = {tuple(np.shape(a)[:2]) for a in images}
            hw = next(iter(shapes)) if len(shapes) == 1 else None
            self.size = self._fit_size(self._default_size(None if hw is None else (int(hw[0]), int(hw[1]))))
            log.info("%s: size not set and prepare() not called; using %s from the first batch", self.kind, self.size)
        return self.size

    @property
    def name(self) -> str:  # type: ignore[override]
        if self.size is None:
            return "pixel-auto"
        return f"pixel-{self.size[0]}x{self.size[1]}"

    @property
    def dim(self) -> int | None:
        return None if self.size is None else 3 * self.size[0] * self.size[1]

    # -- embedding ------------------------------------------------------------------------------------------------
    def _hwc(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """float32 (N, h, w, 3) in [0, 1] at ``self.size`` (numpy when no resize is needed, torch otherwise)."""
        size = self._ensure_size(images)
        imgs = [as_rgb_uint8(a, i) for i, a in enumerate(images)]
        groups = group_by_shape(imgs)
        if len(groups) == 1:
            return self._resize(np.stack(imgs), size)
        out = np.empty((len(imgs), size[0], size[1], 3), np.float32)
        for idx in groups.values():
            out[idx] = self._resize(np.stack([imgs[i] for i in idx]), size)
        return out

    def _resize(self, arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        same = tuple(arr.shape[1:3]) == tuple(size)
        return resize_float_hwc(arr, size, "cpu" if same else self.device)  # no device (no torch) needed when same

    def embed_batch(self, images: Sequence[np.ndarray]) -> np.ndarray:
        if len(images) == 0:
            return np.zeros((0, self.dim or 0), np.float32)
        return self._hwc(images).reshape(len(images), -1)  # HWC order (no autograd: plain tensors, no parameters)

    def describe(self) -> dict:
        d = super().describe()
        h, w = self.size if self.size is not None else (None, None)
        d.update(
            {
                "preprocessing": (
                    f"RGB uint8/255; resize to {h}x{w} with torch interpolate bilinear antialias=True "
                    "(no resize when the image already has this size); flattened HWC"
                ),
                "size": [h, w],
                "weights": None,
            }
        )
        return d
