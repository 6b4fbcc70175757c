"""Group Relative Policy Optimization (GRPO; Shao et al. 2024, DeepSeekMath §4.1.2, Eq. 3) and its variants.

For every prompt q the current policy samples G completions o_1..o_G; reward functions score them (r_i) and each
completion gets the group-relative advantage A_i = (r_i - mean(r)) / (std(r) + eps), shared by all its tokens
(DeepSeekMath §4.1.2). The loss (Eq. 3; KL_k3 is its Eq. 4 estimator), with rho_it = pi(o_it | q, o_i<t) / pi_old(...):

    -1/G sum_i 1/|o_i| sum_t [ min(rho_it A_i, clip(rho_it, 1 - eps_low, 1 + eps_high) A_i) - beta KL_k3(pi || pi_ref) ]

Variants are picked by name (:mod:`lit_rlhf.objectives`): ``loss`` (:mod:`lit_rlhf.losses.policy`),
``advantage_estimator``, ``kl_estimator``, ``kl_placement``, token masks (top entropy, off-policy). ``beta = 0`` loads
no reference; the reference is the policy with its LoRA adapter disabled, or a frozen copy. A completion no reward
function scored (all None/NaN) gets advantage 0, outside its group's statistics. Settings that cannot learn are refused.

``training_step``, top to bottom: (1) sample G completions per prompt, (2) score them (an online RM,
:mod:`lit_rlhf.online_rm`, then learns from them), (3) count all-equal groups; keep, drop or replace them (DAPO),
(4) old and reference logps, advantages, (5) mu passes of minibatches, one optimizer step each, (6) log.

One training step is one rollout batch (``max_steps``, ``global_step``, W&B step; the first of mu optimizer steps
counts); the schedule steps per optimizer step. Minibatch losses are weighted by their share of the global normaliser,
so any minibatch size and number of ranks give the full-batch gradient; groups never span ranks, sampling noise is drawn
for the global batch. FSDP2 shards policy and reference; ranks decode in lockstep (``zero_variance_groups=keep``).

    python -m lit_rlhf.experiments.grpo                                   # SmolLM2-135M + LoRA, arithmetic, CPU
    python -m lit_rlhf.experiments.grpo --config experiments/grpo/tiny.yaml --output_dir runs/grpo-tiny
    sbatch slurm/train.sbatch grpo --config experiments/grpo/qwen2.5-0.5b-gsm8k.yaml
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

import lightning as L
import torch

from lit_rlhf import losses, models, objectives, vllm_engine
from lit_rlhf import online_rm as orm
from lit_rlhf.advantages import check_grpo_settings, zero_variance_groups
from lit_rlhf.checkpointing import capture_rng, restore_rng
from lit_rlhf.distributed import fully_shard_lm, global_normalizer, row_chunks
from lit_rlhf.logprobs import TokenLogps, masked_mean
from lit_rlhf.metrics import PhaseMeans, Throughput, log_table, model_flop_counts, rollout_step_flops
from lit_rlhf.optim import OptimizerSettings, build_optimizer, clip_and_step, trainable_state_dict
from lit_rlhf.rewards import RewardResult, RewardSpec, validation_means
from lit_rlhf.rollout import SamplingSettings, completion_stats, concat_rollouts, rollout_logps, sample_completions
from lit_rlhf.steps import grpo_rewards, step_tensors
from lit_rlhf.types import PromptBatch, Rollout


class GRPOModule(L.LightningModule):
    """Group relative policy optimisation and its loss variants (DAPO, Dr. GRPO, GSPO, CISPO, SAPO, dual clip)."""

    def __init__(
        self,
        policy: models.ModelSpec = models.ModelSpec(),
        rewards: list[RewardSpec] | None = None,
        process_rewards: list[RewardSpec] | None = None,
        step_splitter: str = "auto",
        online_rm: orm.OnlineRMSettings | None = None,
        num_generations: int = 8,
        sampling: SamplingSettings = SamplingSettings(max_new_tokens=48, temperature=1.0),
        loss: objectives.GRPOLoss = "grpo",
        advantage_estimator: objectives.GRPOAdvantage = "group",
        scale_rewards: Literal["group", "batch", "none"] = "group",
        beta: float = 0.0,
        kl_estimator: Literal["k1", "k2", "k3", "k3+", "k3_iw"] = "k3",
        kl_placement: objectives.KLPlacement = "loss",
        epsilon_low: float | None = None,
        epsilon_high: float | None = None,
        dual_clip_c: float = 3.0,
        tau_pos: float = 1.0,
        tau_neg: float = 1.05,
        top_entropy_quantile: float | None = None,
        off_policy_mask_threshold: float | None = None,
        rollout_correction: objectives.RolloutCorrection = objectives.RolloutCorrection(),
        rft_threshold: float = 1.0,
        num_iterations: int = 1,
        minibatch_size: int | None = None,
        zero_variance_groups: Literal["keep", "drop", "resample"] = "keep",
        max_resample_rounds: int = 3,
        max_grad_norm: float | None = 1.0,
        rollout_backend: Literal["kv_cache", "vllm"] = "kv_cache",
        vllm: vllm_engine.VLLMSettings = vllm_engine.VLLMSettings(),
        optimizer: OptimizerSettings = OptimizerSettings(lr=2e-4),
        peak_flops: float = 200e9,
        table_rows: int = 4,
        table_every_n_steps: int = 10,
    ) -> None:
        """
        Args:
            policy: the model to train (name, dtype, LoRA); the reference is derived from it.
            rewards: reward functions, weights and bound arguments, summed; ``null``: :data:`.rewards.DEFAULT_REWARDS`.
            process_rewards: ``process``: step rewards (:data:`.steps.STEP_REWARDS`); ``null``: arithmetic_steps.
            step_splitter: ``process``: auto, worked, newline, none, or a separator regex (:func:`.steps.split_steps`).
            online_rm: a reward model scoring the completions, trained on them online (:mod:`.online_rm`).
            num_generations: G, completions sampled per prompt (the group).
            sampling: temperature, top-p, top-k, token budget of the rollouts (validation: greedy); logps at it.
            loss: GRPO-family loss: ``grpo``, ``dapo``, ``dr_grpo``, ``gspo``, ``dual_clip``, ``cispo``, ``sapo``.
            advantage_estimator: group, rloo, reinforce_pp, reinforce_pp_baseline, gdpo, online_rft or process.
            scale_rewards: divide centred rewards by the ``group`` std, the ``batch`` std, or not at all (``none``).
            beta: KL coefficient; 0 loads no reference and computes no reference logps.
            kl_estimator: per-token KL estimator ``k1``, ``k2``, ``k3``, ``k3+`` or ``k3_iw`` (:mod:`.losses.kl`).
            kl_placement: the KL in the ``loss`` or subtracted from the ``reward`` before the advantages.
            epsilon_low: lower clip range of the ratio (1 - epsilon_low); ``null``: the loss's default.
            epsilon_high: upper clip range (1 + epsilon_high); above epsilon_low is DAPO's clip-higher.
            dual_clip_c: ``dual_clip``: a negative-advantage token's loss is at most c |A|.
            tau_pos: ``sapo``: gate temperature of the positive-advantage tokens.
            tau_neg: ``sapo``: gate temperature of the negative-advantage tokens.
            top_entropy_quantile: train only on this fraction of highest-entropy tokens; ``null``: all tokens.
            off_policy_mask_threshold: drop A < 0 completions whose KL to the sampler exceeds it; ``null``: off.
            rollout_correction: TIS/MIS weights for the sampler-trainer mismatch (mode none|tis|mis, level, low, high).
            rft_threshold: ``online_rft``: a completion with a total reward >= it is correct.
            num_iterations: mu, optimisation passes over each sampled batch (one optimizer step each).
            minibatch_size: completions per forward/backward (gradient accumulation); ``null``: the whole batch.
            zero_variance_groups: all-equal reward groups: ``keep`` (advantage 0), ``drop``, ``resample`` (DAPO).
            max_resample_rounds: extra sampling rounds per step with ``resample``; the batch may stay short.
            max_grad_norm: clip the gradient norm of each optimizer step (``null``: no clipping).
            rollout_backend: sampler: ``kv_cache`` (built-in, batched, KV-cached) or ``vllm`` (:mod:`.vllm_engine`).
            vllm: the vLLM engine's settings (``rollout_backend: vllm``).
            optimizer: AdamW settings and learning-rate schedule (one scheduler step per optimizer step).
            peak_flops: peak FLOP/s of one device, for MFU (CPU here: ~200e9 fp32; H100: ~989e12 bf16).
            table_rows: completions added to the growing ``train/samples`` table at each table step.
            table_every_n_steps: training steps between table additions (0: no table).
        """
        super().__init__()
        self.strict_loading = False  # checkpoints hold only trainable weights (set before FSDP2 loads)
        self.save_hyperparameters()
        self.automatic_optimization = False
        if sampling.temperature <= 0:
            raise ValueError(f"model.sampling.temperature={sampling.temperature}: training samples, so it needs > 0")
        check_grpo_settings(num_generations, advantage_estimator, scale_rewards, num_iterations, beta)
        self.spec, self.sampling, self.optim_settings = policy, sampling, optimizer
        self.tokenizer = models.load_tokenizer(policy.name, policy.revision)
        self.rewards = grpo_rewards(rewards, process_rewards, step_splitter, advantage_estimator, sampling)
        self.rewards = orm.with_online_rm(self.rewards, online_rm, advantage_estimator)
        self.rewards.check_weights("model.rewards")  # all 0: every advantage 0
        weights = tuple((s.name, s.weight) for s in self.rewards.specs)  # gdpo
        settings = dict(group_size=num_generations, max_length=sampling.max_new_tokens, reward_weights=weights)
        self.objective = objectives.GRPOObjective(objectives.ObjectiveSettings.from_options(self.hparams, **settings))
        self.policy, self.frozen_reference = None, None  # built in configure_model
        self.val_means, self.throughput = PhaseMeans(), Throughput(peak_flops)
        self._train_rows, self._val_rows = [], []  # W&B sample-table rows
        self._generator, self._sampling_state, self._refill = None, None, None  # on_fit_start, on_load_checkpoint

    # -- networks -------------------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.policy is not None:
            return
        if self.device_mesh is not None and self.hparams.zero_variance_groups != "keep":
            raise ValueError("under FSDP2 (every forward is collective) GRPO needs zero_variance_groups=keep")
        self.policy = models.load_causal_lm(self.spec)
        if self.spec.lora is None and self.hparams.beta > 0:
            self.frozen_reference = models.frozen_copy(self.policy)
        self._flop_counts = model_flop_counts(self.policy)
        if self.device_mesh is not None:  # ModelParallelStrategy: FSDP2 (sampling keeps the ranks in lockstep)
            for net in (self.policy, self.frozen_reference):
                if net is not None:
                    fully_shard_lm(net, self.device_mesh)

    # -- training: the algorithm, then its steps in call order ---------------------------------------------------------
    def training_step(self, batch: PromptBatch, batch_idx: int) -> None:
        hp, started = self.hparams, time.perf_counter()
        # 1. sample G completions per prompt from the current policy (no grad; prompt encoded once)
        rollout = self.sample(batch, hp.num_generations)
        generated = time.perf_counter()
        # 2. score every completion with the reward functions
        scores = self.score(rollout, batch.extras)
        zero_std = zero_variance_groups(scores.total, hp.num_generations).float().mean().item()
        sampled = {**scores.stats(), **completion_stats(rollout), "frac_zero_std_groups": zero_std}
        sampled.update(orm.observe(self.rewards, rollout, scores, batch.extras))  # online RM: accuracy, update
        # 3. groups with all-equal rewards are kept, dropped or resampled (DAPO)
        rollout, scores, resampled = self.filter_groups(rollout, scores)
        # 4. old logps (mu > 1 or KL in the reward) and reference logps (beta > 0 only), no grad; advantages
        old = (hp.num_iterations > 1 or self.objective.needs_old_logps) and len(rollout)
        old_logps, ref_logps = self.frozen_logps(self.policy, rollout) if old else None, None
        if hp.beta > 0 and len(rollout):
            with models.reference_policy(self.policy, self.frozen_reference) as ref:
                ref_logps = self.frozen_logps(ref, rollout)
        advantages, adv_stats = self.advantages(rollout, scores, old_logps, ref_logps)
        scored = time.perf_counter()
        # 5. mu iterations x minibatches: accumulate gradients, clip, one optimizer step per iteration (one global step)
        update = self.update(rollout, advantages, old_logps, ref_logps)
        # 6. log
        timing = {"generation_s": generated - started, "scoring_s": scored - generated}
        timing["update_s"] = time.perf_counter() - scored
        advantages = objectives.sequence_advantages(advantages, rollout.response_mask)
        self.log_step(rollout, scores, advantages, {**sampled, **resampled, **adv_stats, **update}, timing)

    def sample(self, batch: PromptBatch, group_size: int, settings: SamplingSettings | None = None) -> Rollout:
        """``group_size`` completions per prompt (rows of a group consecutive), decoded."""
        settings, backend = settings or self.sampling, (self.hparams.rollout_backend, self.hparams.vllm)
        return sample_completions(self.policy, self.tokenizer, batch, group_size, settings, self._generator, *backend)

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

    def _refill_stream(self):
        if self._refill is None:
            dm = self.trainer.datamodule
            if dm is None or not hasattr(dm, "refill_batches"):
                raise ValueError("zero_variance_groups=resample needs a PromptDataModule (it draws fresh prompts)")
            self._refill = dm.refill_batches(self.global_rank, self.trainer.world_size)
        return self._refill

    @torch.no_grad()
    def frozen_logps(self, lm: torch.nn.Module, rollout: Rollout) -> torch.Tensor:
        """No-grad logps [N, R] in the training minibatches (bounded memory): old or reference logps."""
        chunks = row_chunks(len(rollout), self.hparams.minibatch_size, self.device)
        return torch.cat([self.logps(lm, rollout.select(rows)).logps for rows in chunks if len(rows)])

    def logps(self, lm: torch.nn.Module, rollout: Rollout, with_entropy: bool = False) -> TokenLogps:
        """Token logps [n, R] at the sampling temperature (without the KV cache when checkpointing gradients)."""
        return rollout_logps(lm, rollout, self.sampling.temperature, with_entropy, self.spec.gradient_checkpointing)

    def advantages(self, rollout: Rollout, scores: RewardResult, old_logps, ref_logps) -> tuple[torch.Tensor, dict]:
        """Advantages [N] or [N, R] and their metrics (:mod:`lit_rlhf.stages.distill` adds the teacher's signal)."""
        steps = step_tensors(self.rewards, self.tokenizer, rollout, scores)  # advantage_estimator=process only
        return self.objective.advantages(scores, rollout.response_mask, old_logps, ref_logps, steps)

    def update(self, rollout: Rollout, advantages, old_logps, ref_logps) -> dict[str, float]:
        """mu passes over the batch, one optimizer/scheduler step each (the first counted); mean loss and metrics."""
        opt, scheduler = self.optimizers(), self.lr_schedulers()
        units = objectives.loss_weights(self.hparams.loss, rollout.completion_lengths.to(self.device))
        weights = units / global_normalizer(units.sum())  # minibatch losses sum (DDP: average) to the full batch's
        chunks = row_chunks(len(rollout), self.hparams.minibatch_size, self.device, same_count_on_all_ranks=True)
        totals: dict[str, float] = {}

        def add(name: str, value, weight: float) -> None:
            totals[name] = totals.get(name, 0.0) + float(value) * weight

        for iteration in range(self.hparams.num_iterations):
            for rows in chunks:
                if len(rows) == 0:  # this rank ran out of rows; DDP still needs the same number of backward passes
                    self.manual_backward(sum(p.sum() for p in self.policy.parameters() if p.requires_grad) * 0.0)
                    continue
                mb, first = rollout.select(rows), iteration == 0
                need_entropy = (first and mb.entropy is None) or self.objective.needs_entropy
                out = self.logps(self.policy, mb, with_entropy=need_entropy)
                old = out.logps.detach() if old_logps is None else old_logps[rows]
                ref = None if ref_logps is None else ref_logps[rows]
                entropy = out.entropy if out.entropy is not None else mb.entropy
                loss, metrics = self.objective.loss(out.logps, entropy, old, ref, advantages[rows], mb)
                weight = float(weights[rows].sum())
                self.manual_backward(loss * weight)
                for name, value in {"loss": loss.detach(), **metrics}.items():
                    add(name, value, weight / self.hparams.num_iterations)
                if first and entropy is not None:  # per pass-0 metrics: entropy, sampler vs trainer logps
                    add("entropy", masked_mean(entropy, mb.response_mask), weight)
                if first and mb.sample_logps is not None:  # rollout/logp_diff/{mean,max}: sampler vs trainer
                    diff = losses.logp_diff_metrics(out.logps.detach(), mb.sample_logps, mb.response_mask)
                    add("rollout/logp_diff/mean", diff["rollout/logp_diff/mean"], weight)
                    totals.update({k: max(totals.get(k, 0.0), float(v)) for k, v in diff.items() if "max" in k})
            clip_and_step(self, opt, self.hparams.max_grad_norm, count=iteration == 0)
            scheduler.step()
        return {"loss": 0.0, **totals}

    # -- logging --------------------------------------------------------------------------------------------------
    def log_step(self, rollout: Rollout, scores: RewardResult, advantages, stats: dict, timing: dict) -> None:
        n, sync = len(rollout), self.trainer.world_size > 1  # train/* are the mean over ranks
        self.log_dict({f"train/{k}": v for k, v in stats.items() if k != "loss"}, sync_dist=sync, batch_size=max(n, 1))
        self.log("train/loss", stats["loss"], prog_bar=True, sync_dist=sync, batch_size=max(n, 1))
        self.log_dict({f"perf/{k}": v for k, v in timing.items()}, batch_size=max(n, 1))
        prompt, completion = int(rollout.prompt_mask.sum()), int(rollout.response_mask.sum())
        extra = int(self.hparams.beta > 0) + int(self.hparams.num_iterations > 1 or self.objective.needs_old_logps)
        mu, full = self.hparams.num_iterations, self.spec.lora is None  # sampling, old, ref forwards; mu passes
        flops = rollout_step_flops(self._flop_counts, prompt, completion, 1 + extra, mu, full) if n else 0.0
        perf = self.throughput.step(n, prompt + completion, flops)  # samples: completions; tokens
        self.log_dict(perf, batch_size=max(n, 1))
        every, step = self.hparams.table_every_n_steps, self.global_step  # this step's rollout batch, counted
        if every and n and (step - 1) % every == 0:
            for i in range(0, n, max(1, n // self.hparams.table_rows))[: self.hparams.table_rows]:
                p, reward = rollout.prompts[int(rollout.prompt_index[i])], float(scores.total[i])
                self._train_rows.append([self.global_step, p, rollout.completions[i], reward, float(advantages[i])])
            columns = ["step", "prompt", "completion", "reward", "advantage"]
            log_table(self.trainer, "train/samples", columns, self._train_rows, step=self.global_step)

    # -- validation -----------------------------------------------------------------------------------------------
    def validation_step(self, batch: PromptBatch, batch_idx: int) -> None:
        rollout = self.sample(batch, 1, SamplingSettings(max_new_tokens=self.sampling.max_new_tokens, temperature=0.0))
        scores = self.score(rollout, batch.extras)
        n, lengths = len(rollout), rollout.completion_lengths.float()
        values = {"val/completions/mean_length": lengths.mean(), "val/completions/truncated_rate": rollout.truncated}
        means = self.val_means.update({k: v.float().mean() for k, v in values.items()}, weight=n)
        answers = batch.extras.get("answer", [None] * n)
        for values, weight in validation_means(scores.total, rollout.completions, answers):  # rewards/mean, accuracy
            means.update(self.val_means.update(values, weight=weight))
        self.log_dict(means, on_epoch=True, on_step=False, batch_size=n)
        for i in range(min(n, self.hparams.table_rows - len(self._val_rows))):
            self._val_rows.append([batch.prompts[i], rollout.completions[i], answers[i], float(scores.total[i])])

    def on_validation_epoch_end(self) -> None:
        if self._val_rows and not self.trainer.sanity_checking:
            columns = ["prompt", "completion", "answer", "reward"]
            log_table(self.trainer, "val/samples", columns, self._val_rows, step=self.global_step)
        self._val_rows = []

    # -- hooks: sampling generator, optimizer, checkpoints, export -----------------------------------------------------
    def on_fit_start(self) -> None:
        if self._generator is None:  # sampling noise: one stream for the global batch (every rank), restored on resume
            self._generator = torch.Generator(device=self.device).manual_seed(int(torch.initial_seed()))
            if self._sampling_state is not None:  # resumed: on the training device (set in on_load_checkpoint)
                self._generator.set_state(self._sampling_state)
        self.throughput.start()

    def configure_optimizers(self):
        params = [p for p in self.policy.parameters() if p.requires_grad]
        total = self.trainer.estimated_stepping_batches * self.hparams.num_iterations  # mu scheduler steps per step
        return build_optimizer(params, self.optim_settings, total)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = trainable_state_dict(self, checkpoint["state_dict"])
        checkpoint["rng"] = capture_rng()
        if self._generator is not None:
            checkpoint["sampling_rng"] = self._generator.get_state()
        checkpoint["train_table_rows"] = list(self._train_rows)  # each table version holds every row so far
        orm.save(self.rewards, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        restore_rng(checkpoint.get("rng"))
        self._generator, self._sampling_state = None, checkpoint.get("sampling_rng")
        self._train_rows = [list(row) for row in checkpoint.get("train_table_rows", [])]
        orm.load(self.rewards, checkpoint)

    def export(self, out_dir: Path, dtype: str | None = None) -> dict[str, str]:
        rank_zero = self.trainer.is_global_zero
        written = models.export_pretrained(self.policy, self.tokenizer, out_dir, self.spec, rank_zero, dtype)
        return {**written, **orm.export(self.rewards, out_dir, rank_zero)}  # online RM: export/online_rm
