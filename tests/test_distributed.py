"""Ray backend on a local Ray instance (2 CPUs): shards equal the closed-form pixel vectors and the local backend's,
ids and order follow the ImageSet, a corrupt file is counted as skipped, find_duplicates(backend="ray") finds the
planted copies the local backend finds."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from PIL import Image

ray = pytest.importorskip("ray", reason='Ray is not installed (pip install "diffaudit[ray]")')
pytest.importorskip("ray.data", reason='Ray Data is not installed (pip install "diffaudit[ray]")')

from conftest import digits_rgb  # noqa: E402

from diffaudit import distributed  # noqa: E402
from diffaudit.data import ImageSet  # noqa: E402
from diffaudit.embedders import embed, get_embedder  # noqa: E402
from diffaudit.index import EmbeddingIndex  # noqa: E402

N = 40
TRUNC = "017_trunc.png"  # sorts in the middle of the folder


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory):
    """N digit PNGs (16x16 RGB), image 25 an exact copy of image 3, plus a truncated PNG that fails at decode."""
    root = tmp_path_factory.mktemp("digits")
    x = digits_rgb(N, 16)
    x[25] = x[3]
    for i, a in enumerate(x):
        Image.fromarray(a).save(root / f"{i:03d}.png")
    rng = np.random.default_rng(0)
    noisy = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(noisy).save(root / "tmp.png")
    full = (root / "tmp.png").read_bytes()
    (root / "tmp.png").unlink()
    (root / TRUNC).write_bytes(full[: len(full) // 2])
    ids = [f"{i:03d}.png" for i in range(N)]
    return root, x, ids


def test_embed_ray_shards_equal_pixels_and_local(local_ray, digits_folder, tmp_path):
    root, x, ids = digits_folder
    images = ImageSet.from_folder(root)
    assert TRUNC in images.ids  # passes the header scan, fails at decode
    paths = distributed.embed_ray(images, "pixel", out_dir=tmp_path / "shards", batch_size=8, shard_size=16,
                                  num_workers=2)
    assert [p.name for p in paths] == ["shard-000000000.npy", "shard-000000016.npy", "shard-000000032.npy"]
    E = distributed.load_shards(tmp_path / "shards")
    assert E.ids == ids  # ImageSet order, the corrupt file left out
    assert E.skipped and E.skipped[0][0] == TRUNC and [s[0] for s in E.skipped] == [TRUNC]
    assert [s.id for s in images.skipped] == [TRUNC]  # recorded on the ImageSet too
    # closed form: the pixel embedder at native size is the HWC pixels / 255, stored as float16
    expected = (x.reshape(N, -1) / 255.0).astype(np.float32)
    np.testing.assert_array_equal(E.vectors, expected.astype(np.float16).astype(np.float32))
    # the local backend: equal within float16 rounding
    local = embed(ImageSet.from_folder(root), "pixel", cache=False)
    assert local.ids == E.ids and local.embedder == E.embedder == "pixel-16x16"
    np.testing.assert_allclose(E.vectors, local.vectors, rtol=1e-3, atol=1e-3)
    # from_shards: one index with the ids, exact search equal to brute force
    index = EmbeddingIndex.from_shards(paths)
    assert index.ids == ids and index.ntotal == N
    S, I = index.search(expected[[3, 7]], 2)
    brute = np.sqrt(((expected[[3, 7], None, :] - E.vectors[None]) ** 2).sum(-1))
    np.testing.assert_allclose(S, np.sort(brute, axis=1)[:, :2], atol=1e-4)
    assert set(I[0].tolist()) == {3, 25}
    # a second run with the same out_dir keeps the finished shards (no Ray run needed)
    mtimes = [p.stat().st_mtime_ns for p in paths]
    again = distributed.embed_ray(ImageSet.from_folder(root), "pixel", out_dir=tmp_path / "shards", batch_size=8,
                                  shard_size=16)
    assert again == paths and [p.stat().st_mtime_ns for p in paths] == mtimes
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert manifest["embedder"] == "pixel-16x16" and manifest["skipped"][0][0] == TRUNC


def test_find_duplicates_backend_ray_equals_local(local_ray, digits_folder, tmp_path):
    from diffaudit.curate import find_duplicates

    root, x, ids = digits_folder
    images = ImageSet.from_folder(root)
    rep = find_duplicates(images, "pixel", backend="ray", cache_dir=tmp_path / "ray-cache")
    ref = find_duplicates(ImageSet.from_folder(root), "pixel", cache_dir=tmp_path / "local-cache")
    # planted copy (independent truth), and the same pairs as the local backend
    assert ("003.png", "025.png") in {(p.id_a, p.id_b) for p in rep.pairs}
    assert [(p.id_a, p.id_b, round(p.score, 6)) for p in rep.pairs] == \
        [(p.id_a, p.id_b, round(p.score, 6)) for p in ref.pairs]
    assert [s.id for s in rep.skipped] == [TRUNC] and rep.num_images == N
    # vectors: embed(backend="ray") caches float16 vectors exactly as the local backend does
    got = embed(ImageSet.from_folder(root), "pixel", cache_dir=tmp_path / "ray-cache")  # served from the Ray run
    want = embed(ImageSet.from_folder(root), "pixel", cache_dir=tmp_path / "local-cache")
    assert got.ids == want.ids == ids
    np.testing.assert_array_equal(got.vectors, want.vectors)


def test_missing_ray_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)
    images = ImageSet.from_arrays(digits_rgb(4, 8))
    with pytest.raises(ModuleNotFoundError, match=r'pip install "diffaudit\[ray\]"'):
        distributed.embed_ray(images, "pixel", out_dir=tmp_path)
    with pytest.raises(ModuleNotFoundError, match=r'pip install "diffaudit\[ray\]"'):
        embed(images, "pixel", backend="ray", cache=False)


def test_bad_arguments(tmp_path):
    images = ImageSet.from_arrays(digits_rgb(4, 8))
    with pytest.raises(ValueError, match="backend='dask'"):
        embed(images, "pixel", backend="dask")
    with pytest.raises(ValueError, match="batch_size=0"):
        distributed.embed_ray(images, "pixel", out_dir=tmp_path, batch_size=0)
    with pytest.raises(ValueError, match="embedder_kwargs"):  # kwargs only go with a spec string
        distributed._recipe(get_embedder("pixel"), None, {"size": 4})
    with pytest.raises(ValueError, match="unknown keys"):
        embed(images, "pixel", backend="ray", cache=False, backend_options={"adress": "auto"})


def test_recipes_rebuild_the_same_embedder(tmp_path):
    """What actors receive: spec strings are rebuilt, instances pickled, SSCD (TorchScript: not picklable) rebuilt
    from its weights path -- each with the driver's name (same preprocessing, same weights)."""
    import warnings

    import torch

    from diffaudit.embedders.pixel import PixelEmbedder

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, stride=2)

        def forward(self, x):
            return self.conv(x).mean(dim=(2, 3))

    ts = tmp_path / "tiny.torchscript.pt"
    torch.jit.script(Tiny().eval()).save(str(ts))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sscd = get_embedder("sscd", weights=str(ts), size=32)
        kind, spec, kw = distributed._recipe(sscd, sscd, None)
        assert (kind, spec) == ("spec", "sscd") and kw["weights"] == str(ts) and kw["size"] == 32
        assert distributed._build_from_recipe((kind, spec, kw)).name == sscd.name
    pix = PixelEmbedder(size=12)
    kind, blob = distributed._recipe(pix, pix, None)
    assert kind == "pickle" and distributed._build_from_recipe((kind, blob)).name == "pixel-12x12"
    images = ImageSet.from_arrays(digits_rgb(3, 16))
    driver = get_embedder("pixel")
    driver.prepare(images)  # native 16x16, decided on the driver and copied to the actors
    assert distributed._prepared_state(driver) == {"size": (16, 16)}
    assert distributed._recipe("pixel", driver, None) == ("spec", "pixel", {})
