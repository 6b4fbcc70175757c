"""Critics: state-value networks for PPO (the networks know nothing about RL; :mod:`lit_rlhf.stages.ppo` does).

``values[n, t] = V(prompt + response[:t])``, the value of the state in which response token t is chosen, read by a
linear head from the hidden state that predicts token t (the same positions :func:`lit_rlhf.logprobs.response_logps`
reads logits from), so ``values`` [N, R] line up with ``logps``. Three kinds:

- ``reward_model``: a separate value model initialised from an exported reward model, its transformer and its score
  head (InstructGPT, Ouyang et al. 2022 §3.5: "the value function is initialized from the RM"; DeepSpeed-Chat); the
  head starts out predicting the final score everywhere.
- ``policy``: a separate copy of the policy's transformer with a new zero-initialised head.
- ``shared_base``: a scalar head on the policy's own frozen base weights, read through a second LoRA adapter
  (``"value"``) next to the policy's (``"default"``): one copy of the base in memory for actor, critic and reference
  (reference = both adapters disabled). Needs LoRA on the policy. (Parameters shared between policy and value
  function, as in PPO, Schulman et al. 2017 Eq. 9, but each trained by its own loss and optimizer.)

A separate critic trains its own LoRA adapter (``lora``) or, with ``lora: null``, all its weights. Every critic must
read the policy's token ids, so it must share the policy's vocabulary (checked).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from torch import nn

from lit_rlhf import models
from lit_rlhf.models import LoRASettings, decoder_of
from lit_rlhf.reward_models import load_exported

CriticInit = Literal["reward_model", "policy", "shared_base"]
VALUE_ADAPTER = "value"
POLICY_ADAPTER = "default"


@dataclass
class CriticSettings:
    """The critic (state-value model); see :mod:`lit_rlhf.critics`.

    Args:
        init: ``reward_model`` (separate value model from the reward model export), ``policy`` (separate copy of the
            policy's transformer, new head) or ``shared_base`` (value head + own LoRA adapter on the policy's base).
        path: reward model export for ``init=reward_model``; null: the stage's ``reward_model.path``.
        lora: LoRA of a separate critic (null: train all its weights), or of the ``shared_base`` value adapter.
    """

    init: CriticInit = "reward_model"
    path: str | None = None
    lora: LoRASettings | None = field(default_factory=LoRASettings)


# -------------------------------------------------------------------------------------------------- value read-out
def response_values(
    decoder: nn.Module,
    head: nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    prompt_index: torch.Tensor,
) -> torch.Tensor:
    """Values [N, R] float32 (0 outside ``response_mask``) of the states before each response token.

    Like :func:`lit_rlhf.logprobs.response_logps`: the B prompts run once (their last hidden state is the state
    before response token 0), the KV cache is gathered to the N rows, and the responses run on top of it (the hidden
    state after token t-1 is the state before token t). ``decoder`` is a transformer without LM head
    (``LlamaModel`` & co.) returning ``last_hidden_state``; ``head`` maps hidden [.., H] to [.., 1].
    """
    prompt_pos = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    first = decoder(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=prompt_pos, use_cache=True)
    hidden = first.last_hidden_state[prompt_index, -1][:, None]  # [N, 1, H]
    if response_ids.shape[1] > 1:
        cache = first.cache
        cache.batch_select_indices(prompt_index)
        mask = torch.cat([prompt_mask[prompt_index], response_mask[:, :-1].to(prompt_mask.dtype)], dim=1)
        positions = prompt_mask.sum(-1)[prompt_index, None] + torch.arange(
            response_ids.shape[1] - 1, device=response_ids.device
        )
        rest = decoder(
            input_ids=response_ids[:, :-1],
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
            use_cache=True,
        ).last_hidden_state
        hidden = torch.cat([hidden, rest], dim=1)  # [N, R, H]
    values = head(hidden.to(head.weight.dtype)).squeeze(-1).float()
    return values * response_mask.to(values.dtype)


@contextlib.contextmanager
def active_adapter(model: nn.Module, name: str) -> Iterator[None]:
    """Run ``model`` (peft) through adapter ``name``, every adapter staying trainable (peft's ``set_adapter``
    freezes the inactive ones); the previously active adapter is restored afterwards."""
    previous = model.active_adapter
    everyone = list(model.peft_config)
    model.set_adapter(name)
    model.set_requires_grad(everyone, True)
    try:
        yield
    finally:
        model.set_adapter(previous)
        model.set_requires_grad(everyone, True)


def _is_adapter_param(name: str, adapter: str) -> bool:
    return f".{adapter}." in name and ".lora_" in name


def _zero_head(hidden_size: int, dtype: torch.dtype) -> nn.Linear:
    head = nn.Linear(hidden_size, 1, dtype=dtype)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return head


# ------------------------------------------------------------------------------------------------------- critics
class ValueModel(nn.Module):
    """A separate critic: its own transformer (``decoder``, possibly LoRA-wrapped) and a linear ``head``."""

    def __init__(self, decoder: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.decoder = decoder
        self.head = head

    def forward(self, prompt_ids, prompt_mask, response_ids, response_mask, prompt_index) -> torch.Tensor:
        args = (prompt_ids, prompt_mask, response_ids, response_mask, prompt_index)
        return response_values(self.decoder, self.head, *args)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]


class SharedBaseValueHead(nn.Module):
    """A value head on the policy's frozen base through its own LoRA adapter ``"value"`` (added to ``policy``).

    Only the head is a submodule; the adapter's weights live in (and are checkpointed with) the policy, which the
    stage owns. The policy's optimizer must skip them: :func:`actor_parameters`.
    """

    def __init__(self, policy: nn.Module, lora: LoRASettings) -> None:
        super().__init__()
        if not models.is_lora(policy):
            raise ValueError(
                "critic.init=shared_base needs LoRA on the policy (its base weights are shared and frozen)"
            )
        policy.add_adapter(VALUE_ADAPTER, models.lora_config(lora))
        policy.set_adapter(POLICY_ADAPTER)
        policy.set_requires_grad(list(policy.peft_config), True)
        weight = decoder_of(policy).get_input_embeddings().weight
        self.head = _zero_head(weight.shape[1], weight.dtype)
        self._policy = [policy]  # a plain list: not a submodule, the stage registers the policy once

    def forward(self, prompt_ids, prompt_mask, response_ids, response_mask, prompt_index) -> torch.Tensor:
        policy = self._policy[0]
        with active_adapter(policy, VALUE_ADAPTER):
            args = (prompt_ids, prompt_mask, response_ids, response_mask, prompt_index)
            return response_values(decoder_of(policy), self.head, *args)

    def trainable_parameters(self) -> list[nn.Parameter]:
        adapter = [p for n, p in self._policy[0].named_parameters() if _is_adapter_param(n, VALUE_ADAPTER)]
        return list(self.head.parameters()) + adapter


def actor_parameters(policy: nn.Module) -> list[nn.Parameter]:
    """The policy's trainable parameters, without those of a shared-base value adapter."""
    return [p for n, p in policy.named_parameters() if p.requires_grad and not _is_adapter_param(n, VALUE_ADAPTER)]


def _with_lora(decoder: nn.Module, lora: LoRASettings | None) -> nn.Module:
    if lora is None:
        return decoder.requires_grad_(True)
    return models.apply_lora(decoder, lora, task_type=None)  # a bare transformer body


def value_model_from_reward_model(path: str, lora: LoRASettings | None, dtype: str = "float32") -> ValueModel:
    """DeepSpeed-Chat critic: the reward model's transformer and score head (``num_labels=1`` decoders only)."""
    rm, _ = load_exported(path, dtype=dtype)
    if models.is_encoder(rm) or rm.config.num_labels != 1 or not hasattr(rm, "score"):
        raise ValueError(
            f"{path}: a critic initialised from a reward model needs a decoder with one score head (num_labels=1) and "
            "the policy's vocabulary; use critic.init=policy or shared_base with this reward model"
        )
    decoder = decoder_of(rm)
    decoder.requires_grad_(False)
    return ValueModel(_with_lora(decoder, lora), rm.score.requires_grad_(True)).train()


def value_model_from_policy(spec: models.ModelSpec, lora: LoRASettings | None) -> ValueModel:
    """A critic with a fresh copy of the policy's transformer (as loaded from ``spec``) and a zero head."""
    decoder = decoder_of(models.load_causal_lm(replace(spec, lora=None, gradient_checkpointing=False)))
    decoder.requires_grad_(False)
    weight = decoder.get_input_embeddings().weight
    return ValueModel(_with_lora(decoder, lora), _zero_head(weight.shape[1], weight.dtype)).train()


def build_critic(
    settings: CriticSettings, policy: nn.Module, spec: models.ModelSpec, reward_model_path: str | None
) -> nn.Module:
    """The critic of ``settings``; checks it reads the policy's vocabulary."""
    if settings.init == "shared_base":
        if settings.lora is None:
            raise ValueError("critic.init=shared_base trains a LoRA adapter: critic.lora must be set")
        return SharedBaseValueHead(policy, settings.lora)
    if settings.init == "policy":
        critic = value_model_from_policy(spec, settings.lora)
    elif settings.init == "reward_model":
        path = settings.path or reward_model_path
        if path is None:
            raise ValueError("critic.init=reward_model needs critic.path or a reward_model")
        critic = value_model_from_reward_model(path, settings.lora, spec.dtype)
    else:
        raise ValueError(f"unknown critic init {settings.init!r}; choose reward_model, policy or shared_base")
    policy_vocab = decoder_of(policy).get_input_embeddings().weight.shape[0]
    critic_vocab = critic.decoder.get_input_embeddings().weight.shape[0]
    if policy_vocab != critic_vocab:
        raise ValueError(
            f"the critic's vocabulary ({critic_vocab}) differs from the policy's ({policy_vocab}); "
            "it must read the policy's tokens"
        )
    return critic
