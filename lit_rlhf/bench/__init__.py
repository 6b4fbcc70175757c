"""Benchmarks (scripts, not tests): ``python -m lit_rlhf.bench <stage> --workload NAME`` prints one JSON line.

Each stage's module (``lit_rlhf.bench.<stage>``) defines ``WORKLOADS`` and ``run(workload, threads) -> dict``.
"""
