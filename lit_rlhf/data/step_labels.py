"""Step-labelled solutions for a process reward model (PRM; Lightman et al. 2023, "Let's Verify Step by Step",
PRM800K; Wang et al. 2024, Math-Shepherd): records ``{prompt, steps: [...], labels: [...]}``, one 0/1 label per step
(1 = the step is correct).

The reward model reads a solution as the completion ``step_separator.join(steps)`` (the worked arithmetic format
writes its sentences with a space between them: " "; PRM800K's steps are lines: "\\n"), rendered as an assistant
turn like every reward-model response (:mod:`lit_rlhf.data.render`), and its score head is read at each step's last
token: the token that holds the step's last non-space character (:func:`step_token_positions`). Scoring a sampled
completion (the ``prm`` step reward, :mod:`lit_rlhf.process_rewards`) finds its steps in the completion as written
(:func:`locate_steps`) and reads the same positions.

Built-in task ``arithmetic`` (:func:`arithmetic_step_labels`): the worked digit-by-digit answers of
:func:`lit_rlhf.data.tasks.worked_answer` ("Ones: 7 + 8 = 15, write 5 carry 1." / "Tens: 4 + 3 + 1 = 8." / "The
answer is 85.": three steps), with one step corrupted in a fraction of them (:data:`CORRUPTIONS`: a wrong ones
digit, a wrong tens digit, a dropped carry or borrow, a wrong final answer; later steps follow from the error).
Labels follow Lightman et al.'s convention: a solution is correct up to its first error, so the corrupted step and
every step after it are 0, the steps before it 1.
"""

from __future__ import annotations

import bisect
import math
import random
import re
from dataclasses import dataclass

import torch

from lit_rlhf.data import render
from lit_rlhf.data.collate import pad_left, pad_right
from lit_rlhf.data.sources import DataError, as_text, get_field, where
from lit_rlhf.data.tasks import arithmetic_problems, worked_answer
from lit_rlhf.types import StepBatch

CORRUPTIONS = {"ones": 0, "tens": 1, "carry": 1, "final": 2}
"""Built-in corruptions -> the step they break first (the ones step, the tens step, the tens step forgetting the
carry or borrow, the final line)."""


@dataclass
class StepExample:
    """One tokenised solution: ``positions`` index ``response_ids`` (each step's last token), ``labels`` 0/1."""

    prompt_ids: list[int]
    response_ids: list[int]
    positions: list[int]
    labels: list[float]
    prompt: str
    response: str
    truncated: bool = False


# ------------------------------------------------------------------------------------------------ built-in task
def split_worked(text: str) -> list[str]:
    """The sentences of a worked answer ("... carry 1. Tens: ... = 8. The answer is 85." -> three steps)."""
    return re.split(r"(?<=\.) ", text)


def corrupt_worked(a: int, op: str, b: int, kind: str, rng: random.Random) -> tuple[list[str], int, str]:
    """(steps of a worked answer for ``a op b`` with the ``kind`` corruption, index of the first wrong step, the
    corruption made).

    ``ones``/``tens``: a false one-digit result in that step (ones: another digit; tens: off by 1..3); ``carry``: the
    tens step forgets the carry (or borrow), a true equation in the wrong place (``tens`` when there is none);
    ``final``: correct steps, then a final answer off by 1..10. Later steps use the wrong value, so the final line is
    what the corrupted work gives."""
    (a1, a0), (b1, b0) = divmod(a, 10), divmod(b, 10)
    carry = a0 + b0 >= 10 if op == "+" else a0 < b0
    r0 = (a0 + b0) % 10 if op == "+" else (a0 + 10 * carry - b0)
    r1 = a1 + b1 + carry if op == "+" else a1 - carry - b1
    kind = "tens" if kind == "carry" and not carry else kind
    if kind == "ones":
        r0 = rng.choice([d for d in range(10) if d != r0])
    elif kind == "tens":
        r1 = rng.choice([r1 + d for d in (-3, -2, -1, 1, 2, 3) if r1 + d >= 0])
    elif kind == "carry":
        r1 = a1 + b1 if op == "+" else a1 - b1
    elif kind != "final":
        raise ValueError(f"unknown corruption {kind!r}; one of {list(CORRUPTIONS)}")
    if op == "+":
        ones = f"Ones: {a0} + {b0} = {r0 + 10 * carry}" + (f", write {r0} carry 1." if carry else ".")
        tens = f"Tens: {a1} + {b1}{' + 1' * (carry and kind != 'carry')} = {r1}."
    else:
        ones = f"Ones: {a0} < {b0}, borrow: {a0 + 10} - {b0} = {r0}." if carry else f"Ones: {a0} - {b0} = {r0}."
        tens = f"Tens: {a1}{' - 1' * (carry and kind != 'carry')} - {b1} = {r1}."
    y = 10 * r1 + r0
    if kind == "final":
        y = rng.choice([y + d for d in range(-10, 11) if d and y + d >= 0])
    return [ones, tens, f"The answer is {y}."], CORRUPTIONS[kind], kind


def arithmetic_step_labels(n: int, seed: int, corrupt_fraction: float = 0.5) -> list[dict]:
    """``n`` step-labelled records ``{prompt, steps, labels, answer, corruption}`` on the questions of
    :func:`lit_rlhf.data.tasks.arithmetic_problems` (same seed, same questions): ``corrupt_fraction`` of them get one
    of :data:`CORRUPTIONS` (drawn uniformly) and labels 1 before the first wrong step, 0 from it on; the others are
    :func:`~lit_rlhf.data.tasks.worked_answer` with all labels 1. Deterministic in ``seed``."""
    rng = random.Random(f"step-labels-{seed}")
    records = []
    for question, x in arithmetic_problems(n, seed):
        a, op, b = question[len("What is ") : -1].split(" ")
        kind = rng.choice(list(CORRUPTIONS)) if rng.random() < corrupt_fraction else None
        if kind is None:
            steps, first_bad = split_worked(worked_answer(int(a), op, int(b))), 3
        else:
            steps, first_bad, kind = corrupt_worked(int(a), op, int(b), kind, rng)
        labels = [int(i < first_bad) for i in range(len(steps))]
        records.append(
            {
                "prompt": [{"role": "user", "content": question}],
                "steps": steps,
                "labels": labels,
                "answer": x,
                "corruption": kind,
            }
        )
    return records


# ------------------------------------------------------------------------------------------- records -> tokens
def join_steps(steps: list[str], separator: str = " ") -> tuple[str, list[int]]:
    """(completion = ``separator.join(steps)``, end offset of each step's last non-space character + 1)."""
    ends, offset = [], 0
    for step in steps:
        ends.append(offset + len(step.rstrip()))
        offset += len(step) + len(separator)
    return separator.join(steps), ends


def locate_steps(completion: str, steps: list[str]) -> list[int | None]:
    """End offsets (as :func:`join_steps`) of ``steps`` found in order in ``completion`` (a splitter's pieces); None
    for a blank step; a step that is not in the completion after the previous one is a ValueError."""
    ends: list[int | None] = []
    cursor = 0
    for i, step in enumerate(steps):
        body = step.strip()
        if not body:
            ends.append(None)
            continue
        start = completion.find(body, cursor)
        if start < 0:
            raise ValueError(f"step {i} {step!r} is not in the completion after character {cursor}")
        cursor = start + len(body)
        ends.append(cursor)
    return ends


def step_token_positions(tokenizer, response_text: str, completion: str, ends: list[int | None]) -> list[int | None]:
    """Index in ``render.encode(tokenizer, response_text)`` of the token holding each step's last character (None
    for a None end); the completion is found as written inside ``response_text`` (its chat-template wrapping)."""
    start = response_text.find(completion)
    if start < 0:
        raise ValueError("the rendered response does not contain the completion as written")
    offsets = tokenizer(response_text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    token_ends = [e for _, e in offsets]
    positions: list[int | None] = []
    for end in ends:
        t = None if end is None else bisect.bisect_right(token_ends, start + end - 1)
        if t is not None and (t >= len(offsets) or offsets[t][0] > start + end - 1):
            raise ValueError(f"no token holds character {start + end - 1} of the rendered response")
        positions.append(t)
    return positions


def read_labels(record: dict, steps_field: str, labels_field: str, numbers_as_text: bool) -> tuple[list, list]:
    """(steps, labels) of a record, checked: a non-empty list of text steps and as many 0/1 (or true/false) labels."""
    steps, labels = get_field(record, steps_field, "fields.steps"), get_field(record, labels_field, "fields.labels")
    if not isinstance(steps, list) or not steps:
        raise DataError(f"{where(record)}: field {steps_field!r} must be a non-empty list of step strings")
    steps = [
        as_text(s, f"{where(record)}: field {steps_field!r} item {i}", numbers_as_text) for i, s in enumerate(steps)
    ]
    for i, s in enumerate(steps):
        if not isinstance(s, str) or render.is_blank(s):
            raise DataError(f"{where(record)}: field {steps_field!r} item {i} must be a non-blank string")
    if not isinstance(labels, list) or len(labels) != len(steps):
        got = f"{len(labels)} labels" if isinstance(labels, list) else type(labels).__name__
        raise DataError(
            f"{where(record)}: field {labels_field!r} must be a list of one label per step "
            f"({len(steps)} steps), got {got}"
        )
    for i, y in enumerate(labels):
        if not isinstance(y, (bool, int, float)) or (isinstance(y, float) and not math.isfinite(y)) or y not in (0, 1):
            raise DataError(
                f"{where(record)}: field {labels_field!r} item {i} must be 1 (correct) or 0 (wrong), got {y!r} "
                "(PRM800K ratings -1/0/+1: map them to 0/1 first)"
            )
    return steps, [float(y) for y in labels]


def step_example(
    tokenizer,
    record: dict,
    prompt: render.Text,
    fields: tuple[str, str] = ("steps", "labels"),
    separator: str = " ",
    chat_template: bool = True,
    budget: tuple[int, int] = (512, 256),
    numbers_as_text: bool = False,
) -> StepExample | None:
    """The tokenised solution of a record (``fields``: its steps and labels columns); longer than ``budget`` =
    (max_length, max_prompt_length): the prompt is cut from the left, the response from the right, and the steps
    whose last token is cut are dropped (None when none is left)."""
    steps, labels = read_labels(record, *fields, numbers_as_text)
    completion, ends = join_steps(steps, separator)
    prompt_text = render.render_prompt(tokenizer, prompt, chat_template)
    response_text = render.render_completion(tokenizer, prompt, prompt_text, completion, chat_template)
    positions = step_token_positions(tokenizer, response_text, completion, ends)
    prompt_ids, response_ids = render.encode(tokenizer, prompt_text), render.encode(tokenizer, response_text)
    prompt_ids, response_ids, truncated = render.truncate_pair(prompt_ids, response_ids, *budget)
    kept = sum(p < len(response_ids) for p in positions)
    if not kept:
        return None
    return StepExample(prompt_ids, response_ids, positions[:kept], labels[:kept], prompt_text, response_text, truncated)


def collate_steps(examples: list[StepExample], pad: int) -> StepBatch:
    """A :class:`~lit_rlhf.types.StepBatch`: prompts left-padded, responses right-padded, steps [N, K] padded."""
    k = max(len(e.positions) for e in examples)
    mask = torch.tensor([[j < len(e.positions) for j in range(k)] for e in examples])
    return StepBatch(
        pad_left([e.prompt_ids for e in examples], pad),
        pad_left([[1] * len(e.prompt_ids) for e in examples], 0),
        pad_right([e.response_ids for e in examples], pad),
        pad_right([[1] * len(e.response_ids) for e in examples], 0),
        torch.arange(len(examples)),
        step_positions=pad_right([e.positions for e in examples], 0),
        step_labels=pad_right([e.labels for e in examples], 0.0).float(),
        step_mask=mask,
        prompts=[e.prompt for e in examples],
        responses=[e.response for e in examples],
    )
