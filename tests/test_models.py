"""Model factory: built-in names, errors, LoRA reference without a second copy, atomic export."""

import os

import pytest
import torch

from lit_rlhf import models
from lit_rlhf.io import atomic_dir


def test_unknown_model_lists_builtins():
    with pytest.raises(ValueError, match=r"unknown model 'gpt-nano'.*tiny, smollm2-135m"):
        models.load_causal_lm(models.ModelSpec(name="gpt-nano"))


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        models.load_causal_lm(models.ModelSpec(name=str(tmp_path / "model.gguf")))


def test_tiny_is_deterministic_from_seed():
    a = models.load_causal_lm(models.ModelSpec(name="tiny", lora=None, seed=3))
    b = models.load_causal_lm(models.ModelSpec(name="tiny", lora=None, seed=3))
    c = models.load_causal_lm(models.ModelSpec(name="tiny", lora=None, seed=4))
    wa, wb, wc = (m.model.layers[0].mlp.up_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    cfg = a.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size) == (256, 4, 4, 1024)
    assert cfg.tie_word_embeddings and cfg.vocab_size == 49152


def test_bf16_selectable():
    m = models.load_causal_lm(models.ModelSpec(name="tiny", lora=None, dtype="bfloat16"))
    assert next(m.parameters()).dtype == torch.bfloat16


def test_lora_reference_is_the_adapter_disabled_policy():
    """With LoRA the reference shares the policy's weights: no second copy, and it equals the base model."""
    spec = models.ModelSpec(name="tiny", lora=models.LoRASettings(r=4, alpha=8, target_modules=["all-linear"]))
    policy = models.load_causal_lm(spec)
    base = models.load_causal_lm(models.ModelSpec(name="tiny", lora=None))
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_()  # make the adapter non-trivial
    ids = torch.randint(0, 1000, (2, 8))
    with torch.no_grad():
        adapted = policy(input_ids=ids).logits
        with models.reference_policy(policy, None) as ref:
            assert ref is policy
            ref_logits = ref(input_ids=ids).logits
        base_logits = base(input_ids=ids).logits
    torch.testing.assert_close(ref_logits, base_logits, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(adapted, base_logits, atol=1e-3)
    assert models.trainable_parameters(policy) < sum(p.numel() for p in policy.parameters()) / 10


def test_merged_lora_equals_the_adapter_and_restores_the_base_weights_bit_for_bit():
    """Sampling runs LoRA folded into the weights: same logits as the adapter path; afterwards the base weights are
    the very same tensors, the adapter is active again and gradients still reach it."""
    spec = models.ModelSpec(name="tiny", lora=models.LoRASettings(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    policy = models.load_causal_lm(spec)
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    ids = torch.randint(0, 1000, (2, 8))
    with torch.no_grad():
        adapted = policy(input_ids=ids).logits
        with models.merged_lora(policy) as merged:
            merged_logits = merged(input_ids=ids).logits
            q = merged.base_model.model.model.layers[0].self_attn.q_proj
            assert not torch.equal(q.base_layer.weight, before["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"])
        with models.reference_policy(policy, None) as ref:
            base_logits = ref(input_ids=ids).logits
    torch.testing.assert_close(merged_logits, adapted, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(adapted, base_logits, atol=1e-3)
    after = dict(policy.named_parameters())
    assert after.keys() == before.keys() and all(torch.equal(after[n], before[n]) for n in before)
    assert all(after[n].requires_grad == ("lora_" in n) for n in after)
    policy(input_ids=ids).logits.sum().backward()
    assert all(p.grad is not None for n, p in policy.named_parameters() if "lora_" in n)
    plain = models.load_causal_lm(models.ModelSpec(name="tiny", lora=None))
    with models.merged_lora(plain) as same:
        assert same is plain


def test_full_finetune_reference_is_a_frozen_copy():
    policy = models.load_causal_lm(models.ModelSpec(name="tiny", lora=None))
    frozen = models.frozen_copy(policy)
    assert not any(p.requires_grad for p in frozen.parameters()) and not frozen.training
    with models.reference_policy(policy, frozen) as ref:
        assert ref is frozen


def test_atomic_dir_leaves_nothing_on_crash(tmp_path):
    target = tmp_path / "export" / "merged"
    with atomic_dir(target) as tmp:
        (tmp / "ok.txt").write_text("v1")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "ok.txt").write_text("half")
            raise RuntimeError("crash mid-write")
    assert (target / "ok.txt").read_text() == "v1", "the previous export survives a crashed rewrite"
    assert sorted(os.listdir(target.parent)) == ["merged"], "no temporary directory is left behind"
