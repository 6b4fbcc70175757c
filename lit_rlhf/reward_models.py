"""Reward-model networks and THE scorer: a scalar reward r(x, y) of a prompt x and a response y.

Backbones (a :class:`lit_rlhf.models.ModelSpec` names one; names resolve through :func:`lit_rlhf.models.resolve`):

- **decoder** (``tiny``, ``smollm2-135m``, a causal LM's HF directory or hub id): the transformer plus a linear score
  head on the hidden state of the **last non-padding token** (InstructGPT, Ouyang et al. 2022 §3.5: the SFT model
  with its unembedding replaced, outputting "a scalar reward"), i.e. ``AutoModelForSequenceClassification`` with
  ``num_labels=1``. ``tiny`` is a ``LlamaForSequenceClassification`` built deterministically from ``ModelSpec.seed``.
- **encoder** (``minilm-l6`` or any BERT-style directory): ``BertForSequenceClassification`` & co., the pooled
  ``[CLS]`` state and a linear head, on ``[CLS] prompt [SEP] response [SEP]``
  (:data:`lit_rlhf.models.ENCODER_TEMPLATE`).

Rows are scored right-padded and contiguous (:func:`contiguous_rows`), exactly as the exported model scores them.
The tokenizer of a decoder reward model pads with a token other than EOS (:func:`lit_rlhf.models.load_tokenizer`,
``for_reward_model=True``), so transformers' "last token that is not the pad token" rule picks the same token as
training: the export (``export/merged``) is a plain sequence-classification directory that
``AutoModelForSequenceClassification.from_pretrained`` loads and scores identically.

:class:`RewardScorer` is the one way to score with a reward model, trained here or any HF classifier: PPO's
``reward_model``, the ``model_reward`` reward function (:mod:`lit_rlhf.rewards`) and the RM stage's ``score`` use it.
It takes text the caller has already rendered (or token ids) and returns outcome scores, read at each row's last
token; the read-out (:func:`scores_at`) takes positions, so a process reward (a score at each step's last token) is
the same forward at more positions. This module renders no dataset records (callers do, with :mod:`lit_rlhf.data`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lit_rlhf import models
from lit_rlhf.logprobs import predicting_positions, selective_log_softmax


@dataclass
class RewardModelSettings:
    """An exported sequence-classification reward model whose logit is (part of) every completion's score.

    Args:
        path: its directory, e.g. ``runs/rm/export/merged`` (the RM stage's export), or a hub id.
        weight: multiplier of its score in the total score.
        label_index: which logit is the score (0 for ``num_labels=1``; 1 = "positive" of a 2-class classifier).
        chat_template: score ``prompt + completion`` as an assistant turn of the policy tokenizer's chat template (the
            rendering the RM stage trains on); false: the plain text ``prompt + completion`` (classifiers).
        batch_size: scoring batch size.
        max_length: texts are cut to this many reward-model tokens (from the left, keeping the response).
    """

    path: str = "runs/rm/export/merged"
    weight: float = 1.0
    label_index: int = 0
    chat_template: bool = True
    batch_size: int = 16
    max_length: int = 512


# ------------------------------------------------------------------------------------------------------ networks
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
        where, gguf = models.resolve(spec.name)
        if gguf is not None:
            raise ValueError("reward models load HF directories or hub ids, not GGUF files; convert the model first")
        model = AutoModelForSequenceClassification.from_pretrained(
            where, num_labels=1, dtype=dtype, revision=spec.revision
        )
    model.config.pad_token_id = pad_token_id
    if spec.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if spec.lora is not None:  # the score/classifier head is trained in full (peft's modules_to_save for SEQ_CLS)
        model = models.apply_lora(model, spec.lora, task_type="SEQ_CLS")
    model.train()
    return model


def export_reward_model(
    model: nn.Module, tokenizer, out_dir: str | os.PathLike, dtype: str | None = None
) -> dict[str, str]:
    """``out_dir/merged`` (plain sequence-classification weights + tokenizer, in ``dtype``; None: as trained) and, with
    LoRA, ``out_dir/adapter``."""
    return models.export_pretrained(model, tokenizer, out_dir, dtype=dtype)


def load_exported(path: str | os.PathLike, device: str = "cpu", dtype: str | None = None) -> tuple[nn.Module, object]:
    """(model, tokenizer) of an exported reward model (``DIR/export/merged``) or any HF sequence classifier (a
    directory or hub id), frozen and in eval mode; the tokenizer pads with EOS (else UNK) when it has no pad token."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    try:
        where, gguf = models.resolve(str(path))
    except (FileNotFoundError, ValueError) as err:
        raise FileNotFoundError(
            f"reward model {str(path)!r} not found ({err}). Train one first: `python -m lit_rlhf.experiments.rm "
            "--output_dir DIR`, then use DIR/export/merged; or run a pipeline that trains it before PPO "
            "(experiments/pipeline/rm-ppo-smollm2.yaml)"
        ) from None
    if gguf is not None:
        raise ValueError("reward models load HF directories or hub ids, not GGUF files; convert the model first")
    kwargs = {} if dtype is None else {"dtype": models.DTYPES[dtype]}
    model = AutoModelForSequenceClassification.from_pretrained(where, **kwargs).to(device).eval()
    model.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(where)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


# ---------------------------------------------------------------------------------------------------- read-out
def pad_right(rows: list[list[int]], pad_value: int) -> torch.Tensor:
    """[N, longest row] long tensor of ``rows``, right-padded with ``pad_value``."""
    out = torch.full((len(rows), max(len(r) for r in rows)), pad_value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def contiguous_rows(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_token_id: int, *others: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """Move every row's attended tokens to the front (order kept) and pad the tail with ``pad_token_id``.

    Prompt/response rows (left-padded prompt + right-padded response) become plain right-padded rows, the layout the
    exported model sees; ``others`` (e.g. a loss mask) are permuted alike.
    """
    order = torch.sort((1 - attention_mask.long()), dim=1, stable=True).indices
    mask = attention_mask.gather(1, order)
    ids = input_ids.gather(1, order).masked_fill(mask == 0, pad_token_id)
    return (ids, mask, *(o.gather(1, order) for o in others))


def _base(model: nn.Module) -> nn.Module:
    return model.get_base_model() if models.is_lora(model) else model


def scores_at(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    positions: torch.Tensor,
    label_index: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(scores [N, K] float32 read at token ``positions`` [N, K] of right-padded rows, decoder hidden states or None).

    Decoders: the score head on the hidden state at each position (outcome: the last attended token, the token
    transformers' pooling picks in the export). Encoders (and classifiers without a ``score`` head): the model's own
    pooled head, one score per row, so ``positions`` must be the last token (K = 1).
    """
    base = _base(model)
    if models.is_encoder(base) or not hasattr(base, "score"):
        if positions.shape[1] != 1:
            raise ValueError("this reward model scores whole rows (a pooled head): one position per row")
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        return logits[:, label_index, None].float(), None
    body = models.decoder_of(model)
    hidden = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    rows = torch.arange(hidden.shape[0], device=hidden.device)[:, None]
    return base.score(hidden[rows, positions])[..., label_index].float(), hidden


def sequence_rewards(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, lm_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(rewards [N] float32, lm_logps [S] or None) of right-padded contiguous rows, with gradients (training).

    ``lm_mask`` [N, T] (decoders with tied embeddings only) asks for the language-model logps of the marked tokens
    (the LM regulariser), from the same forward.
    """
    base = _base(model)
    if lm_mask is not None and (models.is_encoder(base) or not hasattr(base, "score")):
        raise ValueError("the LM regulariser needs a decoder backbone")
    last = (attention_mask.sum(-1) - 1)[:, None]
    rewards, hidden = scores_at(model, input_ids, attention_mask, last)
    if lm_mask is None:
        return rewards[:, 0], None
    if not base.config.tie_word_embeddings:
        raise ValueError("the LM regulariser reads logits through the tied input embeddings; this backbone has none")
    logits = F.linear(hidden[predicting_positions(lm_mask)], base.get_input_embeddings().weight)
    return rewards[:, 0], selective_log_softmax(logits, input_ids[lm_mask.bool()])


def shared_prompt_rewards(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    prompt_index: torch.Tensor,
) -> torch.Tensor:
    """Decoder rewards [N] of prompt/response rows with each prompt run once (the responses run on its KV cache).

    Equal to :func:`sequence_rewards` on the concatenated rows (tested) at B P + N R instead of N (P + R) tokens;
    gradients flow through both passes (as in :func:`lit_rlhf.logprobs.response_logps`).
    """
    body = models.decoder_of(model)
    prompt_pos = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    prompt = body(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=prompt_pos, use_cache=True)
    cache = prompt.cache
    cache.batch_select_indices(prompt_index)
    attention_mask = torch.cat([prompt_mask[prompt_index], response_mask.to(prompt_mask.dtype)], dim=1)
    steps = torch.arange(response_ids.shape[1], device=response_ids.device)
    positions = prompt_mask.sum(-1)[prompt_index, None] + steps
    hidden = body(
        input_ids=response_ids,
        attention_mask=attention_mask,
        position_ids=positions,
        cache=cache,
        use_cache=True,
    ).last_hidden_state
    last = (response_mask.sum(-1) - 1).clamp(min=0)
    return _base(model).score(hidden[torch.arange(hidden.shape[0], device=hidden.device), last])[:, 0].float()


# ------------------------------------------------------------------------------------------------------ scorer
class RewardScorer(nn.Module):
    """THE reward-model scorer: outcome scores [N] (float32, CPU) of rendered texts or token ids, no grad, eval mode.

    Args:
        model: a sequence-classification network (trained here, exported, or any HF classifier).
        tokenizer: its tokenizer (the pad token must be set).
        label_index: which logit is the score.
        batch_size: rows per forward.
        max_length: :meth:`score_texts` cuts longer token rows to this many tokens.
        truncation_side: which end of a too-long text is cut: ``left`` (the start; keeps the response) or ``right``.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        label_index: int = 0,
        batch_size: int = 16,
        max_length: int = 512,
        truncation_side: Literal["left", "right"] = "left",
    ) -> None:
        super().__init__()
        num_labels = _base(model).config.num_labels
        if not 0 <= label_index < num_labels:
            raise ValueError(f"reward model label_index={label_index} but the model has {num_labels} labels")
        if truncation_side not in ("left", "right"):
            raise ValueError(f"truncation_side must be 'left' or 'right', got {truncation_side!r}")
        self.model, self.tokenizer = model, tokenizer
        self.label_index, self.batch_size, self.max_length = label_index, batch_size, max_length
        self.truncation_side = truncation_side

    @classmethod
    def from_settings(cls, settings: RewardModelSettings, dtype: str = "float32") -> RewardScorer:
        """The frozen reward model of PPO's ``reward_model:`` settings (texts cut from the left)."""
        model, tokenizer = load_exported(settings.path, dtype=dtype)
        return cls(model, tokenizer, settings.label_index, settings.batch_size, settings.max_length, "left")

    def score_texts(self, texts: list[str]) -> torch.Tensor:
        """Scores of already-rendered texts. Encoders get their ``[CLS]``/``[SEP]`` tokens; decoder texts carry their
        own special tokens (a chat-template prompt has its BOS), so none are added."""
        if not texts:
            return torch.zeros(0)
        self.tokenizer.truncation_side = self.truncation_side
        encoded = self.tokenizer(
            texts, truncation=True, max_length=self.max_length, add_special_tokens=models.is_encoder(_base(self.model))
        )
        return self.score_ids(encoded["input_ids"])

    @torch.no_grad()
    def score_ids(self, rows: list[list[int]]) -> torch.Tensor:
        """Scores of token-id rows (each one whole input, uncut), read at each row's last token."""
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        out = []
        try:
            for i in range(0, len(rows), self.batch_size):
                chunk = rows[i : i + self.batch_size]
                ids = pad_right(chunk, self.tokenizer.pad_token_id).to(device)
                mask = pad_right([[1] * len(r) for r in chunk], 0).to(device)
                last = torch.tensor([len(r) - 1 for r in chunk], device=device)[:, None]
                out.append(scores_at(self.model, ids, mask, last, self.label_index)[0][:, 0].cpu())
        finally:
            self.model.train(was_training)
        return torch.cat(out) if out else torch.zeros(0)
