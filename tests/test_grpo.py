"""GRPO stage: CPU smoke test through the entry point, group filtering (drop / DAPO dynamic sampling), minibatch
and DDP invariance of the advantages, loss and gradient, completions without a reward, and the settings refused up
front. (tests/test_configs.py parses experiments/grpo/*.yaml.)"""

import glob
import json
import os
import socket
import zlib

import lightning as L
import pytest
import torch
import torch.multiprocessing as mp

from lit_rlhf import models
from lit_rlhf.data.prompts import PromptDataModule
from lit_rlhf.rewards import RewardSpec
from lit_rlhf.rollout import SamplingSettings, decode, group_index
from lit_rlhf.stages.grpo import GRPOModule
from lit_rlhf.types import PromptBatch, Rollout
from tests.test_report import undocumented

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_YAML = os.path.join(ROOT, "experiments", "grpo", "tiny.yaml")


# ------------------------------------------------------------------------------------------------ smoke test
@pytest.mark.slow
def test_tiny_grpo_run_end_to_end(tmp_path):
    """Entry point on the tiny model (full fine-tune, beta > 0 so a frozen reference, mu = 2, minibatches): finite
    loss, trainable parameters changed, metrics and sample tables logged, the export reloads and generates."""
    from transformers import AutoModelForCausalLM

    from lit_rlhf.experiments.grpo import main

    cli = main(args=["--config", TINY_YAML, "--output_dir", str(tmp_path), "--trainer.enable_progress_bar=false"])
    summary = json.loads((tmp_path / "final_metrics.json").read_text())
    metrics = {**summary["train_last"], **summary["end"]}
    for key in [
        "train/loss",
        "train/kl",
        "train/entropy",
        "train/clip_ratio/low",
        "train/clip_ratio/high",
        "train/rewards/mean",
        "train/rewards/std",
        "train/rewards/min",
        "train/rewards/max",
        "train/rewards/answer_in_text/mean",
        "train/completions/mean_length",
        "train/completions/max_length",
        "train/completions/truncated_rate",
        "train/frac_zero_std_groups",
        "perf/generation_s",
        "perf/update_s",
        "perf/samples_per_s",
        "val/accuracy",
        "val/rewards/mean",
        "train/rewards/missing_frac",
    ]:
        assert key in metrics and torch.isfinite(torch.tensor(metrics[key])), key
    assert metrics["train/kl"] > 0  # mu = 2: the second pass moved away from the reference
    fresh = models.load_causal_lm(models.ModelSpec(name="tiny", lora=None))
    changed = [not torch.equal(a, b) for a, b in zip(cli.model.policy.parameters(), fresh.parameters())]
    assert all(changed)
    assert set(summary["start"]) >= {"val/accuracy", "val/rewards/mean"}
    assert summary["global_step"] == cli.trainer.global_step == 2  # one global step per rollout batch, whatever mu
    assert undocumented(set(metrics) | set(summary["start"])) == [], "every metric GRPO logs is in the README's schema"
    opt, scheduler = cli.model.optimizers(), cli.model.lr_schedulers()
    adam_steps = {int(s["step"]) for s in opt.optimizer.state.values()}
    assert adam_steps == {4} and scheduler.last_epoch == 4  # mu = 2 optimizer and scheduler steps per rollout batch
    tables = glob.glob(
        str(tmp_path / "wandb" / "offline-run-*" / "files" / "media" / "table" / "train" / "samples_*.table.json")
    )
    assert len(tables) == 2  # one version per training step, each holding every row so far
    rows = sorted(len(json.load(open(t))["data"]) for t in tables)
    assert rows == [4, 8]
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "export" / "merged")
    ids = torch.tensor([[1, 2, 3]])
    out = merged.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 6)


# --------------------------------------------------------------------------------- fixed rollouts for the tests
class FixedRolloutGRPO(GRPOModule):
    """Samples are a deterministic function of the prompt text (seeded per prompt), so a run's batch does not depend
    on how prompts are split across minibatches or ranks. Records what each update saw."""

    def sample(self, batch: PromptBatch, group_size: int, settings: SamplingSettings | None = None) -> Rollout:
        n, budget = batch.input_ids.shape[0] * group_size, self.sampling.max_new_tokens
        ids = torch.full((n, budget), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros(n, budget, dtype=torch.long)
        for p, prompt in enumerate(batch.prompts):
            g = torch.Generator().manual_seed(zlib.crc32(prompt.encode()))
            for j in range(group_size):
                length = int(torch.randint(1, budget + 1, (1,), generator=g))
                ids[p * group_size + j, :length] = torch.randint(300, 3000, (length,), generator=g)
                mask[p * group_size + j, :length] = 1
        rollout = Rollout(
            batch.input_ids,
            batch.attention_mask,
            ids,
            mask,
            group_index(len(batch.prompts), group_size),
            mask[:, -1].bool(),
        )
        rollout.prompts, rollout.completions = list(batch.prompts), decode(self.tokenizer, rollout)
        return rollout

    def update(self, rollout, advantages, old_logps, ref_logps):
        self.seen = getattr(self, "seen", [])
        self.seen += [
            (rollout.prompts[i], rollout.completions[n], float(advantages[n].float().mean()))  # [N] or [N, R]
            for n, i in enumerate(rollout.prompt_index.tolist())
        ]
        return super().update(rollout, advantages, old_logps, ref_logps)

    def on_before_optimizer_step(self, optimizer) -> None:
        self.grads = getattr(self, "grads", [])
        self.grads.append(torch.cat([p.grad.flatten() for p in self.policy.parameters() if p.grad is not None]).clone())


def _module(**overrides) -> FixedRolloutGRPO:
    kwargs = dict(
        policy=models.ModelSpec(name="tiny", lora=None),
        num_generations=4,
        sampling=SamplingSettings(max_new_tokens=6),
        rewards=[RewardSpec("length_penalty", 1.0, {"max_length": 30, "buffer": 28})],
        loss="dapo",
        beta=0.04,
        num_iterations=2,
        max_grad_norm=None,
        table_every_n_steps=0,
    )
    return FixedRolloutGRPO(**{**kwargs, **overrides})


def _run_one_step(module: GRPOModule, batch_size: int, devices: int = 1) -> L.Trainer:
    L.seed_everything(0, verbose=False)
    dm = PromptDataModule(num_train=16, num_val=2, batch_size=batch_size, shuffle=False)
    dm.connect(module.tokenizer)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        max_steps=1,  # one rollout batch
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
    )
    trainer.fit(module, datamodule=dm)
    return trainer


@pytest.mark.slow
def test_minibatches_give_the_full_batch_gradient():
    """dapo normalises by all completion tokens of the batch: minibatches of 3 rows (groups of 4 split across them)
    must accumulate exactly the full-batch gradient, in both passes of mu = 2 (the second uses old logps)."""
    full, split = _module(), _module(minibatch_size=3)
    _run_one_step(full, batch_size=2)
    _run_one_step(split, batch_size=2)
    assert full.seen == split.seen
    for a, b in zip(full.grads, split.grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        NODE_RANK="0",
    )
    torch.set_num_threads(1)
    module = _module(minibatch_size=3)
    trainer = _run_one_step(module, batch_size=2, devices=world)
    torch.save(
        {"seen": module.seen, "grads": module.grads, "loss": float(trainer.callback_metrics["train/loss"])},
        os.path.join(out_dir, f"rank{rank}.pt"),
    )


@pytest.mark.slow
def test_ddp_two_processes_match_one_process(tmp_path):
    """2 CPU processes (gloo), 2 prompts each, vs 1 process with the same 4 prompts: every rank samples whole groups
    of its own prompts, so the advantages are the same; loss weights use the token count of all ranks, so the
    all-reduced gradient and the logged (synced) loss equal the single-process ones."""
    single = _module()
    trainer = _run_one_step(single, batch_size=4)
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    together = {(p, c): a for p, c, a in ranks[0]["seen"] + ranks[1]["seen"]}
    assert len(together) == len(single.seen) == 16
    assert together == pytest.approx({(p, c): a for p, c, a in single.seen}, rel=1e-6, abs=1e-7)
    assert {p for p, _, _ in ranks[0]["seen"]}.isdisjoint({p for p, _, _ in ranks[1]["seen"]})
    assert ranks[0]["loss"] == pytest.approx(float(trainer.callback_metrics["train/loss"]), rel=1e-5, abs=1e-7)
    for r in range(2):
        for a, b in zip(ranks[r]["grads"], single.grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-6)


class ScriptedAnswers(FixedRolloutGRPO):
    """Completions that state the right answer ("The answer is 85.") except at rows 0, 4, 8, ... (answer + 1)."""

    def sample(self, batch: PromptBatch, group_size: int, settings: SamplingSettings | None = None) -> Rollout:
        rollout = super().sample(batch, group_size, settings)
        answers = [batch.extras["answer"][i] for i in rollout.prompt_index.tolist()]
        rollout.completions = [f"The answer is {a + (n % 4 == 0)}." for n, a in enumerate(answers)]
        return rollout


@pytest.mark.slow
def test_validation_accuracy_is_the_verifiers_fraction_of_right_answers():
    """8 held-out prompts in 2 batches, 6 answered right: val/accuracy = 6/8 exactly (the verifier graded every row,
    batches weighted by their size), and the default rewards score the same rows: 1.5 right, 0.5 exp(-1/10) off by 1."""
    import math

    module = ScriptedAnswers(
        policy=models.ModelSpec(name="tiny", lora=None), sampling=SamplingSettings(max_new_tokens=4)
    )
    dm = PromptDataModule(num_train=8, num_val=8, val_batch_size=4)
    dm.connect(module.tokenizer)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    (metrics,) = trainer.validate(module, datamodule=dm, verbose=False)
    assert metrics["val/accuracy"] == 0.75
    assert metrics["val/rewards/mean"] == pytest.approx((6 * 1.5 + 2 * 0.5 * math.exp(-0.1)) / 8)


# --------------------------------------------------------------------------------------- zero-variance groups
def _constant_for_addition(prompts, completions):
    """Reward 1 for every completion of an addition prompt (a zero-variance group), its length otherwise."""
    return [1.0 if "+" in p else float(len(c)) for p, c in zip(prompts, completions)]


def _filtering_module(mode: str, rounds: int = 3) -> FixedRolloutGRPO:
    module = _module(
        rewards=[RewardSpec(f"{__name__}:_constant_for_addition")],
        zero_variance_groups=mode,
        max_resample_rounds=rounds,
    )
    module.configure_model()
    return module


def test_drop_removes_constant_groups_and_resample_refills_the_batch():
    dm = PromptDataModule(num_train=40, num_val=2, batch_size=4, shuffle=False)
    dm.connect(models.load_tokenizer("tiny"))
    dm.setup()
    batch = dm.collate(dm.train_examples[2:6])
    plus = sum("+" in p for p in batch.prompts)
    assert plus == 2  # 71 - 48, 84 - 37, 46 + 27, 89 + 42

    dropper = _filtering_module("drop")
    rollout = dropper.sample(batch, 4)
    kept, scores, stats = dropper.filter_groups(rollout, dropper.score(rollout, batch.extras))
    assert kept.num_prompts == len(kept) // 4 == 4 - plus and not any("+" in p for p in kept.prompts)
    assert stats["groups_kept_frac"] == (4 - plus) / 4 and stats["resample_rounds"] == 0
    assert scores.total.tolist() == [float(len(c)) for c in kept.completions]

    resampler = _filtering_module("resample")
    resampler._refill = dm.refill_batches(0, 1)
    full, scores, stats = resampler.filter_groups(rollout, resampler.score(rollout, batch.extras))
    assert (
        full.num_prompts == 4 and len(full) == 16 and stats["groups_kept_frac"] == 1.0 and stats["resample_rounds"] >= 1
    )
    assert not any("+" in p for p in full.prompts) and full.prompt_index.tolist() == group_index(4, 4).tolist()
    assert full.prompts[: 4 - plus] == kept.prompts  # the groups with signal come first, then refills
    assert scores.total.tolist() == [float(len(c)) for c in full.completions]

    bounded = _filtering_module("resample", rounds=0)
    bounded._refill = dm.refill_batches(0, 1)
    short, _, stats = bounded.filter_groups(rollout, bounded.score(rollout, batch.extras))
    assert short.num_prompts == 4 - plus and stats["resample_rounds"] == 0


# ------------------------------------------------------------------------------- completions without a reward
def _no_reward_for_the_first_of_each_group(prompts, completions):
    """No reward (None) for rows 0, 4, 8, ... (the first completion of each group of 4), the length otherwise."""
    return [None if i % 4 == 0 else float(len(c)) for i, c in enumerate(completions)]


def test_a_completion_without_a_reward_gets_advantage_zero_and_is_counted():
    """Groups of 4 whose first completion has no reward: its advantage is 0 and the other three get the group
    advantage of their own rewards alone, (r - mean) / (std + 1e-4) over 3; train/rewards/missing_frac = 1/4; the
    loss stays finite."""
    module = _module(rewards=[RewardSpec(f"{__name__}:_no_reward_for_the_first_of_each_group")], num_iterations=1)
    trainer = _run_one_step(module, batch_size=2)
    advantages = [a for _, _, a in module.seen]
    lengths = [float(len(c)) for _, c, _ in module.seen]
    assert len(advantages) == 8
    for start in (0, 4):
        assert advantages[start] == 0.0
        rewards = torch.tensor(lengths[start + 1 : start + 4])
        expected = (rewards - rewards.mean()) / (rewards.std() + 1e-4)
        assert advantages[start + 1 : start + 4] == pytest.approx(expected.tolist(), rel=1e-5, abs=1e-6)
    assert float(trainer.callback_metrics["train/rewards/missing_frac"]) == 0.25
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


# ------------------------------------------------------------------------------- settings refused up front
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model.num_generations=1", "--model.scale_rewards=none"],
         r"model\.num_generations=1 cannot learn: GRPO's advantages compare the completions of one prompt; "
         r".*\(here none\), so every advantage is 0 .*Set model\.num_generations to 2 or more"),
        (["--model.num_generations=1"], r"model\.num_generations=1 cannot learn: .*undefined std of one reward"),
        (["--model.num_generations=1", "--model.advantage_estimator=rloo"],
         r"model\.num_generations=1 cannot learn: .*rloo subtracts the mean reward of the prompt's other completions"),
        (["--model.num_iterations=0"], r"model\.num_iterations=0 cannot learn"),
        (["--model.beta=-0.04"], r"model\.beta=-0\.04 cannot learn"),
        (["--model.sampling.temperature=0"], r"model\.sampling\.temperature=0\.0: training samples, so it needs > 0"),
        (['--model.rewards=[{"name": "answer_in_text", "weight": 0.0}]'],
         r"model\.rewards cannot learn: every reward weight is 0 \(\[0\.0\]\)"),
    ],
)  # fmt: skip
def test_the_entry_point_refuses_settings_that_cannot_learn(tmp_path, args, message):
    """Through ``python -m lit_rlhf.experiments.grpo --config experiments/grpo/tiny.yaml ...``: the error names the
    option and its value, and nothing in the output directory is touched."""
    from lit_rlhf.experiments.grpo import main

    sentinel = tmp_path / "sentinel.txt"
    sentinel.write_text("an earlier run's file\n")
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(ValueError, match=message):
        main(args=["--config", TINY_YAML, "--output_dir", str(tmp_path), "--trainer.enable_progress_bar=false", *args])
    assert sentinel.read_text() == "an earlier run's file\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == before
