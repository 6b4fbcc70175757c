"""GRPO objective options under DDP (2 processes, gloo, CPU) against one process with the same global batch, as
tests/test_distributed.py does for each stage: ``loss=cispo`` (a token mean over the global batch) matches;
``advantage_estimator=reinforce_pp_baseline`` whitens over each rank's tokens (README, GRPO section), so its
advantages, hence its gradient, differ from one process's while the sampled batch (rewards) is the same."""

import pytest

from tests.distributed_runs import run_entry

ARGS = (
    "--config",
    "experiments/grpo/tiny.yaml",
    "--trainer.max_steps=1",
    "--trainer.val_check_interval=8",
    "--model.minibatch_size=4",
    "--model.table_every_n_steps=0",
    "--data.num_val=4",
    "--data.val_batch_size=2",
    "--validate_before_fit=false",
    "--export=false",
    "--trainer.enable_checkpointing=false",
    # rewards that vary within a group (the tiny model's 12 random tokens are 60-200 characters), so a gradient flows
    '--model.rewards=[{"name": "length_penalty", "weight": 1.0, "kwargs": {"max_length": 200, "buffer": 190}}]',
)
TOL = dict(abs=1e-4, rel=1e-4)


def _one_and_two(tmp_path, *options: str) -> tuple[dict, dict]:
    one = run_entry("grpo", tmp_path / "one", *ARGS, *options, "--data.batch_size=4")
    two = run_entry("grpo", tmp_path / "two", *ARGS, *options, "--data.batch_size=2", "--trainer.devices=2",
                    "--trainer.strategy=ddp")  # fmt: skip
    assert "MEMBER: 2/2" in two["log"]
    return one["steps"][0], two["steps"][0]


@pytest.mark.slow
def test_cispo_two_processes_match_one(tmp_path):
    one, two = _one_and_two(tmp_path, "--model.loss=cispo")
    assert one["train/rewards/std"] > 0 and one["train/grad_norm"] > 0  # a real update is compared
    for key in ("train/loss", "train/grad_norm", "train/kl", "train/rewards/mean", "train/clip_ratio/region"):
        assert two[key] == pytest.approx(one[key], **TOL), key


@pytest.mark.slow
def test_reinforce_pp_baseline_whitens_per_rank(tmp_path):
    one, two = _one_and_two(tmp_path, "--model.advantage_estimator=reinforce_pp_baseline")
    assert two["train/rewards/mean"] == pytest.approx(one["train/rewards/mean"], **TOL)  # the same completions
    assert one["train/rewards/std"] > 0 and one["train/grad_norm"] > 0
    assert abs(two["train/kl"] - one["train/kl"]) > 1e-3  # mu = 2: the second pass starts from other weights
    assert abs(two["train/grad_norm"] - one["train/grad_norm"]) > 1e-3  # per-rank whitening: other advantages
