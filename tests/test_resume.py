"""Issue 5, interrupted runs: an audit SIGKILLed in the middle of embedding, its rerun SIGKILLed in the middle of
sampling, and a final rerun that reuses everything finished and writes the same audit.json as an uninterrupted run;
two audits sharing one cache folder at once.

The children are real processes (``python -c`` calling ``audit()``, see ``_reltools.AUDIT_SCRIPT``); hooks only slow
them down (a sleep per embedded batch / per checkpoint) so that the kill, decided by watching files appear on disk,
lands inside the phase under test.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _reltools import CHILD_ENV, audit_cmd, child_stats, json_without_created, save_pngs  # noqa: E402
from conftest import digits_rgb  # noqa: E402

from diffaudit.cache import EmbeddingCache  # noqa: E402
from diffaudit.testing import write_tiny_run  # noqa: E402

N_TRAIN, N_SAMPLES, STEPS = 48, 8, (1, 2, 3)
EMBEDDER = "pixel-16x16"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("resume")
    run = write_tiny_run(root / "run", steps=STEPS, batch_size=4, ema=False, final_pipeline=False,
                         accelerate_state=False)
    torch.set_num_threads(n)
    train = save_pngs(root / "train", digits_rgb(N_TRAIN, 16, seed=9))
    return {"root": root, "run": run, "train": train}


def _kw(setup, cache: Path, out: Path) -> dict:
    return dict(checkpoints=str(setup["run"]), train=str(setup["train"]), num_samples=N_SAMPLES,
                num_inference_steps=20, seed=3, scheduler="ddpm", batch_size=8, embed_batch=4,
                cache_dir=str(cache), out_dir=str(out))


def _start(setup, cache, out, log: Path, **env) -> subprocess.Popen:
    e = {**CHILD_ENV, **{k: str(v) for k, v in env.items()}}
    return subprocess.Popen(audit_cmd(**_kw(setup, cache, out)), cwd=setup["root"], env=e,
                            stdout=open(log.with_suffix(".out"), "w"), stderr=open(log.with_suffix(".err"), "w"))


def _text(log: Path, suffix: str) -> str:
    return log.with_suffix(suffix).read_text(errors="replace")


def _kill_when(proc: subprocess.Popen, cond, log: Path, timeout: float = 300.0) -> None:
    """SIGKILL ``proc`` as soon as ``cond()`` holds (polled every 10 ms); fail if it exits first."""
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            pytest.fail(f"the child exited ({proc.returncode}) before the kill point:\n{_text(log, '.err')[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the kill point was never reached")
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(60) == -signal.SIGKILL


def _finish(proc: subprocess.Popen, log: Path, timeout: float = 300.0) -> dict:
    rc = proc.wait(timeout)
    assert rc == 0, _text(log, ".err")[-3000:]
    return child_stats(_text(log, ".out"))


def _shards(cache: Path) -> dict[str, int]:
    """Complete shard files of the embedder: name -> mtime_ns."""
    return {p.name: p.stat().st_mtime_ns for p in EmbeddingCache(cache).shards(EMBEDDER)}


def _shard_keys(cache: Path, names) -> set[str]:
    keys: set[str] = set()
    d = EmbeddingCache(cache).dir_for(EMBEDDER)
    for n in names:
        with np.load(d / n, allow_pickle=False) as z:
            keys.update(z["keys"].tolist())
    return keys


def _all_keys(setup) -> set[str]:
    from diffaudit.data import ImageSet

    return set(ImageSet.from_folder(setup["train"]).item_keys())


@pytest.fixture(scope="module")
def uninterrupted(setup):
    """Two uninterrupted audits started at the same instant on one fresh cache folder."""
    root = setup["root"]
    cache = root / "shared_cache"
    go = root / "go"
    procs = []
    for name in ("u1", "u2"):
        # each child waits for `go` after importing everything, so the two embed at the same time
        procs.append(_start(setup, cache, root / name, root / name, DA_FLUSH=8, DA_EMBED_DELAY=0.15,
                            DA_READY=root / f"{name}.ready", DA_GO=go))
    deadline = time.monotonic() + 300
    while not all((root / f"{n}.ready").exists() for n in ("u1", "u2")):
        assert all(p.poll() is None for p in procs) and time.monotonic() < deadline
        time.sleep(0.02)
    go.touch()
    stats = [_finish(p, root / n) for p, n in zip(procs, ("u1", "u2"))]
    return {"cache": cache, "outs": [root / "u1", root / "u2"], "stats": stats}


def test_two_audits_sharing_one_cache_at_once(setup, uninterrupted, caplog):
    a, b = (json_without_created(o / "audit.json") for o in uninterrupted["outs"])
    assert a == b  # identical results
    s1, s2 = uninterrupted["stats"]
    assert s1["embedded"] > 0 and s2["embedded"] > 0  # both wrote to the cache while the other did
    # nothing corrupt: every shard re-hashes to its name, every key present once, no temporary file left behind
    cache = EmbeddingCache(uninterrupted["cache"])
    with caplog.at_level("WARNING", logger="diffaudit.cache"):
        assert cache.count(EMBEDDER) == N_TRAIN
        found, vecs = cache.lookup(EMBEDDER, sorted(_all_keys(setup)))
    assert found.all() and np.isfinite(vecs).all()
    assert not [r for r in caplog.records if "ignoring" in r.getMessage()]
    assert not [p for p in cache.dir_for(EMBEDDER).iterdir() if p.name.endswith(".tmp")]


def test_sigkill_mid_embedding_then_mid_sampling_resumes(setup, uninterrupted):
    root = setup["root"]
    cache, out = root / "cache_k", root / "out_k"
    all_keys = _all_keys(setup)

    # 1. killed while embedding the training set: as soon as the first cache shard lands
    log1 = root / "k1"
    p1 = _start(setup, cache, out, log1, DA_FLUSH=8, DA_EMBED_DELAY=0.3)
    _kill_when(p1, lambda: bool(_shards(cache)), log1)
    shards1 = _shards(cache)
    keys1 = _shard_keys(cache, shards1)
    assert 0 < len(keys1) < N_TRAIN, len(keys1)  # part of the work was kept, part was not done
    assert not (out / "samples").exists()  # sampling had not started

    # 2. the rerun embeds only what is missing; killed once step 1's samples are complete, before the last step's
    log2 = root / "k2"
    p2 = _start(setup, cache, out, log2, DA_FLUSH=8, DA_SAMPLE_DELAY=1.0)
    manifest = out / "samples" / "step-{}" / "samples.json"
    _kill_when(p2, lambda: Path(str(manifest).format(1)).exists(), log2)
    assert not Path(str(manifest).format(STEPS[-1])).exists()
    shards2 = _shards(cache)
    assert all(shards2.get(n) == t for n, t in shards1.items())  # earlier shards untouched
    new_keys = _shard_keys(cache, set(shards2) - set(shards1))
    assert keys1.isdisjoint(new_keys) and keys1 | new_keys == all_keys  # nothing embedded twice, nothing lost
    step1 = {p.name: p.stat().st_mtime_ns for p in (out / "samples" / "step-1").iterdir()}
    assert len([n for n in step1 if n.endswith(".png")]) == N_SAMPLES

    # 3. the final rerun reuses the cache and the finished samples, and completes
    log3 = root / "k3"
    stats = _finish(_start(setup, cache, out, log3), log3)
    err = _text(log3, ".err")
    # every training vector came from the cache: the only images embedded are the generated samples (never cached)
    assert stats["embedded"] == N_SAMPLES * len(STEPS), stats
    assert f"{N_TRAIN}/{N_TRAIN} vectors from the cache" in err
    assert f"step 1: reusing {N_SAMPLES} saved samples" in err
    assert stats["sampled_checkpoints"] <= len(STEPS) - 1  # step 1 was not sampled again
    assert {p.name: p.stat().st_mtime_ns for p in (out / "samples" / "step-1").iterdir()} == step1
    assert _shards(cache) == shards2  # no new shard
    # ... and its audit.json is byte for byte the uninterrupted run's (timestamp aside)
    assert json_without_created(out / "audit.json") == json_without_created(uninterrupted["outs"][0] / "audit.json")
