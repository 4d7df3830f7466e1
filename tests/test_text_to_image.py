"""Text-to-image audits on a tiny but real Stable Diffusion pipeline built in the test (tokenizer files written here,
a VAE trained on digits), with runs in the exact layouts of diffusers' train_text_to_image.py (full fine-tune, EMA)
and train_text_to_image_lora.py, audited through the CLI; a UNet that memorizes by construction; the prompt score."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("transformers")
pytest.importorskip("peft")

from _reltools import CHILD_ENV, error_lines, invoke  # noqa: E402
from diffaudit.testing import (  # noqa: E402
    _default_images,
    memorizing_sd_pipeline,
    tiny_sd_pipeline,
    train_tiny_vae,
    write_caption_folder,
    write_tiny_sd_run,
    write_tiny_tokenizer,
)

N_TRAIN = 12


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """A base pipeline (saved as a downloaded model would be), captioned train / held-out folders, a full fine-tune
    with EMA and a LoRA run whose files carry a custom name."""
    root = tmp_path_factory.mktemp("sd")
    imgs = _default_images(48, 16)
    vae = train_tiny_vae(imgs[:40])
    base = tiny_sd_pipeline(root / "base", vae=vae)
    caps = [f"digit {i}" for i in range(24)]
    write_caption_folder(root / "train", imgs[:N_TRAIN], caps[:N_TRAIN])
    write_caption_folder(root / "heldout", imgs[N_TRAIN:24], caps[N_TRAIN:24])
    write_tiny_sd_run(root / "full", base, imgs[:N_TRAIN], caps[:N_TRAIN], steps=(2, 4), ema=True)
    write_tiny_sd_run(root / "lora", base, imgs[:N_TRAIN], caps[:N_TRAIN], steps=(2, 4), lora=True,
                      lora_weight_name="my_style.safetensors")
    return {"root": root, "imgs": imgs, "caps": caps, "base": base}


def test_tokenizer_is_a_real_clip_tokenizer(tmp_path):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(write_tiny_tokenizer(tmp_path / "tok", max_length=24)))
    text = "A photo of Zürich, 42!"
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and max(ids) < len(tok)
    assert tok.decode(ids, skip_special_tokens=True).replace(" ", "") == text.lower().replace(" ", "")
    padded = tok([text, "x"], padding="max_length", max_length=24, truncation=True).input_ids
    assert all(len(p) == 24 for p in padded)


def test_layouts_are_the_diffusers_scripts(sd):
    root = sd["root"]
    for ck in ("checkpoint-2", "checkpoint-4"):
        for f in ("unet/config.json", "unet/diffusion_pytorch_model.safetensors", "unet_ema/config.json",
                  "optimizer.bin", "random_states_0.pkl"):
            assert (root / "full" / ck / f).is_file(), f
        assert (root / "lora" / ck / "my_style.safetensors").is_file()
        assert (root / "lora" / ck / "optimizer.bin").is_file()
    assert (root / "full" / "model_index.json").is_file() and (root / "lora" / "my_style.safetensors").is_file()


def test_full_finetune_audits_without_base_pipeline_and_quietly(sd, tmp_path):
    """No --base-pipeline, no --prompts: the run root is the base (only the components model_index.json names are
    opened, never optimizer.bin), the training captions are the prompts; the output holds no loader noise."""
    root = sd["root"]
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "diffaudit", "audit", str(root / "full"), "--train", str(root / "train"),
                           "--heldout", str(root / "heldout"), "-n", str(N_TRAIN), "--inference-steps", "4",
                           "-o", str(out)], capture_output=True, text=True, env=CHILD_ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = proc.stdout + proc.stderr
    for noise in ("torch_dtype", "Loading pipeline components", "Loading weights", "No LoRA keys", "Traceback"):
        assert noise not in text, noise
    res = json.loads((out / "audit.json").read_text())
    steps = [c["step"] for c in res["checkpoints"]]
    assert steps[:2] == [2, 4]
    last = res["checkpoints"][-1]
    # every caption sampled once, each with its prompt score and sample count
    assert sorted(p["prompt"] for p in last["prompts"]) == sorted(sd["caps"][:N_TRAIN])
    assert all(p["samples"] == 1 and p["score"] is not None and p["score"] > 0 for p in last["prompts"])
    # the text-conditional loss ran on the captioned train and held-out images
    assert last["loss_train"] is not None and last["loss_heldout"] is not None and last["membership_auc"] is not None
    match = last["metrics"]["pixel-16x16"]["top_matches"][0]
    assert match["prompt"] in sd["caps"][:N_TRAIN]
    html = (out / "report.html").read_text()
    assert match["prompt"] in html
    import csv

    with open(out / "images.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["id"]: r["caption"] for r in rows} == dict(zip((f"{i:04d}.png" for i in range(N_TRAIN)), sd["caps"]))


def test_lora_run_with_a_custom_file_name_matches_diffusers(sd, tmp_path):
    """A LoRA file named my_style.safetensors is found; the audit's sample equals a fresh base pipeline +
    load_lora_weights fed the same initial latents (within one grey level)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from diffaudit.sampling import initial_noise, sample_generators

    root = sd["root"]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("digit 3\ndigit 5\n")
    out = tmp_path / "out"
    r = invoke("audit", root / "lora", "--base-pipeline", root / "base", "--train", root / "train",
               "--prompts", prompts, "-n", 2, "--inference-steps", 3, "-o", out)
    assert r.exit_code == 0, r.output
    res = json.loads((out / "audit.json").read_text())
    assert [c["step"] for c in res["checkpoints"]][:2] == [2, 4]
    pipe = StableDiffusionPipeline.from_pretrained(str(root / "base"), local_files_only=True, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(root / "lora" / "checkpoint-4"), weight_name="my_style.safetensors")
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # the audit's default sampler
    lat = initial_noise(0, [0], (4, 8, 8), generators=sample_generators(0, [0]))
    ref = pipe(["digit 3"], latents=lat, num_inference_steps=3, guidance_scale=7.5, output_type="np").images[0]
    got = np.asarray(Image.open(out / "samples" / "step-4" / "sample_00000.png").convert("RGB")).astype(int)
    assert np.abs(got - np.round(ref * 255).astype(int)).max() <= 1


def test_ema_never_leaves_out_the_final_ema_model(sd):
    from diffaudit.checkpoints import discover_checkpoints

    run = discover_checkpoints(sd["root"] / "full", ema="never")
    assert [c.step for c in run] == [2, 4] and all(not c.ema for c in run)
    assert any("EMA" in s.reason for s in run.skipped)
    prefer = discover_checkpoints(sd["root"] / "full", ema="prefer")
    assert all(c.ema for c in prefer if not c.final)


def test_memorizing_model_is_flagged_and_its_prompts_score_highest(sd, tmp_path):
    """The closed-form UNet copies the training images of the memorized captions (and only those); the audit finds
    exactly those copies, the text-conditional loss separates members, and the prompt score ranks the memorized
    captions above every other prompt (AUC 1 against the audit's own copy labels)."""
    from diffaudit import audit

    imgs, caps, base = sd["imgs"], sd["caps"], sd["base"]
    memorized = caps[:N_TRAIN // 2]
    mem = memorizing_sd_pipeline(base, imgs[:N_TRAIN], caps[:N_TRAIN], memorize=memorized)
    r = audit([(1, base), (2, mem), (3, mem)], train=str(sd["root"] / "train"), heldout=str(sd["root"] / "heldout"),
              prompts=caps[:N_TRAIN], num_samples=N_TRAIN, num_inference_steps=10, out_dir=tmp_path / "out")
    last = r.checkpoints[-1]
    copied = {p.prompt for p in last.prompts if p.copies}
    assert copied == set(memorized)
    # independent check: each memorized caption's sample is closest (pixels) to its own training image
    for i, cap in enumerate(caps[:N_TRAIN]):
        s = np.asarray(Image.open(tmp_path / "out" / "samples" / "step-2" / f"sample_{i:05d}.png").convert("RGB"), float)
        d = np.sqrt(((imgs[:N_TRAIN].astype(float) - s[None]) ** 2).reshape(N_TRAIN, -1).sum(1))
        o = np.sort(d)
        assert (int(np.argmin(d)) == i and o[0] < o[1] / 3) == (cap in memorized)
    assert last.prompt_detection.auc == 1.0 and last.prompt_detection.tpr_at_1pct_fpr == 1.0
    assert r.checkpoints[0].prompt_detection.positives == 0
    assert last.membership_auc > 0.7 > r.checkpoints[0].membership_auc
    assert "Memoriz" in r.verdict or "memoriz" in r.verdict
    # copy -> onset on Stable Diffusion: confirmed at the first copying checkpoint (patience 2); keep the base
    assert r.onset.onset_step == 2 and r.onset.copying_step == 2 and r.onset.recommended_step == 1
    assert r.verdict.startswith("Memorization starts at step 2")


def test_prompt_score_ranks_memorized_above_unseen(sd):
    from diffaudit.prompts import prompt_scores

    imgs, caps, base = sd["imgs"], sd["caps"], sd["base"]
    mem = memorizing_sd_pipeline(base, imgs[:N_TRAIN], caps[:N_TRAIN], memorize=caps[:4])
    unseen = ["a cat", "a red car on a street", "the number nine", caps[20]]
    s = prompt_scores(mem, caps[:4] + unseen, generations=2, steps=2, num_inference_steps=10)
    assert s.shape == (8, 2) and np.isfinite(s).all()
    assert s[:4].min() > 3 * s[4:].max()
    # deterministic: the same noise per (prompt, generation), whatever the batch size
    assert np.allclose(s, prompt_scores(mem, caps[:4] + unseen, generations=2, steps=2, num_inference_steps=10,
                                        batch_size=3))


def test_cli_flags_of_a_sd_user(sd, tmp_path):
    root = sd["root"]
    out = tmp_path / "o1"
    r = invoke("audit", root / "full", "--train", root / "train", "-n", 4, "--seeds-per-prompt", 2,
               "--resolution", 24, "--guidance-scale", 3.0, "--inference-steps", 2, "--ema", "never", "-o", out)
    assert r.exit_code == 0, r.output
    res = json.loads((out / "audit.json").read_text())
    assert Image.open(out / "samples" / "step-2" / "sample_00000.png").size == (24, 24)
    sampler = res["provenance"]["sampler"]
    assert sampler["guidance_scale"] == 3.0 and sampler["seeds_per_prompt"] == 2
    assert [p["samples"] for p in res["checkpoints"][-1]["prompts"]] == [2, 2]
    assert any(f"2 of {N_TRAIN} prompts sampled" in w for w in res["warnings"])
    for args, word in ((["--dtype", "float16", "--device", "cpu"], "dtype"), (["--dtype", "float8"], "dtype"),
                       (["--caption-column", "nope"], "nope"), (["--resolution", "4"], "resolution")):
        r = invoke("audit", root / "full", "--train", root / "train", "-n", 2, "-o", tmp_path / "bad", *args)
        lines = error_lines(r.output)
        assert r.exit_code != 0 and len(lines) == 1 and word in lines[0] and "Traceback" not in r.output, r.output


def test_prompts_from_a_saved_dataset_with_a_caption_column(tmp_path):
    datasets = pytest.importorskip("datasets")
    from diffaudit.sampling import read_prompts

    datasets.Dataset.from_dict({"image_caption": ["one", "two"], "other": [1, 2]}).save_to_disk(str(tmp_path / "ds"))
    assert read_prompts(tmp_path / "ds", "image_caption") == ["one", "two"]
    with pytest.raises(ValueError, match="caption-column"):
        read_prompts(tmp_path / "ds")


def test_watch_a_lora_run(sd, tmp_path):
    root = sd["root"]
    prompts = tmp_path / "p.txt"
    prompts.write_text("digit 1\n")
    r = invoke("watch", root / "lora", "--train", root / "train", "--base-pipeline", root / "base", "--prompts",
               prompts, "-n", 2, "--inference-steps", 2, "--interval", 0.1, "--timeout", 0.5, "--settle", 0,
               "-o", tmp_path / "w")
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "w" / "audit.json").read_text())
    assert [c["step"] for c in res["checkpoints"]] == [2, 4]


def test_package_audit_is_callable_after_the_module_is_imported():
    import diffaudit as da
    import diffaudit.audit  # noqa: F401  binds the package attribute to the module

    with pytest.raises(ValueError, match="train"):
        da.audit("nowhere")  # reaches the function: argument validation, not "module is not callable"


def test_prompts_command_ranks_every_checkpoint(sd, tmp_path):
    """`diffaudit prompts` scores each checkpoint without training images; its numbers are the prompt_scores of that
    checkpoint loaded the way diffusers loads it (base + LoRA), ranked."""
    from diffusers import StableDiffusionPipeline

    from diffaudit.prompts import prompt_scores

    root = sd["root"]
    out = tmp_path / "pr"
    r = invoke("prompts", root / "lora", "--base-pipeline", root / "base", "--prompts", root / "train",
               "--inference-steps", 5, "--top", 2, "-o", out)
    assert r.exit_code == 0, r.output
    doc = json.loads((out / "prompts.json").read_text())
    assert [c["step"] for c in doc["checkpoints"]] == [2, 4]
    last = doc["checkpoints"][-1]["prompts"]
    assert [p["score"] for p in last] == sorted((p["score"] for p in last), reverse=True)
    assert sorted(p["prompt"] for p in last) == sorted(sd["caps"][:N_TRAIN])
    pipe = StableDiffusionPipeline.from_pretrained(str(root / "base"), local_files_only=True, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.load_lora_weights(str(root / "lora" / "checkpoint-4"), weight_name="my_style.safetensors")
    order = sd["caps"][:N_TRAIN]  # the noise of prompt i is the sample noise of index i: score the same list
    want = prompt_scores(pipe, order, num_inference_steps=5)[:, 0]
    assert last[0]["score"] == pytest.approx(want[order.index(last[0]["prompt"])], rel=1e-4)
    assert (out / "prompts.csv").read_text().splitlines()[0] == "step,final,rank,score,prompt"
    bad = invoke("prompts", root / "lora", "--base-pipeline", root / "base", "--prompts", root / "train",
                 "--score-steps", 9, "--inference-steps", 5, "-o", tmp_path / "bad")
    assert bad.exit_code != 0 and len(error_lines(bad.output)) == 1 and "--score-steps" in bad.output


def test_prompts_command_refuses_an_unconditional_run(tmp_path):
    from diffaudit.testing import write_tiny_run

    run = write_tiny_run(tmp_path / "run", steps=(1,))
    (tmp_path / "p.txt").write_text("x\n")
    r = invoke("prompts", run, "--prompts", tmp_path / "p.txt", "-o", tmp_path / "o")
    lines = error_lines(r.output)
    assert r.exit_code != 0 and len(lines) == 1 and "not a text-to-image run" in lines[0], r.output


def test_shipped_sd_config_audits_a_full_finetune(sd, tmp_path):
    from pathlib import Path

    cfg = Path(__file__).resolve().parents[1] / "configs" / "sd-text2img.yaml"
    root = sd["root"]
    r = invoke("audit", root / "full", "--train", root / "train", "--config", cfg, "-n", 4, "--inference-steps", 2,
               "-o", tmp_path / "o")
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "o" / "audit.json").read_text())
    assert res["provenance"]["sampler"]["seeds_per_prompt"] == 4


def test_watch_a_full_finetune_while_it_trains(sd, tmp_path):
    """During training the run root holds no pipeline yet (train_text_to_image.py saves it at the end): without
    --base-pipeline the watch stops at once with one line saying so (no retry loop); with it, it evaluates."""
    import shutil

    root = sd["root"]
    live = tmp_path / "live"
    live.mkdir()
    shutil.copytree(root / "full" / "checkpoint-2", live / "checkpoint-2")
    prompts = tmp_path / "p.txt"
    prompts.write_text("digit 1\n")
    common = ["--train", root / "train", "--prompts", prompts, "-n", 2, "--inference-steps", 2, "--interval", 0.1,
              "--timeout", 0.5, "--settle", 0]
    r = invoke("watch", live, *common, "-o", tmp_path / "w1")
    lines = error_lines(r.output)
    assert r.exit_code != 0 and any("--base-pipeline" in ln for ln in lines) and "Traceback" not in r.output, r.output
    r = invoke("watch", live, *common, "--base-pipeline", root / "base", "-o", tmp_path / "w2")
    assert r.exit_code == 0, r.output
    assert [c["step"] for c in json.loads((tmp_path / "w2" / "audit.json").read_text())["checkpoints"]] == [2]


def test_lone_checkpoint_and_a_folder_of_lora_files(sd, tmp_path):
    import shutil

    from diffaudit.checkpoints import discover_checkpoints

    root = sd["root"]
    lone = discover_checkpoints(root / "full" / "checkpoint-4")
    assert [c.step for c in lone] == [4] and lone.base_pipeline == str(root / "full")
    files = tmp_path / "loras"
    files.mkdir()
    for s in (2, 4):
        shutil.copy(root / "lora" / f"checkpoint-{s}" / "my_style.safetensors", files / f"style-step{s}.safetensors")
    run = discover_checkpoints(files, base_pipeline=root / "base")
    assert [(c.step, c.kind) for c in run] == [(2, "lora"), (4, "lora")]
