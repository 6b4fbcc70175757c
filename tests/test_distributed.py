"""Every stage, 2 processes (gloo, CPU) with DDP and with FSDP2, matches the single-process run of the same seed and
global batch: per-step training metrics and the final held-out metrics.

Why they can match: the data loaders give step k the same global batch for 1 or W processes (one seeded permutation,
rank r takes every W-th example; the per-device batch is halved); every loss is normalised over the global batch
(pairs, sequences or tokens of all ranks), so the average of the ranks' gradients, which DDP all-reduces and FSDP2
reduce-scatters, is the single-process gradient; logged training metrics are the mean over ranks of equal shares.
GRPO and PPO sample their completions with noise drawn for the global batch (lit_rlhf.distributed.GlobalBatchNoise),
so rank r samples exactly what one process samples for the same prompts; under FSDP2 the ranks' decode loops run
in lockstep (every forward is collective) and SFT's greedy validation decodes with ``synced_gpus``.

GRPO, distillation and PPO run with the export on: rank zero writes it (under FSDP2 after gathering the full
weights), and the reloaded export gives the logits of the policy in the run's last checkpoint, and those of the
single-process export.

Tolerance: 1e-4 absolute plus 1e-4 relative. What differs is the order of float32 reductions (the all-reduce sums
two half-batch gradients; FSDP2 gathers and reduce-scatters flat shards), ~1e-7 relative per step, growing over 2-4
Adam steps (Adam divides by sqrt(v), amplifying tiny gradient differences near zero) to ~1e-6. Sampled tokens are
discrete: a flip would change a metric by far more than 1e-4, so the tolerance does not hide a different sample.
"""

import os
import socket
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from tests.distributed_runs import run_entry


@dataclass(frozen=True)
class Case:
    args: tuple[str, ...]
    per_device: tuple[tuple[str, int], ...]  # (flag, single-process value); two processes get value / 2 each
    steps: tuple[int, ...]  # CSV steps whose metrics are compared
    keys: tuple[str, ...]  # per-step training metrics compared


COMMON = ("--validate_before_fit=false", "--export=false")
EXPORT = ("--validate_before_fit=false", "--export=true")  # the RL stages: the export is checked too
CASES = {
    "sft": Case(
        (
            "--config",
            "experiments/sft/tiny.yaml",
            "--trainer.max_steps=3",
            "--trainer.val_check_interval=16",
            "--data.num_val=8",
            "--data.eval_prompts=4",
            *COMMON,
        ),
        (("--data.batch_size", 4),),
        (0, 1, 2),
        ("train/loss", "train/token_accuracy"),
    ),
    "rm": Case(
        (
            "--config",
            "experiments/rm/tiny.yaml",
            "--trainer.max_steps=3",
            "--trainer.val_check_interval=16",
            "--data.num_val=8",
            *COMMON,
        ),
        (("--data.batch_size", 4),),
        (0, 1, 2),
        ("train/loss", "train/rewards/margins", "train/rewards/chosen"),
    ),
    "dpo": Case(
        (
            "--config",
            "experiments/dpo/tiny.yaml",
            "--trainer.max_steps=3",
            "--data.shuffle=false",
            "--data.num_val=8",
            "--trainer.val_check_interval=3",
            *COMMON,
        ),
        (("--data.batch_size", 8),),
        (0, 1, 2),
        ("train/loss", "train/rewards/margins", "train/logps/chosen"),
    ),
    # mu = 2: 2 GRPO steps (4 optimizer steps), logged at CSV steps 0, 1; minibatches of 4 completions on both layouts
    "grpo": Case(
        (
            "--config",
            "experiments/grpo/tiny.yaml",
            "--trainer.max_steps=2",
            "--trainer.val_check_interval=8",
            "--model.minibatch_size=4",
            "--model.table_every_n_steps=0",
            "--data.num_val=4",
            "--data.val_batch_size=2",
            *EXPORT,
        ),
        (("--data.batch_size", 4),),
        (0, 1),
        ("train/loss", "train/kl", "train/rewards/mean", "train/completions/mean_length", "train/entropy"),
    ),
    # on-policy distillation: GRPO's loop with a frozen teacher (sharded like the reference under FSDP2). One step: the
    # tiny student is near-uniform over 49k tokens, so after an update a ~1e-7 weight difference can flip a sampled
    # token; the step's samples, teacher logps, loss and all-reduced gradient norm, and the exported weights, must match
    "distill": Case(
        (
            "--config",
            "experiments/distill/tiny.yaml",
            "--trainer.max_steps=1",
            "--trainer.val_check_interval=8",
            "--model.minibatch_size=4",
            "--model.table_every_n_steps=0",
            "--data.num_val=4",
            "--data.val_batch_size=2",
            *EXPORT,
        ),
        (("--data.batch_size", 4),),
        (0,),
        ("train/loss", "train/distill/reverse_kl", "train/distill/teacher_logps", "train/grad_norm"),
    ),
    # a rank's PPO minibatch is its whole batch (smaller ones are shuffled per rank: see lit_rlhf/stages/ppo.py)
    "ppo": Case(
        ("--config", "experiments/ppo/tiny.yaml", "--trainer.max_steps=2", "--trainer.val_check_interval=4", *EXPORT),
        (("--data.batch_size", 4), ("--model.minibatch_size", 4), ("--data.val_batch_size", 4)),
        (0, 1),
        ("train/loss", "train/value_loss", "train/kl_sequence", "train/rewards/mean", "train/completions/mean_length"),
    ),
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
    if "--export=true" in case.args:
        check_export(out, Path(single(stage)["output_dir"]))


IDS = torch.tensor([[1, 42, 7, 300, 9, 1000], [5, 6, 7, 8, 9, 10]])  # a fixed input for the logits of the policies


def checkpointed_policy(out: Path, tmp: Path) -> torch.nn.Module:
    """The run's trained policy: the tiny model (full fine-tune) with the ``policy.*`` weights of ``last.ckpt`` (a file
    under DDP; a distributed-checkpoint directory under FSDP2, converted to one file here)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from lit_rlhf import models

    path = out / "checkpoints" / "last.ckpt"
    if path.is_dir():
        dcp_to_torch_save(path, tmp / "last.pt")
        path = tmp / "last.pt"
    state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    policy = models.load_causal_lm(models.ModelSpec(name="tiny", lora=None)).eval()
    weights = {k.removeprefix("policy."): v for k, v in state.items() if k.startswith("policy.")}
    missing, unexpected = policy.load_state_dict(weights, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (
        missing,
        unexpected,
    )  # lm_head: tied to the embeddings
    return policy


def check_export(out: Path, single_out: Path) -> None:
    """``export/merged`` exists once, reloads with transformers and gives the logits of the checkpointed policy (the
    very weights that were trained) and of the single-process run's export."""
    from transformers import AutoModelForCausalLM

    assert sorted(p.name for p in (out / "export").iterdir()) == ["merged"], "one export, no leftover temp directories"
    exported = AutoModelForCausalLM.from_pretrained(out / "export" / "merged").eval()
    reference = AutoModelForCausalLM.from_pretrained(single_out / "export" / "merged").eval()
    with torch.no_grad():
        logits = exported(input_ids=IDS).logits
        trained = checkpointed_policy(out, out)(input_ids=IDS).logits
        single = reference(input_ids=IDS).logits
    torch.testing.assert_close(logits, trained, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, single, atol=TOL["abs"], rtol=TOL["rel"])


def _helpers_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    from lit_rlhf.distributed import global_masked_whiten, global_normalizer, rank_mean, row_chunks

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    x, mask = _whiten_data()
    rows = slice(0, 2) if rank == 0 else slice(2, 5)  # unequal shares: 2 and 3 rows
    out = {
        "normalizer": float(global_normalizer(torch.tensor([3.0, 7.0][rank]))),
        "mean": rank_mean(torch.tensor([1.0, 4.0][rank])),
        "chunks": [len(c) for c in row_chunks([5, 2][rank], 2, "cpu", same_count_on_all_ranks=True)],
        "whitened": global_masked_whiten(x[rows], mask[rows]),
    }
    torch.save(out, os.path.join(out_dir, f"helpers{rank}.pt"))
    dist.destroy_process_group()


def _whiten_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(5, 4, generator=g), (torch.rand(5, 4, generator=g) > 0.3).long()


def test_distributed_helpers_give_the_global_figures(tmp_path):
    """2 gloo processes: global_normalizer is the mean over ranks of the local counts ((3 + 7) / 2 = 5, so the rank
    sums 3/5 and 7/5 average to the global mean 10/10); rank_mean averages; row_chunks pads the shorter rank with
    empty chunks to the longer's count (5 rows in 2s: 3 chunks; 2 rows: 1 chunk + 2 empty); global_masked_whiten of
    the two ranks' rows equals one process's whitening of all rows (and with one process it is masked_whiten)."""
    from lit_rlhf.distributed import global_masked_whiten, global_normalizer, rank_mean, row_chunks
    from lit_rlhf.logprobs import masked_whiten

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_helpers_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"helpers{r}.pt") for r in range(2)]
    assert [r["normalizer"] for r in ranks] == [5.0, 5.0] and [r["mean"] for r in ranks] == [2.5, 2.5]
    assert ranks[0]["chunks"] == [2, 2, 1] and ranks[1]["chunks"] == [2, 0, 0]
    x, mask = _whiten_data()
    whole = masked_whiten(x, mask)
    torch.testing.assert_close(torch.cat([r["whitened"] for r in ranks]), whole)
    # one process: the local figures
    assert float(global_normalizer(torch.tensor(3.0))) == 3.0 and rank_mean(torch.tensor(4.0)) == 4.0
    assert [len(c) for c in row_chunks(5, None, "cpu", same_count_on_all_ranks=True)] == [5]
    assert torch.equal(global_masked_whiten(x, mask), whole)


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
    assert torch.equal(
        GlobalBatchNoise(torch.Generator().manual_seed(5), prompts, group)(),
        torch.rand(prompts * group, 1, generator=torch.Generator().manual_seed(5)),
    )
