"""The paradigm comparison (DeepSeekMath §5.2, Figure 5): samples seen at each validation, mean ± std over seeds,
the tables and the PNG from synthetic pipeline runs, and the tiny paradigm pipeline end to end."""

import csv
import json
import math
from pathlib import Path

import pytest
import yaml

from lit_rlhf.experiments import paradigm as pd
from lit_rlhf.experiments import pipeline as pl

HEADER = ["epoch", "step", "train/loss", "val/accuracy"]


def test_grpo_points_count_completions_per_rollout_batch():
    # start row at 0; validations after 10 and 20 batches are logged at 9 and 19; the end-of-run one at 20
    val = {0: 0.5, 9: 0.6, 19: 0.7, 20: 0.7}
    assert pd.grpo_points(val, 0.5, 0.75, steps=20, per_step=32) == {0: 0.5, 320: 0.6, 640: 0.75}


def test_grpo_points_count_resampled_rounds_and_interval_one():
    # DAPO: batch 0 had one extra round, batch 2 two: 16, 8, 24 completions -> 16, 24, 48 seen
    points = pd.grpo_points({1: 0.3}, 0.1, 0.4, steps=3, per_step=8, resample_rounds={0: 1.0, 2: 2.0})
    assert points == {0: 0.1, 24: 0.3, 48: 0.4}
    # val_check_interval 1: the CSV's step 0 is the validation after the first batch (the start comes from the summary)
    assert pd.grpo_points({0: 0.2, 1: 0.3, 2: 0.35}, 0.0, 0.3, 2, 4, interval_one=True) == {0: 0.0, 4: 0.2, 8: 0.3}


def test_rft_points_and_stats():
    assert pd.rft_points(0.5, 0.6, 640) == {0: 0.5, 640: 0.6}
    mean, std, n = pd.stats([0.5, 0.75])
    assert (mean, n) == (0.625, 2) and std == pytest.approx(math.sqrt(2 * 0.125**2 / 1))
    assert pd.stats([1.0]) == (1.0, None, 1)


def write_step(run_dir: Path, name: str, stage: str, val: dict[int, float], start: float, end: float, steps: int):
    """A stage run directory as the stages write it: config.yaml, final_metrics.json, csv/version_0/metrics.csv."""
    d = run_dir / name
    (d / "csv" / "version_0").mkdir(parents=True)
    config = {"trainer": {"val_check_interval": 2}, "data": {"batch_size": 2}, "model": {"num_generations": 4}}
    (d / "config.yaml").write_text(yaml.safe_dump(config))
    final = {"stage": stage, "global_step": steps, "start": {pd.ACCURACY: start}, "end": {pd.ACCURACY: end}}
    (d / "final_metrics.json").write_text(json.dumps(final))
    with (d / "csv" / "version_0" / "metrics.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(HEADER)
        writer.writerow([0, 0, "", start])
        for step in range(steps):
            writer.writerow([0, step, 0.1, ""])
            if step in val:
                writer.writerow([0, step, "", val[step]])
        writer.writerow([1, steps, "", end])
    return d


@pytest.fixture
def two_seeds(tmp_path):
    """grpo-os in two seeds (2 prompts x 4 completions a step, validation every 2 of 4 steps), RFT in seed-0 only
    (32 samples), a PRM step (not a method) in seed-0, and the pipeline's wall times of grpo-os."""
    seeds = [tmp_path / "seed-0", tmp_path / "seed-1"]
    write_step(seeds[0], "grpo-os", "grpo", {1: 0.6, 3: 0.7}, 0.5, 0.7, 4)
    write_step(seeds[1], "grpo-os", "grpo", {1: 0.8, 3: 0.9}, 0.5, 0.9, 4)
    rft = write_step(seeds[0], "rft", "rft", {}, 0.5, 0.625, 4)
    (rft / "rft").mkdir()
    (rft / "rft" / "summary.json").write_text(json.dumps({"questions": 16, "num_samples": 2, "samples": 32}))
    write_step(seeds[0], "prm", "rm", {}, 0.1, 0.2, 4)
    for seed, seconds in zip(seeds, (90.0, 150.0)):
        (seed / pl.TIMES).write_text(json.dumps({"step": "grpo-os", "outcome": "ran", "seconds": seconds}) + "\n")
    return seeds


def test_read_runs_skips_other_stages_and_reads_wall_times(two_seeds):
    runs = pd.read_runs(two_seeds)
    assert sorted((r.method, r.run) for r in runs) == [("grpo-os", "seed-0"), ("grpo-os", "seed-1"), ("rft", "seed-0")]
    by = {(r.method, r.run): r for r in runs}
    assert by["grpo-os", "seed-1"].points == {0: 0.5, 16: 0.8, 32: 0.9}
    assert by["grpo-os", "seed-1"].wall_s == 150.0 and by["rft", "seed-0"].wall_s is None
    assert by["rft", "seed-0"].points == {0: 0.5, 32: 0.625}


def test_collect_writes_mean_std_tables_and_the_png(two_seeds, tmp_path):
    from matplotlib.image import imread

    out = tmp_path / "out"
    assert pd.main(["collect", *map(str, two_seeds), "--out", str(out)]) == 0
    md = (out / "results.md").read_text()
    # grpo-os: 16 samples: 0.6, 0.8 -> 0.700 ± 0.141; 32: 0.7, 0.9 -> 0.800 ± 0.141; wall 90, 150 s -> 2:00 ± 42 s
    assert "| GRPO+OS (rule outcome reward) | 2 | 0.500 ± 0.000 | 0.700 ± 0.141 | 0.800 ± 0.141 |" in md
    assert "0.500 → 0.800 (+0.300) | 2:00 ± 42 s |" in md
    assert "| RFT | 1 | 0.500 | – | 0.625 | 0.500 → 0.625 (+0.125) | – |" in md, "RFT in one seed: n=1"
    assert md.index("| RFT |") < md.index("| GRPO+OS"), "methods in the paper's order"
    rows = {r["method"]: r for r in csv.DictReader((out / "results.csv").open())}
    assert set(rows) == {"grpo-os", "rft"} and rows["grpo-os"]["n"] == "2" and rows["rft"]["acc@16_n"] == ""
    assert float(rows["grpo-os"]["acc@32_std"]) == pytest.approx(math.sqrt(0.02))
    assert float(rows["grpo-os"]["wall_s_mean"]) == 120.0
    points = list(csv.DictReader((out / "points.csv").open()))
    assert len(points) == 3 + 3 + 2
    image = imread(out / "accuracy_vs_samples.png")
    assert image.shape[:2] == (round(pd.PLOT_SIZE[1] * 100), round(pd.PLOT_SIZE[0] * 100))


def test_refuses_a_run_without_methods_or_a_step_without_metrics(tmp_path, capsys):
    (tmp_path / "empty" / "notes").mkdir(parents=True)  # an empty directory is no step
    with pytest.raises(ValueError, match=r"empty: no method step"):
        pd.read_runs([tmp_path / "empty"])
    running = tmp_path / "seed-0" / "grpo-os"
    running.mkdir(parents=True)
    (running / "config.yaml").write_text("{}")
    with pytest.raises(ValueError, match=r"seed-0/grpo-os: no final_metrics.json"):
        pd.read_runs([tmp_path / "seed-0"])
    (running / "final_metrics.json").write_text(json.dumps({"stage": "grpo", "global_step": 2, "start": {}}))
    with pytest.raises(ValueError, match=r"grpo-os: final_metrics.json has no start and end val/accuracy"):
        pd.read_runs([tmp_path / "seed-0"])
    assert pd.main(["collect", str(tmp_path / "nope"), "--out", str(tmp_path / "out")]) == 2
    assert "nope: no such run directory" in capsys.readouterr().err


def test_the_paradigm_spec_gives_every_method_the_same_sampling_budget():
    """Six methods from the SFT export, 640 sampled completions each (DeepSeekMath §5.2's equal footing)."""
    spec = pl.load_pipeline("experiments/paradigm/smollm2.yaml")
    assert [s.name for s in spec.steps] == list(pd.LABELS)
    for step in spec.steps:
        config = yaml.safe_load(Path(step.config).read_text())
        value = dict(config_values(config), **step.overrides).get
        assert config["model"]["policy"]["name"] == "runs/sft/export/merged" and config["data"]["num_val"] == 64
        if step.stage == "rft":
            assert value("data.num_train") * config["rft"]["num_samples"] == 640
        else:
            assert value("trainer.max_steps") * value("data.batch_size") * config["model"]["num_generations"] == 640
            assert value("trainer.val_check_interval") == 10
    assert pl.load_pipeline("experiments/paradigm/tiny.yaml").steps


def config_values(config: dict) -> dict:
    """The two-level keys of a config (``trainer.max_steps``) -> value."""
    return {f"{a}.{b}": v for a, section in config.items() if isinstance(section, dict) for b, v in section.items()}


@pytest.mark.slow
def test_tiny_paradigm_pipeline_and_collect(tmp_path):
    """One seed of the tiny paradigm pipeline (five methods, 2 steps each), then the collect command on it."""
    argv = ["run", "experiments/paradigm/tiny.yaml", "--in-process", "--output-root", str(tmp_path)]
    assert pl.main([*argv, "--run-name", "seed-0", "--set", "seed_everything=0", "--set", "rft:rft.seed=0"]) == 0
    run_dir, out = tmp_path / "seed-0", tmp_path / "out"
    assert pd.main(["collect", str(run_dir), "--out", str(out)]) == 0
    runs = {r.method: r for r in pd.read_runs([run_dir])}
    assert set(runs) == {"rft", "online-rft", "grpo-os", "grpo-ps", "grpo-online-rm"}
    assert sorted(runs["rft"].points) == [0, 32], "16 questions x 2 samples"
    for name in ("online-rft", "grpo-os", "grpo-ps", "grpo-online-rm"):
        assert sorted(runs[name].points) == [0, 12, 24], f"{name}: 3 prompts x 4 completions a step, 2 steps"
        assert runs[name].wall_s is not None and runs[name].wall_s > 0
    assert (out / "accuracy_vs_samples.png").stat().st_size > 0 and "Online RFT" in (out / "results.md").read_text()
