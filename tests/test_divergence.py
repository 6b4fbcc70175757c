"""Divergence guard: a non-finite loss or gradient norm stops the run at that step (or skips that step with
``--nan_policy=skip_step``), ``train/grad_norm`` is the pre-clip norm and ``train/lr`` the step's learning rate, and
no checkpoint or export is ever written from non-finite weights."""

import json
import math
import subprocess
import sys

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from lit_rlhf.callbacks import DivergenceError, DivergenceGuard, ExportCallback
from lit_rlhf.checkpointing import AtomicCheckpointIO, NonFiniteWeightsError
from lit_rlhf.optim import clip_and_step
from tests.distributed_runs import ROOT

X = [3.0, 4.0]  # loss = w . x, so the gradient is x and its norm is 5


class Dot(L.LightningModule):
    """loss = w . x per batch (gradient x); ``bad`` batches are multiplied by NaN (``loss``) or get an infinite
    gradient with a finite loss (``grad``)."""

    def __init__(self, batches: list[str], manual: bool = False, max_grad_norm: float | None = None):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(2))
        self.batches, self.max_grad_norm, self.kind = batches, max_grad_norm, "ok"
        self.automatic_optimization = not manual
        self.w.register_hook(lambda g: torch.full_like(g, math.inf) if self.kind == "grad" else g)

    def train_dataloader(self):
        return DataLoader([torch.tensor(X) * (i + 1) for i in range(len(self.batches))], batch_size=None)

    def training_step(self, x, i):
        self.kind = kind = self.batches[i]
        loss = (self.w * x).sum() * (math.nan if kind == "loss" else 1.0)
        if self.automatic_optimization:
            return loss
        self.manual_backward(loss)
        clip_and_step(self, self.optimizers(), self.max_grad_norm, count=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(model: Dot, policy: str = "stop", **trainer_kwargs) -> tuple[L.Trainer, DivergenceGuard]:
    guard = DivergenceGuard(policy)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=len(model.batches),
        logger=False,
        enable_checkpointing=False,
        callbacks=[guard],
        enable_progress_bar=False,
        enable_model_summary=False,
        **trainer_kwargs,
    )
    trainer.fit(model)
    return trainer, guard


@pytest.mark.parametrize("manual", [False, True])
@pytest.mark.parametrize("kind, what", [("loss", "the loss is nan"), ("grad", "the gradient norm is inf")])
def test_stops_before_the_step_naming_step_and_quantity(manual, kind, what):
    """Steps 0 and 1 are good (w = -0.1 (x + 2x) = [-0.9, -1.2] after them with SGD lr 0.1, no clipping); step 2 is
    bad: the run raises before its optimizer step, so the weights are those after step 1."""
    model = Dot(["ok", "ok", kind, "ok"], manual=manual)
    with pytest.raises(DivergenceError, match=f"training diverged at global step 2: {what}") as err:
        fit(model)
    assert "Last good checkpoint: none" in str(err.value) and "--nan_policy=skip_step" in str(err.value)
    assert model.w.detach().tolist() == pytest.approx([-0.9, -1.2])


@pytest.mark.parametrize("manual", [False, True])
def test_skip_step_skips_the_bad_batch_and_counts_it(manual):
    """The bad step changes nothing: the weights equal those of the run without that batch (plain SGD, so a skipped
    step leaves no trace); ``train/skipped_steps`` counts it."""
    model = Dot(["ok", "loss", "ok", "grad"], manual=manual)
    trainer, guard = fit(model, "skip_step")
    assert guard.skipped_steps == 2 and float(trainer.callback_metrics["train/skipped_steps"]) == 2.0
    assert trainer.global_step == 4
    # without the bad batches: batch 0 (x) and batch 2 (3x): w = -0.1 (x + 3x) = [-1.2, -1.6]
    assert model.w.detach().tolist() == pytest.approx([-1.2, -1.6])
    assert guard.state_dict() == {"skipped_steps": 2}, "kept in checkpoints: a resumed run counts on"


@pytest.mark.parametrize("manual", [False, True])
def test_grad_norm_is_the_pre_clip_norm_and_lr_is_logged(manual):
    """One step with |grad| = |x| = 5 clipped to 0.01 (by Lightning's ``gradient_clip_val`` or, under manual
    optimization, by :func:`lit_rlhf.optim.clip_and_step`): ``train/grad_norm`` is 5, not 0.01."""
    model = Dot(["ok"], manual=manual, max_grad_norm=0.01 if manual else None)
    trainer, _ = fit(model, gradient_clip_val=None if manual else 0.01)
    assert float(trainer.callback_metrics["train/grad_norm"]) == pytest.approx(5.0)
    assert float(trainer.callback_metrics["train/lr"]) == pytest.approx(0.1)
    assert model.w.detach().norm().item() == pytest.approx(0.1 * 0.01, rel=1e-4), "the step itself was clipped"


def test_checkpoint_io_refuses_non_finite_weights(tmp_path):
    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "state_dict": {"w": torch.ones(2)}}, path)
    with pytest.raises(NonFiniteWeightsError, match=r"not writing checkpoint .*last.ckpt: weight 'w' holds NaN or inf"):
        io.save_checkpoint({"global_step": 2, "state_dict": {"w": torch.tensor([1.0, math.nan])}}, path)
    assert torch.load(path, weights_only=True)["global_step"] == 1, "the last good checkpoint is kept"
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"], "no temporary left behind"


def test_export_refuses_non_finite_weights(tmp_path):
    class Exporting(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.tensor([1.0, math.inf]))
            self.exported = False

        def export(self, out_dir, dtype=None):
            self.exported = True
            return {}

    module = Exporting()
    trainer = L.Trainer(accelerator="cpu", default_root_dir=str(tmp_path), logger=False)
    with pytest.raises(NonFiniteWeightsError, match=r"not exporting to .*export: parameter 'w' holds NaN or inf"):
        ExportCallback().on_fit_end(trainer, module)
    assert not module.exported and not (tmp_path / "export").exists()


def _assert_no_non_finite_weights(out) -> int:
    """Every checkpoint and exported safetensors file under ``out`` holds finite weights; returns how many files."""
    from safetensors.torch import load_file

    files = 0
    for path in out.rglob("*.ckpt"):
        state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
        assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point()), path
        files += 1
    for path in out.rglob("*.safetensors"):
        assert all(torch.isfinite(t).all() for t in load_file(path).values() if t.is_floating_point()), path
        files += 1
    return files


def _run(stage: str, out, *args: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        f"lit_rlhf.experiments.{stage}",
        *args,
        "--wandb.mode=disabled",
        "--output_dir",
        str(out),
    ]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_dpo_with_a_huge_learning_rate_stops_at_the_first_nan(tmp_path):
    """lr = 1e15: step 0 (loss log 2) moves every weight by ~1e15, so the loss of step 1 is NaN; the run exits non-zero
    there, names the last good checkpoint (step=1.ckpt / last.ckpt, saved after step 0) and writes no export or final
    metrics; every checkpoint written holds finite weights."""
    out = tmp_path / "run"
    proc = _run(
        "dpo",
        out,
        "--config",
        "experiments/dpo/tiny.yaml",
        "--trainer.max_steps=4",
        "--model.optimizer.lr=1e15",
        "--checkpoint_every_n_steps=1",
        "--validate_before_fit=false",
    )
    assert proc.returncode != 0
    assert "DivergenceError: training diverged at global step 1: the loss is nan." in proc.stderr, proc.stderr[-3000:]
    assert f"Last good checkpoint: {out / 'checkpoints'}" in proc.stderr
    assert not (out / "export").exists() and not (out / "final_metrics.json").exists()
    assert _assert_no_non_finite_weights(out) >= 1
    steps = [int(p.stem.split("=")[1]) for p in (out / "checkpoints").glob("step=*.ckpt")]
    assert steps == [1], "nothing after the diverged step"


def _huge_reward_args(scale_rewards: str) -> list[str]:
    rewards = '[{"name": "length_penalty", "weight": 1.0e38, "kwargs": {"max_length": 400, "buffer": 399}}]'
    return [
        "--config",
        "experiments/grpo/tiny.yaml",
        "--trainer.max_steps=2",
        "--validate_before_fit=false",
        f"--model.rewards={rewards}",
        f"--model.scale_rewards={scale_rewards}",
        "--data.num_val=2",
        "--data.val_batch_size=2",
    ]


@pytest.mark.slow
def test_grpo_with_a_huge_reward_stops_at_the_first_non_finite_gradient(tmp_path):
    """GRPO (manual optimization, clipping itself): rewards of order 1e38 without group scaling give advantages of
    that order, so the gradient norm (before clipping) overflows at the first update: the run stops there with no
    file holding non-finite weights."""
    out = tmp_path / "run"
    proc = _run("grpo", out, *_huge_reward_args("none"))
    assert proc.returncode != 0
    assert "DivergenceError: training diverged at global step 0: the " in proc.stderr, proc.stderr[-3000:]
    assert "Last good checkpoint: none" in proc.stderr
    assert not (out / "export").exists() and not (out / "final_metrics.json").exists()
    _assert_no_non_finite_weights(out)
    metrics = json.dumps(sorted(p.name for p in out.rglob("*")))
    assert ".ckpt" not in metrics
