"""Pixel verification of a candidate copy: the best normalized cross-correlation of two images over crops, scales and
a mirror (template matching, Lewis 1995, "Fast Normalized Cross-Correlation"; geometric verification of descriptor
matches is the usual second stage of copy detection, e.g. Douze et al. 2021, "The 2021 Image Similarity Dataset and
Challenge").

A descriptor (SSCD, CLIP, a hash) says that two images *look alike*; on photographs cut into patches of one texture or
one smooth region, distinct images look alike too. A copy also agrees pixel for pixel once the edit is undone. For a
pair (a, b) :func:`aligned_similarity` tries each image as the *template* inside the other (the *scene*), at
coverages ``c`` (the template's extent as a fraction of the largest extent that fits the scene: 1.0 = the whole
scene, 0.8 = an 80% crop; and the template's own pixel scale, so that a crop that was not resized is matched
exactly), mirrored or not, at every position, and returns the largest correlation found:

1. both images are converted to grey (ITU-R 601 luma) and the scene is resized (bilinear, antialiased) so that its
   longer side is ``side`` px; the template is resized to ``c`` times the largest size that fits the scene with its
   aspect ratio kept. Neither is ever enlarged: where the template would be, the scene is made smaller instead, so
   a half-size copy is compared at its own resolution;
2. each is *band-passed*: the image minus its Gaussian blur (``sigma`` px at the working size), which removes
   brightness, contrast gradients and smooth shading, so that two distinct patches of one sky or one smooth gradient
   do not correlate, while the detail that a copy keeps (edges, texture) does;
3. NCC(y, x) = sum(t' * s'_yx) / (|t'| |s'_yx|) over the template's window at every valid position, with t' and s'_yx
   the mean-removed template and scene window (Lewis's formula, correlation by FFT, window sums by integral images).
   Windows whose band-passed contrast is below ``floor`` grey levels RMS are not compared (-1: nothing to compare).
4. a pair scoring at least ``ALIGN_REFINE_FROM`` is searched again at twice the working size, at coverages within 3%
   of the best one: a crop at an odd offset or a scale between the grid's steps loses correlation to sub-pixel
   misalignment at the coarse size. The higher score is kept.

The score is in [-1, 1]; 1 = the same pixels up to brightness and contrast. It is invariant to brightness and contrast
changes (NCC), to crops and rescaling within the coverage grid, and to a horizontal mirror. Lossy re-encoding lowers it
(JPEG at quality 30 of an 80-128 px patch: most copies 0.96-0.99, some 0.55-0.9), and so does resampling twice (a crop
resized back to full size: 0.94-0.96). :data:`ALIGN_THRESHOLD` is the documented cut.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

#: longer side of the scene at which images are compared (px)
ALIGN_SIDE = 48
#: standard deviation of the Gaussian blur removed by the band-pass (px at ALIGN_SIDE)
ALIGN_SIGMA = 1.5
#: template extents tried, as fractions of the largest extent that fits the scene
ALIGN_COVERAGES = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)
#: band-passed RMS contrast (grey levels, 0-255) below which a window or template is "flat": not compared
ALIGN_FLOOR = float(np.sqrt(0.05))
#: the documented cut: aligned band-passed NCC >= 0.96 is a copy (residual energy under 8% of the detail's). Chosen on
#: the photo benchmark's default set (benchmarks/bench_photos.py: distinct patches reached 0.952 at most); on sets cut
#: differently, mirror-symmetric patches of one photograph (the rim of the retina) reach 0.98
ALIGN_THRESHOLD = 0.96
#: pairs scoring at least this are looked at again at twice the resolution (sub-pixel offsets and scales of crops
#: lower the score at the coarse size); the higher of the two scores is kept
ALIGN_REFINE_FROM = 0.7
_REFINE_STEPS = (0.97, 0.985, 1.0, 1.015, 1.03)
#: entries each per-image cache holds before it is emptied (about 40 KB each: a few hundred MB at most)
_CACHE_LIMIT = 4096
#: smallest template side (px at the working size) that is compared
ALIGN_MIN_SIDE = 12


def _grey(img: np.ndarray) -> np.ndarray:
    a = np.asarray(img)
    if a.ndim == 3:
        if a.shape[2] == 1:
            a = a[:, :, 0]
        else:
            a = a[:, :, :3].astype(np.float32) @ np.asarray([0.299, 0.587, 0.114], np.float32)
    return np.asarray(a, np.float32)


def align_view(img: np.ndarray, side: int = ALIGN_SIDE) -> np.ndarray:
    """A uint8 grey copy of ``img`` whose longer side is at most ``2 * side`` (antialiased): all that
    :func:`aligned_similarities` needs, so a large set's working copies stay small."""
    from PIL import Image

    g = np.asarray(img)
    if g.ndim == 3 and g.shape[2] == 1:
        g = g[:, :, 0]
    im = Image.fromarray(np.ascontiguousarray(g))
    if im.mode != "L":
        im = im.convert("RGB").convert("L")
    if max(im.size) > 2 * side:
        sc = 2 * side / max(im.size)
        im = im.resize((max(1, round(im.size[0] * sc)), max(1, round(im.size[1] * sc))), Image.BILINEAR)
    return np.asarray(im)


def _resize(g: np.ndarray, h: int, w: int) -> np.ndarray:
    from PIL import Image

    if g.shape == (h, w):
        return g
    return np.asarray(Image.fromarray(g, mode="F").resize((w, h), Image.BILINEAR), np.float32)


def _bandpass(g: np.ndarray, sigma: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    return g - gaussian_filter(g, sigma, mode="nearest")


class Aligner:
    """Scores pairs of one image list (uint8 HWC / HW arrays, or :func:`align_view` copies), keeping each image's
    band-passed scene and templates (and their FFTs) for the pairs that follow: ``Aligner(images).scores(pairs)``."""

    def __init__(self, images: Sequence[np.ndarray], *, side: int = ALIGN_SIDE, sigma: float = ALIGN_SIGMA,
                 coverages: Sequence[float] = ALIGN_COVERAGES, mirror: bool = True, floor: float = ALIGN_FLOOR):
        cov = tuple(float(c) for c in coverages)
        if not cov or any(not 0.0 < c <= 1.0 for c in cov):
            raise ValueError(f"coverages={coverages!r}: give fractions in (0, 1]")
        if int(side) < ALIGN_MIN_SIDE:
            raise ValueError(f"side={side!r}: must be >= {ALIGN_MIN_SIDE}")
        from scipy import fft

        self._fft = fft
        self.grey = [_grey(a) for a in images]
        self.side, self.sigma, self.coverages, self.mirror, self.floor = int(side), float(sigma), cov, bool(mirror), \
            float(floor)
        self._scene: dict[tuple[int, int, int], tuple] = {}
        self._tmpl: dict[tuple, tuple] = {}
        self._norms: dict[tuple, np.ndarray | None] = {}

    def _scene_of(self, i: int, H: int, W: int):
        """(rfft2 of the band-passed scene at (H, W), integral images of s and s^2)."""
        key = (i, H, W)
        got = self._scene.get(key)
        if got is None:
            s = _bandpass(_resize(self.grey[i], H, W), self.sigma).astype(np.float64)
            ii = np.zeros((H + 1, W + 1))
            ii[1:, 1:] = s.cumsum(0).cumsum(1)
            ii2 = np.zeros((H + 1, W + 1))
            ii2[1:, 1:] = (s * s).cumsum(0).cumsum(1)
            got = (self._fft.rfft2(s), ii, ii2)
            self._scene[key] = got
        return got

    def _template(self, j: int, h: int, w: int, shape: tuple[int, int]):
        """(norm of the zero-mean band-passed template at (h, w), conj rfft2 of it zero-padded to ``shape``, one
        per orientation)."""
        key = (j, h, w, shape)
        got = self._tmpl.get(key)
        if got is None:
            t = _bandpass(_resize(self.grey[j], h, w), self.sigma).astype(np.float64)
            t -= t.mean()
            ffts = []
            for tt in ((t, t[:, ::-1]) if self.mirror else (t,)):
                pad = np.zeros(shape)
                pad[:h, :w] = tt
                ffts.append(np.conj(self._fft.rfft2(pad)))
            got = (float(np.sqrt((t * t).sum())), ffts)
            self._tmpl[key] = got
        return got

    def _window_norms(self, i: int, H: int, W: int, th: int, tw: int):
        """1 / (RMS-contrast norm of every th x tw window of the scene), 0 where the window is flat; None when all
        are. Shared by every template of that size compared with this scene."""
        key = (i, H, W, th, tw)
        if key in self._norms:
            return self._norms[key]
        _, ii, ii2 = self._scene_of(i, H, W)
        n = th * tw
        s1 = ii[th:, tw:] - ii[:-th, tw:] - ii[th:, :-tw] + ii[:-th, :-tw]
        s2 = ii2[th:, tw:] - ii2[:-th, tw:] - ii2[th:, :-tw] + ii2[:-th, :-tw]
        var = s2 - s1 * s1 / n
        ok = var > n * self.floor * self.floor
        got = np.where(ok, 1.0 / np.sqrt(np.where(ok, var, 1.0)), 0.0) if ok.any() else None
        self._norms[key] = got
        return got

    def _sizes(self, i: int, j: int, side: int, covs: tuple[float, ...]) -> dict[tuple[int, int], list[tuple]]:
        """Scene size -> template sizes to try, one per coverage. The working scale is the scene's ``side`` scale,
        lowered where the template (or the scene) would otherwise be enlarged: both are compared at the resolution
        the smaller one has, so a half-size copy is not judged on detail it cannot hold."""
        hS, wS = self.grey[i].shape
        hT, wT = self.grey[j].shape
        fit = min(hS / hT, wS / wT)
        if fit > 1.0 and min(covs) <= 1.0 / fit < 1.0:  # the template at the scene's own pixel scale: a plain crop
            covs = covs + (1.0 / fit,)
        out: dict[tuple[int, int], list[tuple]] = {}
        for c in covs:
            s = min(side / max(hS, wS), 1.0, 1.0 / (c * fit))
            H, W = max(1, int(round(hS * s))), max(1, int(round(wS * s)))
            th, tw = min(int(round(hT * c * fit * s)), H), min(int(round(wT * c * fit * s)), W)
            if min(th, tw) >= ALIGN_MIN_SIDE:
                out.setdefault((H, W), []).append((th, tw, c))
        return out

    def _in_scene(self, i: int, j: int, side: int, covs: tuple[float, ...], flips: tuple[bool, ...]):
        """Best NCC of image j as a template anywhere in image i: (score, coverage, mirrored)."""
        best = (-1.0, 1.0, False)
        for (H, W), sizes in self._sizes(i, j, side, covs).items():
            fs = self._scene_of(i, H, W)[0]
            prods, meta = [], []
            for th, tw, c in sizes:
                n = th * tw
                tn, ffts = self._template(j, th, tw, (H, W))
                if tn < self.floor * np.sqrt(n):
                    continue
                inv_sd = self._window_norms(i, H, W, th, tw)
                if inv_sd is None:
                    continue
                den = inv_sd / tn
                for f, flip in zip(ffts, (False, True)):
                    if flip in flips:
                        prods.append(fs * f)
                        meta.append((th, tw, den, c, flip))
            if not prods:
                continue
            corr = self._fft.irfft2(np.stack(prods), s=(H, W), axes=(-2, -1))
            for k, (th, tw, den, c, flip) in enumerate(meta):
                v = float((corr[k, : H - th + 1, : W - tw + 1] * den).max())
                if v > best[0]:
                    best = (v, c, flip)
        return best

    def scores(self, pairs) -> np.ndarray:
        """The aligned similarity of every pair ``(a, b)`` of positions (float64, -1 where nothing is comparable)."""
        flips = (False, True) if self.mirror else (False,)
        out = np.empty(len(pairs), np.float64)
        for k, (a, b) in enumerate(pairs):
            a, b = int(a), int(b)
            if max(len(self._scene), len(self._tmpl), len(self._norms)) > _CACHE_LIMIT:  # bounded memory
                self._scene.clear(), self._tmpl.clear(), self._norms.clear()
            best = max((self._in_scene(a, b, self.side, self.coverages, flips), (a, b)),
                       (self._in_scene(b, a, self.side, self.coverages, flips), (b, a)), key=lambda x: x[0][0])
            (v, c, flip), (i, j) = best
            if v >= ALIGN_REFINE_FROM:  # promising: look again at twice the resolution, near the best coverage
                covs = tuple(sorted({min(1.0, c * f) for f in _REFINE_STEPS}))
                v = max(v, self._in_scene(i, j, 2 * self.side, covs, (flip,))[0])
            out[k] = min(v, 1.0)
        return out


def aligned_similarities(images: Sequence[np.ndarray], pairs, **kw) -> np.ndarray:
    """:func:`aligned_similarity` of every pair ``(a, b)`` of positions into ``images`` (uint8 HWC / HW arrays),
    sharing the per-image work (:class:`Aligner`; keyword arguments as there). Returns float64 (len(pairs),)."""
    return Aligner(images, **kw).scores(pairs)


def aligned_similarity(a: np.ndarray, b: np.ndarray, **kw) -> float:
    """The best band-passed normalized cross-correlation of ``a`` and ``b`` over positions, coverages (crops and
    scales) and a mirror, each image tried inside the other (module docstring). -1 when either is flat."""
    return float(aligned_similarities([a, b], [(0, 1)], **kw)[0])
