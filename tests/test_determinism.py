"""CPU runs are deterministic by default (``trainer.deterministic``), which exact resume relies on."""

import hashlib

import pytest
import torch

from lit_rlhf.cli import RLHFCLI
from lit_rlhf.data.prompts import PromptDataModule
from lit_rlhf.hardware import runs_on_cpu
from lit_rlhf.stages.grpo import GRPOModule


@pytest.fixture
def restore_deterministic_mode():
    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(before)


def _gathered_backward_digests(repeats: int) -> set[str]:
    """Digests of the gradient of ``x[index, -1]`` with repeated indices (a prompt's logits or KV cache gathered to its
    completions), over ``repeats`` identical backward passes."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 1, 49152, generator=g)
    index = torch.arange(3).repeat_interleave(4)
    grad_out = torch.randn(12, 49152, generator=g)
    seen = set()
    for _ in range(repeats):
        x = x0.clone().requires_grad_()
        x[index, -1].backward(grad_out)
        seen.add(hashlib.sha1(x.grad.numpy().tobytes()).hexdigest())
    return seen


def test_gather_backward_is_bit_identical_in_deterministic_mode(restore_deterministic_mode):
    """The op behind the drift: CPU ``index_put_(accumulate=True)``. In deterministic mode 100 passes agree bit for bit
    (without it and 2 threads, two different results appeared within 200 passes here) and equal the exact sum."""
    torch.use_deterministic_algorithms(True)
    assert len(_gathered_backward_digests(100)) == 1
    x = torch.zeros(3, 1, 49152, requires_grad=True)
    grad_out = torch.randn(12, 49152, generator=torch.Generator().manual_seed(0))
    x[torch.arange(3).repeat_interleave(4), -1].backward(grad_out)
    expected = grad_out.double().view(3, 4, -1).sum(1)
    torch.testing.assert_close(x.grad[:, -1].double(), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("flag", "expected"), [([], True), (["--trainer.deterministic=false"], False)])
def test_cli_makes_cpu_runs_deterministic_unless_told_otherwise(tmp_path, restore_deterministic_mode, flag, expected):
    torch.use_deterministic_algorithms(not expected)
    args = ["--config", "experiments/grpo/tiny.yaml", "--output_dir", str(tmp_path), "--wandb.mode=disabled", *flag]
    RLHFCLI(GRPOModule, PromptDataModule, "grpo", {}, args=args)
    assert torch.are_deterministic_algorithms_enabled() is expected


def test_runs_on_cpu():
    from lightning.pytorch.accelerators import CPUAccelerator

    assert runs_on_cpu("cpu") and runs_on_cpu(CPUAccelerator())
    assert not runs_on_cpu("gpu") and not runs_on_cpu("cuda")
    assert runs_on_cpu("auto") == (not torch.cuda.is_available() and not torch.backends.mps.is_available())
