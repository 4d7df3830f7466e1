"""Issue 5, security: hostile checkpoints and configs through the CLI, and an inert HTML report for hostile file
names from a real audit, checked in headless Chromium with network logging."""
from __future__ import annotations

import importlib.util
import os
import pickle
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parent))
from _reltools import ROOT, error_lines, html_page, invoke, save_pngs  # noqa: E402
from conftest import digits_rgb  # noqa: E402

from diffaudit.testing import write_tiny_run  # noqa: E402

WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """Every test here runs with one torch thread (conftest.one_torch_thread)."""


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("sec")
    run = write_tiny_run(root / "run", steps=(1,), batch_size=4, ema=False, final_pipeline=False,
                         accelerate_state=False)
    train = save_pngs(root / "train", digits_rgb(8, 16, seed=2))
    return {"root": root, "run": run, "train": train}


def _copy_run(base, dest: Path) -> Path:
    shutil.copytree(base["run"], dest)
    return dest


def _audit(base, run, out, *extra):
    return invoke("audit", run, "--train", base["train"], "--scheduler", "ddpm", "--samples", 2,
                  "--inference-steps", 1, "--out", out, "--cache", base["root"] / "cache", *extra)


def _one_error(res, *needles) -> str:
    lines = error_lines(res.output)
    assert res.exit_code == 2 and len(lines) == 1, res.output
    assert lines[0].startswith("error: ") and "Traceback" not in res.output, res.output
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


class Payload:
    """Unpickling this creates a file: it stands in for arbitrary code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


# ---------------------------------------------------------------------------------------- hostile checkpoints


@pytest.mark.parametrize("disguise", ["bin", "safetensors_name"])
def test_pickle_payload_checkpoint_refused_by_the_cli(base, tmp_path, disguise):
    marker = tmp_path / "payload_ran"
    run = _copy_run(base, tmp_path / "run")
    unet = run / "checkpoint-1" / "unet"
    sd = load_file(str(unet / WEIGHTS))
    sd["conv_in.weight"] = Payload(str(marker))
    (unet / WEIGHTS).unlink()
    target = unet / ("diffusion_pytorch_model.bin" if disguise == "bin" else WEIGHTS)
    with open(target, "wb") as fh:
        pickle.dump(sd, fh)
    line = _one_error(_audit(base, run, tmp_path / "out"), target.name)
    assert not marker.exists()  # no code ran
    if disguise == "bin":
        assert "refused" in line
    assert not list((tmp_path / "out").glob("samples/step-1/*.png"))
    # the payload is live: a plain unpickle does run it (so the refusal is what protected us)
    with open(target, "rb") as fh:
        pickle.load(fh)
    assert marker.exists()


@pytest.mark.parametrize("case", ["shape", "dtype", "missing", "truncated"])
def test_bad_safetensors_named_by_the_cli(base, tmp_path, case):
    run = _copy_run(base, tmp_path / "run")
    path = run / "checkpoint-1" / "unet" / WEIGHTS
    sd = load_file(str(path))
    if case == "shape":
        sd["conv_in.weight"] = torch.zeros(7, 3, 3, 3)
        needles = ["'conv_in.weight'", "(7, 3, 3, 3)", "(32, 3, 3, 3)"]
    elif case == "dtype":
        sd["conv_out.bias"] = torch.zeros(sd["conv_out.bias"].shape, dtype=torch.int32)
        needles = ["'conv_out.bias'", "int32"]
    elif case == "missing":
        sd.pop("conv_out.weight")
        needles = ["'conv_out.weight'", "missing"]
    if case == "truncated":
        raw = path.read_bytes()
        path.write_bytes(raw[: len(raw) // 2])
        needles = [WEIGHTS]
    else:
        save_file(sd, str(path))
    _one_error(_audit(base, run, tmp_path / "out"), *needles)


# ------------------------------------------------------------------------------------------- hostile configs


@pytest.mark.parametrize("tag", [
    "!!python/object/apply:os.system ['touch {marker}']",
    "!!python/object/new:os.system ['touch {marker}']",
    "!!python/object/apply:builtins.open ['{marker}', 'w']",
    "!!python/name:os.system",
])
def test_yaml_python_tags_refused_with_one_line(base, tmp_path, tag):
    marker = tmp_path / "yaml_ran"
    cfg = tmp_path / "evil.yaml"
    cfg.write_text(f"num_samples: 4\nseed: {tag.format(marker=marker)}\n")
    line = _one_error(_audit(base, base["run"], tmp_path / "out", "--config", cfg), "evil.yaml", "not valid YAML")
    assert "python/" in line  # says which tag was refused
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_unknown_and_mistyped_config_keys_are_errors(base, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("num_samples: 4\nnum_infernce_steps: 3\n")
    _one_error(_audit(base, base["run"], tmp_path / "out", "--config", cfg), "num_infernce_steps", "allowed keys")
    cfg.write_text("num_samples: [1, 2]\n")
    _one_error(_audit(base, base["run"], tmp_path / "out", "--config", cfg), "num_samples", "wrong type")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ an inert report

# ids (POSIX relative paths: folders let a name carry "/") that try to break out of HTML text, attributes, the
# style sheet, the script, URLs, templates and spreadsheets
HOSTILE_IDS = [
    "<script>alert(1)</script>.png",
    'x" onerror="alert(2).png',
    "</style><b>3</b>.png",
    "javascript:alert(4).png",
    "<img src=x onerror=alert(5)>.png",
    "' onmouseover='alert(6)'.png",
    "{{7*7}}${7*7}.png",
    "=HYPERLINK(\"http:evil\").png",
    "<!-- ]]> <![CDATA[.png",
    "<a href=https:evil.example>x</a>.png",
]
HOSTILE_RUN = "run <svg onload=alert(8)>"


@pytest.fixture(scope="module")
def hostile_audit(base):
    root = base["root"] / "hostile"
    train = root / "train"
    images = digits_rgb(len(HOSTILE_IDS) + 2, 16, seed=4)
    from PIL import Image

    for i, name in enumerate(HOSTILE_IDS):
        p = train / name
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).save(p, format="PNG")
    save_pngs(train, images[len(HOSTILE_IDS):])
    (train / "<script>x</script>-empty.png").parent.mkdir(parents=True, exist_ok=True)
    (train / "<script>x</script>-empty.png").write_bytes(b"")  # skipped: its id is listed in the report
    run = shutil.copytree(base["run"], root / HOSTILE_RUN)
    out = root / "out"
    res = invoke("audit", run, "--train", train, "--scheduler", "ddpm", "--samples", 4, "--inference-steps", 2,
                 "--out", out, "--cache", base["root"] / "cache")
    assert res.exit_code == 0, res.output
    return out / "report.html"


def test_hostile_names_from_a_real_audit_are_text(hostile_audit):
    html = hostile_audit.read_text(encoding="utf-8")
    page = html_page(hostile_audit)
    text = "\n".join(page.text)
    for hid in HOSTILE_IDS + ["<script>x</script>-empty.png", HOSTILE_RUN]:
        assert hid in text, hid  # shown, as text
    assert page.scripts == 1 and html.count("<script") == 1 and html.count("</style>") == 1
    for tag, attrs in page.tags:
        assert tag not in ("iframe", "object", "embed", "base", "form", "link", "a") or tag == "a", tag
        for name, value in attrs.items():
            assert not name.startswith("on"), (tag, name, value)
            if name in ("src", "href"):
                assert value.startswith(("data:image/", "#")), (tag, name, value)
    for raw in ("<script>alert", "<img src=x", '" onerror="', "<svg onload", "</style><b>", "<b>3</b>",
                "<a href=https:evil"):
        assert raw not in html, raw
    metas = [a for t, a in page.tags if t == "meta" and a.get("http-equiv", "").lower() == "content-security-policy"]
    assert len(metas) == 1 and "default-src 'none'" in metas[0]["content"]


def _browser():
    spec = importlib.util.spec_from_file_location("screenshot_report", ROOT / "benchmarks" / "screenshot_report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


needs_chromium = pytest.mark.skipif(
    not any(os.access(c, os.X_OK) for c in ("/usr/bin/chromium", "/usr/bin/chromium-browser")),
    reason="needs Debian's chromium (/usr/bin/chromium): apt-get install chromium")


@needs_chromium
def test_report_from_a_real_audit_is_inert_in_chromium(hostile_audit, tmp_path):
    browser = _browser()
    got = browser.inspect_report(hostile_audit, evaluate=(
        "document.querySelectorAll('script').length",
        "[...document.querySelectorAll('*')].filter(e => [...e.attributes].some(a => a.name.startsWith('on'))).length",
        "document.body.innerText.includes('<script>alert(1)</script>.png')",
    ))
    assert got["ready"] == "1"  # opened from file:// and its own script ran under its CSP
    assert got["requests"] == [], got["requests"]  # no request but the file itself and data: URIs
    assert got["dialogs"] == [] and got["console_errors"] == [], got
    assert got["evaluated"] == [1, 0, True]
    # control: the same instrument does see requests, dialogs and CSP violations when a page makes them
    bad = tmp_path / "control.html"
    bad.write_text('<!doctype html><html><head><meta charset="utf-8"></head><body>'
                   '<img src="http://198.51.100.7/x.png"><script>alert("x")</script></body></html>')
    ctl = browser.inspect_report(bad, settle_s=0.5)
    assert any("198.51.100.7" in u for u in ctl["requests"]) and ctl["dialogs"] == ["x"], ctl
    csp = tmp_path / "control_csp.html"
    csp.write_text(hostile_audit.read_text(encoding="utf-8").replace(
        "</body>", '<img src="http://198.51.100.7/y.png"><script>alert("y")</script></body>'))
    ctl2 = browser.inspect_report(csp, settle_s=0.5)
    # the log counts attempts, even those the CSP then blocks; the report's own empty list means not even one
    assert ctl2["requests"] == ["http://198.51.100.7/y.png"] and ctl2["dialogs"] == [], ctl2  # the script was blocked
    blocked = [e for e in ctl2["console_errors"] if "Content Security Policy" in e and "blocked" in e]
    assert len(blocked) == 2 and "198.51.100.7" in blocked[0] and "inline script" in blocked[1], ctl2
