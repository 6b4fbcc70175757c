"""Online-updated outcome reward model for GRPO (DeepSeekMath, Shao et al. 2024, §4.1.4, iterative RL).

A reward model scores every completion; its logit (times ``weight``) joins the total of the reward functions as
``per_function["online_rm"]``. The RM is trained every ``update_every`` training steps on the policy's own recent
completions, labelled by the rule answer verifier (:func:`lit_rlhf.rewards.is_correct`: correct 1, wrong 0;
completions without a gradable answer are left out), with a replay of older labelled completions.

- Replay: DeepSeekMath "continually train[s] the old reward model using a replay mechanism that incorporates 10% of
  historical data". Here ``replay_fraction`` is the share of older examples in each update: an update on n fresh
  examples adds :func:`replay_count` = round(f n / (1 - f)) examples drawn uniformly without replacement from the
  history (the examples of earlier updates, at most ``buffer_size``, oldest dropped first). The RM follows the current
  policy's distribution and keeps seeing the earlier one.
- Loss: :func:`lit_rlhf.losses.outcome_bce_loss`, binary cross-entropy of the score (a logit) against the label (an
  outcome RM as a verifier; Cobbe et al. 2021 §3, Lightman et al. 2023 §2.5). The examples are single completions
  with absolute labels, not pairs: Bradley–Terry would use only a group's (correct, wrong) pairs and leave the offset
  free; BCE uses every example and makes sigmoid(score) the predicted probability of a correct answer, so score > 0
  is the RM's verdict "correct".
- Metrics of a step (``train/online_rm/*``), measured on the step's fresh completions with the scores they were
  rewarded with, i.e. BEFORE the RM trains on them (held out for it): ``accuracy`` (score > 0 vs label,
  :func:`sign_accuracy`), ``pair_accuracy`` (correct above wrong within a group, what GRPO's group-relative advantage
  uses, :func:`pair_accuracy`), ``positive_frac`` (the majority baseline is max(p, 1 - p)); the mean ``loss`` of the
  latest update (from the first on); ``buffer_size`` (the history) and ``updates`` (so far).
- Input: ``prompt + completion + the end of an assistant turn`` (the RM tokenizer's chat template, as the RM stage
  renders a response; ``chat_template: false``: nothing), cut from the left at ``max_length`` tokens and read at the
  last token, the same for scoring and training. ``update_every: 0`` never updates: a frozen RM whose accuracy on the
  policy's samples is still logged (the comparison run).
- State: the RM's trainable weights, its AdamW state, the history and the examples not yet trained on, the replay
  generator and the counters are saved in the RL checkpoint (:func:`save`) and restored on resume (:func:`load`).
  :func:`export` writes ``export/online_rm/merged`` (a sequence-classification directory, the next iteration's
  ``model.name``) and ``export/online_rm/replay.jsonl`` (its labelled examples, the next iteration's ``replay_from``;
  token ids of the RM's tokenizer), which is how ``iterations:`` in a pipeline carries the RM over.

One process only (each rank would train its own copy); refused under DDP/FSDP2. Decoder reward models only.

    python -m lit_rlhf.experiments.grpo --config experiments/grpo/from-sft-online-rm.yaml
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lit_rlhf import models, reward_models
from lit_rlhf.io import atomic_file
from lit_rlhf.losses import outcome_bce_loss
from lit_rlhf.rewards import RewardComposer, RewardResult, add_rewards, check_reward_weights, is_correct
from lit_rlhf.types import Rollout

KEY = "online_rm"
"""``RewardResult.per_function`` key of the RM's scores, checkpoint key of its state, export subdirectory."""
REPLAY_FILE = "replay.jsonl"


@dataclass
class OnlineRMSettings:
    """The online-updated reward model (GRPO ``model.online_rm``).

    Args:
        model: its network: an RM export (``DIR/export/merged``), a sequence-classification or causal-LM directory (a
            fresh score head), or ``tiny``; its dtype, LoRA (null: every weight trained) and seed.
        weight: multiplier of its score in the total reward.
        update_every: train it every this many training steps on the completions since its last update; 0: never.
        lr: its AdamW learning rate (constant).
        weight_decay: its AdamW weight decay.
        batch_size: completions per forward (scoring) and per optimizer step (training).
        epochs: passes over each update's examples.
        replay_fraction: share of each update's examples drawn from older ones (DeepSeekMath: 10%); in [0, 1).
        buffer_size: the most older labelled examples kept for replay (oldest dropped first).
        max_length: inputs are cut to this many tokens from the left (the end, where the score is read, is kept).
        max_grad_norm: gradient-norm clip of each of its optimizer steps; null: none.
        chat_template: end the input with the chat template's end of an assistant turn (as the RM stage renders).
        replay_from: a ``replay.jsonl`` (or the directory holding it) of an earlier run's export: its history.
        seed: seed of the replay draws and the minibatch order.
        device: where it runs; null: CUDA when available, else the CPU.
    """

    model: models.ModelSpec = field(default_factory=lambda: models.ModelSpec(name="runs/rm/export/merged"))
    weight: float = 1.0
    update_every: int = 1
    lr: float = 1e-5
    weight_decay: float = 0.0
    batch_size: int = 16
    epochs: int = 1
    replay_fraction: float = 0.1
    buffer_size: int = 4096
    max_length: int = 512
    max_grad_norm: float | None = 1.0
    chat_template: bool = True
    replay_from: str | None = None
    seed: int = 0
    device: str | None = None


def check_settings(s: OnlineRMSettings) -> None:
    """Refuse settings under which the RM cannot work, naming the option."""
    checks = [
        ("update_every", s.update_every >= 0, ">= 0 (0: never updated)"),
        ("lr", math.isfinite(s.lr) and s.lr > 0, "a finite number > 0"),
        ("weight", math.isfinite(s.weight), "a finite number"),
        ("replay_fraction", 0 <= s.replay_fraction < 1, "in [0, 1) (the share of older examples in an update)"),
        ("buffer_size", s.buffer_size >= 0, ">= 0"),
        ("batch_size", s.batch_size >= 1, ">= 1"),
        ("epochs", s.epochs >= 1, ">= 1"),
        ("max_length", s.max_length >= 2, ">= 2"),
        ("max_grad_norm", s.max_grad_norm is None or s.max_grad_norm > 0, "> 0 or null"),
    ]
    for name, ok, rule in checks:
        if not ok:
            raise ValueError(f"model.online_rm.{name}={getattr(s, name)!r}: must be {rule}")
    if s.replay_fraction > 0 and s.buffer_size == 0:
        raise ValueError("model.online_rm.replay_fraction > 0 with buffer_size=0: no older example is kept to replay")


# ------------------------------------------------------------------------------------------------ pure functions
def replay_count(fresh: int, fraction: float, available: int) -> int:
    """Older examples to add to an update of ``fresh`` new ones so that they are ``fraction`` of it,
    round(fraction * fresh / (1 - fraction)), at most the ``available`` ones."""
    return min(available, round(fraction * fresh / (1.0 - fraction)))


def sign_accuracy(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of examples where the verdict score > 0 equals the label (1 correct, 0 wrong); scores, labels [n]."""
    return float(((scores > 0) == (labels > 0.5)).float().mean())


def pair_accuracy(scores: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor) -> float | None:
    """Over the (correct, wrong) pairs of completions of one prompt (``groups`` [n]: the prompt of each), the fraction
    where the correct one scores higher (a tie counts half); None without such a pair."""
    pairs = (labels[:, None] > 0.5) & (labels[None, :] < 0.5) & (groups[:, None] == groups[None, :])
    if not pairs.any():
        return None
    diff = scores[:, None] - scores[None, :]
    return float(((diff > 0).float() + 0.5 * (diff == 0).float())[pairs].mean())


def read_replay(path: str | Path) -> list[list]:
    """``[[input_ids, label], ...]`` of a ``replay.jsonl`` (:func:`export`) or of the directory holding one."""
    path = Path(path)
    path = path / REPLAY_FILE if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"model.online_rm.replay_from: {path} not found (an online RM export writes it)")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [[list(r["input_ids"]), float(r["label"])] for r in rows]


def keep_last(examples: list, size: int) -> list:
    """The last ``size`` of ``examples`` (none for size 0)."""
    return examples[len(examples) - size :] if size < len(examples) else examples


# ---------------------------------------------------------------------------------------------------- the composer
class OnlineRMComposer(RewardComposer):
    """The reward functions plus the online RM's score; holds the RM, its optimizer and its examples."""

    def __init__(self, specs, settings: OnlineRMSettings) -> None:
        super().__init__(specs)
        check_settings(settings)
        self.settings = s = settings
        self.tokenizer = models.load_tokenizer(s.model.name, s.model.revision, for_reward_model=True)
        with torch.random.fork_rng(devices=[]):  # LoRA/head initialisation draws no global random numbers
            torch.manual_seed(s.model.seed)
            self.model = reward_models.load_reward_model(s.model, self.tokenizer.pad_token_id)
        if models.is_encoder(self.model.config):
            raise ValueError("model.online_rm.model: the online reward model needs a decoder backbone")
        self.device = torch.device(s.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=s.lr, weight_decay=s.weight_decay)
        self.scorer = reward_models.RewardScorer(self.model, self.tokenizer, 0, s.batch_size, s.max_length, "left")
        self.suffix = models.turn_suffix(self.tokenizer) if s.chat_template else ""
        self.history = keep_last(read_replay(s.replay_from), s.buffer_size) if s.replay_from else []
        self.pending: list[list] = []  # labelled examples since the last update
        self.generator = torch.Generator().manual_seed(s.seed)
        self.steps, self.updates, self.loss = 0, 0, math.nan  # loss: the latest update's

    def check_weights(self, option: str) -> None:
        check_reward_weights([*(s.weight for s in self.specs), self.settings.weight], f"{option} + model.online_rm")

    def encode(self, prompts: list[str], completions: list[str]) -> list[list[int]]:
        """Token ids of ``prompt + completion + suffix``, cut from the left to ``max_length``."""
        self.tokenizer.truncation_side = "left"
        texts = [p + c + self.suffix for p, c in zip(prompts, completions, strict=True)]
        encoded = self.tokenizer(texts, truncation=True, max_length=self.settings.max_length, add_special_tokens=False)
        return encoded["input_ids"]

    def __call__(self, prompts: list[str], completions: list[str], columns: dict | None = None) -> RewardResult:
        """The reward functions' result plus ``per_function["online_rm"]``: the RM's scores [N] (no grad)."""
        result = super().__call__(prompts, completions, columns)
        scores = self.scorer.score_ids(self.encode(prompts, completions)).float() if completions else torch.zeros(0)
        total = add_rewards(self.settings.weight * scores, result.total)
        return RewardResult(total, {**result.per_function, KEY: scores})

    def observe(self, rollout: Rollout, scores: RewardResult, extras: dict[str, list]) -> dict[str, float]:
        """After a training step's scoring: the RM's metrics on these fresh completions (``scores`` were computed
        before any update on them), then they join the pending examples, and every ``update_every`` steps the RM is
        trained on the pending examples plus replay (:meth:`update`). Returns the ``online_rm/*`` metrics."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if torch.distributed.get_world_size() > 1:
                raise ValueError("model.online_rm runs in one process only: each rank would train its own RM copy")
        if "answer" not in extras:
            raise ValueError("model.online_rm needs the data's 'answer' column: the verifier labels its examples")
        index = rollout.prompt_index.tolist()
        graded = [is_correct(c, extras["answer"][i]) for c, i in zip(rollout.completions, index)]
        rows = [k for k, ok in enumerate(graded) if ok is not None]
        labels = torch.tensor([float(graded[k]) for k in rows])
        stats: dict[str, float] = {}
        if rows:
            rm = scores.per_function[KEY][rows]
            stats = {"online_rm/accuracy": sign_accuracy(rm, labels), "online_rm/positive_frac": float(labels.mean())}
            pairs = pair_accuracy(rm, labels, rollout.prompt_index.cpu()[rows])
            stats.update({} if pairs is None else {"online_rm/pair_accuracy": pairs})
        self.steps += 1
        if self.settings.update_every:  # a frozen RM keeps no examples
            ids = self.encode([rollout.prompts[index[k]] for k in rows], [rollout.completions[k] for k in rows])
            self.pending += [[r, label] for r, label in zip(ids, labels.tolist())]
            if self.steps % self.settings.update_every == 0 and self.pending:
                self.loss = self.update()
        stats.update({} if math.isnan(self.loss) else {"online_rm/loss": self.loss})
        return {**stats, "online_rm/buffer_size": float(len(self.history)), "online_rm/updates": float(self.updates)}

    def update(self) -> float:
        """Train on the pending examples plus :func:`replay_count` older ones (``epochs`` passes of shuffled
        minibatches, one AdamW step each); the pending examples then join the history. Returns the mean loss."""
        s, fresh = self.settings, self.pending
        drawn = torch.randperm(len(self.history), generator=self.generator).tolist()
        data = fresh + [self.history[i] for i in drawn[: replay_count(len(fresh), s.replay_fraction, len(drawn))]]
        total = 0.0
        self.model.train()
        for _ in range(s.epochs):
            order = torch.randperm(len(data), generator=self.generator).tolist()
            for start in range(0, len(data), s.batch_size):
                chunk = [data[i] for i in order[start : start + s.batch_size]]
                loss = outcome_bce_loss(self.logits([r for r, _ in chunk]), torch.tensor([y for _, y in chunk]))
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if s.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(self.params, s.max_grad_norm)
                self.optimizer.step()
                total += float(loss.detach()) * len(chunk)
        self.optimizer.zero_grad(set_to_none=True)
        self.history, self.pending = keep_last(self.history + fresh, s.buffer_size), []
        self.updates += 1
        return total / (len(data) * s.epochs)

    def logits(self, rows: list[list[int]]) -> torch.Tensor:
        """Scores [n] (float32, with gradients) of token-id rows, read at each row's last token (as when scoring)."""
        ids = reward_models.pad_right(rows, self.tokenizer.pad_token_id).to(self.device)
        mask = reward_models.pad_right([[1] * len(r) for r in rows], 0).to(self.device)
        last = torch.tensor([len(r) - 1 for r in rows], device=self.device)[:, None]
        return reward_models.scores_at(self.model, ids, mask, last)[0][:, 0].cpu()

    # -- state ----------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        weights = {n: p.detach().cpu().clone() for n, p in self.model.named_parameters() if p.requires_grad}
        return {
            "weights": weights, "optimizer": self.optimizer.state_dict(), "history": self.history,
            "pending": self.pending, "generator": self.generator.get_state(), "steps": self.steps,
            "updates": self.updates, "loss": self.loss,
        }  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        trainable = {n for n, p in self.model.named_parameters() if p.requires_grad}
        if set(state["weights"]) != trainable:
            raise ValueError("the checkpoint's online RM weights do not match model.online_rm.model (another network?)")
        self.model.load_state_dict(state["weights"], strict=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.history, self.pending = [list(e) for e in state["history"]], [list(e) for e in state["pending"]]
        self.generator.set_state(state["generator"])
        self.steps, self.updates, self.loss = int(state["steps"]), int(state["updates"]), float(state["loss"])

    def export(self, out_dir: str | Path, dtype: str | None = None) -> dict[str, str]:
        """``out_dir/merged`` (+ ``adapter`` with LoRA) and ``out_dir/replay.jsonl`` (every labelled example)."""
        written = reward_models.export_reward_model(self.model, self.tokenizer, out_dir, dtype)
        with atomic_file(Path(out_dir) / REPLAY_FILE, "w") as f:
            for ids, label in self.history + self.pending:
                f.write(json.dumps({"input_ids": ids, "label": label}) + "\n")
        return {**written, "replay": str(Path(out_dir) / REPLAY_FILE)}


# --------------------------------------------------------------------------------- the stage's hooks (no-op without)
def with_online_rm(composer: RewardComposer, settings: OnlineRMSettings | None, estimator: str) -> RewardComposer:
    """``composer`` plus the online RM of ``settings`` (None: ``composer`` unchanged). Outcome rewards only."""
    if settings is None:
        return composer
    if type(composer) is not RewardComposer or estimator == "gdpo":
        raise ValueError(f"model.online_rm is an outcome reward: not with advantage_estimator={estimator}")
    return OnlineRMComposer(composer.specs, settings)


def observe(composer: RewardComposer, rollout: Rollout, scores: RewardResult, extras: dict) -> dict[str, float]:
    """:meth:`OnlineRMComposer.observe` (metrics, then an update every N steps); {} without an online RM."""
    return composer.observe(rollout, scores, extras) if isinstance(composer, OnlineRMComposer) else {}


def save(composer: RewardComposer, checkpoint: dict) -> None:
    """Put the online RM's state into the RL ``checkpoint``."""
    if isinstance(composer, OnlineRMComposer):
        checkpoint[KEY] = composer.state_dict()


def load(composer: RewardComposer, checkpoint: dict) -> None:
    """Restore the online RM's state from the RL ``checkpoint`` (when it has one)."""
    if isinstance(composer, OnlineRMComposer) and KEY in checkpoint:
        composer.load_state_dict(checkpoint[KEY])


def export(composer: RewardComposer, out_dir: str | Path, rank_zero: bool = True) -> dict[str, str]:
    """``out_dir/online_rm/{merged,replay.jsonl}`` (keys ``online_rm/*``); {} without an online RM."""
    if not isinstance(composer, OnlineRMComposer) or not rank_zero:
        return {}
    return {f"{KEY}/{k}": v for k, v in composer.export(Path(out_dir) / KEY).items()}
