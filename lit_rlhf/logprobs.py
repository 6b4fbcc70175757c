"""The one place for shift/mask logic: token logps from a causal LM, sequence sums, entropy, masked statistics.

Convention (see :mod:`lit_rlhf.types`): ``logps[b, t] = log p(input_ids[b, t] | input_ids[b, :t])``, aligned with
``input_ids``; only positions with ``loss_mask[b, t] = 1`` are computed, every other entry is 0.

Speed and memory: a preference or RL batch scores a few response tokens after a long prompt, so logits are computed
only at the positions that predict scored tokens (``logits_to_keep`` as a bool mask), never over the full sequence; the
full-vocabulary log-softmax is never materialised (``gather - logsumexp``). Where the model allows it (a plain linear
output head, not sharded, no logit soft-capping) the head itself runs outside the model, fused with the log-softmax
(:func:`head_logps`): one [N, V] buffer per call, updated in place in backward, instead of autograd's half a dozen.
``LIT_RLHF_FUSED_HEAD=0`` switches it off (A/B comparisons).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class TokenLogps:
    """logps: [B, T] (0 outside the mask); entropy: [B, T] per-token entropy of the predictive distribution, or None."""

    logps: torch.Tensor
    entropy: torch.Tensor | None = None


def predicting_positions(loss_mask: torch.Tensor) -> torch.Tensor:
    """Bool [B, T]: True at position t-1 when token t is scored (the hidden state there predicts it)."""
    if loss_mask[:, 0].any():
        raise ValueError("loss_mask marks position 0, which has no preceding context to predict it from")
    return F.pad(loss_mask[:, 1:].bool(), (0, 1))


def selective_log_softmax(logits: torch.Tensor, targets: torch.Tensor, chunk_rows: int = 1024) -> torch.Tensor:
    """log_softmax(logits)[i, targets[i]] without materialising the log-softmax: gather - logsumexp.

    logits: [N, V], targets: [N] -> [N] float32. Rows go in chunks to bound the float32 temporaries.
    """
    out = []
    for lg, tg in zip(logits.split(chunk_rows), targets.split(chunk_rows)):
        lg = lg.float()
        out.append(lg.gather(-1, tg.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(lg, dim=-1))
    return torch.cat(out) if out else logits.new_zeros(0, dtype=torch.float32)


class _HeadLogps(torch.autograd.Function):
    """logps[i] = log_softmax(hidden[i] @ weight.T / temperature)[targets[i]], and optionally the entropy [N].

    Forward keeps one float32 [N, V] buffer (the max-shifted, tempered logits). Backward turns it in place into the
    gradient w.r.t. the logits, ``g (onehot(target) - softmax) / temperature``, then runs the two matmuls (the weight
    gradient only when the head trains). So it can run backward once (``once_differentiable``; no ``retain_graph``).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature: float, with_entropy: bool):
        shifted = (hidden @ weight.to(hidden.dtype).t()).float()
        if temperature != 1.0:
            shifted.div_(temperature)
        shifted.sub_(shifted.amax(-1, keepdim=True))
        exp = shifted.exp()
        total = exp.sum(-1, keepdim=True)
        lse = total.log()  # of the shifted logits
        logps = shifted.gather(-1, targets[:, None]).sub_(lse).squeeze(-1)
        entropy = (
            (lse.squeeze(-1) - torch.linalg.vecdot(exp, shifted) / total.squeeze(-1))
            if with_entropy
            else logps.new_zeros(0)
        )
        del exp
        ctx.save_for_backward(hidden, weight, targets, shifted, lse)
        ctx.temperature = temperature
        ctx.mark_non_differentiable(entropy)
        return logps, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logps, grad_entropy):
        hidden, weight, targets, grad, lse = ctx.saved_tensors
        g = grad_logps.float()[:, None]
        grad.sub_(lse).exp_().mul_(-g)  # -g * softmax
        grad.scatter_add_(-1, targets[:, None], g)  # + g at the target
        if ctx.temperature != 1.0:
            grad.div_(ctx.temperature)
        grad_hidden = (grad.to(weight.dtype) @ weight).to(hidden.dtype) if ctx.needs_input_grad[0] else None
        grad_weight = (grad.t().to(hidden.dtype) @ hidden).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return grad_hidden, grad_weight, None, None, None


def head_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(logps [N], entropy [N] or None) of ``targets`` [N] under the head ``weight`` [V, H] applied to ``hidden`` [N, H]
    at ``temperature``: the output head fused with the log-softmax (gradients reach ``hidden`` and ``weight``)."""
    if hidden.shape[0] == 0:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, (empty if with_entropy else None)
    logps, entropy = _HeadLogps.apply(hidden, weight, targets, temperature, with_entropy)
    return logps, (entropy if with_entropy else None)


@contextlib.contextmanager
def head_outside(lm: torch.nn.Module) -> Iterator[torch.nn.Linear | None]:
    """Inside: ``lm(...).logits`` are the final hidden states (the output head swapped for an identity) and the head is
    yielded, to be applied with :func:`head_logps`. Yields None, the model untouched, where that would change the
    result or cannot work: no ``get_output_embeddings`` (a wrapper), a head that is not a bias-free ``nn.Linear``
    (a LoRA-adapted head), a sharded (FSDP2) head, or a model that transforms its logits (soft-capping), or with the
    environment variable ``LIT_RLHF_FUSED_HEAD=0``."""
    from torch.distributed.tensor import DTensor

    if os.environ.get("LIT_RLHF_FUSED_HEAD") == "0":
        yield None
        return

    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    get_head = getattr(base, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    config = getattr(base, "config", None)
    usable = (
        type(head) is torch.nn.Linear
        and head.bias is None
        and not isinstance(head.weight, DTensor)
        and hasattr(base, "set_output_embeddings")
        and getattr(config, "final_logit_softcapping", None) is None
        and getattr(config, "logit_scale", None) is None
    )
    if not usable:
        yield None
        return
    base.set_output_embeddings(torch.nn.Identity())
    try:
        yield head
    finally:
        base.set_output_embeddings(head)


def entropy_from_logits(logits: torch.Tensor, chunk_rows: int = 1024) -> torch.Tensor:
    """Entropy of softmax(logits) over the last dim, in float32, ``chunk_rows`` rows at a time: [N, V] -> [N].

    Differentiable (the PPO entropy bonus); pass ``logits.detach()`` where it is only a metric."""
    out = []
    for lg in logits.split(chunk_rows):
        logp = F.log_softmax(lg.float(), dim=-1)
        out.append(-(logp.exp() * logp).sum(-1))
    return torch.cat(out) if out else logits.new_zeros(0, dtype=torch.float32)


def token_logps(
    lm: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    loss_mask: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> TokenLogps:
    """Run ``lm`` once and return per-token logps of ``input_ids`` at the scored positions ([B, T], see module doc).

    Logits are projected only at the N positions that predict a scored token (``logits_to_keep`` as a bool mask,
    so the lm_head costs N x V, not B x T x V). ``temperature`` divides the logits first (use the sampling
    temperature in RL so that ratios are taken against the sampler's distribution).
    """
    keep = predicting_positions(loss_mask)
    scored = loss_mask.bool()
    kwargs = {"position_ids": position_ids} if position_ids is not None else {}
    with head_outside(lm) as head:
        out = lm(
            input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep, use_cache=False, **kwargs
        ).logits
    if out.dim() == 3:  # a model without bool logits_to_keep support returned every position
        out = out[keep]
    logps, entropy = _score(out, head, input_ids[scored], temperature, with_entropy)
    return TokenLogps(logps=_scatter(scored, logps), entropy=None if entropy is None else _scatter(scored, entropy))


def _score(
    out: torch.Tensor, head: torch.nn.Linear | None, targets: torch.Tensor, temperature: float, with_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(logps [N], entropy [N] or None) from ``out`` [N, *]: hidden states when ``head`` is given (fused head), else
    logits."""
    if head is not None:
        return head_logps(out, head.weight, targets, temperature, with_entropy)
    if temperature != 1.0:
        out = out / temperature
    return selective_log_softmax(out, targets), (entropy_from_logits(out.detach()) if with_entropy else None)


def response_logps(
    lm: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    prompt_index: torch.Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> TokenLogps:
    """Logps [N, R] of right-padded responses given left-padded prompts, each prompt run through ``lm`` once.

    Pass 1 runs the B prompts (explicit position ids, so left padding is invisible) and keeps their KV cache and the
    last position's logits (which predict response token 0). The cache is gathered to the N response rows
    (``prompt_index``) and pass 2 runs the responses on top of it, projecting logits only where a scored token is
    predicted. Gradients flow through both passes. Equal to :func:`token_logps` on the concatenated rows (tested),
    at (B P + N R) instead of N (P + R) tokens: ~1.7x fewer for DPO pairs with a long shared prompt.
    """
    prompt_pos = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    scored = response_mask.bool()
    keep = F.pad(scored[:, 1:], (0, 1))  # response position j predicts token j + 1
    with head_outside(lm) as head:  # with a fused head, "logits" below are hidden states
        first = lm(
            input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=prompt_pos, use_cache=True, logits_to_keep=1
        )
        cache = first.cache
        cache.batch_select_indices(prompt_index)
        first_out = first.logits[prompt_index, -1]  # [N, V] (or [N, H])
        attention_mask = torch.cat([prompt_mask[prompt_index], response_mask.to(prompt_mask.dtype)], dim=1)
        positions = prompt_mask.sum(-1)[prompt_index, None] + torch.arange(
            response_ids.shape[1], device=response_ids.device
        )
        rest = first_out.new_zeros(0, first_out.shape[-1])
        if keep.any():
            rest = lm(
                input_ids=response_ids,
                attention_mask=attention_mask,
                position_ids=positions,
                cache=cache,
                use_cache=True,
                logits_to_keep=keep,
            ).logits
            if rest.dim() == 3:  # a model without bool logits_to_keep support
                rest = rest[keep]
    first_logps, first_entropy = _score(first_out, head, response_ids[:, 0], temperature, with_entropy)
    rest_logps, rest_entropy = _score(rest, head, response_ids[:, 1:][scored[:, 1:]], temperature, with_entropy)
    logps = torch.cat([(first_logps * scored[:, 0])[:, None], _scatter(scored[:, 1:], rest_logps)], dim=1)
    entropy = None
    if with_entropy:
        entropy = torch.cat([(first_entropy * scored[:, 0])[:, None], _scatter(scored[:, 1:], rest_entropy)], dim=1)
    return TokenLogps(logps=logps, entropy=entropy)


def _scatter(mask: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """A float32 tensor shaped like ``mask``: ``values`` (row-major) where mask is True, 0 elsewhere."""
    return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_scatter(mask, values)


def sequence_logps(logps: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Per-row sum over the scored tokens: [B, T] -> [B] (a sequence's logp; likewise its KL from per-token KL)."""
    return (logps * loss_mask.to(logps.dtype)).sum(-1)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over entries where ``mask`` is 1 (over all entries, or along ``dim``)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1.0)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the masked entries (Bessel-corrected by default)."""
    mask = mask.to(x.dtype)
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        if n < 2:
            raise ValueError("masked_var needs at least two unmasked entries for the unbiased estimate")
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked entries; with ``shift_mean=False`` the mean is added back (scale only)."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(x.dtype)
