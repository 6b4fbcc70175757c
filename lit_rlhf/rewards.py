"""Reward functions for GRPO/PPO: a registry of rule-based verifiers, model-based scoring, and a weighted composer.

A reward function is a plain callable ``fn(prompts, completions, **columns) -> list[float | None]``: ``columns`` are
the dataset's extra columns (e.g. ``answer=[72, 12, ...]``), each aligned with ``completions``. ``None`` (or NaN)
means "no reward from this function for this sample": it is left out of that function's statistics and of the
weighted total, which sums the functions that did score the sample; a sample no function scored has total NaN ("no
reward", :attr:`RewardResult.scored` False), which the stages leave out of every statistic and give advantage 0.
``±inf`` is an error (:class:`RewardFunctionError`, naming the function and the sample).

Built-ins: the GRPO/GSM8K rule set (answer correctness, integer answer, strict/soft format, XML tag count; DeepSeek-R1
style, Guo et al. 2025 §2.2.2), DAPO's soft overlong penalty (Yu et al. 2025, §3.4) and a sequence-classification
reward model. Functions are picked by name in YAML through :class:`RewardSpec`: a registry key or an import path
``package.module:function``. :data:`DEFAULT_REWARDS` is the rule set GRPO and PPO use when none is configured.

This module holds THE answer verifier (:func:`is_correct`, :func:`grade`, :func:`answer_value`; the rule is written
out above them): the correctness rewards, every stage's ``val/accuracy``, and the data modules (answer columns are
normalised by :func:`answer_value`; this module imports no data module, so no import circle forms).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
import numbers
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

RewardFn = Callable[..., Sequence[float | None]]
REWARD_FUNCTIONS: dict[str, RewardFn] = {}


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator adding ``fn`` to :data:`REWARD_FUNCTIONS` under ``name``."""

    def decorator(fn: RewardFn) -> RewardFn:
        old = REWARD_FUNCTIONS.get(name)
        if old is not None and (old.__module__, old.__qualname__) != (fn.__module__, fn.__qualname__):
            raise ValueError(f"reward name {name!r} is already registered to {old.__module__}.{old.__qualname__}")
        REWARD_FUNCTIONS[name] = fn
        return fn

    return decorator


# ---------------------------------------------------------------------------------------------- the verifier
# The one answer verifier of the package (reward functions, every stage's val/accuracy, the built-in tasks):
#   prediction: the text of the completion's last <answer> tag when it has one, else the whole completion; its LAST
#               number (parse_number: a minus sign not after a word or a closing bracket, so "x-3" is 3 and "5-3"
#               is 3; thousands commas only in groups of three, so "1,234.5" is 1234.5; decimals; "72." is 72);
#   reference:  a number as it is; a string by the text after its last "####" (GSM8K "... #### 72") when it has
#               one, else the whole string, read by the same parse_number; anything else has no value (None);
#   correct:    |prediction - reference| <= max(tolerance, rel_tolerance * |reference|), exact with the defaults 0;
#               ungraded (None) when the reference has no value.
_NUMBER_RE = re.compile(r"(?:(?<![\w)\]])-)?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")
_INTEGER_LITERAL_RE = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)")
_INT_TOKEN_RE = re.compile(r"-?\d+")


def extract_xml_answer(text: str) -> str | None:
    """Stripped text after the last ``<answer>`` (up to ``</answer>`` if present); None without an ``<answer>`` tag."""
    start = text.rfind("<answer>")
    if start < 0:
        return None
    return text[start + len("<answer>") :].split("</answer>")[0].strip()


def extract_hash_answer(text: str) -> str | None:
    """GSM8K reference answer: the text after the last ``####`` ("... #### 72" -> "72"); None without ``####``."""
    return text.rpartition("####")[2].strip() if "####" in text else None


def parse_number(text: str) -> float | None:
    """The last number in ``text`` ("-1,234.5", "72"), as a float; None when there is none."""
    matches = _NUMBER_RE.findall(text)
    return float(matches[-1].replace(",", "")) if matches else None


def predicted_value(completion: str) -> float | None:
    """The completion's answer: the last number of its last ``<answer>`` tag, else of the whole text; or None."""
    tagged = extract_xml_answer(completion)
    return parse_number(tagged if tagged is not None else completion)


def answer_value(answer: Any) -> int | float | None:
    """A reference answer as a number (int when integral): numbers (0-d tensors too) as they are; strings by their
    GSM8K final answer ("... #### 1,234" -> 1234) or else their last number ("72" -> 72); None otherwise."""
    if isinstance(answer, torch.Tensor) and answer.numel() == 1:
        answer = answer.item()
    if answer is None or isinstance(answer, bool):
        return None
    if isinstance(answer, numbers.Number):
        return int(answer) if isinstance(answer, numbers.Integral) else float(answer)  # type: ignore[arg-type]
    if not isinstance(answer, str):
        return None
    hashed = extract_hash_answer(answer)
    value = parse_number(hashed if hashed is not None else answer)
    return None if value is None else int(value) if value.is_integer() else value


def is_correct(completion: str, answer: Any, tolerance: float = 0.0, rel_tolerance: float = 0.0) -> bool | None:
    """Whether the completion's :func:`predicted_value` is within ``max(tolerance, rel_tolerance * |answer|)`` of
    :func:`answer_value` (exact by default); None when the reference has no numeric value (ungraded)."""
    target = answer_value(answer)
    if target is None:
        return None
    pred = predicted_value(completion)
    return pred is not None and abs(pred - target) <= max(tolerance, rel_tolerance * abs(target))


def grade(completions: Sequence[str], answers: Sequence[Any]) -> list[bool]:
    """:func:`is_correct` of each (completion, answer) pair whose answer has a value; ungraded pairs are left out.
    ``sum(grade(...)) / len(grade(...))`` is the accuracy (``val/accuracy`` of the stages)."""
    graded = (is_correct(c, a) for c, a in zip(completions, answers, strict=True))
    return [g for g in graded if g is not None]


# --------------------------------------------------------------------------------------------- rule-based rewards
@register_reward("numeric_correctness")
def numeric_correctness(prompts: list[str], completions: list[str], answer: list) -> list[float | None]:
    """1.0 if the predicted number equals ``answer`` exactly, else 0.0; None when the answer is not numeric."""
    return numeric_tolerance(prompts, completions, answer, tolerance=0.0, rel_tolerance=0.0)


@register_reward("numeric_tolerance")
def numeric_tolerance(
    prompts: list[str], completions: list[str], answer: list, tolerance: float = 1e-6, rel_tolerance: float = 0.0
) -> list[float | None]:
    """1.0 if ``|pred - answer| <= max(tolerance, rel_tolerance * |answer|)``, else 0.0; None if answer not numeric.

    ``pred`` is the number inside ``<answer>…</answer>`` when the completion has that tag, else its last number
    (:func:`is_correct`).
    """
    graded = (is_correct(c, a, tolerance, rel_tolerance) for c, a in zip(completions, answer))
    return [None if ok is None else float(ok) for ok in graded]


@register_reward("numeric_closeness")
def numeric_closeness(
    prompts: list[str], completions: list[str], answer: list, scale: float = 10.0
) -> list[float | None]:
    """Shaped credit ``exp(-|pred - answer| / scale)`` (1.0 when exact), 0.0 without a number, None when the answer
    is not numeric; ``pred`` is read as in :func:`is_correct`. Near misses score above far ones, so a group
    has reward variance (a learning signal) long before any completion is exactly right."""
    if scale <= 0:
        raise ValueError(f"numeric_closeness: scale must be > 0, got {scale}")
    out: list[float | None] = []
    for completion, ref in zip(completions, answer):
        target, pred = answer_value(ref), predicted_value(completion)
        out.append(None if target is None else 0.0 if pred is None else math.exp(-abs(pred - target) / scale))
    return out


@register_reward("integer_answer")
def integer_answer(prompts: list[str], completions: list[str]) -> list[float | None]:
    """0.5 if the answer (``<answer>`` content, else the whole stripped completion) is an integer literal, else 0.0."""
    out: list[float | None] = []
    for completion in completions:
        tagged = extract_xml_answer(completion)
        text = tagged if tagged is not None else completion.strip()
        out.append(0.5 if _INTEGER_LITERAL_RE.fullmatch(text) else 0.0)
    return out


_STRICT_FORMAT = re.compile(r"<reasoning>\n.*?\n</reasoning>\n<answer>\n.*?\n</answer>\n?", re.DOTALL)
_SOFT_FORMAT = re.compile(r"<reasoning>.*?</reasoning>\s*<answer>.*?</answer>", re.DOTALL)


@register_reward("strict_format")
def strict_format(prompts: list[str], completions: list[str]) -> list[float | None]:
    """0.5 if the completion is exactly ``<reasoning>\\n…\\n</reasoning>\\n<answer>\\n…\\n</answer>[\\n]``."""
    return [0.5 if _STRICT_FORMAT.fullmatch(c) else 0.0 for c in completions]


@register_reward("soft_format")
def soft_format(prompts: list[str], completions: list[str]) -> list[float | None]:
    """0.5 if a ``<reasoning>…</reasoning>`` block followed by ``<answer>…</answer>`` appears anywhere, else 0.0."""
    return [0.5 if _SOFT_FORMAT.search(c) else 0.0 for c in completions]


def count_xml(text: str) -> float:
    """+0.125 per tag seen exactly once with its newlines, minus 0.001 per character after ``\\n</answer>[\\n]``.

    Differs from the usual GSM8K-demo ``count_xml`` in one place: the trailing-text penalty is applied once, to the text
    after the closing tag only (the demo also charges the whole length when ``</answer>`` ends the text).
    """
    score = 0.0
    for tag in ("<reasoning>\n", "\n</reasoning>\n", "\n<answer>\n"):
        score += 0.125 if text.count(tag) == 1 else 0.0
    if text.count("\n</answer>") == 1:
        trailing = text.split("\n</answer>")[1]
        trailing = trailing[1:] if trailing.startswith("\n") else trailing
        score += 0.125 - 0.001 * len(trailing)
    return score


@register_reward("xml_count")
def xml_count(prompts: list[str], completions: list[str]) -> list[float | None]:
    """Partial credit for the reasoning/answer XML tags, see :func:`count_xml` (0 to 0.5)."""
    return [count_xml(c) for c in completions]


@register_reward("length_penalty")
def length_penalty(
    prompts: list[str], completions: list[str], max_length: int = 512, buffer: int = 128
) -> list[float | None]:
    """DAPO overlong penalty on the length in characters: 0 up to ``max_length - buffer``, linear to -1 at
    ``max_length``, -1 beyond."""
    out: list[float | None] = []
    for completion in completions:
        n, free = len(completion), max_length - buffer
        out.append(0.0 if n <= free else -1.0 if n >= max_length else (free - n) / buffer)
    return out


@register_reward("answer_in_text")
def answer_in_text(prompts: list[str], completions: list[str], answer: list) -> list[float | None]:
    """1.0 if the integer ``answer`` appears in the completion as a whole number, else 0.0 (the benchmark's rule).

    Whole numbers are the ``-?\\d+`` runs of the text with commas removed ("1,234" is 1234, "172" does not
    contain 72, "5-3" contains -3 but not 3). None when the answer is not an integer.
    """
    out: list[float | None] = []
    for completion, ref in zip(completions, answer):
        target = answer_value(ref)
        if target is None or not float(target).is_integer():
            out.append(None)
            continue
        found = {int(t) for t in _INT_TOKEN_RE.findall(completion.replace(",", ""))}
        out.append(1.0 if int(target) in found else 0.0)
    return out


# ---------------------------------------------------------------------------------------------- model-based reward
_REWARD_MODELS: dict[tuple[str, str], tuple[Any, Any]] = {}
"""(model, tokenizer) of each reward model :func:`model_reward` has loaded, per (path, device)."""


def scoring_texts(prompts: list[str], completions: list[str], finished: list[bool], suffix: str) -> list[str]:
    """Reward-model input texts: ``prompt + completion``, plus the end-of-turn ``suffix`` (the policy template's,
    :func:`lit_rlhf.models.turn_suffix`) where the completion ended with EOS (decoding dropped that token)."""
    return [p + c + (suffix if f else "") for p, c, f in zip(prompts, completions, finished, strict=True)]


@register_reward("model_reward")
def model_reward(
    prompts: list[str],
    completions: list[str],
    path: str,
    batch_size: int = 16,
    max_length: int = 512,
    device: str | None = None,
    label_index: int = 0,
    truncation_side: str = "right",
) -> list[float | None]:
    """Logit ``label_index`` of the reward model at ``path`` (:class:`lit_rlhf.reward_models.RewardScorer`) on
    ``prompt + completion``, cut to ``max_length`` tokens at the ``right`` end (``left``: keeps the completion).

    ``device`` defaults to CUDA when available. The model is loaded on first use and cached per (path, device).
    """
    from lit_rlhf.reward_models import RewardScorer, load_exported

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if (path, device) not in _REWARD_MODELS:
        _REWARD_MODELS[(path, device)] = load_exported(path, device)
    model, tokenizer = _REWARD_MODELS[(path, device)]
    scorer = RewardScorer(model, tokenizer, label_index, batch_size, max_length, truncation_side)
    return scorer.score_texts(scoring_texts(prompts, completions, [False] * len(prompts), "")).tolist()


# ------------------------------------------------------------------------------------------------ resolution
def resolve_reward(name: str) -> RewardFn:
    """Registry entry ``name``, else the callable at import path ``pkg.module:function`` or ``pkg.module.function``."""
    if name in REWARD_FUNCTIONS:
        return REWARD_FUNCTIONS[name]
    module_name, sep, attr = name.partition(":") if ":" in name else name.rpartition(".")
    if sep and module_name and attr:
        try:
            obj: Any = importlib.import_module(module_name)
            for part in attr.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"cannot import reward function {name!r}: {err}") from err
        if not callable(obj):
            raise ValueError(f"reward {name!r} resolved to a non-callable {type(obj).__name__}")
        return obj
    raise ValueError(
        f"unknown reward function {name!r}. Registered names: {sorted(REWARD_FUNCTIONS)}. "
        "Any other callable fn(prompts, completions, **columns) -> list[float | None] can be named by its import "
        "path, 'package.module:function' or 'package.module.function'."
    )


# ------------------------------------------------------------------------------------------------ composition
@dataclass
class RewardSpec:
    """One term of the total reward.

    name: registry key or import path ``package.module:function``.
    weight: multiplier of this term in the total.
    kwargs: keyword arguments bound to the function (e.g. ``{"tolerance": 0.01}``, ``{"path": "out/rm"}``).
    """

    name: str
    weight: float = 1.0
    kwargs: dict[str, Any] = field(default_factory=dict)


DEFAULT_REWARDS = (RewardSpec("numeric_correctness", 1.0), RewardSpec("numeric_closeness", 0.5))
"""GRPO's and PPO's reward when none is configured: 1 when the completion's answer equals the reference
(:func:`is_correct`), plus 0.5 x ``numeric_closeness`` = ``exp(-|pred - answer| / 10)``, partial credit for a close
answer, so rewards vary (within a group, and across a PPO batch) before any answer is exactly right."""


class RewardFunctionError(RuntimeError):
    """A reward function raised or returned ±inf; the message names the function and the failing sample."""


def reward_stats(total: torch.Tensor) -> dict[str, float]:
    """``rewards/{mean,std,min,max}`` (std: population) over the rewards of ``total`` [N] that are not NaN (NaN: no
    reward; NaN statistics when there is none) and ``rewards/missing_frac``, the fraction of NaN."""
    scored, n = total[~torch.isnan(total)].float(), max(total.numel(), 1)
    if not scored.numel():
        nan = math.nan
        return {"rewards/mean": nan, "rewards/std": nan, "rewards/min": nan, "rewards/max": nan,
                "rewards/missing_frac": float(total.numel() > 0)}  # fmt: skip
    return {
        "rewards/mean": scored.mean().item(), "rewards/std": scored.std(correction=0).item(),
        "rewards/min": scored.min().item(), "rewards/max": scored.max().item(),
        "rewards/missing_frac": (total.numel() - scored.numel()) / n,
    }  # fmt: skip


def scored_mean(total: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(mean of the rewards of ``total`` that are not NaN, 0 when none; their number): a mean weighted by the second
    over batches is the mean over every scored sample (e.g. ``val/rewards/mean``)."""
    scored = ~torch.isnan(total)
    count = int(scored.sum())
    return torch.where(scored, total, 0.0).sum() / max(count, 1), count


def validation_means(
    total: torch.Tensor, completions: list[str], answers: Sequence | None, prefix: str = "val/"
) -> list[tuple[dict[str, torch.Tensor | float], int]]:
    """``[(means, weight)]`` of a held-out batch, each mean to be averaged over the batches with its weight:
    ``rewards/mean`` over the completions that got a reward (``total`` [N], NaN: none; :func:`scored_mean`) and
    ``accuracy``, the verifier's fraction of right answers over the graded completions (:func:`grade`; ``answers``
    aligned with ``completions``, None: not graded). Keys start with ``prefix``; means of weight 0 are left out."""
    reward, scored = scored_mean(total)
    graded = grade(completions, answers) if answers is not None else []
    out = [({"rewards/mean": reward}, scored), ({"accuracy": sum(graded) / max(len(graded), 1)}, len(graded))]
    return [({prefix + k: v for k, v in means.items()}, weight) for means, weight in out if weight > 0]


def add_rewards(base: torch.Tensor | None, total: torch.Tensor) -> torch.Tensor:
    """``base + total`` where ``total`` has a reward, ``base`` where it is NaN (no reward); ``total`` without a base.
    Sums a reward model's scores (``base``) and a :class:`RewardComposer` total (PPO)."""
    return total.clone() if base is None else base + torch.nan_to_num(total.to(base.dtype), nan=0.0)


@dataclass
class RewardResult:
    """total: [N] float32, the sum of ``weight * value`` over the functions that scored each sample, NaN where none
    did. per_function: name -> [N] float32 values, NaN where the function gave no reward (None or NaN)."""

    total: torch.Tensor
    per_function: dict[str, torch.Tensor]

    @property
    def scored(self) -> torch.Tensor:
        """Bool [N]: the samples that got a reward from at least one function."""
        return ~torch.isnan(self.total)

    def stats(self) -> dict[str, float]:
        """``rewards/{name}/mean|std`` over each function's rewards and :func:`reward_stats` of the total
        (``rewards/mean|std|min|max`` over the scored samples, ``rewards/missing_frac``)."""
        out: dict[str, float] = {}
        for name, values in self.per_function.items():
            valid = values[~torch.isnan(values)]
            out[f"rewards/{name}/mean"] = valid.mean().item() if valid.numel() else math.nan
            out[f"rewards/{name}/std"] = valid.std(correction=0).item() if valid.numel() else math.nan
        return {**out, **reward_stats(self.total)}


def _short(text: str, limit: int = 300) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "…")


class RewardComposer:
    """Weighted sum of reward functions; each receives only the dataset columns its signature accepts."""

    def __init__(self, specs: Sequence[RewardSpec]) -> None:
        if not specs:
            raise ValueError("RewardComposer needs at least one RewardSpec")
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate reward names {names}: wrap a variant in its own function to use it twice")
        bad = [f"{s.name}: {s.weight}" for s in specs if not math.isfinite(s.weight)]
        if bad:
            raise ValueError(f"reward weights must be finite numbers, got {bad}")
        self.specs = list(specs)
        self.fns = [functools.partial(resolve_reward(s.name), **s.kwargs) for s in self.specs]

    def check_weights(self, option: str) -> None:
        """:func:`check_reward_weights` of this composer's weights (``option``: the setting, named in the error)."""
        check_reward_weights([s.weight for s in self.specs], option)

    def _columns_for(self, spec: RewardSpec, fn: RewardFn, columns: dict[str, list]) -> dict[str, list]:
        unbound = {k: v for k, v in columns.items() if k not in spec.kwargs}
        try:
            params = list(inspect.signature(fn).parameters.values())[2:]  # after prompts, completions
        except (TypeError, ValueError):  # not introspectable: give it every column
            return unbound
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            return unbound
        params = [p for p in params if p.name not in spec.kwargs and p.kind is not inspect.Parameter.VAR_POSITIONAL]
        missing = [p.name for p in params if p.default is inspect.Parameter.empty and p.name not in columns]
        if missing:
            raise ValueError(
                f"reward {spec.name!r} needs {missing}, which are neither dataset columns ({sorted(columns)}) "
                "nor in its RewardSpec.kwargs"
            )
        return {k: v for k, v in unbound.items() if k in {p.name for p in params}}

    def _call(self, spec: RewardSpec, fn: RewardFn, prompts: list[str], completions: list[str], cols: dict) -> list:
        try:
            values = fn(prompts, completions, **cols)
        except Exception as batch_err:
            for i in range(len(completions)):
                try:
                    fn(prompts[i : i + 1], completions[i : i + 1], **{k: v[i : i + 1] for k, v in cols.items()})
                except Exception as err:
                    raise RewardFunctionError(
                        f"reward function {spec.name!r} failed on sample {i} "
                        f"(prompt={_short(prompts[i])}, completion={_short(completions[i])}): "
                        f"{type(err).__name__}: {err}"
                    ) from err
            raise RewardFunctionError(
                f"reward function {spec.name!r} failed on the batch of {len(completions)} but on no single sample: "
                f"{type(batch_err).__name__}: {batch_err}"
            ) from batch_err
        if not hasattr(values, "__len__") or len(values) != len(completions):
            got = f"{len(values)} values" if hasattr(values, "__len__") else type(values).__name__
            raise ValueError(f"reward function {spec.name!r} returned {got} for {len(completions)} completions")
        try:
            out = [math.nan if v is None else float(v) for v in values]
        except (TypeError, ValueError) as err:
            raise ValueError(f"reward function {spec.name!r} returned a non-numeric value: {err}") from err
        for i, v in enumerate(out):
            if math.isinf(v):
                raise RewardFunctionError(
                    f"reward function {spec.name!r} returned {v} for sample {i} (prompt={_short(prompts[i])}, "
                    f"completion={_short(completions[i])}): rewards must be finite; return None (or NaN) for "
                    "'no reward for this sample'"
                )
        return out

    def __call__(self, prompts: list[str], completions: list[str], columns: dict | None = None) -> RewardResult:
        """Score N completions. ``columns``: dataset columns, each a list of length N."""
        columns = columns or {}
        n = len(completions)
        for key, col in {"prompts": prompts, **columns}.items():
            if len(col) != n:
                raise ValueError(f"{key!r} has {len(col)} entries for {n} completions")
        total, scored = torch.zeros(n, dtype=torch.float32), torch.zeros(n, dtype=torch.bool)
        per_function: dict[str, torch.Tensor] = {}
        for spec, fn in zip(self.specs, self.fns):
            values = torch.tensor(
                self._call(spec, fn, prompts, completions, self._columns_for(spec, fn, columns)), dtype=torch.float32
            ).reshape(n)
            per_function[spec.name] = values
            total += spec.weight * torch.nan_to_num(values, nan=0.0)
            scored |= ~torch.isnan(values)
        return RewardResult(total=torch.where(scored, total, math.nan), per_function=per_function)


def check_reward_weights(weights: Sequence[float], option: str) -> None:
    """Refuse a reward whose every weight is 0 (the total is constant: nothing to learn); ``option`` names the
    setting in the error."""
    if weights and all(w == 0 for w in weights):
        raise ValueError(
            f"{option} cannot learn: every reward weight is 0 ({list(weights)}), so every completion gets the same "
            "reward and every advantage is 0. Give at least one reward a non-zero weight."
        )
