"""The README's accelerate snippet, pasted as written into a training loop built the way diffusers'
``train_unconditional.py`` is (epoch loop, batch loop, ``accelerator.sync_gradients``, ``checkpointing_steps``,
``save_state`` with pre-hooks writing ``unet``/``unet_ema``, EMA, the end-of-epoch pipeline save), run with
accelerate on CPU in a subprocess. Whatever the epoch length, the run must end at the step the monitor stops at,
every step up to it logged, no checkpoint or pipeline save after it, and the decision written to the output folder.

The model learns to memorize by construction: its prediction is ``w * optimal + (1 - w) * gaussian`` (the empirical
optimal denoiser of the training images and the denoiser of a diagonal Gaussian fitted to them), with ``w`` a
trained parameter. The MSE loss on the training images is lowest for the memorizer, so training drives ``w`` up
and the samples from Gaussian draws towards training-image copies.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from conftest import digits_rgb

ROOT = Path(__file__).resolve().parents[1]

REPLICA = '''
import json, os, sys
import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import DDPMScheduler
from diffusers.training_utils import EMAModel
from PIL import Image
from diffaudit.testing import DenoiserOutput, GaussianDenoiser, OptimalDenoiser
#<1>


class Mix(torch.nn.Module):
    def __init__(self, images, scheduler):
        super().__init__()
        self.opt = OptimalDenoiser(images, scheduler)
        self.gau = GaussianDenoiser.fit(images, scheduler, diagonal=True)
        self.logit = torch.nn.Parameter(torch.tensor(-3.0))
        self.config = self.opt.config

    def forward(self, sample, timestep, return_dict=True):
        w = torch.sigmoid(self.logit)
        out = w * self.opt(sample, timestep).sample + (1 - w) * self.gau(sample, timestep).sample
        return DenoiserOutput(sample=out)


def main(args):
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=args.gradient_accumulation_steps)
    files = sorted(os.listdir(args.train_data_dir))
    images = np.stack([np.asarray(Image.open(os.path.join(args.train_data_dir, f)).convert("RGB")) for f in files])
    accepts_prediction_type = True
    if accepts_prediction_type:
        noise_scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type="epsilon")
    else:
        noise_scheduler = DDPMScheduler(num_train_timesteps=1000)
    #<2>
    model = Mix(images, noise_scheduler)
    if args.use_ema:
        ema_model = EMAModel(model.parameters(), decay=0.5, use_ema_warmup=False)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.learning_rate)
    data = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    train_dataloader = torch.utils.data.DataLoader(data, batch_size=args.train_batch_size, shuffle=True,
                                                   generator=torch.Generator().manual_seed(0))
    model, optimizer, train_dataloader = accelerator.prepare(model, optimizer, train_dataloader)

    def save_model_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            if args.use_ema:
                os.makedirs(os.path.join(output_dir, "unet_ema"), exist_ok=True)
                torch.save(ema_model.state_dict(), os.path.join(output_dir, "unet_ema", "ema.pt"))
            for i, m in enumerate(models):
                os.makedirs(os.path.join(output_dir, "unet"), exist_ok=True)
                torch.save(m.state_dict(), os.path.join(output_dir, "unet", "weights.pt"))
                weights.pop()

    accelerator.register_save_state_pre_hook(save_model_hook)
    logged, saved_pipelines = [], []
    global_step = 0
    torch.manual_seed(0)
    for epoch in range(args.num_epochs):
        model.train()
        for step, batch in enumerate(train_dataloader):
            clean_images = batch
            noise = torch.randn(clean_images.shape)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (clean_images.shape[0],)).long()
            noisy_images = noise_scheduler.add_noise(clean_images, noise, timesteps)
            with accelerator.accumulate(model):
                model_output = model(noisy_images, timesteps).sample
                loss = F.mse_loss(model_output.float(), noise.float())
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                if args.use_ema:
                    ema_model.step(model.parameters())
                global_step += 1
                if accelerator.is_main_process:
                    if global_step % args.checkpointing_steps == 0:
                        save_path = os.path.join(args.output_dir, f"checkpoint-{global_step}")
                        accelerator.save_state(save_path)
                #<3>
            logs = {"loss": loss.detach().item(), "step": global_step}
            logged.append(global_step)
            accelerator.log(logs, step=global_step)
            #<4>
        #<5>
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            if epoch % args.save_model_epochs == 0 or epoch == args.num_epochs - 1:
                unet = accelerator.unwrap_model(model)
                if args.use_ema:
                    ema_model.store(unet.parameters())
                    ema_model.copy_to(unet.parameters())
                torch.save(unet.state_dict(), os.path.join(args.output_dir, "pipeline.pt"))
                saved_pipelines.append(global_step)
                if args.use_ema:
                    ema_model.restore(unet.parameters())
    #<6>
    accelerator.end_training()
    with open(os.path.join(args.output_dir, "replica-log.json"), "w") as fh:
        json.dump({"logged": logged, "saved_pipelines": saved_pipelines, "global_step": global_step,
                   "logit": float(accelerator.unwrap_model(model).logit)}, fh)


class Args:
    pass


if __name__ == "__main__":
    args = Args()
    cfg = json.loads(sys.argv[1])
    for k, v in cfg.items():
        setattr(args, k, v)
    main(args)
'''


def readme_snippet() -> dict[int, list[str]]:
    """The README's accelerate snippet: {slot: lines as written (indentation included)}."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("<!-- diffaudit:accelerate-snippet -->")
    block = text[start:].split("```python\n", 1)[1].split("```", 1)[0]
    slots: dict[int, list[str]] = {}
    cur = None
    for line in block.splitlines():
        m = re.match(r"# \((\d)\)", line)
        if m:
            cur = int(m.group(1))
            slots[cur] = []
        elif line.strip() and not line.lstrip().startswith("#") and cur is not None:
            slots[cur].append(line)
    return slots


def build_script(tmp: Path) -> Path:
    slots = readme_snippet()
    assert sorted(slots) == [1, 2, 3, 4, 5, 6]
    out = []
    for line in REPLICA.splitlines():
        m = re.match(r"^(\s*)#<(\d)>$", line)
        if not m:
            out.append(line)
            continue
        indent, slot = m.group(1), int(m.group(2))
        for ins in slots[slot]:
            got = len(ins) - len(ins.lstrip())
            assert got == len(indent), f"README slot ({slot}): indentation {got}, the script's place has {len(indent)}"
            out.append(ins)
    script = tmp / "train_replica.py"
    script.write_text("\n".join(out) + "\n")
    return script


@pytest.fixture(scope="module")
def train_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("digits")
    for i, im in enumerate(digits_rgb(16, 8)):
        Image.fromarray(im).save(d / f"{i:02d}.png")
    return d


@pytest.mark.parametrize("case", [
    {"train_batch_size": 16, "gradient_accumulation_steps": 1, "num_epochs": 400},  # one step per epoch
    {"train_batch_size": 2, "gradient_accumulation_steps": 2, "num_epochs": 100},   # 4 steps per epoch, accumulation
])
def test_readme_snippet_stops_the_script_at_onset(tmp_path, train_dir, case):
    script = build_script(tmp_path)
    out = tmp_path / "run"
    out.mkdir()
    cfg = {"train_data_dir": str(train_dir), "output_dir": str(out), "checkpointing_steps": 10,
           "learning_rate": 0.2, "use_ema": True, "save_model_epochs": 1, **case}
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1",
           # these steps take milliseconds: under the default budget the evaluations would be spaced out by wall
           # time, and the stop step would depend on the machine's load (tests/test_training_path.py tests it)
           "DIFFAUDIT_TIME_BUDGET": "none"}
    r = subprocess.run([sys.executable, str(script), json.dumps(cfg)], capture_output=True, text=True, env=env,
                       timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    log = json.loads((out / "replica-log.json").read_text())
    decision = json.loads((out / "diffaudit-monitor.json").read_text())
    steps_per_epoch = 16 // case["train_batch_size"] // case["gradient_accumulation_steps"]
    max_steps = case["num_epochs"] * steps_per_epoch
    stop = log["global_step"]
    # the monitor stopped the run, at an evaluated checkpoint, long before --num_epochs would have
    assert decision["stopped"] and decision["level"] == "copies" and stop < max_steps // 2, (decision, stop)
    assert decision["ended_at_step"] == stop and stop in decision["evaluated_steps"]
    assert decision["onset_step"] <= stop and stop % 10 == 0
    # every step up to the stop is logged (the last one too), none after it
    # (with gradient accumulation the first micro-batches log step 0, as in the script)
    assert log["logged"][-1] == stop and sorted(set(log["logged"]) - {0}) == list(range(1, stop + 1))
    # no checkpoint and no pipeline save after the stop
    ckpts = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert ckpts[-1] == stop and all(s <= stop for s in log["saved_pipelines"])
    assert all(s < stop for s in log["saved_pipelines"]) or not log["saved_pipelines"]
    # the kept checkpoint precedes the onset and its EMA weights are on disk
    keep = decision["keep_step"]
    assert keep is not None and keep < decision["onset_step"]
    assert decision["keep_weights"] == str(out / f"checkpoint-{keep}" / "unet_ema")
    assert "diffaudit: stopped at memorization onset" in r.stderr and f"keep step {keep}" in r.stderr
    assert log["logit"] > -3.0  # training did push the model towards the memorizer
    print(json.dumps({k: decision[k] for k in ("onset_step", "keep_step", "ended_at_step", "evaluated_steps",
                                               "cost_fraction", "num_samples", "adaptations")}))


def test_readme_snippet_indentation_matches_the_script_structure():
    slots = readme_snippet()
    assert slots[1][0].startswith("from diffaudit") and not slots[1][0].startswith(" ")
    assert slots[2][0].startswith("    monitor = MemorizationMonitor(")
    assert slots[3][0].startswith(" " * 16 + "check_after_save(") and "ema_model if args.use_ema else None" in \
        slots[3][0]
    assert slots[6][0].startswith("    finish_training(")
