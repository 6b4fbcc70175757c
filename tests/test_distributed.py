"""2-process DDP and FSDP2 (gloo, CPU) match the single-process run for the same seed and global batch.

Tolerance: 1e-4 absolute on losses and metrics. The processes see the same global batch (per-device batch halved,
the sampler interleaves examples across ranks with shuffling off); the loss is a mean over pairs, so its gradient
is the average of the ranks' gradients, as DDP/FSDP reduce it. What remains is float reordering in reductions.
"""

import pytest

from tests.distributed_runs import run_entry

TOL = 1e-4
DPO = ["--config", "experiments/dpo/tiny.yaml", "--trainer.max_steps=3", "--data.shuffle=false", "--data.num_val=8",
       "--validate_before_fit=false", "--export=false", "--trainer.val_check_interval=3"]


@pytest.fixture(scope="module")
def dpo_single(tmp_path_factory):
    return run_entry("dpo", tmp_path_factory.mktemp("single"), *DPO, "--data.batch_size=8")


def compare(a: dict, b: dict, keys: list[str]) -> None:
    for step in range(3):
        for key in keys:
            assert b["steps"][step][key] == pytest.approx(a["steps"][step][key], abs=TOL), (step, key)
    for key, value in a["end"].items():
        assert b["end"][key] == pytest.approx(value, abs=TOL), key


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_dpo_two_processes_match_one(dpo_single, tmp_path, strategy):
    multi = run_entry("dpo", tmp_path / strategy, *DPO, "--data.batch_size=4", "--trainer.devices=2", f"--trainer.strategy={strategy}")
    compare(dpo_single, multi, ["train/loss", "train/rewards/margins", "train/logps/chosen"])
