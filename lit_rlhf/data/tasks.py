"""Built-in synthetic tasks, deterministic by seed, so every stage has an offline default; their ``answer`` columns are
graded by the package's one verifier, :func:`lit_rlhf.rewards.is_correct`.

Arithmetic: "What is A + B?" / "What is A - B?", A and B two-digit (10..99), operands of "-" ordered so the answer is
never negative. The generator draws from ``random.Random(seed)`` in a fixed order (operator, A, B; then for a
rejected answer offsets in [-10, 10] \\ {0}), so the same seed gives the same data as the TRL baseline harness.
"""

from __future__ import annotations

import random

from lit_rlhf.rewards import parse_number

QUESTION = "What is {a} {op} {b}?"
ANSWER = "The answer is {x}."


def _problem(rng: random.Random) -> tuple[str, int]:
    op = rng.choice("+-")
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    if op == "-" and a < b:
        a, b = b, a
    return QUESTION.format(a=a, op=op, b=b), (a + b if op == "+" else a - b)


def _wrong_answer(rng: random.Random, x: int) -> int:
    while True:
        offset = rng.randint(-10, 10)
        if offset != 0 and x + offset >= 0:
            return x + offset


def arithmetic_problems(n: int, seed: int) -> list[tuple[str, int]]:
    """n (question, answer) pairs; prefix-stable in n."""
    rng = random.Random(seed)
    return [_problem(rng) for _ in range(n)]


def arithmetic_preferences(n: int, seed: int) -> list[dict]:
    """Conversational preference records: chosen states the right sum/difference, rejected a wrong one."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        question, x = _problem(rng)
        y = _wrong_answer(rng, x)
        records.append(
            {
                "prompt": [{"role": "user", "content": question}],
                "chosen": [{"role": "assistant", "content": ANSWER.format(x=x)}],
                "rejected": [{"role": "assistant", "content": ANSWER.format(x=y)}],
                "answer": x,
            }
        )
    return records


def arithmetic_prompts(n: int, seed: int) -> list[dict]:
    """Conversational prompt records with the verifier's ``answer`` column (GRPO/PPO)."""
    return [{"prompt": [{"role": "user", "content": q}], "answer": x} for q, x in arithmetic_problems(n, seed)]


def arithmetic_sft(n: int, seed: int) -> list[dict]:
    """Prompt/response records with a worked answer (SFT)."""
    return [
        {
            "prompt": [{"role": "user", "content": q}],
            "response": [{"role": "assistant", "content": ANSWER.format(x=x)}],
            "answer": x,
        }
        for q, x in arithmetic_problems(n, seed)
    ]


def worked_answer(a: int, op: str, b: int) -> str:
    """A digit-by-digit worked answer for ``a op b`` (two-digit operands, ``a >= b`` for "-"), ending in ANSWER.

    "47 + 38" -> "Ones: 7 + 8 = 15, write 5 carry 1. Tens: 4 + 3 + 1 = 8. The answer is 85."
    "83 - 47" -> "Ones: 3 < 7, borrow: 13 - 7 = 6. Tens: 8 - 1 - 4 = 3. The answer is 36."
    Each step is a one-digit fact a small model can learn; the final number is what the verifier reads.
    """
    (a1, a0), (b1, b0) = divmod(a, 10), divmod(b, 10)
    if op == "+":
        s0 = a0 + b0
        ones = f"Ones: {a0} + {b0} = {s0}" + (f", write {s0 - 10} carry 1." if s0 >= 10 else ".")
        tens = f"Tens: {a1} + {b1} + 1 = {a1 + b1 + 1}." if s0 >= 10 else f"Tens: {a1} + {b1} = {a1 + b1}."
        x = a + b
    elif op == "-":
        if a < b:
            raise ValueError(f"worked_answer expects a >= b for '-', got {a} - {b}")
        if a0 < b0:
            ones = f"Ones: {a0} < {b0}, borrow: {a0 + 10} - {b0} = {a0 + 10 - b0}."
            tens = f"Tens: {a1} - 1 - {b1} = {a1 - 1 - b1}."
        else:
            ones = f"Ones: {a0} - {b0} = {a0 - b0}."
            tens = f"Tens: {a1} - {b1} = {a1 - b1}."
        x = a - b
    else:
        raise ValueError(f"unknown operator {op!r}")
    return f"{ones} {tens} {ANSWER.format(x=x)}"


def arithmetic_worked_sft(n: int, seed: int) -> list[dict]:
    """SFT records whose response is the digit-by-digit :func:`worked_answer`; same questions as
    :func:`arithmetic_problems` for the same seed, with the verifier's ``answer`` column."""
    records = []
    for question, x in arithmetic_problems(n, seed):
        a, op, b = question[len("What is ") : -1].split(" ")
        records.append(
            {
                "prompt": [{"role": "user", "content": question}],
                "response": [{"role": "assistant", "content": worked_answer(int(a), op, int(b))}],
                "answer": x,
            }
        )
    return records


def arithmetic_ranked(n: int, seed: int, k: int = 4) -> list[dict]:
    """Ranked records ``{prompt, responses, answer}``: ``k`` answers ordered best -> worst by distance to the right
    result (the right one first, then wrong answers further and further off: |offset| in 1..10, 11..20, ...)."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        question, x = _problem(rng)
        values = [x]
        for rank in range(1, k):
            lo, hi = 10 * (rank - 1) + 1, 10 * rank
            offset = rng.randint(lo, hi) * (1 if x - hi < 0 or rng.random() < 0.5 else -1)  # never negative
            values.append(x + offset)
        records.append(
            {
                "prompt": [{"role": "user", "content": question}],
                "responses": [[{"role": "assistant", "content": ANSWER.format(x=v)}] for v in values],
                "answer": x,
            }
        )
    return records


def arithmetic_scored(n: int, seed: int) -> list[dict]:
    """Scored records ``{prompt, response, score, answer}``: a right (score 1) or wrong (score -1) answer, half each
    (outcome supervision: a label for the final answer only, as in Cobbe et al. 2021's verifiers)."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        question, x = _problem(rng)
        y = x if i % 2 == 0 else _wrong_answer(rng, x)
        records.append(
            {
                "prompt": [{"role": "user", "content": question}],
                "response": [{"role": "assistant", "content": ANSWER.format(x=y)}],
                "score": 1.0 if y == x else -1.0,
                "answer": x,
            }
        )
    return records


def worked_answer_reaching(a: int, op: str, b: int, y: int) -> str:
    """A worked answer for ``a op b`` whose steps arrive at ``y``: the true carry/borrow, with the ones- and
    tens-place results replaced by y's digits. For the right result it is :func:`worked_answer`; for a wrong one
    at least one step is a false one-digit equation ("7 + 8 = 13"), which a verifier can spot."""
    (a1, a0), (b1, b0), (y1, y0) = divmod(a, 10), divmod(b, 10), divmod(y, 10)
    if op == "+":
        carry = a0 + b0 >= 10
        ones = f"Ones: {a0} + {b0} = {y0 + 10 * carry}" + (f", write {y0} carry 1." if carry else ".")
        tens = f"Tens: {a1} + {b1} + 1 = {y1}." if carry else f"Tens: {a1} + {b1} = {y1}."
    elif a0 < b0:
        ones, tens = f"Ones: {a0} < {b0}, borrow: {a0 + 10} - {b0} = {y0}.", f"Tens: {a1} - 1 - {b1} = {y1}."
    else:
        ones, tens = f"Ones: {a0} - {b0} = {y0}.", f"Tens: {a1} - {b1} = {y1}."
    return f"{ones} {tens} {ANSWER.format(x=y)}"


def worked_preferences(n: int, seed: int, wrong: str = "step") -> list[dict]:
    """:func:`arithmetic_preferences` (same questions, same wrong results) with worked answers: chosen is the right
    worked answer; rejected reaches the wrong result through a false one-digit step (``wrong="step"``,
    :func:`worked_answer_reaching`) or states it after correct steps (``wrong="final"``: the final line does not
    follow from the work)."""
    records = []
    for r in arithmetic_preferences(n, seed):
        question = r["prompt"][0]["content"]
        a, op, b = question[len("What is ") : -1].split(" ")
        y = int(parse_number(r["rejected"][0]["content"]))
        chosen = worked_answer(int(a), op, int(b))
        if wrong == "step":
            rejected = worked_answer_reaching(int(a), op, int(b), y)
        elif wrong == "final":
            rejected = chosen[: chosen.rindex("The answer is")] + ANSWER.format(x=y)
        else:
            raise ValueError(f"wrong must be 'step' or 'final', got {wrong!r}")
        records.append(
            {
                **r,
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
            }
        )
    return records
