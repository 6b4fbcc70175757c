"""DPO entry point: ``python -m lit_rlhf.experiments.dpo``.

With no arguments: SmolLM2-135M-Instruct + LoRA (r16, alpha 32, q/k/v/o) on the built-in arithmetic preference
task, on the CPU, in under 10 minutes on 2 cores; held-out ``val/rewards/accuracies`` and ``val/rewards/margins``
are printed at the start and the end. See :mod:`lit_rlhf.stages.dpo` for the algorithm.

    python -m lit_rlhf.experiments.dpo --config experiments/dpo/tiny.yaml --output_dir runs/dpo-tiny
    python -m lit_rlhf.experiments.dpo --model.loss=ipo --model.beta=0.5      # any knob from the command line
    python -m lit_rlhf.experiments.dpo --print_config > my.yaml                # complete, re-runnable config
    sbatch slurm/train.sbatch dpo --config experiments/dpo/qwen2.5-0.5b-ultrafeedback.yaml
"""

from lit_rlhf.cli import run_stage
from lit_rlhf.data.preference import PreferenceDataModule
from lit_rlhf.stages.dpo import DPOModule

TRAINER_DEFAULTS = {"max_steps": 120, "val_check_interval": 50, "check_val_every_n_epoch": None}


def main(args=None):
    return run_stage(DPOModule, PreferenceDataModule, "dpo", TRAINER_DEFAULTS, args=args, description=__doc__)


if __name__ == "__main__":
    main()
