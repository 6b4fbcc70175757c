"""On-policy distillation (GKD, Agarwal et al. 2024, "On-Policy Distillation of Language Models: Learning from
Self-Generated Mistakes", Eq. 4 with lambda = 1; the Thinking Machines recipe).

The student (the policy) samples G completions per prompt exactly as in GRPO (:class:`lit_rlhf.stages.grpo.GRPOModule`,
whose ``training_step`` this stage runs unchanged); a frozen teacher, any causal LM with the student's tokenizer,
scores them. ``divergence`` picks what is minimised:

- ``forward`` (default), ``reverse``, ``jsd`` (GKD Eq. 4 with D = forward KL, reverse KL or the generalised JSD of
  Eq. 1 at ``jsd_beta``; TRL's ``generalized_jsd_loss`` at beta = 0, 1, jsd_beta; :mod:`lit_rlhf.losses.distill`):
  on the sampled prefixes (no gradient through sampling), the exact per-token divergence over the whole vocabulary,
  token-mean over the batch, differentiated through the student's logits (the ``update`` override: teacher logits
  without grad per minibatch, then GRPO's clipping, optimizer and scheduler steps). The default is ``forward``: the
  reverse KL's gradient vanishes wherever the student is already certain, so a student that settles on a wrong
  token early (measured: "Ones: 3 - 0 = 3. The answer is 3." skipping the tens, at probability ~1 against the
  teacher's e^-12.6) stays there; the forward KL's gradient pi_s - pi_t pulls it to the teacher's token. Needs
  ``task_reward_weight`` = 0 and ``beta`` = 0; [mb, R, V] logits: keep ``minibatch_size`` small.
- ``sampled``: the per-token reverse KL estimate k_t = log pi_s(o_t | q, o_<t) - log pi_t(o_t | q, o_<t) is the
  negative per-token reward (:func:`lit_rlhf.advantages.distillation_advantages`) of GRPO's update:

    A_t = -k_t  (+ task_reward_weight * A_task)       kl_discount = 0: each token its own term (Thinking Machines)

A_task is GRPO's advantage of the task rewards (``rewards``, ``advantage_estimator``), mixed in as GKD's Eq. 5. The
advantages go to any GRPO-family policy loss (``loss``; the token-mean ``dapo`` in the configs, ``num_iterations``,
clipping, minibatches, DDP/FSDP2 as in GRPO). k_t uses the sampler's logps (``Rollout.sample_logps``; the old logps
when GRPO computes them: mu > 1, KL in the reward), so the teacher's forward is the only extra one. The teacher is
loaded frozen (no grad, eval mode) in ``configure_model`` and sharded like GRPO's frozen reference under FSDP2; a
teacher whose tokenizer maps any token to another id is refused at construction. ``beta`` > 0 still adds GRPO's KL to
the student's own reference (its adapter disabled).

Logged besides GRPO's metrics: ``train/distill/reverse_kl`` (the per-token mean over the batch's completion tokens of
the full-vocabulary reverse KL, or of k_t with ``sampled``), ``train/distill/divergence`` (the full-vocabulary
divergence trained: the loss of the first pass), ``train/distill/sampled_reverse_kl`` (the mean k_t from the same
logits), ``train/distill/{student,teacher}_logps`` (per-token mean logps of the sampled tokens). Validation is GRPO's:
greedy decoding, ``val/accuracy`` from the answer verifier, so the held-out accuracy before -> after is GRPO's code.

    python -m lit_rlhf.experiments.sft                        # the teacher: runs/sft/export/merged
    python -m lit_rlhf.experiments.distill                    # SmolLM2-135M-Instruct + LoRA learns from it
    python -m lit_rlhf.experiments.distill --config experiments/distill/tiny.yaml --output_dir runs/distill-tiny
"""

from __future__ import annotations

from typing import Literal

import torch

from lit_rlhf import losses, models
from lit_rlhf.advantages import distillation_advantages
from lit_rlhf.distributed import fully_shard_lm, global_normalizer, row_chunks
from lit_rlhf.logprobs import predicting_positions, selective_log_softmax
from lit_rlhf.optim import clip_and_step
from lit_rlhf.rewards import RewardResult
from lit_rlhf.stages.grpo import GRPOModule
from lit_rlhf.types import Rollout

SFT_EXPORT = "runs/sft/export/merged"
"""The default teacher: what ``python -m lit_rlhf.experiments.sft`` exports."""


class DistillModule(GRPOModule):
    """On-policy distillation from a frozen teacher, optimised with the GRPO-family losses (module doc)."""

    def __init__(
        self,
        teacher: models.ModelSpec = models.ModelSpec(name=SFT_EXPORT, lora=None),
        divergence: Literal["forward", "reverse", "jsd", "sampled"] = "forward",
        jsd_beta: float = 0.5,
        task_reward_weight: float = 0.0,
        kl_discount: float = 0.0,
        **kwargs,
    ) -> None:
        """
        Args:
            teacher: the frozen teacher (name, dtype; ``lora`` must be null): any causal LM whose tokenizer is the
                student's (``model.policy``). Default: the SFT stage's export.
            divergence: ``forward`` / ``reverse`` / ``jsd``: that exact full-vocabulary divergence at each sampled
                prefix, differentiated through the student's logits (GKD Eq. 4, :mod:`lit_rlhf.losses.distill`);
                ``sampled``: the sampled token's log-ratio as a per-token reward through ``loss`` (GRPO's update).
            jsd_beta: the generalised JSD's beta (``divergence: jsd``; 0 < beta < 1, TRL's convention).
            task_reward_weight: weight of the task rewards' GRPO advantage added to the distillation advantage
                (0: pure distillation; the rewards are still computed and logged).
            kl_discount: gamma of the reverse-KL reward-to-go; 0: each token's own term (per-token advantages).
            **kwargs: every option of :class:`lit_rlhf.stages.grpo.GRPOModule` (``policy``, ``num_generations``,
                ``sampling``, ``loss``, ``optimizer``, ...).
        """
        super().__init__(**kwargs)
        if teacher.lora is not None:
            raise ValueError("model.teacher.lora must be null: the teacher is frozen, it trains no adapter")
        if not 0.0 <= kl_discount <= 1.0:
            raise ValueError(f"model.kl_discount={kl_discount}: a discount factor in [0, 1]")
        if self.hparams.zero_variance_groups != "keep":
            raise ValueError(
                f"model.zero_variance_groups={self.hparams.zero_variance_groups}: distillation learns from every "
                "completion (its per-token signal does not need reward variance); use keep"
            )
        if divergence == "jsd" and not 0.0 < jsd_beta < 1.0:
            raise ValueError(f"model.jsd_beta={jsd_beta}: needs 0 < beta < 1 (0 is divergence=forward, 1 reverse)")
        if divergence != "sampled" and (task_reward_weight != 0.0 or self.hparams.beta > 0):
            raise ValueError(
                f"model.divergence={divergence} minimises the teacher's divergence alone: use task_reward_weight=0 and "
                "beta=0 (or divergence=sampled, which mixes both into GRPO's policy-gradient loss)"
            )
        self.teacher_spec = teacher
        check_shared_tokenizer(self.tokenizer, load_teacher_tokenizer(teacher), self.spec.name, teacher.name)
        self.teacher = None  # built in configure_model

    # -- networks -------------------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.teacher is not None:
            return
        super().configure_model()
        teacher = models.load_causal_lm(self.teacher_spec).requires_grad_(False).eval()
        student_vocab, teacher_vocab = self.policy.config.vocab_size, teacher.config.vocab_size
        if teacher_vocab < student_vocab:
            raise ValueError(
                f"teacher {self.teacher_spec.name!r} scores {teacher_vocab} token ids, fewer than the student's "
                f"{student_vocab}: it cannot score every token the student samples"
            )
        if self.device_mesh is not None:  # FSDP2: sharded like GRPO's frozen reference
            fully_shard_lm(teacher, self.device_mesh)
        self.teacher = teacher

    # -- advantages: the teacher's per-token signal (the hook of GRPOModule.training_step, step 4) ------------------
    def advantages(self, rollout: Rollout, scores: RewardResult, old_logps, ref_logps) -> tuple[torch.Tensor, dict]:
        """Per-token advantages [N, R]: minus the reverse-KL estimate to the teacher, plus ``task_reward_weight``
        times GRPO's task advantages; metrics ``distill/*`` (per-token means, global batch)."""
        hp, mask = self.hparams, rollout.response_mask
        if hp.divergence != "sampled":  # the update differentiates the full divergence (no teacher forward here)
            return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device), {}
        student = old_logps if old_logps is not None else rollout.sample_logps
        if student is None:  # a sampler that returns no logps
            student = self.frozen_logps(self.policy, rollout)
        self.teacher.eval()  # no dropout, whatever a caller's .train() set
        teacher = self.frozen_logps(self.teacher, rollout)
        advantages, reverse_kl = distillation_advantages(student, teacher, mask, discount=hp.kl_discount)
        weights = mask.to(advantages.dtype)
        tokens = global_normalizer(weights.sum())  # logged as the mean over ranks: the global per-token mean
        values = {"reverse_kl": reverse_kl, "student_logps": student, "teacher_logps": teacher}
        stats = {f"distill/{name}": float((x * weights).sum() / tokens) for name, x in values.items()}
        if hp.task_reward_weight != 0.0:
            task, task_stats = super().advantages(rollout, scores, old_logps, ref_logps)
            task = task.unsqueeze(-1) if task.dim() == 1 else task
            advantages = advantages + hp.task_reward_weight * task.to(advantages.dtype) * weights
            stats.update(task_stats)
        return advantages, stats

    # -- update: a full-vocabulary divergence, else (divergence=sampled) GRPO's policy-gradient update --------------
    def update(self, rollout: Rollout, advantages, old_logps, ref_logps) -> dict[str, float]:
        """``forward``/``reverse``/``jsd``: mu passes of the token-mean full-vocabulary divergence over the batch's
        completion tokens (student logits with grad, teacher logits without, per minibatch), clipped, one
        optimizer/scheduler step per pass (the first counted), as GRPO's update; metrics ``loss``, ``distill/*``
        (pass 0, global per-token means)."""
        hp = self.hparams
        if hp.divergence == "sampled":
            return super().update(rollout, advantages, old_logps, ref_logps)
        opt, scheduler, temperature = self.optimizers(), self.lr_schedulers(), self.sampling.temperature
        tokens = global_normalizer(rollout.response_mask.sum())  # minibatch sums / it add up to the global token mean
        chunks = row_chunks(len(rollout), hp.minibatch_size, self.device, same_count_on_all_ranks=True)
        totals: dict[str, float] = {}
        self.teacher.eval()
        for iteration in range(hp.num_iterations):
            for rows in chunks:
                if len(rows) == 0:  # this rank ran out of rows; DDP still needs the same number of backward passes
                    self.manual_backward(sum(p.sum() for p in self.policy.parameters() if p.requires_grad) * 0.0)
                    continue
                mb = rollout.select(rows)
                student, targets = scored_logits(self.policy, mb)
                with torch.no_grad():
                    teacher = scored_logits(self.teacher, mb)[0][:, : student.shape[-1]]  # the student's vocabulary
                ones = torch.ones_like(targets)
                divergence = self.divergence(student, teacher, ones, temperature)
                loss = divergence.sum() / tokens
                self.manual_backward(loss)
                totals["loss"] = totals.get("loss", 0.0) + float(loss.detach()) / hp.num_iterations
                if iteration == 0:
                    s_logps = selective_log_softmax(student.detach() / temperature, targets)
                    t_logps = selective_log_softmax(teacher / temperature, targets)
                    reverse = losses.full_reverse_kl(student.detach(), teacher, ones, temperature)
                    values = {"reverse_kl": reverse, "divergence": divergence.detach()}
                    values.update(sampled_reverse_kl=s_logps - t_logps)
                    values.update(student_logps=s_logps, teacher_logps=t_logps)
                    for name, x in values.items():
                        totals[f"distill/{name}"] = totals.get(f"distill/{name}", 0.0) + float(x.sum() / tokens)
            clip_and_step(self, opt, hp.max_grad_norm, count=iteration == 0)
            scheduler.step()
        return totals

    def divergence(self, student_logits, teacher_logits, mask, temperature: float) -> torch.Tensor:
        """The per-token full-vocabulary divergence ``divergence`` names (:mod:`lit_rlhf.losses.distill`)."""
        hp = self.hparams
        if hp.divergence == "jsd":
            return losses.generalized_jsd(student_logits, teacher_logits, mask, hp.jsd_beta, temperature)
        kl = losses.full_forward_kl if hp.divergence == "forward" else losses.full_reverse_kl
        return kl(student_logits, teacher_logits, mask, temperature)


def scored_logits(lm: torch.nn.Module, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [n, V] at the positions that predict the rollout's n completion tokens, those tokens [n]), row-major:
    each row runs as one sequence (:meth:`Rollout.as_sequences`), the head only where a completion token is scored."""
    input_ids, attention_mask, loss_mask, position_ids = rollout.as_sequences()
    keep = predicting_positions(loss_mask)
    kwargs = dict(attention_mask=attention_mask, position_ids=position_ids, logits_to_keep=keep, use_cache=False)
    logits = lm(input_ids=input_ids, **kwargs).logits
    if logits.dim() == 3:  # a model without bool logits_to_keep support returned every position
        logits = logits[keep]
    return logits, input_ids[loss_mask.bool()]


def load_teacher_tokenizer(spec: models.ModelSpec):
    """The teacher's tokenizer; a missing default teacher names the command that makes it."""
    try:
        return models.load_tokenizer(spec.name, spec.revision)
    except (FileNotFoundError, OSError) as error:
        hint = " (run `python -m lit_rlhf.experiments.sft` first: it exports the default teacher)"
        raise FileNotFoundError(f"teacher {spec.name!r}: {error}{hint if spec.name == SFT_EXPORT else ''}") from error


def check_shared_tokenizer(student, teacher, student_name: str = "student", teacher_name: str = "teacher") -> None:
    """Refuse a teacher whose tokenizer is not the student's: k_t compares both models' logps of the same token ids,
    so every token must have the same id in both (and no tokenizer may have tokens the other lacks)."""
    s, t = student.get_vocab(), teacher.get_vocab()
    if s == t:
        return
    differ = sorted({k for k in s.keys() | t.keys() if s.get(k) != t.get(k)})
    examples = ", ".join(f"{k!r}: {s.get(k)} vs {t.get(k)}" for k in differ[:3])
    raise ValueError(
        f"teacher {teacher_name!r} does not share the tokenizer of the student {student_name!r}: {len(differ)} of "
        f"{len(s | t)} tokens differ (token: student id vs teacher id: {examples}); on-policy distillation compares "
        "both models' logps of the same token ids, so choose a teacher of the student's family (same tokenizer)"
    )
