"""Networks layer: built-in names and one name resolution, one tokenizer factory, LoRA config built once, EOS ids,
errors, LoRA reference without a second copy, atomic export."""

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
    spec = models.ModelSpec(
        name="tiny", lora=models.LoRASettings(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    )
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
            assert not torch.equal(
                q.base_layer.weight, before["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"]
            )
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


def test_names_resolve_once_for_every_network(tmp_path):
    """One resolution: built-ins (minilm-l6 included), directories, hub ids; a missing local path is a clear error."""
    where, gguf = models.resolve("minilm-l6")
    assert gguf is None and os.path.isfile(os.path.join(where, "config.json"))
    assert models.resolve(str(tmp_path)) == (str(tmp_path), None)
    assert models.resolve("Qwen/Qwen2.5-0.5B-Instruct") == ("Qwen/Qwen2.5-0.5B-Instruct", None)
    with pytest.raises(FileNotFoundError, match="not a hub id"):
        models.resolve("runs/rm/export/merged")


def test_one_tokenizer_factory_for_decoders_and_encoders():
    """Encoders get the plain-text template; decoders pad with EOS, or with another token for a reward model."""
    encoder = models.load_tokenizer("minilm-l6", for_reward_model=True)
    assert encoder.chat_template == models.ENCODER_TEMPLATE
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert encoder.apply_chat_template(messages, tokenize=False) == "[CLS] a [SEP] b [SEP] "
    policy, reward = models.load_tokenizer("tiny"), models.load_tokenizer("tiny", for_reward_model=True)
    assert policy.pad_token == policy.eos_token == "<|im_end|>" and reward.pad_token == "<|endoftext|>"
    assert models.turn_suffix(policy) == "<|im_end|>\n"


def test_lora_config_is_built_in_one_place():
    config = models.lora_config(
        models.LoRASettings(r=4, alpha=8, dropout=0.1, target_modules=["all-linear"]), "SEQ_CLS"
    )
    assert (config.r, config.lora_alpha, config.lora_dropout, config.target_modules) == (4, 8, 0.1, "all-linear")
    assert config.task_type == "SEQ_CLS" and models.lora_config(models.LoRASettings(), None).task_type is None
    assert set(models.lora_config(models.LoRASettings()).target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj"}


def test_eos_token_ids_join_the_tokenizer_and_the_generation_config():
    """GRPO and PPO stop at the same ids: the tokenizer's EOS and every generation-config EOS (Qwen has two)."""
    tok = models.load_tokenizer("tiny")
    lm = models.load_causal_lm(models.ModelSpec(name="tiny", lora=None))
    lm.generation_config.eos_token_id = [7, tok.eos_token_id]
    assert models.eos_token_ids(tok, lm) == sorted({7, tok.eos_token_id})
    lm.generation_config.eos_token_id = None
    assert models.eos_token_ids(tok, lm) == [tok.eos_token_id]
    tok.eos_token = None
    with pytest.raises(ValueError, match="no EOS token"):
        models.eos_token_ids(tok, lm)


def test_networks_import_no_data_stage_or_rl_module():
    """The networks layer (models, critics, reward_models) renders no dataset records and knows no RL: none of its
    modules imports lit_rlhf.data, a stage, or the RL modules, at the top of a file or inside a function."""
    import ast
    from pathlib import Path

    root = Path(models.__file__).parent
    banned = (
        "data",
        "stages",
        "rewards",
        "rollout",
        "experience",
        "advantages",
        "losses",
        "kl_control",
        "value_models",
    )
    found = []
    for name in ("models", "critics", "reward_models"):
        for node in ast.walk(ast.parse((root / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                imported = [a.name for a in node.names]
            else:
                continue
            found += [f"{name}: {m}" for m in imported if any(m.startswith(f"lit_rlhf.{b}") for b in banned)]
    assert not found
    assert not (root / "value_models.py").exists(), "critics.py holds the value networks, reward_models.py the scorer"
