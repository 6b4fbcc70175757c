"""Rejection-sampling fine-tuning data: from k samples per question, the correct ones, deduplicated, as SFT records.

RFT (Yuan et al. 2023, "Scaling Relationship on Learning Mathematical Reasoning with Large Language Models", §3.3;
DeepSeekMath, Shao et al. 2024, §5.2.1: the SFT loss on correct samples of the fixed SFT model, gradient coefficient
1 for a correct sample and 0 otherwise). The sampling itself is :mod:`lit_rlhf.experiments.rft`; here are the pure
steps from samples to training records, and the data module that trains on them.

- A sample row (``OUTPUT_DIR/rft/samples.jsonl``): ``{question, prompt, answer, completion, correct, finished}``:
  the question's index in the training split, its chat messages, the reference answer, the completion text, the
  verifier's verdict (:func:`lit_rlhf.rewards.is_correct`) and whether it ended with EOS within the token budget.
- :func:`select_samples`: a sample is kept when it is correct and finished (a truncated completion would teach
  stopping mid-sentence) and its text after :func:`normalise` (whitespace runs -> one space, ends stripped) is new
  for its question: exact duplicates up to whitespace go, any other difference stays. (Yuan et al. deduplicate by
  the list of equations; in the worked arithmetic format the text is that list.)
- :func:`training_records`: the kept samples as ``{prompt, response, answer, source}`` records, the shape of the
  built-in worked SFT records (:func:`lit_rlhf.data.tasks.arithmetic_worked_sft`), so ``lit-rlhf sft
  --data.path=OUTPUT_DIR/rft/train.jsonl`` reads them too; with references (Yuan et al.'s RFT trains on the SFT data
  plus the distinct correct samples; DeepSeekMath's on the samples alone) each question's reference answer comes
  first unless a kept sample already says it. ``source``: ``sample`` or ``reference``.
- :class:`RFTDataModule`: the SFT data module with its training records read from ``path`` (the kept samples) and
  its validation records the built-in task's held-out questions, the ones SFT and GRPO validate on, so held-out
  ``val/accuracy`` compares across the stages.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from lit_rlhf.data.sft import SFTDataModule
from lit_rlhf.data.sources import DataError, Records, Task, builtin_split, read_records


def normalise(text: str) -> str:
    """``text`` with every run of whitespace made one space and its ends stripped (the deduplication key)."""
    return " ".join(text.split())


def select_samples(samples: Sequence[Mapping]) -> list[Mapping]:
    """The samples to train on, in order: correct, finished, and the first of their question with their
    :func:`normalise`-d text."""
    seen: set[tuple[int, str]] = set()
    kept = []
    for s in samples:
        key = (s["question"], normalise(s["completion"]))
        if s["correct"] and s["finished"] and key not in seen:
            seen.add(key)
            kept.append(s)
    return kept


def training_records(kept: Sequence[Mapping], references: Mapping[int, Mapping] | None = None) -> Records:
    """SFT records of the kept samples (see the module doc), grouped by question in question order; ``references``
    (question -> its reference record ``{prompt, response, answer}``, responses as chat messages) adds each
    question's reference first, unless a kept sample of it has the same normalised text."""
    by_question: dict[int, list[Mapping]] = {}
    for s in kept:
        by_question.setdefault(s["question"], []).append(s)
    records = []
    for q in sorted(set(by_question) | set(references or {})):
        texts = {normalise(s["completion"]) for s in by_question.get(q, [])}
        ref = (references or {}).get(q)
        if ref is not None and normalise(ref["response"][-1]["content"]) not in texts:
            records.append({**{k: ref[k] for k in ("prompt", "response", "answer")}, "source": "reference"})
        for s in by_question.get(q, []):
            response = [{"role": "assistant", "content": s["completion"]}]
            records.append({"prompt": s["prompt"], "response": response, "answer": s["answer"], "source": "sample"})
    return records


def summarize(samples: Sequence[Mapping], kept: Sequence[Mapping], records: Sequence[Mapping]) -> dict:
    """Counts of an RFT sampling round: questions, samples, correct (and the fraction), finished, kept (distinct
    correct finished samples), questions with >= 1 kept sample, references added, training records."""
    questions = {s["question"] for s in samples}
    correct = sum(bool(s["correct"]) for s in samples)
    return {
        "questions": len(questions),
        "samples": len(samples),
        "correct": correct,
        "correct_fraction": correct / len(samples) if samples else 0.0,
        "finished": sum(bool(s["finished"]) for s in samples),
        "kept": len(kept),
        "questions_with_kept": len({s["question"] for s in kept}),
        "references": sum(r.get("source") == "reference" for r in records),
        "train_records": len(records),
    }


class RFTDataModule(SFTDataModule):
    """:class:`~lit_rlhf.data.sft.SFTDataModule` (the same arguments) whose training records are the file ``path``
    (RFT's kept samples, ``OUTPUT_DIR/rft/train.jsonl``, set by ``lit-rlhf rft``) and whose validation records are
    the held-out questions of the built-in ``task`` for ``num_train``, ``num_val`` and ``seed`` (those the SFT and
    GRPO stages validate on; ``val_split`` and ``val_fraction`` are unused)."""

    def records(self, tasks: Mapping[str, Task], task: str, max_val_records: int | None = None) -> tuple:
        hp = self.hparams
        if hp.path is None:
            raise DataError("RFT data: --data.path must name the kept samples (lit-rlhf rft sets it)")
        _, val = builtin_split(tasks, task, hp.num_train, hp.num_val, hp.seed)
        return read_records(hp.path, max_records=hp.max_records), val
