"""The KV-cached sampler (lit_rlhf.rollout): EOS handling, truncation, sampling logps and entropy against a fresh
forward, greedy decoding against HF ``generate``, top-k/top-p filtering, and the Rollout container."""

from types import SimpleNamespace

import pytest
import torch

from lit_rlhf import models
from lit_rlhf.data.collate import pad_left
from lit_rlhf.logprobs import response_logps
from lit_rlhf.rollout import (
    SamplingSettings,
    choose_tokens,
    concat_rollouts,
    decode,
    filter_logits,
    group_index,
    sample,
)

EOS, PAD, V = 2, 0, 8


class ScriptedCache:
    """Stands in for a DynamicCache: remembers which prompt each row came from."""

    def __init__(self, rows: int) -> None:
        self.rows = torch.arange(rows)

    def batch_select_indices(self, index: torch.Tensor) -> None:
        self.rows = self.rows[index]


class ScriptedLM(torch.nn.Module):
    """A fake causal LM whose t-th sampled token is scripted per prompt: ``script[prompt][t]`` gets all the mass."""

    def __init__(self, script: list[list[int]]) -> None:
        super().__init__()
        self.script, self.calls = script, 0

    def forward(self, input_ids, attention_mask, position_ids, use_cache, logits_to_keep, cache=None):
        cache = cache or ScriptedCache(input_ids.shape[0])
        t = self.calls
        self.calls += 1
        logits = torch.full((input_ids.shape[0], 1, V), -1e4)
        for row in range(input_ids.shape[0]):
            script = self.script[int(cache.rows[row])]  # prefill: one row per prompt; decoding: one per completion
            logits[row, 0, script[min(t, len(script) - 1)]] = 0.0
        return SimpleNamespace(logits=logits, cache=cache)


def test_eos_stops_a_row_masks_after_it_and_flags_truncation():
    """Row 0 emits EOS at step 1 (mask [1, 1, 0, 0], then padding); row 1 never does within 4 tokens (truncated);
    row 2 emits EOS at step 3 (the last allowed token: not truncated)."""
    lm = ScriptedLM([[5, EOS, 6, 6], [4, 4, 4, 4], [3, 3, 3, EOS]])
    prompt_ids, prompt_mask = torch.tensor([[7, 7], [0, 7], [7, 7]]), torch.tensor([[1, 1], [0, 1], [1, 1]])
    r = sample(lm, prompt_ids, prompt_mask, torch.arange(3), SamplingSettings(max_new_tokens=4), [EOS], PAD)
    assert r.response_ids.tolist() == [[5, EOS, PAD, PAD], [4, 4, 4, 4], [3, 3, 3, EOS]]
    assert r.response_mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]]
    assert r.truncated.tolist() == [False, True, False]
    assert r.completion_lengths.tolist() == [2, 4, 4]
    assert (r.sample_logps * (1 - r.response_mask)).abs().sum() == 0


def test_sampling_stops_once_every_row_is_done():
    lm = ScriptedLM([[5, EOS], [EOS]])
    r = sample(
        lm,
        torch.tensor([[7], [7]]),
        torch.ones(2, 1, dtype=torch.long),
        torch.arange(2),
        SamplingSettings(max_new_tokens=10),
        [EOS],
        PAD,
    )
    assert r.response_ids.shape == (2, 2) and lm.calls == 2  # prefill + one decode step, not 10
    assert r.response_mask.tolist() == [[1, 1], [1, 0]] and not r.truncated.any()


@pytest.fixture(scope="module")
def tiny():
    lm = models.load_causal_lm(models.ModelSpec(name="tiny", lora=None)).eval()
    tok = models.load_tokenizer("tiny")
    rows = [tok("What is 12 + 30?")["input_ids"], tok("Hi")["input_ids"], tok("What is 99 - 11? Answer:")["input_ids"]]
    return lm, tok, pad_left(rows, tok.pad_token_id), pad_left([[1] * len(r) for r in rows], 0)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sample_logps_and_entropy_equal_a_fresh_forward(tiny, temperature):
    """The sampler's logps of the chosen tokens (tempered, unfiltered) and its entropy equal what response_logps
    computes for the same completions in one forward: the old_logps convention."""
    lm, tok, prompt_ids, prompt_mask = tiny
    index = group_index(3, 2)
    r = sample(
        lm,
        prompt_ids,
        prompt_mask,
        index,
        SamplingSettings(max_new_tokens=6, temperature=temperature, top_k=50),
        [tok.eos_token_id],
        tok.pad_token_id,
        torch.Generator().manual_seed(0),
    )
    with torch.no_grad():
        fresh = response_logps(
            lm,
            r.prompt_ids,
            r.prompt_mask,
            r.response_ids,
            r.response_mask,
            r.prompt_index,
            temperature,
            with_entropy=True,
        )
    torch.testing.assert_close(r.sample_logps, fresh.logps, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(r.entropy, fresh.entropy, atol=2e-4, rtol=1e-4)


def test_greedy_equals_hf_generate(tiny):
    lm, tok, prompt_ids, prompt_mask = tiny
    r = sample(
        lm,
        prompt_ids,
        prompt_mask,
        torch.arange(3),
        SamplingSettings(max_new_tokens=8, temperature=0.0),
        [tok.eos_token_id],
        tok.pad_token_id,
    )
    with torch.no_grad():
        out = lm.generate(
            input_ids=prompt_ids,
            attention_mask=prompt_mask,
            do_sample=False,
            max_new_tokens=8,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
    expected = out[:, prompt_ids.shape[1] :]
    assert r.response_ids.tolist() == expected[:, : r.response_ids.shape[1]].tolist()
    grouped = sample(
        lm,
        prompt_ids,
        prompt_mask,
        group_index(3, 2),
        SamplingSettings(max_new_tokens=8, temperature=0.0),
        [tok.eos_token_id],
        tok.pad_token_id,
    )
    assert (
        grouped.response_ids.tolist() == r.response_ids.repeat_interleave(2, 0).tolist()
    )  # KV cache expanded per group


def test_sampling_follows_the_tempered_distribution():
    """Frequencies of 20k draws from softmax(logits / T) match the probabilities within 4 standard errors."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -30.0]]).repeat(20000, 1)
    tokens, logps, entropy = choose_tokens(logits, SamplingSettings(temperature=0.5), torch.Generator().manual_seed(0))
    p = torch.softmax(logits[0] / 0.5, -1)
    freq = torch.bincount(tokens, minlength=5).double() / 20000
    assert ((freq - p).abs() <= 4 * (p * (1 - p) / 20000).sqrt() + 1e-9).all()
    torch.testing.assert_close(logps, torch.log(p)[tokens].float())
    torch.testing.assert_close(entropy[0], -(p * p.log()).nansum().float())


def test_filter_logits_top_k_and_top_p():
    """Probabilities (0.5, 0.25, 0.15, 0.1): top_k=2 keeps tokens 0 and 1; top_p=0.7 keeps the smallest prefix
    reaching 0.7, tokens 0 and 1 (0.5 < 0.7 <= 0.75); top_p=0.5 keeps token 0 only."""
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1]]))
    kept = lambda k, p: torch.isfinite(filter_logits(logits, k, p))[0].tolist()  # noqa: E731
    assert kept(2, 1.0) == [True, True, False, False]
    assert kept(0, 0.7) == [True, True, False, False]
    assert kept(0, 0.5) == [True, False, False, False]
    assert kept(0, 1.0) == [True] * 4
    tokens, _, _ = choose_tokens(logits.repeat(500, 1), SamplingSettings(top_k=1), torch.Generator().manual_seed(0))
    assert (tokens == 0).all()


def test_select_concat_and_decode(tiny):
    lm, tok, prompt_ids, prompt_mask = tiny
    r = sample(
        lm,
        prompt_ids,
        prompt_mask,
        group_index(3, 2),
        SamplingSettings(max_new_tokens=5),
        [tok.eos_token_id],
        tok.pad_token_id,
        torch.Generator().manual_seed(1),
    )
    r.prompts, r.completions = ["a", "b", "c"], decode(tok, r)
    part = r.select(torch.tensor([2, 3]))  # the two completions of prompt 1 ("Hi", the shortest prompt)
    assert part.prompt_index.tolist() == [0, 0] and part.prompts == ["b"] and part.completions == r.completions[2:4]
    assert part.prompt_ids.shape[1] == int(prompt_mask[1].sum())  # left padding trimmed
    with torch.no_grad():
        full = response_logps(lm, r.prompt_ids, r.prompt_mask, r.response_ids, r.response_mask, r.prompt_index).logps
        sub = response_logps(
            lm, part.prompt_ids, part.prompt_mask, part.response_ids, part.response_mask, part.prompt_index
        ).logps
    torch.testing.assert_close(sub, full[2:4], atol=1e-5, rtol=1e-5)
    both = concat_rollouts([part, r.select(torch.tensor([0, 1, 4, 5]))], tok.pad_token_id)
    assert both.prompts == ["b", "a", "c"] and both.prompt_index.tolist() == [0, 0, 1, 1, 2, 2]
    assert both.completions == r.completions[2:4] + r.completions[:2] + r.completions[4:]
    assert torch.equal(both.response_ids, r.response_ids[[2, 3, 0, 1, 4, 5]])
    assert decode(tok, both) == both.completions


def test_sample_completions_is_sample_on_a_prompt_batch(tiny):
    """The stages' one sampling call: the backend on the batch's prompts (group rows consecutive) with the EOS ids of
    models.eos_token_ids, texts decoded; a LoRA policy samples as its adapter-folded weights do; without a
    generator it decodes as given (greedy here): a LoRA policy like its merged copy."""
    from lit_rlhf.rollout import sample_completions
    from lit_rlhf.types import PromptBatch

    lm, tok, prompt_ids, prompt_mask = tiny
    batch = PromptBatch(prompt_ids, prompt_mask, ["p0", "p1", "p2"], {})
    settings = SamplingSettings(max_new_tokens=6, temperature=0.8)
    got = sample_completions(lm, tok, batch, 2, settings, torch.Generator().manual_seed(3))
    want = sample(
        lm,
        prompt_ids,
        prompt_mask,
        group_index(3, 2),
        settings,
        models.eos_token_ids(tok, lm),
        tok.pad_token_id,
        torch.Generator().manual_seed(3),
    )
    assert torch.equal(got.response_ids, want.response_ids) and torch.equal(got.response_mask, want.response_mask)
    assert got.prompts == ["p0", "p1", "p2"] and got.completions == decode(tok, want)
    greedy = SamplingSettings(max_new_tokens=6, temperature=0.0)
    lora = models.load_causal_lm(models.ModelSpec(name="tiny", lora=models.LoRASettings(r=4, alpha=8))).eval()
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))  # a trained-looking adapter
    import copy

    merged = copy.deepcopy(lora).merge_and_unload()
    got = sample_completions(lora, tok, batch, 1, greedy, None)
    assert torch.equal(got.response_ids, sample_completions(merged, tok, batch, 1, greedy, None).response_ids)
    assert got.response_ids.tolist() != sample_completions(lm, tok, batch, 1, greedy, None).response_ids.tolist()


def test_rollout_logps_with_and_without_the_kv_cache(tiny):
    """rollout_logps is response_logps on the rollout's tensors; no_cache (gradient checkpointing) runs each row as one
    sequence and gives the same logps and entropy."""
    from lit_rlhf.rollout import completion_stats, rollout_logps

    lm, tok, prompt_ids, prompt_mask = tiny
    r = sample(
        lm,
        prompt_ids,
        prompt_mask,
        group_index(3, 2),
        SamplingSettings(max_new_tokens=5),
        [tok.eos_token_id],
        tok.pad_token_id,
        torch.Generator().manual_seed(2),
    )
    with torch.no_grad():
        cached = rollout_logps(lm, r, 0.7, with_entropy=True)
        whole = rollout_logps(lm, r, 0.7, with_entropy=True, no_cache=True)
        want = response_logps(lm, r.prompt_ids, r.prompt_mask, r.response_ids, r.response_mask, r.prompt_index, 0.7)
    assert torch.equal(cached.logps, want.logps)
    torch.testing.assert_close(whole.logps, cached.logps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(whole.entropy, cached.entropy, atol=1e-4, rtol=1e-4)
    r.response_mask[0, 1:] = 0  # lengths 1, 5, 5, 5, 5, 5; one row truncated
    r.truncated = torch.tensor([False, True, False, False, False, False])
    stats = completion_stats(r)
    assert stats == {
        "completions/mean_length": pytest.approx(26 / 6),
        "completions/min_length": 1.0,
        "completions/max_length": 5.0,
        "completions/truncated_rate": pytest.approx(1 / 6),
    }
