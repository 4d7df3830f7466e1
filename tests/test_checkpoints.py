"""Checkpoint discovery, ordering, EMA choice, scheduler resolution and safe weight loading."""
from __future__ import annotations

import hashlib
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from diffaudit.checkpoints import (
    CheckpointError,
    UnsafeCheckpointError,
    checkpoint_hash,
    discover_checkpoints,
    load_unet,
    parse_step,
)
from diffaudit.testing import tiny_unet, write_tiny_run


@pytest.fixture(scope="module")
def unet_template(tmp_path_factory):
    """Two tiny UNet folders (different weights) saved with save_pretrained; copied into fake runs."""
    root = tmp_path_factory.mktemp("tpl")
    tiny_unet(8, 3, seed=0).save_pretrained(root / "a")
    tiny_unet(8, 3, seed=1).save_pretrained(root / "b")
    return root


def _scheduler_dir(root: Path) -> None:
    from diffusers import DDPMScheduler

    DDPMScheduler(num_train_timesteps=1000).save_pretrained(root / "scheduler")


class Evil:
    """A pickle payload: unpickling it creates a marker file (stands in for arbitrary code)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_parse_step():
    assert parse_step("checkpoint-10000") == 10000
    assert parse_step("checkpoint_7") == 7
    assert parse_step("unet_ema-000300.safetensors") == 300
    assert parse_step("final") is None


def test_discovery_orders_steps_numerically(tmp_path, unet_template):
    for step in (10000, 500, 3000):
        shutil.copytree(unet_template / "a", tmp_path / f"checkpoint-{step}" / "unet")
    (tmp_path / "logs").mkdir()
    _scheduler_dir(tmp_path)
    run = discover_checkpoints(tmp_path)
    assert run.steps == [500, 3000, 10000]  # lexical order would be 10000, 3000, 500
    assert [c.name for c in run] == ["checkpoint-500", "checkpoint-3000", "checkpoint-10000"]
    assert all(c.kind == "unet-folder" and not c.ema and not c.final for c in run)
    assert run.scheduler_source.endswith("scheduler_config.json")
    assert type(run.scheduler).__name__ == "DDPMScheduler"


def test_ema_preference(tmp_path, unet_template):
    shutil.copytree(unet_template / "a", tmp_path / "checkpoint-100" / "unet")
    shutil.copytree(unet_template / "b", tmp_path / "checkpoint-100" / "unet_ema")
    shutil.copytree(unet_template / "a", tmp_path / "checkpoint-200" / "unet")  # no EMA copy here
    _scheduler_dir(tmp_path)

    prefer = discover_checkpoints(tmp_path)
    assert [(c.step, c.ema, Path(c.unet_path).name) for c in prefer] == [(100, True, "unet_ema"), (200, False, "unet")]
    never = discover_checkpoints(tmp_path, ema="never")
    assert [Path(c.unet_path).name for c in never] == ["unet", "unet"]
    only = discover_checkpoints(tmp_path, ema="only")
    assert only.steps == [100] and only[0].ema
    assert [Path(s.path).name for s in only.skipped] == ["checkpoint-200"]
    with pytest.raises(CheckpointError, match="ema='sometimes'"):
        discover_checkpoints(tmp_path, ema="sometimes")

    # the loaded EMA model holds exactly the unet_ema file's tensors (independent read with safetensors)
    model = load_unet(prefer[0], device="cpu")
    ref = load_file(str(tmp_path / "checkpoint-100" / "unet_ema" / "diffusion_pytorch_model.safetensors"))
    got = model.state_dict()
    assert set(got) == set(ref)
    assert all(torch.equal(got[k], ref[k].float()) for k in ref)


def test_tiny_training_run_layout_and_load(tmp_path):
    """write_tiny_run writes what diffusers' train_unconditional.py writes; it is discovered, ordered, loadable,
    and the accelerate pickles next to the weights are never opened."""
    run_dir = write_tiny_run(tmp_path / "run", steps=(1, 3), sample_size=8, batch_size=4,
                             images=np.random.default_rng(0).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8))
    assert (run_dir / "model_index.json").is_file() and (run_dir / "checkpoint-3" / "unet_ema" / "config.json").is_file()
    marker = tmp_path / "pwned"
    for ck in ("checkpoint-1", "checkpoint-3"):
        with open(run_dir / ck / "random_states_0.pkl", "wb") as fh:
            pickle.dump(Evil(str(marker)), fh)
    run = discover_checkpoints(run_dir)
    # the root pipeline holds the final EMA weights == checkpoint-3/unet_ema: listed once, not twice
    assert run.steps == [1, 3] and all(c.ema for c in run)
    assert run.scheduler_source == str(run_dir / "scheduler" / "scheduler_config.json")
    for c in run:
        m = run.load(c, device="cpu")
        assert type(m).__name__ == "UNet2DModel" and not m.training
    assert not marker.exists()
    files = run.checkpoint_files()
    for path, digest in files.items():
        assert digest == hashlib.sha256(Path(path).read_bytes()).hexdigest()
    assert checkpoint_hash(run[0]) == files[run[0].weights[0]]


def test_final_root_pipeline_is_last(tmp_path, unet_template):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    shutil.copytree(unet_template / "a", tmp_path / "checkpoint-500" / "unet")
    shutil.copytree(unet_template / "a", tmp_path / "checkpoint-1000" / "unet")
    final_unet = UNet2DModel.from_pretrained(unet_template / "b")
    DDPMPipeline(unet=final_unet, scheduler=DDPMScheduler()).save_pretrained(tmp_path)
    run = discover_checkpoints(tmp_path)
    assert [(c.step, c.name, c.final, c.kind) for c in run] == [
        (500, "checkpoint-500", False, "unet-folder"),
        (1000, "checkpoint-1000", False, "unet-folder"),
        (1001, "final", True, "pipeline"),
    ]
    assert discover_checkpoints(tmp_path, include_final=False).steps == [500, 1000]


def test_pipeline_folder_alone(tmp_path, unet_template):
    from diffusers import DDIMScheduler, DDPMPipeline, UNet2DModel

    DDPMPipeline(unet=UNet2DModel.from_pretrained(unet_template / "a"), scheduler=DDIMScheduler()).save_pretrained(
        tmp_path / "ddpm-64")
    run = discover_checkpoints(tmp_path / "ddpm-64")
    assert len(run) == 1 and run[0].kind == "pipeline" and run[0].step == 0
    assert type(run.scheduler).__name__ == "DDIMScheduler"
    assert type(load_unet(run[0], device="cpu")).__name__ == "UNet2DModel"


def test_lone_checkpoint_folder_uses_parent_scheduler(tmp_path, unet_template):
    shutil.copytree(unet_template / "a", tmp_path / "checkpoint-40" / "unet")
    _scheduler_dir(tmp_path)
    run = discover_checkpoints(tmp_path / "checkpoint-40")
    assert run.steps == [40] and run.scheduler is not None


def test_safetensors_files_with_config(tmp_path, unet_template):
    src = unet_template / "a" / "diffusion_pytorch_model.safetensors"
    for step in (10000, 500, 3000):
        shutil.copy(src, tmp_path / f"unet_step{step}.safetensors")
    with pytest.raises(CheckpointError, match="unet_config="):
        discover_checkpoints(tmp_path, scheduler="ddpm")
    run = discover_checkpoints(tmp_path, scheduler="ddpm", unet_config=unet_template / "a" / "config.json")
    assert run.steps == [500, 3000, 10000] and all(c.kind == "safetensors" for c in run)
    assert run.scheduler_source == "name:ddpm"
    m = load_unet(run[1], device="cpu")
    ref = load_file(str(src))
    assert all(torch.equal(m.state_dict()[k], ref[k]) for k in ref)
    # a dict config works too
    cfg = json.loads((unet_template / "a" / "config.json").read_text())
    run2 = discover_checkpoints(tmp_path, scheduler="ddpm", unet_config=cfg)
    assert run2.steps == [500, 3000, 10000]
    load_unet(run2[0], device="cpu")


def test_explicit_list(tmp_path, unet_template):
    for name in ("step_20", "step_3", "best", "latest"):
        shutil.copytree(unet_template / "a", tmp_path / name / "unet")
    _scheduler_dir(tmp_path)
    run = discover_checkpoints([tmp_path / "step_20", tmp_path / "step_3"])
    assert run.steps == [3, 20] and [c.name for c in run] == ["step_3", "step_20"]
    run = discover_checkpoints([tmp_path / "latest", tmp_path / "best"])  # no digits: list order
    assert run.steps == [0, 1] and [c.name for c in run] == ["latest", "best"]
    with pytest.raises(CheckpointError, match="no such file"):
        discover_checkpoints([tmp_path / "nope"])


def test_missing_scheduler_is_a_clear_error(tmp_path, unet_template):
    shutil.copytree(unet_template / "a", tmp_path / "checkpoint-5" / "unet")
    with pytest.raises(CheckpointError) as e:
        discover_checkpoints(tmp_path)
    msg = str(e.value)
    assert "scheduler=" in msg and "'ddpm'" in msg and "scheduler_config.json" in msg
    assert type(discover_checkpoints(tmp_path, scheduler="ddim").scheduler).__name__ == "DDIMScheduler"
    _scheduler_dir(tmp_path / "elsewhere")
    run = discover_checkpoints(tmp_path, scheduler=tmp_path / "elsewhere")
    assert run.scheduler_source.endswith("scheduler_config.json")
    with pytest.raises(CheckpointError, match="scheduler='nonsense'"):
        discover_checkpoints(tmp_path, scheduler="nonsense")


def test_empty_folder_error(tmp_path):
    with pytest.raises(CheckpointError, match="found no checkpoints"):
        discover_checkpoints(tmp_path)


@pytest.mark.parametrize("fmt", ["torch_save", "raw_pickle"])
def test_pickle_payload_refused_without_running_it(tmp_path, unet_template, fmt):
    marker = tmp_path / "payload_ran"
    bad = tmp_path / "checkpoint-1" / "unet"
    bad.mkdir(parents=True)
    shutil.copy(unet_template / "a" / "config.json", bad / "config.json")
    sd = load_file(str(unet_template / "a" / "diffusion_pytorch_model.safetensors"))
    sd["conv_in.weight"] = Evil(str(marker))
    if fmt == "torch_save":
        torch.save(sd, bad / "diffusion_pytorch_model.bin")
    else:
        with open(bad / "diffusion_pytorch_model.bin", "wb") as fh:
            pickle.dump(sd, fh)
    run = discover_checkpoints(tmp_path, scheduler="ddpm")
    with pytest.raises(UnsafeCheckpointError) as e:
        load_unet(run[0], device="cpu")
    assert not marker.exists()
    assert "refused" in str(e.value) and "diffusion_pytorch_model.bin" in str(e.value)
    # the payload is live: a plain unpickle does run it (so the refusal above is what protected us)
    probe = tmp_path / "probe.pkl"
    with open(probe, "wb") as fh:
        pickle.dump(Evil(str(marker)), fh)
    with open(probe, "rb") as fh:
        pickle.load(fh).close()
    assert marker.exists()


def test_tensor_only_bin_loads(tmp_path, unet_template):
    d = tmp_path / "m"
    d.mkdir()
    shutil.copy(unet_template / "a" / "config.json", d / "config.json")
    sd = load_file(str(unet_template / "a" / "diffusion_pytorch_model.safetensors"))
    torch.save(sd, d / "diffusion_pytorch_model.bin")
    m = load_unet(d, device="cpu")
    assert all(torch.equal(m.state_dict()[k], v) for k, v in sd.items())


def _bad_folder(tmp_path, unet_template, mutate) -> Path:
    d = tmp_path / "checkpoint-9" / "unet"
    d.mkdir(parents=True)
    shutil.copy(unet_template / "a" / "config.json", d / "config.json")
    sd = load_file(str(unet_template / "a" / "diffusion_pytorch_model.safetensors"))
    mutate(sd)
    save_file(sd, str(d / "diffusion_pytorch_model.safetensors"))
    return tmp_path


def test_wrong_shape_names_the_tensor(tmp_path, unet_template):
    def mutate(sd):
        sd["conv_in.weight"] = torch.zeros(7, 3, 3, 3)

    run = discover_checkpoints(_bad_folder(tmp_path, unet_template, mutate), scheduler="ddpm")
    with pytest.raises(CheckpointError) as e:
        load_unet(run[0], device="cpu")
    msg = str(e.value)
    assert "'conv_in.weight'" in msg and "(7, 3, 3, 3)" in msg and "(32, 3, 3, 3)" in msg


def test_wrong_dtype_names_the_tensor(tmp_path, unet_template):
    def mutate(sd):
        sd["conv_out.bias"] = torch.zeros(sd["conv_out.bias"].shape, dtype=torch.int32)

    run = discover_checkpoints(_bad_folder(tmp_path, unet_template, mutate), scheduler="ddpm")
    with pytest.raises(CheckpointError, match=r"'conv_out.bias' has dtype torch.int32"):
        load_unet(run[0], device="cpu")


def test_missing_tensor_reported(tmp_path, unet_template):
    run = discover_checkpoints(_bad_folder(tmp_path, unet_template, lambda sd: sd.pop("conv_out.weight")),
                               scheduler="ddpm")
    with pytest.raises(CheckpointError, match=r"missing \(e.g. 'conv_out.weight'\)"):
        load_unet(run[0], device="cpu")


def _fake_sd_base(root: Path) -> Path:
    """Only what discovery reads of a Stable Diffusion pipeline folder (nothing is loaded)."""
    root.mkdir(parents=True)
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "PNDMScheduler"],
    }))
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "PNDMScheduler", "num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
         "beta_start": 0.00085, "beta_end": 0.012}))
    return root


def test_text_to_image_lora_and_unet_checkpoints(tmp_path):
    base = _fake_sd_base(tmp_path / "sd-base")
    run_dir = tmp_path / "lora-run"
    for step in (1500, 500):
        (run_dir / f"checkpoint-{step}").mkdir(parents=True)
        save_file({"w": torch.zeros(2)}, str(run_dir / f"checkpoint-{step}" / "pytorch_lora_weights.safetensors"))
    save_file({"w": torch.ones(2)}, str(run_dir / "pytorch_lora_weights.safetensors"))  # final LoRA at the root
    with pytest.raises(CheckpointError, match="base_pipeline="):
        discover_checkpoints(run_dir)
    run = discover_checkpoints(run_dir, base_pipeline=base)
    assert [(c.step, c.kind, c.final) for c in run] == [(500, "lora", False), (1500, "lora", False), (1501, "lora", True)]
    assert run.base_pipeline == str(base) and run.conditional
    assert type(run.scheduler).__name__ == "PNDMScheduler"  # from the base pipeline

    # full fine-tune: UNet2DConditionModel folders per checkpoint
    ft = tmp_path / "ft-run" / "checkpoint-10" / "unet"
    ft.mkdir(parents=True)
    (ft / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    save_file({"w": torch.zeros(1)}, str(ft / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(CheckpointError, match="UNet2DConditionModel"):
        discover_checkpoints(tmp_path / "ft-run")
    run = discover_checkpoints(tmp_path / "ft-run", base_pipeline=base)
    assert run[0].conditional and run[0].kind == "unet-folder"
    with pytest.raises(CheckpointError, match="model_index.json"):
        discover_checkpoints(tmp_path / "ft-run", base_pipeline=tmp_path / "ft-run")
