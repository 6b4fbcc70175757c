"""GEMM floor of a GRPO workload: ``python -m lit_rlhf.bench gemm_floor --workload G1|G2``.

Prints one JSON line: the step's matrix multiplications (sampling prefill and decode, reference forward, policy
forward and backward; attention scores, LoRA and every non-matmul op left out), the rate ``F.linear`` reaches for each
shape here in isolation (repeated on the same weights, so cache-friendly), and their sum: the fastest a step could be
if it did nothing but these matmuls at those rates (``max_completions_per_s``). ``ceiling_completions_per_s`` is the
same at the 200 GFLOP/s fp32 ceiling of a 2048^2 matmul for every shape, a bound no fp32 implementation can beat
here. Compare both with a throughput target before chasing it.
"""

from __future__ import annotations

import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from lit_rlhf.bench.grpo import GRPO_WORKLOADS  # noqa: E402

WORKLOADS = GRPO_WORKLOADS
FP32_CEILING = 200e9  # FLOP/s of a 2048^2 fp32 matmul on this machine (2 cores)


def _rate(m: int, k: int, n: int, dtype: torch.dtype, reps: int = 5) -> float:
    """Measured FLOP/s of ``[m, k] @ [k, n]`` (``F.linear`` layout: weight [n, k]), median of ``reps`` timings."""
    x, w = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
    torch.nn.functional.linear(x, w)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        torch.nn.functional.linear(x, w)
        times.append(time.perf_counter() - start)
    return 2.0 * m * k * n / statistics.median(times)


def step_gemms(w: dict, cfg, prompt_len: int) -> list[tuple[str, int, int, int, int]]:
    """(phase, M, K, N, count) of every matmul of one GRPO step (mu = 1, beta > 0) of workload ``w``."""
    hidden, inter, layers, vocab = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    kv = cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    linears = [
        (hidden, hidden),
        (hidden, kv),
        (hidden, kv),
        (hidden, hidden),
        (hidden, inter),
        (hidden, inter),
        (inter, hidden),
    ]
    prompts, n, r, mb = w["prompts"], w["prompts"] * w["gens"], w["max_new_tokens"], w["minibatch_size"]
    out: list[tuple[str, int, int, int, int]] = []

    def forward(phase: str, tokens: int, scored: int, count: int) -> None:
        out.extend((phase, tokens, k, nn, layers * count) for k, nn in linears)
        out.append((phase + " head", scored, hidden, vocab, count))

    forward("sampling prefill", prompts * prompt_len, prompts, 1)
    forward("sampling decode", n, n, r)
    chunks, per_chunk = (
        n // mb,
        mb * r + (mb // w["gens"] or 1) * prompt_len,
    )  # a minibatch: its prompts once + responses
    forward("reference", per_chunk, mb * r, chunks)
    forward("policy forward", per_chunk, mb * r, chunks)
    for phase, m, k, nn, count in [g for g in out if g[0].startswith("policy forward")]:
        out.append((phase.replace("forward", "backward (input grad)"), m, nn, k, count))
        if not w["lora"]:  # full fine-tune: every weight's gradient too
            out.append((phase.replace("forward", "backward (weight grad)"), nn, m, k, count))
    return out


def run(workload: str, threads: int, precision: str = "32-true") -> dict:
    from lit_rlhf import models
    from lit_rlhf.data.render import encode, render_prompt
    from lit_rlhf.data.tasks import arithmetic_prompts

    if precision != "32-true":
        raise ValueError("gemm_floor measures the fp32 floor only (--precision 32-true)")
    if threads:
        torch.set_num_threads(threads)
    w = GRPO_WORKLOADS[workload]
    tok = models.load_tokenizer(w["model"])
    prompt_len = min(
        len(encode(tok, render_prompt(tok, r["prompt"], True))) for r in arithmetic_prompts(1000, 0)
    )  # a lower bound
    if w["model"] == "tiny":
        cfg = models.tiny_config(len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    else:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(models.resolve(w["model"])[0])
    rates: dict[tuple[int, int, int], float] = {}
    phases: dict[str, float] = {}
    total_flops = 0.0
    for phase, m, k, n, count in step_gemms(w, cfg, prompt_len):
        if (m, k, n) not in rates:
            rates[(m, k, n)] = _rate(m, k, n, torch.float32)
        flops = 2.0 * m * k * n * count
        total_flops += flops
        name = phase.split(" head")[0]
        phases[name] = phases.get(name, 0.0) + flops / rates[(m, k, n)]
    floor = sum(phases.values())
    per_step = w["prompts"] * w["gens"]
    return {
        "workload": workload,
        "model": w["model"],
        "prompt_len": prompt_len,
        "matmul_gflop_per_step": round(total_flops / 1e9, 1),
        "floor_s_per_step": round(floor, 3),
        "floor_s_by_phase": {k: round(v, 3) for k, v in phases.items()},
        "max_completions_per_s": round(per_step / floor, 2),
        "ceiling_completions_per_s": round(per_step / (total_flops / FP32_CEILING), 2),
        "gflops_by_shape": {f"{m}x{k}x{n}": round(v / 1e9, 1) for (m, k, n), v in sorted(rates.items())},
        "torch_threads": torch.get_num_threads(),
    }
