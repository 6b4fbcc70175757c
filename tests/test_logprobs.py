"""The shift/mask logic: token logps from logits at scored positions only, and the shared-prompt path."""

import math

import pytest
import torch
import torch.nn.functional as F

from lit_rlhf import models
from lit_rlhf.data.collate import pad_left, pad_right
from lit_rlhf.logprobs import (
    entropy_from_logits,
    head_logps,
    head_outside,
    masked_mean,
    masked_whiten,
    response_logps,
    selective_log_softmax,
    sequence_logps,
    token_logps,
)


@pytest.fixture(scope="module")
def tiny():
    return models.load_causal_lm(models.ModelSpec(name="tiny", lora=None)).eval()


def naive_logps(lm, input_ids, attention_mask, position_ids=None):
    """Full logits, full log-softmax, shift by one: logps[b, t] = log p(ids[b, t] | ids[b, :t])."""
    logits = lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    lp = F.log_softmax(logits[:, :-1].float(), -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return F.pad(lp, (1, 0))


def test_selective_log_softmax_matches_log_softmax():
    logits, targets = torch.randn(7, 50), torch.randint(0, 50, (7,))
    expected = F.log_softmax(logits, -1)[torch.arange(7), targets]
    torch.testing.assert_close(selective_log_softmax(logits, targets, chunk_rows=3), expected)


def test_token_logps_matches_naive(tiny):
    ids = torch.randint(0, 1000, (3, 12))
    attn = torch.ones_like(ids)
    attn[2, 9:] = 0
    mask = torch.zeros_like(ids)
    mask[:, 6:9] = 1
    got = token_logps(tiny, ids, attn, mask).logps
    expected = naive_logps(tiny, ids, attn) * mask
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (got[mask == 0] == 0).all()


def test_position_zero_cannot_be_scored(tiny):
    ids = torch.randint(0, 1000, (1, 5))
    with pytest.raises(ValueError, match="position 0"):
        token_logps(tiny, ids, torch.ones_like(ids), torch.ones_like(ids))


def test_response_logps_equals_concatenated_forward(tiny):
    """Prompt once + responses on its KV cache == full rows, incl. prompts of different lengths and padding."""
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]
    responses = [[20, 21, 22], [23, 24], [25, 26, 27, 28], [29]]
    prompt_index = torch.tensor([0, 1, 0, 1])
    p_ids, p_mask = pad_left(prompts, 0), pad_left([[1] * len(p) for p in prompts], 0)
    r_ids, r_mask = pad_right(responses, 0), pad_right([[1] * len(r) for r in responses], 0)
    shared = response_logps(tiny, p_ids, p_mask, r_ids, r_mask, prompt_index, with_entropy=True)
    for n, (pi, resp) in enumerate(zip(prompt_index.tolist(), responses)):
        row = torch.tensor([prompts[pi] + resp])
        full = naive_logps(tiny, row, torch.ones_like(row))[0, len(prompts[pi]) :]
        torch.testing.assert_close(shared.logps[n, : len(resp)], full, atol=1e-5, rtol=1e-5)
        assert (shared.logps[n, len(resp) :] == 0).all()
    assert (shared.entropy[r_mask.bool()] > 0).all()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fused_head_logps_entropy_and_gradients_match_autograd(temperature):
    """head_logps == log_softmax(h W^T / T)[target], entropy likewise, and its hand-written backward gives autograd's
    gradients for the hidden states and the head weight."""
    torch.manual_seed(0)
    hidden, weight = torch.randn(9, 16, requires_grad=True), torch.randn(40, 16, requires_grad=True)
    targets, g = torch.randint(0, 40, (9,)), torch.randn(9)
    logps, entropy = head_logps(hidden, weight, targets, temperature, with_entropy=True)
    (logps * g).sum().backward()
    fused_grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    full = F.log_softmax(hidden @ weight.t() / temperature, -1)
    expected = full.gather(-1, targets[:, None]).squeeze(-1)
    (expected * g).sum().backward()
    torch.testing.assert_close(logps, expected.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy, -(full.exp() * full).sum(-1).detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused_grads[0], hidden.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused_grads[1], weight.grad, atol=1e-5, rtol=1e-5)
    assert head_logps(hidden[:0], weight, targets[:0])[0].shape == (0,)


def test_fused_head_refuses_a_second_backward():
    """Backward reuses its saved logits buffer in place: a second backward (retain_graph) must fail, not be wrong."""
    hidden, weight = torch.randn(3, 8, requires_grad=True), torch.randn(20, 8)
    logps, _ = head_logps(hidden, weight, torch.tensor([1, 2, 3]))
    logps.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        logps.sum().backward()


class _Wrapped(torch.nn.Module):
    """The same network without ``get_output_embeddings``: logps go through the model's own head (unfused path)."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, **kwargs):
        return self.lm(**kwargs)


@pytest.mark.parametrize("lora", [False, True])
def test_fused_head_path_equals_the_model_head_in_values_and_gradients(lora, monkeypatch):
    """response_logps with the head fused (the default for a plain HF model) == through the model's own lm_head: logps,
    entropy and every trainable parameter's gradient (the tied embedding of a full fine-tune included)."""
    spec = models.ModelSpec(name="tiny", lora=models.LoRASettings(r=4, alpha=8) if lora else None)
    lm = models.load_causal_lm(spec)
    head = lm.get_output_embeddings()
    monkeypatch.setenv("LIT_RLHF_FUSED_HEAD", "0")
    with head_outside(lm) as fused:
        assert fused is None, "LIT_RLHF_FUSED_HEAD=0 switches it off"
    monkeypatch.delenv("LIT_RLHF_FUSED_HEAD")
    with head_outside(lm) as fused:
        assert fused is head and not isinstance(lm.get_output_embeddings(), torch.nn.Linear)
    assert lm.get_output_embeddings() is head
    with head_outside(_Wrapped(lm)) as fused:
        assert fused is None
    p_ids, p_mask = pad_left([[5, 6, 7, 8], [9, 10]], 0), pad_left([[1] * 4, [1] * 2], 0)
    r_ids, r_mask = (
        pad_right([[20, 21, 22], [23, 24], [25], [26, 27, 28]], 0),
        pad_right([[1] * 3, [1] * 2, [1], [1] * 3], 0),
    )
    index = torch.tensor([0, 0, 1, 1])
    weights = torch.randn(r_ids.shape)
    results = []
    for net in (lm, _Wrapped(lm)):
        lm.zero_grad(set_to_none=True)
        out = response_logps(net, p_ids, p_mask, r_ids, r_mask, index, temperature=0.8, with_entropy=True)
        (out.logps * weights).sum().backward()
        results.append((out, {n: p.grad.clone() for n, p in lm.named_parameters() if p.requires_grad}))
    (fused_out, fused_grads), (plain_out, plain_grads) = results
    torch.testing.assert_close(fused_out.logps, plain_out.logps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused_out.entropy, plain_out.entropy, atol=1e-5, rtol=1e-5)
    assert fused_grads.keys() == plain_grads.keys() and len(fused_grads) > 0
    for name in fused_grads:
        torch.testing.assert_close(fused_grads[name], plain_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_sequence_and_masked_stats():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    m = torch.tensor([[1, 1, 0], [0, 1, 1]])
    assert sequence_logps(x, m).tolist() == [3.0, 11.0]
    assert masked_mean(x, m).item() == pytest.approx((1 + 2 + 5 + 6) / 4)
    w = masked_whiten(x, m)
    vals = w[m.bool()]
    assert vals.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert vals.std().item() == pytest.approx(1.0, abs=1e-4)


def test_entropy_from_logits_closed_form_chunks_and_gradient():
    """Uniform logits over V = 4 give H = log 4; logits (0, log 3, -1e4, -1e4) give p = (1/4, 3/4, 0, 0) and
    H = (1/4) log 4 + (3/4) log(4/3). Row chunks give the same result as one pass, and H is differentiable (the PPO
    entropy bonus): dH/dz_i = -p_i (log p_i + H), which is 0 for uniform logits."""
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, math.log(3.0), -1e4, -1e4]], requires_grad=True)
    entropy = entropy_from_logits(logits, chunk_rows=1)
    expected = torch.tensor([math.log(4.0), 0.25 * math.log(4.0) + 0.75 * math.log(4.0 / 3.0)])
    torch.testing.assert_close(entropy, expected)
    entropy[0].backward()
    torch.testing.assert_close(logits.grad[0], torch.zeros(4), atol=1e-7, rtol=0)
    other = torch.randn(5, 7, generator=torch.Generator().manual_seed(0), requires_grad=True)
    torch.testing.assert_close(entropy_from_logits(other, chunk_rows=2), entropy_from_logits(other, chunk_rows=1024))
    entropy_from_logits(other).sum().backward()
    p = other.detach().softmax(-1)
    h = -(p * p.log()).sum(-1, keepdim=True)
    torch.testing.assert_close(other.grad, -p * (p.log() + h))
