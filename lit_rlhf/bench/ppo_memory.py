"""PPO critic memory benchmark: ``python -m lit_rlhf.bench.ppo_memory --critic shared_base|policy [--critic-lora r]``.

Prints one JSON line: the process's peak RSS (``VmHWM``, /proc/self/status) over model set-up and a few PPO iterations
of SmolLM2-135M-Instruct + LoRA (r16, q/k/v/o) on the built-in arithmetic prompts, fp32 on the CPU, with the critic
under test: ``shared_base`` (a value head on the policy's frozen base through its own LoRA adapter) or ``policy`` (a
separate copy of the policy's transformer, LoRA ``--critic-lora R`` or all weights trained with ``--critic-lora 0``).
The reward is a rule (``answer_in_text``), so the critic is the only difference. Run each critic in its own process
(peak RSS is per process):

    python -m lit_rlhf.bench.ppo_memory --critic shared_base
    python -m lit_rlhf.bench.ppo_memory --critic policy --critic-lora 16
    python -m lit_rlhf.bench.ppo_memory --critic policy --critic-lora 0
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning as L  # noqa: E402
import torch  # noqa: E402

from lit_rlhf.bench.common import StepTimer, bench_trainer, status_mib  # noqa: E402


def run(critic: str, critic_lora: int, steps: int, batch_size: int, max_new_tokens: int, threads: int) -> dict:
    from lit_rlhf import models
    from lit_rlhf.critics import CriticSettings
    from lit_rlhf.data.prompts import PromptDataModule
    from lit_rlhf.rewards import RewardSpec
    from lit_rlhf.rollout import SamplingSettings
    from lit_rlhf.stages.ppo import PPOModule

    if threads:
        torch.set_num_threads(threads)
    L.seed_everything(0, verbose=False)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    lora = models.LoRASettings(r=16, alpha=32, target_modules=targets)
    critic_settings = CriticSettings(
        init=critic,
        lora=models.LoRASettings(r=critic_lora, alpha=2 * critic_lora, target_modules=targets) if critic_lora else None,
    )
    module = PPOModule(
        policy=models.ModelSpec(name="smollm2-135m", lora=lora),
        critic=critic_settings,
        reward_model=None,
        rewards=[RewardSpec("answer_in_text")],
        sampling=SamplingSettings(max_new_tokens=max_new_tokens, temperature=0.7),
        ppo_epochs=2,
        minibatch_size=batch_size // 2,
    )
    dm = PromptDataModule(num_train=steps * batch_size, num_val=1, batch_size=batch_size)
    dm.connect(module.tokenizer)
    timer = StepTimer()
    trainer = bench_trainer(steps, [timer], gradient_clip_val=None)
    rss_before = status_mib("VmRSS")
    trainer.fit(module, datamodule=dm)
    trainable = sum(p.numel() for p in module.critic.trainable_parameters())
    total = sum(p.numel() for p in module.parameters())
    steps_s = timer.step_times()
    return {
        "bench": "ppo_memory",
        "critic": critic,
        "critic_lora_r": critic_lora or None,
        "model": "smollm2-135m",
        "policy_lora_r": 16,
        "batch_size": batch_size,
        "max_new_tokens": max_new_tokens,
        "steps": len(steps_s),
        "peak_rss_mib": round(status_mib("VmHWM"), 1),
        "rss_at_start_mib": round(rss_before, 1),
        "module_parameters": total,
        "critic_trainable_parameters": trainable,
        "median_step_s": round(statistics.median(steps_s), 2) if steps_s else None,
        "torch_threads": torch.get_num_threads(),
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m lit_rlhf.bench.ppo_memory",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--critic", choices=("shared_base", "policy"), required=True)
    ap.add_argument(
        "--critic-lora", type=int, default=16, help="LoRA rank of the critic (0: a separate critic trains all weights)"
    )
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.critic == "shared_base" and not args.critic_lora:
        ap.error("the shared-base value head trains a LoRA adapter: --critic-lora must be > 0")
    print(
        json.dumps(run(args.critic, args.critic_lora, args.steps, args.batch_size, args.max_new_tokens, args.threads)),
        flush=True,
    )


if __name__ == "__main__":
    main()
