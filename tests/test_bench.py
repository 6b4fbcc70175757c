"""The GEMM floor's inventory of a GRPO step: its matmul FLOPs equal the closed form of the FLOP model."""

from lit_rlhf import models
from lit_rlhf.bench.gemm_floor import step_gemms


def test_gemm_inventory_flops_match_the_closed_form():
    cfg = models.tiny_config(49152, 1, 2, 2)  # hidden 256, 4 layers, MLP 1024, 4 kv heads of 64
    n_body = 4 * (2 * 256 * 256 + 2 * 256 * 256 + 3 * 256 * 1024)  # q, o + k, v + gate, up, down, per layer
    head = 256 * 49152
    prompts, gens, r, mb, p = 2, 2, 3, 2, 5
    w = {"prompts": prompts, "gens": gens, "max_new_tokens": r, "minibatch_size": mb, "lora": False}

    def total(lora: bool) -> float:
        return sum(2.0 * m * k * n * count for _, m, k, n, count in step_gemms({**w, "lora": lora}, cfg, p))

    prefill = 2 * n_body * prompts * p + 2 * head * prompts  # the prompts once; the head at their last position
    decode = r * (2 * n_body * prompts * gens + 2 * head * prompts * gens)
    chunk_tokens, chunk_scored, chunks = mb * r + (mb // gens) * p, mb * r, prompts * gens // mb
    forward = chunks * (2 * n_body * chunk_tokens + 2 * head * chunk_scored)
    assert total(lora=False) == prefill + decode + forward + 3 * forward  # reference, policy forward, 2x backward
    assert total(lora=True) == prefill + decode + forward + 2 * forward  # no weight gradients
