"""``python -m lit_rlhf.bench <stage> --workload NAME [--threads N]``: one JSON line of throughput and memory."""

from __future__ import annotations

import argparse
import importlib
import json

STAGES = ("dpo", "grpo")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m lit_rlhf.bench", description=__doc__)
    ap.add_argument("stage", choices=STAGES)
    ap.add_argument("--workload", required=True)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    args = ap.parse_args(argv)
    bench = importlib.import_module(f"lit_rlhf.bench.{args.stage}")
    if args.workload not in bench.WORKLOADS:
        ap.error(f"unknown workload {args.workload!r} for {args.stage}; choose from {sorted(bench.WORKLOADS)}")
    print(json.dumps(bench.run(args.workload, args.threads)), flush=True)


if __name__ == "__main__":
    main()
