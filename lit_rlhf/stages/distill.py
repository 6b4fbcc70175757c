"""On-policy distillation (GKD, Agarwal et al. 2024, "On-Policy Distillation of Language Models: Learning from
Self-Generated Mistakes", Eq. 4 with lambda = 1 and D = reverse KL; the Thinking Machines recipe).

The student (the policy) samples G completions per prompt exactly as in GRPO (:class:`lit_rlhf.stages.grpo.GRPOModule`,
whose ``training_step`` this stage runs unchanged); a frozen teacher, any causal LM with the student's tokenizer,
scores every sampled token, and the per-token reverse KL estimate k_t = log pi_s(o_t | q, o_<t) - log pi_t(o_t | q,
o_<t) is the negative per-token reward (:func:`lit_rlhf.advantages.distillation_advantages`):

    A_t = -k_t  (+ task_reward_weight * A_task)       kl_discount = 0: each token its own term (Thinking Machines)

A_task is GRPO's advantage of the task rewards (``rewards``, ``advantage_estimator``), mixed in as GKD's Eq. 5. The
advantages go to any GRPO-family policy loss (``loss``; the token-mean ``dapo`` in the configs, ``num_iterations``,
clipping, minibatches, DDP/FSDP2 as in GRPO). k_t uses the sampler's logps (``Rollout.sample_logps``; the old logps
when GRPO computes them: mu > 1, KL in the reward), so the teacher's forward is the only extra one. The teacher is
loaded frozen (no grad, eval mode) in ``configure_model`` and sharded like GRPO's frozen reference under FSDP2; a
teacher whose tokenizer maps any token to another id is refused at construction. ``beta`` > 0 still adds GRPO's KL to
the student's own reference (its adapter disabled).

Logged besides GRPO's metrics: ``train/distill/reverse_kl`` (the per-token mean of k_t over the batch's completion
tokens: the estimate of the reverse KL that training lowers), ``train/distill/{student,teacher}_logps`` (per-token
mean logps of the sampled tokens). Validation is GRPO's: greedy decoding, ``val/accuracy`` from the answer verifier,
so the student's held-out accuracy before -> after comes from the same code as GRPO's.

    python -m lit_rlhf.experiments.sft                        # the teacher: runs/sft/export/merged
    python -m lit_rlhf.experiments.distill                    # SmolLM2-135M-Instruct + LoRA learns from it
    python -m lit_rlhf.experiments.distill --config experiments/distill/tiny.yaml --output_dir runs/distill-tiny
"""

from __future__ import annotations

import torch

from lit_rlhf import models
from lit_rlhf.advantages import distillation_advantages
from lit_rlhf.distributed import fully_shard_lm, global_normalizer
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
        task_reward_weight: float = 0.0,
        kl_discount: float = 0.0,
        **kwargs,
    ) -> None:
        """
        Args:
            teacher: the frozen teacher (name, dtype; ``lora`` must be null): any causal LM whose tokenizer is the
                student's (``model.policy``). Default: the SFT stage's export.
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
