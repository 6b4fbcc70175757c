"""The ``lit-rlhf`` command: ``lit-rlhf <command> [arguments]`` runs ``python -m lit_rlhf.experiments.<command>``
with the same arguments (both stay equivalent; ``lit-rlhf <command> --help`` shows a command's options).

    lit-rlhf dpo --config experiments/dpo/tiny.yaml --output_dir runs/dpo-tiny
    lit-rlhf sweep run-local experiments/sweeps/dpo-tiny-beta.yaml
    lit-rlhf report runs/dpo-tiny
    lit-rlhf env

A new command is one line in :data:`COMMANDS`: its name, the ``module:function`` that runs it (the function reads
``sys.argv`` as under ``python -m``) and a one-line description for ``lit-rlhf --help``.
"""

from __future__ import annotations

import difflib
import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "sft": ("lit_rlhf.experiments.sft:main", "supervised fine-tuning (masked NLL; LoRA or full; packing)"),
    "rft": ("lit_rlhf.experiments.rft:main", "rejection-sampling fine-tuning: sample, keep the correct, SFT on them"),
    "rm": ("lit_rlhf.experiments.rm:main", "reward model (Bradley-Terry, K-wise, pointwise; decoder or encoder)"),
    "dpo": ("lit_rlhf.experiments.dpo:main", "direct preference optimization (DPO, IPO, hinge, robust DPO, cDPO)"),
    "ppo": ("lit_rlhf.experiments.ppo:main", "PPO with a critic (GAE, clipped losses, adaptive KL)"),
    "grpo": ("lit_rlhf.experiments.grpo:main", "GRPO (DAPO, Dr. GRPO, GSPO losses; group / RLOO advantages)"),
    "distill": ("lit_rlhf.experiments.distill:main", "on-policy distillation (teacher's per-token reverse KL)"),
    "pipeline": ("lit_rlhf.experiments.pipeline:main", "chain stages, each trained on the previous one's export"),
    "sweep": ("lit_rlhf.experiments.sweep:main", "grids of runs: plan (checks every cell), run-local, submit, collect"),
    "report": ("lit_rlhf.experiments.report:main", "PNG curves and a markdown summary of runs or a sweep"),
    "paradigm": ("lit_rlhf.experiments.paradigm:main", "RFT vs Online RFT vs GRPO variants: accuracy by samples seen"),
    "evaluate": ("lit_rlhf.experiments.evaluate:main", "accuracy, pass@k, rewards of a model or run; RM pair accuracy"),
    "generate": ("lit_rlhf.experiments.generate:main", "complete every prompt of a file, to JSONL"),
    "chat": ("lit_rlhf.experiments.chat:main", "talk to a model or run in the terminal (/reset, /exit)"),
    "env": ("lit_rlhf.experiments.env:main", "versions, device and threads of this environment"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return (
        "usage: lit-rlhf <command> [arguments]\n\ncommands:\n"
        + "\n".join(lines)
        + "\n\n'lit-rlhf <command> --help' shows a command's options.\n"
        "'lit-rlhf <command> ...' is the same as 'python -m lit_rlhf.experiments.<command> ...'."
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        print(f"lit-rlhf: unknown command '{name}'{hint}\n\n{usage()}", file=sys.stderr)
        return 2
    module, function = COMMANDS[name][0].split(":")
    run = getattr(importlib.import_module(module), function)
    saved, sys.argv = sys.argv, [f"lit-rlhf {name}", *rest]
    try:
        result = run()
    finally:
        sys.argv = saved
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
