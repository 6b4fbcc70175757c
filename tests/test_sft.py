"""SFT stage: masked NLL, packing without cross-example attention (or a clear refusal), CPU smoke run, export reload,
``--print_config`` round trip, every SFT YAML parses."""

import json
from pathlib import Path

import pytest
import torch

from lit_rlhf import models
from lit_rlhf.data.sft import SFTDataModule
from lit_rlhf.experiments import sft as sft_entry
from lit_rlhf.stages.sft import PackingError, check_packing, response_token_logps

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "experiments" / "sft" / "tiny.yaml")


@pytest.fixture(scope="module")
def tiny_lm():
    return models.load_causal_lm(models.ModelSpec(name="tiny", lora=None)).eval()


def test_masked_nll_ignores_prompt_tokens(tiny_lm):
    """Changing a scored token changes the loss; the logps returned are exactly those of the scored tokens."""
    dm = SFTDataModule(num_train=4, num_val=2, batch_size=2)
    dm.connect(models.load_tokenizer("tiny"))
    dm.setup()
    batch = dm.collate([[e] for e in dm.train_examples[:2]])
    with torch.no_grad():
        logps, hits = response_token_logps(tiny_lm, batch.input_ids, batch.attention_mask, batch.loss_mask)
        full = torch.log_softmax(
            tiny_lm(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float(), -1
        )
    assert logps.shape == hits.shape == (int(batch.loss_mask.sum()),)
    b, t = batch.loss_mask.nonzero(as_tuple=True)
    expected = full[b, t - 1, batch.input_ids[b, t]]
    torch.testing.assert_close(logps, expected, atol=1e-4, rtol=1e-4)


def test_packed_rows_equal_unpacked_examples(tiny_lm):
    """No cross-example attention: the logps of a packed row equal those of its examples run one by one."""
    dm = SFTDataModule(num_train=24, num_val=2, packing=True, max_length=200, batch_size=2)
    dm.connect(models.load_tokenizer("tiny"))
    dm.setup()
    rows = [r for r in dm.train_rows if len(r) > 1][:2]
    packed = dm.collate(rows)
    with torch.no_grad():
        got = response_token_logps(tiny_lm, packed.input_ids, None, packed.loss_mask, packed.position_ids)[0]
        alone = []
        for row in rows:
            for e in row:
                single = dm._collate_unpacked([[e]])
                alone.append(
                    response_token_logps(tiny_lm, single.input_ids, single.attention_mask, single.loss_mask)[0]
                )
        # and the same row WITHOUT restarting positions leaks across examples (the check has teeth)
        leaky = response_token_logps(tiny_lm, packed.input_ids, packed.attention_mask, packed.loss_mask)[0]
    torch.testing.assert_close(got, torch.cat(alone), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(leaky, torch.cat(alone), atol=1e-3)
    check_packing(tiny_lm, 49152)  # passes for Llama


class IgnoresPositionIds(torch.nn.Module):
    """A model whose attention cannot see packing: it drops position_ids (like absolute-position models would)."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kwargs):
        return self.lm(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


def test_packing_is_refused_when_examples_would_mix(tiny_lm):
    with pytest.raises(PackingError, match="packing refused: IgnoresPositionIds .* --data.packing=false"):
        check_packing(IgnoresPositionIds(tiny_lm), 49152)


def run(tmp_path, *extra):
    args = ["--config", TINY, "--output_dir", str(tmp_path), "--trainer.enable_progress_bar=false", *extra]
    return sft_entry.main(args=args)


@pytest.mark.slow
def test_sft_smoke_full_finetune_and_export(tmp_path):
    cli = run(tmp_path, "--trainer.max_steps=3", "--data.packing=true", "--data.max_length=256")
    summary = json.loads((tmp_path / "final_metrics.json").read_text())
    assert summary["global_step"] == 3
    for key in ("val/loss", "val/token_accuracy", "val/perplexity", "val/accuracy"):
        assert key in summary["start"] and key in summary["end"]
    assert torch.isfinite(torch.tensor(summary["train_last"]["train/loss"]))
    initial = models.load_causal_lm(models.ModelSpec(name="tiny", lora=None)).state_dict()
    trained = cli.model.policy.state_dict()
    assert any(not torch.equal(initial[k], trained[k]) for k in initial)
    assert (tmp_path / "config.yaml").exists() and (tmp_path / "checkpoints" / "last.ckpt").exists()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = tmp_path / "export" / "merged"
    lm, tok = AutoModelForCausalLM.from_pretrained(merged), AutoTokenizer.from_pretrained(merged)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is 12 + 30?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = lm.generate(**ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 4 or out[0, -1] == tok.eos_token_id
    torch.testing.assert_close(lm.state_dict()["model.embed_tokens.weight"], trained["model.embed_tokens.weight"])


@pytest.mark.slow
def test_sft_lora_exports_adapter_and_merged(tmp_path):
    run(
        tmp_path,
        "--trainer.max_steps=2",
        "--trainer.val_check_interval=2",
        "--model.policy.lora={r: 4, alpha: 8}",
        "--validate_before_fit=false",
    )
    assert (tmp_path / "export" / "adapter" / "adapter_config.json").exists()
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(tmp_path / "export" / "merged")
    assert not any("lora" in k for k in lm.state_dict())


def test_print_config_round_trips(tmp_path, capsys):
    with pytest.raises(SystemExit):
        sft_entry.main(args=["--config", TINY, "--data.packing=true", "--print_config"])
    printed = capsys.readouterr().out
    (tmp_path / "printed.yaml").write_text(printed)
    with pytest.raises(SystemExit):
        sft_entry.main(args=["--config", str(tmp_path / "printed.yaml"), "--print_config"])
    assert capsys.readouterr().out == printed
    assert "packing: true" in printed and "tokenizer" not in printed  # the data is given the policy's tokenizer


@pytest.mark.parametrize("config", sorted((ROOT / "experiments" / "sft").glob("*.yaml")), ids=lambda p: p.name)
def test_every_sft_yaml_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sft_entry.main(args=["--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    assert "model:" in capsys.readouterr().out
