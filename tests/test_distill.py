"""On-policy distillation: the per-token advantage against hand values and exact (enumerated) policy gradients, the
teacher refused up front (another tokenizer, a LoRA teacher, a missing default teacher), the teacher's signal mixed
with the task advantage in the stage, and a tiny run through ``python -m lit_rlhf.experiments.distill`` whose reverse
KL falls. (tests/test_configs.py parses experiments/distill/*.yaml.)"""

import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from lit_rlhf import models, report
from lit_rlhf.advantages import distillation_advantages, group_advantages
from lit_rlhf.losses import full_reverse_kl
from lit_rlhf.rewards import RewardResult, RewardSpec
from lit_rlhf.rollout import SamplingSettings, group_index
from lit_rlhf.stages.distill import SFT_EXPORT, DistillModule, check_shared_tokenizer, scored_logits
from lit_rlhf.types import Rollout
from tests.test_report import undocumented

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_YAML = os.path.join(ROOT, "experiments", "distill", "tiny.yaml")
TINY = models.ModelSpec(name="tiny", lora=None)


# ------------------------------------------------------------------------------------------ the pure function
def test_distillation_advantages_hand_values():
    student = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -4.0, 7.0]])
    teacher = torch.tensor([[-1.5, -1.0, -3.0], [-0.5, -2.0, -9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])  # the last column is padding: its values must not leak
    adv, kl = distillation_advantages(student, teacher, mask)
    torch.testing.assert_close(kl, torch.tensor([[0.5, -1.0, 0.0], [0.0, -2.0, 0.0]]))
    torch.testing.assert_close(adv, torch.tensor([[-0.5, 1.0, 0.0], [0.0, 2.0, 0.0]]))  # discount 0: A_t = -k_t
    adv, _ = distillation_advantages(student, teacher, mask, discount=0.5)  # A_t = r_t + 0.5 r_{t+1}
    torch.testing.assert_close(adv, torch.tensor([[0.0, 1.0, 0.0], [1.0, 2.0, 0.0]]))
    adv, _ = distillation_advantages(student, teacher, mask, coef=2.0, discount=1.0)  # reward-to-go, coef 2
    torch.testing.assert_close(adv, torch.tensor([[1.0, 2.0, 0.0], [4.0, 4.0, 0.0]]))
    with pytest.raises(ValueError, match="one shape"):
        distillation_advantages(student, teacher[:, :2], mask)
    with pytest.raises(ValueError, match="discount"):
        distillation_advantages(student, teacher, mask, discount=1.5)


def test_the_log_ratio_is_unbiased_for_the_reverse_kl_and_its_policy_gradient_exact():
    """One token over a vocabulary of 5, every outcome enumerated with its student probability: E_s[k] is
    KL(p_s || p_t), and E_s[-A grad log p_s] (the loss gradient at ratio 1) is grad KL exactly."""
    theta = torch.tensor([0.3, -1.2, 2.0, 0.1, -0.4], dtype=torch.float64, requires_grad=True)
    log_q = torch.log_softmax(torch.tensor([1.0, 0.5, -2.0, 0.0, 0.7], dtype=torch.float64), -1)
    log_p = torch.log_softmax(theta, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum()
    (exact,) = torch.autograd.grad(kl, theta, retain_graph=True)
    adv, k = distillation_advantages(log_p.detach()[:, None], log_q[:, None], torch.ones(5, 1))
    p = log_p.exp().detach()
    torch.testing.assert_close((p * k[:, 0]).sum(), kl.detach())
    (estimate,) = torch.autograd.grad(-(p * adv[:, 0] * log_p).sum(), theta)
    torch.testing.assert_close(estimate, exact)


def test_reward_to_go_is_the_sequence_kl_gradient_and_per_token_drops_the_future_term():
    """Two tokens over a vocabulary of 2, all 4 sequences enumerated: with discount 1 the expected policy gradient is
    the gradient of the sequence reverse KL; with discount 0 (the default) it misses exactly the term of o_1's
    effect on the second token's KL, E[grad log p(o_1) KL_2(o_1)]."""
    g = torch.Generator().manual_seed(0)
    theta1 = torch.randn(2, generator=g, dtype=torch.float64).requires_grad_()
    theta2 = torch.randn(2, 2, generator=g, dtype=torch.float64).requires_grad_()  # logits of o_2 given o_1
    q1 = torch.log_softmax(torch.randn(2, generator=g, dtype=torch.float64), -1)
    q2 = torch.log_softmax(torch.randn(2, 2, generator=g, dtype=torch.float64), -1)
    p1, p2 = torch.log_softmax(theta1, -1), torch.log_softmax(theta2, -1)
    seqs = [(a, b) for a in range(2) for b in range(2)]
    student = torch.stack([torch.stack([p1[a], p2[a, b]]) for a, b in seqs])  # [4, 2] with grad
    teacher = torch.stack([torch.stack([q1[a], q2[a, b]]) for a, b in seqs])
    kl = (student.sum(-1).exp() * (student - teacher).sum(-1)).sum()  # sum over sequences of P(seq) log-ratio
    prob = student.detach().sum(-1).exp()  # P(sequence), the sampling weights
    exact = torch.autograd.grad(kl, (theta1, theta2), retain_graph=True)

    def expected_gradient(discount: float):
        adv, _ = distillation_advantages(student.detach(), teacher, torch.ones(4, 2), discount=discount)
        return torch.autograd.grad(-(prob[:, None] * adv * student).sum(), (theta1, theta2), retain_graph=True)

    for got, want in zip(expected_gradient(1.0), exact):
        torch.testing.assert_close(got, want)
    per_token = expected_gradient(0.0)
    kl2 = (p2.detach().exp() * (p2.detach() - q2)).sum(-1)  # KL of the second token given o_1 = a
    future = torch.autograd.grad((p1.detach().exp() * p1 * kl2).sum(), theta1)[0]
    torch.testing.assert_close(per_token[0], exact[0] - future)
    torch.testing.assert_close(per_token[1], exact[1])  # the last token's own gradient is the same
    assert future.abs().max() > 1e-3  # the two choices differ here


# ------------------------------------------------------------------------------------- the teacher, refused early
def _teacher_dir(path, extra_tokens=()):
    """A teacher directory: the tiny config and the SmolLM2 tokenizer, plus ``extra_tokens`` (no weights: the checks
    run before any weight is loaded)."""
    tokenizer = models.load_tokenizer("tiny")
    tokenizer.add_tokens(list(extra_tokens))
    models.tiny_config(len(tokenizer), None, tokenizer.eos_token_id, tokenizer.pad_token_id).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_a_teacher_with_another_tokenizer_is_refused_at_construction(tmp_path):
    other = _teacher_dir(tmp_path / "other", extra_tokens=["<teacher_only>"])
    with pytest.raises(ValueError, match=r"does not share the tokenizer.*'<teacher_only>': None vs 49152"):
        DistillModule(policy=TINY, teacher=models.ModelSpec(name=other, lora=None))
    same = _teacher_dir(tmp_path / "same")
    check_shared_tokenizer(models.load_tokenizer("tiny"), models.load_tokenizer(same))  # the same vocabulary: passes
    module = DistillModule(policy=TINY, teacher=models.ModelSpec(name=same, lora=None))
    assert module.teacher is None and module.hparams.teacher.name == same  # loaded in configure_model


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(teacher=models.ModelSpec(name="tiny")), "teacher.lora must be null"),
        (dict(teacher=TINY, zero_variance_groups="drop"), "use keep"),
        (dict(teacher=TINY, kl_discount=-0.1), "discount factor"),
        (dict(teacher=TINY, task_reward_weight=0.5), "task_reward_weight=0 and beta=0"),  # divergence=forward
        (dict(teacher=TINY, beta=0.1, divergence="reverse"), "task_reward_weight=0 and beta=0"),
        (dict(teacher=TINY, divergence="jsd", jsd_beta=1.0), "0 < beta < 1"),
        (dict(), "run `python -m lit_rlhf.experiments.sft` first"),  # the default teacher, not exported here
    ],
)
def test_settings_refused_up_front(kwargs, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no runs/sft/export/merged here
    assert not os.path.exists(SFT_EXPORT)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        DistillModule(policy=TINY, **kwargs)


# ------------------------------------------------------------------------------------------- the stage's signal
def test_the_stage_adds_the_weighted_task_advantage_to_the_teacher_signal():
    """The advantages hook on a fixed rollout: -(sampler logps - teacher logps) on every completion token, plus
    task_reward_weight times GRPO's group advantage; the distill/* metrics are the per-token means."""
    module = DistillModule(
        policy=TINY,
        teacher=models.ModelSpec(name="tiny", lora=None, seed=1),
        divergence="sampled",
        task_reward_weight=0.5,
        num_generations=2,
        sampling=SamplingSettings(max_new_tokens=4),
        rewards=[RewardSpec("length_penalty", 1.0, {"max_length": 8, "buffer": 6})],
    )
    module.configure_model()
    assert not any(p.requires_grad for p in module.teacher.parameters()) and not module.teacher.training
    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    sample_logps = -torch.rand(4, 4, generator=g) * 5 * mask
    rollout = Rollout(
        torch.randint(300, 3000, (2, 3), generator=g),
        torch.ones(2, 3, dtype=torch.long),
        torch.randint(300, 3000, (4, 4), generator=g),
        mask,
        group_index(2, 2),
        torch.zeros(4, dtype=torch.bool),
        sample_logps,
    )
    scores = RewardResult(torch.tensor([1.0, 0.0, 0.3, 0.9]), {})
    advantages, stats = module.advantages(rollout, scores, None, None)
    teacher = module.frozen_logps(module.teacher, rollout)
    task = group_advantages(scores.total, 2)
    want = (teacher - sample_logps + 0.5 * task[:, None]) * mask
    torch.testing.assert_close(advantages, want)
    k = ((sample_logps - teacher) * mask).sum() / mask.sum()
    assert stats["distill/reverse_kl"] == pytest.approx(float(k), rel=1e-5)
    assert stats["distill/teacher_logps"] == pytest.approx(float((teacher * mask).sum() / mask.sum()), rel=1e-5)
    assert stats["distill/student_logps"] == pytest.approx(float(sample_logps.sum() / mask.sum()), rel=1e-5)


def test_full_divergence_scores_the_same_positions_as_grpo_and_trains_only_the_adapter():
    """divergence=forward/reverse/jsd: the logits it takes (:func:`scored_logits`) give, at the sampled tokens,
    exactly GRPO's logps of the rollout (same positions and order), and the full KL's gradient reaches only a LoRA
    student's adapter."""
    module = DistillModule(policy=models.ModelSpec(name="tiny"), teacher=TINY, num_generations=2)
    module.configure_model()
    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    prompt_mask = torch.tensor([[0, 1, 1], [1, 1, 1]])  # left padding
    ids = torch.randint(300, 3000, (2, 3), generator=g)
    rollout = Rollout(ids, prompt_mask, torch.randint(300, 3000, (4, 4), generator=g), mask, group_index(2, 2),
                      torch.zeros(4, dtype=torch.bool))  # fmt: skip
    student, targets = scored_logits(module.policy, rollout)
    assert student.shape == (int(mask.sum()), module.policy.config.vocab_size)
    grpo = module.frozen_logps(module.policy, rollout)
    mine = torch.log_softmax(student.detach().float() / module.sampling.temperature, -1).gather(-1, targets[:, None])
    torch.testing.assert_close(mine[:, 0], grpo[mask.bool()], rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        teacher = scored_logits(module.teacher, rollout)[0]
    full_reverse_kl(student, teacher, torch.ones_like(targets)).sum().backward()
    grads = {n: p.grad for n, p in module.policy.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads) and any(g.abs().max() > 0 for g in grads.values())
    assert all(p.grad is None for p in module.teacher.parameters())


# ------------------------------------------------------------------------------------------------- end to end
def _sharper_student(path) -> str:
    """The tiny model (seed 0) with its final-norm weight x 8: its logits are 8 times larger, so it is far more
    confident than the teacher (tiny.yaml's, another random init) and its reverse KL to it starts high (~3 nats)."""
    model = models.load_causal_lm(TINY)
    with torch.no_grad():
        model.model.norm.weight.mul_(8.0)
    model.save_pretrained(path)
    models.load_tokenizer("tiny").save_pretrained(path)
    return str(path)


@pytest.mark.slow
@pytest.mark.parametrize("divergence", ["sampled", "reverse", "forward"])
def test_tiny_distillation_run_lowers_the_reverse_kl(divergence, tmp_path):
    """Every divergence lowers the logged reverse KL (``reverse``/``forward``: the exact full-vocabulary KL, with the
    trained divergence and the sampled estimate logged beside it)."""
    student = _sharper_student(tmp_path / "student")
    out = tmp_path / "run"
    command = [sys.executable, "-m", "lit_rlhf.experiments.distill", "--config", TINY_YAML, "--output_dir", str(out)]
    command += [f"--model.policy.name={student}", f"--model.divergence={divergence}"]
    command += ["--trainer.enable_progress_bar=false"]
    command += ["--trainer.enable_checkpointing=false", "--export=false"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("final_metrics.json", "config.yaml", "samples.jsonl", "csv/version_0/metrics.csv"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "final_metrics.json").read_text())
    assert summary["stage"] == "distill" and summary["global_step"] == 10
    assert {"val/accuracy", "val/rewards/mean"} <= set(summary["start"]) & set(summary["end"])
    rows = list(csv.DictReader(open(out / "csv" / "version_0" / "metrics.csv")))
    kl = [float(r["train/distill/reverse_kl"]) for r in rows if r.get("train/distill/reverse_kl")]
    assert len(kl) == 10 and all(k == k for k in kl)
    first, last = sum(kl[:3]) / 3, sum(kl[-3:]) / 3
    assert last < 0.85 * first, kl  # the student moves toward the teacher
    logged = {k for r in rows for k, v in r.items() if v} | set(summary["start"])
    assert {"train/distill/student_logps", "train/distill/teacher_logps", "train/loss", "val/accuracy"} <= logged
    assert ("train/distill/sampled_reverse_kl" in logged) == (divergence != "sampled")
    if divergence != "sampled":  # exact KLs: never negative; the loss is the trained divergence (one pass)
        trained = [float(r["train/distill/divergence"]) for r in rows if r.get("train/distill/divergence")]
        assert min(kl) > 0 and min(trained) > 0
        losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
        assert losses == pytest.approx(trained, rel=1e-4)
        assert (trained == pytest.approx(kl, rel=1e-4)) == (divergence == "reverse")
    assert undocumented(logged) == [], "every metric distillation logs is in the README's schema"
    assert "distill:" in done.stdout and "val/accuracy" in done.stdout  # the start -> end summary
    kl_panel = next(c for c in report.CURVES if c.title == "KL")
    assert report.pick(kl_panel, "train", report.load_run(out).metrics) == "train/distill/reverse_kl"  # lit-rlhf report


def test_lit_rlhf_distill_help():
    done = subprocess.run(
        [sys.executable, "-m", "lit_rlhf.experiments.main", "distill", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    options = ("--model.teacher.name", "--model.divergence", "--model.task_reward_weight", "--model.kl_discount")
    for option in (*options, "--model.loss"):
        assert option in done.stdout, option
