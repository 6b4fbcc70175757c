"""The critic and reward networks of PPO (the networks know nothing about RL; :mod:`lit_rlhf.stages.ppo` does).

Critic = state-value model: ``values[n, t] = V(prompt + response[:t])``, the value of the state in which response
token t is chosen, read by a linear head from the hidden state that predicts token t (the same positions
:func:`lit_rlhf.logprobs.response_logps` reads logits from), so ``values`` [N, R] line up with ``logps``. Three
kinds (seed 002 §2.2.3: "shared parameters with the actor, or initialised from the reward model"):

- ``reward_model``: a separate value model initialised from an exported reward model, its transformer and its score
  head (DeepSpeed-Chat; the head starts out predicting the final score everywhere).
- ``policy``: a separate copy of the policy's transformer with a new zero-initialised head.
- ``shared_base``: a scalar head on the policy's own frozen base weights, read through a second LoRA adapter
  (``"value"``) next to the policy's (``"default"``): one copy of the base in memory for actor, critic and reference
  (reference = both adapters disabled). Needs LoRA on the policy.

A separate critic trains its own LoRA adapter (``lora``) or, with ``lora: null``, all its weights. Every critic must
read the policy's token ids, so it must share the policy's vocabulary (checked).

Reward = :class:`RewardModelScorer`: an exported sequence-classification reward model (``DIR/export/merged`` of the
RM stage, or any HF classifier) scoring the decoded texts with its own tokenizer.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Literal

import torch
from torch import nn

from lit_rlhf import models
from lit_rlhf.models import LoRASettings

CriticInit = Literal["reward_model", "policy", "shared_base"]
VALUE_ADAPTER = "value"
POLICY_ADAPTER = "default"


@dataclass
class CriticSettings:
    """The critic (state-value model); see :mod:`lit_rlhf.value_models`.

    Args:
        init: ``reward_model`` (separate value model from the reward model export), ``policy`` (separate copy of the
            policy's transformer, new head) or ``shared_base`` (value head + own LoRA adapter on the policy's base).
        path: reward model export for ``init=reward_model``; null: the stage's ``reward_model.path``.
        lora: LoRA of a separate critic (null: train all its weights), or of the ``shared_base`` value adapter.
    """

    init: CriticInit = "reward_model"
    path: str | None = None
    lora: LoRASettings | None = field(default_factory=LoRASettings)


@dataclass
class RewardModelSettings:
    """An exported sequence-classification reward model whose logit is (part of) every completion's score.

    Args:
        path: its directory, e.g. ``runs/rm/export/merged`` (the RM stage's export).
        weight: multiplier of its score in the total score.
        label_index: which logit is the score (0 for ``num_labels=1``; 1 = "positive" of a 2-class classifier).
        chat_template: score ``prompt + completion`` as an assistant turn of the policy tokenizer's chat template (the
            rendering the RM stage trains on); false: the plain text ``prompt + completion`` (classifiers).
        batch_size: scoring batch size.
        max_length: texts are cut to this many reward-model tokens (from the left, keeping the response).
        train_args: when ``path`` does not exist, train the reward model first with ``python -m
            lit_rlhf.experiments.rm <train_args> --output_dir <path>/../..`` (``path`` must end in ``export/merged``);
            null: a missing ``path`` is an error.
    """

    path: str = "runs/rm/export/merged"
    weight: float = 1.0
    label_index: int = 0
    chat_template: bool = True
    batch_size: int = 16
    max_length: int = 512
    train_args: list[str] | None = None


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
        cache = first.past_key_values
        cache.batch_select_indices(prompt_index)
        mask = torch.cat([prompt_mask[prompt_index], response_mask[:, :-1].to(prompt_mask.dtype)], dim=1)
        positions = prompt_mask.sum(-1)[prompt_index, None] + torch.arange(response_ids.shape[1] - 1, device=response_ids.device)
        rest = decoder(
            input_ids=response_ids[:, :-1], attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True
        ).last_hidden_state
        hidden = torch.cat([hidden, rest], dim=1)  # [N, R, H]
    values = head(hidden.to(head.weight.dtype)).squeeze(-1).float()
    return values * response_mask.to(values.dtype)


def decoder_of(lm: nn.Module) -> nn.Module:
    """The transformer body (no LM / score head) of a causal-LM or classifier, through a peft wrapper if any."""
    base = lm.get_base_model() if models.is_lora(lm) else lm
    return getattr(base, base.base_model_prefix)


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


# ------------------------------------------------------------------------------------------------------- critics
class ValueModel(nn.Module):
    """A separate critic: its own transformer (``decoder``, possibly LoRA-wrapped) and a linear ``head``."""

    def __init__(self, decoder: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.decoder = decoder
        self.head = head

    def forward(self, prompt_ids, prompt_mask, response_ids, response_mask, prompt_index) -> torch.Tensor:
        return response_values(self.decoder, self.head, prompt_ids, prompt_mask, response_ids, response_mask, prompt_index)

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
            raise ValueError("critic.init=shared_base needs LoRA on the policy (its base weights are shared and frozen)")
        from peft import LoraConfig

        targets = "all-linear" if lora.target_modules == ["all-linear"] else lora.target_modules
        config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets, task_type="CAUSAL_LM")
        policy.add_adapter(VALUE_ADAPTER, config)
        policy.set_adapter(POLICY_ADAPTER)
        policy.set_requires_grad(list(policy.peft_config), True)
        decoder = decoder_of(policy)
        weight = decoder.get_input_embeddings().weight
        self.head = nn.Linear(weight.shape[1], 1, dtype=weight.dtype)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self._policy = [policy]  # a plain list: not a submodule, the stage registers the policy once

    def forward(self, prompt_ids, prompt_mask, response_ids, response_mask, prompt_index) -> torch.Tensor:
        policy = self._policy[0]
        with active_adapter(policy, VALUE_ADAPTER):
            return response_values(decoder_of(policy), self.head, prompt_ids, prompt_mask, response_ids, response_mask, prompt_index)

    def trainable_parameters(self) -> list[nn.Parameter]:
        adapter = [p for n, p in self._policy[0].named_parameters() if _is_adapter_param(n, VALUE_ADAPTER)]
        return list(self.head.parameters()) + adapter


def actor_parameters(policy: nn.Module) -> list[nn.Parameter]:
    """The policy's trainable parameters, without those of a shared-base value adapter."""
    return [p for n, p in policy.named_parameters() if p.requires_grad and not _is_adapter_param(n, VALUE_ADAPTER)]


def _with_lora(decoder: nn.Module, lora: LoRASettings | None) -> nn.Module:
    if lora is None:
        return decoder.requires_grad_(True)
    from peft import LoraConfig, get_peft_model

    targets = "all-linear" if lora.target_modules == ["all-linear"] else lora.target_modules
    return get_peft_model(decoder, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets))


def value_model_from_reward_model(path: str, lora: LoRASettings | None, dtype: str = "float32") -> ValueModel:
    """DeepSpeed-Chat critic: the reward model's transformer and score head (``num_labels=1`` decoders only)."""
    from transformers import AutoModelForSequenceClassification

    from lit_rlhf.reward_models import is_encoder

    rm = AutoModelForSequenceClassification.from_pretrained(path, dtype=models.DTYPES[dtype])
    if is_encoder(rm) or rm.config.num_labels != 1 or not hasattr(rm, "score"):
        raise ValueError(
            f"{path}: a critic initialised from a reward model needs a decoder with one score head (num_labels=1) and "
            "the policy's vocabulary; use critic.init=policy or shared_base with this reward model"
        )
    head = rm.score
    decoder = decoder_of(rm)
    decoder.requires_grad_(False)
    return ValueModel(_with_lora(decoder, lora), head.requires_grad_(True)).train()


def value_model_from_policy(spec: models.ModelSpec, lora: LoRASettings | None) -> ValueModel:
    """A critic with a fresh copy of the policy's transformer (as loaded from ``spec``) and a zero head."""
    from dataclasses import replace

    lm = models.load_causal_lm(replace(spec, lora=None, gradient_checkpointing=False))
    decoder = decoder_of(lm)
    decoder.requires_grad_(False)
    weight = decoder.get_input_embeddings().weight
    head = nn.Linear(weight.shape[1], 1, dtype=weight.dtype)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return ValueModel(_with_lora(decoder, lora), head).train()


def build_critic(settings: CriticSettings, policy: nn.Module, spec: models.ModelSpec, reward_model_path: str | None) -> nn.Module:
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
        raise ValueError(f"the critic's vocabulary ({critic_vocab}) differs from the policy's ({policy_vocab}); it must read the policy's tokens")
    return critic


# ----------------------------------------------------------------------------------------------------- reward model
class RewardModelScorer(nn.Module):
    """A frozen sequence-classification reward model: ``scores(texts)`` -> [N] float32 (eval mode, no grad)."""

    def __init__(self, settings: RewardModelSettings, dtype: str = "float32") -> None:
        super().__init__()
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from lit_rlhf.reward_models import is_encoder

        self.settings = settings
        self.model = AutoModelForSequenceClassification.from_pretrained(settings.path, dtype=models.DTYPES[dtype]).eval()
        self.model.requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(settings.path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.tokenizer.padding_side, self.tokenizer.truncation_side = "right", "left"
        self.add_special_tokens = is_encoder(self.model)  # [CLS]/[SEP]; decoder prompts carry their own BOS
        if not 0 <= settings.label_index < self.model.config.num_labels:
            raise ValueError(f"reward_model.label_index={settings.label_index} but {settings.path} has {self.model.config.num_labels} labels")

    @torch.no_grad()
    def scores(self, texts: list[str]) -> torch.Tensor:
        from lit_rlhf.rollout import eval_mode

        device = next(self.model.parameters()).device
        out = []
        with eval_mode(self.model):
            for i in range(0, len(texts), self.settings.batch_size):
                enc = self.tokenizer(
                    texts[i : i + self.settings.batch_size], padding=True, truncation=True, max_length=self.settings.max_length,
                    add_special_tokens=self.add_special_tokens, return_tensors="pt",
                ).to(device)
                out.append(self.model(**enc).logits[:, self.settings.label_index].float())
        return torch.cat(out) if out else torch.zeros(0)


def turn_suffix(tokenizer) -> str:
    """The text a chat template puts after an assistant message's content (e.g. ``"<|im_end|>\\n"``); the EOS
    token without a template."""
    if tokenizer.chat_template is None:
        return tokenizer.eos_token or ""
    user = [{"role": "user", "content": "1"}]
    prompt = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": "@@@"}], tokenize=False)
    if not full.startswith(prompt) or "@@@" not in full:
        return tokenizer.eos_token or ""
    return full.split("@@@", 1)[1]


def scoring_texts(prompts: list[str], completions: list[str], finished: list[bool], suffix: str) -> list[str]:
    """``prompt + completion``, plus the end-of-turn ``suffix`` where the completion ended with EOS."""
    return [p + c + (suffix if f else "") for p, c, f in zip(prompts, completions, finished, strict=True)]


def eos_token_ids(tokenizer, lm: nn.Module) -> list[int]:
    """Token ids that end a completion: the tokenizer's EOS and the model's generation-config EOS ids."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    config = getattr(lm, "generation_config", None)
    extra = getattr(config, "eos_token_id", None) if config is not None else None
    ids |= set(extra if isinstance(extra, (list, tuple)) else [extra] if extra is not None else [])
    if not ids:
        raise ValueError("the tokenizer and the model define no EOS token: completions could never end")
    return sorted(ids)


def train_missing_reward_model(settings: RewardModelSettings) -> None:
    """Train the reward model at ``settings.path`` with the RM stage (a subprocess) when it does not exist yet."""
    import shlex
    import subprocess
    import sys
    from pathlib import Path

    path = Path(settings.path)
    if path.exists():
        return
    if settings.train_args is None:
        raise FileNotFoundError(
            f"reward model {path} not found: train one (python -m lit_rlhf.experiments.rm --output_dir DIR, then "
            "reward_model.path=DIR/export/merged) or set reward_model.train_args to train it on the fly"
        )
    if path.parts[-2:] != ("export", "merged"):
        raise ValueError(f"reward_model.train_args needs reward_model.path = <rm output_dir>/export/merged, got {path}")
    cmd = [sys.executable, "-m", "lit_rlhf.experiments.rm", *settings.train_args, "--output_dir", str(path.parent.parent)]
    print(f"[lit_rlhf] reward model {path} not found; training it first:\n  {shlex.join(cmd)}", flush=True)
    subprocess.run(cmd, check=True)
    if not path.exists():
        raise RuntimeError(f"the reward-model run finished but {path} was not written")
