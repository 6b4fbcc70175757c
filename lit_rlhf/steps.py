"""Process supervision (DeepSeekMath, Shao et al. 2024, §4.1.3): completions split into steps, one reward per step.

- :func:`split_steps` gives the character spans of a completion's steps: ``worked`` (the built-in arithmetic task's
  worked answers, :func:`lit_rlhf.data.tasks.worked_answer`: a step starts at "Ones:", "Tens:", "Hundreds:" or
  "The answer is"), ``newline`` (one step per non-blank line), ``none`` (the whole completion is one step), ``auto``
  (worked when a worked step marker occurs, else newline), or any other string: a regular expression matching the
  separators. A span excludes the whitespace around its step; text before the first marker belongs to the first
  step and text after the last separator to the last step; a blank completion is one empty step.
- A step reward function is ``fn(prompts, completions, steps, **columns) -> list[list[float | None]]``: one score per
  step (``steps[i]`` are the step texts of completion i; ``None`` or NaN: that step is unscored), registered in
  :data:`STEP_REWARDS` by :func:`register_step_reward` or named by import path ``package.module:function``; dataset
  columns are passed as for outcome rewards (:mod:`lit_rlhf.rewards`). Built-in: :func:`arithmetic_steps`, the rule
  step verifier of the worked format.
- :class:`ProcessRewardComposer` (GRPO ``advantage_estimator=process``): the outcome rewards of
  :class:`lit_rlhf.rewards.RewardComposer` (logged, validation, group filtering) plus the weighted sum of the step
  rewards, stored as ``per_function["process"]`` [N, max_steps] (NaN: no step there or unscored), so the stage's
  group filtering, which indexes every ``per_function`` tensor by row, keeps them with their completions.
- :func:`step_token_ends` maps step spans to the response token holding each step's last character (the last step:
  the completion's last token, EOS included), giving the ``step_ends`` / ``step_rewards`` [N, R] of
  :func:`lit_rlhf.advantages.process_supervision_advantages`; :func:`process_advantages` calls it, leaving groups
  with fewer than 2 scored steps at advantage 0.
"""

from __future__ import annotations

import bisect
import functools
import importlib
import inspect
import math
import re
from collections.abc import Callable, Sequence

import torch

from lit_rlhf.advantages import process_supervision_advantages
from lit_rlhf.rewards import (
    DEFAULT_REWARDS,
    RewardComposer,
    RewardResult,
    RewardSpec,
    check_reward_weights,
    is_correct,
    resolve_reward,
)

StepRewardFn = Callable[..., Sequence[Sequence[float | None]]]
STEP_REWARDS: dict[str, StepRewardFn] = {}
PROCESS_KEY = "process"
"""``RewardResult.per_function`` key of the weighted step rewards [N, max_steps]."""
SPLITTERS = ("auto", "worked", "newline", "none")
Span = tuple[int, int]

_REGISTERED_IN = {"prm": "lit_rlhf.process_rewards"}
"""Step rewards registered by a module this one does not import (it imports this one)."""
_WORKED_MARK = re.compile(r"\b(?:Ones:|Tens:|Hundreds:|The answer is\b)")
_PROBLEM = re.compile(r"What is (\d+) ([+-]) (\d+)\?")


def register_step_reward(name: str) -> Callable[[StepRewardFn], StepRewardFn]:
    """Decorator adding ``fn`` to :data:`STEP_REWARDS` under ``name``."""

    def decorator(fn: StepRewardFn) -> StepRewardFn:
        old = STEP_REWARDS.get(name)
        if old is not None and (old.__module__, old.__qualname__) != (fn.__module__, fn.__qualname__):
            raise ValueError(f"step reward name {name!r} is already registered to {old.__module__}.{old.__qualname__}")
        STEP_REWARDS[name] = fn
        return fn

    return decorator


def resolve_step_reward(name: str) -> StepRewardFn:
    """Registry entry ``name`` (built-ins registered in other modules are imported first: ``prm``,
    :mod:`lit_rlhf.process_rewards`), else the callable at import path ``pkg.module:function``."""
    if name not in STEP_REWARDS and name in _REGISTERED_IN:
        importlib.import_module(_REGISTERED_IN[name])
    if name in STEP_REWARDS:
        return STEP_REWARDS[name]
    if ":" in name or "." in name:
        return resolve_reward(name)
    raise ValueError(
        f"unknown step reward {name!r}. Registered names: {sorted(STEP_REWARDS)}. Any callable "
        "fn(prompts, completions, steps, **columns) -> list[list[float | None]] can be named by its import path, "
        "'package.module:function'."
    )


# ------------------------------------------------------------------------------------------------ splitting
def split_steps(completion: str, splitter: str = "auto") -> list[Span]:
    """Character spans ``(start, end)`` of the completion's steps, in order (module doc); at least one."""
    if splitter == "auto":
        splitter = "worked" if _WORKED_MARK.search(completion) else "newline"
    if splitter == "worked":
        cuts = [(m.start(), m.start()) for m in _WORKED_MARK.finditer(completion)][1:]  # leading text: first step
    elif splitter == "newline":
        cuts = [(m.start(), m.end()) for m in re.finditer(r"\n", completion)]
    elif splitter == "none":
        cuts = []
    else:
        cuts = [(m.start(), m.end()) for m in re.finditer(splitter, completion) if m.end() > m.start()]
    bounds = [0] + [x for cut in cuts for x in cut] + [len(completion)]
    spans = []
    for start, end in zip(bounds[::2], bounds[1::2]):
        piece = completion[start:end]
        if piece.strip():
            lead = len(piece) - len(piece.lstrip())
            spans.append((start + lead, start + len(piece.rstrip())))
    return spans or [(0, len(completion))]


def cap_steps(spans: list[Span], max_steps: int) -> list[Span]:
    """At most ``max_steps`` spans: the steps from the ``max_steps``-th on are merged into one last step."""
    if len(spans) <= max_steps:
        return spans
    return spans[: max_steps - 1] + [(spans[max_steps - 1][0], spans[-1][1])]


# ------------------------------------------------------------------------------------------------ rule step verifier
def _normal(step: str) -> str:
    return re.sub(r"\s+", "", step).rstrip(".")


def _step_kind(step: str) -> str | None:
    m = _WORKED_MARK.match(step.strip())
    return m.group(0) if m else None


def worked_step_checks(prompt: str, steps: list[str], answer=None) -> list[float | None]:
    """Scores of one completion's worked steps against the problem "What is A op B?" in ``prompt`` (its last one):
    a "Ones:"/"Tens:" step is 1.0 when it states that place's fact exactly as the worked format does (operands,
    result, carry or borrow; whitespace and final periods aside), an answer step ("The answer is N") when its number
    equals ``answer`` (default A op B; :func:`lit_rlhf.rewards.is_correct`); a step of no known kind, or a kind
    already seen in the completion, is 0.0. All None when the prompt holds no such problem."""
    from lit_rlhf.data.tasks import worked_answer

    found = _PROBLEM.findall(prompt)
    if not found:
        return [None] * len(steps)
    a, op, b = int(found[-1][0]), found[-1][1], int(found[-1][2])
    try:
        reference = worked_answer(a, op, b)
    except ValueError:
        return [None] * len(steps)
    expected = {_step_kind(reference[s:e]): _normal(reference[s:e]) for s, e in split_steps(reference, "worked")}
    target = (a + b if op == "+" else a - b) if answer is None else answer
    scores, seen = [], set()
    for step in steps:
        kind = _step_kind(step)
        if kind is None or kind in seen:
            scores.append(0.0)
        elif kind == "The answer is":
            scores.append(float(bool(is_correct(step, target))))
        else:
            scores.append(float(_normal(step) == expected.get(kind)))
        seen.add(kind)
    return scores


@register_step_reward("arithmetic_steps")
def arithmetic_steps(
    prompts: list[str], completions: list[str], steps: list[list[str]], answer: list | None = None
) -> list[list[float | None]]:
    """Rule step verifier of the built-in arithmetic task's worked answers (:func:`worked_step_checks`): 1.0 for a
    correct step, 0.0 for a wrong one (wrong sum, wrong carry or borrow, wrong final answer, unknown step)."""
    answers = answer if answer is not None else [None] * len(prompts)
    return [worked_step_checks(p, s, a) for p, s, a in zip(prompts, steps, answers, strict=True)]


# ------------------------------------------------------------------------------------------------ composition
def _columns_for(name: str, fn: StepRewardFn, bound: dict, columns: dict[str, list]) -> dict[str, list]:
    """The dataset columns ``fn`` accepts after (prompts, completions, steps) and not bound in its kwargs."""
    unbound = {k: v for k, v in columns.items() if k not in bound}
    try:
        params = list(inspect.signature(fn).parameters.values())[3:]
    except (TypeError, ValueError):
        return unbound
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return unbound
    params = [p for p in params if p.name not in bound and p.kind is not inspect.Parameter.VAR_POSITIONAL]
    missing = [p.name for p in params if p.default is inspect.Parameter.empty and p.name not in columns]
    if missing:
        raise ValueError(f"step reward {name!r} needs {missing}: not dataset columns ({sorted(columns)}) nor kwargs")
    return {k: v for k, v in unbound.items() if k in {p.name for p in params}}


def _step_values(name: str, out, steps: list[list[str]]) -> list[list[float]]:
    """A step reward function's output checked (one finite number or None per step) and as floats, NaN for None."""
    if not hasattr(out, "__len__") or len(out) != len(steps):
        raise ValueError(f"step reward {name!r} must return one list per completion ({len(steps)})")
    values = []
    for i, (row, row_steps) in enumerate(zip(out, steps)):
        if not hasattr(row, "__len__") or len(row) != len(row_steps):
            raise ValueError(f"step reward {name!r} returned {row!r} for completion {i} of {len(row_steps)} steps")
        floats = [math.nan if v is None else float(v) for v in row]
        if any(math.isinf(v) for v in floats):
            raise ValueError(f"step reward {name!r} returned an infinite score for completion {i}: {row!r}")
        values.append(floats)
    return values


class ProcessRewardComposer(RewardComposer):
    """Outcome rewards (``specs``, as :class:`RewardComposer`) plus the weighted step rewards (``step_specs``) of each
    completion as ``per_function["process"]`` [N, ``max_steps``]: per step, the sum of ``weight * score`` over the
    functions that scored it, NaN where none did or where the completion has no such step."""

    def __init__(
        self, specs: Sequence[RewardSpec], step_specs: Sequence[RewardSpec], splitter: str = "auto", max_steps: int = 64
    ) -> None:
        super().__init__(specs)
        if PROCESS_KEY in (s.name for s in self.specs):
            raise ValueError(f"an outcome reward named {PROCESS_KEY!r} would clash with the step rewards' entry")
        if not step_specs:
            raise ValueError("ProcessRewardComposer needs at least one step reward")
        check_reward_weights([s.weight for s in step_specs], "model.process_rewards")
        if max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        if splitter not in SPLITTERS:
            try:
                re.compile(splitter)
            except re.error as err:
                raise ValueError(f"step_splitter={splitter!r}: not one of {SPLITTERS} nor a regex ({err})") from err
        self.step_specs, self.splitter, self.max_steps = list(step_specs), splitter, max_steps
        self.step_fns = [functools.partial(resolve_step_reward(s.name), **s.kwargs) for s in self.step_specs]

    def spans(self, completion: str) -> list[Span]:
        """The completion's step spans (:func:`split_steps`, capped at ``max_steps``)."""
        return cap_steps(split_steps(completion, self.splitter), self.max_steps)

    def __call__(self, prompts: list[str], completions: list[str], columns: dict | None = None) -> RewardResult:
        result, columns = super().__call__(prompts, completions, columns), columns or {}
        steps = [[c[s:e] for s, e in self.spans(c)] for c in completions]
        total = torch.full((len(completions), self.max_steps), math.nan)
        for spec, fn in zip(self.step_specs, self.step_fns):
            cols = _columns_for(spec.name, fn, spec.kwargs, columns)
            values = _step_values(spec.name, fn(prompts, completions, steps, **cols), steps)
            for i, row in enumerate(values):
                v = torch.tensor(row, dtype=torch.float32)
                prior = total[i, : len(row)]
                weighted = torch.where(torch.isnan(prior), 0.0, prior) + spec.weight * torch.nan_to_num(v, nan=0.0)
                total[i, : len(row)] = torch.where(torch.isnan(prior) & torch.isnan(v), math.nan, weighted)
        result.per_function[PROCESS_KEY] = total
        return result

    def step_tensors(self, tokenizer, rollout, scores: RewardResult) -> tuple[torch.Tensor, torch.Tensor]:
        """``(step_ends, step_rewards)`` [N, R] of a rollout from its scores (:func:`step_token_ends`)."""
        spans = [self.spans(c) for c in rollout.completions]
        values = scores.per_function[PROCESS_KEY]
        return step_token_ends(tokenizer, rollout.response_ids, rollout.response_mask, spans, values)


def grpo_rewards(
    rewards: Sequence[RewardSpec] | None,
    process_rewards: Sequence[RewardSpec] | None,
    splitter: str,
    advantage_estimator: str,
    sampling,
) -> RewardComposer:
    """The GRPO stage's reward composer: outcome rewards (``None``: :data:`lit_rlhf.rewards.DEFAULT_REWARDS`), plus
    step rewards with ``advantage_estimator=process`` (``process_rewards`` None: :func:`arithmetic_steps`; the outcome
    rewards are then logged, filter the groups and score validation); step rewards with another estimator are
    refused. ``sampling`` (:class:`lit_rlhf.rollout.SamplingSettings`): its token budget bounds the steps (>= 1 token
    each), the width of the step-reward tensor."""
    rewards = DEFAULT_REWARDS if rewards is None else rewards
    if advantage_estimator != "process":
        if process_rewards:
            raise ValueError(
                f"model.process_rewards is set but model.advantage_estimator={advantage_estimator}: step rewards "
                "are used only by advantage_estimator=process"
            )
        return RewardComposer(rewards)
    step_specs = [RewardSpec("arithmetic_steps")] if process_rewards is None else process_rewards
    return ProcessRewardComposer(rewards, step_specs, splitter, sampling.max_new_tokens)


def step_tensors(composer: RewardComposer, tokenizer, rollout, scores: RewardResult):
    """``(step_ends, step_rewards)`` [N, R] of a rollout when ``composer`` scores steps, else None."""
    if not isinstance(composer, ProcessRewardComposer):
        return None
    return composer.step_tensors(tokenizer, rollout, scores)


# ------------------------------------------------------------------------------------------------ token mapping
def prefix_lengths(tokenizer, ids: list[int]) -> list[int]:
    """Characters of the text decoded from ``ids[:k + 1]`` for each k (as :func:`lit_rlhf.rollout.decode`:
    special tokens skipped), made non-decreasing."""
    texts = tokenizer.batch_decode([ids[: k + 1] for k in range(len(ids))], skip_special_tokens=True)
    lengths, longest = [], 0
    for text in texts:
        longest = max(longest, len(text))
        lengths.append(longest)
    return lengths


def step_token_ends(
    tokenizer,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    spans: list[list[Span]],
    scores: torch.Tensor | Sequence[Sequence[float | None]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(step_ends [N, R] bool, step_rewards [N, R] float32)`` on the device of ``response_ids``.

    ``spans[i]`` are completion i's step spans in its decoded text, ``scores[i][k]`` step k's reward (None/NaN:
    unscored, not marked, so its tokens take the advantage of the steps after it). A step ends on the response token
    holding its last character; the last step on the row's last response token (EOS included). Two scored steps
    ending on one token count once, with the smaller reward.
    """
    n, r = response_ids.shape
    ends, rewards = torch.zeros(n, r, dtype=torch.bool), torch.zeros(n, r, dtype=torch.float32)
    for i in range(n):
        positions = response_mask[i].nonzero().squeeze(-1).tolist()
        if not positions or not spans[i]:
            continue
        cuts = prefix_lengths(tokenizer, response_ids[i, positions].tolist())
        for k, (_, end) in enumerate(spans[i]):
            value = scores[i][k]
            value = math.nan if value is None else float(value)
            if math.isnan(value):
                continue
            last = k == len(spans[i]) - 1
            t = positions[-1] if last else positions[min(bisect.bisect_left(cuts, end), len(positions) - 1)]
            rewards[i, t] = min(rewards[i, t].item(), value) if ends[i, t] else value
            ends[i, t] = True
    return ends.to(response_ids.device), rewards.to(response_ids.device)


def process_advantages(
    step_rewards: torch.Tensor, step_ends: torch.Tensor, mask: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-token advantages [N, R] (:func:`lit_rlhf.advantages.process_supervision_advantages`) and metrics; groups
    with fewer than 2 scored steps (no std) get 0. ``steps/per_completion``: scored steps per completion."""
    ends, n = step_ends.bool() & mask.bool(), step_ends.shape[0]
    stats = {"steps/per_completion": float(ends.sum(-1).float().mean()) if n else 0.0}
    groups = ends.view(-1, group_size * ends.shape[-1]).sum(-1) >= 2
    rows = groups.repeat_interleave(group_size)
    out = torch.zeros(step_rewards.shape, dtype=torch.float32, device=step_rewards.device)
    if rows.any():
        values = process_supervision_advantages(step_rewards[rows], ends[rows], mask[rows], group_size)
        out[rows] = values.to(out.dtype)
    return out, stats
