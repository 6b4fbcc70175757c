"""Every YAML under experiments/ parses with the parser of its directory (stage entry point or spec loader)."""

import importlib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "experiments").rglob("*.yaml"))
SPEC_LOADERS = {"sweeps": "lit_rlhf.sweep:load_spec", "pipeline": "lit_rlhf.experiments.pipeline:load_pipeline"}


def test_there_are_configs():
    assert any(p.parent.name == "dpo" for p in CONFIGS)


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
    for section in ("model", "data"):
        for key in declared.get(section) or {}:
            assert key in printed[section], f"{path.name}: {section}.{key} is not an init argument"
