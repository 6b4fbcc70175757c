"""Group Relative Policy Optimization (GRPO; Shao et al. 2024, DeepSeekMath §4.1.2, Eq. 3) and its variants.

For every prompt q the current policy samples G completions o_1..o_G; reward functions score them (r_i) and each
completion gets the group-relative advantage A_i = (r_i - mean(r)) / (std(r) + eps), shared by all its tokens (seed
000 §7.2.1, seed 002 §4.2). The loss (Eq. 3; seed 000 §7.2.3), with rho_it = pi(o_it | q, o_i<t) / pi_old(...):

    -1/G sum_i 1/|o_i| sum_t [ min(rho_it A_i, clip(rho_it, 1 - eps_low, 1 + eps_high) A_i) - beta KL_k3(pi || pi_ref) ]

Variants are picked by name: ``loss`` = grpo | dapo (token-level mean) | dr_grpo (constant normaliser; use it with
``scale_rewards=none``) | gspo (sequence ratio), see :mod:`lit_rlhf.losses.policy`; ``advantage_estimator`` = group |
rloo. ``beta = 0`` loads no reference. The reference is the policy with its LoRA adapter disabled, or a frozen copy.

``training_step`` is the whole algorithm, top to bottom: (1) sample G completions per prompt (KV-cached sampler,
:mod:`lit_rlhf.rollout`), (2) score, (3) advantages, where groups whose rewards are all equal (zero advantage) are
counted and then kept, dropped, or replaced (DAPO dynamic sampling, Yu et al. 2025 §3.2: fresh prompts are sampled
until the batch holds ``batch_size`` groups with signal, at most ``max_resample_rounds`` extra rounds), (4) old logps
(only when ``num_iterations`` mu > 1; with mu = 1 the ratio is exactly 1 and ``old_logps = logps.detach()``) and
reference logps, (5) mu iterations over the batch in minibatches with gradient accumulation, clipping and one
optimizer step per iteration, (6) log. Each minibatch loss is weighted by its share of the batch's normaliser
(sequences, or tokens for dapo), summed over all ranks, so any minibatch size and any number of DDP ranks give the
full-batch loss and gradient. Each rank samples all G completions of its own prompts: a group never spans ranks;
the sampling noise is drawn for the global batch (:class:`lit_rlhf.distributed.GlobalBatchNoise`), so 1 or W processes
sample the same completions. FSDP2 (``--trainer.strategy=fsdp2``) shards the policy and the frozen reference; the
ranks' decode loops run in lockstep, and it needs ``zero_variance_groups=keep`` (equal forwards on every rank).

Validation decodes the held-out prompts greedily and reports ``val/accuracy`` (last number == answer) and rewards.

    python -m lit_rlhf.experiments.grpo                                   # SmolLM2-135M + LoRA, arithmetic, CPU
    python -m lit_rlhf.experiments.grpo --config experiments/grpo/tiny.yaml --output_dir runs/grpo-tiny
    sbatch slurm/train.sbatch grpo --config experiments/grpo/qwen2.5-0.5b-gsm8k.yaml
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Literal

import lightning as L
import torch

from lit_rlhf import models
from lit_rlhf.advantages import group_advantages, rloo_advantages, zero_variance_groups
from lit_rlhf.callbacks import log_table
from lit_rlhf.checkpointing import capture_rng, restore_rng
from lit_rlhf.data.tasks import is_correct
from lit_rlhf.distributed import GlobalBatchNoise, fully_shard_lm, lockstep_done
from lit_rlhf.logprobs import TokenLogps, masked_mean, response_logps, token_logps
from lit_rlhf.losses import GRPO_LOSSES
from lit_rlhf.metrics import PhaseMeans, Throughput, model_flop_counts, training_flops
from lit_rlhf.optim import OptimizerSettings, build_optimizer, trainable_state_dict
from lit_rlhf.rewards import RewardComposer, RewardResult, RewardSpec
from lit_rlhf.rollout import ROLLOUT_BACKENDS, SamplingSettings, concat_rollouts, decode, group_index
from lit_rlhf.types import PromptBatch, Rollout

DEFAULT_REWARDS = (RewardSpec("numeric_correctness", 1.0), RewardSpec("numeric_closeness", 0.5))
"""``rewards: null``: correctness (the last number, or the ``<answer>`` tag, equals the answer) + half of the shaped
closeness ``exp(-|pred - answer| / 10)``, which gives groups reward variance before any answer is exactly right."""


class GRPOModule(L.LightningModule):
    def __init__(
        self,
        policy: models.ModelSpec = models.ModelSpec(),
        rewards: list[RewardSpec] | None = None,
        num_generations: int = 8,
        sampling: SamplingSettings = SamplingSettings(max_new_tokens=48, temperature=1.0),
        loss: Literal["grpo", "dapo", "dr_grpo", "gspo"] = "grpo",
        advantage_estimator: Literal["group", "rloo"] = "group",
        scale_rewards: Literal["group", "batch", "none"] = "group",
        beta: float = 0.0,
        kl_estimator: Literal["k1", "k2", "k3"] = "k3",
        epsilon_low: float = 0.2,
        epsilon_high: float = 0.2,
        num_iterations: int = 1,
        minibatch_size: int | None = None,
        zero_variance_groups: Literal["keep", "drop", "resample"] = "keep",
        max_resample_rounds: int = 3,
        max_grad_norm: float | None = 1.0,
        rollout_backend: Literal["kv_cache"] = "kv_cache",
        optimizer: OptimizerSettings = OptimizerSettings(lr=2e-4),
        peak_flops: float = 200e9,
        table_rows: int = 4,
        table_every_n_steps: int = 10,
    ) -> None:
        """
        Args:
            policy: the model to train (name, dtype, LoRA); the reference is derived from it.
            rewards: reward functions (registry name or import path), weights and bound arguments, summed;
                ``null``: :data:`DEFAULT_REWARDS` (numeric_correctness 1.0 + numeric_closeness 0.5).
            num_generations: G, completions sampled per prompt (the group).
            sampling: temperature, top-p, top-k and token budget of the training rollouts (validation is greedy with
                the same budget). The loss takes logps at this temperature.
            loss: GRPO-family loss by name: ``grpo``, ``dapo``, ``dr_grpo``, ``gspo``.
            advantage_estimator: ``group`` (r - group mean, scaled by ``scale_rewards``) or ``rloo`` (leave-one-out).
            scale_rewards: divide centred rewards by the ``group`` std, the ``batch`` std, or not at all (``none``).
            beta: KL coefficient; 0 loads no reference and computes no reference logps.
            kl_estimator: per-token KL estimator ``k1``, ``k2`` or ``k3``.
            epsilon_low: lower clip range of the ratio (1 - epsilon_low).
            epsilon_high: upper clip range (1 + epsilon_high); above epsilon_low is DAPO's clip-higher.
            num_iterations: mu, optimisation passes over each sampled batch (one optimizer step each).
            minibatch_size: completions per forward/backward (gradient accumulation); ``null``: the whole batch.
            zero_variance_groups: groups whose rewards are all equal: ``keep`` (zero advantage; KL still applies),
                ``drop`` them from the loss, or ``resample`` (DAPO dynamic sampling) until the batch is full.
            max_resample_rounds: extra sampling rounds per step with ``resample``; the batch may stay short.
            max_grad_norm: clip the gradient norm of each optimizer step (``null``: no clipping).
            rollout_backend: sampler (``kv_cache``: the built-in batched KV-cached sampler).
            optimizer: AdamW settings and learning-rate schedule (one scheduler step per optimizer step).
            peak_flops: peak FLOP/s of one device, for MFU (CPU here: ~200e9 fp32; H100: ~989e12 bf16).
            table_rows: completions added to the growing ``train/samples`` table at each table step.
            table_every_n_steps: training steps between table additions (0: no table).
        """
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        if sampling.temperature <= 0:
            raise ValueError("training needs sampling.temperature > 0 (temperature 0 is greedy decoding)")
        if num_generations < 2 and (advantage_estimator == "rloo" or scale_rewards == "group"):
            raise ValueError(f"num_generations={num_generations}: group statistics need at least 2 completions per prompt")
        self.spec, self.sampling, self.optim_settings = policy, sampling, optimizer
        self.rewards = RewardComposer(DEFAULT_REWARDS if rewards is None else rewards)
        extra = {"max_length": sampling.max_new_tokens} if loss == "dr_grpo" else {}
        self.loss_fn = functools.partial(
            GRPO_LOSSES[loss], epsilon_low=epsilon_low, epsilon_high=epsilon_high, beta=beta, kl_estimator=kl_estimator, **extra
        )
        self.advantage_fn = {
            "group": functools.partial(group_advantages, group_size=num_generations, scale=scale_rewards),
            "rloo": functools.partial(rloo_advantages, group_size=num_generations),
        }[advantage_estimator]
        self.rollout_fn = ROLLOUT_BACKENDS[rollout_backend]
        self.policy: torch.nn.Module | None = None
        self.frozen_reference: torch.nn.Module | None = None
        self.val_means = PhaseMeans()
        self.throughput = Throughput(peak_flops)
        self._train_rows: list[list] = []
        self._val_rows: list[list] = []
        self._generator: torch.Generator | None = None
        self._sampling_state: torch.Tensor | None = None
        self._refill = None

    # -- networks -------------------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.policy is not None:
            return
        if self.device_mesh is not None and self.hparams.zero_variance_groups != "keep":  # ranks would differ in forwards
            raise ValueError("under FSDP2 (every forward is collective) GRPO needs zero_variance_groups=keep")
        self.policy = models.load_causal_lm(self.spec)
        self.tokenizer = models.load_tokenizer(self.spec.name, self.spec.revision)
        eos = getattr(getattr(self.policy, "generation_config", None), "eos_token_id", None)  # e.g. Qwen: two ids
        eos = [self.tokenizer.eos_token_id] + (eos if isinstance(eos, list) else [eos])
        self.eos_token_ids = sorted({i for i in eos if i is not None})
        if self.spec.lora is None and self.hparams.beta > 0:
            self.frozen_reference = models.frozen_copy(self.policy)
        self._flop_counts = model_flop_counts(self.policy)
        if self.device_mesh is not None:  # ModelParallelStrategy: FSDP2 (sampling keeps the ranks in lockstep)
            for net in (self.policy, self.frozen_reference):
                if net is not None:
                    fully_shard_lm(net, self.device_mesh)

    def logps(self, lm: torch.nn.Module, rollout: Rollout, with_entropy: bool = False) -> TokenLogps:
        """Token logps [n, R] of the completions at the sampling temperature (prompt once, completions on its cache)."""
        temperature = self.sampling.temperature
        if not self.spec.gradient_checkpointing:
            r = rollout
            return response_logps(lm, r.prompt_ids, r.prompt_mask, r.response_ids, r.response_mask, r.prompt_index, temperature, with_entropy)
        input_ids, attention_mask, loss_mask, position_ids = rollout.as_sequences()  # checkpointing: no KV cache
        out = token_logps(lm, input_ids, attention_mask, loss_mask, position_ids, temperature, with_entropy)
        width = rollout.prompt_ids.shape[1]
        return TokenLogps(out.logps[:, width:], None if out.entropy is None else out.entropy[:, width:])

    @torch.no_grad()
    def frozen_logps(self, lm: torch.nn.Module, rollout: Rollout) -> torch.Tensor:
        """No-grad logps [N, R] in the training minibatches (bounded memory): old or reference logps."""
        return torch.cat([self.logps(lm, rollout.select(rows)).logps for rows in self.minibatches(len(rollout)) if len(rows)])

    # -- training -------------------------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        if self._generator is None:  # sampling noise: one stream for the global batch (same on every rank), restored on resume
            self._generator = torch.Generator(device=self.device).manual_seed(int(torch.initial_seed()))
            if self._sampling_state is not None:  # resumed: on the training device (set in on_load_checkpoint)
                self._generator.set_state(self._sampling_state)
        self.throughput.start()

    def training_step(self, batch: PromptBatch, batch_idx: int) -> None:
        hp, started = self.hparams, time.perf_counter()
        # 1. sample G completions per prompt from the current policy (no grad; prompt encoded once)
        rollout = self.sample(batch, hp.num_generations)
        generated = time.perf_counter()
        # 2. score every completion with the reward functions
        scores = self.score(rollout, batch.extras)
        sampled = _rollout_stats(rollout, scores, hp.num_generations)
        # 3. group-relative advantages; groups with all-equal rewards are kept, dropped or resampled (DAPO)
        rollout, scores, resampled = self.filter_groups(rollout, scores)
        advantages = self.advantage_fn(scores.total.to(self.device)) if len(rollout) else scores.total
        # 4. old logps (mu > 1 only) and reference logps (beta > 0 only), no grad
        old_logps = self.frozen_logps(self.policy, rollout) if hp.num_iterations > 1 and len(rollout) else None
        ref_logps = None
        if hp.beta > 0 and len(rollout):
            with models.reference_policy(self.policy, self.frozen_reference) as ref:
                ref_logps = self.frozen_logps(ref, rollout)
        scored = time.perf_counter()
        # 5. mu iterations x minibatches: accumulate gradients, clip, one optimizer step per iteration
        update = self.update(rollout, advantages, old_logps, ref_logps)
        # 6. log
        timing = {"generation_s": generated - started, "scoring_s": scored - generated, "update_s": time.perf_counter() - scored}
        self.log_step(rollout, scores, advantages, {**sampled, **resampled, **update}, timing)

    def sample(self, batch: PromptBatch, group_size: int, settings: SamplingSettings | None = None) -> Rollout:
        """``group_size`` completions per prompt (rows of a group consecutive), decoded."""
        index = group_index(batch.input_ids.shape[0], group_size, self.device)
        noise = GlobalBatchNoise(self._generator, batch.input_ids.shape[0], group_size) if self._generator is not None else None
        with models.merged_lora(self.policy) as policy:  # LoRA folded into the weights: a faster decode step
            rollout = self.rollout_fn(
                policy, batch.input_ids, batch.attention_mask, index, settings or self.sampling, self.eos_token_ids,
                self.tokenizer.pad_token_id, self._generator, all_done=lockstep_done(policy), noise=noise,
            )
        rollout.prompts, rollout.completions = list(batch.prompts), decode(self.tokenizer, rollout)
        return rollout

    def score(self, rollout: Rollout, extras: dict[str, list]) -> RewardResult:
        """Rewards [N] of the completions; dataset columns are repeated for each completion of a prompt."""
        index = rollout.prompt_index.tolist()
        columns = {k: [v[i] for i in index] for k, v in extras.items()}
        return self.rewards([rollout.prompts[i] for i in index], rollout.completions, columns)

    def filter_groups(self, rollout: Rollout, scores: RewardResult) -> tuple[Rollout, RewardResult, dict]:
        """Apply ``zero_variance_groups``: keep the batch, drop constant groups, or replace them (dynamic sampling)."""
        mode, g = self.hparams.zero_variance_groups, self.hparams.num_generations
        if mode == "keep":
            return rollout, scores, {}
        want, rollouts, results = rollout.num_prompts, [rollout], [scores]
        while mode == "resample" and len(rollouts) <= self.hparams.max_resample_rounds:
            if sum(int((~zero_variance_groups(r.total, g)).sum()) for r in results) >= want:
                break
            batch = next(self._refill_stream()).to(self.device)
            rollouts.append(self.sample(batch, g))
            results.append(self.score(rollouts[-1], batch.extras))
        total = torch.cat([r.total for r in results])
        keep = (~zero_variance_groups(total, g)).repeat_interleave(g).nonzero().squeeze(-1)[: want * g]
        rollout = concat_rollouts(rollouts, self.tokenizer.pad_token_id).select(keep.to(self.device))
        per_function = {k: torch.cat([r.per_function[k] for r in results])[keep] for k in scores.per_function}
        stats = {"groups_kept_frac": len(keep) / (want * g), "resample_rounds": len(results) - 1.0}
        return rollout, RewardResult(total[keep], per_function), stats

    def update(self, rollout: Rollout, advantages, old_logps, ref_logps) -> dict[str, float]:
        """mu passes over the batch; returns the mean loss and loss metrics over all passes."""
        opt, scheduler = self.optimizers(), self.lr_schedulers()
        weights = self._loss_weights(rollout)
        chunks = self.minibatches(len(rollout), same_count_on_all_ranks=True)
        totals: dict[str, float] = {}

        def add(name: str, value, weight: float) -> None:
            totals[name] = totals.get(name, 0.0) + float(value) * weight

        for iteration in range(self.hparams.num_iterations):
            for rows in chunks:
                if len(rows) == 0:  # this rank ran out of rows; DDP still needs the same number of backward passes
                    self.manual_backward(sum(p.sum() for p in self.policy.parameters() if p.requires_grad) * 0.0)
                    continue
                mb, first = rollout.select(rows), iteration == 0
                out = self.logps(self.policy, mb, with_entropy=first and mb.entropy is None)
                old = out.logps.detach() if old_logps is None else old_logps[rows]
                ref = None if ref_logps is None else ref_logps[rows]
                loss, metrics = self.loss_fn(out.logps, old, ref, advantages[rows], mb.response_mask)
                weight = float(weights[rows].sum())
                self.manual_backward(loss * weight)
                for name, value in {"loss": loss.detach(), **metrics}.items():
                    add(name, value, weight / self.hparams.num_iterations)
                entropy = out.entropy if out.entropy is not None else mb.entropy
                if first and entropy is not None:  # per pass-0 metrics: entropy, sampler vs trainer logps
                    add("entropy", masked_mean(entropy, mb.response_mask), weight)
                if first and mb.sample_logps is not None:
                    add("logps/sampler_abs_diff", masked_mean((out.logps.detach() - mb.sample_logps).abs(), mb.response_mask), weight)
            if self.hparams.max_grad_norm is not None:
                self.clip_gradients(opt, gradient_clip_val=self.hparams.max_grad_norm, gradient_clip_algorithm="norm")
            opt.step()
            opt.zero_grad(set_to_none=True)
            scheduler.step()
        return {"loss": 0.0, **totals}

    def minibatches(self, n: int, same_count_on_all_ranks: bool = False) -> list[torch.Tensor]:
        """Row chunks of ``minibatch_size`` (trailing empty chunks so every rank runs the same number)."""
        size = self.hparams.minibatch_size or max(n, 1)
        count = -(-n // size)
        if same_count_on_all_ranks and self.trainer.world_size > 1:
            count = int(self.trainer.strategy.reduce(torch.tensor(count, device=self.device), reduce_op="max"))
        return [torch.arange(i * size, min(n, (i + 1) * size), device=self.device) for i in range(count)]

    def _loss_weights(self, rollout: Rollout) -> torch.Tensor:
        """Per-row weights [N]: the row's units of the loss normaliser (1 per sequence, or its tokens for dapo)
        over their mean per rank, so minibatch losses sum (and DDP averages) to the full-batch loss."""
        units = rollout.completion_lengths.float() if self.hparams.loss == "dapo" else torch.ones(len(rollout), device=self.device)
        total = units.sum()
        if self.trainer.world_size > 1:
            total = self.trainer.strategy.reduce(total, reduce_op="sum") / self.trainer.world_size
        return units / total.clamp(min=1e-8)

    def _refill_stream(self):
        if self._refill is None:
            dm = self.trainer.datamodule
            if dm is None or not hasattr(dm, "refill_batches"):
                raise ValueError("zero_variance_groups=resample needs a PromptDataModule (it draws fresh prompts)")
            self._refill = dm.refill_batches(self.global_rank, self.trainer.world_size)
        return self._refill

    # -- logging --------------------------------------------------------------------------------------------------
    def log_step(self, rollout: Rollout, scores: RewardResult, advantages, stats: dict, timing: dict) -> None:
        n, sync = len(rollout), self.trainer.world_size > 1  # train/* are the mean over ranks
        self.log_dict({f"train/{k}": v for k, v in stats.items() if k != "loss"}, sync_dist=sync, batch_size=max(n, 1))
        self.log("train/loss", stats["loss"], prog_bar=True, sync_dist=sync, batch_size=max(n, 1))
        self.log_dict({f"perf/{k}": v for k, v in timing.items()}, batch_size=max(n, 1))
        tokens = int(rollout.prompt_mask.sum() + rollout.response_mask.sum()) if n else 0
        perf = self.throughput.step(n, tokens, self._step_flops(rollout) if n else 0.0)
        if "perf/samples_per_s" in perf:
            perf["perf/completions_per_s"] = perf.pop("perf/samples_per_s")
        self.log_dict(perf, batch_size=max(n, 1))
        every, step = self.hparams.table_every_n_steps, self.global_step // self.hparams.num_iterations
        if every and n and (step - 1) % every == 0:
            for i in range(0, n, max(1, n // self.hparams.table_rows))[: self.hparams.table_rows]:
                p = rollout.prompts[int(rollout.prompt_index[i])]
                self._train_rows.append([self.global_step, p, rollout.completions[i], float(scores.total[i]), float(advantages[i])])
            columns = ["step", "prompt", "completion", "reward", "advantage"]
            log_table(self.trainer, "train/samples", columns, self._train_rows, step=self.global_step)

    def _step_flops(self, rollout: Rollout) -> float:
        """Model FLOPs of a step: the sampling forward, mu x (forward + backward), old and reference forwards."""
        n_body, head = self._flop_counts
        prompt, completion = int(rollout.prompt_mask.sum()), int(rollout.response_mask.sum())
        forward = 2.0 * n_body * (prompt + completion) + 2.0 * head * completion
        extra = int(self.hparams.beta > 0) + int(self.hparams.num_iterations > 1)
        train = training_flops(n_body, head, prompt + completion, completion, self.spec.lora is None, 0)
        return (1 + extra) * forward + self.hparams.num_iterations * train

    # -- validation -----------------------------------------------------------------------------------------------
    def validation_step(self, batch: PromptBatch, batch_idx: int) -> None:
        greedy = SamplingSettings(max_new_tokens=self.sampling.max_new_tokens, temperature=0.0)
        rollout = self.sample(batch, 1, greedy)
        scores = self.score(rollout, batch.extras)
        n = len(rollout)
        values = {
            "val/rewards/mean": scores.total.mean(),
            "val/completions/mean_length": rollout.completion_lengths.float().mean(),
            "val/completions/truncated_rate": rollout.truncated.float().mean(),
        }
        means = self.val_means.update(values, weight=n)
        answers = batch.extras.get("answer", [None] * n)
        graded = [is_correct(c, a) for c, a in zip(rollout.completions, answers) if a is not None]
        if graded:
            means.update(self.val_means.update({"val/accuracy": sum(graded) / len(graded)}, weight=len(graded)))
        self.log_dict(means, on_epoch=True, on_step=False, batch_size=n)
        for i in range(min(n, self.hparams.table_rows - len(self._val_rows))):
            self._val_rows.append([batch.prompts[i], rollout.completions[i], answers[i], float(scores.total[i])])

    def on_validation_epoch_end(self) -> None:
        if self._val_rows and not self.trainer.sanity_checking:
            log_table(self.trainer, "val/samples", ["prompt", "completion", "answer", "reward"], self._val_rows, step=self.global_step)
        self._val_rows = []

    # -- optimizer, checkpoints, export ---------------------------------------------------------------------------
    def configure_optimizers(self):
        params = [p for p in self.policy.parameters() if p.requires_grad]
        return build_optimizer(params, self.optim_settings, self.trainer.estimated_stepping_batches)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = trainable_state_dict(self, checkpoint["state_dict"])
        checkpoint["rng"] = capture_rng()
        if self._generator is not None:
            checkpoint["sampling_rng"] = self._generator.get_state()
        checkpoint["train_table_rows"] = list(self._train_rows)  # each table version holds every row so far

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.strict_loading = False
        restore_rng(checkpoint.get("rng"))
        self._generator, self._sampling_state = None, checkpoint.get("sampling_rng")
        self._train_rows = [list(row) for row in checkpoint.get("train_table_rows", [])]

    def export(self, out_dir: Path) -> dict[str, str]:
        return models.export_pretrained(self.policy, self.tokenizer, out_dir, self.spec, self.trainer.is_global_zero)


def _rollout_stats(rollout: Rollout, scores: RewardResult, group_size: int) -> dict[str, float]:
    """Metrics of what the policy sampled (before any group filtering): rewards, lengths, truncation, constant groups."""
    lengths = rollout.completion_lengths.float()
    return {
        **scores.stats(),
        "completions/mean_length": lengths.mean().item(),
        "completions/min_length": lengths.min().item(),
        "completions/max_length": lengths.max().item(),
        "completions/truncated_rate": rollout.truncated.float().mean().item(),
        "frac_zero_std_groups": zero_variance_groups(scores.total, group_size).float().mean().item(),
    }

