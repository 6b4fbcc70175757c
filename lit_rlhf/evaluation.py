"""Evaluation: a causal LM on prompts with reference answers (greedy accuracy, pass@k, mean@n, reward scores) and a
reward model on preference pairs (pairwise accuracy). One code path behind ``lit-rlhf evaluate``, ``generate`` and
``chat`` (:mod:`lit_rlhf.experiments`) and :class:`EvaluationCallback` (the same evaluation every N training steps).

Prompts are read and rendered by :class:`lit_rlhf.data.prompts.PromptDataModule` (its ``example``), so a run's
held-out prompts are rebuilt from its ``config.yaml`` exactly as the run validated on them (same records,
instruction, chat template, truncation), and greedy decoding with the run's ``max_new_tokens`` and
``val_batch_size`` reproduces its ``val/accuracy``. Completions come from :func:`lit_rlhf.rollout.sample_completions`
(the stages' sampler: KV cache, every EOS id, LoRA folded in).

Metrics, over the prompts with a reference answer (n samples per prompt, c of them correct):

- ``accuracy``: greedy decoding (temperature 0), the stages' ``val/accuracy`` (:func:`lit_rlhf.rewards.grade`);
- ``pass@k`` (k <= n): the unbiased estimator of Chen et al. 2021 (Codex), Eq. 1, ``1 - C(n - c, k) / C(n, k)``;
- ``mean@n``: c / n, the accuracy of one sample (its expectation is the same for every k <= n);
- ``rewards/...`` (reward functions of :mod:`lit_rlhf.rewards`, by name, on the greedy completions),
  ``completions/mean_length`` (tokens, EOS included) and ``completions/truncated_rate``;
- reward models: ``rewards/accuracies`` (the better response scored strictly higher, over every ordered pair of a
  ranked list: the RM stage's ``val/rewards/accuracies``), ``rewards/{chosen,rejected,margins,mean}``.

Answers are checked by the package's numeric verifier (:func:`lit_rlhf.rewards.is_correct`) or, with
``verifier="math"``, by ``math-verify`` (symbolic equality of LaTeX answers, MATH-style; ``pip install
'lit_rlhf[math]'``).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch import nn

from lit_rlhf import models
from lit_rlhf.checkpointing import newest_checkpoint
from lit_rlhf.data.prompts import TASKS, PromptDataModule, PromptExample, PromptFields
from lit_rlhf.data.sources import read_records
from lit_rlhf.rewards import RewardComposer, RewardResult, RewardSpec, extract_hash_answer, is_correct
from lit_rlhf.rollout import SamplingSettings, sample_completions


# ------------------------------------------------------------------------------------------------------ estimators
def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one prompt with ``c`` correct among ``n`` samples (Chen et al. 2021, Eq. 1):
    ``1 - C(n - c, k) / C(n, k)``, computed as ``1 - prod_{i = n - c + 1}^{n} (1 - k / i)`` (no large binomials)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def math_verify_correct(completion: str, answer: Any) -> bool | None:
    """Whether ``math-verify`` finds the completion's answer equal to the reference (a GSM8K ``#### x`` string is
    read after its ``####``); None when the reference is missing or unparsable."""
    try:
        from math_verify import parse, verify
    except ImportError:
        raise ImportError("verifier 'math' needs the math-verify package: pip install 'lit_rlhf[math]'") from None
    if answer is None or isinstance(answer, bool):
        return None
    text = str(answer)
    hashed = extract_hash_answer(text)
    text = hashed if hashed else text
    gold = parse(text) or parse(f"${text}$")
    return bool(verify(gold, parse(completion))) if gold else None


VERIFIERS: dict[str, Callable[[str, Any], bool | None]] = {"numeric": is_correct, "math": math_verify_correct}
"""Answer checkers by name: ``(completion, reference answer) -> correct, or None (ungraded)``."""


# --------------------------------------------------------------------------------------------------------- prompts
@dataclass
class PromptSet:
    """Rendered prompts (``examples``) with their source ``records`` (raw reference answers under ``answer_field``)."""

    name: str
    examples: list[PromptExample]
    records: list[dict]
    answer_field: str = "answer"

    @property
    def answers(self) -> list[Any]:
        return [r.get(self.answer_field) for r in self.records]


def prompt_module(settings: dict | None, tokenizer) -> PromptDataModule:
    """A :class:`PromptDataModule` of ``settings`` (a run's ``data:`` plus overrides), given ``tokenizer``."""
    settings = dict(settings or {})
    unknown = sorted(set(settings) - set(inspect.signature(PromptDataModule.__init__).parameters) - {"self"})
    if unknown:
        raise ValueError(f"not prompt-data settings: {unknown}")
    if isinstance(settings.get("fields"), dict):
        settings["fields"] = PromptFields(**settings["fields"])
    dm = PromptDataModule(**settings)
    dm.connect(tokenizer)
    dm.stats = {"truncated": 0}
    return dm


def validation_prompts(dm: PromptDataModule) -> PromptSet:
    """The held-out prompts a run with ``dm``'s settings validates on (the records and rendering of its ``setup``)."""
    hp = dm.hparams
    _, val = dm.records(TASKS, hp.task, hp.max_val_records)
    val = val[: hp.max_val_records]
    name = f"{hp.task if hp.path is None else Path(hp.path).stem}-validation"
    return PromptSet(name, [dm.example(r) for r in val], val, dm.fields.answer)


def file_prompts(
    dm: PromptDataModule, path: str, split: str = "test", subset: str | None = None, max_records: int | None = None
) -> PromptSet:
    """Every record of a local file or of a hub dataset's ``split``, rendered by ``dm``."""
    records = read_records(path, split, max_records, subset)
    name = Path(path).stem if Path(path).is_file() else f"{Path(path).name}-{split}"
    return PromptSet(name, [dm.example(r) for r in records], records, dm.fields.answer)


# ------------------------------------------------------------------------------------------------ policy metrics
@dataclass
class EvalSettings:
    """How completions are drawn and graded.

    Args:
        max_new_tokens: completion budget in tokens (greedy and sampled).
        num_samples: n, completions sampled per prompt for pass@k and mean@n (0: greedy accuracy only).
        k: the k of pass@k (each at most ``num_samples``; larger ones are dropped).
        temperature: sampling temperature of the n samples (greedy accuracy is always temperature 0).
        top_p: nucleus sampling of the n samples (1.0: off).
        top_k: top-k sampling of the n samples (0: off).
        batch_size: prompts per forward.
        seed: seed of the sampling noise.
        verifier: answer checker: ``numeric`` (the package's verifier) or ``math`` (math-verify).
        rewards: reward functions scored on the greedy completions (empty: none).
    """

    max_new_tokens: int = 64
    num_samples: int = 0
    k: list[int] = field(default_factory=lambda: [1])
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    batch_size: int = 32
    seed: int = 0
    verifier: Literal["numeric", "math"] = "numeric"
    rewards: list[RewardSpec] = field(default_factory=list)


def evaluate_policy(
    lm: nn.Module, tokenizer, prompts: PromptSet, collate: Callable, settings: EvalSettings, progress: bool = False
) -> tuple[dict[str, float], list[dict]]:
    """(metrics, one row per prompt: prompt, answer, greedy completion, correct, samples, samples_correct, reward) of
    ``lm`` on ``prompts`` (``collate``: examples -> :class:`lit_rlhf.types.PromptBatch`, the data module's)."""
    from tqdm.auto import tqdm

    check, n = VERIFIERS[settings.verifier], settings.num_samples
    composer = RewardComposer(settings.rewards) if settings.rewards else None
    greedy = SamplingSettings(settings.max_new_tokens, temperature=0.0)
    sampling = SamplingSettings(settings.max_new_tokens, settings.temperature, settings.top_p, settings.top_k)
    device = next(lm.parameters()).device
    generator = torch.Generator(device=device).manual_seed(settings.seed)
    rows, results, lengths, truncated = [], [], [], []
    starts = range(0, len(prompts.examples), settings.batch_size)
    for start in tqdm(starts, desc="evaluate", unit="batch", disable=not progress):
        examples = prompts.examples[start : start + settings.batch_size]
        answers = prompts.answers[start : start + settings.batch_size]
        batch = collate(examples).to(device)
        rollout = sample_completions(lm, tokenizer, batch, 1, greedy, None)
        lengths += rollout.completion_lengths.tolist()
        truncated += rollout.truncated.tolist()
        rewards = [None] * len(examples)
        if composer is not None:
            results.append(composer(rollout.prompts, rollout.completions, batch.extras))
            rewards = [None if math.isnan(r) else r for r in results[-1].total.tolist()]  # None: no reward
        samples: list[list[str]] = [[] for _ in examples]
        if n > 0:
            drawn = sample_completions(lm, tokenizer, batch, n, sampling, generator)
            for i, completion in zip(drawn.prompt_index.tolist(), drawn.completions):
                samples[i].append(completion)
        for e, answer, completion, drawn_i, reward in zip(examples, answers, rollout.completions, samples, rewards):
            rows.append(
                {
                    "prompt": e.prompt,
                    "answer": answer,
                    "completion": completion,
                    "correct": check(completion, answer),
                    "samples": drawn_i,
                    "samples_correct": [check(s, answer) for s in drawn_i],
                    "reward": reward,
                }
            )
    metrics = accuracy_metrics(rows, settings.k, n)
    if results:
        per_function = {k: torch.cat([r.per_function[k] for r in results]) for k in results[0].per_function}
        total = RewardResult(torch.cat([r.total for r in results]), per_function)
        metrics.update({f"rewards/{k.removeprefix('rewards/')}": v for k, v in total.stats().items()})
    if lengths:
        metrics["completions/mean_length"] = sum(lengths) / len(lengths)
        metrics["completions/truncated_rate"] = sum(truncated) / len(truncated)
    return metrics, rows


def accuracy_metrics(rows: list[dict], k: list[int], n: int) -> dict[str, float]:
    """``prompts``, ``graded``, greedy ``accuracy``, ``pass@k`` (k <= n) and ``mean@n`` over the graded rows."""
    graded = [r for r in rows if r["correct"] is not None]
    metrics: dict[str, float] = {"prompts": len(rows), "graded": len(graded)}
    if not graded:
        return metrics
    metrics["accuracy"] = sum(bool(r["correct"]) for r in graded) / len(graded)
    if n > 0:
        for kk in sorted({kk for kk in k if 1 <= kk <= n}):
            passes = [pass_at_k(n, sum(bool(c) for c in r["samples_correct"]), kk) for r in graded]
            metrics[f"pass@{kk}"] = sum(passes) / len(passes)
        metrics[f"mean@{n}"] = sum(sum(bool(c) for c in r["samples_correct"]) / n for r in graded) / len(graded)
    return metrics


# ------------------------------------------------------------------------------------------- reward-model metrics
def ranked_rows(examples: list) -> list[tuple[list[int], list[list[int]]]]:
    """(prompt ids, response ids best first) of preference examples (chosen/rejected) or ranked lists."""
    rows = []
    for e in examples:
        responses = [e.chosen_ids, e.rejected_ids] if hasattr(e, "chosen_ids") else list(e.response_ids)
        if len(responses) < 2:
            raise ValueError("pairwise accuracy needs pairs or ranked lists, not scored records (one response each)")
        rows.append((list(e.prompt_ids), [list(r) for r in responses]))
    return rows


def pairwise_accuracy(scores: list[list[float]]) -> dict[str, float]:
    """Metrics of reward scores per prompt (best response first): ``rewards/accuracies`` over every ordered pair
    (i before j scored strictly higher), ``rewards/chosen`` (mean of the best), ``rewards/rejected`` (mean of the
    others), ``rewards/margins`` (their difference), ``rewards/mean``."""
    pairs = [s[i] > s[j] for s in scores for i in range(len(s)) for j in range(i + 1, len(s))]
    chosen = [s[0] for s in scores]
    rejected = [x for s in scores for x in s[1:]]
    every = chosen + rejected
    metrics = {"pairs": len(pairs), "rewards/accuracies": sum(pairs) / len(pairs)}
    metrics.update({"rewards/chosen": sum(chosen) / len(chosen), "rewards/rejected": sum(rejected) / len(rejected)})
    metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    metrics["rewards/mean"] = sum(every) / len(every)
    return metrics


def evaluate_reward_model(scorer, examples: list) -> tuple[dict[str, float], list[list[float]]]:
    """(metrics of :func:`pairwise_accuracy`, scores per prompt) of a :class:`lit_rlhf.reward_models.RewardScorer`;
    each prompt + response is scored as one contiguous row, as the RM stage scores it."""
    rows = ranked_rows(examples)
    flat = scorer.score_ids([p + r for p, responses in rows for r in responses]).tolist()
    scores, at = [], 0
    for _, responses in rows:
        scores.append(flat[at : at + len(responses)])
        at += len(responses)
    return pairwise_accuracy(scores), scores


# ------------------------------------------------------------------------------------------------ during training
class EvaluationCallback(L.Callback):
    """Runs :func:`evaluate_policy` on the module's ``policy`` every ``every_n_steps`` training steps and logs the
    metrics as ``<prefix><name>`` (``val/eval/accuracy``, ``val/eval/pass@8``, ...) to the run's loggers.

    Add it to any policy stage (SFT, DPO, GRPO, PPO), e.g.
    ``--trainer.callbacks+=lit_rlhf.evaluation.EvaluationCallback --trainer.callbacks.every_n_steps=10
    --trainer.callbacks.num_samples=8 --trainer.callbacks.k=[1,8]``. Prompts: the data module's held-out prompts
    (a :class:`PromptDataModule`), or every record of ``data`` rendered by it (or by default prompt-data settings).

    Args:
        every_n_steps: evaluate after every N-th training step.
        data: a prompt file or hub dataset with answers; ``null``: the data module's validation prompts.
        split: the hub split of ``data``.
        subset: the hub configuration of ``data``.
        max_prompts: evaluate at most this many prompts (``null``: all).
        num_samples: n, completions sampled per prompt for pass@k and mean@n (0: greedy accuracy only).
        k: the k of pass@k (each at most ``num_samples``).
        max_new_tokens: completion budget; ``null``: the module's ``sampling.max_new_tokens`` or ``max_new_tokens``.
        temperature: sampling temperature of the n samples.
        top_p: nucleus sampling of the n samples.
        batch_size: prompts per forward; ``null``: the data module's ``val_batch_size`` (as its validation), else 32.
        verifier: ``numeric`` or ``math`` (math-verify).
        rewards: reward functions on the greedy completions; ``null``: the module's own (GRPO, PPO), else none.
        seed: seed of the sampling noise (the same at every evaluation).
        prefix: prefix of the logged metric names.
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        data: str | None = None,
        split: str = "test",
        subset: str | None = None,
        max_prompts: int | None = 64,
        num_samples: int = 0,
        k: list[int] | None = None,
        max_new_tokens: int | None = None,
        temperature: float = 1.0,
        top_p: float = 1.0,
        batch_size: int | None = None,
        verifier: Literal["numeric", "math"] = "numeric",
        rewards: list[RewardSpec] | None = None,
        seed: int = 0,
        prefix: str = "val/eval/",
    ) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps, self.data, self.split, self.subset = every_n_steps, data, split, subset
        self.max_prompts, self.prefix, self.max_new_tokens = max_prompts, prefix, max_new_tokens
        self.settings = EvalSettings(
            num_samples=num_samples,
            k=list(k or [1]),
            temperature=temperature,
            top_p=top_p,
            batch_size=batch_size or 0,
            seed=seed,
            verifier=verifier,
            rewards=list(rewards or []),
        )
        self._prompts: PromptSet | None = None
        self._collate: Callable | None = None
        self._last_step = -1
        self.last_metrics: dict[str, float] = {}

    def prompts(self, trainer: L.Trainer, pl_module: L.LightningModule) -> tuple[PromptSet, Callable]:
        if self._prompts is None:
            dm = trainer.datamodule if isinstance(trainer.datamodule, PromptDataModule) else None
            if self.data is None and dm is None:
                raise ValueError("EvaluationCallback needs `data` (a prompt file) unless the data module has prompts")
            if dm is None:
                dm = prompt_module({}, pl_module.tokenizer)
            dm.stats.setdefault("truncated", 0)
            if self.data is None:
                records = [{"answer": e.columns.get("answer")} for e in dm.val_examples]
                self._prompts = PromptSet("validation", list(dm.val_examples), records)
            else:
                self._prompts = file_prompts(dm, self.data, self.split, self.subset, self.max_prompts)
            if self.max_prompts is not None:
                s = self._prompts
                self._prompts = PromptSet(s.name, s.examples[: self.max_prompts], s.records[: self.max_prompts])
            self._collate = dm.collate
            if not self.settings.batch_size:
                self.settings.batch_size = getattr(dm.hparams, "val_batch_size", 32)
        return self._prompts, self._collate

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == 0 or step % self.every_n_steps or step == self._last_step:  # 0: no optimizer step yet
            return
        self._last_step = step
        from lit_rlhf.distributed import is_sharded

        policy = getattr(pl_module, "policy", None)
        if policy is None:
            raise ValueError(f"EvaluationCallback evaluates a policy; {type(pl_module).__name__} has none")
        if not is_sharded(policy) and not trainer.is_global_zero:
            return  # unsharded: rank zero alone evaluates (FSDP2: every rank decodes, in lockstep)
        prompts, collate = self.prompts(trainer, pl_module)
        rewards = self.settings.rewards
        if not rewards and isinstance(getattr(pl_module, "rewards", None), RewardComposer):
            rewards = pl_module.rewards.specs
        settings = dataclasses.replace(self.settings, rewards=rewards, max_new_tokens=self._budget(pl_module))
        metrics, _ = evaluate_policy(policy, pl_module.tokenizer, prompts, collate, settings)
        self.last_metrics = {f"{self.prefix}{k}": float(v) for k, v in metrics.items()}
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(self.last_metrics, step=step)

    def _budget(self, pl_module: L.LightningModule) -> int:
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        sampling = getattr(pl_module, "sampling", None)
        return getattr(sampling, "max_new_tokens", None) or getattr(pl_module.hparams, "max_new_tokens", 64)


# --------------------------------------------------------------------------------------------------- loading models
@dataclass
class LoadedModel:
    """A model to evaluate or sample from, in eval mode without gradients.

    ``source``: what was loaded (an HF directory, hub id, built-in name or checkpoint); ``run_dir``/``run_config``:
    the stage run it belongs to (its ``config.yaml``), when it belongs to one; ``reward_model``: a sequence classifier.
    """

    model: nn.Module
    tokenizer: Any
    source: str
    run_dir: Path | None = None
    run_config: dict = field(default_factory=dict)
    reward_model: bool = False


def find_run(path: Path) -> Path | None:
    """The run directory (holding ``config.yaml``) of a run directory, its ``export/merged`` (or ``export/adapter``)
    or a checkpoint in it (``checkpoints/last.ckpt``, ``hpc_ckpt_N.ckpt``); None for anything else."""
    has_outputs = any((path / d).is_dir() for d in ("export", "checkpoints"))
    if path.is_dir() and (path / "config.yaml").is_file() and has_outputs:
        return path
    if path.parent.name in ("export", "checkpoints") and (path.parent.parent / "config.yaml").is_file():
        return path.parent.parent
    if path.suffix == ".ckpt" and (path.parent / "config.yaml").is_file():
        return path.parent
    return None


def policy_spec(run_config: dict, dtype: str | None = None) -> models.ModelSpec:
    """The :class:`lit_rlhf.models.ModelSpec` of a policy stage run's ``model.policy`` (``dtype`` overrides its
    dtype; gradient checkpointing off)."""
    policy = dict((run_config.get("model") or {}).get("policy") or {})
    if not policy:
        raise ValueError("the run's config.yaml has no model.policy: not a policy stage (sft, dpo, grpo, ppo)")
    names = {f.name for f in dataclasses.fields(models.ModelSpec)}
    policy = {k: v for k, v in policy.items() if k in names}
    if isinstance(policy.get("lora"), dict):
        policy["lora"] = models.LoRASettings(**policy["lora"])
    policy.update(gradient_checkpointing=False, **({"dtype": dtype} if dtype else {}))
    return models.ModelSpec(**policy)


def policy_from_checkpoint(ckpt: Path, run_config: dict, dtype: str | None = None) -> nn.Module:
    """The policy of a stage run's Lightning checkpoint: rebuilt from the run's ``model.policy`` (base weights and
    LoRA layout), then the checkpoint's policy weights (its trainable ones, as the stages save them) loaded."""
    lm = models.load_causal_lm(policy_spec(run_config, dtype))
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    own = {k.removeprefix("policy."): v for k, v in state.items() if k.startswith("policy.")}
    missing = [n for n, p in lm.named_parameters() if p.requires_grad and n not in own]
    if not own or missing:
        raise ValueError(f"{ckpt}: the checkpoint lacks the policy weights {missing[:3] or sorted(state)[:3]}")
    lm.load_state_dict(own, strict=False)
    return lm


def _is_classifier(where: str, gguf: str | None) -> bool:
    from transformers import AutoConfig

    if gguf is not None:
        return False
    return any(a.endswith("ForSequenceClassification") for a in AutoConfig.from_pretrained(where).architectures or [])


def load_model(name: str, device: str | None = None, dtype: str | None = None) -> LoadedModel:
    """A causal LM or reward model by name: a run directory (its ``export/merged``, else its newest checkpoint
    that loads, :func:`lit_rlhf.checkpointing.newest_checkpoint`), a Lightning checkpoint of a policy stage run
    (rebuilt from the run's ``config.yaml``), an HF directory, hub id, ``.gguf`` file or built-in name (``tiny``,
    ``smollm2-135m``). ``dtype``: ``float32``/``bfloat16`` (default: the run's policy dtype, else float32);
    ``device``: default CUDA when available."""
    import yaml

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    path = Path(name)
    run_dir = find_run(path)
    config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {} if run_dir is not None else {}
    if run_dir == path:
        merged, last = path / "export" / "merged", newest_checkpoint(path)  # what --ckpt_path last resumes
        if not merged.is_dir() and last is None:
            raise FileNotFoundError(f"run {path} has neither export/merged nor a checkpoint that loads")
        path = merged if merged.is_dir() else last
    if dtype is None:
        dtype = ((config.get("model") or {}).get("policy") or {}).get("dtype") or "float32"
    reward_model = False
    if path.suffix == ".ckpt":
        if run_dir is None:
            raise FileNotFoundError(f"{path}: a checkpoint is evaluated with its run's config.yaml (none found)")
        spec = policy_spec(config, dtype)
        model, tokenizer = policy_from_checkpoint(path, config, dtype), models.load_tokenizer(spec.name, spec.revision)
    else:
        source = str(path) if run_dir is not None else name
        where, gguf = models.resolve(source) if source != "tiny" else (None, None)
        reward_model = where is not None and _is_classifier(where, gguf)
        if reward_model:
            from lit_rlhf.reward_models import load_exported

            model, tokenizer = load_exported(where, device, dtype)
        else:
            model = models.load_causal_lm(models.ModelSpec(name=source, dtype=dtype, lora=None))
            tokenizer = models.load_tokenizer(source)
    model = model.to(device).eval()
    model.requires_grad_(False)
    return LoadedModel(model, tokenizer, str(path) if run_dir is not None else name, run_dir, config, reward_model)
