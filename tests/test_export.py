"""Exports: ``--export.dtype`` (the merged weights' dtype; default the training dtype), ``--export=false`` still
parsed, and a LoRA adapter that names its base model by its hub id rather than a local cache path."""

import json

import pytest
import torch
import yaml
from safetensors import safe_open

from lit_rlhf import models
from lit_rlhf.experiments import dpo


def safetensors_dtypes(directory) -> set[torch.dtype]:
    dtypes = set()
    for path in directory.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            dtypes |= {f.get_tensor(k).dtype for k in f.keys()}
    return dtypes


@pytest.fixture
def builtin_smollm2_dir(tmp_path, monkeypatch):
    """The tiny model saved where the built-in ``smollm2-135m`` is cached, with ``$LIT_RLHF_CACHE`` pointing there."""
    tokenizer = models.load_tokenizer("tiny")
    model = models.load_causal_lm(models.ModelSpec(name="tiny", lora=None))
    where = tmp_path / "cache" / "smollm2-135m"
    model.save_pretrained(where)
    tokenizer.save_pretrained(where)
    monkeypatch.setenv("LIT_RLHF_CACHE", str(tmp_path / "cache"))
    return where


def test_lora_export_in_bfloat16_records_the_hub_id(builtin_smollm2_dir, tmp_path):
    spec = models.ModelSpec(name="smollm2-135m", lora=models.LoRASettings(r=2, alpha=4))
    policy = models.load_causal_lm(spec)
    tokenizer = models.load_tokenizer("smollm2-135m")
    written = models.export_pretrained(policy, tokenizer, tmp_path / "export", spec, dtype="bfloat16")
    adapter = json.loads((tmp_path / "export" / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    merged = tmp_path / "export" / "merged"
    assert written["merged"] == str(merged) and safetensors_dtypes(merged) == {torch.bfloat16}
    assert json.loads((merged / "config.json").read_text())["dtype"] == "bfloat16"
    assert {p.dtype for p in policy.parameters()} == {torch.float32}, "the trained policy is not cast"


def test_full_export_keeps_the_training_dtype_unless_asked(tmp_path):
    spec = models.ModelSpec(name="tiny", lora=None)
    policy, tokenizer = models.load_causal_lm(spec), models.load_tokenizer("tiny")
    models.export_pretrained(policy, tokenizer, tmp_path / "fp32", spec)
    assert safetensors_dtypes(tmp_path / "fp32" / "merged") == {torch.float32}
    models.export_pretrained(policy, tokenizer, tmp_path / "bf16", spec, dtype="bfloat16")
    assert safetensors_dtypes(tmp_path / "bf16" / "merged") == {torch.bfloat16}
    assert {p.dtype for p in policy.parameters()} == {torch.float32}, "the trained policy is not cast"


def test_portable_id_leaves_other_paths_alone(builtin_smollm2_dir, tmp_path):
    assert models.portable_id(str(builtin_smollm2_dir)) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert models.portable_id(str(tmp_path / "my-model")) == str(tmp_path / "my-model")
    assert models.portable_id("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"


@pytest.mark.parametrize(
    "args, expected",
    [
        ([], {"enabled": True, "dtype": None}),
        (["--export=false"], False),
        (["--export.dtype=bfloat16"], {"enabled": True, "dtype": "bfloat16"}),
    ],
)
def test_export_option_parses_old_and_new_forms(args, expected, capsys):
    with pytest.raises(SystemExit):
        dpo.main(["--config", "experiments/dpo/tiny.yaml", *args, "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out)["export"] == expected
