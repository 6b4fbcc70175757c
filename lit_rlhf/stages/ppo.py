"""Proximal Policy Optimization for RLHF (Schulman et al. 2017; Ziegler et al. 2019; Ouyang et al. 2022 §3.5).

Roles: the **actor** (the policy, trained); the **critic** (:mod:`lit_rlhf.critics`: a value model from the reward
model or the policy, or a value head on the policy's frozen base with its own LoRA adapter; its own optimizer); the
**reference** (adapters disabled, or a frozen copy); the **reward** (an RM export and/or reward functions, frozen; or
an online-updated RM, :mod:`lit_rlhf.online_rm`). A training step (what ``max_steps`` counts) is one PPO iteration:

1. rollout: sample completions (:func:`lit_rlhf.rollout.sample_completions`);
2. score: RM + reward functions (an online RM then trains), minus ``missing_eos_penalty`` if no EOS; ``score_norm``;
3. advantages (no grad, :mod:`lit_rlhf.experience`): old/ref logps and values; dense rewards ``-beta KL_t`` per token
   + the clipped score on the last (InstructGPT Eq. 2); GAE (Schulman et al. 2016, Eq. 16), whitened; 0 if no reward;
4. update: ``ppo_epochs`` x shuffled minibatches: clipped surrogate (PPO Eq. 7) minus ``entropy_coef`` x entropy
   (actor) and clipped value loss (critic) in one backward, one step of each optimizer (the first counts as the
   global step, :func:`lit_rlhf.optim.clip_and_step`); stops once a minibatch's approx-KL exceeds ``target_kl``;
5. KL coefficient (:mod:`lit_rlhf.kl_control`: fixed or adaptive, Ziegler et al. §2.2); learning-rate schedules; 6. log.

DDP/FSDP2 (policy, reference and a separate critic sharded; reward models replicated) equal one process at the same
global batch when a rank's minibatch is its whole batch (noise drawn for the global batch; normalisation, whitening,
token means and the KL over all ranks; one actor + critic backward). Logps are recomputed after sampling (ratio 1).

    python -m lit_rlhf.experiments.ppo                                   # SmolLM2-135M + LoRA, rule reward, CPU
    python -m lit_rlhf.experiments.ppo --config experiments/ppo/tiny.yaml --output_dir runs/ppo-tiny
"""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path
from typing import Literal

import lightning as L
import torch

from lit_rlhf import critics, experience, models, objectives, reward_models, vllm_engine
from lit_rlhf import online_rm as orm
from lit_rlhf.critics import CriticSettings
from lit_rlhf.distributed import fully_shard_lm, fully_shard_root, global_masked_whiten, global_normalizer, rank_mean
from lit_rlhf.experience import Experience, LogitsRecorder, RunningMoments, ScoreNorm
from lit_rlhf.kl_control import KLSettings, build_kl_controller
from lit_rlhf.logprobs import masked_mean, sequence_logps
from lit_rlhf.losses import ppo_value_loss
from lit_rlhf.metrics import PhaseMeans, Throughput, log_table, model_flop_counts, rollout_step_flops
from lit_rlhf.optim import OptimizerSettings, build_optimizer, clip_and_step, trainable_state_dict
from lit_rlhf.reward_models import RewardModelSettings
from lit_rlhf.rewards import DEFAULT_REWARDS, RewardComposer, RewardSpec, add_rewards, scoring_texts, validation_means
from lit_rlhf.rollout import SamplingSettings, rollout_logps, sample_completions
from lit_rlhf.types import PromptBatch, Rollout

TABLE_COLUMNS = ["prompt", "completion", "reward", "kl"]  # of the train/samples and val/samples tables


class PPOModule(L.LightningModule):
    """PPO with GAE, a clipped policy and value loss, and a fixed or adaptive KL coefficient."""

    def __init__(
        self,
        policy: models.ModelSpec = models.ModelSpec(),
        critic: CriticSettings = CriticSettings(init="shared_base"),
        reward_model: RewardModelSettings | None = None,
        rewards: list[RewardSpec] | None = None,
        online_rm: orm.OnlineRMSettings | None = None,
        sampling: SamplingSettings = SamplingSettings(max_new_tokens=24, temperature=0.7),
        samples_per_prompt: int = 1,
        ppo_epochs: int = 2,
        minibatch_size: int = 4,
        policy_loss: objectives.PPOLoss = "ppo",
        clip_range: float = 0.2,
        dual_clip_c: float = 3.0,
        clip_range_value: float = 0.2,
        entropy_coef: float = 0.0,
        gamma: float = 1.0,
        lam: float = 0.95,
        advantage_estimator: objectives.PPOAdvantage = "gae",
        kl: KLSettings = KLSettings(),
        score_clip: float | None = 5.0,
        missing_eos_penalty: float | None = 0.25,
        score_norm: ScoreNorm = "none",
        whiten_advantages: bool = True,
        target_kl: float | None = None,
        max_grad_norm: float | None = 1.0,
        optimizer: OptimizerSettings = OptimizerSettings(lr=1e-4),
        critic_optimizer: OptimizerSettings = OptimizerSettings(lr=3e-4),
        rollout_backend: Literal["kv_cache", "vllm"] = "kv_cache",
        vllm: vllm_engine.VLLMSettings = vllm_engine.VLLMSettings(),
        rollout_correction: objectives.RolloutCorrection = objectives.RolloutCorrection(),
        peak_flops: float = 200e9,
        table_rows: int = 8,
        table_every_n_steps: int = 10,
    ) -> None:
        """
        Args:
            policy: the actor (name, dtype, LoRA); the reference is derived from it.
            critic: the value model: ``reward_model``, ``policy`` or ``shared_base`` init, its LoRA.
            reward_model: an exported sequence-classification reward model scoring each completion; null: none.
            rewards: reward functions, weights and kwargs, added to the score; null: the defaults without an RM.
            online_rm: an outcome RM scoring every completion, trained on verifier-labelled samples (GRPO's).
            sampling: rollout settings (token budget, temperature, top-k/top-p).
            samples_per_prompt: completions sampled per prompt.
            ppo_epochs: passes over each rollout batch.
            minibatch_size: completions per update minibatch.
            policy_loss: ``ppo`` (clipped surrogate) or ``dual_clip`` (A < 0 token loss at most ``dual_clip_c`` |A|).
            clip_range: PPO ratio clip epsilon (0.2 did best in Schulman et al. 2017, §6.1).
            dual_clip_c: the dual-clip bound c (> 1; Ye et al. 2020 and verl use 3).
            clip_range_value: how far a value may move from its old value before the value loss is clipped.
            entropy_coef: weight of the entropy bonus (mean token entropy of the policy), 0 = off.
            gamma: GAE discount.
            lam: GAE lambda.
            advantage_estimator: ``gae`` (critic) or ``reinforce_pp`` (returns whitened over the batch; Hu 2025).
            kl: KL penalty in the reward: initial coefficient, adaptive target/horizon or fixed, estimator.
            score_clip: scores are clipped to [-score_clip, score_clip] in the reward (e.g. 5); null: no clip.
            missing_eos_penalty: subtracted from the score of a completion that hit the token budget; null: off.
            score_norm: ``none``, ``batch`` (whiten per batch) or ``running`` (mean/std over the run).
            whiten_advantages: whiten advantages over the batch's response tokens.
            target_kl: stop the epoch loop when a minibatch's approx-KL to the sampling policy exceeds it; null: off.
            max_grad_norm: gradient-norm clip of each optimizer step; null: off.
            optimizer: AdamW + schedule of the actor.
            critic_optimizer: AdamW + schedule of the critic.
            rollout_backend: sampler: ``kv_cache`` (built-in, batched, KV-cached) or ``vllm`` (:mod:`.vllm_engine`).
            vllm: the vLLM engine's settings (``rollout_backend: vllm``).
            rollout_correction: importance weights on the policy loss for the sampler-trainer mismatch (as GRPO's).
            peak_flops: peak FLOP/s of one device, for MFU (CPU here: ~200e9 fp32; H100: ~989e12 bf16).
            table_rows: completions per W&B sample table.
            table_every_n_steps: log a table of training samples every this many steps.
        """
        super().__init__()
        self.strict_loading = False  # checkpoints hold only trainable weights (set before FSDP2 loads)
        self.save_hyperparameters()
        self.automatic_optimization = False
        rewards = list(DEFAULT_REWARDS) if reward_model is None and rewards is None and online_rm is None else rewards
        experience.check_ppo_settings(samples_per_prompt, ppo_epochs, score_clip, reward_model, rewards, online_rm)
        self.spec, self.critic_settings, self.reward_settings, self.sampling = policy, critic, reward_model, sampling
        self.kl_settings, self.actor_optim, self.critic_optim = kl, optimizer, critic_optimizer
        self.tokenizer = models.load_tokenizer(policy.name, policy.revision)
        self.temperature = sampling.temperature or 1.0  # of the logps (greedy decoding: the untempered distribution)
        composer = RewardComposer(rewards or []) if rewards or online_rm else None
        self.composer = orm.with_online_rm(composer, online_rm, advantage_estimator) if online_rm else composer
        self.kl_ctl, self.moments, self._rng_states = build_kl_controller(kl), RunningMoments(), ()
        self.policy_loss = objectives.ppo_corrected_loss(policy_loss, clip_range, dual_clip_c, rollout_correction)
        self.policy, self.val_means, self.throughput, self._val_rows = None, PhaseMeans(), Throughput(peak_flops), []

    # -- networks -------------------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.policy is not None:
            return
        rm = self.reward_settings
        self.policy = models.load_causal_lm(self.spec)
        self.frozen_reference = models.frozen_copy(self.policy) if self.spec.lora is None else None
        self.reward_model = reward_models.RewardScorer.from_settings(rm, self.spec.dtype) if rm is not None else None
        self.critic = critics.build_critic(self.critic_settings, self.policy, self.spec, rm and rm.path)
        self.suffix = models.turn_suffix(self.tokenizer) if rm is not None and rm.chat_template else ""
        self._flop_counts = model_flop_counts(self.policy)
        if self.device_mesh is not None:  # FSDP2 on policy, reference and critic (the reward model is replicated)
            if not isinstance(self.critic, critics.ValueModel):
                raise ValueError("under FSDP2 the critic must be a separate model (critic.init: policy, reward_model)")
            for net in filter(None, (self.policy, self.frozen_reference)):
                fully_shard_lm(net, self.device_mesh)
            fully_shard_lm(self.critic.decoder, self.device_mesh)
            fully_shard_root(self.critic, self.device_mesh)  # the value head

    # -- training: the algorithm, then its steps in call order ---------------------------------------------------------
    def training_step(self, batch: PromptBatch, batch_idx: int) -> None:
        clock = [time.perf_counter()]
        # 1. rollout: sample completions from the current policy
        rollout = self.generate(batch, self.generator)
        clock.append(time.perf_counter())
        # 2. score (reward model + reward functions), minus the missing-EOS penalty, normalised over all ranks
        raw_scores, score_stats = self.score(rollout, batch, observe=True)
        scores = self.normalize(raw_scores, rollout.truncated)
        # 3. advantages: old/ref logps and values (no grad); dense rewards (-beta KL per token, score on the last); GAE
        exp = self.make_experience(rollout, scores)
        clock.append(time.perf_counter())
        # 4. ppo_epochs x shuffled minibatches: one actor and one critic step each (the first: the global step)
        update_stats = self.update(exp)
        clock.append(time.perf_counter())
        # 5. KL coefficient from this batch's mean sequence KL over all ranks; learning-rate schedules (one step each)
        kl_coef, kl = self.kl_ctl.value, rank_mean(sequence_logps(exp.kl, exp.mask).mean())  # equal rollouts per rank
        self.kl_ctl.update(kl, len(exp.scores) * self.trainer.world_size)  # the global batch's rollouts
        for scheduler in self.lr_schedulers():
            scheduler.step()
        # 6. log
        timing = {f"perf/{k}_s": b - a for k, a, b in zip(("generation", "scoring", "update"), clock, clock[1:])}
        self.log_iteration(exp, raw_scores, {**score_stats, **update_stats}, timing, kl, kl_coef)

    def generate(self, batch: PromptBatch, generator: torch.Generator) -> Rollout:
        """``samples_per_prompt`` completions of each prompt from the current policy, text decoded."""
        n, backend = self.hparams.samples_per_prompt, (self.hparams.rollout_backend, self.hparams.vllm)
        return sample_completions(self.policy, self.tokenizer, batch, n, self.sampling, generator, *backend)

    def score(self, rollout: Rollout, batch: PromptBatch, observe: bool = False) -> tuple[torch.Tensor, dict]:
        """RM + reward functions: (scores [N] before penalty, NaN where none scored; per-source stats); ``observe``:
        an online RM's metrics on these completions, then its update (training only)."""
        scores, stats, index = None, {}, rollout.prompt_index.tolist()
        prompts = [batch.prompts[i] for i in index]
        if self.reward_model is not None:
            finished = (~rollout.truncated).tolist()
            rm = self.reward_model.score_texts(scoring_texts(prompts, rollout.completions, finished, self.suffix))
            scores = self.reward_settings.weight * rm
            stats["rewards/reward_model/mean"] = float(rm.mean())
        if self.composer is not None:
            columns = {k: [v[i] for i in index] for k, v in batch.extras.items()}
            result = self.composer(prompts, rollout.completions, columns)
            scores = add_rewards(scores, result.total)
            stats.update({k: v for k, v in result.stats().items() if k.count("/") == 2})
            stats.update(orm.observe(self.composer, rollout, result, batch.extras) if observe else {})
        return scores.to(self.device), stats

    def normalize(self, scores: torch.Tensor, truncated: torch.Tensor) -> torch.Tensor:
        """Minus ``missing_eos_penalty`` where ``truncated``, then ``score_norm`` over all ranks; this rank's part."""
        scores = experience.apply_missing_eos_penalty(scores, truncated, self.hparams.missing_eos_penalty)
        mode, world = self.hparams.score_norm, self.trainer.world_size
        if mode == "none":
            return scores
        everyone = self.all_gather(scores).reshape(-1) if world > 1 else scores  # [W n], rank-major
        if mode == "running":
            self.moments = experience.update_moments(self.moments, everyone)
        return experience.normalize_scores(everyone, mode, self.moments).reshape(world, -1)[self.global_rank]

    @torch.no_grad()
    def make_experience(self, rollout: Rollout, scores: torch.Tensor) -> Experience:
        """The PPO buffer: old/ref logps, values, dense rewards and KL, GAE advantages (whitened) and returns."""
        hp, mask, estimator = self.hparams, rollout.response_mask, self.kl_settings.estimator
        old_logps = rollout_logps(self.policy, rollout, self.temperature).logps
        with models.reference_policy(self.policy, self.frozen_reference) as ref:
            ref_logps = rollout_logps(ref, rollout, self.temperature).logps
        values = self.critic(*experience.critic_inputs(rollout))
        kl_coef, clip = self.kl_ctl.value, hp.score_clip
        rewards, kl = experience.dense_rewards(scores, old_logps, ref_logps, mask, kl_coef, estimator, clip)
        advantages, returns = objectives.ppo_advantages(hp.advantage_estimator, rewards, values, mask, hp.gamma, hp.lam)
        advantages, returns, scored = experience.drop_unscored(advantages, returns, values, scores)
        if hp.whiten_advantages:  # over the scored completions' response tokens of all ranks
            advantages = global_masked_whiten(advantages, mask * scored)
        return Experience(rollout, old_logps, ref_logps, values, scores, kl, rewards, advantages, returns)

    def update(self, exp: Experience) -> dict[str, float]:
        """``ppo_epochs`` passes over shuffled minibatches; each: actor and critic loss in one backward (disjoint
        parameters), one step of each optimizer (the first actor step is the global step); from the second minibatch
        on, stops once the approx-KL (mean over ranks) exceeds ``target_kl``. Returns the mean of each metric."""
        hp, (actor_opt, critic_opt) = self.hparams, self.optimizers()
        stats, updates, stopped = defaultdict(list), 0, False
        n, size, shuffle = len(exp.scores), hp.minibatch_size, self.shuffle_generator  # a new order every epoch
        for rows in (r for _ in range(hp.ppo_epochs) for r in experience.minibatches(n, size, shuffle)):
            mb = exp.select(rows.to(self.device))
            share = mb.mask.sum() / global_normalizer(mb.mask.sum())  # token means over all ranks' minibatches
            actor_loss, metrics = self.actor_loss(mb, share)
            if hp.target_kl is not None and updates and rank_mean(metrics["policy/approxkl"]) > hp.target_kl:
                stopped = True
                break
            critic_loss, value_metrics = self.critic_loss(mb, share)
            self.manual_backward(actor_loss + critic_loss)
            clip_and_step(self, actor_opt, hp.max_grad_norm, count=updates == 0)
            clip_and_step(self, critic_opt, hp.max_grad_norm, count=False)
            updates += 1
            for k, v in {**metrics, **value_metrics}.items():
                stats[k].append(float(v))
        out = {k: sum(v) / len(v) for k, v in stats.items()}
        return {**out, "ppo/updates": float(updates), "ppo/early_stopped": float(stopped)}

    def actor_loss(self, mb: Experience, share: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(clipped surrogate - ``entropy_coef`` x entropy (same forward), metrics) x this rank's ``share``."""
        coef = self.hparams.entropy_coef
        lm = LogitsRecorder(self.policy) if coef != 0 else self.policy
        logps = rollout_logps(lm, mb.rollout, self.temperature).logps
        loss, metrics = self.policy_loss(logps, mb.old_logps, mb.advantages, mb.mask, mb.rollout.sample_logps)
        metrics = {**metrics, "loss": loss.detach()}
        if coef != 0:
            loss = loss - coef * masked_mean(lm.entropy(mb.rollout, self.temperature), mb.mask)
        return loss * share, {k: v * share for k, v in metrics.items()}

    def critic_loss(self, mb: Experience, share: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(clipped value loss against the GAE returns, metrics), both x this rank's token ``share``."""
        values = self.critic(*experience.critic_inputs(mb.rollout))
        clip = self.hparams.clip_range_value
        loss, metrics = ppo_value_loss(values, mb.values, mb.returns, mb.mask, clip_range_value=clip)
        return loss * share, {k: v * share for k, v in {**metrics, "value_loss": loss.detach()}.items()}

    def log_iteration(self, exp: Experience, raw_scores, stats: dict, timing: dict, kl: float, kl_coef: float) -> None:
        n, r, mask = len(exp.scores), exp.rollout, exp.mask
        metrics = experience.iteration_metrics(exp, raw_scores, kl, kl_coef, stats)
        sync = self.trainer.world_size > 1  # train/* are the mean over ranks
        self.log("train/rewards/mean", metrics.pop("rewards/mean"), prog_bar=True, batch_size=n, sync_dist=sync)
        self.log_dict({f"train/{k}": float(v) for k, v in metrics.items()}, batch_size=n, sync_dist=sync)
        tokens, scored = int(r.prompt_mask[r.prompt_index].sum() + mask.sum()), int(mask.sum())
        passes = 2 * stats["ppo/updates"] * self.hparams.minibatch_size / n  # actor + critic; 4 forwards below
        flops = rollout_step_flops(self._flop_counts, tokens - scored, scored, 4, passes, self.spec.lora is None)
        self.log_dict({**timing, **self.throughput.step(n, tokens, flops)}, batch_size=n)
        if (self.global_step - 1) % self.hparams.table_every_n_steps == 0:
            rows = self.table_rows(r, raw_scores, exp.kl)
            log_table(self.trainer, "train/samples", TABLE_COLUMNS, rows, step=self.global_step)

    def table_rows(self, r: Rollout, scores: torch.Tensor, token_kl: torch.Tensor) -> list[list]:
        index, kl = r.prompt_index.tolist()[: self.hparams.table_rows], sequence_logps(token_kl, r.response_mask)
        return [[r.prompts[p], r.completions[i], float(scores[i]), float(kl[i])] for i, p in enumerate(index)]

    # -- validation: held-out prompts, fixed sampling seed -------------------------------------------------------------
    def validation_step(self, batch: PromptBatch, batch_idx: int) -> None:
        if batch_idx == 0:  # the same sampling noise at every validation
            self.val_generator = torch.Generator(self.device).manual_seed(1234)
        rollout = self.generate(batch, self.val_generator)
        scores, stats = self.score(rollout, batch)
        with torch.no_grad():
            logps = rollout_logps(self.policy, rollout, self.temperature).logps
            with models.reference_policy(self.policy, self.frozen_reference) as ref:
                token_kl = logps - rollout_logps(ref, rollout, self.temperature).logps
        metrics = {**experience.validation_metrics(rollout, token_kl), **stats}
        means = self.val_means.update({f"val/{k}": v for k, v in metrics.items()}, weight=len(scores))
        answers = batch.extras.get("answer")  # a verifiable task: does the score track correctness (or is it gamed)?
        answers = [answers[i] for i in rollout.prompt_index.tolist()] if answers else None
        for values, weight in validation_means(scores, rollout.completions, answers):  # rewards/mean, accuracy
            means.update(self.val_means.update(values, weight=weight))
        self.log_dict(means, on_epoch=True, on_step=False, batch_size=len(scores))
        self._val_rows += self.table_rows(rollout, scores, token_kl)[: self.hparams.table_rows - len(self._val_rows)]

    def on_validation_epoch_end(self) -> None:
        if self._val_rows and not self.trainer.sanity_checking:
            log_table(self.trainer, "val/samples", TABLE_COLUMNS, self._val_rows, step=self.global_step)
        self._val_rows = []

    # -- hooks: generators, optimizers, checkpoints, export ------------------------------------------------------------
    def on_fit_start(self) -> None:
        seed = torch.initial_seed() % 2**63  # sampling (on the model's device), minibatch order; restored on resume
        self.generator = torch.Generator(self.device).manual_seed(seed)
        self.shuffle_generator = torch.Generator().manual_seed(seed)
        for generator, state in zip((self.generator, self.shuffle_generator), self._rng_states):
            generator.set_state(state)
        self.throughput.start()

    def configure_optimizers(self):
        total = self.trainer.estimated_stepping_batches  # both schedules step once per rollout batch
        actor = build_optimizer(critics.actor_parameters(self.policy), self.actor_optim, total)
        return [actor, build_optimizer(self.critic.trainable_parameters(), self.critic_optim, total)]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = trainable_state_dict(self, checkpoint["state_dict"])
        checkpoint["kl_controller"] = self.kl_ctl.state_dict()
        checkpoint["score_moments"] = self.moments.state_dict()
        checkpoint["rng"] = [self.generator.get_state(), self.shuffle_generator.get_state()]
        orm.save(self.composer, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.kl_ctl.load_state_dict(checkpoint["kl_controller"])
        self.moments = RunningMoments(**checkpoint["score_moments"])
        self._rng_states = checkpoint.get("rng", ())
        orm.load(self.composer, checkpoint)

    def export(self, out_dir: Path, dtype: str | None = None) -> dict[str, str]:
        """The policy (``merged`` + ``adapter``; a shared-base value adapter beside it, never merged); an online RM."""
        rank_zero = self.trainer.is_global_zero
        written = models.export_pretrained(self.policy, self.tokenizer, out_dir, self.spec, rank_zero, dtype)
        return {**written, **orm.export(self.composer, out_dir, rank_zero)}
