"""DPO stage end to end on the tiny model (CPU): learning signal, export, W&B read-back, cache, resume."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from lit_rlhf.experiments import dpo as dpo_entry
from tests.wandb_readback import history, logged_config, offline_records

TINY = "experiments/dpo/tiny.yaml"


def run(tmp_path: Path, *extra: str, name: str = "run"):
    out = tmp_path / name
    cli = dpo_entry.main(args=["--config", TINY, "--output_dir", str(out), *extra])
    return cli, out


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dpo")
    from lit_rlhf import models

    initial = models.load_causal_lm(models.ModelSpec(name="tiny", lora=None)).state_dict()
    cli, out = run(tmp)
    return cli, out, initial


def test_smoke_learns_and_changes_weights(tiny_run):
    cli, out, initial = tiny_run
    summary = json.loads((out / "final_metrics.json").read_text())
    start, end = summary["start"], summary["end"]
    assert summary["global_step"] == 8
    assert start["val/rewards/margins"] == pytest.approx(0.0, abs=1e-6), "policy == reference at step 0"
    assert start["val/loss"] == pytest.approx(0.6931472, abs=1e-6), "log 2 when policy == reference"
    assert all(torch.isfinite(torch.tensor(v)) for v in end.values())
    # 16 pairs, 4 per step: steps 5-8 revisit the pairs of steps 1-4, which must now score better
    losses = [r["train/loss"] for r in history(offline_records(str(out))) if "train/loss" in r]
    assert sum(losses[4:]) < sum(losses[:4]) - 0.05, losses
    trained = cli.model.policy.state_dict()
    changed = [k for k in initial if not torch.equal(initial[k], trained[k])]
    assert len(changed) >= len(initial) // 2, "a full fine-tune updates the weights"


def test_export_reloads_and_generates(tiny_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cli, out, _ = tiny_run
    merged = out / "export" / "merged"
    model = AutoModelForCausalLM.from_pretrained(merged)
    tok = AutoTokenizer.from_pretrained(merged)
    trained = cli.model.policy.state_dict()
    torch.testing.assert_close(
        model.state_dict()["model.layers.0.mlp.up_proj.weight"], trained["model.layers.0.mlp.up_proj.weight"]
    )
    enc = tok("What is 2 + 2?", return_tensors="pt")
    gen = model.generate(**enc, max_new_tokens=5, do_sample=False)
    assert gen.shape[1] == enc["input_ids"].shape[1] + 5
    assert (out / "checkpoints" / "last.ckpt").exists() and (out / "config.yaml").exists()


def test_wandb_offline_run_holds_metrics_config_and_table(tiny_run):
    _, out, _ = tiny_run
    records = offline_records(str(out))
    rows = history(records)
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(losses) == 8 and all(isinstance(x, float) for x in losses)
    for key in (
        "train/rewards/accuracies",
        "train/rewards/margins",
        "train/logps/chosen",
        "perf/tokens_per_s",
        "perf/mfu",
    ):
        assert any(key in r for r in rows), key
    val = [r["val/rewards/accuracies"] for r in rows if "val/rewards/accuracies" in r]
    assert len(val) >= 3, "validation at step 0, during fit and at the end"
    assert any("val/samples" in k for r in rows for k in r), "the sample table was logged"
    config = json.dumps(logged_config(records))
    assert "beta" in config and "tiny" in config, "the resolved config is in the run"


def test_lora_run_exports_adapter_and_merged(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    lora = [
        "--model.policy.lora.r=4",
        "--model.policy.lora.alpha=8",
        "--trainer.max_steps=2",
        "--data.num_train=8",
        "--wandb.mode=disabled",
    ]
    cli, out = run(tmp_path, "--model.policy.lora={}", *lora)
    assert (out / "export" / "adapter" / "adapter_config.json").exists()
    base = AutoModelForCausalLM.from_pretrained(out / "export" / "merged")
    ids = torch.randint(0, 1000, (1, 6))
    with torch.no_grad():
        merged_logits = base(input_ids=ids).logits
        policy_logits = cli.model.policy.eval()(input_ids=ids).logits
    torch.testing.assert_close(merged_logits, policy_logits, atol=1e-4, rtol=1e-4)
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
    assert all("lora_" in k for k in ckpt["state_dict"]), "checkpoints hold only trainable weights"
    assert isinstance(cli.model.policy, PeftModel)


def test_cached_reference_equals_online_and_is_reused(tmp_path):
    common = [
        "--trainer.max_steps=2",
        "--data.num_train=8",
        "--data.num_val=4",
        "--wandb.mode=disabled",
        "--validate_before_fit=false",
    ]
    cache = tmp_path / "refcache"
    _, online = run(tmp_path, *common, name="online")
    _, cached = run(tmp_path, *common, "--model.reference=cached", f"--model.ref_cache_dir={cache}", name="cached")
    files = list(cache.glob("ref_logps-*.pt"))
    assert len(files) == 1
    table = torch.load(files[0])
    assert len(table) == 12
    stamp = files[0].stat().st_mtime_ns
    run(tmp_path, *common, "--model.reference=cached", f"--model.ref_cache_dir={cache}", name="again")
    assert files[0].stat().st_mtime_ns == stamp, "the second run reuses the cache file"
    a, b = (json.loads((d / "final_metrics.json").read_text()) for d in (online, cached))
    for key in ("train/loss", "train/rewards/margins", "train/logps/chosen"):
        assert a["train_last"][key] == pytest.approx(b["train_last"][key], abs=1e-5), key
    for key in ("val/loss", "val/rewards/margins"):
        assert a["end"][key] == pytest.approx(b["end"][key], abs=1e-5), key


def test_print_config_round_trips(tmp_path, capsys):
    with pytest.raises(SystemExit):
        dpo_entry.main(args=["--config", TINY, "--model.beta=0.25", "--print_config"])
    printed = capsys.readouterr().out
    config = yaml.safe_load(printed)
    assert config["model"]["beta"] == 0.25 and config["model"]["policy"]["name"] == "tiny"
    path = tmp_path / "printed.yaml"
    path.write_text(printed)
    with pytest.raises(SystemExit):
        dpo_entry.main(args=["--config", str(path), "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out) == config


def test_resume_from_checkpoint_continues_steps(tmp_path):
    common = ["--wandb.mode=disabled", "--data.num_train=32"]
    _, out = run(tmp_path, "--trainer.max_steps=4", *common, name="first")
    cli, _ = run(
        tmp_path,
        "--trainer.max_steps=6",
        "--ckpt_path",
        str(out / "checkpoints" / "last.ckpt"),
        *common,
        name="resumed",
    )
    assert cli.trainer.global_step == 6


@pytest.mark.parametrize("loss, beta", [("dpo", 0.0), ("dpo", -0.1), ("ipo", 0.0), ("hinge", float("nan"))])
def test_beta_that_cannot_learn_is_refused_at_construction(loss, beta):
    """beta = 0 makes every DPO-family loss flat in the policy (IPO divides by it), beta < 0 prefers the rejected
    response: refused when the module is built (before a model or a file exists), and by the loss functions."""
    from lit_rlhf.losses import PREFERENCE_LOSSES
    from lit_rlhf.stages.dpo import DPOModule

    with pytest.raises(ValueError, match=rf"model\.beta must be a positive number, got {beta}: the {loss} loss"):
        DPOModule(loss=loss, beta=beta)
    logps = torch.zeros(2)
    with pytest.raises(ValueError, match="beta must be > 0"):
        PREFERENCE_LOSSES[loss](logps, logps, logps, logps, beta=beta)


def test_label_smoothing_is_checked_at_construction():
    from lit_rlhf.stages.dpo import DPOModule

    with pytest.raises(ValueError, match=r"model\.label_smoothing must be in \[0, 0\.5\), got 0\.5"):
        DPOModule(label_smoothing=0.5)
    with pytest.raises(ValueError, match=r"model\.label_smoothing applies to 'dpo' and 'robust_dpo', not 'ipo'"):
        DPOModule(loss="ipo", label_smoothing=0.1)
