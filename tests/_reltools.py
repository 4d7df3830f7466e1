"""Helpers shared by the reliability / security / resume tests (issue 5): CLI runner, report text, JSON without the
timestamp, a subprocess audit script with slow-down hooks (the kills in test_resume need a window to land in)."""
from __future__ import annotations

import json
import os
import re
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]

#: environment for child processes: one thread each (2-core machine), wide lines, no colour
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "COLUMNS": "250", "NO_COLOR": "1",
             "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def invoke(*args):
    """Run the CLI in-process; returns typer's Result (exit_code, output)."""
    from typer.testing import CliRunner

    from diffaudit.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


_BAR = re.compile(r"\d+/\d+ +(\d+:)?\d+:\d\d\s*$")  # a rich progress line: "... 3/8 0:00:01"
# a plain progress line (stderr not a terminal): "auditing checkpoints: started (2 items)", "...: 1/2 (50%) 0:00:03"
_LINE = re.compile(r": (started( \([\d,]+ items?\))?|[\d,]+(/[\d,]+ \(\d+%\))? \d+:\d\d:\d\d)$")


def error_lines(output: str) -> list[str]:
    """Output lines that are not progress bars or progress lines (the error message must be exactly one of them)."""
    return [ln for ln in output.splitlines()
            if ln.strip() and "━" not in ln and not _BAR.search(ln) and not _LINE.search(ln)]


class _Text(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.text: list[str] = []
        self.tags: list[tuple[str, dict]] = []
        self.scripts = 0

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self.scripts += tag == "script"

    def handle_data(self, data):
        self.text.append(data)


def html_page(path) -> _Text:
    p = _Text()
    p.feed(Path(path).read_text(encoding="utf-8"))
    p.close()
    return p


def html_text(path) -> str:
    """All text nodes of an HTML file (entities decoded), joined by newlines."""
    return "\n".join(html_page(path).text)


_CREATED = re.compile(rb'"created": *"[^"]*"')


def json_without_created(path) -> bytes:
    """The bytes of an audit.json with provenance.created blanked (the only field allowed to differ)."""
    raw = Path(path).read_bytes()
    assert len(_CREATED.findall(raw)) == 1, "expected exactly one provenance.created"
    return _CREATED.sub(b'"created": ""', raw)


def save_pngs(folder: Path, images: np.ndarray, prefix: str = "img") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, a in enumerate(images):
        Image.fromarray(a).save(folder / f"{prefix}_{i:03d}.png")
    return folder


# A child process calling audit(). argv[1]: JSON of audit() keyword arguments, plus "embed_batch" (pixel embedder
# batch size). Environment hooks only slow things down (the numbers are unchanged), so a kill can land mid-phase:
# DA_FLUSH (cache shard every N images), DA_EMBED_DELAY (s per embedded batch), DA_SAMPLE_DELAY (s per checkpoint);
# DA_READY / DA_GO: a start barrier (write READY, wait for GO).
AUDIT_SCRIPT = r"""
import json, logging, os, sys, time
import torch
torch.set_num_threads(1)
logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
import diffaudit.embedders as E
from diffaudit.embedders.pixel import PixelEmbedder
from diffaudit.sampling import CheckpointSampler
E.CACHE_FLUSH_EVERY = int(os.environ.get("DA_FLUSH", "2048"))
embed_delay = float(os.environ.get("DA_EMBED_DELAY", "0"))
sample_delay = float(os.environ.get("DA_SAMPLE_DELAY", "0"))
stats = {"embedded": 0, "sampled_checkpoints": 0}
real_embed, real_sample = PixelEmbedder.embed_batch, CheckpointSampler.sample
def embed_batch(self, images):
    time.sleep(embed_delay)
    stats["embedded"] += len(images)
    return real_embed(self, images)
def sample(self, model, *a, **kw):
    time.sleep(sample_delay)
    stats["sampled_checkpoints"] += 1
    return real_sample(self, model, *a, **kw)
PixelEmbedder.embed_batch = embed_batch
CheckpointSampler.sample = sample
from diffaudit.audit import audit
import diffaudit.checkpoints, diffaudit.data, diffusers  # imported before the start line below
if os.environ.get("DA_READY"):  # start barrier: say ready, wait for the go file (concurrent runs start together)
    open(os.environ["DA_READY"], "w").close()
    while not os.path.exists(os.environ["DA_GO"]):
        time.sleep(0.005)
kw = json.loads(sys.argv[1])
bs = kw.pop("embed_batch", 256)
audit(embedders=[PixelEmbedder(batch_size=bs)], **kw)
print("STATS " + json.dumps(stats), flush=True)
"""


def audit_cmd(**kw) -> list[str]:
    return [sys.executable, "-c", AUDIT_SCRIPT, json.dumps(kw)]


def child_stats(stdout: str) -> dict:
    for ln in stdout.splitlines():
        if ln.startswith("STATS "):
            return json.loads(ln[6:])
    raise AssertionError(f"no STATS line in child output:\n{stdout}")
