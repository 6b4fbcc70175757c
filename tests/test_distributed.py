"""Every stage, 2 processes (gloo, CPU) with DDP and with FSDP2, matches the single-process run of the same seed and
global batch: per-step training metrics and the final held-out metrics.

Why they can match: the data loaders give step k the same global batch for 1 or W processes (one seeded permutation,
rank r takes every W-th example; the per-device batch is halved); every loss is normalised over the global batch
(pairs, sequences or tokens of all ranks), so the average of the ranks' gradients, which DDP all-reduces and FSDP2
reduce-scatters, is the single-process gradient; logged training metrics are the mean over ranks of equal shares.
GRPO and PPO sample their completions with noise drawn for the global batch (lit_rlhf.distributed.GlobalBatchNoise),
so rank r samples exactly what one process samples for the same prompts; under FSDP2 the ranks' decode loops run
in lockstep (every forward is collective) and SFT's greedy validation decodes with ``synced_gpus``.

Tolerance: 1e-4 absolute plus 1e-4 relative. What differs is the order of float32 reductions (the all-reduce sums
two half-batch gradients; FSDP2 gathers and reduce-scatters flat shards), ~1e-7 relative per step, growing over 2-4
Adam steps (Adam divides by sqrt(v), amplifying tiny gradient differences near zero) to ~1e-6. Sampled tokens are
discrete: a flip would change a metric by far more than 1e-4, so the tolerance does not hide a different sample.
"""

from dataclasses import dataclass

import pytest

from tests.distributed_runs import run_entry


@dataclass(frozen=True)
class Case:
    args: tuple[str, ...]
    per_device: tuple[tuple[str, int], ...]  # (flag, single-process value); two processes get value / 2 each
    steps: tuple[int, ...]  # CSV steps whose metrics are compared
    keys: tuple[str, ...]  # per-step training metrics compared


COMMON = ("--validate_before_fit=false", "--export=false")
CASES = {
    "sft": Case(("--config", "experiments/sft/tiny.yaml", "--trainer.max_steps=3", "--trainer.val_check_interval=16",
                 "--data.num_val=8", "--data.eval_prompts=4", *COMMON), (("--data.batch_size", 4),), (0, 1, 2),
                ("train/loss", "train/token_accuracy")),
    "rm": Case(("--config", "experiments/rm/tiny.yaml", "--trainer.max_steps=3", "--trainer.val_check_interval=16",
                "--data.num_val=8", *COMMON), (("--data.batch_size", 4),), (0, 1, 2),
               ("train/loss", "train/rewards/margins", "train/rewards/chosen")),
    "dpo": Case(("--config", "experiments/dpo/tiny.yaml", "--trainer.max_steps=3", "--data.shuffle=false", "--data.num_val=8",
                 "--trainer.val_check_interval=3", *COMMON), (("--data.batch_size", 8),), (0, 1, 2),
                ("train/loss", "train/rewards/margins", "train/logps/chosen")),
    # mu = 2: 2 GRPO steps are 4 optimizer steps, logged at CSV steps 0, 1; minibatches of 4 completions on both layouts
    "grpo": Case(("--config", "experiments/grpo/tiny.yaml", "--trainer.max_steps=4", "--trainer.val_check_interval=8",
                  "--model.minibatch_size=4", "--model.table_every_n_steps=0", "--data.num_val=4", "--data.val_batch_size=2",
                  *COMMON), (("--data.batch_size", 4),), (0, 1),
                 ("train/loss", "train/kl", "train/rewards/mean", "train/completions/mean_length", "train/entropy")),
    # a rank's PPO minibatch is its whole batch (smaller ones are shuffled per rank: see lit_rlhf/stages/ppo.py)
    "ppo": Case(("--config", "experiments/ppo/tiny.yaml", "--trainer.max_steps=2", "--trainer.val_check_interval=4", *COMMON),
                (("--data.batch_size", 4), ("--model.minibatch_size", 4), ("--data.val_batch_size", 4)), (0, 1),
                ("train/loss/policy", "train/loss/value", "train/objective/kl", "train/score/mean", "train/response_length")),
}
TOL = dict(abs=1e-4, rel=1e-4)

_single: dict[str, dict] = {}


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One single-process baseline per stage, shared by the DDP and FSDP2 tests of this module."""

    def get(stage: str) -> dict:
        if stage not in _single:
            case = CASES[stage]
            flags = [f"{flag}={value}" for flag, value in case.per_device]
            _single[stage] = run_entry(stage, tmp_path_factory.mktemp(f"{stage}-single"), *case.args, *flags)
        return _single[stage]

    return get


def compare(stage: str, a: dict, b: dict) -> None:
    case = CASES[stage]
    assert a["global_step"] == b["global_step"]
    for step in case.steps:
        for key in case.keys:
            assert b["steps"][step][key] == pytest.approx(a["steps"][step][key], **TOL), (step, key)
    assert a["end"] and set(a["end"]) == set(b["end"])
    for key, value in a["end"].items():
        assert b["end"][key] == pytest.approx(value, **TOL), key


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
@pytest.mark.parametrize("stage", list(CASES))
def test_two_processes_match_one(single, tmp_path, stage, strategy):
    case = CASES[stage]
    out = tmp_path / strategy
    flags = [f"{flag}={value // 2}" for flag, value in case.per_device]
    multi = run_entry(stage, out, *case.args, *flags, "--trainer.devices=2", f"--trainer.strategy={strategy}")
    assert "MEMBER: 2/2" in multi["log"]  # Lightning's line for rank 1 of 2: two processes really ran
    # ModelParallelStrategy (FSDP2) writes a distributed checkpoint: a directory of shards; DDP a single file
    assert (out / "checkpoints" / "last.ckpt").is_dir() == (strategy == "fsdp2")
    compare(stage, single(stage), multi)


def test_global_batch_noise_does_not_depend_on_the_process_count():
    """Rank r of W holds the prompts at positions r, r + W, ... of the step's global batch (lit_rlhf.data.loaders), G
    rows each. Putting the ranks' uniforms back at those positions gives exactly one process's draw, at every step."""
    import torch

    from lit_rlhf.distributed import GlobalBatchNoise

    prompts, group, world = 6, 3, 3
    single = GlobalBatchNoise(torch.Generator().manual_seed(5), prompts, group)
    ranks = []
    for r in range(world):
        noise = GlobalBatchNoise(torch.Generator().manual_seed(5), prompts // world, group)
        noise.world_size, noise.rank = world, r  # as set from the process group on rank r
        ranks.append(noise)
    for _ in range(3):  # decode steps
        expected = single().reshape(prompts, group)
        got = torch.empty(prompts, group)
        for r, noise in enumerate(ranks):
            got[r::world] = noise().reshape(-1, group)
        assert torch.equal(got, expected)
    # one process draws what it drew before GlobalBatchNoise existed: torch.rand(N, 1) from the same generator
    assert torch.equal(GlobalBatchNoise(torch.Generator().manual_seed(5), prompts, group)(), torch.rand(prompts * group, 1, generator=torch.Generator().manual_seed(5)))
