"""Generate entry point: ``python -m lit_rlhf.experiments.generate MODEL --prompts FILE`` (``lit-rlhf generate``).

Batch sampling: every record of a prompt file (JSONL/JSON/CSV/Parquet) or of a hub dataset's ``--split`` is rendered
like the online stages render prompts (:class:`lit_rlhf.data.prompts.PromptDataModule`: chat template, the run's
instruction and system prompt when MODEL is a run) and completed ``--num_samples`` times by the stages' sampler
(:func:`lit_rlhf.rollout.sample_completions`). Output: one JSON object per record, in file order,
``{"prompt": <the record's prompt>, "completion": "..."}`` (``"completions": [...]`` with ``--num_samples`` > 1).
MODEL is anything ``lit-rlhf evaluate`` takes (a run directory, a checkpoint, an HF directory, a hub id, a built-in
name).

    lit-rlhf generate runs/grpo --prompts questions.jsonl --output answers.jsonl
    lit-rlhf generate smollm2-135m --prompts tests/fixtures/prompts_plain.jsonl --prompt_field text --num_samples 4
    lit-rlhf generate runs/sft --prompts openai/gsm8k --subset main --split test --max_records 50 --temperature 0
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import sys
from pathlib import Path

PROG = "python -m lit_rlhf.experiments.generate"
RENDERING = ("instruction", "system_prompt", "chat_template", "fields", "max_prompt_length", "numbers_as_text")
"""The prompt-data settings of a run that ``generate`` keeps (how prompts are rendered, not which are read)."""


def parser() -> argparse.ArgumentParser:
    from lit_rlhf.experiments.evaluate import _bool

    prog = sys.argv[0] if sys.argv[0].startswith("lit-rlhf") else PROG  # as invoked: lit-rlhf or python -m
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("model", help="run directory, checkpoint, HF directory, hub id, .gguf file or built-in name")
    a("--prompts", required=True, help="prompt file (.jsonl/.json/.csv/.parquet) or hub dataset")
    a("--output", help="JSONL to write (default: RUN/generations/<prompts>.jsonl, else generations/<prompts>.jsonl)")
    a("--split", default="test", help="hub split of --prompts (default: test)")
    a("--subset", help="hub configuration of --prompts")
    a("--max_records", type=int, help="read at most this many records")
    a("--prompt_field", help="prompt column (default: prompt, else question)")
    a("--instruction", help="text appended to every user turn")
    a("--system_prompt", help="system turn added to every prompt")
    a("--chat_template", type=_bool, help="render prompts with the chat template (true/false; default true)")
    a("--num_samples", type=int, default=1, help="completions per prompt")
    a("--max_new_tokens", type=int, default=256, help="completion budget in tokens")
    a("--temperature", type=float, default=1.0, help="sampling temperature (0: greedy)")
    a("--top_p", type=float, default=1.0, help="nucleus sampling (1.0: off)")
    a("--top_k", type=int, default=0, help="top-k sampling (0: off)")
    a("--batch_size", type=int, default=16, help="prompts per forward")
    a("--seed", type=int, default=0, help="seed of the sampling noise")
    a("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    a("--dtype", choices=["float32", "bfloat16"], help="weight dtype (default: the run's, else float32)")
    a("--no_progress", action="store_true", help="no progress bar")
    return p


def generate(loaded, args) -> list[dict]:
    """One ``{prompt, completion(s)}`` row per record of ``args.prompts``."""
    import torch
    from tqdm.auto import tqdm

    from lit_rlhf import evaluation as ev
    from lit_rlhf.data.prompts import PromptDataModule
    from lit_rlhf.rollout import SamplingSettings, sample_completions

    options = ("instruction", "system_prompt", "chat_template")
    given = {k: getattr(args, k) for k in options if getattr(args, k) is not None}
    run_data = loaded.run_config.get("data") or {}  # a prompt run's rendering (GRPO, PPO)
    prompt_run = run_data and set(run_data) <= set(inspect.signature(PromptDataModule.__init__).parameters)
    base = {k: v for k, v in run_data.items() if k in RENDERING} if prompt_run else {}
    if args.prompt_field:
        base["fields"] = {**(base.get("fields") or {}), "prompt": args.prompt_field}
    dm = ev.prompt_module({**base, **given}, loaded.tokenizer)
    prompts = ev.file_prompts(dm, args.prompts, args.split, args.subset, args.max_records)
    sampling = SamplingSettings(args.max_new_tokens, args.temperature, args.top_p, args.top_k)
    device = next(loaded.model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(args.seed) if args.temperature > 0 else None
    field = dm.fields.prompt
    rows = []
    starts = range(0, len(prompts.examples), args.batch_size)
    for start in tqdm(starts, desc="generate", unit="batch", disable=args.no_progress):
        batch = dm.collate(prompts.examples[start : start + args.batch_size]).to(device)
        rollout = sample_completions(loaded.model, loaded.tokenizer, batch, args.num_samples, sampling, generator)
        for i, record in enumerate(prompts.records[start : start + args.batch_size]):
            prompt = record[field] if field in record else record.get("question")
            texts = rollout.completions[i * args.num_samples : (i + 1) * args.num_samples]
            completions = {"completion": texts[0]} if args.num_samples == 1 else {"completions": texts}
            rows.append({"prompt": prompt, **completions})
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.num_samples < 1:
        print("error: --num_samples must be >= 1", file=sys.stderr)
        return 2
    from lit_rlhf.evaluation import load_model
    from lit_rlhf.io import write_text

    try:
        loaded = load_model(args.model, args.device, args.dtype)
        if loaded.reward_model:
            raise ValueError(f"{args.model} is a reward model (a sequence classifier): it scores, it does not generate")
        rows = generate(loaded, args)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(args.prompts).stem)
    out = Path(args.output) if args.output else (loaded.run_dir or Path(".")) / "generations" / f"{stem}.jsonl"
    write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"[lit_rlhf] generate: {len(rows)} prompts x {args.num_samples} completions -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
