"""Every YAML under experiments/ parses with the parser of its directory (stage entry point or spec loader), and every
value it declares is the value the run gets."""

import importlib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "experiments").rglob("*.yaml"))
PIPELINE_LOADER = "lit_rlhf.experiments.pipeline:load_pipeline"
SPEC_LOADERS = {"sweeps": "lit_rlhf.sweep:load_spec", "pipeline": PIPELINE_LOADER, "paradigm": PIPELINE_LOADER}
STAGES = ("sft", "rft", "rm", "dpo", "ppo", "grpo", "distill")


def assert_declared(declared, parsed, where: str) -> None:
    """``parsed`` holds every value of ``declared`` (mappings may hold more: the defaults the YAML leaves out). YAML
    1.1 reads ``1e-4`` (no dot) as a string: a number parsed from it must equal it. A ``class_path`` may be given
    short (``ModelCheckpoint``) and printed in full (``lightning.pytorch.callbacks.ModelCheckpoint``)."""
    if isinstance(declared, dict):
        assert isinstance(parsed, dict), f"{where}: a mapping in the YAML, {parsed!r} after parsing"
        for key, value in declared.items():
            assert key in parsed, f"{where}.{key} is not an argument"
            if key == "class_path" and isinstance(value, str) and isinstance(parsed[key], str):
                assert parsed[key] == value or parsed[key].endswith("." + value), f"{where}.class_path: {parsed[key]}"
            else:
                assert_declared(value, parsed[key], f"{where}.{key}")
    elif isinstance(declared, list):
        assert isinstance(parsed, list) and len(parsed) == len(declared), f"{where}: {declared!r} -> {parsed!r}"
        for i, (d, p) in enumerate(zip(declared, parsed)):
            assert_declared(d, p, f"{where}[{i}]")
    elif isinstance(parsed, (int, float)) and not isinstance(parsed, bool) and isinstance(declared, (str, int, float)):
        assert float(declared) == pytest.approx(float(parsed)), f"{where}: {declared!r} -> {parsed!r}"
    else:
        assert declared == parsed, f"{where}: {declared!r} -> {parsed!r}"


def test_every_stage_has_a_tiny_config_whose_values_reach_the_run(tmp_path):
    """The tiny DPO config through the DPO entry point's own CLI: the module, the data module and the Trainer are built
    with the values it sets (not the entry point's or the classes' defaults, which differ from them)."""
    for stage in STAGES:
        assert (ROOT / "experiments" / stage / "tiny.yaml").is_file(), f"experiments/{stage}/tiny.yaml is missing"
    from lit_rlhf.cli import RLHFCLI
    from lit_rlhf.data.preference import PreferenceDataModule
    from lit_rlhf.experiments.dpo import TRAINER_DEFAULTS
    from lit_rlhf.stages.dpo import DPOModule

    path = ROOT / "experiments" / "dpo" / "tiny.yaml"
    declared = yaml.safe_load(path.read_text())
    args = ["--config", str(path), "--output_dir", str(tmp_path), "--wandb.mode=disabled"]
    cli = RLHFCLI(DPOModule, PreferenceDataModule, "dpo", TRAINER_DEFAULTS, args=args)
    assert declared["trainer"]["max_steps"] != TRAINER_DEFAULTS["max_steps"]
    assert cli.trainer.max_steps == declared["trainer"]["max_steps"] == 8
    assert cli.trainer.val_check_interval == declared["trainer"]["val_check_interval"]
    assert cli.model.hparams.beta == declared["model"]["beta"] and cli.model.hparams.loss == declared["model"]["loss"]
    policy, optimizer = dict(cli.model.hparams.policy), dict(cli.model.hparams.optimizer)
    assert policy["name"] == "tiny" and policy["lora"] is None and policy["dtype"] == "float32"
    assert optimizer["lr"] == pytest.approx(float(declared["model"]["optimizer"]["lr"]))
    assert cli.datamodule.hparams.batch_size == declared["data"]["batch_size"] == 4
    assert cli.datamodule.hparams.num_train == declared["data"]["num_train"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_config_parses(path, capsys):
    kind = path.relative_to(ROOT / "experiments").parts[0]
    if kind in SPEC_LOADERS:
        module, fn = SPEC_LOADERS[kind].split(":")
        assert getattr(importlib.import_module(module), fn)(str(path)) is not None
        return
    entry = importlib.import_module(f"lit_rlhf.experiments.{kind}")
    with pytest.raises(SystemExit) as exit_info:
        entry.main(args=["--config", str(path), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    declared = yaml.safe_load(path.read_text())
    assert_declared(declared, printed, path.name)
