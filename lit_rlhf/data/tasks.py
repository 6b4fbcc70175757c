"""Built-in synthetic tasks with verifiers, deterministic by seed, so every stage has an offline default.

Arithmetic: "What is A + B?" / "What is A - B?", A and B two-digit (10..99), operands of "-" ordered so the answer is
never negative. The generator draws from ``random.Random(seed)`` in a fixed order (operator, A, B; then for a
rejected answer offsets in [-10, 10] \\ {0}), so the same seed gives the same data as the TRL baseline harness.
"""

from __future__ import annotations

import random
import re

QUESTION = "What is {a} {op} {b}?"
ANSWER = "The answer is {x}."
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


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
        {"prompt": [{"role": "user", "content": q}], "response": [{"role": "assistant", "content": ANSWER.format(x=x)}], "answer": x}
        for q, x in arithmetic_problems(n, seed)
    ]


def last_number(text: str) -> float | None:
    """The last number in ``text`` (commas ignored), or None."""
    found = _NUMBER.findall(text.replace(",", ""))
    return float(found[-1]) if found else None


def is_correct(completion: str, answer: int | float) -> bool:
    """Verifier: the last number in the completion equals the answer."""
    value = last_number(completion)
    return value is not None and value == float(answer)
