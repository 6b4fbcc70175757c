"""``python -m lit_rlhf.bench <stage> --workload NAME [--threads N] [--precision P] [--rollout_backend B]``.

Prints one JSON line of throughput and memory."""

from __future__ import annotations

import argparse
import importlib
import json

STAGES = ("dpo", "grpo", "gemm_floor")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m lit_rlhf.bench", description=__doc__)
    ap.add_argument("stage", choices=STAGES)
    ap.add_argument("--workload", required=True)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    ap.add_argument(
        "--precision",
        default="32-true",
        choices=("32-true", "bf16-mixed"),
        help="Lightning precision; the TRL baseline runs true fp32, so only 32-true compares like for like",
    )
    ap.add_argument("--rollout_backend", default="kv_cache", choices=("kv_cache", "vllm"), help="grpo: the sampler")
    args = ap.parse_args(argv)
    bench = importlib.import_module(f"lit_rlhf.bench.{args.stage}")
    if args.workload not in bench.WORKLOADS:
        ap.error(f"unknown workload {args.workload!r} for {args.stage}; choose from {sorted(bench.WORKLOADS)}")
    extra = {"rollout_backend": args.rollout_backend} if args.stage == "grpo" else {}
    print(json.dumps(bench.run(args.workload, args.threads, args.precision, **extra)), flush=True)


if __name__ == "__main__":
    main()
