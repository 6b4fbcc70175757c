"""The full-vocabulary divergences of on-policy distillation (:mod:`lit_rlhf.losses.distill`) against hand values on
2- and 3-token vocabularies; their gradients against the hand derivatives (reverse KL:
pi_s (log pi_s - log pi_t - KL) / T; forward KL: (pi_s - pi_t) / T); the generalised JSD against TRL's published
``generalized_jsd_loss`` formula (F.kl_div on the log-mixture, trl/trainer/gkd_trainer.py) and its beta -> 0 / 1
limits; and the reason the default is the forward KL: at a student certain of the wrong token the reverse KL's
gradient vanishes, the forward KL's does not."""

import math

import pytest
import torch
import torch.nn.functional as F

from lit_rlhf.losses import full_forward_kl, full_reverse_kl, generalized_jsd

LN3 = math.log(3.0)


def test_value_by_hand_with_padding_and_temperature():
    # row 0: pi_s = (1/4, 3/4), pi_t = (1/2, 1/2); row 1: pi_s = pi_t (KL 0); row 2: padding with a huge KL
    student = torch.tensor([[[0.0, LN3], [1.0, 2.0], [50.0, -50.0]]], dtype=torch.float64)
    teacher = torch.tensor([[[0.0, 0.0], [1.0, 2.0], [-50.0, 50.0]]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0]])
    want = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    kl = full_reverse_kl(student, teacher, mask)
    assert kl.shape == (1, 3) and kl.dtype == torch.float32
    torch.testing.assert_close(kl, torch.tensor([[want, 0.0, 0.0]]))
    # temperature 2 divides both logits: student (0, 2 ln 3) -> pi_s = (1/4, 3/4), teacher (0, 0) stays uniform
    hot = full_reverse_kl(student * torch.tensor([1.0, 2.0], dtype=torch.float64), teacher, mask, temperature=2.0)
    torch.testing.assert_close(hot[0, 0], torch.tensor(want, dtype=torch.float32))
    # three tokens: pi_s uniform, pi_t = (1/4, 1/2, 1/4): KL = 1/3 ln(32/27)
    three = full_reverse_kl(torch.zeros(1, 3), torch.log(torch.tensor([[1.0, 2.0, 1.0]])), torch.ones(1))
    torch.testing.assert_close(three, torch.tensor([math.log(32 / 27) / 3]))
    assert float(full_reverse_kl(student[0, :1], teacher[0, :1] + 7.0, torch.ones(1))) == pytest.approx(want)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_gradient_is_the_hand_derivative_and_reaches_only_the_student(temperature):
    student = torch.tensor([[0.3, -1.2, 2.0], [0.5, 0.1, -0.4], [9.0, 9.0, 9.0]], dtype=torch.float64)
    student.requires_grad_()
    teacher = torch.tensor([[1.0, 0.5, -2.0], [0.0, 0.7, 0.2], [0.0, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([1, 1, 0])
    kl = full_reverse_kl(student, teacher, mask, temperature)
    (grad,) = torch.autograd.grad(kl.sum(), student)
    log_s = torch.log_softmax(student.detach() / temperature, -1)
    log_t = torch.log_softmax(teacher / temperature, -1)
    per_token = (log_s.exp() * (log_s - log_t)).sum(-1, keepdim=True)
    want = log_s.exp() * (log_s - log_t - per_token) / temperature * mask[:, None]
    torch.testing.assert_close(grad, want.to(grad.dtype), rtol=1e-5, atol=1e-6)
    assert grad[2].abs().max() == 0 and grad[:2].abs().max() > 1e-2  # padding: no gradient
    # the gradient raises the teacher's preferred token of row 0 (index 0: teacher logit 1.0 vs student's 2.0 max)
    assert grad[0, 0] < 0 and grad[0, 2] > 0


def test_forward_kl_value_and_gradient_by_hand():
    # pi_s = (1/4, 3/4), pi_t = (1/2, 1/2): KL(pi_t || pi_s) = 1/2 ln 2 + 1/2 ln(2/3); padding row ignored
    student = torch.tensor([[0.0, LN3], [50.0, -50.0]], dtype=torch.float64, requires_grad=True)
    teacher = torch.tensor([[0.0, 0.0], [-50.0, 50.0]], dtype=torch.float64)
    kl = full_forward_kl(student, teacher, torch.tensor([1, 0]))
    assert kl.dtype == torch.float32
    torch.testing.assert_close(kl, torch.tensor([0.5 * math.log(2.0) + 0.5 * math.log(2 / 3), 0.0]))
    (grad,) = torch.autograd.grad(kl.sum(), student)
    torch.testing.assert_close(grad[0], torch.tensor([0.25 - 0.5, 0.75 - 0.5], dtype=torch.float64))  # pi_s - pi_t
    assert grad[1].abs().max() == 0
    (hot,) = torch.autograd.grad(
        full_forward_kl(student, teacher, torch.tensor([1, 0]), temperature=2.0).sum(), student
    )
    p_s = torch.softmax(student.detach()[0] / 2.0, -1)
    torch.testing.assert_close(hot[0], (p_s - 0.5) / 2.0)  # (pi_s - pi_t) / T at temperature 2


def test_jsd_value_by_hand_and_against_trls_formula():
    # beta = 1/2, pi_s = (1/4, 3/4), pi_t = (1/2, 1/2): m = (3/8, 5/8)
    student = torch.tensor([[0.0, LN3]], dtype=torch.float64)
    teacher = torch.zeros(1, 2, dtype=torch.float64)
    want = 0.5 * (0.5 * math.log(0.5 / 0.375) + 0.5 * math.log(0.5 / 0.625))
    want += 0.5 * (0.25 * math.log(0.25 / 0.375) + 0.75 * math.log(0.75 / 0.625))
    torch.testing.assert_close(
        generalized_jsd(student, teacher, torch.ones(1)), torch.tensor([want], dtype=torch.float32)
    )
    # TRL's generalized_jsd_loss (reduction none, summed over the vocabulary), written out independently:
    # mixture = logsumexp(log_s + log(1 - beta), log_t + log(beta)); beta * KL(t || m) + (1 - beta) * KL(s || m)
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 7, generator=g, dtype=torch.float64), torch.randn(5, 7, generator=g, dtype=torch.float64)
    for beta, temperature in ((0.5, 1.0), (0.1, 0.7), (0.9, 1.3)):
        log_s, log_t = F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1)
        b = torch.tensor(beta, dtype=torch.float64)
        mixture = torch.logsumexp(torch.stack([log_s + torch.log(1 - b), log_t + torch.log(b)]), dim=0)
        kl_teacher = F.kl_div(mixture, log_t, reduction="none", log_target=True).sum(-1)
        kl_student = F.kl_div(mixture, log_s, reduction="none", log_target=True).sum(-1)
        trl = (beta * kl_teacher + (1 - beta) * kl_student).float()
        torch.testing.assert_close(generalized_jsd(s, t, torch.ones(5), beta, temperature), trl, rtol=1e-5, atol=1e-7)
    # the limits, O(beta) and O(1 - beta) away: JSD / beta -> forward KL, JSD / (1 - beta) -> reverse KL
    ones = torch.ones(5)
    for limit, scaled in ((full_forward_kl(s, t, ones), lambda e: generalized_jsd(s, t, ones, e) / e),
                          (full_reverse_kl(s, t, ones), lambda e: generalized_jsd(s, t, ones, 1 - e) / e)):  # fmt: skip
        far, near = (float(((scaled(e) - limit) / limit).abs().max()) for e in (0.1, 0.001))  # relative errors
        assert near < 0.05 * far and near < 0.02, (far, near)
    for beta in (0.0, 1.0):
        with pytest.raises(ValueError, match="0 < beta < 1"):
            generalized_jsd(s, t, ones, beta)


def test_a_student_certain_of_the_wrong_token_gets_a_forward_kl_gradient_but_almost_no_reverse_kl_gradient():
    """What the default run showed: pi_s(wrong) ~ 1, pi_t(right) ~ 1. Reverse KL is huge (~12 nats) but its gradient
    pi_s (log pi_s - log pi_t - KL) is ~0 in every coordinate; the forward KL's pi_s - pi_t is ~1 in size."""
    student = torch.tensor([[20.0, 0.0, 0.0]], dtype=torch.float64, requires_grad=True)  # certain of token 0
    teacher = torch.tensor([[0.0, 12.0, 0.0]], dtype=torch.float64)  # certain of token 1
    reverse = full_reverse_kl(student, teacher, torch.ones(1))
    assert float(reverse.detach()) > 11.0
    (grad_reverse,) = torch.autograd.grad(reverse.sum(), student)
    (grad_forward,) = torch.autograd.grad(full_forward_kl(student, teacher, torch.ones(1)).sum(), student)
    assert grad_reverse.abs().max() < 1e-5
    assert grad_forward[0, 0] > 0.99 and grad_forward[0, 1] < -0.99  # lowers the wrong token, raises the right one


@pytest.mark.parametrize("divergence", [full_reverse_kl, full_forward_kl, generalized_jsd])
def test_shapes_refused(divergence):
    with pytest.raises(ValueError, match="logits"):
        divergence(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2))
    with pytest.raises(ValueError, match="mask"):
        divergence(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(3))
    with pytest.raises(ValueError, match="temperature"):
        divergence(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2), temperature=0.0)
