"""RFT entry point: ``python -m lit_rlhf.experiments.rft`` (``lit-rlhf rft``): rejection-sampling fine-tuning.

RFT (Yuan et al. 2023, "Scaling Relationship on Learning Mathematical Reasoning with Large Language Models", §3.3;
DeepSeekMath, Shao et al. 2024, §5.2.1): sample k completions of every training question from a fixed model, keep
the correct ones (deduplicated), and fine-tune on them with the SFT loss. In DeepSeekMath's unified view it is SFT
with data sampled offline from the SFT model and gradient coefficient 1 for a correct sample, 0 otherwise; Online
RFT samples from the current policy instead (GRPO ``--model.advantage_estimator=online_rft``).

1. Sampling (before the SFT stage is built): ``--rft.num_samples`` completions of each training question of the
   built-in ``--data.task`` (``--data.num_train`` questions, ``--data.seed``: the training split GRPO sees with
   those settings, rendered like its prompts, :class:`lit_rlhf.data.prompts.PromptDataModule`) from ``--rft.model``
   (null: ``--model.policy.name``, the model being fine-tuned, e.g. the SFT export), batched, seeded
   (``--rft.seed``), graded by the verifier (:func:`lit_rlhf.rewards.is_correct`). Written atomically to
   ``OUTPUT_DIR/rft/``: ``samples.jsonl`` (every sample with ``correct`` and ``finished``), ``train.jsonl`` (the
   correct, finished samples deduplicated per question up to whitespace, as SFT records; see
   :mod:`lit_rlhf.data.rft`) and ``summary.json`` (questions, samples, correct fraction, kept, questions with a
   kept sample), also printed. No kept sample at all is an error: nothing to fine-tune on.
2. Fine-tuning: the SFT stage (:mod:`lit_rlhf.stages.sft`, every ``--model.*``/``--trainer.*`` option of
   ``lit-rlhf sft``) on ``train.jsonl`` (:class:`lit_rlhf.data.rft.RFTDataModule`), validated on the task's held-out
   questions like SFT and GRPO (``val/accuracy``); the run directory is an SFT run's (``export/merged``,
   ``final_metrics.json``), so ``lit-rlhf evaluate OUTPUT_DIR`` and pipelines take it.

Resuming (``--ckpt_path last``) reuses ``train.jsonl``. Sampling runs in one process (global rank 0); with
``--trainer.devices=N`` Lightning starts the other ranks when fitting begins and they read rank 0's ``train.jsonl``.

    python -m lit_rlhf.experiments.rft --config experiments/rft/smollm2.yaml     # from runs/sft/export/merged
    python -m lit_rlhf.experiments.rft --config experiments/rft/tiny.yaml --output_dir runs/rft-tiny
    lit-rlhf rft --config experiments/rft/smollm2.yaml --rft.num_samples=16 --rft.include_reference=true
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from lightning.fabric.utilities.rank_zero import rank_zero_only

from lit_rlhf.cli import RLHFCLI, run_stage
from lit_rlhf.data.rft import RFTDataModule, select_samples, summarize, training_records
from lit_rlhf.stages.sft import SFTModule

TRAINER_DEFAULTS = {"max_steps": 60, "val_check_interval": 1000, "check_val_every_n_epoch": None}
# The default experiment (experiments/rft/smollm2.yaml): from the SFT stage's export, 160 questions x 8 samples.
DEFAULTS = {
    "model.policy.name": "runs/sft/export/merged",
    "model.optimizer.lr": 2.0e-4,
    "model.optimizer.warmup_steps": 5,
    "data.num_train": 160,
    "rft.max_new_tokens": 48,
    "data.max_length": 256,
}


@dataclass
class RFTSettings:
    """The rejection-sampling round before the fine-tune (``--rft.*``).

    Args:
        model: the fixed model sampled from (run directory, export, HF directory, hub id, built-in name); null: the
            model being fine-tuned (``model.policy.name``).
        num_samples: k, completions sampled per training question.
        max_new_tokens: completion budget in tokens; a completion without EOS by then is not kept.
        temperature: sampling temperature (0: greedy, one distinct completion per question).
        top_p: nucleus sampling (1.0: off).
        top_k: top-k sampling (0: off).
        batch_size: questions per sampling batch (each with ``num_samples`` rows).
        seed: seed of the sampling noise.
        include_reference: also train on each question's reference worked answer (Yuan et al.'s RFT: the SFT data
            plus the distinct correct samples); false: the samples alone (DeepSeekMath's RFT).
    """

    model: str | None = None
    num_samples: int = 8
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    batch_size: int = 16
    seed: int = 0
    include_reference: bool = False


def question_records(task: str, num_train: int, num_val: int, seed: int) -> tuple[list[dict], dict[int, dict]]:
    """(prompt records, question -> reference record) of the built-in task's training split: GRPO's prompts
    (:data:`lit_rlhf.data.prompts.TASKS`) and, for the same questions, SFT's worked answers."""
    from lit_rlhf.data import prompts, sft
    from lit_rlhf.data.sources import builtin_split

    questions, _ = builtin_split(prompts.TASKS, task, num_train, num_val, seed)
    worked, _ = builtin_split(sft.TASKS, task, num_train, num_val, seed)
    if [r["prompt"] for r in questions] != [r["prompt"] for r in worked]:
        raise ValueError(f"--data.task={task}: the prompt and SFT versions of the task ask different questions")
    return questions, dict(enumerate(worked))


def sample_questions(loaded, records: list[dict], data, rft: RFTSettings, progress: bool = True) -> list[dict]:
    """``rft.num_samples`` graded samples of every record (see :mod:`lit_rlhf.data.rft` for a sample row), the
    prompts rendered as GRPO renders them (the data module's defaults: chat template, no instruction)."""
    import torch
    from tqdm.auto import tqdm

    from lit_rlhf.evaluation import prompt_module
    from lit_rlhf.rewards import is_correct
    from lit_rlhf.rollout import SamplingSettings, sample_completions

    settings = {"task": data.task, "num_train": data.num_train, "num_val": data.num_val, "seed": data.seed}
    dm = prompt_module(settings, loaded.tokenizer)
    examples = [dm.example(r) for r in records]
    sampling = SamplingSettings(rft.max_new_tokens, rft.temperature, rft.top_p, rft.top_k)
    device, k = next(loaded.model.parameters()).device, rft.num_samples
    generator = torch.Generator(device=device).manual_seed(rft.seed) if rft.temperature > 0 else None
    rows = []
    starts = range(0, len(examples), rft.batch_size)
    for start in tqdm(starts, desc="rft sampling", unit="batch", disable=not progress):
        batch = dm.collate(examples[start : start + rft.batch_size]).to(device)
        rollout = sample_completions(loaded.model, loaded.tokenizer, batch, k, sampling, generator)
        for i, text in enumerate(rollout.completions):
            q = start + i // k
            record = records[q]
            correct = bool(is_correct(text, record["answer"]))
            finished = not bool(rollout.truncated[i])
            rows.append(
                dict(
                    question=q,
                    prompt=record["prompt"],
                    answer=record["answer"],
                    completion=text,
                    correct=correct,
                    finished=finished,
                )
            )
    return rows


def rejection_sample(cfg, out: Path, progress: bool = True) -> dict:
    """Sample, grade, select; write ``out/{samples.jsonl,train.jsonl,summary.json}`` (atomically). Returns the
    summary; raises ``ValueError`` (naming why and what to change) when no sample is kept."""
    import json

    from lit_rlhf.evaluation import load_model
    from lit_rlhf.io import write_json, write_text

    rft, data = cfg.rft, cfg.data
    name = rft.model or cfg.model.policy.name
    started = time.perf_counter()
    records, references = question_records(data.task, data.num_train, data.num_val, data.seed)
    loaded = load_model(name)
    if loaded.reward_model:
        raise ValueError(f"--rft.model={name} is a reward model: it scores, it does not generate")
    samples = sample_questions(loaded, records, data, rft, progress)
    del loaded
    kept = select_samples(samples)
    train = training_records(kept, references if rft.include_reference else None)
    summary = {"sampler": name, "num_samples": rft.num_samples, **summarize(samples, kept, train)}
    summary["seconds"] = round(time.perf_counter() - started, 1)

    def jsonl(rows: list[dict]) -> str:
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)

    write_text(out / "samples.jsonl", jsonl(samples))
    write_json(out / "summary.json", summary)
    print(
        "[lit_rlhf] rft: "
        + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items())
        + f" -> {out}",
        flush=True,
    )
    if not train:
        (out / "train.jsonl").unlink(missing_ok=True)
        raise ValueError(
            f"RFT: none of the {len(samples)} samples ({summary['correct']} correct, {summary['finished']} "
            f"finished) of {name} is both correct and finished: nothing to fine-tune on (see {out / 'samples.jsonl'}). "
            "Sample more (--rft.num_samples), from a better model (--rft.model), with a larger budget "
            "(--rft.max_new_tokens), or add the reference answers (--rft.include_reference=true)"
        )
    write_text(out / "train.jsonl", jsonl(train))
    return summary


class RFTCLI(RLHFCLI):
    """The SFT stage's CLI plus ``--rft.*``; samples the training data once the output directory is accepted."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_class_arguments(RFTSettings, "rft")  # (first: the defaults set below may name rft.* keys)
        super().add_arguments_to_parser(parser)

    def before_instantiate_classes(self) -> None:
        super().before_instantiate_classes()  # output_dir accepted, resume target resolved
        cfg = self.config
        out = Path(cfg.output_dir) / "rft"
        train = out / "train.jsonl"
        if cfg.data.path not in (None, str(train)):
            self.parser.error(
                f"--data.path={cfg.data.path}: RFT trains on its own samples ({train}); the questions are the "
                "training split of the built-in --data.task (--data.num_train, --data.seed)"
            )
        if cfg.rft.num_samples < 1:
            self.parser.error(f"--rft.num_samples={cfg.rft.num_samples}: sample at least one completion per question")
        if cfg.rft.batch_size < 1:
            self.parser.error(f"--rft.batch_size={cfg.rft.batch_size}: at least one question per sampling batch")
        reuse = train.is_file() and (self.resume_from is not None or rank_zero_only.rank != 0)
        if not reuse:
            try:
                rejection_sample(cfg, out, progress=cfg.trainer.enable_progress_bar is not False)
            except FileNotFoundError as e:
                hint = "the default samples from the SFT export: run `lit-rlhf sft` first, or set --rft.model"
                self.parser.error(f"{e}; {hint} (--model.policy.name is both sampled from and fine-tuned)")
            except ValueError as e:
                self.parser.error(str(e))
        cfg.data.path = str(train)


def main(args=None):
    return run_stage(
        SFTModule, RFTDataModule, "rft", TRAINER_DEFAULTS, args, __doc__, defaults=DEFAULTS, cli_class=RFTCLI
    )


if __name__ == "__main__":
    main()
