"""Reward functions for GRPO/PPO: a registry of rule-based verifiers, model-based scoring, and a weighted composer.

A reward function is a plain callable ``fn(prompts, completions, **columns) -> list[float | None]``: ``columns`` are
the dataset's extra columns (e.g. ``answer=[72, 12, ...]``), each aligned with ``completions``. ``None`` means "no
reward for this sample": it is left out of that function's statistics and adds 0 to the weighted total.

Built-ins: the GRPO/GSM8K rule set (answer correctness, integer answer, strict/soft format, XML tag count; DeepSeek-R1
style), DAPO's soft overlong penalty (Yu et al. 2025, §3.4) and a sequence-classification reward model. Functions are
picked by name in YAML through :class:`RewardSpec`: a registry key or an import path ``package.module:function``.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
import numbers
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

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


# ----------------------------------------------------------------------------------------------------- parsing
# A number: optional minus (not after a word character, so "x-3" gives 3), digits with optional thousands commas,
# optional decimals. "1,234.5" -> 1234.5; "72." -> 72.
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


def _answer_value(answer: Any) -> float | None:
    """Reference answer (int / float / numeric string / GSM8K "#### 72" / 0-d tensor) as a float, or None."""
    if answer is None or isinstance(answer, bool):
        return None
    if isinstance(answer, numbers.Number):
        return float(answer)  # type: ignore[arg-type]
    if isinstance(answer, torch.Tensor) and answer.numel() == 1:
        return float(answer.item())
    if isinstance(answer, str):
        hashed = extract_hash_answer(answer)
        return parse_number(hashed if hashed is not None else answer)
    return None


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

    ``pred`` is the number inside ``<answer>…</answer>`` when the completion has that tag, else its last number.
    """
    out: list[float | None] = []
    for completion, ref in zip(completions, answer):
        tagged = extract_xml_answer(completion)
        target, pred = _answer_value(ref), parse_number(tagged if tagged is not None else completion)
        if target is None:
            out.append(None)
        else:
            ok = pred is not None and abs(pred - target) <= max(tolerance, rel_tolerance * abs(target))
            out.append(1.0 if ok else 0.0)
    return out


@register_reward("numeric_closeness")
def numeric_closeness(prompts: list[str], completions: list[str], answer: list, scale: float = 10.0) -> list[float | None]:
    """Shaped credit ``exp(-|pred - answer| / scale)`` (1.0 when exact), 0.0 without a number, None when the answer
    is not numeric; ``pred`` is read as in :func:`numeric_tolerance`. Near misses score above far ones, so a group
    has reward variance (a learning signal) long before any completion is exactly right."""
    if scale <= 0:
        raise ValueError(f"numeric_closeness: scale must be > 0, got {scale}")
    out: list[float | None] = []
    for completion, ref in zip(completions, answer):
        tagged = extract_xml_answer(completion)
        target, pred = _answer_value(ref), parse_number(tagged if tagged is not None else completion)
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
        target = _answer_value(ref)
        if target is None or not float(target).is_integer():
            out.append(None)
            continue
        found = {int(t) for t in _INT_TOKEN_RE.findall(completion.replace(",", ""))}
        out.append(1.0 if int(target) in found else 0.0)
    return out


# ---------------------------------------------------------------------------------------------- model-based reward
_REWARD_MODELS: dict[tuple[str, str], tuple[Any, Any]] = {}


def _load_reward_model(path: str, device: str) -> tuple[Any, Any]:
    """(model, tokenizer) for an exported sequence-classification reward model, loaded once per (path, device)."""
    if (path, device) not in _REWARD_MODELS:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1).to(device).eval()
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        _REWARD_MODELS[(path, device)] = (model, tokenizer)
    return _REWARD_MODELS[(path, device)]


@register_reward("model_reward")
def model_reward(
    prompts: list[str],
    completions: list[str],
    path: str,
    batch_size: int = 16,
    max_length: int = 512,
    device: str | None = None,
) -> list[float | None]:
    """Scalar logit of the reward model at ``path`` on ``prompt + completion`` (truncated to ``max_length`` tokens).

    ``device`` defaults to CUDA when available. The model is loaded on first use and cached per (path, device).
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = _load_reward_model(path, device)
    texts = [p + c for p, c in zip(prompts, completions)]
    out: list[float | None] = []
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(
                texts[i : i + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
            ).to(device)
            out.extend(model(**enc).logits[:, 0].float().tolist())
    return out


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


class RewardFunctionError(RuntimeError):
    """A reward function raised; the message names the function and the failing sample."""


@dataclass
class RewardResult:
    """total: [N] float32, Σ weight * value (None counts 0). per_function: name -> [N] float32, NaN where None."""

    total: torch.Tensor
    per_function: dict[str, torch.Tensor]

    def stats(self) -> dict[str, float]:
        """``rewards/{name}/mean|std`` over non-None values, and ``rewards/mean|std|min|max`` of the total."""
        out: dict[str, float] = {}
        for name, values in self.per_function.items():
            valid = values[~torch.isnan(values)]
            out[f"rewards/{name}/mean"] = valid.mean().item() if valid.numel() else math.nan
            out[f"rewards/{name}/std"] = valid.std(correction=0).item() if valid.numel() else math.nan
        total = self.total
        out.update({"rewards/mean": total.mean().item(), "rewards/std": total.std(correction=0).item()})
        out.update({"rewards/min": total.min().item(), "rewards/max": total.max().item()})
        return out


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
        self.specs = list(specs)
        self.fns = [functools.partial(resolve_reward(s.name), **s.kwargs) for s in self.specs]

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
            return [math.nan if v is None else float(v) for v in values]
        except (TypeError, ValueError) as err:
            raise ValueError(f"reward function {spec.name!r} returned a non-numeric value: {err}") from err

    def __call__(self, prompts: list[str], completions: list[str], columns: dict | None = None) -> RewardResult:
        """Score N completions. ``columns``: dataset columns, each a list of length N."""
        columns = columns or {}
        n = len(completions)
        for key, col in {"prompts": prompts, **columns}.items():
            if len(col) != n:
                raise ValueError(f"{key!r} has {len(col)} entries for {n} completions")
        total = torch.zeros(n, dtype=torch.float32)
        per_function: dict[str, torch.Tensor] = {}
        for spec, fn in zip(self.specs, self.fns):
            values = torch.tensor(
                self._call(spec, fn, prompts, completions, self._columns_for(spec, fn, columns)), dtype=torch.float32
            ).reshape(n)
            per_function[spec.name] = values
            total += spec.weight * torch.nan_to_num(values, nan=0.0)
        return RewardResult(total=total, per_function=per_function)
