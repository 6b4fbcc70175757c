"""The full-vocabulary reverse KL of on-policy distillation (:func:`lit_rlhf.losses.full_reverse_kl`) against hand
values on 2- and 3-token vocabularies, and its gradient against the hand derivative
d KL / d z_s = pi_s (log pi_s - log pi_t - KL) / temperature."""

import math

import pytest
import torch

from lit_rlhf.losses import full_reverse_kl

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


def test_shapes_refused():
    with pytest.raises(ValueError, match="logits"):
        full_reverse_kl(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2))
    with pytest.raises(ValueError, match="mask"):
        full_reverse_kl(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(3))
    with pytest.raises(ValueError, match="temperature"):
        full_reverse_kl(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2), temperature=0.0)
