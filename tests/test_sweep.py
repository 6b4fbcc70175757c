"""Sweep specs: validation, checking with the stage's parser, grid expansion order, array index -> cell, cell commands,
sbatch lines, resume, results and their mean ± std over seeds, running the cells locally."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import yaml

from lit_rlhf import sweep as sw
from lit_rlhf.experiments import sweep as sweep_cli

REPO = Path(__file__).resolve().parents[1]
SPECS = sorted((REPO / "experiments" / "sweeps").glob("*.yaml"))


def write_spec(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    return path


GRID_SPEC = """
name: demo
stage: dpo
base_config: experiments/dpo/tiny.yaml
output_root: {root}
fixed: {{trainer.max_steps: 4}}
grid:
  model.beta: [0.05, 0.1, 0.5]
  model.loss: [dpo, ipo]
seeds: [0, 1]
"""


@pytest.fixture
def spec(tmp_path) -> sw.SweepSpec:
    return sw.load_spec(write_spec(tmp_path, GRID_SPEC.format(root=tmp_path / "runs")))


# ------------------------------------------------------------------------------------------- expansion and order
def test_expand_order_last_key_fastest_seeds_innermost(spec):
    """index = (i_beta * 2 + i_loss) * 2 + i_seed: 3 betas x 2 losses x 2 seeds = 12 cells."""
    cells = sw.expand(spec)
    assert spec.size == len(cells) == 12
    assert [c.index for c in cells] == list(range(12))
    got = [(c.params["model.beta"], c.params["model.loss"], c.seed) for c in cells]
    betas, losses, seeds = [0.05, 0.1, 0.5], ["dpo", "ipo"], [0, 1]
    assert got == [(b, loss, s) for b in betas for loss in losses for s in seeds]
    assert cells[1].params == {"model.beta": 0.05, "model.loss": "dpo"} and cells[1].seed == 1
    assert cells[2].params == {"model.beta": 0.05, "model.loss": "ipo"} and cells[2].seed == 0
    assert cells[11].output_dir == Path(spec.output_root) / "demo" / "cell-011"


def test_cell_for_index_matches_expand_and_names_array_size(spec):
    for i, cell in enumerate(sw.expand(spec)):
        assert sw.cell_for_index(spec, i) == cell
    for bad in (12, -1):
        with pytest.raises(IndexError, match=r"has 12 cells \(array indices 0-11\)"):
            sw.cell_for_index(spec, bad)


def test_no_grid_means_one_cell_per_seed(tmp_path):
    spec = sw.load_spec(write_spec(tmp_path, "name: s\nstage: dpo\nseeds: [3, 4, 5]\n"))
    assert [(c.index, c.params, c.seed) for c in sw.expand(spec)] == [(0, {}, 3), (1, {}, 4), (2, {}, 5)]


# ---------------------------------------------------------------------------------------------------- commands
def test_cell_command(spec):
    cell = sw.cell_for_index(spec, 3)  # (0 * 2 + 1) * 2 + 1: beta 0.05, loss ipo, seed 1
    argv = sw.cell_command(cell, python="python")
    assert argv[:5] == ["python", "-m", "lit_rlhf.experiments.dpo", "--config", "experiments/dpo/tiny.yaml"]
    assert argv[5:7] == ["--output_dir", str(Path(spec.output_root) / "demo" / "cell-003")]
    assert argv[7:] == [
        "--trainer.max_steps=4",
        "--model.beta=0.05",
        "--model.loss=ipo",
        "--seed_everything=1",
        "--wandb.group=demo",
        '--wandb.tags=["demo","dpo"]',
        "--wandb.name=demo-cell-003",
    ]
    assert sw.cell_command(cell)[0] == sys.executable
    assert sw.cell_command(cell, extra=["--ckpt_path=x"])[-1] == "--ckpt_path=x"


@pytest.mark.parametrize(
    "value, text",
    [
        ("ipo", "ipo"),
        (0.1, "0.1"),
        (1e-4, "0.0001"),
        (3, "3"),
        (True, "true"),
        (None, "null"),
        ([1, 2], "[1,2]"),
        ({"r": 8}, '{"r":8}'),
    ],
)
def test_format_value(value, text):
    assert sw.format_value(value) == text


def test_seed_keys_tags_and_base_config_null(tmp_path):
    spec = sw.load_spec(
        write_spec(
            tmp_path,
            "name: s\nstage: dpo\nbase_config: null\nseeds: [7]\n"
            "seed_keys: [seed_everything, data.seed]\ntags: [ablation]\n",
        )
    )
    argv = sw.cell_command(sw.cell_for_index(spec, 0), python="python")
    assert "--config" not in argv
    assert "--seed_everything=7" in argv and "--data.seed=7" in argv
    assert '--wandb.tags=["s","dpo","ablation"]' in argv


@pytest.mark.parametrize(
    "indices, text", [([0, 1, 2], "0-2"), ([5], "5"), ([0, 1, 2, 5, 7, 8], "0-2,5,7-8"), ([3, 1, 2, 2], "1-3")]
)
def test_array_ranges(indices, text):
    assert sw.array_ranges(indices) == text


def test_sbatch_command(spec, tmp_path):
    argv = sw.sbatch_command(spec, "spec.yaml")
    assert argv == [
        "sbatch",
        "--parsable",
        "--array=0-11",
        "--job-name=demo",
        f"--output={Path(spec.output_root) / 'demo' / 'logs' / '%A_%a.out'}",
        "slurm/sweep_cell.sbatch",
        "spec.yaml",
    ]
    spec2 = sw.SweepSpec(**{**spec.__dict__, "max_parallel": 2, "sbatch": ["--gpus-per-node=1"]})
    argv = sw.sbatch_command(
        spec2, "spec.yaml", indices=[1, 2, 7], extra=["--partition=gpu"], output_root_override="/scratch"
    )
    assert argv[2] == "--array=1-2,7%2"
    assert argv[-6:] == [
        "--gpus-per-node=1",
        "--partition=gpu",
        "slurm/sweep_cell.sbatch",
        "spec.yaml",
        "--output_root",
        "/scratch",
    ]


def test_cell_record_names_the_array_task(spec):
    cell = sw.cell_for_index(spec, 2)
    env = {"SLURM_ARRAY_JOB_ID": "41", "SLURM_ARRAY_TASK_ID": "2", "SLURM_JOB_ID": "44"}
    rec = sw.cell_record(cell, ["python"], env)
    assert rec["slurm_job"] == "41_2" and rec["slurm_job_id"] == "44" and rec["index"] == 2
    assert sw.cell_record(cell, [], {"SLURM_JOB_ID": "9"})["slurm_job"] == "9"
    assert sw.cell_record(cell, [], {})["slurm_job"] == ""


def test_resume_args_picks_the_newest_checkpoint(tmp_path):
    import torch

    assert sw.resume_args(tmp_path) == []
    (tmp_path / "checkpoints").mkdir()
    last = tmp_path / "checkpoints" / "last.ckpt"
    torch.save({"global_step": 3}, last)
    assert sw.resume_args(tmp_path) == [f"--ckpt_path={last}"]
    hpc = tmp_path / "hpc_ckpt_1.ckpt"
    torch.save({"global_step": 3}, hpc)
    os.utime(last, (1, 1))  # the hpc checkpoint saved on SIGUSR1 is newer than the last periodic one
    assert sw.resume_args(tmp_path) == [f"--ckpt_path={hpc}"]
    hpc.write_bytes(hpc.read_bytes()[:100])  # torn: skipped (the resolution is lit_rlhf.checkpointing's)
    assert sw.resume_args(tmp_path) == [f"--ckpt_path={last}"]


# -------------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "text, message",
    [
        ("stage: dpo\n", "'name' is required"),
        ("name: x\nstage: nope\n", "unknown stage 'nope': there is no module lit_rlhf.experiments.nope"),
        ("name: x\nstage: dpo\ngird: {a: [1]}\n", r"unknown key\(s\) \['gird'\]"),
        ("name: x\nstage: dpo\ngrid: {model.beta: 0.1}\n", r"grid\['model.beta'\] must be a non-empty list"),
        ("name: x\nstage: dpo\ngrid: {model.beta: []}\n", "non-empty list"),
        ("name: x\nstage: dpo\nseeds: []\n", "seeds must be a non-empty list of integers"),
        ("name: x\nstage: dpo\ngrid: {model.beta: [1]}\nfixed: {model.beta: 2}\n", r"\['model.beta'\] set twice"),
        ("name: x\nstage: dpo\nfixed: {seed_everything: 2}\n", r"\['seed_everything'\] set twice"),
        ("name: x\nstage: dpo\nfixed: {wandb.group: g}\n", "set by the sweep"),
        ("name: x\nstage: dpo\ngrid: {output_dir: [a, b]}\n", "set by the sweep"),
        ("name: a/b\nstage: dpo\n", "names a directory"),
        ("name: x\nstage: dpo\nmax_parallel: 0\n", "max_parallel must be >= 1"),
        ("- a\n", "a sweep spec is a mapping"),
    ],
)
def test_load_spec_errors(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        sw.load_spec(write_spec(tmp_path, text))


def test_other_wandb_settings_may_be_fixed(tmp_path):
    spec = sw.load_spec(write_spec(tmp_path, "name: x\nstage: dpo\nfixed: {wandb.project: p, wandb.mode: disabled}\n"))
    argv = sw.cell_command(sw.cell_for_index(spec, 0))
    assert "--wandb.project=p" in argv and "--wandb.mode=disabled" in argv and "--wandb.group=x" in argv


def test_output_root_override(tmp_path):
    path = write_spec(tmp_path, GRID_SPEC.format(root="runs"))
    assert sw.load_spec(path, output_root="/scratch/me").sweep_dir == Path("/scratch/me/demo")


# --------------------------------------------------------------------------------------------------- collect
def fake_run(cell: sw.Cell, end: dict, job: str) -> None:
    cell.output_dir.mkdir(parents=True)
    (cell.output_dir / "final_metrics.json").write_text(
        json.dumps({"stage": "dpo", "global_step": 4, "start": {"val/loss": 0.69}, "end": end, "train_last": {}})
    )
    (cell.output_dir / sw.CELL_FILE).write_text(json.dumps({"slurm_job": job}))


def test_collect_rows_and_tables(spec):
    cells = sw.expand(spec)
    fake_run(cells[0], {"val/loss": 0.5, "val/rewards/accuracies": 0.75}, "7_0")
    fake_run(cells[3], {"val/loss": 0.25}, "7_3")
    cells[5].output_dir.mkdir(parents=True)  # started, never finished
    rows = sw.collect(spec)
    assert len(rows) == 12
    assert rows[0] == {
        "cell": 0,
        "job": "7_0",
        "model.beta": 0.05,
        "model.loss": "dpo",
        "seed": 0,
        "status": "done",
        "step": 4,
        "val/loss": 0.5,
        "val/rewards/accuracies": 0.75,
    }
    assert rows[3]["status"] == "done" and rows[3]["val/loss"] == 0.25 and "val/rewards/accuracies" not in rows[3]
    assert rows[5]["status"] == "incomplete" and rows[5]["step"] == ""
    assert [r["status"] for r in rows].count("missing") == 9

    csv_path, md_path, by_config = sw.write_results(spec, rows)
    table = list(csv.DictReader(csv_path.open()))
    assert len(table) == 12
    assert table[0]["val/rewards/accuracies"] == "0.75" and table[3]["val/rewards/accuracies"] == ""
    md = md_path.read_text().splitlines()
    header = "| cell | job | model.beta | model.loss | seed | status | step | val/loss | val/rewards/accuracies |"
    assert md[0] == header
    assert md[2] == "| 0 | 7_0 | 0.05 | dpo | 0 | done | 4 | 0.5 | 0.75 |"
    assert md[2 + 1].startswith("| 1 |  | 0.05 | dpo | 1 | missing |")
    assert md[14] == "" and md[15].startswith("Mean ± std over seeds")  # then the table by grid point: 6 points
    assert md[17] == "| model.beta | model.loss | seeds | val/loss | val/rewards/accuracies |"
    assert md[19] == "| 0.05 | dpo | 1/2 | 0.5 | 0.75 |" and md[20] == "| 0.05 | ipo | 1/2 | 0.25 |  |"
    assert len(md) == 17 + 2 + 6
    points = list(csv.DictReader(by_config.open()))
    assert len(points) == 6 and points[0]["mean(val/loss)"] == "0.5" and points[0]["std(val/loss)"] == ""


# ------------------------------------------------------------------------------------------------------- CLI
def run_cli(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    with redirect_stdout(out):
        rc = sweep_cli.main(list(argv))
    return rc, out.getvalue()


def test_cli_plan_and_dry_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)  # the spec's base_config is relative to the repository
    spec = write_spec(tmp_path, GRID_SPEC.format(root=tmp_path / "runs"))
    rc, out = run_cli("plan", str(spec))
    assert rc == 0 and "12 cells" in out and "[ 11] model.beta=0.5 model.loss=ipo seed=1" in out
    assert "sbatch --parsable --array=0-11 --job-name=demo" in out

    rc, out = run_cli("plan", str(spec), "--index", "2")
    assert out.startswith("python -m lit_rlhf.experiments.dpo --config experiments/dpo/tiny.yaml")

    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "7")
    rc, out = run_cli("run-cell", str(spec), "--dry-run")
    assert rc == 0 and "cell 7/11" in out and "--model.beta=0.1 --model.loss=ipo --seed_everything=1" in out
    assert not (tmp_path / "runs" / "demo" / "cell-007").exists()

    monkeypatch.delenv("SLURM_ARRAY_TASK_ID")
    with pytest.raises(SystemExit, match="SLURM_ARRAY_TASK_ID is not set"):
        run_cli("run-cell", str(spec))
    assert run_cli("run-cell", str(spec), "--index", "12")[0] == 2
    assert "has 12 cells (array indices 0-11)" in capsys.readouterr().err

    rc, out = run_cli("submit", str(spec), "--dry_run", "--sbatch_args=--partition=cpu --time=5")
    assert "--array=0-11 " in out and "--partition=cpu --time=5 slurm/sweep_cell.sbatch" in out
    # the hyphenated spellings of before still work (hidden from --help)
    rc, out = run_cli("submit", str(spec), "--dry-run", "--sbatch-args=--partition=cpu", "--output-root", "/x")
    assert rc == 0 and "--partition=cpu slurm/sweep_cell.sbatch" in out and out.rstrip().endswith("--output_root /x")


def test_cli_done_cells_are_skipped_and_not_resubmitted(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    spec_path = write_spec(tmp_path, GRID_SPEC.format(root=tmp_path / "runs"))
    spec = sw.load_spec(spec_path)
    for i in (0, 1, 2, 5):
        fake_run(sw.cell_for_index(spec, i), {"val/loss": 0.1}, "")
    rc, out = run_cli("run-cell", str(spec_path), "--index", "1")
    assert rc == 0 and "is done" in out
    rc, out = run_cli("submit", str(spec_path), "--only_missing", "--dry_run")
    assert "--array=3-4,6-11 " in out
    rc, out = run_cli("collect", str(spec_path))
    assert "4/12 cells done" in out and (tmp_path / "runs" / "demo" / "results.md").exists()


def test_run_cell_execs_the_stage_and_records_the_cell(tmp_path):
    """run-cell writes cell.json and replaces itself with the stage command (here: a failing --print_config parse,
    to stay fast: an unknown override makes the stage CLI exit 2 after the exec)."""
    spec_path = write_spec(tmp_path, f"name: t\nstage: dpo\noutput_root: {tmp_path}\nfixed: {{no.such_knob: 1}}\n")
    env = {**os.environ, "SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_JOB_ID": "99", "SLURM_JOB_ID": "100"}
    proc = subprocess.run(
        [sys.executable, "-m", "lit_rlhf.experiments.sweep", "run-cell", str(spec_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no.such_knob" in proc.stderr
    record = json.loads((tmp_path / "t" / "cell-000" / sw.CELL_FILE).read_text())
    assert record["slurm_job"] == "99_0" and record["command"][1:3] == ["-m", "lit_rlhf.experiments.dpo"]


# ------------------------------------------------------------------------------------- the shipped sweep specs
@pytest.mark.parametrize("path", SPECS, ids=[p.stem for p in SPECS])
def test_shipped_specs_parse_and_every_cell_is_a_valid_stage_config(path, monkeypatch):
    """Every cell of every spec under experiments/sweeps/ parses with its stage's CLI (--print_config)."""
    import importlib

    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", ["sweep-cell"])  # LightningCLI warns when pytest's own argv is also there
    spec = sw.load_spec(path)
    assert path.stem == spec.name
    assert sw.check_spec(spec) == []  # what plan checks
    stage = importlib.import_module(f"lit_rlhf.experiments.{spec.stage}")
    for cell in sw.expand(spec):
        argv = sw.cell_command(cell)[3:] + ["--print_config"]
        out = io.StringIO()
        with redirect_stdout(out), pytest.raises(SystemExit) as exit_:
            stage.main(args=argv)
        assert exit_.value.code in (0, None), argv
        assert f"group: {spec.name}" in out.getvalue()


# -------------------------------------------------------------------------- checking with the stage's own parser
TYPO_SPEC = """
name: typo
stage: dpo
base_config: experiments/dpo/tiny.yaml
output_root: {root}
fixed: {{trainer.max_stepz: 2}}
grid: {{model.bta: [0.1, 0.2], model.loss: [dpo, nope]}}
"""


def test_plan_refuses_a_typo_with_a_suggestion(tmp_path, monkeypatch, capsys):
    """A typo'd key fails at plan (not in a queued job), with the stage parser's nearest key; a bad value is named."""
    monkeypatch.chdir(REPO)
    spec_path = write_spec(tmp_path, TYPO_SPEC.format(root=tmp_path / "runs"))
    rc, out = run_cli("plan", str(spec_path))
    err = capsys.readouterr().err
    assert rc == 2 and out == ""
    assert "the dpo stage's parser refuses this sweep" in err
    assert "grid['model.bta'] = 0.1: unknown key 'model.bta'; did you mean model.beta?" in err
    assert "fixed['trainer.max_stepz'] = 2: unknown key 'trainer.max_stepz'; did you mean trainer.max_steps?" in err
    assert "grid['model.loss'] = nope: " in err and "Got value: nope" in err
    for command in (["submit", "--dry_run"], ["run-local"]):  # nothing is submitted or run either
        assert run_cli(command[0], str(spec_path), *command[1:]) == (2, "")
        assert "did you mean model.beta?" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_check_spec_details(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    parser = sw.stage_parser("dpo")
    assert not parser.allow_abbrev  # --model.bet would otherwise pass as --model.beta

    def check(text: str) -> list[str]:
        return sw.check_spec(sw.load_spec(write_spec(tmp_path, text)), parser)

    assert check("name: x\nstage: dpo\nbase_config: experiments/dpo/tiny.yaml\ngrid: {model.beta: [0.1, 0.2]}\n") == []
    assert check("name: x\nstage: dpo\ngrid: {model.bet: [0.1]}\n") == [
        "grid['model.bet'] = 0.1: unknown key 'model.bet'; did you mean model.beta?"
    ]
    assert check("name: x\nstage: dpo\nseed_keys: [data.sed]\n") == [
        "seed_keys['data.sed'] = 0: unknown key 'data.sed'; did you mean data.seed?"
    ]
    [error] = check("name: x\nstage: dpo\nfixed: {model.policy.lora.rr: 4}\n")  # inside a nested settings class
    assert error.endswith("unknown key 'model.policy.lora.rr'; did you mean model.policy.lora.r?")
    [error] = check("name: x\nstage: dpo\nbase_config: no/such.yaml\ngrid: {model.bta: [1]}\n")
    assert error.startswith("base_config no/such.yaml: ") and "does not exist" in error
    assert check("name: x\nstage: dpo\nfixed: {zzz: 1}\n") == [
        "fixed['zzz'] = 1: unknown key 'zzz'; the stage's --help lists its keys"
    ]


def test_submit_without_sbatch_explains(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    spec_path = write_spec(
        tmp_path, f"name: s\nstage: dpo\nbase_config: experiments/dpo/tiny.yaml\noutput_root: {tmp_path / 'runs'}\n"
    )
    rc, out = run_cli("submit", str(spec_path))
    err = capsys.readouterr().err
    assert rc == 2 and out.startswith("$ sbatch ")
    assert "`sbatch` is not on PATH" in err and f"run-local {spec_path} [--parallel N]" in err
    assert "Errno" not in err


# ------------------------------------------------------------------------------------- mean ± std over seeds
def test_aggregate_over_seeds_exactly(tmp_path):
    """Two grid points x 2 seeds (one point has a third seed that never ran): mean and the sample std (n - 1)."""
    spec = sw.load_spec(
        write_spec(
            tmp_path,
            f"name: a\nstage: dpo\noutput_root: {tmp_path}\ngrid: {{model.beta: [0.1, 0.5]}}\nseeds: [0, 1, 2]\n",
        )
    )
    cells = sw.expand(spec)  # (0.1, s0) (0.1, s1) (0.1, s2) (0.5, s0) (0.5, s1) (0.5, s2)
    fake_run(cells[0], {"val/loss": 0.5, "val/rewards/accuracies": 0.75}, "")
    fake_run(cells[1], {"val/loss": 0.25, "val/rewards/accuracies": 1.0}, "")
    fake_run(cells[3], {"val/loss": 1.0, "val/rewards/accuracies": 0.5}, "")
    fake_run(cells[4], {"val/loss": 3.0, "val/rewards/accuracies": 0.5}, "")
    fake_run(cells[5], {"val/loss": 2.0}, "")
    cells[2].output_dir.mkdir()  # started, not finished: not in the mean
    points = sw.aggregate(sw.collect(spec), ["model.beta"])
    assert [(p["model.beta"], p["seeds"]) for p in points] == [(0.1, "2/3"), (0.5, "3/3")]
    assert points[0]["mean(val/loss)"] == 0.375 and points[0]["std(val/loss)"] == pytest.approx(0.125 * 2**0.5)
    assert points[0]["mean(val/rewards/accuracies)"] == 0.875
    assert points[0]["std(val/rewards/accuracies)"] == pytest.approx(0.125 * 2**0.5)
    assert points[1]["mean(val/loss)"] == 2.0 and points[1]["std(val/loss)"] == 1.0  # sqrt((1 + 1 + 0) / 2)
    assert points[1]["mean(val/rewards/accuracies)"] == 0.5 and points[1]["std(val/rewards/accuracies)"] == 0.0
    assert not {"mean(step)", "mean(seed)", "mean(cell)"} & set(points[1])  # bookkeeping columns are no metrics

    _, md_path, by_config = sw.write_results(spec, sw.collect(spec))
    md = md_path.read_text()
    assert "| 0.1 | 2/3 | 0.375 ± 0.18 | 0.875 ± 0.18 |" in md and "| 0.5 | 3/3 | 2 ± 1 | 0.5 ± 0 |" in md
    rows = list(csv.DictReader(by_config.open()))
    assert rows[1]["mean(val/loss)"] == "2.0" and rows[1]["std(val/loss)"] == "1.0"


# ----------------------------------------------------------------------------------- running cells without SLURM
def sweep_module(*argv: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lit_rlhf.experiments.sweep", *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.slow
def test_run_local_runs_the_tiny_sweep_then_collect_aggregates_and_reports(tmp_path):
    """run-local of experiments/sweeps/dpo-tiny-beta.yaml, 2 cells at a time (its 3 cells, here of 2 DPO steps on
    smaller batches, with a CSV logger and no export), then a second run-local skips the finished cells, and
    collect --report writes the tables and the plots."""
    spec = yaml.safe_load((REPO / "experiments" / "sweeps" / "dpo-tiny-beta.yaml").read_text())
    spec["fixed"].update(
        {
            "trainer.max_steps": 2,
            "trainer.val_check_interval": 2,
            "data.num_val": 4,
            "data.batch_size": 2,
            "wandb.mode": "disabled",
            "export": False,
        }
    )
    spec["base_config"] = str(REPO / spec["base_config"])
    spec_path = tmp_path / "dpo-tiny-beta.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    root = str(tmp_path / "runs")
    proc = sweep_module("run-local", str(spec_path), "--output_root", root, "--parallel", "2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "3 of 3 cells to run here (0 done), 2 at a time" in proc.stdout and "all 3 cells done" in proc.stdout
    loaded = sw.load_spec(spec_path, output_root=root)
    for cell in sw.expand(loaded):
        final = json.loads((cell.output_dir / "final_metrics.json").read_text())
        assert final["global_step"] == 2 and "val/rewards/accuracies" in final["end"]
        assert json.loads((cell.output_dir / sw.CELL_FILE).read_text())["params"] == cell.params
        assert (loaded.sweep_dir / "logs" / f"local_{cell.index:03d}.out").is_file()

    again = sweep_module("run-local", str(spec_path), "--output_root", root)
    assert again.returncode == 0 and "0 of 3 cells to run here (3 done)" in again.stdout

    out = sweep_module("collect", str(spec_path), "--output_root", root, "--report")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "3/3 cells done" in out.stdout
    by_config = list(csv.DictReader((loaded.sweep_dir / "results_by_config.csv").open()))
    assert [r["model.beta"] for r in by_config] == ["0.05", "0.1", "0.5"] and by_config[0]["seeds"] == "1/1"
    png = (loaded.sweep_dir / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| beta=0.05 | 1 |" in (loaded.sweep_dir / "report.md").read_text()


def test_run_local_reports_failed_cells(tmp_path):
    spec_path = write_spec(
        tmp_path,
        f"name: f\nstage: dpo\nbase_config: {REPO / 'experiments/dpo/tiny.yaml'}\n"
        f"output_root: {tmp_path}\nfixed: {{data.path: {tmp_path / 'missing.jsonl'}}}\n",
    )
    proc = sweep_module("run-local", str(spec_path), env={"WANDB_MODE": "disabled"})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "[sweep] cell 0 FAILED (exit 1; log" in proc.stdout
    assert "1 cell(s) failed: 0" in proc.stderr and "--- cell 0 (seed=0), last lines of" in proc.stderr
    assert (tmp_path / "f" / "logs" / "local_000.out").read_text().strip()
