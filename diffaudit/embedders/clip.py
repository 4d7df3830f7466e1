"""CLIP image embeddings through open_clip, from a local checkpoint file (``weights=``) or, only when the user asks,
a hub tag (``pretrained=``, needs network access or an already-populated hub cache).

Loading: ``open_clip.create_model_and_transforms(arch, pretrained=None)`` builds the architecture, then the state
dict of ``weights`` is loaded strictly: ``.safetensors`` via ``safetensors.torch.load_file``, anything else via
``torch.load(weights_only=True)`` (never unpickling code). A full training checkpoint with a ``"state_dict"`` key
and a ``module.`` (DDP) prefix are handled; a checkpoint of the vision tower only (keys of ``model.visual``, with
or without the ``visual.`` prefix) is loaded into the vision tower. Any other mismatch is a ValueError naming the
first missing / unexpected keys.

Preprocessing: the model's own eval transform parameters (``model.visual.preprocess_cfg``: image size, mean/std,
interpolation, resize mode), applied vectorised on tensors: for the default "shortest" mode torchvision
``Resize(size)`` (smaller edge -> size) + ``CenterCrop(size)``; "squash" resizes to size x size; "longest" resizes
the longer edge and centre-pads with ``fill_color``. Resampling is ``interpolate(mode=bicubic|bilinear,
antialias=True)`` on float tensors clamped to [0, 1] — torchvision's tensor ``Resize(antialias=True)``, within a
few 1/255 of PIL's bicubic used by open_clip's PIL transform.

Output: ``model.encode_image`` L2-normalised; cosine metric; default near-duplicate threshold 0.95.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
from typing import Sequence

import numpy as np

from .base import Embedder, default_device
from .pixel import (
    as_rgb_uint8,
    center_crop,
    group_by_shape,
    normalize_uint8,
    resize_uint8,
    shortest_edge_size,
    uint8_nchw,
)
from .._util import file_sha256
from .sscd import check_weights_file

log = logging.getLogger(__name__)

CLIP_WEIGHTS_HELP = (
    "CLIP weights are an open_clip checkpoint file for this architecture (e.g. open_clip_pytorch_model.bin or "
    "open_clip_model.safetensors from the laion/... or timm/... model repos on the Hugging Face hub, downloaded once); "
    'pass weights="path/to/file", or pretrained="<tag>" to let open_clip download it (needs network access)'
)


def _import_open_clip():
    try:
        import open_clip  # noqa: PLC0415
    except ImportError as e:  # pragma: no cover - core dependency
        raise ModuleNotFoundError('clip embedders need open_clip: pip install "open-clip-torch"') from e
    return open_clip


def _state_dict(path) -> dict:
    """Tensors of a checkpoint file (:func:`diffaudit.checkpoints.load_state_dict_file`: safetensors, or a
    tensor-only pickle); unwraps "state_dict" / "model" and a DataParallel "module." prefix."""
    from ..checkpoints import CheckpointError, load_state_dict_file

    path = str(path)
    try:
        sd = load_state_dict_file(path, unwrap=("state_dict", "model", "model_state_dict"))
    except CheckpointError as e:
        raise ValueError(f"weights={path!r}: {e}; expected a state dict (.pt/.pth/.bin) or a .safetensors file") from None
    if not sd:
        raise ValueError(f"weights={path!r}: no state dict found (got {type(sd).__name__})")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def _load_into(model, sd: dict, path: str) -> None:
    """Strict load into the full model, or into ``model.visual`` for a vision-only checkpoint; clear mismatch error."""
    model_keys = set(model.state_dict())
    sd = dict(sd)
    if "logit_scale" in sd and hasattr(model, "logit_scale") and sd["logit_scale"].ndim != model.logit_scale.ndim:
        sd["logit_scale"] = sd["logit_scale"].reshape(model.logit_scale.shape)
    for k in [k for k in sd if k.endswith("embeddings.position_ids") and k not in model_keys]:
        del sd[k]  # dropped by newer transformers versions
    target, keys = model, set(sd)
    if keys != model_keys:
        visual_keys = set(model.visual.state_dict())
        stripped = {k[len("visual.") :] if k.startswith("visual.") else k for k in keys}
        if len(stripped) == len(keys) and stripped == visual_keys:  # a checkpoint of the vision tower only
            target = model.visual
            sd = {k[len("visual.") :] if k.startswith("visual.") else k: v for k, v in sd.items()}
    tkeys = set(target.state_dict())
    missing = sorted(tkeys - set(sd))
    unexpected = sorted(set(sd) - tkeys)
    if missing or unexpected:
        raise ValueError(
            f"weights={path!r}: does not match the architecture: {len(missing)} missing keys "
            f"(first: {missing[:5]}), {len(unexpected)} unexpected keys (first: {unexpected[:5]}). Is it a checkpoint "
            "of this open_clip architecture?"
        )
    try:
        target.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        msg = str(e).strip().splitlines()
        detail = "; ".join(line.strip() for line in msg[1:4]) or msg[0]
        raise ValueError(f"weights={path!r}: tensor shapes do not match the architecture: {detail}") from None


class _DropRandomInitWarning(logging.Filter):
    """open_clip logs 'No pretrained weights loaded ... initialized randomly' on the root logger when we build the
    architecture before loading our own weights; that message is wrong here, so it is dropped during the call."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


class CLIPEmbedder(Embedder):
    """open_clip image tower, L2-normalised ``encode_image``; cosine metric.

    Args:
        arch: open_clip architecture name (``open_clip.list_models()``), e.g. "ViT-B-32".
        weights: local checkpoint file (safetensors or a torch state dict / training checkpoint).
        pretrained: open_clip pretrained tag (hub download) — used only when given and ``weights`` is not.
        batch_size: images per forward pass.
        device: torch device (default CUDA when available, else CPU; float32 on CPU).
        image_mean, image_std, image_interpolation, image_resize_mode: override the architecture's preprocessing
            (e.g. the values of the pretrained tag the local weights came from; open_clip's ``get_pretrained_cfg``
            lists them). Overrides change ``name`` (a short hash suffix).
    """

    metric = "cosine"
    default_threshold = 0.95
    kind = "clip"

    def __init__(
        self,
        arch: str = "ViT-B-32",
        *,
        weights=None,
        pretrained: str | None = None,
        batch_size: int = 64,
        device: str | None = None,
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        image_interpolation: str | None = None,
        image_resize_mode: str | None = None,
    ) -> None:
        open_clip = _import_open_clip()
        self.arch = str(arch)
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r}: must be >= 1")
        self.device = device or default_device()
        if weights is not None and pretrained is not None:
            raise ValueError(f"weights={str(weights)!r} and pretrained={pretrained!r}: give one of them, not both")
        if weights is None and pretrained is None:
            raise FileNotFoundError(f"clip:{self.arch} needs weights=<local file> (or pretrained=<tag>). {CLIP_WEIGHTS_HELP}")
        self.weights = None if weights is None else check_weights_file(weights, "weights", CLIP_WEIGHTS_HELP)
        self.pretrained = pretrained
        if self.arch not in open_clip.list_models() and ":" not in self.arch:
            known = ", ".join(open_clip.list_models()[:8])
            raise ValueError(f"arch={self.arch!r}: not an open_clip architecture (open_clip.list_models(): {known}, ...)")
        overrides = {
            "image_mean": None if image_mean is None else tuple(float(v) for v in image_mean),
            "image_std": None if image_std is None else tuple(float(v) for v in image_std),
            "image_interpolation": image_interpolation,
            "image_resize_mode": image_resize_mode,
        }
        if image_interpolation not in (None, "bicubic", "bilinear"):
            raise ValueError(f"image_interpolation={image_interpolation!r}: allowed 'bicubic', 'bilinear'")
        if image_resize_mode not in (None, "shortest", "longest", "squash"):
            raise ValueError(f"image_resize_mode={image_resize_mode!r}: allowed 'shortest', 'longest', 'squash'")
        for k in ("image_mean", "image_std"):
            if overrides[k] is not None and len(overrides[k]) != 3:
                raise ValueError(f"{k}={overrides[k]!r}: expected 3 values (R, G, B)")
        self._overrides = {k: v for k, v in overrides.items() if v is not None}
        if self.weights is not None:
            self.sha256 = file_sha256(self.weights)
            quiet = _DropRandomInitWarning()
            logging.getLogger().addFilter(quiet)
            try:
                model, _, _ = open_clip.create_model_and_transforms(
                    self.arch, pretrained=None, device="cpu", **self._overrides
                )
            finally:
                logging.getLogger().removeFilter(quiet)
            _load_into(model, _state_dict(self.weights), str(self.weights))
        else:
            self.sha256 = None
            try:
                model, _, _ = open_clip.create_model_and_transforms(
                    self.arch, pretrained=pretrained, device="cpu", **self._overrides
                )
            except Exception as e:
                raise RuntimeError(
                    f"clip:{self.arch} pretrained={pretrained!r} could not be loaded ({type(e).__name__}: {e}). "
                    "Downloading pretrained weights needs network access (or the file already in the hub cache); "
                    "otherwise pass weights=<local checkpoint file>."
                ) from None
        model = model.to(self.device).float().eval()
        self._model = model
        cfg = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
        size = cfg.get("size", getattr(model.visual, "image_size", 224))
        if isinstance(size, (list, tuple)):
            size = tuple(int(v) for v in size)
            size = size if len(size) == 2 else (size[0], size[0])
        else:
            size = (int(size), int(size))
        self.image_size: tuple[int, int] = size
        mean = cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)
        std = cfg.get("std", open_clip.OPENAI_DATASET_STD)
        self.mean = tuple(float(v) for v in (mean if isinstance(mean, (list, tuple)) else (mean,) * 3))
        self.std = tuple(float(v) for v in (std if isinstance(std, (list, tuple)) else (std,) * 3))
        self.interpolation = "bilinear" if cfg.get("interpolation") == "bilinear" else "bicubic"
        self.resize_mode = cfg.get("resize_mode") or "shortest"
        self.fill_value = int(cfg.get("fill_color", 0) or 0)
        self.dim: int | None = None

    @property
    def name(self) -> str:  # type: ignore[override]
        src = self.sha256[:8] if self.sha256 else re.sub(r"[^A-Za-z0-9_.-]", "_", str(self.pretrained))
        arch = re.sub(r"[^A-Za-z0-9_.-]", "_", self.arch)
        h, w = self.image_size
        size = str(h) if h == w else f"{h}x{w}"
        name = f"clip-{arch}-{src}-{size}"
        if self._overrides:  # preprocessing differs from the architecture's defaults: it must key the cache
            tag = json.dumps({"mean": self.mean, "std": self.std, "interp": self.interpolation,
                              "resize": self.resize_mode}, sort_keys=True)
            name += "-p" + hashlib.sha256(tag.encode()).hexdigest()[:6]
        return name

    def describe(self) -> dict:
        d = super().describe()
        h, w = self.image_size
        d.update(
            {
                "preprocessing": f"open_clip eval transform, resize_mode={self.resize_mode} to {h}x{w} "
                f"({self.interpolation}, antialias=True on uint8); ToTensor; Normalize(mean={list(self.mean)}, "
                f"std={list(self.std)}); encode_image, L2-normalised",
                "arch": self.arch,
                "weights": None if self.weights is None else str(self.weights),
                "weights_sha256": self.sha256,
                "pretrained": self.pretrained,
            }
        )
        return d

    # -- preprocessing --------------------------------------------------------------------------------------------
    def _geometry(self, u):
        """Resize / crop / pad a uint8 NCHW CPU tensor to ``image_size`` like open_clip's eval transform."""
        import torch.nn.functional as F

        th, tw = self.image_size
        h, w = u.shape[-2:]
        mode = self.interpolation
        if self.resize_mode == "squash":
            return resize_uint8(u, (th, tw), mode)
        if self.resize_mode == "longest":
            scale = min(th / h, tw / w)
            nh, nw = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
            y = resize_uint8(u, (nh, nw), mode)
            ph, pw = th - nh, tw - nw
            return F.pad(y, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2], value=self.fill_value)
        # shortest (default): Resize(size) + CenterCrop(size)
        if th == tw:
            nh, nw = shortest_edge_size(h, w, th)
        else:
            scale = max(th / h, tw / w)
            nh, nw = max(th, int(round(h * scale))), max(tw, int(round(w * scale)))
        return center_crop(resize_uint8(u, (nh, nw), mode), (th, tw))

    def preprocess(self, images: Sequence[np.ndarray]):
        """uint8 HWC images -> normalised float tensor (N, 3, h, w) per the model's eval transform parameters.

        Geometry (resize / crop / pad) runs on uint8 CPU tensors with torch's antialiased kernels (PIL's filters, as
        open_clip's PIL transform), then ToTensor + Normalize in one pass on the device.
        """
        import torch

        imgs = [as_rgb_uint8(a, i) for i, a in enumerate(images)]
        groups = list(group_by_shape(imgs).values())
        if len(groups) == 1:
            u = self._geometry(uint8_nchw(imgs))
        else:
            u = torch.empty((len(imgs), 3, *self.image_size), dtype=torch.uint8)
            for idx in groups:
                u[idx] = self._geometry(uint8_nchw([imgs[i] for i in idx]))
        return normalize_uint8(u, self.mean, self.std, self.device)

    def embed_batch(self, images: Sequence[np.ndarray]) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        if len(images) == 0:
            return np.zeros((0, self.dim or 0), np.float32)
        with torch.inference_mode():
            y = self._model.encode_image(self.preprocess(images)).float()
            y = F.normalize(y, dim=1).cpu().numpy()
        self.dim = int(y.shape[1])
        return y
