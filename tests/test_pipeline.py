"""Pipelines: spec validation, the arguments each step gets, resumability, and SFT -> RM -> PPO on the tiny model."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from lit_rlhf.experiments import pipeline as pl

TINY_PIPELINE = "experiments/pipeline/sft-rm-ppo-tiny.yaml"


def write_spec(tmp_path: Path, spec: dict) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def base_spec() -> dict:
    return {
        "name": "chain",
        "steps": [
            {"name": "sft", "stage": "sft", "config": "experiments/sft/tiny.yaml"},
            {
                "name": "ppo",
                "stage": "ppo",
                "inputs": {"model.policy.name": "sft"},
                "overrides": {"trainer.max_steps": 2},
            },
        ],
    }


def test_every_shipped_pipeline_parses():
    specs = sorted(Path("experiments/pipeline").glob("*.yaml"))
    assert {p.name for p in specs} >= {"sft-rm-ppo-tiny.yaml", "sft-rm-ppo-smollm2.yaml", "sft-dpo-grpo-smollm2.yaml"}
    for path in specs:
        spec = pl.load_pipeline(path)
        assert spec.steps and all(s.stage in pl.STAGES for s in spec.steps)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda s: s.update(colour="red"), "unknown key"),
        (lambda s: s["steps"][1].update(name="sft"), "duplicate step"),
        (lambda s: s["steps"][1].update(stage="kto"), "unknown stage"),
        (lambda s: s["steps"][0].update(config="experiments/sft/nope.yaml"), "not found"),
        (lambda s: s["steps"][1].update(inputs={"model.policy.name": "ppo"}), "earlier step"),
        (lambda s: s["steps"][1]["overrides"].update({"model.policy.name": "x"}), "set twice"),
        (lambda s: s["steps"][1]["overrides"].update({"wandb.group": "x"}), "set by the pipeline"),
        (lambda s: s["steps"][0].update(name="a/b"), "step name"),
        (lambda s: s.update(steps=[]), "non-empty"),
    ],
)
def test_bad_specs_are_rejected(tmp_path, mutate, match):
    spec = base_spec()
    mutate(spec)
    with pytest.raises(ValueError, match=match):
        pl.load_pipeline(write_spec(tmp_path, spec))


def test_step_args_pass_exports_by_path_and_one_wandb_group(tmp_path):
    spec = pl.load_pipeline(write_spec(tmp_path, base_spec()))
    args = pl.step_args(spec, spec.steps[1], tmp_path / "run", "chain-7")
    assert args[:2] == ["--output_dir", str(tmp_path / "run" / "ppo")]
    assert "--trainer.max_steps=2" in args
    assert f"--model.policy.name={tmp_path / 'run' / 'sft' / 'export' / 'merged'}" in args
    assert "--wandb.group=chain-7" in args and "--wandb.name=chain-7-ppo" in args
    assert '--wandb.tags=["chain","ppo"]' in args
    first = pl.step_args(spec, spec.steps[0], tmp_path / "run", "chain-7")
    assert first[:2] == ["--config", "experiments/sft/tiny.yaml"] and "--wandb.group=chain-7" in first


def test_set_overrides_every_step_or_one_and_wins_over_the_spec(tmp_path):
    spec = pl.load_pipeline(write_spec(tmp_path, base_spec()))
    sets = ["seed_everything=1", "trainer.max_steps=5", "ppo:model.beta=0.5", "sft:data.path=a:b.jsonl"]
    spec = pl.with_overrides(spec, sets)
    sft, ppo = (pl.step_args(spec, s, tmp_path / "run", "chain") for s in spec.steps)
    assert "--seed_everything=1" in sft and "--seed_everything=1" in ppo
    assert "--trainer.max_steps=5" in ppo and "--trainer.max_steps=2" not in ppo, "--set wins over the step's override"
    assert "--model.beta=0.5" in ppo and not any(a.startswith("--model.beta") for a in sft)
    assert "--data.path=a:b.jsonl" in sft, "a value may hold ':'"
    assert pl.with_overrides(spec, ["x=[1, 2]"]).steps[0].overrides["x"] == [1, 2], "values are read as YAML"


@pytest.mark.parametrize(
    "item,match",
    [
        ("seed_everything", "KEY=VALUE"),
        ("=1", "KEY=VALUE"),
        ("rm:model.beta=1", "unknown step 'rm'"),
        ("model.policy.name=x", "set twice"),  # the ppo step's input
        ("output_dir=x", "set by the pipeline"),
        ("sft:wandb.group=x", "set by the pipeline"),
    ],
)
def test_bad_set_is_refused(tmp_path, item, match):
    spec = pl.load_pipeline(write_spec(tmp_path, base_spec()))
    with pytest.raises(ValueError, match=match):
        pl.with_overrides(spec, [item])


def test_plan_shows_set_overrides(tmp_path, capsys):
    path = write_spec(tmp_path, {**base_spec(), "output_root": str(tmp_path / "out")})
    assert pl.main(["plan", str(path), "--run-name", "seed-1", "--set", "seed_everything=1", "--set", "ppo:x=y"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all("--seed_everything=1" in line for line in lines)
    assert "--x=y" in lines[1] and "--x=y" not in lines[0] and str(tmp_path / "out" / "seed-1" / "ppo") in lines[1]
    with pytest.raises(SystemExit) as exit_:
        pl.main(["plan", str(path), "--set", "output_dir=z"])
    assert exit_.value.code == 2 and "set by the pipeline" in capsys.readouterr().err


def test_step_status_and_resume(tmp_path, monkeypatch):
    """new -> partial (a checkpoint) -> done (final metrics + export); done steps are skipped, partial ones resume."""
    step_dir = tmp_path / "out" / "chain" / "sft"
    assert pl.step_status(step_dir) == "new"
    (step_dir / "checkpoints").mkdir(parents=True)
    (step_dir / "checkpoints" / "last.ckpt").write_text("x")
    assert pl.step_status(step_dir) == "new", "a checkpoint that does not load is no resume point"
    torch.save({"global_step": 2}, step_dir / "checkpoints" / "last.ckpt")
    assert pl.step_status(step_dir) == "partial"
    calls = []

    def fake_main(args):
        calls.append(args)
        out = Path(args[args.index("--output_dir") + 1])
        (out / "export" / "merged").mkdir(parents=True, exist_ok=True)
        (out / "final_metrics.json").write_text("{}")

    import lit_rlhf.experiments.ppo as ppo_entry
    import lit_rlhf.experiments.sft as sft_entry

    monkeypatch.setattr(sft_entry, "main", fake_main)
    monkeypatch.setattr(ppo_entry, "main", fake_main)
    spec = pl.load_pipeline(write_spec(tmp_path, {**base_spec(), "output_root": str(tmp_path / "out")}))
    assert pl.run(spec, in_process=True) == {"sft": "resumed", "ppo": "ran"}
    assert "--ckpt_path=" + str(step_dir / "checkpoints" / "last.ckpt") in calls[0]
    assert pl.step_status(step_dir) == "done"
    assert pl.run(spec, in_process=True) == {"sft": "done", "ppo": "done"} and len(calls) == 2, (
        "resumable: nothing reruns"
    )
    assert pl.run(spec, in_process=True, force=("ppo",)) == {"sft": "done", "ppo": "ran"} and len(calls) == 3
    assert "--overwrite" in calls[2] and "--overwrite" not in calls[1], "a forced step starts over in its directory"
    times = [json.loads(line) for line in (tmp_path / "out" / "chain" / pl.TIMES).read_text().splitlines()]
    assert [(t["step"], t["outcome"]) for t in times] == [("sft", "resumed"), ("ppo", "ran"), ("ppo", "ran")]
    assert all(t["seconds"] >= 0 and t["finished"].endswith("Z") for t in times)


def test_skipping_needs_an_export(tmp_path):
    spec = pl.load_pipeline(write_spec(tmp_path, {**base_spec(), "output_root": str(tmp_path / "out")}))
    with pytest.raises(FileNotFoundError, match="skipped"):
        pl.run(spec, in_process=True, skip=("sft",))


@pytest.mark.slow
def test_tiny_sft_rm_ppo_pipeline(tmp_path):
    """The three stages on the tiny model, each passing its export on by path; a second run skips all of them."""
    assert pl.main(["run", TINY_PIPELINE, "--in-process", "--output-root", str(tmp_path), "--run-name", "ci"]) == 0
    run_dir = tmp_path / "ci"
    for step in ("sft", "rm", "ppo"):
        assert pl.step_status(run_dir / step) == "done"
    ppo_config = yaml.safe_load((run_dir / "ppo" / "config.yaml").read_text())
    assert ppo_config["model"]["policy"]["name"] == str(run_dir / "sft" / "export" / "merged")
    assert ppo_config["model"]["reward_model"]["path"] == str(run_dir / "rm" / "export" / "merged")
    assert ppo_config["model"]["critic"]["init"] == "reward_model"
    assert ppo_config["wandb"]["group"] == "ci"
    summary = json.loads((run_dir / "ppo" / "final_metrics.json").read_text())
    assert summary["global_step"] == 2 and "val/rewards/mean" in summary["end"]
    spec = pl.load_pipeline(TINY_PIPELINE)
    spec = pl.PipelineSpec(spec.name, spec.steps, str(tmp_path), spec.tags)
    assert pl.run(spec, "ci", in_process=True) == {"sft": "done", "rm": "done", "ppo": "done"}
