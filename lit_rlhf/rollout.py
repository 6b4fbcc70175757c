"""Generation: batched, KV-cached sampling from a causal LM -> :class:`lit_rlhf.types.Rollout`. No training logic.

The interface is one function, :data:`RolloutFn`: ``(lm, prompt_ids, prompt_mask, prompt_index, settings,
eos_token_ids, pad_token_id, generator) -> Rollout`` (ids, masks, truncation flags, and where they come free the
sampling logps and entropy). :func:`sample` is the built-in backend; another one (vLLM) registers in
:data:`ROLLOUT_BACKENDS` and the stage does not change. :func:`decode` turns the completions into text;
:func:`sample_completions` is the stages' one call (a backend on a batch of prompts, text decoded).

How :func:`sample` works (one prefill, then one token per step for all rows):

1. prefill the B left-padded prompts once (explicit ``position_ids = cumsum(mask) - 1``, so padding is invisible),
   keeping the KV cache and the last position's logits;
2. expand the cache to the N = B G completion rows (``cache.batch_select_indices(prompt_index)``): each prompt is
   encoded once, however many completions it gets;
3. decode: temper the logits, take the sampled token's log-prob under the tempered distribution (the ``old_logps``
   convention: temperature applied, top-k/top-p not), filter (top-k, then top-p), sample, feed the token back with
   ``logits_to_keep=1``; rows that emitted EOS get padding and leave the mask; stop when every row is done or the
   budget is spent (those rows are ``truncated``).

Two hooks make the samples independent of how a batch is split over processes: ``noise`` gives each decode step's
uniforms (a stage draws them for the global batch, keeps its own rows: :class:`lit_rlhf.distributed.GlobalBatchNoise`)
and ``all_done`` decides when decoding stops (under FSDP2 every rank must run every forward, so it must agree across
ranks: :func:`lit_rlhf.distributed.all_ranks_done`). Without them: ``torch.rand`` from ``generator``, and this
process's own rows.

Temperature 0 is greedy decoding (``sample_logps`` then are the untempered logps). Runs under
``torch.inference_mode`` (``torch.no_grad`` for an FSDP2-sharded model) (the returned tensors are ordinary copies,
usable in training) and in eval mode (dropout off), restoring the module's mode afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lit_rlhf.distributed import GlobalBatchNoise, is_sharded, lockstep_done
from lit_rlhf.logprobs import TokenLogps, response_logps, token_logps
from lit_rlhf.models import eos_token_ids as eos_ids
from lit_rlhf.models import merged_lora
from lit_rlhf.types import PromptBatch, Rollout
from lit_rlhf.vllm_engine import VLLMSettings
from lit_rlhf.vllm_engine import sample as vllm_sample


@dataclass
class SamplingSettings:
    """How completions are sampled.

    Args:
        max_new_tokens: completion budget in tokens; a row without EOS by then is truncated.
        temperature: softmax temperature; 0 decodes greedily.
        top_p: nucleus sampling: keep the smallest set of tokens whose probability reaches ``top_p`` (1.0: off).
        top_k: keep the ``top_k`` most likely tokens (0: off).
    """

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0


RolloutFn = Callable[
    [nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, SamplingSettings, list[int], int, torch.Generator | None],
    Rollout,
]


@contextlib.contextmanager
def eval_mode(lm: nn.Module) -> Iterator[None]:
    was_training = lm.training
    lm.eval()
    try:
        yield
    finally:
        lm.train(was_training)


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """[N, V] logits with every token outside the top-k / top-p (nucleus) set at -inf (the most likely stays)."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p  # mass before this token already reaches p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def choose_tokens(
    logits: torch.Tensor,
    settings: SamplingSettings,
    generator: torch.Generator | None,
    uniforms: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens [N], their logps [N] at the sampling temperature before filtering, entropy [N]) from logits [N, V].

    One softmax pass: logsumexp is recovered from the most likely token (``lse = logit_max - log p_max``, exact in
    floating point where p_max is largest), entropy = lse - sum(p * logits). Sampling inverts the CDF with one
    uniform per row (``torch.multinomial`` is ~10x slower on a CPU for a 49k vocabulary): ``uniforms`` [N, 1] when
    given, else drawn from ``generator``.
    """
    logits = logits.float()
    if settings.temperature > 0 and settings.temperature != 1.0:
        logits = logits / settings.temperature
    probs = logits.softmax(-1)
    best = logits.argmax(-1, keepdim=True)
    lse = logits.gather(-1, best) - probs.gather(-1, best).log()  # [N, 1]
    entropy = lse.squeeze(-1) - torch.linalg.vecdot(probs, logits)
    if settings.temperature == 0:
        tokens = best
    else:
        if settings.top_k > 0 or settings.top_p < 1.0:
            probs = filter_logits(logits, settings.top_k, settings.top_p).softmax(-1)
        cdf = probs.cumsum(-1)
        if uniforms is None:
            uniforms = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device)
        u = uniforms.to(cdf) * cdf[:, -1:]
        tokens = torch.searchsorted(cdf, u, right=True).clamp(max=cdf.shape[-1] - 1)
    logps = (logits.gather(-1, tokens) - lse).squeeze(-1)
    return tokens.squeeze(-1), logps, entropy


def sample(
    lm: nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    prompt_index: torch.Tensor,
    settings: SamplingSettings,
    eos_token_ids: list[int],
    pad_token_id: int,
    generator: torch.Generator | None = None,
    *,
    noise: Callable[[], torch.Tensor] | None = None,
    all_done: Callable[[torch.Tensor], bool] | None = None,
) -> Rollout:
    """Sample one completion per entry of ``prompt_index`` ([N]) for the left-padded prompts [B, P] (module doc).

    ``noise()``: the uniforms [N, 1] of one decode step (default: ``torch.rand`` from ``generator``);
    ``all_done(done [N])``: whether decoding may stop (default: every row of this process is done).
    """
    if settings.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {settings.max_new_tokens}")
    n, budget, device = prompt_index.numel(), settings.max_new_tokens, prompt_ids.device
    no_grad = (
        torch.no_grad() if is_sharded(lm) else torch.inference_mode()
    )  # FSDP2 reuses its all-gather buffers in training
    with eval_mode(lm), no_grad:
        positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
        out = lm(
            input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions, use_cache=True, logits_to_keep=1
        )
        cache = out.cache
        cache.batch_select_indices(prompt_index)
        logits = out.logits[prompt_index, -1]
        attention_mask = prompt_mask[prompt_index]
        next_position = prompt_mask.sum(-1)[prompt_index, None]
        eos = torch.tensor(eos_token_ids, device=device)
        response_ids = torch.full((n, budget), pad_token_id, dtype=torch.long, device=device)
        response_mask = torch.zeros((n, budget), dtype=torch.long, device=device)
        sample_logps = torch.zeros((n, budget), dtype=torch.float32, device=device)
        entropy = torch.zeros((n, budget), dtype=torch.float32, device=device)
        done = torch.zeros(n, dtype=torch.bool, device=device)
        length = budget
        for t in range(budget):
            uniforms = noise() if noise is not None and settings.temperature > 0 else None
            tokens, logps, ent = choose_tokens(logits, settings, generator, uniforms)
            live = ~done
            response_ids[:, t] = torch.where(live, tokens, pad_token_id)
            response_mask[:, t] = live
            sample_logps[:, t] = logps * live
            entropy[:, t] = ent * live
            done = done | torch.isin(tokens, eos)
            if t == budget - 1 or (all_done(done) if all_done is not None else bool(done.all())):
                length = t + 1
                break
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(n, 1)], dim=1)
            out = lm(
                input_ids=response_ids[:, t : t + 1],
                attention_mask=attention_mask,
                position_ids=next_position + t,
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            logits = out.logits[:, -1]
    outputs = (response_ids, response_mask, sample_logps, entropy)
    response_ids, response_mask, sample_logps, entropy = (x[:, :length].clone() for x in outputs)
    return Rollout(
        prompt_ids, prompt_mask, response_ids, response_mask, prompt_index, (~done).clone(), sample_logps, entropy
    )


ROLLOUT_BACKENDS: dict[str, RolloutFn] = {"kv_cache": sample, "vllm": vllm_sample}
"""Name -> rollout backend, as selected in YAML (``rollout_backend``); ``vllm``: :mod:`lit_rlhf.vllm_engine`."""


def sample_completions(
    lm: nn.Module,
    tokenizer,
    batch: PromptBatch,
    group_size: int,
    settings: SamplingSettings,
    generator: torch.Generator | None,
    backend: str = "kv_cache",
    engine: VLLMSettings | None = None,
) -> Rollout:
    """``group_size`` completions per prompt of ``batch`` (a group's rows consecutive), with their texts: the sampling
    step GRPO and PPO share. A completion ends at any EOS id of :func:`lit_rlhf.models.eos_token_ids`; LoRA is folded
    into the weights for the decode (:func:`lit_rlhf.models.merged_lora`); the noise is drawn for the global batch
    (:class:`lit_rlhf.distributed.GlobalBatchNoise`; without a generator: none, e.g. greedy decoding) and
    FSDP2-sharded ranks decode in lockstep. ``engine``: the vLLM engine's settings (``backend="vllm"``)."""
    num_prompts, eos_token_ids = batch.input_ids.shape[0], eos_ids(tokenizer, lm)
    index = group_index(num_prompts, group_size, batch.input_ids.device)
    noise = GlobalBatchNoise(generator, num_prompts, group_size) if generator is not None else None
    options = {"engine": engine} if backend == "vllm" else {}
    with merged_lora(lm) as policy:  # a faster decode step: one matmul per adapted layer
        rollout = ROLLOUT_BACKENDS[backend](
            policy,
            batch.input_ids,
            batch.attention_mask,
            index,
            settings,
            eos_token_ids,
            tokenizer.pad_token_id,
            generator,
            all_done=lockstep_done(policy),
            noise=noise,
            **options,
        )
    rollout.prompts, rollout.completions = list(batch.prompts), decode(tokenizer, rollout)
    return rollout


def rollout_logps(
    lm: nn.Module, rollout: Rollout, temperature: float, with_entropy: bool = False, no_cache: bool = False
) -> TokenLogps:
    """Logps [N, R] (with grad unless the caller disables it) of the rollout's completions under ``lm`` at the
    sampling ``temperature``: each prompt run once and its completions on its KV cache
    (:func:`lit_rlhf.logprobs.response_logps`), or with ``no_cache`` (gradient checkpointing) every row as one
    sequence."""
    r = rollout
    if not no_cache:
        return response_logps(
            lm, r.prompt_ids, r.prompt_mask, r.response_ids, r.response_mask, r.prompt_index, temperature, with_entropy
        )
    input_ids, attention_mask, loss_mask, position_ids = r.as_sequences()
    out = token_logps(lm, input_ids, attention_mask, loss_mask, position_ids, temperature, with_entropy)
    width = r.prompt_ids.shape[1]
    return TokenLogps(out.logps[:, width:], None if out.entropy is None else out.entropy[:, width:])


def completion_stats(rollout: Rollout) -> dict[str, float]:
    """``completions/{mean,min,max}_length`` (tokens, EOS included) and ``completions/truncated_rate`` (no EOS)."""
    lengths = rollout.completion_lengths.float()
    return {
        "completions/mean_length": lengths.mean().item(),
        "completions/min_length": lengths.min().item(),
        "completions/max_length": lengths.max().item(),
        "completions/truncated_rate": rollout.truncated.float().mean().item(),
    }


def decode(tokenizer, rollout: Rollout) -> list[str]:
    """Completion texts [N] (special tokens, hence EOS, skipped)."""
    rows = [ids[mask.bool()].tolist() for ids, mask in zip(rollout.response_ids, rollout.response_mask)]
    return tokenizer.batch_decode(rows, skip_special_tokens=True)


def group_index(num_prompts: int, group_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """prompt_index [B G] for G completions per prompt, the rows of a group consecutive: 0,0,..,1,1,.."""
    return torch.arange(num_prompts, device=device).repeat_interleave(group_size)


def concat_rollouts(rollouts: list[Rollout], pad_token_id: int) -> Rollout:
    """One Rollout of all prompts and completions (prompts re-padded on the left, completions on the right)."""
    p_width = max(r.prompt_ids.shape[1] for r in rollouts)
    r_width = max(r.response_ids.shape[1] for r in rollouts)

    def cat(name: str, width: int, value: float, left: bool) -> torch.Tensor | None:
        parts = [getattr(r, name) for r in rollouts]
        if any(p is None for p in parts):
            return None
        return torch.cat(
            [F.pad(p, (width - p.shape[1], 0) if left else (0, width - p.shape[1]), value=value) for p in parts]
        )

    offsets = torch.tensor([0] + [r.num_prompts for r in rollouts]).cumsum(0).tolist()
    return Rollout(
        cat("prompt_ids", p_width, pad_token_id, True),
        cat("prompt_mask", p_width, 0, True),
        cat("response_ids", r_width, pad_token_id, False),
        cat("response_mask", r_width, 0, False),
        torch.cat([r.prompt_index + o for r, o in zip(rollouts, offsets)]),
        torch.cat([r.truncated for r in rollouts]),
        cat("sample_logps", r_width, 0.0, False),
        cat("entropy", r_width, 0.0, False),
        [p for r in rollouts for p in r.prompts],
        [c for r in rollouts for c in r.completions],
    )
