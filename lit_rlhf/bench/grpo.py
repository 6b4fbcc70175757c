"""GRPO benchmark: ``python -m lit_rlhf.bench grpo --workload G1|G2``.

Prints one JSON line: completions/s (median step and wall), the median seconds of generation, scoring (rewards,
reference logps) and update per step, mean completion length, peak RSS of the training loop. Runs the real stage
module under a Lightning ``Trainer`` on the built-in arithmetic prompts (``seed=0``: the TRL baseline harness' records)
rendered with the SmolLM2 chat template and its default system prompt. Every completion runs to the token budget
unless EOS comes first, is scored (the harness' correctness reward: the right integer appears) and enters the loss,
whatever its reward (``zero_variance_groups=keep``).

Workloads (lr 1e-5, beta 0.04 with k3 KL, temperature 1.0, mu = 1, fp32, as the TRL harness runs them):
  G1  tiny Llama, full fine-tune (frozen-copy reference), 8 prompts x 8 generations, 32 new tokens, 10 steps
  G2  SmolLM2-135M + LoRA r16 alpha 32 on q,k,v,o (adapter-disabled reference), 4 prompts x 4 generations,
      48 new tokens, 5 steps
``--precision bf16-mixed`` runs the matmuls in bf16 (fp32 weights, fp32 log-softmax); the TRL baseline is true fp32,
so only the default compares like for like. MFU = the module's model FLOPs per step (sampling forward, reference
forward, forward + backward; :mod:`lit_rlhf.metrics`) / step time / the matmul ceiling of the precision.
Set ``THP_MEM_ALLOC_ENABLE=1`` to compare with the quoted TRL figures (both sides under the same environment).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning as L  # noqa: E402
import torch  # noqa: E402

from lit_rlhf.bench.common import StepTimer, bench_trainer, status_mib  # noqa: E402

GRPO_WORKLOADS = {
    "G1": {
        "model": "tiny",
        "lora": False,
        "prompts": 8,
        "gens": 8,
        "max_new_tokens": 32,
        "steps": 10,
        "minibatch_size": 16,
    },
    "G2": {
        "model": "smollm2-135m",
        "lora": True,
        "prompts": 4,
        "gens": 4,
        "max_new_tokens": 48,
        "steps": 5,
        "minibatch_size": 4,
    },
}
WORKLOADS = GRPO_WORKLOADS
PHASES = ("generation_s", "scoring_s", "update_s")
PEAK_FLOPS = {"32-true": 200e9, "bf16-mixed": 850e9}
"""The CPU's measured 2048^2 matmul ceiling per precision (this machine), the denominator of the reported MFU."""


class PhaseTimes(L.Callback):
    """The module's per-step phase timings (``perf/generation_s`` ...) and completion lengths, one entry per step."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        m = trainer.callback_metrics
        keys = [f"perf/{p}" for p in PHASES] + ["perf/mfu", "train/completions/mean_length", "train/rewards/mean"]
        self.rows.append({k.split("/", 1)[1]: float(m[k]) for k in keys if k in m})


def run(workload: str, threads: int, precision: str = "32-true", rollout_backend: str = "kv_cache") -> dict:
    from lit_rlhf import models
    from lit_rlhf.data.prompts import PromptDataModule
    from lit_rlhf.data.tasks import arithmetic_prompts
    from lit_rlhf.optim import OptimizerSettings
    from lit_rlhf.rewards import RewardSpec
    from lit_rlhf.rollout import SamplingSettings
    from lit_rlhf.stages.grpo import GRPOModule
    from lit_rlhf.vllm_engine import VLLMSettings

    w = GRPO_WORKLOADS[workload]
    load_start = os.getloadavg()[0]
    if threads:
        torch.set_num_threads(threads)
    L.seed_everything(0, verbose=False)
    lora = (
        models.LoRASettings(r=16, alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
        if w["lora"]
        else None
    )
    module = GRPOModule(
        policy=models.ModelSpec(name=w["model"], lora=lora),
        rewards=[RewardSpec("answer_in_text")],
        num_generations=w["gens"],
        sampling=SamplingSettings(max_new_tokens=w["max_new_tokens"], temperature=1.0),
        loss="grpo",
        beta=0.04,
        minibatch_size=w["minibatch_size"],
        optimizer=OptimizerSettings(lr=1e-5),
        table_every_n_steps=0,
        peak_flops=PEAK_FLOPS[precision],
        rollout_backend=rollout_backend,  # vllm: an engine in the precision's weight dtype, 256 MiB KV cache
        vllm=VLLMSettings(dtype="bfloat16" if precision.startswith("bf16") else "float32", max_model_len=512),
    )
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "prompts.jsonl")
        with open(data, "w") as f:
            for r in arithmetic_prompts(1000, 0):
                f.write(json.dumps(r) + "\n")
        dm = PromptDataModule(path=data, val_fraction=0.0, batch_size=w["prompts"])
        dm.connect(module.tokenizer)
        timer, phases = StepTimer(), PhaseTimes()
        trainer = bench_trainer(w["steps"], [timer, phases], use_distributed_sampler=False, precision=precision)
        trainer.fit(module, datamodule=dm)
        cpu_end = resource.getrusage(resource.RUSAGE_SELF)
    steps = timer.step_times()
    per_step = w["prompts"] * w["gens"]
    med = statistics.median(steps[1:] or steps)
    wall = timer.ends[-1] - timer.begin
    rest = phases.rows[1:] or phases.rows
    return {
        "workload": workload,
        "framework": "lit_rlhf",
        "model": w["model"],
        "lora": w["lora"],
        "prompts_per_step": w["prompts"],
        "num_generations": w["gens"],
        "completions_per_step": per_step,
        "max_new_tokens": w["max_new_tokens"],
        "minibatch_size": w["minibatch_size"],
        "steps": len(steps),
        "median_step_s": round(med, 4),
        "first_step_s": round(steps[0], 3),
        "completions_per_s_median": round(per_step / med, 3),
        "completions_per_s_wall": round(per_step * len(steps) / wall, 3),
        **{f"{p}_median": round(statistics.median(r[p] for r in rest), 4) for p in PHASES},
        "mean_completion_len": round(statistics.mean(r["completions/mean_length"] for r in phases.rows), 2),
        "reward_mean": round(statistics.mean(r["rewards/mean"] for r in phases.rows), 4),
        "precision": precision,
        "rollout_backend": rollout_backend,
        "mfu_median": round(statistics.median(r["mfu"] for r in rest if "mfu" in r), 3)
        if any("mfu" in r for r in rest)
        else None,
        "mfu_peak_flops": PEAK_FLOPS[precision],
        "peak_rss_train_mib": round(status_mib("VmHWM"), 1),
        "cpu_user_s": round(cpu_end.ru_utime - timer.cpu.ru_utime, 1),
        "cpu_sys_s": round(cpu_end.ru_stime - timer.cpu.ru_stime, 1),
        "torch_threads": torch.get_num_threads(),
        "thp_mem_alloc": os.environ.get("THP_MEM_ALLOC_ENABLE", ""),
        "load_avg_1m": [round(load_start, 2), round(os.getloadavg()[0], 2)],  # machine load before/after: >2 = shared
    }
