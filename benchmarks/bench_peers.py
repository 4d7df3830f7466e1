"""diffaudit vs the duplicate finders users already know, one run, same data.

    bash benchmarks/setup_peers.sh                       # once: /work/peers-venv with imagededup + cleanvision + diffaudit
    /work/peers-venv/bin/python benchmarks/bench_peers.py [--per-kind 200] [--out benchmarks/results] [--tools ...]

Data (written to ``--data``, default /tmp/diffaudit-peers): the 1,797 real images of scikit-learn's digits, upscaled
to 64x64 (bilinear), as PNG files, plus planted near-duplicates of six kinds, ``--per-kind`` of each, each made from a
different original: ``exact`` (byte copy), ``resized`` (64 -> 48 -> 64, bilinear), ``jpeg30`` (JPEG quality 30),
``crop5`` (a 5% crop of the side at a random offset, resized back to 64), ``bright10`` (+10 on every pixel) and
``hflip`` (horizontal flip). File names are shuffled so that no tool can use them.

Ground truth: a planted copy and its source form a duplicate pair. Originals with equal pixels would also be
duplicates of each other (none in the digits, checked). Every other pair a tool reports is a false positive --
including pairs of distinct digits that merely look alike, which is what a curator would have to check by hand.

Per tool, in a fresh subprocess: the duplicate search itself (time inside the process, imports excluded -- for
diffaudit also faiss and scipy.sparse.csgraph, which its search imports on first use), the whole
process (wall, imports included), peak resident memory (``wait4`` ``ru_maxrss``: the process and the workers it
waited for), the reported pairs. A planted pair is *found* when both images end up in one group (connected component of
the reported pairs; a cleanvision set). Precision = reported pairs that are true duplicate pairs / reported pairs.

Tools (default settings unless a name says otherwise):
* ``diffaudit-pixel``: ``find_duplicates(ImageSet.from_folder(dir))`` -- diffaudit's default (pixel embedder,
  brightness- and mirror-invariant, exact coarse-to-fine search; PSNR >= 30 dB threshold capped by 1/3 of the
  typical distance to the nearest distinct image), cold embedding cache.
* ``diffaudit-pixel-raw``: the same with ``invariances=()`` (raw pixel distances).
* ``diffaudit-tiled``: ``embedder="tiled"`` (Carlini et al.'s max-over-tiles L2).
* ``imagededup-{phash,dhash,whash,ahash}``: ``<Hash>().find_duplicates(image_dir=dir)`` (max_distance_threshold=10).
  ``imagededup-phash@N``: the same with ``max_distance_threshold=N`` (stricter: imagededup's precision at lower
  recall). imagededup's CNN method needs pretrained weights downloaded at run time (no network here): not run.
* ``cleanvision``: ``Imagelab(data_path=dir).find_issues({"exact_duplicates": {}, "near_duplicates": {}})``, the union
  of both sets (phash of size 8, equal hashes).
* ``immaculate-{pdq,phash,sscd,sscd_distilled}``: ``immaculate.find_duplicates(dir, method)`` (Rust core; every pair
  inside its exact and near sets). Immaculate needs Python >= 3.12, so these run under ``$IMMACULATE_PYTHON``
  (e.g. ``PYENV_VERSION=3.12.1 python3 -m venv /tmp/v312 && /tmp/v312/bin/pip install "immaculate[sscd]" numpy``).

Writes ``peers.json`` and ``peers.md`` to ``--out`` and prints the table.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("exact", "resized", "jpeg30", "crop5", "bright10", "hflip")
SIDE = 64
DEFAULT_TOOLS = ("diffaudit-pixel", "diffaudit-pixel-raw", "diffaudit-tiled", "imagededup-phash", "imagededup-dhash",
                 "imagededup-whash", "imagededup-ahash", "cleanvision", "imagededup-phash@4", "imagededup-phash@2",
                 "imagededup-phash@0", "immaculate-pdq", "immaculate-phash", "immaculate-sscd",
                 "immaculate-sscd_distilled")


# ------------------------------------------------------------------------------------------------------------ data
def make_data(root: Path, per_kind: int, seed: int = 0) -> dict:
    """Write the image folder and ground truth; returns the truth dict (also in root/truth.json)."""
    import io

    from PIL import Image
    from sklearn.datasets import load_digits

    truth_p = root / "truth.json"
    want = {"per_kind": per_kind, "seed": seed, "side": SIDE, "version": 1}
    if truth_p.exists():
        t = json.loads(truth_p.read_text())
        if t.get("params") == want:
            return t
    root.mkdir(parents=True, exist_ok=True)
    for p in root.glob("*"):
        if p.is_file():
            p.unlink()
    rng = np.random.default_rng(seed)
    digits = (load_digits().images / 16.0 * 255.0).round().astype(np.uint8)  # (1797, 8, 8)
    n0 = len(digits)
    originals = [np.asarray(Image.fromarray(d).resize((SIDE, SIDE), Image.BILINEAR)) for d in digits]
    if per_kind * len(KINDS) > n0:
        raise SystemExit(f"--per-kind {per_kind} x {len(KINDS)} kinds needs more than {n0} originals")
    sources = rng.permutation(n0)[: per_kind * len(KINDS)].reshape(len(KINDS), per_kind)

    items: list[tuple[str, bytes, str, int]] = []  # (extension, file bytes, kind, source original)

    def png(a: np.ndarray) -> bytes:
        b = io.BytesIO()
        Image.fromarray(a).save(b, "PNG")
        return b.getvalue()

    orig_png = [png(a) for a in originals]
    for i in range(n0):
        items.append(("png", orig_png[i], "original", i))
    for kind, srcs in zip(KINDS, sources):
        for s in srcs.tolist():
            a = originals[s]
            im = Image.fromarray(a)
            if kind == "exact":
                items.append(("png", orig_png[s], kind, s))
            elif kind == "resized":
                items.append(("png", png(np.asarray(im.resize((48, 48), Image.BILINEAR)
                                                     .resize((SIDE, SIDE), Image.BILINEAR))), kind, s))
            elif kind == "jpeg30":
                b = io.BytesIO()
                im.save(b, "JPEG", quality=30)
                items.append(("jpg", b.getvalue(), kind, s))
            elif kind == "crop5":
                c = int(round(SIDE * 0.95))
                x0, y0 = rng.integers(0, SIDE - c + 1, size=2)
                items.append(("png", png(np.asarray(im.crop((int(x0), int(y0), int(x0) + c, int(y0) + c))
                                                     .resize((SIDE, SIDE), Image.BILINEAR))), kind, s))
            elif kind == "bright10":
                items.append(("png", png(np.clip(a.astype(np.int16) + 10, 0, 255).astype(np.uint8)), kind, s))
            elif kind == "hflip":
                items.append(("png", png(a[:, ::-1].copy()), kind, s))
    order = rng.permutation(len(items))
    names: list[str] = [""] * len(items)
    for new, old in enumerate(order.tolist()):
        ext = items[old][0]
        names[old] = f"{new:05d}.{ext}"
        (root / names[old]).write_bytes(items[old][1])
    orig_name = {items[i][3]: names[i] for i in range(n0)}
    planted = [{"a": orig_name[items[i][3]], "b": names[i], "kind": items[i][2]} for i in range(n0, len(items))]
    # originals with identical pixels are duplicates too (none in the digits; checked, not assumed)
    flat = np.stack([a.reshape(-1) for a in originals])
    _, inv = np.unique(flat, axis=0, return_inverse=True)
    family = {names[i]: f"o{int(inv.reshape(-1)[i])}" for i in range(n0)}
    for p in planted:
        family[p["b"]] = family[p["a"]]
    truth = {"params": want, "num_images": len(items), "num_originals": n0, "planted": planted, "family": family,
             "equal_originals": int(n0 - len(set(inv.reshape(-1).tolist())))}
    truth_p.write_text(json.dumps(truth))
    return truth


# ------------------------------------------------------------------------------------------------------------ tools
def _pairs_from_groups(groups) -> list[list[str]]:
    out = []
    for g in groups:
        g = sorted(g)
        out += [[g[i], g[j]] for i in range(len(g)) for j in range(i + 1, len(g))]
    return out


def run_tool(tool: str, data: Path, work: Path) -> dict:
    """Run one tool on the folder (inside the child process); returns {"pairs", "search_s", "note"}."""
    files = sorted(p.name for p in data.iterdir() if p.suffix in (".png", ".jpg"))
    note = ""
    if tool.startswith("diffaudit"):
        import faiss  # noqa: F401  imported lazily by the search: imports are excluded for every tool
        import scipy.sparse.csgraph  # noqa: F401

        from diffaudit.curate import find_duplicates
        from diffaudit.data import ImageSet

        cache = work / f"cache-{tool}-{os.getpid()}"
        t0 = time.perf_counter()
        images = ImageSet.from_folder(data)
        emb, kw = {"diffaudit-pixel": ("pixel", {}), "diffaudit-pixel-raw": ("pixel", {"invariances": ()}),
                   "diffaudit-tiled": ("tiled", {})}[tool]
        rep = find_duplicates(images, emb, cache_dir=cache, **kw)
        pairs = [[p.id_a, p.id_b] for p in rep.pairs]
        note = rep.threshold_rule
        dt = time.perf_counter() - t0
        import shutil

        shutil.rmtree(cache, ignore_errors=True)  # a cold cache for every run
    elif tool.startswith("imagededup-"):
        from imagededup import methods

        method, _, dist = tool.split("-", 1)[1].partition("@")
        cls = {"phash": methods.PHash, "dhash": methods.DHash, "whash": methods.WHash, "ahash": methods.AHash}[method]
        kw = {"max_distance_threshold": int(dist)} if dist else {}
        t0 = time.perf_counter()
        dups = cls(verbose=False).find_duplicates(image_dir=str(data), **kw)
        dt = time.perf_counter() - t0
        pairs = sorted({tuple(sorted((a, b))) for a, bs in dups.items() for b in bs})
        pairs = [list(p) for p in pairs]
        note = f"max_distance_threshold={dist}" if dist else "max_distance_threshold=10 (default)"
    elif tool.startswith("immaculate-"):
        import immaculate
        from itertools import combinations

        method = tool.split("-", 1)[1]
        t0 = time.perf_counter()
        d = immaculate.find_duplicates(data, method)
        dt = time.perf_counter() - t0
        groups = [[p.name for p in g] for g in list(d.exact) + list(d.near)]
        pairs = sorted({tuple(sorted((a, b))) for g in groups for a, b in combinations(g, 2)})
        pairs = [list(p) for p in pairs]
        note = f"immaculate {immaculate.__version__} {method}, default thresholds (exact + near sets)"
    elif tool == "cleanvision":
        from cleanvision import Imagelab

        t0 = time.perf_counter()
        lab = Imagelab(data_path=str(data), verbose=False)
        lab.find_issues({"exact_duplicates": {}, "near_duplicates": {}}, verbose=False)
        dt = time.perf_counter() - t0
        groups = []
        for it in ("exact_duplicates", "near_duplicates"):
            groups += [[Path(p).name for p in s] for s in lab.info[it]["sets"]]
        pairs = _pairs_from_groups(groups)
        note = "exact (md5) + near (phash, hash_size 8) duplicate sets"
    else:
        raise SystemExit(f"unknown tool {tool!r}")
    return {"pairs": pairs, "search_s": dt, "note": note, "num_files": len(files)}


# ------------------------------------------------------------------------------------------------------------ scoring
def evaluate(truth: dict, pairs: list[list[str]]) -> dict:
    fam = truth["family"]
    parent: dict[str, str] = {}

    def find(a):
        parent.setdefault(a, a)
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for a, b in pairs:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[ra] = rb
    tp = sum(1 for a, b in pairs if fam.get(a) is not None and fam.get(a) == fam.get(b))
    res = {"reported_pairs": len(pairs), "true_pairs": tp, "false_pairs": len(pairs) - tp,
           "precision": tp / len(pairs) if pairs else float("nan")}
    found_all = 0
    for kind in KINDS:
        pk = [p for p in truth["planted"] if p["kind"] == kind]
        f = sum(1 for p in pk if find(p["a"]) == find(p["b"]))
        res[f"recall_{kind}"] = f / len(pk) if pk else float("nan")
        found_all += f
    res["recall_all"] = found_all / len(truth["planted"])
    return res


def _child(tool: str, data: Path, work: Path, out: Path) -> int:
    try:
        r = run_tool(tool, data, work)
    except ModuleNotFoundError as e:
        r = {"error": f"not installed ({e})"}
    out.write_text(json.dumps(r))
    return 0


def run_in_subprocess(tool: str, data: Path, work: Path) -> dict:
    out = work / f"{tool}.json"
    if out.exists():
        out.unlink()
    t0 = time.perf_counter()
    py = sys.executable
    if tool.startswith("immaculate-"):  # Immaculate needs Python >= 3.12: its own interpreter
        py = os.environ.get("IMMACULATE_PYTHON", "")
        if not py or not Path(py).exists():
            return {"tool": tool, "error": "not installed (set IMMACULATE_PYTHON to a Python >= 3.12 with "
                                           "`pip install \"immaculate[sscd]\"`)"}
    proc = subprocess.Popen([py, __file__, "--child", tool, "--data", str(data), "--work", str(work)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    log = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0 or not out.exists():
        return {"tool": tool, "error": f"exit code {proc.returncode}: {log[-800:]}"}
    r = json.loads(out.read_text())
    r.update({"tool": tool, "process_s": wall, "cpu_s": ru.ru_utime + ru.ru_stime, "peak_rss_mb": ru.ru_maxrss / 1024.0})
    return r


def table(rows: list[dict]) -> str:
    head = ("| tool | search (s) | process (s) | process CPU (s) | peak RSS (MB) | pairs | precision | " +
            " | ".join(f"recall {k}" for k in KINDS) + " | recall all |")
    lines = [head, "|" + "---|" * (8 + len(KINDS))]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['tool']} | {r['error'][:120]} |" + " |" * (6 + len(KINDS)))
            continue
        lines.append(
            f"| {r['tool']} | {r['search_s']:.2f} | {r['process_s']:.1f} | {r['cpu_s']:.1f} | {r['peak_rss_mb']:,.0f} | "
            f"{r['reported_pairs']} | {r['precision']:.3f} | " +
            " | ".join(f"{r[f'recall_{k}']:.3f}" for k in KINDS) + f" | {r['recall_all']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-kind", type=int, default=200)
    ap.add_argument("--data", type=Path, default=Path("/tmp/diffaudit-peers/images"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/diffaudit-peers/work"))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--tools", default=",".join(DEFAULT_TOOLS))
    ap.add_argument("--repeats", type=int, default=1, help="runs per tool; the fastest is reported")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.child:
        return _child(args.child, args.data, args.work, args.work / f"{args.child}.json")

    truth = make_data(args.data, args.per_kind)
    print(f"{truth['num_images']} images ({truth['num_originals']} digits originals, {len(truth['planted'])} planted "
          f"near-duplicates, {args.per_kind} per kind; {truth['equal_originals']} pixel-equal originals) in "
          f"{args.data}", flush=True)
    rows = []
    for tool in args.tools.split(","):
        best = None
        for _ in range(max(1, args.repeats)):
            r = run_in_subprocess(tool, args.data, args.work)
            if "error" in r:
                best = r
                break
            if best is None or r["search_s"] < best["search_s"]:
                if best is not None:
                    r["peak_rss_mb"] = max(r["peak_rss_mb"], best["peak_rss_mb"])
                    r["cpu_s"] = min(r["cpu_s"], best["cpu_s"])
                best = r
            elif best is not None:
                best["peak_rss_mb"] = max(r["peak_rss_mb"], best["peak_rss_mb"])
                best["cpu_s"] = min(r["cpu_s"], best["cpu_s"])
        if "error" not in best:
            best.update(evaluate(truth, best["pairs"]))
            print(f"{tool}: {best['search_s']:.2f} s, {best['reported_pairs']} pairs, precision "
                  f"{best['precision']:.3f}, recall {best['recall_all']:.3f}  ({best['note']})", flush=True)
        else:
            print(f"{tool}: {best['error'][:300]}", flush=True)
        rows.append(best)
    summary = ratios(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "peers.json").write_text(json.dumps(
        [{k: v for k, v in r.items() if k != "pairs"} for r in rows], indent=2))
    md = table(rows)
    cmd = "/work/peers-venv/bin/python benchmarks/bench_peers.py " + " ".join(argv if argv is not None else sys.argv[1:])
    (args.out / "peers.md").write_text(
        f"# Duplicate finders on {truth['num_images']} images (scikit-learn digits at 64 px + {len(truth['planted'])}"
        f" planted near-duplicates)\n\nCommand: `{cmd.strip()}`\n\n{md}\n\n{summary}\n\nNotes:\n" +
        "\n".join(f"- {r['tool']}: {r.get('note') or r.get('error', '')}" for r in rows) + "\n")
    print()
    print(md)
    print()
    print(summary)
    return 0


def ratios(rows: list[dict], ours: str = "diffaudit-pixel") -> str:
    """Each peer against diffaudit's default, measured in this run: time ratios (peer / diffaudit; > 1 = diffaudit
    faster) and recall at the peer's precision."""
    me = next((r for r in rows if r.get("tool") == ours and "error" not in r), None)
    if me is None:
        return f"({ours} did not run: no ratios)"
    lines = [f"Ratios against {ours} (precision {me['precision']:.3f}, recall {me['recall_all']:.3f}), same run:",
             "", "| peer | precision | recall | search time ratio | process time ratio | peak memory ratio |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if r is me or "error" in r or r["tool"].startswith("diffaudit"):
            continue
        lines.append(f"| {r['tool']} | {r['precision']:.3f} | {r['recall_all']:.3f} | "
                     f"{r['search_s'] / me['search_s']:.2f}x | {r['process_s'] / me['process_s']:.2f}x | "
                     f"{r['peak_rss_mb'] / me['peak_rss_mb']:.2f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
