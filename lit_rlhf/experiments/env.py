"""Environment entry point: ``python -m lit_rlhf.experiments.env`` (``lit-rlhf env``).

Prints what a run here would use, to paste into a bug report or to compare two machines: the versions of Python
and the libraries, the device, torch's thread count, whether vLLM (the optional rollout engine) imports, and the
offline switches that are set.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import platform
import sys

PACKAGES = ("lit_rlhf", "torch", "lightning", "transformers", "peft", "wandb", "datasets", "jsonargparse", "matplotlib")
SWITCHES = (
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "WANDB_MODE",
    "CUDA_VISIBLE_DEVICES",
    "OMP_NUM_THREADS",
)


def version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def device() -> str:
    import torch

    if torch.cuda.is_available():
        names = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
        return f"cuda: {torch.cuda.device_count()} x {', '.join(names)} (CUDA {torch.version.cuda})"
    if torch.backends.mps.is_available():
        return "mps (Apple GPU)"
    return "cpu (no CUDA or MPS device)"


def vllm() -> str:
    if importlib.util.find_spec("vllm") is None:
        return "not installed (optional: the vllm rollout engine)"
    try:
        import vllm as module
    except Exception as e:  # noqa: BLE001 - an installed vLLM can fail to import in many ways; report which
        return f"installed ({version('vllm')}) but does not import: {type(e).__name__}: {e}"
    return f"importable ({getattr(module, '__version__', version('vllm'))})"


def collect() -> dict[str, str]:
    """Name -> value, in the printed order."""
    import torch

    info = {"python": f"{platform.python_version()} ({sys.executable}; {platform.platform()})"}
    info.update({name: version(name) for name in PACKAGES})
    info["device"] = device()
    info["threads"] = f"torch uses {torch.get_num_threads()} threads; {os.cpu_count()} CPUs"
    info["vllm"] = vllm()
    info.update({name: os.environ[name] for name in SWITCHES if name in os.environ})
    return info


def main(argv: list[str] | None = None) -> int:
    formatter = argparse.RawDescriptionHelpFormatter
    argparse.ArgumentParser(prog="lit-rlhf env", description=__doc__, formatter_class=formatter).parse_args(argv)
    info = collect()
    width = max(map(len, info))
    for name, value in info.items():
        print(f"{name:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
