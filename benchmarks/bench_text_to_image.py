"""Text-to-image costs and the prompt score's detection power, on the tiny real Stable Diffusion pipeline of
diffaudit.testing (fp32, CPU unless CUDA is present).

Prints: audit seconds per checkpoint (sampling + embedding + text-conditional loss + prompt score), prompt-score
seconds per prompt (first step, one generation), and the score's AUC / TPR at 1% FPR (Wen et al.'s figures)
(a) on the memorizing-by-construction UNet (memorized captions vs. non-memorized training captions and unseen
prompts) and (b) on a tiny UNet fine-tuned for --steps steps on a few captioned digits with 10% caption dropout
(training captions vs. unseen captions of the same form), beside the copy rate the audit finds for (b). Baseline for the ratio: the same pipeline's plain
``pipe(prompts)`` sampling time in the same run.

    python benchmarks/bench_text_to_image.py [--steps 1500] [--prompts 16]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=1500, help="fine-tuning steps of the trained tiny model")
    ap.add_argument("--prompts", type=int, default=16, help="training captions (and as many unseen prompts)")
    args = ap.parse_args()
    from diffaudit.audit import audit
    from diffaudit.metrics import detection_auc, tpr_at_fpr
    from diffaudit.prompts import prompt_scores
    from diffaudit.testing import (_default_images, memorizing_sd_pipeline, tiny_sd_pipeline, train_tiny_vae,
                                   write_caption_folder, write_tiny_sd_run)

    n = int(args.prompts)
    imgs = _default_images(max(64, 3 * n), 16)
    caps = [f"digit {i}" for i in range(2 * n)]
    unseen = caps[n:2 * n]  # same template, never trained on (the held-out captions)
    print(f"machine: {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}; torch threads {torch.get_num_threads()}")
    vae = train_tiny_vae(imgs[:64])
    base = tiny_sd_pipeline(vae=vae)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_caption_folder(tmp / "train", imgs[:n], caps[:n])
        write_caption_folder(tmp / "held", imgs[n:2 * n], caps[n:2 * n])
        mem = memorizing_sd_pipeline(base, imgs[:n], caps[:n], memorize=caps[:n // 2])
        t = time.perf_counter()
        base(caps[:n], num_inference_steps=50, output_type="np")
        t_plain = time.perf_counter() - t
        t = time.perf_counter()
        r = audit([(1, base), (2, mem)], train=str(tmp / "train"), heldout=str(tmp / "held"), prompts=caps[:n],
                  num_samples=n, num_inference_steps=50, out_dir=tmp / "out")
        t_audit = (time.perf_counter() - t) / 2
        print(f"audit: {t_audit:.2f} s per checkpoint ({n} samples, 50 DDIM steps); plain pipe() sampling "
              f"{t_plain:.2f} s; ratio {t_audit / t_plain:.2f}")
        t = time.perf_counter()
        prompt_scores(base, caps[:n] + unseen)
        t_score = (time.perf_counter() - t) / (2 * n)
        print(f"prompt score: {1000 * t_score:.1f} ms per prompt (first step, one generation)")
        s = prompt_scores(mem, caps[:n] + unseen).mean(1)
        pos, neg = s[:n // 2], s[n // 2:]
        print(f"(a) memorizing UNet: AUC {detection_auc(pos, neg):.3f}, TPR@1%FPR {tpr_at_fpr(pos, neg):.3f} "
              f"({len(pos)} memorized vs {len(neg)} other prompts); audit's own labels at step 2: "
              f"AUC {r.checkpoints[-1].prompt_detection.auc}")
        t = time.perf_counter()
        run = write_tiny_sd_run(tmp / "run", base, imgs[:n], caps[:n], steps=(args.steps,), ema=False, lr=2e-3,
                                batch_size=min(8, n), caption_dropout=0.1)
        t_train = time.perf_counter() - t
        from diffaudit.checkpoints import load_pipeline

        trained = load_pipeline(run)
        s = prompt_scores(trained, caps[:n] + unseen, generations=2).mean(1)
        pos, neg = s[:n], s[n:]
        r2 = audit(str(run), train=str(tmp / "train"), heldout=str(tmp / "held"), num_samples=n,
                   num_inference_steps=50, out_dir=tmp / "out2")
        last = r2.checkpoints[-1]
        frac = next(iter(last.metrics.values())).memorization_ratio
        print(f"(b) tiny UNet fine-tuned {args.steps} steps ({t_train:.0f} s): AUC {detection_auc(pos, neg):.3f}, "
              f"TPR@1%FPR {tpr_at_fpr(pos, neg):.3f} (training captions vs unseen prompts); audit: "
              f"{100 * frac.value:.0f}% copies, membership AUC {last.membership_auc:.2f}, prompt-score AUC vs its "
              f"copies {last.prompt_detection.auc}")


if __name__ == "__main__":
    main()
