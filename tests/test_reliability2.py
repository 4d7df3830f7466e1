"""Reliability, second round: no silent wrong answer, no lost file, no traceback -- one test per class of defect,
with cases of our own; the CLI cases run the real `diffaudit` command."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import digits_rgb
from diffaudit.data import ImageSet


def _cli(*args, cwd=None, env=None):
    e = {**os.environ, "COLUMNS": "200", **(env or {})}
    return subprocess.run([sys.executable, "-m", "diffaudit", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=e, timeout=300)


# ------------------------------------------------------------------------------ 1. the cache serves content, not names


@pytest.mark.parametrize("fmt", ["bmp", "tiff", "png"])
def test_cache_never_serves_another_folders_vectors(tmp_path, fmt):
    """Two folders with the same file names, sizes and mtimes but different pixels (fixed-size formats make the sizes
    equal): each gets its own vectors from a shared cache, and planted duplicates are found in the second."""
    from diffaudit import embed, find_duplicates

    imgs = digits_rgb(12, 16)
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    for d in (a_dir, b_dir):
        d.mkdir()
    b_imgs = imgs[::-1].copy()
    b_imgs[1] = b_imgs[0]  # a planted duplicate pair in b only
    for i in range(len(imgs)):
        Image.fromarray(imgs[i]).save(a_dir / f"{i:02d}.{fmt}")
        Image.fromarray(b_imgs[i]).save(b_dir / f"{i:02d}.{fmt}")
        for d in (a_dir, b_dir):
            os.utime(d / f"{i:02d}.{fmt}", ns=(10**18, 10**18))  # SOURCE_DATE_EPOCH-like: equal times
    if fmt == "bmp":
        assert [p.stat().st_size for p in sorted(a_dir.iterdir())] == [p.stat().st_size for p in sorted(b_dir.iterdir())]
    cache = tmp_path / "cache"
    ea = embed(ImageSet.from_folder(a_dir), "pixel", cache_dir=cache)
    eb = embed(ImageSet.from_folder(b_dir), "pixel", cache_dir=cache)
    fresh = embed(ImageSet.from_folder(b_dir), "pixel", cache=False)
    np.testing.assert_allclose(eb.vectors, fresh.vectors, atol=2e-3)  # float16 cache rounding only
    assert not np.allclose(ea.vectors, eb.vectors)
    rep = find_duplicates(ImageSet.from_folder(b_dir), cache_dir=cache, invariances=())
    assert {frozenset((p.id_a, p.id_b)) for p in rep.pairs} == {frozenset((f"00.{fmt}", f"01.{fmt}"))}


# ------------------------------------------------------------------------------ 5. arrays changed in place


def test_arrays_changed_in_place_are_embedded_again(tmp_path):
    from diffaudit import embed

    a = digits_rgb(6, 8).copy()
    s = ImageSet.from_arrays(a)
    first = embed(s, "pixel", cache_dir=tmp_path).vectors.copy()
    a[2] = 255 - a[2]  # in place, same shape
    second = embed(s, "pixel", cache_dir=tmp_path).vectors
    assert not np.allclose(first[2], second[2])
    np.testing.assert_allclose(first[[0, 1, 3, 4, 5]], second[[0, 1, 3, 4, 5]])
    np.testing.assert_allclose(second, embed(s, "pixel", cache=False).vectors, atol=2e-3)


# ------------------------------------------------------------------------------ 2. outputs never become inputs


def test_output_folders_are_left_out_of_scans_and_refused_inside_inputs(tmp_path):
    from diffaudit.audit import check_outside_inputs, ensure_writable

    train = tmp_path / "train"
    train.mkdir()
    for i, a in enumerate(digits_rgb(5, 8)):
        Image.fromarray(a).save(train / f"{i}.png")
    out = ensure_writable(train / "audit-out")  # an old output inside the training folder, with samples
    (out / "samples").mkdir()
    Image.fromarray(digits_rgb(1, 8)[0]).save(out / "samples" / "sample_00000.png")
    s = ImageSet.from_folder(train)
    assert len(s) == 5 and any(k.id == "audit-out" and "output" in k.reason for k in s.skipped)
    for bad in (train, train / "audit-out", train / "x" / "y"):
        with pytest.raises(ValueError, match="inside train"):
            check_outside_inputs(bad, train=str(train))
    check_outside_inputs(tmp_path / "elsewhere", train=str(train))  # fine


def test_cli_refuses_out_inside_train_before_any_work(tmp_path):
    train = tmp_path / "train"
    train.mkdir()
    for i, a in enumerate(digits_rgb(4, 8)):
        Image.fromarray(a).save(train / f"{i}.png")
    r = _cli("audit", tmp_path / "no-run", "--train", train, "--out", train / "out")
    assert r.returncode == 2 and "inside train" in r.stderr and "Traceback" not in r.stderr
    assert not (train / "out").exists()  # refused before the output folder was created


# ------------------------------------------------------------------------------ 3. held-out overlapping train


def test_heldout_same_or_inside_train_is_refused_and_shared_images_warned(tmp_path):
    from diffusers import DDPMScheduler

    from diffaudit.audit import audit, check_split
    from diffaudit.testing import GaussianDenoiser

    train, held = tmp_path / "train", tmp_path / "held"
    for d in (train, held):
        d.mkdir()
    imgs = digits_rgb(30, 8)
    for i in range(20):
        Image.fromarray(imgs[i]).save(train / f"{i}.png")
    for i in range(20, 30):
        Image.fromarray(imgs[i]).save(held / f"h{i}.png")
    for j in range(3):  # a leaky split: three held-out images are training images under other names
        Image.fromarray(imgs[j]).save(held / f"leak{j}.png")
    for bad in (train, train / "sub"):
        with pytest.raises(ValueError, match="overlap"):
            check_split(str(train), str(bad))
    sched = DDPMScheduler(num_train_timesteps=1000)
    g = GaussianDenoiser.fit(imgs[:20], sched, diagonal=True)
    r = audit([(1, g)], scheduler=sched, train=str(train), heldout=str(held), num_samples=8, num_inference_steps=2,
              cache_dir=str(tmp_path / "c"))
    assert any("3 of 13 held-out images are byte-identical" in w for w in r.warnings)
    assert "leaky split" in r.verdict
    html = r.to_html(str(tmp_path / "r.html"))
    assert "leaky split" in Path(html).read_text()


# ------------------------------------------------------------------------------ 4. files dropped without a word


@pytest.mark.parametrize("ext, fmt", [(".jfif", "JPEG"), (".jpe", "JPEG"), (".ppm", "PPM"), (".pgm", "PPM"),
                                      (".tga", "TGA")])
def test_other_pil_formats_are_decoded(tmp_path, ext, fmt):
    a = digits_rgb(2, 8)
    im = Image.fromarray(a[0]).convert("L") if ext == ".pgm" else Image.fromarray(a[0])
    im.save(tmp_path / f"x{ext}", format=fmt)
    Image.fromarray(a[1]).save(tmp_path / "y.png")
    (tmp_path / "notes.txt").write_text("not an image")
    s = ImageSet.from_folder(tmp_path)
    assert sorted(s.ids) == sorted([f"x{ext}", "y.png"]) and not s.skipped
    assert s.ignored == ["notes.txt"]  # counted and listed, not dropped silently
    assert s.load(f"x{ext}").shape == (8, 8, 3)


# ------------------------------------------------------------------------------ 6. NaN weights


def test_all_nan_checkpoint_is_a_failed_checkpoint_not_a_clean_one(tmp_path):
    import torch
    from diffusers import DDPMScheduler

    from diffaudit.audit import audit
    from diffaudit.testing import GaussianDenoiser, OptimalDenoiser

    imgs = digits_rgb(20, 8)
    sched = DDPMScheduler(num_train_timesteps=1000)
    bad = GaussianDenoiser.fit(imgs, sched, diagonal=True)
    for b in bad.buffers():
        b.data.fill_(float("nan"))
    r = audit([(1, OptimalDenoiser(imgs, sched)), (2, bad), (3, OptimalDenoiser(imgs, sched))], scheduler=sched,
              train=ImageSet.from_arrays(imgs), num_samples=8, num_inference_steps=2, cache_dir=str(tmp_path))
    c = {c.step: c for c in r.checkpoints}
    assert c[2].failed and c[2].onset_signal is None and not c[1].failed
    assert "FAILED" in r.verdict and "step 2" in r.verdict
    assert r.onset.recommended_step != 2
    assert torch.isnan(next(bad.buffers())).all()


# ------------------------------------------------------------------------------ 7. nonsense accepted quietly


def test_nonsense_arguments_are_refused(tmp_path):
    import yaml

    from diffaudit import find_duplicates
    from diffaudit.audit import AuditConfig
    from diffaudit.watch import watch

    s = ImageSet.from_arrays(digits_rgb(6, 8))
    for bad in (-1.0, -1e-9):
        with pytest.raises(ValueError, match="threshold"):
            find_duplicates(s, threshold=bad, cache_dir=tmp_path)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("num_samples: 8\nseed: 1\nnum_samples: 16\n")
    with pytest.raises(ValueError, match="given twice"):
        AuditConfig.from_yaml(cfg)
    cfg.write_text(yaml.safe_dump({"num_samples": 8, "seed": 3}))
    assert AuditConfig.from_yaml(cfg).seed == 3
    for kw in ({"seed": -1}, {"eta": float("nan")}, {"loss_max_images": 0}):
        with pytest.raises(ValueError, match=next(iter(kw))):
            AuditConfig(**kw)
    for interval in (float("nan"), float("inf"), 0, -1):
        with pytest.raises(ValueError, match="interval"):
            watch(tmp_path, None, interval=interval)


def test_monitor_refuses_a_step_lower_than_the_last(tmp_path):
    from diffusers import DDPMScheduler

    from diffaudit.monitor import MemorizationMonitor
    from diffaudit.testing import GaussianDenoiser

    imgs = digits_rgb(12, 8)
    sched = DDPMScheduler(num_train_timesteps=1000)
    g = GaussianDenoiser.fit(imgs, sched, diagonal=True)
    m = MemorizationMonitor(ImageSet.from_arrays(imgs), every_n_steps=10, num_samples=4, num_inference_steps=2,
                            scheduler=sched, cache_dir=str(tmp_path), loss_max_images=4, time_budget=None)
    m.update(10, g)
    with pytest.raises(ValueError, match="lower than the last evaluated step 10"):
        m.update(-10, g)
    m.update(20, g)
    assert m.evaluated_steps == [10, 20]


# ------------------------------------------------------------------------------ 8. no deleted user file


def test_demo_never_deletes_user_files(tmp_path):
    from diffaudit.training import write_pngs

    mine = tmp_path / "small" / "train"
    mine.mkdir(parents=True)
    (mine / "0001.png").write_bytes(b"my own picture")
    (mine / "holiday.png").write_bytes(b"another one")
    with pytest.raises(ValueError, match="did not write"):
        write_pngs(mine, digits_rgb(2, 8)[..., :1], np.array([1, 2]))
    assert (mine / "0001.png").read_bytes() == b"my own picture" and (mine / "holiday.png").exists()
    fresh = tmp_path / "fresh"
    write_pngs(fresh, digits_rgb(2, 8)[..., :1], np.array([1, 2]))
    write_pngs(fresh, digits_rgb(2, 8)[..., :1], np.array([3, 4]))  # its own earlier output: rewritten
    assert sorted(p.name for p in fresh.glob("*.png")) == ["0003.png", "0004.png"]
    r = _cli("demo", "--out", tmp_path, "--quick", "--steps", "10")
    assert r.returncode == 2 and "did not write" in r.stderr and "Traceback" not in r.stderr
    assert (mine / "0001.png").read_bytes() == b"my own picture"


# ------------------------------------------------------------------------------ 9-11. one readable line


@pytest.mark.parametrize("name", ["run[/x]", "run[final]", "run\x1b]0;pwned\x07", "run\nerror: forged"])
def test_cli_prints_user_text_literally_and_escapes_control_characters(tmp_path, name):
    r = _cli("dedup", tmp_path / name)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    err = r.stderr
    assert "\x1b]" not in err and "\x07" not in err  # no terminal escape reaches the terminal
    if "[" in name:
        assert name in err  # markup-like text printed as is
    if "\n" in name:
        assert "\\n" in err and "\nerror: forged" not in err
    assert sum(line.startswith("error:") for line in err.splitlines()) == 1 and len(err.strip().splitlines()) == 1


def test_cli_turns_any_exception_into_one_line(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import diffaudit.cli as cli

    def boom(*a, **k):
        raise ZeroDivisionError("division by zero in a user config")

    monkeypatch.setattr("diffaudit.curate.find_duplicates", boom)
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(digits_rgb(1, 8)[0]).save(folder / "a.png")
    res = CliRunner().invoke(cli.app, ["dedup", str(folder), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2
    text = res.output + (res.stderr if res.stderr_bytes is not None else "")
    assert "ZeroDivisionError" in text and "--debug" in text and "Traceback" not in text


def test_match_k_is_capped_at_the_reference_size(tmp_path):
    from diffaudit import match

    ref = ImageSet.from_arrays(digits_rgb(5, 8))
    m = match(ImageSet.from_arrays(digits_rgb(2, 8)), ref, k=1_000_000_000, cache_dir=tmp_path)
    assert all(len(r) == 5 for r in m.reference_ids)


# ------------------------------------------------------------------------------ 12. arguments checked before work


def test_arguments_are_checked_before_any_work(tmp_path):
    r = _cli("demo", "--out", tmp_path / "d", "--folds", "1")
    assert r.returncode == 2 and "--folds" in r.stderr and not (tmp_path / "d").exists()
    r = _cli("audit", tmp_path / "nope", "--train", tmp_path, "--seed", "-1", "--out", tmp_path / "o")
    assert r.returncode == 2 and "seed" in r.stderr and "non-negative" in r.stderr


# ------------------------------------------------------------------------------ 13. resume keys


def _fake_pipeline(root: Path, unet_bytes: bytes) -> Path:
    """A folder laid out like a pipeline (model_index.json + component folders), not loadable: for hashing."""
    import json

    root.mkdir(parents=True)
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                       "unet": ["diffusers", "UNet2DConditionModel"],
                                                       "tokenizer": ["transformers", "CLIPTokenizer"],
                                                       "safety_checker": [None, None]}))
    (root / "unet").mkdir()
    (root / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(unet_bytes)
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "vocab.json").write_text("{}")
    return root


def test_base_pipeline_identity_covers_its_components_only(tmp_path):
    from diffaudit.checkpoints import pipeline_files, pipeline_hash

    a = _fake_pipeline(tmp_path / "a", b"weights-A")
    b = _fake_pipeline(tmp_path / "b", b"weights-B")
    assert pipeline_hash(a) != pipeline_hash(b)
    h = pipeline_hash(a)
    # a training run's root: checkpoint folders and accelerate's pickles are not part of the pipeline
    (a / "checkpoint-300").mkdir()
    (a / "checkpoint-300" / "optimizer.bin").write_bytes(b"\x80\x04not a tensor file")
    (a / "random_states_0.pkl").write_bytes(b"\x80\x04pickle")
    assert pipeline_hash(a) == h
    assert all("checkpoint-300" not in str(p) and p.suffix != ".pkl" for p in pipeline_files(a))
    (a / "tokenizer" / "vocab.json").write_text('{"a": 0}')  # a tokenizer change changes the samples too
    assert pipeline_hash(a) != h


def test_sampler_fingerprint_covers_everything_that_determines_a_sample():
    import torch
    from diffusers import DDPMScheduler

    from diffaudit.sampling import CheckpointSampler

    sched = DDPMScheduler(num_train_timesteps=100)

    def fp(**kw):
        base = dict(num_samples=4, seed=0, num_inference_steps=4, prompts=["a cat", "a dog"], seeds_per_prompt=2,
                    guidance_scale=7.5, device="cpu")
        base.update(kw)
        return CheckpointSampler(sched, **base).fingerprint()

    ref = fp()
    changed = {"prompts": ["a cat", "a bird"], "seeds_per_prompt": 1, "guidance_scale": 3.0,
               "image_size": (32, 32), "dtype": torch.float16, "num_inference_steps": 5, "seed": 1}
    for key, value in changed.items():
        assert fp(**{key: value}) != ref, key
    assert fp() == ref


def test_resume_does_not_reuse_samples_of_another_scheduler(tmp_path, caplog):
    import logging

    from diffusers import DDPMScheduler

    from diffaudit.audit import audit
    from diffaudit.testing import OptimalDenoiser

    imgs = digits_rgb(12, 8)
    train = ImageSet.from_arrays(imgs)
    out = tmp_path / "out"

    def run(sched):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="diffaudit"):
            audit([(1, OptimalDenoiser(imgs, sched))], scheduler=sched, train=train, num_samples=4,
                  num_inference_steps=2, cache_dir=str(tmp_path / "c"), out_dir=str(out))
        return "reusing" in caplog.text

    assert not run(DDPMScheduler(num_train_timesteps=1000))
    assert run(DDPMScheduler(num_train_timesteps=1000))  # the same settings: reused
    assert not run(DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2"))


# ------------------------------------------------------------------------------ 14. pixel dedup on hostile sets


def _brute_pairs(V: np.ndarray, side: int, t: float, inv) -> set[tuple[int, int]]:
    X = V.astype(np.float64)
    if "brightness" in inv:
        X = X - X.mean(axis=1, keepdims=True)
    n = len(X)
    M = X.reshape(n, side, side, 3)[:, :, ::-1].reshape(n, -1)
    D = np.sqrt(((X[:, None] - X[None]) ** 2).sum(-1))
    if "hflip" in inv:
        D = np.minimum(D, np.sqrt(((M[:, None] - X[None]) ** 2).sum(-1)))
    # the default rule's structure guard: also within 1/3 of each image's own contrast (distance to its mean)
    raw = V.astype(np.float64)
    contrast = np.sqrt(((raw - raw.mean(axis=1, keepdims=True)) ** 2).sum(1))
    guard = (D <= 0) | (D <= np.minimum(contrast[:, None], contrast[None, :]) / 3 * (1 + 1e-6))
    a, b = np.nonzero(np.triu((D <= t * (1 + 1e-6)) & guard, 1))
    return set(zip(a.tolist(), b.tolist()))


@pytest.mark.parametrize("kind", ["noise", "noise-clusters", "flat", "symmetric"])
@pytest.mark.parametrize("inv", [(), ("brightness", "hflip")])
def test_pixel_duplicates_equal_brute_force_on_hostile_sets(tmp_path, kind, inv):
    """Sets pooled vectors cannot separate (noise), duplicate clusters larger than k, flat images, mirror-symmetric
    images: the search (which switches to exact all-pairs products where pooling does not help) equals brute force."""
    from diffaudit.curate import duplicate_pairs
    from diffaudit.embedders import embed, get_embedder

    rng = np.random.default_rng(7)
    side, n = 16, 240
    if kind == "noise":
        x = rng.integers(0, 256, (n, side, side, 3), dtype=np.uint8)
    elif kind == "noise-clusters":  # 20 images x 12 copies (clusters larger than k=10), plus re-encoding noise
        base = rng.integers(0, 256, (20, side, side, 3), dtype=np.uint8)
        x = np.repeat(base, 12, axis=0).astype(np.int16)
        x[::3] += rng.integers(-2, 3, x[::3].shape).astype(np.int16)
        x = np.clip(x, 0, 255).astype(np.uint8)[rng.permutation(n)]
    elif kind == "flat":
        x = np.broadcast_to(rng.integers(0, 256, n).astype(np.uint8)[:, None, None, None], (n, side, side, 3)).copy()
    else:
        half = rng.integers(0, 256, (n, side, side // 2, 3), dtype=np.uint8)
        x = np.concatenate([half, half[:, :, ::-1]], axis=2)
        x[n // 2:] = x[: n // 2]
    emb = get_embedder(f"pixel:{side}")
    E = embed(ImageSet.from_arrays(x), emb, cache_dir=None)
    pairs, t, rule = duplicate_pairs(E, emb, invariances=inv)
    truth = _brute_pairs(np.asarray(E.vectors), side, t, inv)
    if kind == "flat" and "brightness" in inv:  # all flat images are one group of identical centred vectors
        assert "listed as stars" in rule and len(pairs) == n - 1 and len(truth) == n * (n - 1) // 2
        assert {a for a, _ in pairs} == {0} and {b for _, b in pairs} == set(range(1, n))
    else:
        boundary = {p for p in truth ^ set(pairs)}  # only ties at the threshold may differ (float32 vs float64)
        assert len(boundary) <= max(2, len(truth) // 200), (kind, inv, len(truth), len(pairs))
    if kind == "noise-clusters":
        assert len(truth) >= 20 * 66


def test_pixel_threshold_rule_equals_brute_force_on_noise(tmp_path):
    """The default threshold's nearest-distinct distances, certified by the exact fallback on noise."""
    from diffaudit.curate import DUPLICATE_PSNR_DB, RELATIVE_RATIO, duplicate_pairs
    from diffaudit.embedders import embed, get_embedder

    rng = np.random.default_rng(3)
    x = np.repeat(rng.integers(0, 256, (60, 16, 16, 3), dtype=np.uint8), 4, axis=0)
    emb = get_embedder("pixel:16")
    E = embed(ImageSet.from_arrays(x), emb, cache_dir=None)
    _, t, _ = duplicate_pairs(E, emb, invariances=())
    X = np.asarray(E.vectors, np.float64)
    D = np.sqrt(((X[:, None] - X[None]) ** 2).sum(-1))
    t_abs = 10 ** (-DUPLICATE_PSNR_DB / 20) * np.sqrt(X.shape[1])
    D[D <= t_abs] = np.inf
    expect = min(t_abs, RELATIVE_RATIO * float(np.median(D.min(axis=1))))
    assert t == pytest.approx(expect, rel=1e-4)


# ------------------------------------------------------------------------------ 11. validated at the boundary


def _unet_run(root: Path, config: dict, index: dict | None = None) -> Path:
    import json

    import torch
    from safetensors.torch import save_file

    unet = root / "checkpoint-100" / "unet"
    unet.mkdir(parents=True)
    (unet / "config.json").write_text(json.dumps(config))
    if index is None:
        save_file({"w": torch.zeros(1)}, str(unet / "diffusion_pytorch_model.safetensors"))
    else:
        (unet / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    return root


@pytest.mark.parametrize("case", ["norm_groups_0", "weight_map_list", "weight_map_values", "vae_class"])
def test_bad_model_folders_give_one_line_naming_the_file(tmp_path, case):
    train = tmp_path / "train"
    train.mkdir()
    for i, im in enumerate(digits_rgb(6, 8)):
        Image.fromarray(im).save(train / f"{i}.png")
    base = {"_class_name": "UNet2DModel", "sample_size": 8, "block_out_channels": [8, 8],
            "down_block_types": ["DownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "UpBlock2D"],
            "layers_per_block": 1}
    cfg, index = dict(base), None
    if case == "norm_groups_0":
        cfg["norm_num_groups"] = 0
    elif case == "weight_map_list":
        index = {"weight_map": ["a.safetensors"]}
    elif case == "weight_map_values":
        index = {"weight_map": {"w": 3}}
    else:
        cfg = {"_class_name": "AutoencoderKL"}
    run = _unet_run(tmp_path / "run", cfg, index)
    r = _cli("audit", run, "--train", train, "--samples", "2", "--inference-steps", "1", "--scheduler", "ddpm",
             "--out", tmp_path / "o")
    err = [ln for ln in r.stderr.splitlines() if ln.strip() and "━" not in ln]
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-800:]
    assert len([ln for ln in err if ln.startswith("error:")]) == 1
    text = " ".join(err)
    assert {"norm_groups_0": "does not build a UNet2DModel", "weight_map_list": "'weight_map' object",
            "weight_map_values": "'weight_map' object", "vae_class": "'AutoencoderKL' is not a denoiser"}[case] in text
    assert "an unexpected error" not in text  # caught at the boundary, not by the last-resort handler
    assert "text-conditional" not in text


@pytest.mark.parametrize("bad", [None, "x", [1], {"pixel": None}, {"pixel": {"top_matches": "nope"}}])
def test_report_on_a_hand_edited_audit_json_names_the_field(tmp_path, bad):
    import json

    from diffusers import DDPMScheduler

    from diffaudit.audit import audit
    from diffaudit.testing import OptimalDenoiser

    imgs = digits_rgb(8, 8)
    sched = DDPMScheduler(num_train_timesteps=1000)
    out = tmp_path / "out"
    audit([(1, OptimalDenoiser(imgs, sched))], scheduler=sched, train=ImageSet.from_arrays(imgs), num_samples=2,
          num_inference_steps=1, cache_dir=str(tmp_path / "c"), out_dir=str(out))
    d = json.loads((out / "audit.json").read_text())
    d["checkpoints"][0]["metrics"] = bad
    (tmp_path / "bad.json").write_text(json.dumps(d))
    r = _cli("report", tmp_path / "bad.json", "--out", tmp_path / "r.html")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "an unexpected error" not in r.stderr
    assert "checkpoints[0].metrics" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r.html").exists()


def test_text_to_image_run_without_the_sd_extra_fails_before_any_work(tmp_path, monkeypatch):
    import importlib.util
    import json

    import torch
    from safetensors.torch import save_file

    import diffaudit.embedders as embedders
    from diffaudit.audit import audit

    base = tmp_path / "base"
    (base / "scheduler").mkdir(parents=True)
    (base / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                       "text_encoder": ["transformers", "CLIPTextModel"],
                                                       "scheduler": ["diffusers", "DDPMScheduler"]}))
    (base / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "DDPMScheduler"}))
    lora = tmp_path / "run" / "checkpoint-5"
    lora.mkdir(parents=True)
    save_file({"w": torch.zeros(1)}, str(lora / "pytorch_lora_weights.safetensors"))
    (tmp_path / "p.txt").write_text("a photo\n")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("peft", "transformers")
                        else real(name, *a))
    calls = []
    monkeypatch.setattr(embedders, "embed", lambda *a, **k: calls.append(1))
    with pytest.raises(ModuleNotFoundError, match=r"diffaudit\[sd\]"):
        audit(str(tmp_path / "run"), train=ImageSet.from_arrays(digits_rgb(4, 8)), base_pipeline=str(base),
              prompts=str(tmp_path / "p.txt"), num_samples=2, cache_dir=str(tmp_path / "c"))
    assert not calls
