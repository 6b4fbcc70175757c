"""The ``lit-rlhf`` console script: help, dispatch to the ``python -m lit_rlhf.experiments.<command>`` mains, env."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from lit_rlhf.experiments import main as cli

REPO = Path(__file__).resolve().parents[1]


def test_pyproject_declares_the_console_script():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["lit-rlhf"] == "lit_rlhf.experiments.main:main"


def test_help_lists_every_command_with_its_line(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("dpo", "sft", "rm", "ppo", "grpo", "pipeline", "sweep", "report", "env"):
        assert name in cli.COMMANDS
    for name, (_, help_) in cli.COMMANDS.items():
        assert any(line.split()[:1] == [name] and line.rstrip().endswith(help_) for line in out.splitlines()), name
    assert cli.main([]) == 2 and "usage: lit-rlhf <command>" in capsys.readouterr().err


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_every_command_resolves_to_a_main(name):
    module, function = cli.COMMANDS[name][0].split(":")
    assert module == f"lit_rlhf.experiments.{name}"  # the same as python -m lit_rlhf.experiments.<name>
    assert callable(getattr(importlib.import_module(module), function))


def test_unknown_command_suggests(capsys):
    assert cli.main(["dpx", "--help"]) == 2
    assert "unknown command 'dpx'; did you mean 'dpo'?" in capsys.readouterr().err


def test_dispatches_to_a_stage_with_its_arguments(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    argv = list(sys.argv)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["dpo", "--config", "experiments/dpo/tiny.yaml", "--model.beta=0.25", "--print_config"])
    assert exit_.value.code in (0, None)
    out = capsys.readouterr().out
    assert "beta: 0.25" in out and "name: tiny" in out
    assert sys.argv == argv  # restored
    with pytest.raises(SystemExit):
        cli.main(["dpo", "--help"])
    assert capsys.readouterr().out.startswith("usage: lit-rlhf dpo")


def test_dispatches_to_sweep_and_returns_its_code(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert cli.main(["sweep", "plan", "experiments/sweeps/dpo-tiny-beta.yaml", "--output_root", str(tmp_path)]) == 0
    assert "sweep 'dpo-tiny-beta': stage dpo, 3 cells" in capsys.readouterr().out
    assert cli.main(["sweep", "collect", str(tmp_path / "none.yaml")]) == 2


def test_env_prints_versions_device_threads_vllm(capsys):
    assert cli.main(["env"]) == 0
    out = capsys.readouterr().out
    names = [line.split()[0] for line in out.splitlines()]
    for name in (
        "python",
        "torch",
        "lightning",
        "transformers",
        "peft",
        "wandb",
        "datasets",
        "device",
        "threads",
        "vllm",
    ):
        assert name in names, name
    import torch

    assert f"torch uses {torch.get_num_threads()} threads" in out
    assert f"torch {torch.__version__}" in " ".join(out.split())


def test_module_entry_point():
    proc = subprocess.run(
        [sys.executable, "-m", "lit_rlhf.experiments.main", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0 and "report" in proc.stdout
