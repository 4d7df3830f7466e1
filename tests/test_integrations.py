"""Integrations: the Lightning callback (tiny LightningModule on 8x8 digits, CPU) and the accelerate helper (a fake
accelerator). The memorizing model is the closed-form OptimalDenoiser, so onset is known to be at the first
evaluation; the model that cannot copy is a tiny UNet trained a few steps."""
from __future__ import annotations

import importlib
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import digits_rgb
from diffusers import DDPMScheduler

from diffaudit.monitor import MemorizationMonitor, OnsetRule
from diffaudit.testing import GaussianDenoiser, OptimalDenoiser, tiny_unet, to_model_space


@pytest.fixture(scope="module")
def train():
    return digits_rgb(16, side=8, seed=0)


@pytest.fixture(scope="module")
def sched():
    return DDPMScheduler(num_train_timesteps=1000)


def monitor(train, tmp_path, **kw):
    kw.setdefault("num_samples", 24)
    kw.setdefault("num_inference_steps", 4)
    kw.setdefault("output_dir", str(tmp_path))
    kw.setdefault("time_budget", None)  # these steps take microseconds: a budget would space evaluations out  # the final decision's JSON goes here, not into the cwd
    return MemorizationMonitor(train, cache_dir=str(tmp_path / "cache"), **kw)


# ---------------------------------------------------------------------------------------------------------------
# lazy imports


def test_integrations_import_nothing_heavy():
    code = ("import sys, diffaudit.integrations, diffaudit.integrations.accelerate; "
            "print(sorted(m for m in ('lightning', 'accelerate') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "[]"


def test_lightning_missing_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "lightning", None)  # import of lightning now fails
    monkeypatch.setitem(sys.modules, "lightning.pytorch", None)
    monkeypatch.delitem(sys.modules, "diffaudit.integrations.lightning", raising=False)
    with pytest.raises(ModuleNotFoundError, match=r'pip install "diffaudit\[lightning\]"'):
        importlib.import_module("diffaudit.integrations.lightning")
    monkeypatch.delitem(sys.modules, "diffaudit.integrations.lightning", raising=False)


# ---------------------------------------------------------------------------------------------------------------
# Lightning

L = pytest.importorskip("lightning.pytorch")


class TinyDDPM(L.LightningModule):
    """A tiny UNet DDPM on 8x8 digits. ``memorize``: the model evaluated is instead ``memorizer``, a closed-form
    model that copies its training set (the UNet is then left out of training, to keep the test fast)."""

    def __init__(self, train_u8, memorize: bool = False):
        super().__init__()
        self.noise_scheduler = DDPMScheduler(num_train_timesteps=1000)
        if memorize:
            self.memorizer = OptimalDenoiser(train_u8, self.noise_scheduler)
            self.w = torch.nn.Parameter(torch.zeros(3))
        else:
            self.unet = tiny_unet(8, 3, seed=0)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        if not hasattr(self, "unet"):
            return ((self.w - x.mean()) ** 2).sum()
        noise = torch.randn_like(x)
        t = torch.randint(0, 1000, (len(x),))
        pred = self.unet(self.noise_scheduler.add_noise(x, noise, t), t).sample
        return torch.nn.functional.mse_loss(pred, noise)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def loader(train_u8):
    x = torch.as_tensor(to_model_space(train_u8))
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=4, shuffle=False)


def trainer(callbacks, max_steps):
    return L.Trainer(max_steps=max_steps, callbacks=callbacks, logger=False, enable_progress_bar=False,
                     enable_checkpointing=False, enable_model_summary=False, accelerator="cpu", devices=1)


def test_lightning_callback_stops_at_onset(train, tmp_path):
    from diffaudit.integrations.lightning import MemorizationCallback

    mon = monitor(train, tmp_path, every_n_steps=2)
    cb = MemorizationCallback(mon, model_attr="memorizer")
    tr = trainer([cb], max_steps=40)
    tr.fit(TinyDDPM(train, memorize=True), loader(train))
    # onset at the first evaluation (step 2), confirmed by the second (patience 2): the run stops at step 4
    assert mon.onset_step == 2
    assert tr.should_stop and tr.global_step == 4 and cb.stopped_step == 4
    assert float(tr.callback_metrics["diffaudit/memorization_low"]) > 0.5
    assert float(tr.callback_metrics["diffaudit/onset"]) == 1.0
    decision = json.loads((tmp_path / "diffaudit-monitor.json").read_text())  # written at the end of fit
    assert decision["stopped"] and decision["onset_step"] == 2 and decision["ended_at_step"] == 4


def test_lightning_stock_early_stopping_can_monitor_the_metric(train, tmp_path):
    from lightning.pytorch.callbacks import EarlyStopping

    from diffaudit.integrations.lightning import MemorizationCallback

    # our own rule can never fire here (the lower bound of 24 samples cannot exceed 0.999) ...
    mon = monitor(train, tmp_path, every_n_steps=2, rule=OnsetRule(threshold=0.999, patience=1))
    es = EarlyStopping(monitor="diffaudit/memorization_low", mode="max", stopping_threshold=0.5, strict=False,
                       check_on_train_epoch_end=True)
    tr = trainer([MemorizationCallback(mon, model_attr="memorizer"), es], max_steps=40)
    tr.fit(TinyDDPM(train, memorize=True), loader(train))
    # ... so the stock callback stopped it, at the end of the first epoch (4 batches)
    assert mon.onset_step is None
    assert tr.should_stop and tr.global_step == 4


def test_lightning_real_unet_logs_and_checkpoint_resume_keeps_history(train, sched, tmp_path):
    from diffaudit.integrations.lightning import MemorizationCallback

    mon = monitor(train, tmp_path, every_n_steps=2)
    cb = MemorizationCallback(mon)  # model.unet + model.noise_scheduler
    tr = trainer([cb], max_steps=4)  # one epoch of 4 batches
    module = TinyDDPM(train)
    module.unet.train()
    tr.fit(module, loader(train))
    assert mon.evaluated_steps == [2, 4] and not tr.should_stop
    assert module.unet.training  # train mode restored after each evaluation
    for key in ("diffaudit/memorization_ratio", "diffaudit/memorization_low", "diffaudit/loss_train"):
        assert key in tr.callback_metrics
    ckpt = tmp_path / "run.ckpt"
    tr.save_checkpoint(ckpt)

    mon2 = monitor(train, tmp_path, every_n_steps=2)
    cb2 = MemorizationCallback(mon2)
    assert cb2.state_key == cb.state_key
    tr2 = trainer([cb2], max_steps=6)
    tr2.fit(TinyDDPM(train), loader(train), ckpt_path=str(ckpt))
    assert mon2.evaluated_steps == [2, 4, 6]  # history restored from the checkpoint, then continued
    assert [c.to_dict() for c in mon2.history[:2]] == [c.to_dict() for c in mon.history]


def test_lightning_non_zero_rank_stops_on_the_broadcast_decision(train, tmp_path):
    from diffaudit.integrations.lightning import MemorizationCallback

    mon = monitor(train, tmp_path, every_n_steps=5, lazy=True)

    def must_not_evaluate(*a, **k):
        raise AssertionError("only rank 0 evaluates")

    mon.update = must_not_evaluate
    mon.evaluate = must_not_evaluate
    broadcasts, logged = [], {}

    def broadcast(obj, src=0):
        broadcasts.append(obj)
        return True, {"diffaudit/memorization_low": 0.7}  # what rank 0 decided

    tr = SimpleNamespace(global_step=3, is_global_zero=False, should_stop=False,
                         strategy=SimpleNamespace(broadcast=broadcast), loggers=[])
    module = SimpleNamespace(unet=None, log=lambda k, v, **kw: logged.__setitem__(k, v))
    cb = MemorizationCallback(mon)
    cb.on_train_batch_end(tr, module, None, None, 0)
    assert broadcasts == [] and not tr.should_stop  # not an evaluation step: no collective call at all
    tr.global_step = 5
    cb.on_train_batch_end(tr, module, None, None, 0)
    cb.on_train_batch_end(tr, module, None, None, 1)  # same step again (gradient accumulation)
    assert broadcasts == [(False, {})]
    assert tr.should_stop and mon.stopped and logged == {"diffaudit/memorization_low": 0.7}


# ---------------------------------------------------------------------------------------------------------------
# accelerate


class Group:
    """The all-reduce behind set_trigger / check_trigger, shared by the fake processes."""

    def __init__(self):
        self.flag = False
        self.checks = 0


class FakeAccelerator:
    def __init__(self, group: Group, main: bool):
        self.group, self.is_main_process = group, main
        self.unwrapped = []

    def set_trigger(self):
        self.group.flag = True

    def check_trigger(self):
        self.group.checks += 1
        return self.group.flag

    def unwrap_model(self, model):
        self.unwrapped.append(model)
        return model.module

    def wait_for_everyone(self):
        pass


class Wrapped(torch.nn.Module):  # what accelerator.prepare returns (DDP-like: the model is .module)
    def __init__(self, module):
        super().__init__()
        self.module = module


class AlphaModel(torch.nn.Module):
    """Copies its training set when its weight ``alpha`` > 0.5 (the EMA weights), not otherwise (the raw ones)."""

    def __init__(self, train, sched):
        super().__init__()
        self.alpha = torch.nn.Parameter(torch.zeros(()))
        self.copy = OptimalDenoiser(train, sched)
        self.fresh = GaussianDenoiser.fit(train, sched)
        self.config = self.copy.config
        self.calls = 0

    def forward(self, x, t, *a, **kw):
        self.calls += 1
        return (self.copy if float(self.alpha) > 0.5 else self.fresh)(x, t)


def test_accelerate_check_after_save_agrees_across_processes(train, sched, tmp_path):
    from diffusers.training_utils import EMAModel

    from diffaudit.integrations.accelerate import check_after_save

    group = Group()
    main, worker = FakeAccelerator(group, True), FakeAccelerator(group, False)
    m_main, m_worker = monitor(train, tmp_path, every_n_steps=100), monitor(train, tmp_path, every_n_steps=100, lazy=True)
    net_main, net_worker = AlphaModel(train, sched), AlphaModel(train, sched)
    ema = EMAModel(net_main.parameters())
    ema.shadow_params[0].data.fill_(1.0)  # the EMA weights copy; the raw weights do not

    def step(s):
        a = check_after_save(main, m_main, s, Wrapped(net_main), sched, ema_model=ema)
        b = check_after_save(worker, m_worker, s, Wrapped(net_worker), sched)
        return a, b

    assert step(50) == (False, False) and group.checks == 0  # not a save step: no work, no communication
    assert step(100) == (False, False) and group.checks == 2
    assert step(200) == (True, True)  # onset at 100 confirmed at 200: both processes stop
    assert m_main.onset_step == 100 and m_worker.stopped
    assert net_worker.calls == 0 and m_worker.history == []  # only the main process evaluated
    assert net_main.alpha.item() == 0.0  # raw weights restored after evaluating the EMA weights
    assert main.unwrapped and not worker.unwrapped
    with pytest.raises(TypeError, match="check_trigger"):
        check_after_save(SimpleNamespace(is_main_process=True, set_trigger=lambda: None), m_main, 300, net_main)
