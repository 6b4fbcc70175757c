"""The shift/mask logic: token logps from logits at scored positions only, and the shared-prompt path."""

import pytest
import torch
import torch.nn.functional as F

from lit_rlhf import models
from lit_rlhf.data.collate import pad_left, pad_right
from lit_rlhf.logprobs import masked_mean, masked_whiten, response_logps, selective_log_softmax, sequence_logps, token_logps


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


def test_sequence_and_masked_stats():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    m = torch.tensor([[1, 1, 0], [0, 1, 1]])
    assert sequence_logps(x, m).tolist() == [3.0, 11.0]
    assert masked_mean(x, m).item() == pytest.approx((1 + 2 + 5 + 6) / 4)
    w = masked_whiten(x, m)
    vals = w[m.bool()]
    assert vals.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert vals.std().item() == pytest.approx(1.0, abs=1e-4)
