"""The audit HTML report and the risk CSV: inert with hostile strings, self-contained, deterministic, and it works in
a real browser (headless Chromium, when installed)."""
from __future__ import annotations

import base64
import csv
import hashlib
import importlib.util
import io
import os
import re
import time
from html import unescape as html_unescape
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from diffaudit.report import render_audit, render_audit_html, write_risk_csv
from diffaudit.report._html import CSP
from diffaudit.results import (AuditResult, CheckpointResult, EmbedderMetrics, Estimate, ImageRisk, OnsetInfo,
                               Provenance, SampleMatch, SkippedItem)

HOSTILE = ['<script>alert(1)</script>', '"onerror=alert(1) x="', "</style><script>", "{{7*7}}",
           "'><img src=x onerror=alert(2)>", "javascript:alert(3)", "https://evil.example/x.png",
           "]]></svg><script>alert(4)</script>"]
ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------------- fixtures


def make_result(n_ckpt: int = 6, hostile: bool = True, n_images: int = 40, n_matches: int = 4,
                onset_index: int | None = 3) -> AuditResult:
    """A hand-built audit: memorization ratio rising with the step, two embedders, hostile strings everywhere."""
    h = (lambda i: HOSTILE[i % len(HOSTILE)]) if hostile else (lambda i: f"plain{i}")
    steps = [1000 * (i + 1) for i in range(n_ckpt)]
    train_ids = [f"train/{i:03d}.png" for i in range(20)]
    if hostile:
        train_ids[:len(HOSTILE)] = HOSTILE
    emb2 = "sscd:" + h(2)
    cks = []
    for i, s in enumerate(steps):
        v = min(1.0, 0.01 + 0.1 * i * i / max(1, n_ckpt - 1))
        mr = Estimate(v, max(0.0, v - 0.03), min(1.0, v + 0.03), 128)
        matches = [SampleMatch(j, f"samples/{s}/{j:03d}.png" if j != 1 else h(j + i),
                               [train_ids[(i + j) % 20], train_ids[(i + j + 7) % 20]], [0.1 + j, 1.0 + j],
                               (0.1 + j) / (1.0 + j), j == 0) for j in range(n_matches)]
        cmatches = [SampleMatch(j, f"samples/{s}/{j:03d}.png", [train_ids[(i + j) % 20], h(j)], [0.9 - 0.1 * j, 0.4],
                                None, j < 2) for j in range(n_matches)]
        pix = EmbedderMetrics("pixel-32x32", "l2", None, 128, memorization_ratio=mr,
                              memorization_ratio_half=Estimate(min(1.0, v + 0.05)), top1_mean=2.0 - 0.1 * i,
                              top1_p95=1.0, train_baseline_top1_mean=1.8, train_baseline_top1_p95=1.2,
                              heldout_ct_z=-0.5 * i, authenticity=1 - v, heldout_top1_mean=1.9, top_matches=matches)
        ss = EmbedderMetrics(emb2, "cosine", 0.5, 128, replication_rate=Estimate(v / 2, v / 3, v, 128),
                             top1_mean=0.3 + 0.05 * i, top1_p95=0.5 + 0.05 * i, train_baseline_top1_mean=0.35,
                             top_matches=cmatches)
        cks.append(CheckpointResult(s, f"runs/{h(i)}/checkpoint-{s}", 128, num_nonfinite=int(i == 1),
                                    metrics={"pixel-32x32": pix, emb2: ss}, loss_train=0.1 - 0.01 * i,
                                    loss_heldout=0.1, loss_gap=0.01 * i, membership_auc=0.5 + 0.05 * i,
                                    onset_signal=mr))
    onset = steps[onset_index] if onset_index is not None else None
    keep = steps[onset_index - 1] if onset_index else None
    on = OnsetInfo("memorization_ratio[pixel-32x32]", 0.02, 2, 0.95, onset, keep, "lowest held-out loss " + h(5))
    images = [ImageRisk(train_ids[t % 20] if t < 20 else f"train/{t:04d}.png", copies=(t * 7) % 5,
                        first_step_copied=steps[t % n_ckpt] if (t * 7) % 5 else None,
                        copies_by_step={str(steps[-1]): (t * 7) % 5}, duplicates=t % 3,
                        outlier_score=0.5 + (t % 11) / 10, label=("outlier" if t % 4 == 0 else h(t) if t % 9 == 1
                                                                  else "inlier"), membership_score=(t % 10) / 10)
              for t in range(n_images)]
    skipped = [SkippedItem(h(k), "not an image: " + h(k + 1), "train") for k in range(3)]
    prov = Provenance("0.1.0", "2025-01-01T00:00:00+00:00", "runs/" + h(3),
                      {f"runs/{h(i)}/checkpoint-{s}/unet.safetensors": f"{i:064x}" for i, s in enumerate(steps)},
                      "folder:" + h(0), "ab" * 32, "folder:/val", "cd" * 32,
                      [{"name": "pixel-32x32", "preprocessing": "resize 32"}, {"name": emb2, "weights": h(1)}],
                      7, 128, {"kind": "DDIM", "steps": 10}, {"prompt": h(4)})
    return AuditResult(cks, on, images, skipped, prov)


def solid(color, size=(8, 8)):
    a = np.zeros((*size, 3), np.uint8)
    a[:] = color
    return a


def provider_for(result: AuditResult):
    """Train images: a solid colour derived from the id; samples: grey; one id makes the provider raise."""
    calls = []

    def images(kind, key):
        calls.append((kind, key))
        if key == HOSTILE[1]:
            raise OSError("cannot read")
        if kind == "train":
            d = hashlib.sha256(key.encode()).digest()
            return solid((d[0], d[1], d[2]))
        return solid((128, 128, 128), (40, 30))

    images.calls = calls
    return images


class Page(HTMLParser):
    """Collects tags, attributes, script/style bodies and visible text."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.scripts: list[str] = []
        self.styles: list[str] = []
        self.text: list[str] = []
        self._in: str | None = None

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag in ("script", "style"):
            self._in = tag
            (self.scripts if tag == "script" else self.styles).append("")

    def handle_startendtag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_endtag(self, tag):
        if tag in ("script", "style"):
            self._in = None

    def handle_data(self, data):
        if self._in == "script":
            self.scripts[-1] += data
        elif self._in == "style":
            self.styles[-1] += data
        else:
            self.text.append(data)


def thumbnails(html: str) -> dict[str, np.ndarray]:
    """alt text -> decoded picture of every thumbnail (through the sprite sheet it points into)."""
    from PIL import Image

    sprites = {m.group(1): m.group(2) for m in re.finditer(
        r'<image id="(t\d+)" width="\d+" height="\d+" href="data:image/(?:png|jpeg);base64,([^"]+)"/>', html)}
    out = {}
    for m in re.finditer(r'<svg class="th[^"]*" width="\d+" height="\d+" viewBox="0 0 \d+ \d+" role="img" '
                         r'aria-label="([^"]*)"><title>[^<]*</title><use href="#(t\d+)"/></svg>', html):
        data = base64.b64decode(sprites[m.group(2)])
        out[html_unescape(m.group(1))] = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    return out


def parse(html: str) -> Page:
    p = Page()
    p.feed(html)
    p.close()
    return p


ALLOWED_TAGS = {
    "html", "head", "meta", "title", "style", "body", "header", "nav", "main", "section", "footer", "div", "p", "h1",
    "h2", "h3", "h4", "a", "span", "b", "i", "sub", "small", "strong", "ul", "li", "dl", "dt", "dd", "table", "thead",
    "tbody", "tr", "th", "td", "figure", "figcaption", "img", "details", "summary", "button", "label", "select",
    "option", "input", "script", "svg", "defs", "image", "use", "line", "text", "path", "polygon", "circle", "rect",
    "title"}
ALLOWED_ATTRS = {
    "lang", "charset", "http-equiv", "content", "name", "class", "id", "href", "aria-label", "aria-labelledby",
    "aria-sort", "aria-hidden", "aria-live", "role", "src", "width", "height", "alt", "title", "open", "hidden",
    "type", "data-col", "data-type", "data-v", "data-label", "data-details", "data-step", "focusable",
    "data-y", "value", "autocomplete", "spellcheck", "scope", "viewbox", "xmlns", "x", "y", "x1", "x2", "y1", "y2",
    "cx", "cy", "r", "d", "points", "fill", "fill-opacity", "stroke", "stroke-width", "stroke-dasharray",
    "text-anchor"}


# ------------------------------------------------------------------------------------------------------- tests


def test_hostile_strings_are_shown_as_text_and_nothing_else(tmp_path):
    result = make_result()
    path = render_audit(result, tmp_path / "report.html", images=provider_for(result))
    html = Path(path).read_text(encoding="utf-8")
    page = parse(html)
    # only diffaudit's own script and style, and the script is exactly the shipped file
    shipped_js = (ROOT / "diffaudit/report/templates/report.js").read_text(encoding="utf-8")
    assert page.scripts == [shipped_js]
    assert len(page.styles) == 1 and "<" not in page.styles[0]
    for tag, attrs in page.tags:
        assert tag in ALLOWED_TAGS, tag
        for name, value in attrs.items():
            assert name in ALLOWED_ATTRS, (tag, name, value)
            assert not name.startswith("on"), (tag, name)
            if name in ("src", "href"):
                if tag == "image":  # the sprite sheet: the only place image bytes live
                    assert re.fullmatch(r"data:image/(png|jpeg);base64,[A-Za-z0-9+/=]+", value), value[:80]
                else:
                    assert re.fullmatch(r"#[a-z][a-z0-9-]*", value), (tag, value)
            assert "javascript:" not in (value or "").lower() or name in ("title", "alt", "aria-label",
                                                                            "data-label", "value"), (tag, name)
    # no raw markup from the data survives: the dangerous fragments only occur escaped
    assert "<script>alert" not in html and '"onerror=' not in html and "<img src=x" not in html
    assert html.count("<script") == 1 and html.count("</style>") == 1
    text = "".join(page.text)
    for s in HOSTILE:  # ... and every hostile string is visible as text
        assert s in text, s
    assert "{{7*7}}" in text  # not evaluated as a template


def test_csp_meta_first_and_script_hash_matches(tmp_path):
    html = render_audit_html(make_result(), images=provider_for(make_result()))
    page = parse(html)
    metas = [a for t, a in page.tags if t == "meta" and a.get("http-equiv", "").lower() == "content-security-policy"]
    assert len(metas) == 1
    csp = metas[0]["content"]
    # before anything that could load: the CSP meta is the second tag in <head>, right after charset
    names = [t for t, _ in page.tags]
    assert names[:4] == ["html", "head", "meta", "meta"] and page.tags[3][1] is metas[0]
    assert "default-src 'none'" in csp and "img-src data:" in csp and "'unsafe-inline'" not in csp.split(
        "script-src")[1].split(";")[0]
    digest = base64.b64encode(hashlib.sha256(page.scripts[0].encode("utf-8")).digest()).decode()
    assert f"script-src 'sha256-{digest}'" in csp
    # the rest of the lead's policy is unchanged
    assert csp == CSP.replace("script-src 'unsafe-inline'", f"script-src 'sha256-{digest}'")


def test_no_http_references_anywhere_but_text(tmp_path):
    html = render_audit_html(make_result(), images=provider_for(make_result()))
    page = parse(html)
    for tag, attrs in page.tags:
        for name, value in attrs.items():
            if name in ("src", "href", "xlink:href", "action", "poster", "srcset", "data"):
                assert not re.match(r"\s*(https?:)?//", value or ""), (tag, name, value)
    # the only http(s) occurrences are the SVG namespace and the hostile string shown as text/attribute text
    rest = html.replace('xmlns="http://www.w3.org/2000/svg"', "").replace("https://evil.example/x.png", "")
    assert "http://" not in rest and "https://" not in rest
    assert "url(" not in page.styles[0] and "@import" not in page.styles[0]


def test_json_round_trip_renders_identically(tmp_path):
    result = make_result()
    prov = provider_for(result)
    result.checkpoints[0].metrics["pixel-32x32"].top1_p95 = float("nan")  # non-finite -> null in JSON
    a = render_audit_html(result, images=prov)
    back = AuditResult.from_json(result.to_json())
    b = render_audit_html(back, images=prov)
    assert a == b
    # and rendering is deterministic from file too
    p1 = render_audit(back, tmp_path / "a" / "r.html", images=prov)
    p2 = result.to_html(str(tmp_path / "b" / "r.html"), images=prov)
    assert Path(p1).read_bytes() == Path(p2).read_bytes()
    assert not re.search(r'="[^"]*\bnan\b[^"]*"', a)  # no NaN leaks into coordinates or data-v


def _section(html: str, sid: str) -> str:
    m = re.search(rf'<section id="{sid}".*?</section>', html, re.S)
    assert m, sid
    return "".join(parse(m.group(0)).text)


def test_verdict_words_from_onset_and_last_checkpoint():
    r = make_result(n_ckpt=5, hostile=False, onset_index=2)
    last = r.checkpoints[-1]
    last.metrics["pixel-32x32"].memorization_ratio = Estimate(0.412, 0.35, 0.475, 512)
    v = " ".join(_section(render_audit_html(r), "verdict").split())
    assert "Memorization starts at step 3,000: samples copy training images." in v and "Copies training images" in v
    assert "At the last checkpoint (step 5,000), 41.2% of generated samples (95% CI 35%–47.5%, n = 512)" in v
    assert "Keep the checkpoint at step 2,000 (runs/plain1/checkpoint-2000)" in v
    assert "1 generated sample was NaN/inf" in v and "3 inputs were skipped" in v
    assert "exceeds 2% at a checkpoint and stays above it for 2 consecutive checkpoints" in v


def test_verdict_without_onset_and_unconfirmed_and_custom():
    r = make_result(n_ckpt=3, hostile=False, onset_index=None)
    for c in r.checkpoints:  # all far below the 2% threshold
        c.metrics["pixel-32x32"].memorization_ratio = Estimate(0.0, 0.0, 0.01, 128)
    r.onset.recommended_step = 3000
    v = " ".join(_section(render_audit_html(r), "verdict").split())
    assert "No memorization onset across 3 checkpoints (steps 1,000–3,000)." in v
    assert "Keep the checkpoint at step 3,000" in v
    # last checkpoint's lower bound above threshold but not confirmed yet
    r.checkpoints[-1].metrics["pixel-32x32"].memorization_ratio = Estimate(0.2, 0.1, 0.3, 128)
    v = " ".join(_section(render_audit_html(r), "verdict").split())
    assert "not yet confirmed by 2 consecutive checkpoints" in v
    # the audit's own words win, escaped
    r.verdict = "Stop at <b>step</b> 2,000 " + HOSTILE[0]
    html = render_audit_html(r)
    assert "Stop at &lt;b&gt;step&lt;/b&gt; 2,000 &lt;script&gt;" in html
    # no checkpoints at all
    empty = AuditResult([], OnsetInfo("memorization_ratio", 0.02, 2, 0.95))
    assert "No checkpoints were audited." in _section(render_audit_html(empty), "verdict")


def _chart(html: str, title_word: str) -> str:
    for m in re.finditer(r'<figure class="chart-card".*?</figure>', html, re.S):
        if f"<h3>{title_word}" in m.group(0):
            return m.group(0)
    raise AssertionError(f"no chart {title_word!r}")


def test_chart_marks_onset_threshold_and_ci_where_the_data_are():
    r = make_result(n_ckpt=6, hostile=False, onset_index=3)
    html = render_audit_html(r)
    svg = _chart(html, "Memorization ratio")
    pts = {int(m.group(3)): (float(m.group(1)), float(m.group(2))) for m in re.finditer(
        r'<circle class="pt" cx="([\d.]+)" cy="([\d.]+)" r="3" fill="#0072B2" data-step="(\d+)"', svg)}
    # 1/3-rule series: one point per checkpoint (the 1/2 series shares the colour; keep the first per step)
    assert set(pts) == {c.step for c in r.checkpoints}
    onset_x = float(re.search(r'<line class="marker onset" x1="([\d.]+)"', svg).group(1))
    assert onset_x == pts[4000][0]
    keep_x = float(re.search(r'<line class="marker keep" x1="([\d.]+)"', svg).group(1))
    assert keep_x == pts[3000][0]
    # the threshold line sits between values below and above 2% (SVG y grows downwards)
    thr_y = float(re.search(r'<line class="hline" x1="[\d.]+" x2="[\d.]+" y1="([\d.]+)"[^>]*data-y="0.02"',
                            svg).group(1))
    vals = {c.step: c.metrics["pixel-32x32"].memorization_ratio.value for c in r.checkpoints}
    first_circle = {}
    for m in re.finditer(r'cy="([\d.]+)" r="3" fill="#0072B2" data-step="(\d+)"', svg):
        first_circle.setdefault(int(m.group(2)), float(m.group(1)))
    for step, v in vals.items():
        assert (first_circle[step] > thr_y) == (v < 0.02), (step, v)
    assert svg.count('class="band"') >= 1  # CI band for the estimates with low/high
    for title in ("Replication rate", "Top-1 distance — pixel-32x32", "Denoising-loss gap", "Membership AUC"):
        assert 'class="marker onset"' in _chart(html, title)


def test_thumbnails_inline_small_shared_and_faithful(tmp_path):
    r = make_result(n_ckpt=2, onset_index=None)
    images = provider_for(r)
    html = render_audit_html(r, images=images, thumb_px=64)
    from PIL import Image

    uris = re.findall(r'href="data:image/(?:png|jpeg);base64,([^"]+)"', html)
    assert uris and len(uris) == len(set(uris))  # each distinct picture stored once
    for u in uris:
        assert max(Image.open(io.BytesIO(base64.b64decode(u))).size) <= 64
    thumbs = thumbnails(html)
    # a training thumbnail shows the provider's colour
    for m in r.checkpoints[0].metrics["pixel-32x32"].top_matches:
        tid = m.neighbor_ids[0]
        if tid == HOSTILE[1]:
            continue
        d = hashlib.sha256(tid.encode()).digest()
        px = thumbs["training image " + tid]
        assert np.abs(px.astype(int) - np.array(list(d[:3]))).max() <= 2, tid
    # the provider raised for one id: placeholder (with the id as text), no crash
    assert "training image " + HOSTILE[1] not in thumbs
    assert re.search(r'<span class="ph" role="img" aria-label="training image (&quot;|&#34;)onerror', html)
    # each (kind, key) is asked for once; identical pictures (all samples are grey) share one sprite
    assert len(images.calls) == len(set(images.calls))
    grey = {k for k, v in thumbs.items() if k.startswith("sample ")}
    assert grey and len(set(re.findall(r'aria-label="sample [^"]*"><title>[^<]*</title><use href="#(t\d+)"',
                                       html))) == 1


def test_provider_arrays_of_any_common_layout():
    r = make_result(n_ckpt=1, hostile=False, onset_index=None, n_matches=1)
    arrays = {"f01": np.full((3, 10, 12), 0.5, np.float32), "u16": np.full((9, 9), 40000, np.uint16),
              "rgba": np.zeros((6, 6, 4), np.uint8), "bad": np.zeros((2, 3, 5, 7)), "nan": np.full((4, 4), np.nan)}
    keys = list(arrays)
    m = r.checkpoints[0].metrics["pixel-32x32"].top_matches[0]
    m.neighbor_ids = keys[:2]
    r.checkpoints[0].metrics["sscd:plain2"].top_matches[0].neighbor_ids = keys[2:4]
    r.checkpoints[0].metrics["sscd:plain2"].top_matches[0].sample_path = "nan"
    html = render_audit_html(r, images=lambda kind, key: arrays.get(key))
    th = thumbnails(html)
    assert abs(int(th["training image f01"][0, 0, 0]) - 128) <= 1  # CHW float in [0, 1]
    assert th["training image f01"].shape[:2] == (10, 12)  # small pictures are not upscaled in the file
    assert abs(int(th["training image u16"][0, 0, 0]) - 40000 // 256) <= 1
    assert tuple(th["training image rgba"][0, 0]) == (255, 255, 255)  # transparent -> white
    assert "training image bad" not in th and 'aria-label="training image bad"' in html  # placeholder
    assert tuple(th["sample 0 at step 1000"][0, 0]) == (0, 0, 0)  # NaN -> 0, not a crash


def test_default_provider_reads_only_inside_the_output_folder(tmp_path):
    from PIL import Image

    out = tmp_path / "out"
    (out / "samples").mkdir(parents=True)
    Image.fromarray(solid((10, 200, 30))).save(out / "samples" / "ok.png")
    Image.fromarray(solid((250, 0, 0))).save(tmp_path / "secret.png")
    os.symlink(tmp_path / "secret.png", out / "samples" / "link.png")
    r = make_result(n_ckpt=1, hostile=False, onset_index=None, n_matches=4)
    paths = ["samples/ok.png", "../secret.png", str(tmp_path / "secret.png"), "samples/link.png"]
    for em in r.checkpoints[0].metrics.values():
        for m, p in zip(em.top_matches, paths):
            m.sample_path = p
    html = Path(render_audit(r, out / "report.html")).read_text(encoding="utf-8")
    # ok.png (stored once), nothing from outside; training images are placeholders
    assert len(re.findall(r'href="data:image', html)) == 1
    th = thumbnails(html)
    assert list(th) == ["sample 0 at step 1000"] and tuple(th["sample 0 at step 1000"][0, 0]) == (10, 200, 30)
    # a provider that only knows training images: samples still come from the folder
    html = render_audit_html(r, images=lambda kind, key: solid((1, 2, 3)) if kind == "train" else None, base_dir=out)
    th = thumbnails(html)
    assert tuple(th["sample 0 at step 1000"][0, 0]) == (10, 200, 30)
    assert tuple(th["training image " + r.checkpoints[0].metrics["pixel-32x32"].top_matches[0].neighbor_ids[0]][0, 0]) \
        == (1, 2, 3)
    assert html.count('aria-label="training image') > 0 and html.count('class="ph"') >= 3


def test_caps_keep_big_audits_small():
    r = make_result(n_ckpt=3, hostile=False, n_images=2500, n_matches=12, onset_index=1)
    html = render_audit_html(r, max_rows=2000)
    risk = re.search(r'<table class="data sortable" id="risk-table">.*?</table>', html, re.S).group(0)
    assert risk.count("<tr data-label=") == 2000
    assert "Showing the 2000 highest-risk of 2500 images" in html
    # highest risk first: copies never increase down the table
    copies = [int(v) for v in re.findall(r'<td class="n" data-v="(\d+)">[\d,]+</td><td class="n" data-v="\d*">',
                                         risk)]
    assert copies == sorted(copies, reverse=True) and copies[0] == 4
    # 12 matches each, 8 shown per checkpoint and embedder
    assert len(re.findall(r'class="match( copied)?"', html)) == 3 * 2 * 8
    assert "8 of 12 shown" in html


def test_hundred_checkpoints_stay_a_few_megabytes():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, size=(64, 8, 8, 3)).astype(np.uint8)

    def images(kind, key):  # smooth 128 px photos-like images, different for every key
        k = int(hashlib.md5(key.encode()).hexdigest()[:6], 16)
        im = base[k % 64].repeat(16, 0).repeat(16, 1).astype(np.float32)
        yy, xx = np.mgrid[:128, :128]
        im += 40 * np.sin((xx + k % 97) / 9.0)[..., None] + rng.normal(0, 4, im.shape)
        return np.clip(im, 0, 255).astype(np.uint8)

    r = make_result(n_ckpt=100, hostile=False, n_images=3000, n_matches=8, onset_index=50)
    for c in r.checkpoints:  # one embedder with galleries, distinct samples per checkpoint, repeating train ids
        c.metrics["sscd:plain2"].top_matches = []
        for j, m in enumerate(c.metrics["pixel-32x32"].top_matches):
            m.neighbor_ids = [f"t{(c.step // 1000 + j) % 60}", f"t{(c.step // 1000 + j + 5) % 60}"]
    t = time.perf_counter()
    html = render_audit_html(r, images=images)
    dt = time.perf_counter() - t
    mb = len(html.encode()) / 1e6
    assert mb < 5.0, mb
    assert dt < 20, dt
    # the gallery budget, with the key checkpoints (first, onset, recommended, last) in full
    assert len(re.findall(r'class="match( copied)?"', html)) <= 400 + 4 * 8


def test_risk_csv_guards_formula_injection(tmp_path):
    ids = ["=cmd|' /C calc'!A0", "+1+2", "-3", "@SUM(A1)", "\t=1", "\r=2", "plain, with \"quotes\"\nand newline",
           "<script>alert(1)</script>"]
    rows = [ImageRisk(i, copies=len(ids) - k, first_step_copied=100 if k % 2 else None, duplicates=k,
                      outlier_score=-0.5 if k == 2 else 1.25, label="=HYPERLINK(\"x\")" if k == 0 else "inlier",
                      copies_by_step={"-1": 2} if k == 3 else {}) for k, i in enumerate(ids)]
    p = write_risk_csv(rows, tmp_path / "risk.csv")
    with open(p, newline="", encoding="utf-8") as fh:
        got = list(csv.DictReader(fh))
    assert [g["id"] for g in got] == ["'" + i if i[0] in "=+-@\t\r" else i for i in ids]  # sorted by copies desc
    assert got[0]["label"] == "'=HYPERLINK(\"x\")" and got[1]["label"] == "inlier"
    assert got[2]["outlier_score"] == "-0.5"  # numbers stay numbers
    assert got[3]["copies_by_step"] == "'-1:2"
    assert [int(g["copies"]) for g in got] == list(range(len(ids), 0, -1))
    assert got[0]["first_step_copied"] == "" and got[1]["first_step_copied"] == "100"
    AuditResult([], OnsetInfo("s", 0.02, 2, 0.95), images=rows).to_csv(str(tmp_path / "r2.csv"))
    assert (tmp_path / "r2.csv").read_bytes() == Path(p).read_bytes()


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(TypeError, match="result"):
        render_audit_html({"checkpoints": []})
    with pytest.raises(TypeError, match="images"):
        render_audit_html(make_result(), images="folder")
    with pytest.raises(ValueError, match="thumb_px"):
        render_audit_html(make_result(), thumb_px=4)
    with pytest.raises(IsADirectoryError, match="path"):
        render_audit(make_result(), tmp_path)


def test_gallery_renderers_are_reexported_lazily():
    import diffaudit.report as rep

    if (ROOT / "diffaudit/report/gallery.py").exists():
        from diffaudit.report import gallery

        assert rep.render_duplicates is gallery.render_duplicates and rep.render_matches is gallery.render_matches
    else:
        with pytest.raises(ImportError, match="gallery"):
            rep.render_matches  # noqa: B018
    with pytest.raises(AttributeError):
        rep.no_such_name  # noqa: B018


# ---------------------------------------------------------------------------------------- real browser


def _browser():
    spec = importlib.util.spec_from_file_location("screenshot_report", ROOT / "benchmarks" / "screenshot_report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(not any(os.access(c, os.X_OK) for c in ("/usr/bin/chromium", "/usr/bin/chromium-browser")),
                    reason="headless browser check needs Debian's chromium (/usr/bin/chromium): "
                           "apt-get install chromium")
def test_report_in_headless_chromium(tmp_path):
    r = make_result(n_ckpt=6, n_images=60)
    path = render_audit(r, tmp_path / "report.html", images=provider_for(r))
    n_outlier = sum(1 for i in r.images if i.label == "outlier")
    js = [
        # sort by copies: first click descending for numbers, second ascending
        "(() => { const b = document.querySelector('#risk-table thead button[data-col=\"1\"]'); b.click();"
        " const a = [...document.querySelectorAll('#risk-table tbody tr')].map(r => +r.cells[1].dataset.v);"
        " b.click();"
        " const c = [...document.querySelectorAll('#risk-table tbody tr')].map(r => +r.cells[1].dataset.v);"
        " return [a, c, b.parentNode.getAttribute('aria-sort')]; })()",
        # sort by id (text), ascending on first click
        "(() => { document.querySelector('#risk-table thead button[data-col=\"0\"]').click();"
        " return [...document.querySelectorAll('#risk-table tbody tr')].map(r => r.cells[0].textContent); })()",
        # filter by label
        "(() => { const s = document.getElementById('risk-label'); s.value = 'outlier';"
        " s.dispatchEvent(new Event('change'));"
        " return [[...document.querySelectorAll('#risk-table tbody tr')].filter(r => !r.hidden).length,"
        " document.getElementById('risk-count').textContent]; })()",
        "document.querySelectorAll('details.ckpt[open]').length",
        "typeof window.alert === 'function' && document.querySelectorAll('script').length",
    ]
    got = _browser().inspect_report(path, tmp_path / "shot.png", evaluate=tuple(js))
    assert got["ready"] == "1"  # the report's script ran under its own CSP
    assert got["console_errors"] == []
    assert got["requests"] == []  # nothing but the file itself and data: URIs
    assert got["dialogs"] == []  # no alert() from the hostile strings
    (desc, asc, aria), ids, (shown, count), n_open, n_scripts = got["evaluated"]
    assert desc == sorted(desc, reverse=True) and asc == sorted(asc) and aria == "ascending"
    assert ids == sorted(ids, key=str.lower)
    assert shown == n_outlier and count == f"{n_outlier} of {len(r.images)} rows"
    assert n_open == 2  # onset and last checkpoints open
    assert n_scripts == 1
    assert (tmp_path / "shot.png").stat().st_size > 10_000
