"""lit_rlhf.report: curves read from Lightning CSV files, PNG figures, markdown summaries, overlays, sweeps."""

from __future__ import annotations

import csv
import json
import re
import struct
from pathlib import Path

import pytest

from lit_rlhf import report as rp
from lit_rlhf.experiments import report as report_cli

GRPO_ROWS = [  # as Lightning's CSVLogger writes them: a row per log call, empty cells for the other metrics
    {"step": 0, "val/accuracy": 0.25, "val/rewards/mean": 0.1},
    {
        "step": 0,
        "train/loss": 1.0,
        "train/rewards/mean": 0.2,
        "train/rewards/std": 0.1,
        "train/kl": 0.0,
        "train/completions/mean_length": 10,
        "train/lr": 1e-3,
    },
    {
        "step": 1,
        "train/loss": 0.5,
        "train/rewards/mean": 0.5,
        "train/rewards/std": 0.2,
        "train/kl": 0.01,
        "train/completions/mean_length": 12,
        "train/lr": 1e-3,
    },
    {
        "step": 2,
        "train/loss": 0.75,
        "train/rewards/mean": 0.4,
        "train/rewards/std": 0.1,
        "train/kl": 0.02,
        "train/completions/mean_length": 11,
        "train/lr": 5e-4,
    },
    {"step": 2, "val/accuracy": 0.75, "val/rewards/mean": 0.6},
]
PPO_ROWS = [  # the shared schema's names (README "Metric schema"), plus PPO-only ones that are not curves
    {"step": 0, "val/rewards/mean": 0.0, "val/kl": 0.0, "val/kl_sequence": 0.0, "val/completions/mean_length": 9},
    {
        "step": 0,
        "train/rewards/mean": 0.1,
        "train/rewards/std": 0.3,
        "train/kl": 0.5,
        "train/kl_sequence": 4.0,
        "train/completions/mean_length": 8,
        "train/value_loss": 0.2,
    },
    {
        "step": 1,
        "train/rewards/mean": 0.3,
        "train/rewards/std": 0.2,
        "train/kl": 0.7,
        "train/kl_sequence": 5.0,
        "train/completions/mean_length": 7,
        "train/value_loss": 0.1,
    },
    {"step": 1, "val/rewards/mean": 0.4, "val/kl": 0.6, "val/kl_sequence": 3.0, "val/completions/mean_length": 6},
]


def write_csv(path: Path, rows: list[dict]) -> Path:
    columns = ["epoch", *sorted({k for r in rows for k in r if k != "step"}), "step"]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows({"epoch": 0, **r} for r in rows)
    return path


def fake_run(run_dir: Path, rows: list[dict], stage: str = "grpo", end: dict | None = None) -> Path:
    write_csv(run_dir / "csv" / "version_0" / "metrics.csv", rows)
    final = {"stage": stage, "global_step": 2, "start": {"val/accuracy": 0.25}, "end": end or {"val/accuracy": 0.75}}
    (run_dir / "final_metrics.json").write_text(json.dumps(final))
    return run_dir


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def test_one_run_png_and_markdown_numbers(tmp_path):
    run_dir = fake_run(tmp_path / "grpo-run", GRPO_ROWS)
    written = rp.report([run_dir])
    assert written == [run_dir / "report.png", run_dir / "report.md"]
    width, height = png_size(run_dir / "report.png")  # 6 panels: loss, reward, KL, accuracy, length, lr -> 3 x 2
    assert (width, height) == (1440, 700)
    assert (run_dir / "report.png").stat().st_size > 20_000  # drawn, not blank
    md = (run_dir / "report.md").read_text()
    assert "![curves](report.png)" in md and "stage grpo · global_step 2" in md
    for line in [  # first, last, best (direction), points: the CSV's values
        "| train/loss | 1 | 0.75 | 0.5 (min) | 3 |",
        "| train/rewards/mean | 0.2 | 0.4 | 0.5 (max) | 3 |",
        "| val/rewards/mean | 0.1 | 0.6 | 0.6 (max) | 2 |",
        "| train/kl | 0 | 0.02 | – | 3 |",
        "| val/accuracy | 0.25 | 0.75 | 0.75 (max) | 2 |",
        "| train/completions/mean_length | 10 | 11 | – | 3 |",
        "| train/lr | 0.001 | 0.0005 | – | 3 |",
        "| val/accuracy | 0.25 | 0.75 |",  # final_metrics.json: start, end
    ]:
        assert line in md.splitlines(), line
    assert "train/rewards/std" not in md  # a band, not a curve


def test_ppo_names_and_out_dir(tmp_path):
    """PPO logs GRPO's names for the shared meanings (reward mean, token KL, completion length): the same panels."""
    run_dir = fake_run(tmp_path / "ppo-run", PPO_ROWS, stage="ppo")
    run = rp.load_run(run_dir)
    picks = {c.title: [rp.pick(c, s, run.metrics) for s in rp.SPLITS] for c in rp.CURVES}
    assert picks["reward"] == ["train/rewards/mean", "val/rewards/mean"]
    assert picks["KL"] == ["train/kl", "val/kl"]
    assert picks["completion length"] == ["train/completions/mean_length", "val/completions/mean_length"]
    assert picks["loss"] == [None, None]
    out = tmp_path / "elsewhere"
    assert report_cli.main([str(run_dir), "--out", str(out)]) == 0
    assert png_size(out / "report.png") == (1440, 370)  # reward, KL, length: one row of 3
    assert "| train/rewards/mean | 0.1 | 0.3 | 0.3 (max) | 2 |" in (out / "report.md").read_text()
    assert not (run_dir / "report.png").exists()


def test_resumed_versions_join_and_a_csv_path_is_a_run(tmp_path):
    run_dir = tmp_path / "run"
    versions = {0: {0: 1.0, 1: 2.0}, 1: {1: 0.5, 2: 0.25}, 10: {3: 0.125}}  # version_10 comes after version_1
    for version, losses in versions.items():
        rows = [{"step": step, "train/loss": loss} for step, loss in losses.items()]
        write_csv(run_dir / "csv" / f"version_{version}" / "metrics.csv", rows)
    run = rp.load_run(run_dir)
    assert run.metrics == {"train/loss": {0: 1.0, 1: 0.5, 2: 0.25, 3: 0.125}}
    assert rp.summary(run.metrics["train/loss"], "min") == (1.0, 0.125, 0.125)
    alone = rp.load_run(run_dir / "csv" / "version_1" / "metrics.csv")
    assert alone.name == "run" and alone.metrics == {"train/loss": {1: 0.5, 2: 0.25}}


def test_several_runs_overlay(tmp_path):
    a = fake_run(tmp_path / "a" / "grpo", GRPO_ROWS)
    b = fake_run(tmp_path / "b" / "grpo", GRPO_ROWS[:3])
    out = tmp_path / "cmp"
    written = rp.report([a, b], out)
    assert set(written) == {out / "a_grpo.png", out / "b_grpo.png", out / "overlay.png", out / "report.md"}
    width, height = png_size(out / "overlay.png")  # 8 panels (curve x split) -> 3 x 3
    assert (width, height) == (1440, 1030)
    md = (out / "report.md").read_text()
    assert "## a/grpo" in md and "## b/grpo" in md and "| train/loss | 1 | 0.5 | 0.5 (min) | 2 |" in md
    rp.report([a, b])  # no --out: each run's figure in its directory, the overlay in their common parent
    assert (a / "report.png").is_file() and (tmp_path / "overlay.png").is_file()


def test_mean_std_over_seeds():
    steps, means, stds = rp.mean_std([{0: 1.0, 1: 2.0}, {0: 3.0, 2: 5.0}])
    assert steps == [0, 1, 2] and means == [2.0, 2.0, 5.0]
    assert stds == [pytest.approx(2**0.5), 0.0, 0.0]


def test_sweep_dir_groups_by_grid_values(tmp_path):
    """Cells with cell.json (as run-cell writes it): 2 betas x 2 seeds; the group table holds mean ± sample std."""
    sweep = tmp_path / "demo"
    lasts = {(0.1, 0): 0.5, (0.1, 1): 0.7, (0.5, 0): 0.2, (0.5, 1): 0.2}
    for i, ((beta, seed), last) in enumerate(lasts.items()):
        cell = fake_run(sweep / f"cell-{i:03d}", [{"step": 0, "train/loss": 1.0}, {"step": 1, "train/loss": last}])
        (cell / "cell.json").write_text(json.dumps({"params": {"model.beta": beta}, "seed": seed}))
    (sweep / "cell-004").mkdir()  # never ran: left out
    assert rp.is_sweep(sweep) and not rp.is_sweep(sweep / "cell-000")
    written = rp.report([sweep])
    assert written == [sweep / "report.png", sweep / "report.md"]
    assert png_size(sweep / "report.png") == (480, 370)  # one panel: loss (train)
    md = (sweep / "report.md").read_text().splitlines()
    assert "| group | seeds | train/loss |" in md
    assert "| beta=0.1 | 2 | 0.6 ± 0.141421 |" in md and "| beta=0.5 | 2 | 0.2 ± 0 |" in md
    assert sum(line.startswith("## cell-") for line in md) == 4


def test_errors(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert report_cli.main([str(tmp_path / "empty")]) == 2
    assert "neither a metrics CSV" in capsys.readouterr().err
    assert report_cli.main([str(tmp_path / "nope")]) == 2
    run = tmp_path / "no-curves"  # final_metrics.json only (e.g. a W&B-only run): markdown, no figure
    run.mkdir()
    final = {"stage": "dpo", "start": {"val/loss": 0.7}, "end": {"val/loss": 0.5}}
    (run / "final_metrics.json").write_text(json.dumps(final))
    assert rp.report([run]) == [run / "report.md"]
    assert "| val/loss | 0.7 | 0.5 |" in (run / "report.md").read_text()


def test_sweep_spec_names_its_cells(tmp_path):
    """A spec target finds its cells by the spec (grid values from the spec, no cell.json needed)."""
    spec_path = tmp_path / "s.yaml"
    spec_path.write_text(f"name: s\nstage: dpo\noutput_root: {tmp_path}\ngrid: {{model.loss: [dpo, ipo]}}\n")
    for i, last in enumerate([0.5, 0.25]):
        fake_run(tmp_path / "s" / f"cell-{i:03d}", [{"step": 0, "train/loss": 1.0}, {"step": 1, "train/loss": last}])
    assert rp.is_sweep(spec_path)
    assert report_cli.main([str(spec_path)]) == 0
    md = (tmp_path / "s" / "report.md").read_text().splitlines()
    assert "| loss=dpo | 1 | 0.5 |" in md and "| loss=ipo | 1 | 0.25 |" in md
    assert png_size(tmp_path / "s" / "report.png") == (480, 370)


# ------------------------------------------------------------------------------------ the README's metric schema
README = Path(__file__).resolve().parents[1] / "README.md"


def schema_patterns() -> list[re.Pattern]:
    """The names in the first column of README's "Metric schema" table, as patterns: ``{a,b}`` is a or b, ``<x>`` one
    name segment (a reward function's name: no "/"), ``…`` anything."""
    section = README.read_text().split("### Metric schema", 1)[1].split("\n## ", 1)[0]
    rows = [line.split(" | ")[0] for line in section.splitlines() if line.startswith("| `")]
    names = [name for row in rows for name in re.findall(r"`([^`]+)`", row)]
    patterns = []
    for name in names:
        parts = re.split(r"(\{[^}]*\}|<[^>]*>|…)", name)
        regex = "".join(
            "(?:" + "|".join(map(re.escape, part[1:-1].split(","))) + ")" if part.startswith("{")
            else r"[^/]+" if part.startswith("<") else ".+" if part == "…" else re.escape(part)
            for part in parts
        )  # fmt: skip
        patterns.append(re.compile(regex + r"\Z"))
    return patterns


def undocumented(keys) -> list[str]:
    """The metric names among ``keys`` (CSV columns, final_metrics.json keys) that the README's schema does not list."""
    patterns = schema_patterns()
    return sorted(k for k in set(keys) - {"epoch", "step"} if not any(p.match(k) for p in patterns))


def test_the_readme_schema_lists_the_shared_names_and_no_old_ones():
    assert len(schema_patterns()) > 25
    shared = ["train/loss", "train/kl", "val/kl", "train/rewards/mean", "val/rewards/mean",
              "train/rewards/missing_frac", "train/rewards/pkg.mod:fn/std", "val/accuracy", "train/entropy",
              "train/clip_ratio/region",
              "train/completions/mean_length", "val/completions/truncated_rate", "perf/samples_per_s", "perf/scoring_s",
              "train/lr/opt1", "train/grad_norm", "train/value_loss", "train/explained_variance", "train/kl_sequence",
              "train/rewards/margins", "val/rewards/chosen_std", "train/logps/chosen", "val/token_accuracy",
              "val/eval/pass@8"]  # fmt: skip
    assert undocumented(shared) == []
    old = ["train/score/mean", "val/score/mean", "train/objective/kl", "val/objective/kl", "val/response_length",
           "perf/completions_per_s", "perf/experience_s", "train/loss/policy", "train/rewards/a/b/mean"]  # fmt: skip
    assert undocumented(old) == sorted(old)


def test_an_online_rm_run_gets_its_accuracy_panel_and_an_overlay(tmp_path):
    """A run with an online-updated RM (``train/online_rm/accuracy``) gets that panel; two such runs (online and
    frozen) overlay it; a run without the metric does not get the panel."""
    rows = [{"step": s, "train/rewards/mean": 0.1 * s, "train/online_rm/accuracy": a} for s, a in enumerate([0.5, 0.9])]
    online = fake_run(tmp_path / "online", rows, stage="ppo")
    frozen = fake_run(tmp_path / "frozen", [{**r, "train/online_rm/accuracy": 0.4} for r in rows], stage="ppo")
    run = rp.load_run(online)
    picks = {c.title: rp.pick(c, "train", run.metrics) for c in rp.CURVES}
    assert picks["online RM accuracy on fresh samples"] == "train/online_rm/accuracy"
    curve = next(c for c in rp.CURVES if c.title == "online RM accuracy on fresh samples")
    assert rp.pick(curve, "train", rp.load_run(fake_run(tmp_path / "plain", PPO_ROWS)).metrics) is None
    assert report_cli.main([str(online), str(frozen), "--out", str(tmp_path / "cmp")]) == 0
    assert png_size(tmp_path / "cmp" / "overlay.png")[0] > 0
    assert "train/online_rm/accuracy" in (tmp_path / "cmp" / "report.md").read_text()
