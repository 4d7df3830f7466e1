"""Leave-one-out (counterfactual) memorization from runs trained on known folds of the training set.

van den Burg & Williams 2021 ("On Memorization in Probabilistic Deep Generative Models") score an observation by how
much more likely it is under models trained *with* it than under models trained *without* it; Zhang et al. 2021
("Counterfactual Memorization in Neural Language Models") define counterfactual memorization the same way, as the
difference in expected performance between models whose training subset contained the example and models whose
subset did not, estimated from a few models trained on random subsets. Here the performance is the denoising loss
at fixed timesteps and fixed noise (:func:`diffaudit.metrics.denoising_losses`; the noise of an image depends only on
``(seed, its id)``, so every run sees exactly the same noisy inputs for it):

    loo_score(x) = mean loss of x under the runs that did NOT see it - mean loss under the runs that DID see it

(> 0: seeing x lowers its loss). Images seen by every run or by none cannot be scored; they are counted and reported
(``label="unscored"``), not dropped silently.

**Memorization or leverage?** (the debate around van den Burg & Williams 2021): a LOO-style score is high both for an image the
model copies and for a high-leverage image - an isolated outlier whose loss is large when unseen, so that any fitting
of it moves the difference a lot. To let users tell them apart each image also gets

* an **outlier score**: mean pixel-space L2 distance to its ``outlier_k`` nearest other training images
  (:func:`diffaudit.metrics.outlier_scores`), labelled ``outlier`` above the ``outlier_quantile`` (0.95) of the
  training set, exactly as in the audit's risk table;
* a **scale-free memorization flag**: by default an image is *memorized* when seeing it divides its loss by at least
  ``min_ratio`` (2): ``loss_out / loss_in >= 2``. Normalising by ``loss_out`` (how hard the image is for a model that
  never saw it) keeps an outlier whose huge unseen loss moves by run-to-run noise from being flagged, and it still
  flags every image when a model memorizes its whole training set (where a threshold relative to the score
  distribution, such as median + 3 MAD, flags almost nothing: we measured both on closed-form models, see
  ``tests/test_loo.py``). ``threshold="mad"`` (``loo_score > median + 3 * 1.4826 * MAD``) or a number (an absolute
  ``loo_score`` threshold) choose another rule; the rule used is recorded in the result.

The combined ``label`` is one of ``"memorized inlier"`` (copied although typical - the case copy detection worries
about), ``"memorized outlier"`` (possibly leverage), ``"hard outlier"`` (isolated, not memorized), ``"typical"`` and
``"unscored"``.

**Fold manifest** (JSON; one schema, checked strictly)::

    {"version": 1,
     "runs": {"runs/fold-0": ["0001.png", "0007.png", ...],
              "runs/fold-1": ["0002.png", ...]},
     "meta": {...}}                      # optional, free-form (how the folds were drawn)

``runs`` maps each run to the training-image ids it was trained on (the ids of the training ImageSet: for a folder,
POSIX paths relative to it). A run key is a run folder (relative paths are relative to the manifest's folder) or, when
the runs are passed explicitly, a name that matches the run's path, its folder name, or the key given in ``runs=``.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from ._serial import atomic_write_text
from ._util import check_int, default_device
from .data import as_imageset
from .membership import DEFAULT_TIMESTEPS, check_loss_args, resolve_models, skipped_of, stack_for_model
from .reference import image_losses
from .results import LOO_LABELS, LooImage, LooResult, LooRun

log = logging.getLogger(__name__)

__all__ = [
    "FoldManifest",
    "FoldRuns",
    "LooImage",
    "LooResult",
    "LooRun",
    "LABELS",
    "loo_scores",
    "read_manifest",
    "write_manifest",
    "write_loo_outputs",
    "train_fold_runs",
    "fold_demo",
]

MANIFEST_VERSION = 1
MANIFEST_KEYS = ("version", "runs", "meta")
LABELS = LOO_LABELS
_SCHEMA_HINT = ('expected {"version": 1, "runs": {"<run folder or name>": ["<image id>", ...], ...}, '
                '"meta": {...optional...}}')
_RATIO_CAP = 1e12


# ---------------------------------------------------------------------------------------------------- manifest


@dataclass
class FoldManifest:
    """Which training-image ids each run was trained on (see the module docstring for the JSON schema)."""

    runs: dict[str, list[str]]
    base_dir: Optional[Path] = None  # relative run paths are relative to this folder (the manifest's)
    source: str = "manifest"
    meta: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Any, *, base_dir: Optional[os.PathLike] = None, where: str = "manifest") -> "FoldManifest":
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected a JSON object; got {type(data).__name__}. {_SCHEMA_HINT}")
        unknown = sorted(set(data) - set(MANIFEST_KEYS))
        if unknown:
            raise ValueError(f"{where}: unknown keys {unknown}; allowed keys: {list(MANIFEST_KEYS)}. {_SCHEMA_HINT}")
        if "version" in data and data["version"] != MANIFEST_VERSION:
            raise ValueError(f"{where}: version={data['version']!r} is not supported; allowed: {MANIFEST_VERSION}")
        runs = data.get("runs")
        if not isinstance(runs, dict) or not runs:
            raise ValueError(f"{where}: 'runs' must be a non-empty object mapping run -> list of image ids; got "
                             f"{type(runs).__name__ if runs is not None else 'nothing'}. {_SCHEMA_HINT}")
        if len(runs) < 2:
            raise ValueError(f"{where}: 'runs' lists {len(runs)} run; leave-one-out needs at least 2 (an image must "
                             "be seen by some runs and unseen by others)")
        out: dict[str, list[str]] = {}
        for key, ids in runs.items():
            if not isinstance(key, str) or not key.strip():
                raise ValueError(f"{where}: run names must be non-empty strings; got {key!r}")
            if not isinstance(ids, list) or not ids:
                raise ValueError(f"{where}: runs[{key!r}] must be a non-empty list of image ids; got "
                                 f"{type(ids).__name__ if not isinstance(ids, list) else 'an empty list'}")
            bad = [v for v in ids if not isinstance(v, str) or not v]
            if bad:
                raise ValueError(f"{where}: runs[{key!r}] holds {len(bad)} entries that are not non-empty strings "
                                 f"(first: {bad[0]!r}); image ids are strings such as '0001.png'")
            seen: set[str] = set()
            dups = [v for v in ids if v in seen or seen.add(v)]  # type: ignore[func-returns-value]
            if dups:
                raise ValueError(f"{where}: runs[{key!r}] lists {len(dups)} ids more than once (first: {dups[0]!r}); "
                                 "list each image once per run")
            out[key] = list(ids)
        meta = data.get("meta", {})
        if not isinstance(meta, dict):
            raise ValueError(f"{where}: 'meta' must be an object; got {type(meta).__name__}")
        return cls(runs=out, base_dir=Path(base_dir) if base_dir is not None else None, source=where, meta=dict(meta))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FoldManifest":
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"manifest={str(path)!r}: no such file")
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"manifest={str(path)!r}: not valid JSON ({e})") from None
        return cls.from_dict(data, base_dir=p.resolve().parent, where=f"manifest {str(path)!r}")

    def run_path(self, key: str) -> Path:
        p = Path(key)
        if not p.is_absolute() and self.base_dir is not None:
            p = self.base_dir / p
        return p

    def to_dict(self) -> dict:
        return {"version": MANIFEST_VERSION, "runs": {k: list(v) for k, v in self.runs.items()}, "meta": self.meta}


def read_manifest(manifest: Union[str, os.PathLike, Mapping, FoldManifest]) -> FoldManifest:
    """A :class:`FoldManifest` from a JSON file, a dict (relative run paths: relative to the current folder) or a
    FoldManifest."""
    if isinstance(manifest, FoldManifest):
        return manifest
    if isinstance(manifest, Mapping):
        return FoldManifest.from_dict(dict(manifest))
    if isinstance(manifest, (str, os.PathLike)):
        return FoldManifest.load(manifest)
    raise TypeError(f"manifest: expected a JSON file path, a dict or a FoldManifest; got {type(manifest).__name__}")


def write_manifest(path: str | os.PathLike, runs: Mapping[str, Sequence[str]], meta: Optional[dict] = None) -> Path:
    """Write a fold manifest (validated first). Run keys should be paths relative to ``path``'s folder."""
    m = FoldManifest.from_dict({"version": MANIFEST_VERSION, "runs": {k: list(v) for k, v in runs.items()},
                                "meta": dict(meta or {})}, where=f"manifest {str(path)!r}")
    atomic_write_text(path, json.dumps(m.to_dict(), indent=2) + "\n")
    return Path(path)


def _same_path(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:  # pragma: no cover
        return False


def _match_runs(runs: Any, manifest: FoldManifest) -> list[tuple[str, Any]]:
    """Pair every manifest run with the run object/path the user gave: ``[(manifest key, run), ...]``."""
    keys = list(manifest.runs)
    if runs is None:
        pairs = []
        for k in keys:
            p = manifest.run_path(k)
            if not p.exists():
                raise FileNotFoundError(f"{manifest.source}: run {k!r} -> {str(p)!r}: no such folder; pass the runs "
                                        "explicitly (runs= / --runs) or fix the path")
            pairs.append((k, str(p)))
        return pairs
    if isinstance(runs, Mapping):
        given = [(str(k), v) for k, v in runs.items()]
    elif isinstance(runs, (str, os.PathLike)):
        given = [(str(runs), runs)]
    else:
        from .checkpoints import CheckpointRun

        given = [(str(r.root) if isinstance(r, CheckpointRun) else str(r), r) for r in runs]
        bad = [r for r in runs if not isinstance(r, (str, os.PathLike, CheckpointRun))]
        if bad:
            raise TypeError(f"runs: a list must hold run folders or CheckpointRuns; got {type(bad[0]).__name__} "
                            "(pass models as a dict {manifest key: model})")
    matched: dict[str, Any] = {}
    for label, obj in given:
        cands = [k for k in keys if k == label]
        if not cands and not isinstance(runs, Mapping):
            lp = Path(label)
            cands = [k for k in keys if _same_path(manifest.run_path(k), lp)]
            if not cands:
                cands = [k for k in keys if Path(k).name == lp.name]
        if not cands:
            raise ValueError(f"runs: {label!r} is not in {manifest.source} (its runs: {keys[:8]}"
                             f"{' ...' if len(keys) > 8 else ''}); name each run by its manifest key, its path or its "
                             "folder name")
        if len(cands) > 1:
            raise ValueError(f"runs: {label!r} matches several runs of {manifest.source}: {cands}; use the full key")
        if cands[0] in matched:
            raise ValueError(f"runs: {label!r} and another given run both match {cands[0]!r} in {manifest.source}")
        matched[cands[0]] = obj
    missing = [k for k in keys if k not in matched]
    if missing:
        raise ValueError(f"{manifest.source} lists {len(missing)} run(s) that were not given: {missing[:8]}; pass "
                         "every run of the manifest (or none, to load the manifest's run paths)")
    return [(k, matched[k]) for k in keys]


# ------------------------------------------------------------------------------------------------------ results


# --------------------------------------------------------------------------------------------------------- core


def _copies_map(copies: Any) -> Optional[dict[str, int]]:
    if copies is None:
        return None
    from .results import AuditResult

    if isinstance(copies, (str, os.PathLike)):
        copies = AuditResult.from_json(copies)
    if isinstance(copies, AuditResult):
        return {r.id: int(r.copies) for r in copies.images}
    if isinstance(copies, Mapping):
        return {str(k): int(v) for k, v in copies.items()}
    raise TypeError(f"copies: expected a mapping id -> count, an AuditResult or an audit.json path; "
                    f"got {type(copies).__name__}")


def _memorized_rule(scores: np.ndarray, ratio: np.ndarray, threshold: Any, min_ratio: float):
    """-> (memorized mask over scored images, rule text, threshold or None, min_ratio or None)."""
    if threshold is None or threshold == "ratio":
        if not (isinstance(min_ratio, (int, float)) and math.isfinite(min_ratio) and min_ratio > 1):
            raise ValueError(f"min_ratio={min_ratio!r} is not allowed: expected a number > 1 (default 2)")
        return ratio >= min_ratio, f"loss_out / loss_in >= {min_ratio:g}", None, float(min_ratio)
    if threshold == "mad":
        if scores.size == 0:
            return np.zeros(0, bool), "loo_score > median + 3 * 1.4826 * MAD", None, None
        med = float(np.median(scores))
        mad = 1.4826 * float(np.median(np.abs(scores - med)))
        thr = med + 3.0 * mad
        return scores > thr, f"loo_score > median + 3 * 1.4826 * MAD = {thr:.4g}", thr, None
    if isinstance(threshold, (int, float)) and not isinstance(threshold, bool) and math.isfinite(threshold):
        return scores > float(threshold), f"loo_score > {float(threshold):g}", float(threshold), None
    raise ValueError(f"threshold={threshold!r} is not allowed: expected None / 'ratio' (loss_out / loss_in >= "
                     "min_ratio), 'mad' (median + 3 MAD of the scores) or a finite number (absolute loo_score)")


def _label(memorized: bool, outlier: bool, scored: bool) -> str:
    if not scored:
        return "unscored"
    if memorized:
        return "memorized outlier" if outlier else "memorized inlier"
    return "hard outlier" if outlier else "typical"


def loo_scores(
    runs: Any,
    manifest: Union[str, os.PathLike, Mapping, FoldManifest],
    train: Any,
    *,
    timesteps: Sequence[int] = DEFAULT_TIMESTEPS,
    noise_draws: int = 4,
    seed: int = 0,
    batch_size: int = 64,
    device=None,
    scheduler=None,
    checkpoint: Optional[int] = None,
    strict: bool = True,
    threshold: Union[None, str, float] = None,
    min_ratio: float = 2.0,
    outlier_k: int = 5,
    outlier_quantile: float = 0.95,
    copies: Any = None,
    progress: bool = False,
) -> LooResult:
    """Leave-one-out memorization score of every training image from K runs trained on known folds.

    ``runs``: the K runs - a list of run / pipeline folders (or CheckpointRuns), a dict ``{manifest key: run folder,
    CheckpointRun or model}`` (models need ``scheduler=``), or ``None`` to load the run paths written in the manifest.
    ``manifest``: the fold manifest (path, dict or :class:`FoldManifest`). ``train``: the training ImageSet / folder /
    uint8 array whose ids the manifest uses. ``checkpoint``: which step of each run (default: its last/final model).
    ``strict``: manifest ids that are not in ``train`` are an error (else they are ignored and listed in
    ``unknown_ids``). ``threshold`` / ``min_ratio``: the memorized rule (module docstring). ``copies``: optional copy
    counts per image (a mapping, an :class:`~diffaudit.results.AuditResult` or an ``audit.json`` path), shown beside
    the scores. Same ``seed`` and timesteps -> the same noise per image in every run.
    """
    t0 = time.perf_counter()
    ts = check_loss_args(timesteps, noise_draws, batch_size)
    if checkpoint is not None and (isinstance(checkpoint, bool) or not isinstance(checkpoint, (int, np.integer))):
        raise ValueError(f"checkpoint={checkpoint!r} is not allowed: expected None (each run's last model) or an "
                         "integer step present in every run")
    if isinstance(outlier_k, bool) or not isinstance(outlier_k, (int, np.integer)) or outlier_k < 1:
        raise ValueError(f"outlier_k={outlier_k!r} is not allowed: expected an integer >= 1")
    man = read_manifest(manifest)
    train_set = as_imageset(train, "train")
    if len(train_set) < 2:
        raise ValueError(f"train: need at least 2 training images; got {len(train_set)}")
    pairs = _match_runs(runs, man)
    copy_map = _copies_map(copies)

    known = set(train_set.ids)
    skipped_ids = {s.id for s in train_set.skipped}
    unknown = sorted({i for ids in man.runs.values() for i in ids} - known - skipped_ids)
    if unknown and strict:
        raise ValueError(
            f"{man.source}: {len(unknown)} image ids are not in train ({getattr(train_set, 'source', '')}), e.g. "
            f"{unknown[:5]}; ids must be the training set's ids (for a folder: POSIX paths relative to it, e.g. "
            f"{train_set.ids[0]!r}). Pass strict=False (--allow-unknown-ids) to ignore them")
    if unknown:
        log.warning("%s: ignoring %d ids not in the training set (e.g. %s)", man.source, len(unknown), unknown[:3])

    # losses: one column per run, noise fixed per image id
    kw = dict(timesteps=ts, noise_draws=int(noise_draws), batch_size=int(batch_size), device=device)
    stacks: dict[Any, tuple[list[str], np.ndarray]] = {}
    ids: Optional[list[str]] = None
    cols: list[np.ndarray] = []
    run_rows: list[LooRun] = []
    from ._progress import task_bar

    with task_bar(progress, "leave-one-out losses", len(pairs)) as advance:
        for key, obj in pairs:
            refs, sched, desc = resolve_models(obj, scheduler=scheduler, checkpoint=checkpoint, device=device,
                                               name=f"runs[{key!r}]")
            ref = refs[0]
            model = ref.load()
            conf = getattr(model, "config", None)
            geom = (str(getattr(conf, "sample_size", None)), getattr(conf, "in_channels", None))
            if geom not in stacks:
                stacks[geom] = stack_for_model(train_set, model)
            r_ids, x = stacks[geom]
            if ids is None:
                ids = r_ids
            elif r_ids != ids:  # pragma: no cover - decode failures differ between passes
                raise RuntimeError("the training images decoded differently between runs; check train.skipped")
            cols.append(image_losses(model, sched, r_ids, x, seed=int(seed), **kw))
            run_rows.append(LooRun(name=key, model=desc, checkpoint=str(ref.path), step=int(ref.step), n_seen=0))
            del model
            advance(1)
    assert ids is not None
    L = np.stack(cols, axis=1)  # (n, K)
    pos = {i: n for n, i in enumerate(ids)}
    seen = np.zeros(L.shape, dtype=bool)
    for k, (key, _) in enumerate(pairs):
        rows = [pos[i] for i in man.runs[key] if i in pos]
        seen[rows, k] = True
        run_rows[k].n_seen = len(rows)
        if rows:
            run_rows[k].loss_seen = float(L[rows, k].mean())
        if len(rows) < len(ids):
            run_rows[k].loss_unseen = float(L[~seen[:, k], k].mean())
    n_in = seen.sum(1)
    n_out = seen.shape[1] - n_in
    scored = (n_in > 0) & (n_out > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        loss_in = np.where(n_in > 0, (L * seen).sum(1) / np.maximum(n_in, 1), np.nan)
        loss_out = np.where(n_out > 0, (L * ~seen).sum(1) / np.maximum(n_out, 1), np.nan)
    score = loss_out - loss_in
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(loss_out > 0, np.minimum(loss_out / np.maximum(loss_in, loss_out / _RATIO_CAP), _RATIO_CAP),
                         1.0)
    mem_scored, rule, thr, mr = _memorized_rule(score[scored], ratio[scored], threshold, min_ratio)
    memorized = np.zeros(len(ids), dtype=bool)
    memorized[np.flatnonzero(scored)] = mem_scored

    # outliers: pixel space at the loss pass's resolution, in [0, 1]
    from .metrics import outlier_labels, outlier_scores

    x_first = next(iter(stacks.values()))[1]
    vec = x_first.reshape(len(x_first), -1).astype(np.float64) / 255.0
    o_score = outlier_scores(vec, k=int(outlier_k))
    o_lab = outlier_labels(o_score, quantile=outlier_quantile) == "outlier"
    o_cut = float(np.quantile(o_score, outlier_quantile))

    def opt(v):
        return float(v) if np.isfinite(v) else None

    images = [
        LooImage(
            id=i, loo_score=opt(score[n]) if scored[n] else None, n_in=int(n_in[n]), n_out=int(n_out[n]),
            loss_in=opt(loss_in[n]), loss_out=opt(loss_out[n]), loss_ratio=opt(ratio[n]) if scored[n] else None,
            memorized=bool(memorized[n]), outlier_score=float(o_score[n]), outlier=bool(o_lab[n]),
            label=_label(bool(memorized[n]), bool(o_lab[n]), bool(scored[n])),
            copies=(copy_map.get(i, 0) if copy_map is not None else None),
        )
        for n, i in enumerate(ids)
    ]
    images.sort(key=lambda r: (r.loo_score is None, -(r.loo_score or 0.0), r.id))
    n_all, n_none = int((n_out == 0).sum()), int((n_in == 0).sum())
    if n_all or n_none:
        log.warning("%d training images were seen by every run and %d by none: they get no leave-one-out score",
                    n_all, n_none)
    try:
        fp = train_set.fingerprint()
    except Exception:  # pragma: no cover - fingerprint needs every file readable
        fp = ""
    return LooResult(
        images=images, runs=run_rows, rule=rule, threshold=thr, min_ratio=mr, outlier_cut=o_cut,
        outlier_k=int(outlier_k), outlier_quantile=float(outlier_quantile), timesteps=ts,
        noise_draws=int(noise_draws), seed=int(seed), n_seen_by_all=n_all, n_seen_by_none=n_none,
        unknown_ids=unknown, manifest=man.source, train=str(getattr(train_set, "source", "")),
        train_fingerprint=fp, skipped=skipped_of(train_set, "train"),
        losses=[[float(v) for v in row] for row in L], loss_ids=list(ids),
        seconds=round(time.perf_counter() - t0, 3),
    )


def write_loo_outputs(result: LooResult, out_dir: str | os.PathLike, *, images: Any = None) -> dict[str, str]:
    """loo.json, loo.csv and loo.html in ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result.to_json(out / "loo.json")
    paths = {"json": str(out / "loo.json"), "csv": result.to_csv(out / "loo.csv"),
             "html": result.to_html(out / "loo.html", images=images)}
    return paths


# ---------------------------------------------------------------------------------------------------- demo folds


@dataclass
class FoldRuns:
    """What :func:`train_fold_runs` wrote."""

    out_dir: Path
    manifest: Path  # out_dir/folds.json
    run_dirs: list[Path]  # out_dir/runs/fold-j (diffusers layout: checkpoint-N/unet + root pipeline)
    train_dir: Path  # PNGs of the whole pool (the ids of the manifest)
    heldout_dir: Path
    train_ids: list[str]
    seconds: float


def _fold_assignment(n: int, k: int, scheme: str, rng: np.random.Generator) -> np.ndarray:
    """(n, k) bool: image i is in run j's training set.

    ``"half"``: runs come in complementary pairs (2p, 2p+1): an independent random half of the images for run 2p,
    the other half for run 2p+1. Every image is then in exactly one run of each pair (``k // 2`` runs, never all or
    none), every run sees ``n // 2`` or ``n - n // 2`` images, and the pairs' splits are independent, so images are
    not always seen together. With odd ``k`` the last run gets its own random half. ``"kfold"``: ``k`` folds of
    (almost) equal size; run j trains on every fold but j.
    """
    seen = np.zeros((n, k), dtype=bool)
    if scheme == "half":
        for p in range(k // 2):
            first = rng.permutation(n)[: n // 2 + int(n % 2 == 1 and rng.random() < 0.5)]
            seen[first, 2 * p] = True
            seen[:, 2 * p + 1] = ~seen[:, 2 * p]
        if k % 2:
            seen[rng.permutation(n)[: n // 2], k - 1] = True
    else:
        folds = rng.permutation(n) % k
        seen = folds[:, None] != np.arange(k)[None, :]
    return seen


def train_fold_runs(
    out_dir: str | os.PathLike,
    k: int = 4,
    *,
    n_train: int = 32,
    steps: int = 1500,
    scheme: str = "half",
    batch_size: int = 16,
    lr: float = 1e-3,
    seed: int = 0,
    n_heldout: int = 64,
    image_size: int = 8,
    device: Optional[str] = None,
    num_threads: Optional[int] = None,
    progress: bool = False,
) -> FoldRuns:
    """Train ``k`` demo DDPMs (:func:`diffaudit.training.make_demo_unet`, the demo's scheduler and recipe) on folds of
    ``n_train`` scikit-learn digits and write the fold manifest.

    ``scheme="half"`` (default): complementary pairs of runs, each pair splitting the pool in random halves (every
    image is in exactly ``k // 2`` runs, each run sees half the pool; odd ``k``: the last run sees a random half).
    ``scheme="kfold"``: the pool is cut in ``k`` folds and run j trains on all folds but j. All runs start from the
    same initial weights (``seed``) so that they differ only by their data. Writes ``out_dir/train/*.png`` (the
    pool; the manifest's ids), ``out_dir/heldout/``, ``out_dir/runs/fold-j/`` (``checkpoint-{steps}/unet/`` + root
    pipeline) and ``out_dir/folds.json``. Cost: ``k * steps`` optimizer steps of the demo UNet (k=4, 1500 steps,
    32 digits: about 200 s of CPU time on one thread; every image ends up memorized - mean loss at t=100 of the
    images a run saw about 0.07, of those it did not 0.78-0.92).
    """
    import torch
    from diffusers import DDPMPipeline

    from .training import (EpochBatches, ddpm_loss, digits_split, make_adamw, make_demo_scheduler, make_demo_unet,
                           write_pngs)

    k = check_int("k", k, 2)
    steps = check_int("steps", steps, 1)
    batch_size = check_int("batch_size", batch_size, 1)
    if scheme not in ("half", "kfold"):
        raise ValueError(f"scheme={scheme!r} is not allowed: expected 'half' or 'kfold'")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr={lr!r} is not allowed: expected a positive finite float")
    t0 = time.perf_counter()
    device = device or default_device()
    out = Path(out_dir)
    pool, held, pool_idx, held_idx = digits_split(n_train, n_heldout, seed=seed, image_size=image_size)
    train_ids = write_pngs(out / "train", pool, pool_idx)
    write_pngs(out / "heldout", held, held_idx)
    seen = _fold_assignment(len(pool), k, scheme, np.random.default_rng([seed, 7]))
    runs: dict[str, list[str]] = {}
    run_dirs: list[Path] = []
    old_threads = torch.get_num_threads()
    torch.set_num_threads(num_threads or min(old_threads, 4))
    bar = None
    if progress:
        from ._progress import progress

        bar = progress(transient=True)
        bar.start()
        task = bar.add_task(f"training {k} fold runs", total=k * steps)
    try:
        for j in range(k):
            rows = np.flatnonzero(seen[:, j])
            run_dir = out / "runs" / f"fold-{j}"
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)  # same initial weights for every fold
                unet = make_demo_unet(image_size).to(device)
            sched = make_demo_scheduler()
            gen = torch.Generator().manual_seed(seed * 1000 + j + 1)
            data = torch.from_numpy(pool[rows]).permute(0, 3, 1, 2).float().div(127.5).sub(1.0).to(device)
            opt = make_adamw(unet.parameters(), lr)
            unet.train()
            batches = EpochBatches(data.shape[0], batch_size, gen)
            for _ in range(steps):
                loss = ddpm_loss(unet, sched, data[batches.next().to(device)], gen)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if bar is not None:
                    bar.advance(task)
            unet.eval()
            unet.save_pretrained(run_dir / f"checkpoint-{steps}" / "unet")
            DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(run_dir)
            key = f"runs/fold-{j}"
            runs[key] = [train_ids[r] for r in rows]
            run_dirs.append(run_dir)
            log.info("fold %d: %d images, %d steps, final batch loss %.4f", j, len(rows), steps, float(loss.detach()))
    finally:
        torch.set_num_threads(old_threads)
        if bar is not None:
            bar.stop()
    meta = dict(generator="diffaudit.loo.train_fold_runs", scheme=scheme, k=k, n_train=n_train, steps=steps,
                batch_size=batch_size, lr=float(lr), seed=seed, image_size=image_size)
    manifest = write_manifest(out / "folds.json", runs, meta=meta)
    return FoldRuns(out_dir=out, manifest=manifest, run_dirs=run_dirs, train_dir=out / "train",
                    heldout_dir=out / "heldout", train_ids=train_ids, seconds=time.perf_counter() - t0)


def fold_demo(out_dir: str | os.PathLike, k: int = 4, *, progress: bool = False, seed: int = 0,
              **train_kw) -> LooResult:
    """``diffaudit demo --folds K``: train ``k`` fold runs on digits (:func:`train_fold_runs`), score them
    (:func:`loo_scores`) and write ``loo.json``, ``loo.csv``, ``loo.html`` to ``out_dir/loo/``."""
    fr = train_fold_runs(Path(out_dir) / "folds", k, seed=seed, progress=progress, **train_kw)
    res = loo_scores(None, fr.manifest, fr.train_dir, seed=seed, progress=progress)
    write_loo_outputs(res, Path(out_dir) / "loo", images=fr.train_dir)
    return res
