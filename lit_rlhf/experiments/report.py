"""Report entry point: ``python -m lit_rlhf.experiments.report RUN [RUN ...] [--out DIR]`` (``lit-rlhf report``).

PNG plots of a run's key curves (loss, reward mean ± std, KL, accuracy, completion length, learning rate, gradient
norm: whichever it logged) from its metrics CSV, and a markdown summary; an overlay of several runs; for a sweep (its
spec or directory) the cells grouped by grid values, mean ± std over seeds. What is written where:
:mod:`lit_rlhf.report`.

    python -m lit_rlhf.experiments.report runs/grpo                          # runs/grpo/report.png + report.md
    python -m lit_rlhf.experiments.report runs/dpo-a runs/dpo-b --out cmp    # each run, cmp/overlay.png, cmp/report.md
    python -m lit_rlhf.experiments.report experiments/sweeps/dpo-tiny-beta.yaml   # <sweep dir>/report.png + report.md
"""

from __future__ import annotations

import argparse
import sys

PROG = "python -m lit_rlhf.experiments.report"


def main(argv: list[str] | None = None) -> int:
    formatter = argparse.RawDescriptionHelpFormatter
    prog = sys.argv[0] if sys.argv and sys.argv[0].startswith("lit-rlhf") else PROG  # as the user ran it
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=formatter)
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run directory, metrics.csv, sweep spec or sweep dir")
    parser.add_argument("--out", default=None, help="write here instead of the run / sweep directory")
    args = parser.parse_args(argv)
    from lit_rlhf import report

    try:
        written = report.report(args.runs, args.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("written: " + "\n         ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
