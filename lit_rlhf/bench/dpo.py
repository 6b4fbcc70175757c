"""DPO benchmark: ``python -m lit_rlhf.bench dpo --workload W1|W2``.

Prints one JSON line: samples/s (median step and wall), tokens/s, peak RSS of the training loop, MFU. Runs the real
stage module under a Lightning ``Trainer`` on the built-in arithmetic data rendered with the SmolLM2 chat template
(``seed=0``: the same records as the TRL baseline harness in ``shared/trl-baseline``).

Workloads:
  W1  tiny Llama (hidden 256, 4 layers, MLP 1024, tied), full fine-tune fp32, 8 pairs/step, max length 128, 30 steps
  W2  SmolLM2-135M + LoRA r16 alpha 32 on q,k,v,o, fp32, 4 pairs/step, max length 128, 10 steps
  W2c W2 with the reference logps precomputed (``reference=cached``); precompute time reported separately
``--precision bf16-mixed`` runs the matmuls in bf16 (fp32 weights); the TRL baseline is true fp32, so only the
default compares like for like. Set ``THP_MEM_ALLOC_ENABLE=1`` to compare with the quoted TRL figures (both sides
under the same environment).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning as L  # noqa: E402
import torch  # noqa: E402

from lit_rlhf.bench.common import StepTimer, bench_trainer, status_mib  # noqa: E402

DPO_WORKLOADS = {
    "W1": {"model": "tiny", "lora": False, "pairs": 8, "steps": 30, "reference": "online", "n_data": 1000},
    "W2": {"model": "smollm2-135m", "lora": True, "pairs": 4, "steps": 10, "reference": "online", "n_data": 1000},
    # W2 with reference logps precomputed once (reference=cached) for the 40 pairs it trains on; the precompute
    # time is inside fit_setup_s_incl_reference_precompute (with model loading); the step timings exclude it.
    "W2c": {"model": "smollm2-135m", "lora": True, "pairs": 4, "steps": 10, "reference": "cached", "n_data": 40},
}


WORKLOADS = DPO_WORKLOADS


def run(workload: str, threads: int, precision: str = "32-true") -> dict:
    from lit_rlhf import models
    from lit_rlhf.data.preference import PreferenceDataModule
    from lit_rlhf.data.tasks import arithmetic_preferences
    from lit_rlhf.metrics import model_flop_counts, training_flops
    from lit_rlhf.optim import OptimizerSettings
    from lit_rlhf.stages.dpo import DPOModule

    w = DPO_WORKLOADS[workload]
    if threads:
        torch.set_num_threads(threads)
    L.seed_everything(0, verbose=False)
    lora = (
        models.LoRASettings(r=16, alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
        if w["lora"]
        else None
    )
    spec = models.ModelSpec(name=w["model"], lora=lora)
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "pairs.jsonl")
        with open(data, "w") as f:
            for r in arithmetic_preferences(w["n_data"], 0):
                f.write(json.dumps(r) + "\n")
        dm = PreferenceDataModule(path=data, val_fraction=0.0, batch_size=w["pairs"], max_length=128)
        module = DPOModule(
            policy=spec,
            beta=0.1,
            optimizer=OptimizerSettings(lr=1e-5),
            reference=w["reference"],
            ref_cache_dir=os.path.join(tmp, "ref"),
        )
        dm.connect(module.tokenizer)
        timer = StepTimer()
        fit_start = time.perf_counter()
        trainer = bench_trainer(w["steps"], [timer], gradient_clip_val=1.0, precision=precision)
        trainer.fit(module, datamodule=dm)
        cpu_end = resource.getrusage(resource.RUSAGE_SELF)
        precompute_s = timer.begin - fit_start
        steps = timer.step_times()
        # tokens as the TRL harness counts them: non-pad tokens of the chosen and rejected sequences
        seq_tokens = sum(
            2 * len(e.prompt_ids) + len(e.chosen_ids) + len(e.rejected_ids) for e in dm.train_examples
        ) / len(dm.train_examples)
        n_body, head = model_flop_counts(module.policy)
        resp = sum(len(e.chosen_ids) + len(e.rejected_ids) for e in dm.train_examples) / len(dm.train_examples)
        prompt = sum(len(e.prompt_ids) for e in dm.train_examples) / len(dm.train_examples)
        ref_forwards = 1 if w["reference"] == "online" else 0
        flops_step = training_flops(
            n_body, head, int(w["pairs"] * (prompt + resp)), int(w["pairs"] * resp), lora is None, ref_forwards
        )
    med = statistics.median(steps[1:] or steps)
    wall = timer.ends[-1] - timer.begin
    return {
        "workload": workload,
        "framework": "lit_rlhf",
        "model": w["model"],
        "lora": w["lora"],
        "reference": w["reference"],
        "fit_setup_s_incl_reference_precompute": round(precompute_s, 2),
        "pairs_per_step": w["pairs"],
        "steps": len(steps),
        "median_step_s": round(med, 4),
        "first_step_s": round(steps[0], 3),
        "pairs_per_s_median": round(w["pairs"] / med, 3),
        "pairs_per_s_wall": round(w["pairs"] * len(steps) / wall, 3),
        "tokens_per_s_wall": round(seq_tokens * w["pairs"] * len(steps) / wall, 1),
        "mean_tokens_per_sequence": round(seq_tokens / 2, 1),
        "peak_rss_train_mib": round(status_mib("VmHWM"), 1),
        "model_flops_per_step": flops_step,
        "precision": precision,
        "mfu_vs_200gflops_fp32": round(flops_step / med / 200e9, 3),
        "mfu_vs_850gflops_bf16": round(flops_step / med / 850e9, 3),
        "cpu_user_s": round(cpu_end.ru_utime - timer.cpu.ru_utime, 1),
        "cpu_sys_s": round(cpu_end.ru_stime - timer.cpu.ru_stime, 1),
        "torch_threads": torch.get_num_threads(),
        "thp_mem_alloc": os.environ.get("THP_MEM_ALLOC_ENABLE", ""),
    }
