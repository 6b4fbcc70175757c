"""Proximal Policy Optimization for RLHF (Schulman et al. 2017; Ziegler et al. 2019; InstructGPT, Ouyang et al. 2022
§3.5; seed 000 §5, seed 002).

Four roles: the **actor** (the policy, trained), the **critic** (:mod:`lit_rlhf.value_models`: a separate value
model initialised from the reward model or the policy, or a value head on the policy's frozen base through its own
LoRA adapter; trained, with its own optimizer and learning rate), the **reference** (the policy with its adapters
disabled, or a frozen copy for a full fine-tune) and the **reward** (an exported reward model and/or reward
functions from :mod:`lit_rlhf.rewards`; frozen). One training step is one PPO iteration on a batch of prompts:

1. rollout: sample completions from the policy (KV cache, :mod:`lit_rlhf.rollout`);
2. score: reward model + reward functions -> ``scores`` [N]; minus ``missing_eos_penalty`` where no EOS came;
   normalised (``score_norm``);
3. experience (no grad, :mod:`lit_rlhf.experience`): ``old_logps``, ``ref_logps``, ``values``; dense rewards
   ``-beta KL_t`` on every token + the clipped score on the last (InstructGPT Eq. 2); GAE (Schulman et al. 2016,
   Eq. 16) -> ``advantages`` (whitened) and ``returns``;
4. update: ``ppo_epochs`` passes over shuffled minibatches; clipped surrogate (PPO Eq. 7) minus ``entropy_coef`` x
   entropy -> actor step; clipped value loss -> critic step; the epoch loop stops once a minibatch's approx-KL to
   the sampling policy exceeds ``target_kl``;
5. KL coefficient update (:mod:`lit_rlhf.kl_control`: fixed, or adaptive towards a target KL, Ziegler et al. §2.2).

Several processes (DDP, or FSDP2 sharding policy, reference and a separate critic; the reward model is replicated)
give the single-process update at the same global batch when a rank's minibatch is its whole batch: sampling noise
is drawn for the global batch, scores are normalised and advantages whitened over all ranks, losses are token means
over all ranks' minibatch tokens, and the KL controller sees the global KL. (With smaller minibatches each rank
shuffles its own rows, so the global minibatches differ from one process's.)

Deliberate simplifications: logps are recomputed after sampling (one extra forward, so the first ratio is exactly
1); a step counts as one ``global_step`` however many optimizer steps it makes (``max_steps`` = PPO iterations).

    python -m lit_rlhf.experiments.ppo                                   # SmolLM2-135M + LoRA, rule reward, CPU
    python -m lit_rlhf.experiments.ppo --config experiments/ppo/tiny.yaml --output_dir runs/ppo-tiny
    sbatch slurm/train.sbatch ppo --config experiments/ppo/qwen2.5-0.5b-imdb.yaml
"""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch import nn

from lit_rlhf import models, value_models
from lit_rlhf.advantages import gae, whiten
from lit_rlhf.callbacks import log_table
from lit_rlhf.data.tasks import is_correct
from lit_rlhf.experience import (Experience, LogitsRecorder, RunningMoments, ScoreNorm, apply_missing_eos_penalty,
                                 dense_rewards, explained_variance, minibatches, normalize_scores, sequence_sums,
                                 update_moments)
from lit_rlhf.distributed import GlobalBatchNoise, fully_shard_lm, fully_shard_root, global_masked_whiten, lockstep_done
from lit_rlhf.kl_control import KLSettings, build_kl_controller
from lit_rlhf.logprobs import masked_mean, response_logps
from lit_rlhf.losses import ppo_policy_loss, ppo_value_loss
from lit_rlhf.metrics import PhaseMeans, Throughput, model_flop_counts, training_flops
from lit_rlhf.optim import OptimizerSettings, build_optimizer, trainable_state_dict
from lit_rlhf.rewards import RewardComposer, RewardSpec
from lit_rlhf.rollout import ROLLOUT_BACKENDS, SamplingSettings, decode, group_index
from lit_rlhf.types import PromptBatch, Rollout
from lit_rlhf.value_models import CriticSettings, RewardModelSettings


DEFAULT_REWARDS = (RewardSpec("numeric_correctness", 1.0), RewardSpec("numeric_closeness", 0.5))
"""``reward_model: null, rewards: null`` (the default): 1 when the completion's last number is the answer, plus 0.5 x
``numeric_closeness`` = ``exp(-|pred - answer| / 10)`` (partial credit for a close answer, so the score moves before answers are right)."""


class PPOModule(L.LightningModule):
    def __init__(
        self,
        policy: models.ModelSpec = models.ModelSpec(),
        critic: CriticSettings = CriticSettings(init="shared_base"),
        reward_model: RewardModelSettings | None = None,
        rewards: list[RewardSpec] | None = None,
        sampling: SamplingSettings = SamplingSettings(max_new_tokens=24, temperature=0.7),
        samples_per_prompt: int = 1,
        ppo_epochs: int = 2,
        minibatch_size: int = 4,
        clip_range: float = 0.2,
        clip_range_value: float = 0.2,
        entropy_coef: float = 0.0,
        gamma: float = 1.0,
        lam: float = 0.95,
        kl: KLSettings = KLSettings(),
        score_clip: float | None = 5.0,
        missing_eos_penalty: float | None = 0.25,
        score_norm: ScoreNorm = "none",
        whiten_advantages: bool = True,
        target_kl: float | None = None,
        max_grad_norm: float | None = 1.0,
        optimizer: OptimizerSettings = OptimizerSettings(lr=1e-4),
        critic_optimizer: OptimizerSettings = OptimizerSettings(lr=3e-4),
        rollout_backend: str = "kv_cache",
        peak_flops: float = 200e9,
        table_rows: int = 8,
        table_every_n_steps: int = 10,
    ) -> None:
        """
        Args:
            policy: the actor (name, dtype, LoRA); the reference is derived from it.
            critic: the value model: ``reward_model``, ``policy`` or ``shared_base`` init, its LoRA.
            reward_model: an exported sequence-classification reward model scoring each completion; null: none.
            rewards: reward functions by registry name or import path, with weights and kwargs, added to the score;
                null: :data:`DEFAULT_REWARDS` when there is no reward model, none otherwise.
            sampling: rollout settings (token budget, temperature, top-k/top-p).
            samples_per_prompt: completions sampled per prompt.
            ppo_epochs: passes over each rollout batch.
            minibatch_size: completions per update minibatch.
            clip_range: PPO ratio clip epsilon (seed 000: 0.2).
            clip_range_value: how far a value may move from its old value before the value loss is clipped.
            entropy_coef: weight of the entropy bonus (mean token entropy of the policy), 0 = off.
            gamma: GAE discount.
            lam: GAE lambda.
            kl: KL penalty in the reward: initial coefficient, adaptive target/horizon or fixed, estimator.
            score_clip: scores are clipped to [-score_clip, score_clip] in the reward (seed 000: 5); null: no clip.
            missing_eos_penalty: subtracted from the score of a completion that hit the token budget; null: off.
            score_norm: ``none``, ``batch`` (whiten per batch) or ``running`` (mean/std over the run).
            whiten_advantages: whiten advantages over the batch's response tokens.
            target_kl: stop the epoch loop when a minibatch's approx-KL to the sampling policy exceeds it; null: off.
            max_grad_norm: gradient-norm clip of each optimizer step; null: off.
            optimizer: AdamW + schedule of the actor.
            critic_optimizer: AdamW + schedule of the critic.
            rollout_backend: generation backend (:data:`lit_rlhf.rollout.ROLLOUT_BACKENDS`).
            peak_flops: peak FLOP/s of one device, for MFU (CPU here: ~200e9 fp32; H100: ~989e12 bf16).
            table_rows: completions per W&B sample table.
            table_every_n_steps: log a table of training samples every this many steps.
        """
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        if reward_model is None and rewards is None:
            rewards = list(DEFAULT_REWARDS)
        if reward_model is None and not rewards:
            raise ValueError("PPO needs a reward: set model.reward_model and/or model.rewards")
        if rollout_backend not in ROLLOUT_BACKENDS:
            raise ValueError(f"unknown rollout_backend {rollout_backend!r}; available: {sorted(ROLLOUT_BACKENDS)}")
        # typed settings kept as given (under LightningCLI, hparams hold their dict form)
        self.spec, self.critic_settings, self.reward_settings, self.sampling = policy, critic, reward_model, sampling
        self.kl_settings, self.actor_optim, self.critic_optim = kl, optimizer, critic_optimizer
        self.composer = RewardComposer(rewards) if rewards else None
        self.kl_ctl = build_kl_controller(kl)
        self.moments = RunningMoments()
        self.policy: nn.Module | None = None
        self.val_means = PhaseMeans()
        self.throughput = Throughput(peak_flops)
        self._val_rows: list[list] = []

    # -- networks -------------------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        rm = self.reward_settings  # a hub id or an existing export is used as is; a missing local export is trained first
        if rm is not None and rm.train_args is not None and not Path(rm.path).exists():
            if self.trainer.is_global_zero:
                value_models.train_missing_reward_model(self.reward_settings)
            self.trainer.strategy.barrier()

    def configure_model(self) -> None:
        if self.policy is not None:
            return
        rm = self.reward_settings
        self.policy = models.load_causal_lm(self.spec)
        self.tokenizer = models.load_tokenizer(self.spec.name, self.spec.revision)
        self.frozen_reference = models.frozen_copy(self.policy) if self.spec.lora is None else None
        self.reward_model = value_models.RewardModelScorer(rm, self.spec.dtype) if rm is not None else None
        self.critic = value_models.build_critic(self.critic_settings, self.policy, self.spec, rm.path if rm is not None else None)
        self.eos_token_ids = value_models.eos_token_ids(self.tokenizer, self.policy)
        self.suffix = value_models.turn_suffix(self.tokenizer) if rm is not None and rm.chat_template else ""
        self._flop_counts = model_flop_counts(self.policy)
        if self._trainer is not None and isinstance(self.trainer.strategy, DDPStrategy):  # actor and critic steps each
            self.trainer.strategy._ddp_kwargs["find_unused_parameters"] = True  # leave the other's parameters unused
        if self.device_mesh is not None:  # ModelParallelStrategy: FSDP2 on policy, reference, critic (reward model: replicated)
            if not isinstance(self.critic, value_models.ValueModel):
                raise ValueError("under FSDP2 the critic must be a separate model (critic.init = policy or reward_model)")
            for net in (self.policy, self.frozen_reference):
                if net is not None:
                    fully_shard_lm(net, self.device_mesh)
            fully_shard_lm(self.critic.decoder, self.device_mesh)
            fully_shard_root(self.critic, self.device_mesh)  # the value head

    @property
    def temperature(self) -> float:
        return self.sampling.temperature or 1.0  # greedy decoding: logps of the untempered distribution

    def rows(self, r: Rollout) -> tuple[torch.Tensor, ...]:
        return r.prompt_ids, r.prompt_mask, r.response_ids, r.response_mask, r.prompt_index

    # -- 1. rollout, 2. score -------------------------------------------------------------------------------------
    def generate(self, batch: PromptBatch, generator: torch.Generator) -> Rollout:
        """Completions of the batch's prompts from the current policy, text decoded."""
        index = group_index(batch.input_ids.shape[0], self.hparams.samples_per_prompt, self.device)
        sample = ROLLOUT_BACKENDS[self.hparams.rollout_backend]
        noise = GlobalBatchNoise(generator, batch.input_ids.shape[0], self.hparams.samples_per_prompt)
        with models.merged_lora(self.policy) as policy:  # LoRA folded into the weights: a faster decode step
            rollout = sample(policy, batch.input_ids, batch.attention_mask, index, self.sampling, self.eos_token_ids,
                             self.tokenizer.pad_token_id, generator, all_done=lockstep_done(policy), noise=noise)
        rollout.prompts, rollout.completions = list(batch.prompts), decode(self.tokenizer, rollout)
        return rollout

    def score(self, rollout: Rollout, batch: PromptBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """(scores [N] before penalty/normalisation, per-source statistics): reward model + reward functions."""
        index = rollout.prompt_index.tolist()
        prompts = [batch.prompts[i] for i in index]
        scores, stats = torch.zeros(len(index)), {}
        if self.reward_model is not None:
            finished = (~rollout.truncated).tolist()
            rm = self.reward_model.scores(value_models.scoring_texts(prompts, rollout.completions, finished, self.suffix)).cpu()
            scores += self.reward_settings.weight * rm
            stats["rewards/reward_model/mean"] = float(rm.mean())
        if self.composer is not None:
            result = self.composer(prompts, rollout.completions, {k: [v[i] for i in index] for k, v in batch.extras.items()})
            scores += result.total
            stats.update({k: v for k, v in result.stats().items() if k.count("/") == 2})
        return scores.to(self.device), stats

    def normalize(self, scores: torch.Tensor) -> torch.Tensor:
        """``score_norm`` over the scores of all ranks (gathered; equal rollouts per rank); this rank's part."""
        mode, world = self.hparams.score_norm, self.trainer.world_size
        if mode == "none":
            return scores
        everyone = self.all_gather(scores).reshape(-1) if world > 1 else scores  # [W n], rank-major
        if mode == "running":
            self.moments = update_moments(self.moments, everyone)
        return normalize_scores(everyone, mode, self.moments).reshape(world, -1)[self.global_rank]

    # -- 3. experience --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def make_experience(self, rollout: Rollout, scores: torch.Tensor) -> Experience:
        hp, args, mask = self.hparams, self.rows(rollout), rollout.response_mask
        old_logps = response_logps(self.policy, *args, temperature=self.temperature).logps
        with models.reference_policy(self.policy, self.frozen_reference) as ref:
            ref_logps = response_logps(ref, *args, temperature=self.temperature).logps
        values = self.critic(*args)
        rewards, kl = dense_rewards(scores, old_logps, ref_logps, mask, self.kl_ctl.value, self.kl_settings.estimator, hp.score_clip)
        advantages, returns = gae(rewards, values, mask, hp.gamma, hp.lam)
        if hp.whiten_advantages:
            advantages = whiten(advantages, mask) if self.trainer.world_size == 1 else global_masked_whiten(advantages, mask)
        return Experience(rollout, old_logps, ref_logps, values, scores, kl, rewards, advantages, returns)

    # -- 4. update ------------------------------------------------------------------------------------------------
    def policy_logps(self, r: Rollout) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logps [N, R] with grad, mean token entropy with grad or None when the bonus is off)."""
        if self.hparams.entropy_coef == 0:
            return response_logps(self.policy, *self.rows(r), temperature=self.temperature).logps, None
        recorder = LogitsRecorder(self.policy)
        logps = response_logps(recorder, *self.rows(r), temperature=self.temperature).logps
        return logps, masked_mean(recorder.entropy(r, self.temperature), r.response_mask)

    def optimizer_step(self, optimizer, loss: torch.Tensor) -> None:
        """zero_grad -> backward -> clip -> step, through the strategy (precision/distributed handling)."""
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        if self.hparams.max_grad_norm is not None:
            self.clip_gradients(optimizer, gradient_clip_val=self.hparams.max_grad_norm, gradient_clip_algorithm="norm")
        self.trainer.strategy.optimizer_step(optimizer.optimizer, closure=lambda: None)

    def update(self, exp: Experience, generator: torch.Generator) -> dict[str, float]:
        """ppo_epochs x shuffled minibatches of actor and critic steps; returns the mean of each minibatch metric."""
        hp = self.hparams
        actor_opt, critic_opt = self.optimizers()
        stats, stopped = defaultdict(list), False
        for _epoch in range(hp.ppo_epochs):
            for rows in minibatches(len(exp.scores), hp.minibatch_size, generator):
                mb = exp.select(rows.to(self.device))
                mask = mb.mask
                # actor: clipped surrogate - entropy bonus; stop early once too far from the sampling policy
                share = self.token_share(mask)  # token means over the minibatches of all ranks (1 with one process)
                logps, entropy = self.policy_logps(mb.rollout)
                policy_loss, metrics = ppo_policy_loss(logps, mb.old_logps, mb.advantages, mask, clip_range=hp.clip_range)
                policy_loss, metrics = policy_loss * share, {k: v * share for k, v in metrics.items()}
                entropy = None if entropy is None else entropy * share
                if hp.target_kl is not None and self.rank_mean(metrics["policy/approxkl"]) > hp.target_kl:
                    stopped = True
                    break
                loss = policy_loss if entropy is None else policy_loss - hp.entropy_coef * entropy
                self.optimizer_step(actor_opt, loss)
                # critic: clipped value loss against the GAE returns
                values = self.critic(*self.rows(mb.rollout))
                value_loss, value_metrics = ppo_value_loss(values, mb.values, mb.returns, mask, clip_range_value=hp.clip_range_value)
                value_loss, value_metrics = value_loss * share, {k: v * share for k, v in value_metrics.items()}
                self.optimizer_step(critic_opt, value_loss)
                metrics.update(value_metrics, **{"loss/policy": policy_loss.detach(), "loss/value": value_loss.detach()})
                for k, v in metrics.items():
                    stats[k].append(float(v))
            if stopped:
                break
        out = {k: sum(v) / len(v) for k, v in stats.items()}
        return {**out, "ppo/updates": float(len(stats["loss/policy"])), "ppo/early_stopped": float(stopped)}

    def token_share(self, mask: torch.Tensor) -> torch.Tensor | float:
        """W x this rank's share of the minibatch tokens of all ranks: a rank's token-mean loss times it, averaged
        over ranks (as DDP/FSDP2 average gradients), is the token mean over the global minibatch."""
        world = self.trainer.world_size
        if world == 1:
            return 1.0
        tokens = mask.sum().float()
        return tokens * world / self.trainer.strategy.reduce(tokens.clone(), reduce_op="sum").clamp(min=1.0)

    def rank_mean(self, value: torch.Tensor | float) -> float:
        """The mean of ``value`` over ranks (every rank gets the same number, e.g. for early stopping)."""
        if self.trainer.world_size == 1:
            return float(value)
        return float(self.trainer.strategy.reduce(torch.as_tensor(value, dtype=torch.float32, device=self.device).clone(), reduce_op="mean"))

    # -- the iteration --------------------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        seed = torch.initial_seed() % 2**63
        self.generator = torch.Generator(self.device).manual_seed(seed)  # sampling (on the model's device)
        self.shuffle_generator = torch.Generator().manual_seed(seed)  # minibatch order
        self.throughput.start()

    def training_step(self, batch: PromptBatch, batch_idx: int) -> None:
        hp, clock = self.hparams, [time.perf_counter()]
        # 1. rollout: sample completions from the current policy
        rollout = self.generate(batch, self.generator)
        clock.append(time.perf_counter())
        # 2. score them (reward model + reward functions), penalise missing EOS, normalise
        raw = self.score(rollout, batch)
        scores = apply_missing_eos_penalty(raw[0], rollout.truncated, hp.missing_eos_penalty)
        scores = self.normalize(scores)
        # 3. experience: old/ref logps, values; dense rewards (-beta KL per token, score on the last); GAE
        exp = self.make_experience(rollout, scores)
        clock.append(time.perf_counter())
        # 4. PPO epochs of actor and critic minibatch steps
        update_stats = self.update(exp, self.shuffle_generator)
        clock.append(time.perf_counter())
        # 5. KL coefficient update from this batch's mean sequence KL
        kl_coef = self.kl_ctl.value
        kl = self.rank_mean(sequence_sums(exp.kl, exp.mask).mean())  # equal rollouts per rank: the global mean
        self.kl_ctl.update(kl, len(exp.scores) * self.trainer.world_size)  # the global batch's rollouts
        # 6. one global step per iteration; LR schedules; log
        self.count_iteration()
        for scheduler in self.lr_schedulers():
            scheduler.step()
        timing = {f"perf/{k}_s": b - a for k, a, b in zip(("generation", "experience", "update"), clock, clock[1:])}
        self.log_iteration(exp, raw, update_stats, timing, kl, kl_coef)

    def count_iteration(self) -> None:
        """Under manual optimization Lightning counts every ``LightningOptimizer.step`` as a global step; the inner
        steps go through the strategy uncounted and the iteration counts once (``max_steps`` = PPO iterations)."""
        progress = self.trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
        progress.increment_ready()
        progress.increment_completed()

    def log_iteration(self, exp: Experience, raw: tuple[torch.Tensor, dict], update_stats: dict, timing: dict, kl: float, kl_coef: float) -> None:
        r, mask, (scores, score_stats) = exp.rollout, exp.mask, raw
        non_score = float(sequence_sums(-kl_coef * exp.kl, mask).mean())
        metrics = {
            "objective/kl": kl, "objective/non_score_reward": non_score, "objective/rlhf_reward": float(scores.mean()) + non_score,
            "objective/kl_coef": kl_coef, "score/mean": scores.mean(), "score/std": scores.std(unbiased=False),
            "score/min": scores.min(), "score/max": scores.max(), "response_length": r.completion_lengths.float().mean(),
            "truncated": r.truncated.float().mean(), "values/mean": masked_mean(exp.values, mask),
            "returns/mean": masked_mean(exp.returns, mask), "advantages/mean": masked_mean(exp.advantages, mask),
            "value/explained_variance": explained_variance(exp.values, exp.returns, mask), **score_stats, **update_stats,
        }
        if r.entropy is not None:
            metrics["objective/entropy"] = masked_mean(r.entropy, mask)
        score_mean = metrics.pop("score/mean")
        sync = self.trainer.world_size > 1  # train/* are the mean over ranks
        self.log("train/score/mean", float(score_mean), prog_bar=True, batch_size=len(exp.scores), sync_dist=sync)
        self.log_dict({f"train/{k}": float(v) for k, v in metrics.items()}, batch_size=len(exp.scores), sync_dist=sync)
        tokens = int(r.prompt_mask[r.prompt_index].sum() + mask.sum())
        scored = int(mask.sum())
        forward = training_flops(*self._flop_counts, tokens, scored, False, 0) / 2
        forward_backward = training_flops(*self._flop_counts, tokens, scored, self.spec.lora is None, 0)
        passes = update_stats["ppo/updates"] * self.hparams.minibatch_size / len(exp.scores)
        flops = 4 * forward + 2 * passes * forward_backward  # sample, old, ref, values; actor + critic updates (approx.)
        self.log_dict({**timing, **self.throughput.step(len(exp.scores), tokens, flops)}, batch_size=len(exp.scores))
        if (self.global_step - 1) % self.hparams.table_every_n_steps == 0:
            log_table(self.trainer, "train/samples", ["prompt", "completion", "score", "kl"], self.table_rows(exp.rollout, scores, exp), step=self.global_step)

    def table_rows(self, r: Rollout, scores: torch.Tensor, exp: Experience | None = None, kl: torch.Tensor | None = None) -> list[list]:
        kl = sequence_sums(exp.kl, exp.mask) if exp is not None else kl
        index = r.prompt_index.tolist()
        return [[r.prompts[index[i]], r.completions[i], float(scores[i]), float(kl[i])] for i in range(min(self.hparams.table_rows, len(index)))]

    # -- validation: held-out prompts, fixed sampling seed --------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self.val_generator = torch.Generator(self.device).manual_seed(1234)

    def validation_step(self, batch: PromptBatch, batch_idx: int) -> None:
        rollout = self.generate(batch, self.val_generator)
        scores, stats = self.score(rollout, batch)
        with torch.no_grad():
            logps = response_logps(self.policy, *self.rows(rollout), temperature=self.temperature).logps
            with models.reference_policy(self.policy, self.frozen_reference) as ref:
                ref_logps = response_logps(ref, *self.rows(rollout), temperature=self.temperature).logps
        kl = sequence_sums(logps - ref_logps, rollout.response_mask)
        metrics = {"val/score/mean": scores.mean(), "val/objective/kl": kl.mean(),
                   "val/response_length": rollout.completion_lengths.float().mean(), **{f"val/{k}": v for k, v in stats.items()}}
        means = self.val_means.update(metrics, weight=len(scores))
        answers = batch.extras.get("answer")
        if answers is not None:  # a verifiable task: does the score track correctness (or is it being gamed)?
            pairs = [(c, answers[i]) for c, i in zip(rollout.completions, rollout.prompt_index.tolist()) if answers[i] is not None]
            if pairs:
                accuracy = sum(is_correct(c, a) for c, a in pairs) / len(pairs)
                means.update(self.val_means.update({"val/accuracy": accuracy}, weight=len(pairs)))
        self.log_dict(means, on_epoch=True, on_step=False, batch_size=len(scores))
        if len(self._val_rows) < self.hparams.table_rows:
            self._val_rows += self.table_rows(rollout, scores, kl=kl)[: self.hparams.table_rows - len(self._val_rows)]

    def on_validation_epoch_end(self) -> None:
        if self._val_rows and not self.trainer.sanity_checking:
            log_table(self.trainer, "val/samples", ["prompt", "completion", "score", "kl"], self._val_rows, step=self.global_step)
        self._val_rows = []

    # -- optimizers, checkpoints, export --------------------------------------------------------------------------
    def configure_optimizers(self):
        total = self.trainer.estimated_stepping_batches
        actor = build_optimizer(value_models.actor_parameters(self.policy), self.actor_optim, total)
        critic = build_optimizer(self.critic.trainable_parameters(), self.critic_optim, total)
        return [actor, critic]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = trainable_state_dict(self, checkpoint["state_dict"])
        checkpoint["kl_controller"] = self.kl_ctl.state_dict()
        checkpoint["score_moments"] = self.moments.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.strict_loading = False
        self.kl_ctl.load_state_dict(checkpoint["kl_controller"])
        self.moments = RunningMoments(**checkpoint["score_moments"])

    def export(self, out_dir: Path) -> dict[str, str]:
        """The policy (``merged`` + ``adapter``); a shared-base value adapter is saved beside it, never merged."""
        return models.export_pretrained(self.policy, self.tokenizer, out_dir)
