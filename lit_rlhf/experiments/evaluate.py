"""Evaluate entry point: ``python -m lit_rlhf.experiments.evaluate MODEL [options]`` (``lit-rlhf evaluate``).

MODEL is a run directory (its ``export/merged``, else ``checkpoints/last.ckpt``), a run's ``export/merged``, a
Lightning checkpoint of a policy stage run (the policy is rebuilt from the run's ``config.yaml``), an HF directory,
a hub id, a ``.gguf`` file or a built-in name (``smollm2-135m``, ``tiny``).

Prompts: by default the held-out prompts of the run's data settings (its ``config.yaml``), so the greedy
``accuracy`` equals the run's own ``val/accuracy`` in ``final_metrics.json`` (GRPO; PPO validates on samples);
without a run, the built-in ``arithmetic`` task's held-out questions. ``--data FILE`` evaluates every record of a
JSONL/JSON/CSV/Parquet file or of a hub dataset's ``--split`` (GSM8K format works as is: ``question``, ``answer``
"... #### 72"), rendered with the run's data settings and the options below. Metrics (:mod:`lit_rlhf.evaluation`):
greedy ``accuracy``, ``pass@k`` and ``mean@n`` over ``--num_samples`` n samples, reward-function scores
(``--rewards``; default: the run's, else numeric correctness + closeness), completion lengths. A reward model (a
sequence classifier, or an RM run) gets pairwise accuracy on preference pairs (``--data``, default: the run's held-out
pairs). Results go to a JSON file (default ``RUN/eval/<prompts>.json``, else ``eval/<model>/<prompts>.json``) with
every completion next to it (``.samples.jsonl``), and a table is printed.

    lit-rlhf evaluate runs/grpo                                    # the run's held-out set; accuracy, pass@1, pass@8
    lit-rlhf evaluate runs/grpo/checkpoints/last.ckpt --num_samples 0
    lit-rlhf evaluate smollm2-135m --instruction "Answer with just the number." --max_new_tokens 12
    lit-rlhf evaluate Qwen/Qwen2.5-0.5B-Instruct --data openai/gsm8k --subset main --split test --max_new_tokens 512
    lit-rlhf evaluate runs/sft --data math.jsonl --verifier math   # MATH-style answers (pip install 'lit_rlhf[math]')
    lit-rlhf evaluate runs/rm --data tests/fixtures/seed_preference.jsonl   # reward model: pairwise accuracy
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import re
import sys
import time
from pathlib import Path

PROG = "python -m lit_rlhf.experiments.evaluate"
SAME_METRICS = ("grpo", "rm")
"""Stages whose ``val/<name>`` in ``final_metrics.json`` is what ``<name>`` is here, on the same held-out records
(greedy accuracy and reward functions; RM pairwise accuracy): printed side by side. (PPO validates on samples; SFT
renders its held-out prompts with its own data module.)"""
DATA_OPTIONS = {  # option -> PromptDataModule / RewardDataModule argument
    "task": "task",
    "num_val": "num_val",
    "data_seed": "seed",
    "max_val_records": "max_val_records",
    "instruction": "instruction",
    "system_prompt": "system_prompt",
    "chat_template": "chat_template",
    "max_prompt_length": "max_prompt_length",
}


def parser() -> argparse.ArgumentParser:
    prog = sys.argv[0] if sys.argv[0].startswith("lit-rlhf") else PROG  # as invoked: lit-rlhf or python -m
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="run directory, checkpoint, HF directory, hub id, .gguf file or built-in name")
    a = p.add_argument_group("prompts (default: the run's held-out prompts, else the built-in task's)").add_argument
    a("--data", help="evaluate every record of this file or hub dataset instead")
    a("--split", default="test", help="hub split of --data (default: test)")
    a("--subset", help="hub configuration of --data (e.g. main for openai/gsm8k)")
    a("--max_records", type=int, help="read at most this many records of --data")
    a("--prompt_field", help="prompt column (default: prompt, else question)")
    a("--answer_field", help="reference-answer column (default: answer)")
    a("--task", help="built-in task when there is no run data (default: arithmetic)")
    a("--num_val", type=int, help="built-in task: held-out prompts")
    a("--data_seed", type=int, help="built-in task: data seed (held-out questions drawn with seed + 1)")
    a("--max_val_records", type=int, help="evaluate at most this many held-out records")
    a("--instruction", help="text appended to every user turn, e.g. 'Answer with just the number.'")
    a("--system_prompt", help="system turn added to every prompt")
    a("--chat_template", type=_bool, help="render prompts with the chat template (true/false)")
    a("--max_prompt_length", type=int, help="prompt tokens kept (from the end)")
    s = p.add_argument_group("decoding and metrics").add_argument
    s("--max_new_tokens", type=int, help="completion budget (default: the run's, else 64)")
    s("--num_samples", type=int, default=8, help="n samples per prompt for pass@k / mean@n (0: greedy only)")
    s("--k", type=int, nargs="+", default=[1, 8], help="the k of pass@k (default: 1 8)")
    s("--temperature", type=float, help="temperature of the samples (default: the run's, else 1.0)")
    s("--top_p", type=float, help="nucleus sampling of the samples (default: the run's, else 1.0)")
    s("--top_k", type=int, help="top-k sampling of the samples (default: the run's, else off)")
    s("--batch_size", type=int, help="prompts per forward (default: the run's val_batch_size, else 32)")
    s("--seed", type=int, default=0, help="seed of the sampling noise")
    s("--rewards", nargs="*", help="reward functions by registry name or import path ('none': none)")
    s("--verifier", choices=["numeric", "math"], default="numeric", help="answer checker (math: math-verify)")
    o = p.add_argument_group("model and output").add_argument
    o("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    o("--dtype", choices=["float32", "bfloat16"], help="weight dtype (default: the run's, else float32)")
    o("--output", help="result JSON file (completions go to <output stem>.samples.jsonl)")
    o("--no_progress", action="store_true", help="no progress bar")
    return p


def _bool(text: str) -> bool:
    if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() in ("true", "1", "yes")


def data_settings(module_class, run_data: dict, args) -> dict:
    """The run's ``data:`` settings when ``module_class`` takes them (a prompt run for prompts, an RM run for pairs),
    plus the options given on the command line."""
    params = set(inspect.signature(module_class.__init__).parameters)
    settings = dict(run_data) if run_data and set(run_data) <= params else {}
    settings.update({arg: getattr(args, opt) for opt, arg in DATA_OPTIONS.items() if getattr(args, opt) is not None})
    fields = dict(settings.get("fields") or {})
    fields.update({k: v for k, v in (("prompt", args.prompt_field), ("answer", args.answer_field)) if v is not None})
    if fields:
        settings["fields"] = fields
    return {k: v for k, v in settings.items() if k in params}


def output_path(args, loaded, name: str) -> Path:
    if args.output:
        return Path(args.output)
    if loaded.run_dir is not None:
        return loaded.run_dir / "eval" / f"{name}.json"
    return Path("eval") / re.sub(r"[^A-Za-z0-9._-]+", "_", args.model).strip("_") / f"{name}.json"


def evaluate_lm(args, loaded) -> tuple[str, dict, dict, list[dict]]:
    from lit_rlhf import evaluation as ev
    from lit_rlhf.data.prompts import PromptDataModule
    from lit_rlhf.rewards import DEFAULT_REWARDS, RewardSpec

    model_cfg = loaded.run_config.get("model") or {}
    dm = ev.prompt_module(data_settings(PromptDataModule, loaded.run_config.get("data") or {}, args), loaded.tokenizer)
    if args.data:
        prompts = ev.file_prompts(dm, args.data, args.split, args.subset, args.max_records)
    else:
        prompts = ev.validation_prompts(dm)
    sampling = model_cfg.get("sampling") or {}
    if args.rewards is not None:
        rewards = [] if args.rewards in ([], ["none"]) else [RewardSpec(n) for n in args.rewards]
    elif model_cfg.get("rewards") is not None or "sampling" in model_cfg:
        rewards = [RewardSpec(**r) for r in model_cfg.get("rewards") or []] or list(DEFAULT_REWARDS)
    else:
        rewards = list(DEFAULT_REWARDS) if any(e.columns.get("answer") is not None for e in prompts.examples) else []
    settings = ev.EvalSettings(
        max_new_tokens=_first(args.max_new_tokens, sampling.get("max_new_tokens"), model_cfg.get("max_new_tokens"), 64),
        num_samples=args.num_samples,
        k=args.k,
        temperature=_first(args.temperature, sampling.get("temperature"), 1.0),
        top_p=_first(args.top_p, sampling.get("top_p"), 1.0),
        top_k=_first(args.top_k, sampling.get("top_k"), 0),
        batch_size=_first(args.batch_size, dm.hparams.val_batch_size),
        seed=args.seed,
        verifier=args.verifier,
        rewards=rewards,
    )
    metrics, rows = ev.evaluate_policy(
        loaded.model, loaded.tokenizer, prompts, dm.collate, settings, progress=not args.no_progress
    )
    described = {**vars(settings), "rewards": [vars(r) for r in settings.rewards], "prompts": prompts.name}
    return prompts.name, metrics, described, rows


def evaluate_rm(args, loaded) -> tuple[str, dict, dict, list[dict]]:
    from lit_rlhf import evaluation as ev
    from lit_rlhf.data.scored import RewardDataModule, RewardFields
    from lit_rlhf.reward_models import RewardScorer

    settings = data_settings(RewardDataModule, loaded.run_config.get("data") or {}, args)
    if args.data:
        settings.update(path=args.data, split=args.split, subset=args.subset, max_records=args.max_records)
        settings.update(format="pairs", val_split=None, val_fraction=0.0, batch_size=1)
    if isinstance(settings.get("fields"), dict):
        known = {f.name for f in dataclasses.fields(RewardFields)}
        settings["fields"] = RewardFields(**{k: v for k, v in settings["fields"].items() if k in known})
    dm = RewardDataModule(**settings)
    dm.connect(loaded.tokenizer)
    dm.setup("fit")
    examples = dm.train_examples if args.data else dm.val_examples
    name = Path(args.data).stem if args.data else f"{dm.task if dm.hparams.path is None else 'data'}-validation"
    scorer = RewardScorer(loaded.model, loaded.tokenizer, batch_size=args.batch_size or 16)
    metrics, scores = ev.evaluate_reward_model(scorer, examples)
    texts = [[e.chosen, e.rejected] if hasattr(e, "chosen") else list(e.responses) for e in examples]
    rows = [{"prompt": e.prompt, "responses": t, "scores": s} for e, t, s in zip(examples, texts, scores)]
    return name, metrics, {"prompts": name, "records": len(examples)}, rows


def _first(*values):
    return next(v for v in values if v is not None)


def print_table(loaded, name: str, metrics: dict, run_end: dict) -> None:
    print(f"\n[lit_rlhf] evaluate {loaded.source} on {name}")
    print(f"  {'metric':34s} {'value':>10s}" + ("   run's final_metrics.json (end)" if run_end else ""))
    for key, value in metrics.items():
        ref = run_end.get(f"val/{key}")
        line = f"  {key:34s} {value:10d}" if isinstance(value, int) else f"  {key:34s} {value:10.4f}"
        print(line + (f"   {ref:.4f} (val/{key})" if ref is not None else ""))


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from lit_rlhf.evaluation import load_model
    from lit_rlhf.io import write_json, write_text

    started = time.perf_counter()
    try:
        loaded = load_model(args.model, args.device, args.dtype)
        evaluate = evaluate_rm if loaded.reward_model else evaluate_lm
        name, metrics, settings, rows = evaluate(args, loaded)
    except (FileNotFoundError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    final = loaded.run_dir / "final_metrics.json" if loaded.run_dir is not None else None
    summary = json.loads(final.read_text()) if final is not None and final.is_file() else {}
    run_end = summary.get("end", {}) if summary.get("stage") in SAME_METRICS else {}
    out = output_path(args, loaded, name)
    result = {
        "model": args.model,
        "source": loaded.source,
        "run_dir": str(loaded.run_dir) if loaded.run_dir else None,
        "reward_model": loaded.reward_model,
        "settings": settings,
        "metrics": metrics,
        "run_final_metrics": {k: v for k, v in summary.get("end", {}).items() if k.startswith("val/")},
        "elapsed_s": time.perf_counter() - started,
    }
    write_json(out, result)
    samples = out.with_suffix(".samples.jsonl")
    write_text(samples, "".join(json.dumps(r, default=str) + "\n" for r in rows))
    print_table(loaded, name, metrics, run_end)
    print(f"  written: {out}, {samples}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
