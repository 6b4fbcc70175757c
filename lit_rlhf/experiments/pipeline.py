"""Pipelines: ``python -m lit_rlhf.experiments.pipeline {plan,run} SPEC`` chains stages; each feeds the next
its export.

A pipeline spec (``experiments/pipeline/<name>.yaml``) describes the chain in one file::

    name: sft-rm-ppo-tiny              # W&B group of every step's run; steps write to <output_root>/<run name>/<step>
    output_root: runs/pipelines
    tags: []                           # W&B tags besides [<name>, <stage>]
    steps:
      - name: sft                      # the step's directory name (unique)
        stage: sft                     # python -m lit_rlhf.experiments.<stage> (sft, rft, rm, dpo, ppo, grpo, distill)
        config: experiments/sft/tiny.yaml
        overrides: {trainer.max_steps: 4}
      - name: rm
        stage: rm
        config: experiments/rm/tiny.yaml
        inputs: {model.backbone.name: sft}                       # --key=<run dir>/<step>/export/merged
      - name: ppo
        stage: ppo
        config: experiments/ppo/tiny.yaml
        inputs: {model.policy.name: sft, model.reward_model.path: rm}

Each step runs with ``--output_dir <run dir>/<step>``, its ``overrides`` and ``inputs`` (an earlier step's
``export/merged`` by path; ``<step>:<path>`` names another file of its run directory, e.g.
``grpo:export/online_rm/merged``), and ``--wandb.group=<run name>`` (one group per pipeline run; ``--run-name`` names
a fresh run, default: the spec's ``name``).

Iterative RL (DeepSeekMath, Shao et al. 2024, §4.1.4): ``iterations: K`` runs a step K times, as the steps
``<step>-1`` ... ``<step>-K`` (:func:`expand_iterations`): the first as written, each later one with the options of
``carry`` (option -> path in the previous iteration's run directory; default ``{model.policy.name: export/merged}``)
set to the previous iteration's files instead of its inputs or overrides of those options; later steps' inputs that
name the step get its last iteration. So each iteration starts from the previous one's policy, which is also its
reference (a fresh LoRA adapter on it, disabled; or a frozen copy), and with a GRPO online reward model
(:mod:`lit_rlhf.online_rm`) carried by ``model.online_rm.model.name: export/online_rm/merged`` and
``model.online_rm.replay_from: export/online_rm/replay.jsonl`` the RM keeps training on each iteration's samples
with replay of the earlier ones (``experiments/pipeline/sft-rm-grpo-online-smollm2.yaml``).

Resumable: a step whose ``final_metrics.json`` and ``export/merged`` exist is done and skipped; a step that left a
checkpoint resumes from it (``--ckpt_path``); ``skip: true`` in the spec or ``--skip STEP`` skips a step whose export
already exists; ``--force STEP`` reruns one from scratch (``--overwrite``). Each step that runs appends its wall time
to ``<run dir>/pipeline_times.jsonl`` (``{"step", "outcome", "seconds", "finished"}``).

``--set KEY=VALUE`` (repeatable) overrides KEY in every step, ``--set STEP:KEY=VALUE`` in one step
(:func:`with_overrides`): the value is read as YAML, like the spec's ``overrides``, and wins over the step's own
override of KEY; a key that a step takes as an input or that the pipeline sets is refused. ``plan`` shows them. One
spec, several seeds: ``--run-name seed-1 --set seed_everything=1`` (``experiments/paradigm/smollm2.yaml``).

    python -m lit_rlhf.experiments.pipeline plan experiments/pipeline/sft-rm-ppo-smollm2.yaml
    python -m lit_rlhf.experiments.pipeline run experiments/pipeline/sft-rm-ppo-smollm2.yaml
    python -m lit_rlhf.experiments.pipeline run experiments/pipeline/sft-rm-ppo-tiny.yaml --in-process --run-name ci
    python -m lit_rlhf.experiments.pipeline plan experiments/paradigm/smollm2.yaml --run-name s1 --set seed_everything=1
    sbatch slurm/train.sbatch pipeline run experiments/pipeline/sft-dpo-grpo-smollm2.yaml   # one job, steps in turn

Pure functions (tested): :func:`load_pipeline`, :func:`expand_iterations`, :func:`with_overrides`, :func:`step_args`,
:func:`step_status`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from lit_rlhf.sweep import format_value, resume_args

STAGES = ("sft", "rft", "rm", "dpo", "ppo", "grpo", "distill")
EXPORT = "export/merged"
TIMES = "pipeline_times.jsonl"
RESERVED = ("config", "output_dir", "ckpt_path", "print_config")


@dataclass(frozen=True)
class Step:
    """One stage run of a pipeline (see the module docstring)."""

    name: str
    stage: str
    config: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, str] = field(default_factory=dict)
    skip: bool = False
    iterations: int = 1
    carry: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PipelineSpec:
    name: str
    steps: list[Step]
    output_root: str = "runs/pipelines"
    tags: list[str] = field(default_factory=list)


def _mapping(raw: Any, where: str) -> dict:
    if not isinstance(raw, dict):
        raise ValueError(f"{where} must be a mapping, got {type(raw).__name__}")
    return raw


def _check_keys(raw: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")


def load_pipeline(path: str | Path) -> PipelineSpec:
    """Read and validate a pipeline spec (names, stages, configs exist, inputs point at earlier steps)."""
    raw = _mapping(yaml.safe_load(Path(path).read_text()) or {}, str(path))
    _check_keys(raw, set(PipelineSpec.__dataclass_fields__), str(path))
    if not raw.get("name") or not raw.get("steps"):
        raise ValueError(f"{path}: 'name' and a non-empty 'steps' list are required")
    if not isinstance(raw["steps"], list):
        raise ValueError(f"{path}: 'steps' must be a list")
    steps = []
    for i, s in enumerate(raw["steps"]):
        where = f"{path}: steps[{i}]"
        s = _mapping(s, where)
        _check_keys(s, set(Step.__dataclass_fields__), where)
        for key in ("overrides", "inputs", "carry"):
            s[key] = _mapping(s.get(key) or {}, f"{where}.{key}")
        iterations = s.get("iterations", 1)
        if not isinstance(iterations, int) or isinstance(iterations, bool) or iterations < 1:
            raise ValueError(f"{where}.iterations must be an integer >= 1, got {iterations!r}")
        steps.append(Step(**s))
    spec = PipelineSpec(
        name=raw["name"],
        steps=expand_iterations(steps),
        output_root=raw.get("output_root") or "runs/pipelines",
        tags=raw.get("tags") or [],
    )
    validate(spec, str(path))
    return spec


def _source(value: str) -> tuple[str, str]:
    """(step, path in its run directory) of an input value ``step`` (its ``export/merged``) or ``step:path``."""
    step, _, path = str(value).partition(":")
    return step, path or EXPORT


def expand_iterations(steps: list[Step]) -> list[Step]:
    """Each step with ``iterations`` K > 1 (or a ``carry``) as K steps ``<name>-1`` ... ``<name>-K``; see the module
    docstring. Inputs of later steps naming such a step are renamed to its last iteration."""
    out: list[Step] = []
    last: dict[str, str] = {}  # iterated step -> its last iteration's name

    def renamed(value: str) -> str:
        source, path = _source(value)
        return f"{last[source]}:{path}" if source in last else value

    for step in steps:
        inputs = {k: renamed(v) for k, v in step.inputs.items()}
        if step.iterations == 1 and not step.carry:
            out.append(replace(step, inputs=inputs))
            continue
        carry = step.carry or {"model.policy.name": EXPORT}
        names = [f"{step.name}-{i}" for i in range(1, step.iterations + 1)]
        out.append(replace(step, name=names[0], inputs=inputs, iterations=1, carry={}))
        overrides = {k: v for k, v in step.overrides.items() if k not in carry}
        for previous, name in zip(names, names[1:]):
            carried = {k: f"{previous}:{path}" for k, path in carry.items()}
            inputs = {**{k: v for k, v in inputs.items() if k not in carry}, **carried}
            out.append(replace(step, name=name, inputs=inputs, overrides=overrides, iterations=1, carry={}))
        last[step.name] = names[-1]
    return out


def validate(spec: PipelineSpec, source: str = "pipeline spec") -> None:
    name_re = r"[A-Za-z0-9][A-Za-z0-9._-]*"
    if not re.fullmatch(name_re, spec.name):
        raise ValueError(
            f"{source}: name {spec.name!r} must be letters, digits, '.', '_' or '-' (it names a directory)"
        )
    seen: list[str] = []
    for step in spec.steps:
        where = f"{source}: step {step.name!r}"
        if not isinstance(step.name, str) or not re.fullmatch(name_re, step.name):
            raise ValueError(f"{where}: a step name must be letters, digits, '.', '_' or '-' (it names a directory)")
        if step.name in seen:
            raise ValueError(f"{where}: duplicate step name")
        if step.stage not in STAGES:
            raise ValueError(f"{where}: unknown stage {step.stage!r}; choose one of {list(STAGES)}")
        if step.config is not None and not Path(step.config).is_file():
            raise ValueError(f"{where}: config {step.config!r} not found (paths are relative to the working directory)")
        for key, value in step.inputs.items():
            source_step = _source(value)[0]
            if source_step not in seen:
                raise ValueError(f"{where}: input {key} <- {source_step!r} must name an earlier step; earlier: {seen}")
        clash = sorted(set(step.inputs) & set(step.overrides))
        reserved = sorted(k for k in [*step.inputs, *step.overrides] if k in RESERVED or k.startswith("wandb."))
        if clash or reserved:
            raise ValueError(
                f"{where}: {clash or reserved} set twice or set by the pipeline (output_dir, ckpt_path, W&B group)"
            )
        seen.append(step.name)


def with_overrides(spec: PipelineSpec, sets: list[str] | tuple[str, ...]) -> PipelineSpec:
    """``spec`` with ``--set`` overrides: ``KEY=VALUE`` in every step, ``STEP:KEY=VALUE`` in that step; each value
    read as YAML and winning over the step's own override of KEY. Validated again (:func:`validate`)."""
    names = [s.name for s in spec.steps]
    every: dict[str, Any] = {}
    one: dict[str, dict[str, Any]] = {}
    for item in sets:
        target, sep, value = item.partition("=")
        step, _, key = target.rpartition(":")
        if not sep or not key.strip():
            raise ValueError(f"--set {item!r}: expected KEY=VALUE or STEP:KEY=VALUE")
        if step and step not in names:
            raise ValueError(f"--set {item!r}: unknown step {step!r}; steps: {names}")
        (one.setdefault(step, {}) if step else every)[key.strip()] = yaml.safe_load(value)
    steps = [replace(s, overrides={**s.overrides, **every, **one.get(s.name, {})}) for s in spec.steps]
    out = replace(spec, steps=steps)
    validate(out, "--set")
    return out


def step_status(step_dir: str | Path) -> str:
    """``done`` (final_metrics.json and export/merged exist), ``partial`` (no final metrics, a checkpoint that
    loads: :func:`lit_rlhf.checkpointing.newest_checkpoint`, what ``--ckpt_path last`` resumes) or ``new``."""
    d = Path(step_dir)
    if (d / "final_metrics.json").is_file() and (d / EXPORT).is_dir():
        return "done"
    return "partial" if resume_args(d) else "new"


def step_args(spec: PipelineSpec, step: Step, run_dir: str | Path, run_name: str) -> list[str]:
    """The stage's command-line arguments for ``step`` (no ``--ckpt_path``; :func:`run` adds it when resuming)."""
    run_dir = Path(run_dir)
    args = ["--config", step.config] if step.config else []
    args += ["--output_dir", str(run_dir / step.name)]
    args += [f"--{k}={format_value(v)}" for k, v in step.overrides.items()]
    args += [f"--{k}={run_dir.joinpath(*_source(value))}" for k, value in step.inputs.items()]
    tags = [spec.name, step.stage, *spec.tags]
    return args + [
        f"--wandb.group={run_name}",
        f"--wandb.name={run_name}-{step.name}",
        f"--wandb.tags={format_value(tags)}",
    ]


def run(
    spec: PipelineSpec,
    run_name: str | None = None,
    in_process: bool = False,
    skip: tuple[str, ...] = (),
    force: tuple[str, ...] = (),
) -> dict[str, str]:
    """Run the steps in order; returns step -> what happened (``ran``, ``resumed``, ``done``, ``skipped``)."""
    run_name = run_name or spec.name
    run_dir = Path(spec.output_root) / run_name
    outcome: dict[str, str] = {}
    for step in spec.steps:
        status = step_status(run_dir / step.name)
        if step.name in force:
            status = "new"
        elif step.skip or step.name in skip or status == "done":
            if not (run_dir / step.name / EXPORT).is_dir():
                raise FileNotFoundError(
                    f"step {step.name!r} is skipped but {run_dir / step.name / EXPORT} does not exist"
                )
            print(
                f"[pipeline] {step.name}: {'done' if status == 'done' else 'skipped'} ({run_dir / step.name})",
                flush=True,
            )
            outcome[step.name] = "done" if status == "done" else "skipped"
            continue
        args = step_args(spec, step, run_dir, run_name)
        if status == "partial":
            args += resume_args(run_dir / step.name)
        elif step.name in force:
            args += ["--overwrite"]  # starts over: the step's earlier files are deleted first
        started = time.perf_counter()
        print(f"[pipeline] {step.name}: python -m lit_rlhf.experiments.{step.stage} {shlex.join(args)}", flush=True)
        if in_process:
            importlib.import_module(f"lit_rlhf.experiments.{step.stage}").main(args=args)
            _finish_wandb()
        else:
            subprocess.run([sys.executable, "-m", f"lit_rlhf.experiments.{step.stage}", *args], check=True)
        if step_status(run_dir / step.name) != "done":
            raise RuntimeError(f"step {step.name!r} finished without final_metrics.json and {EXPORT}")
        outcome[step.name] = "resumed" if status == "partial" else "ran"
        seconds = time.perf_counter() - started
        record = {"step": step.name, "outcome": outcome[step.name], "seconds": round(seconds, 1)}
        record["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        with (run_dir / TIMES).open("a") as f:
            f.write(json.dumps(record) + "\n")
        print(f"[pipeline] {step.name}: {outcome[step.name]} in {seconds:.0f} s", flush=True)
    return outcome


def _finish_wandb() -> None:
    """End the step's W&B run, so the next in-process step starts its own."""
    if "wandb" in sys.modules and sys.modules["wandb"].run is not None:
        sys.modules["wandb"].finish()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m lit_rlhf.experiments.pipeline",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("command", choices=("plan", "run"))
    ap.add_argument("spec", help="experiments/pipeline/<name>.yaml")
    ap.add_argument(
        "--run-name", default=None, help="names this run (directory and W&B group); default: the spec's name"
    )
    ap.add_argument("--output-root", default=None, help="replaces the spec's output_root")
    ap.add_argument(
        "--in-process", action="store_true", help="run the stages in this process (default: one subprocess each)"
    )
    ap.add_argument("--skip", action="append", default=[], help="skip this step (its export must exist); repeatable")
    ap.add_argument("--force", action="append", default=[], help="rerun this step from scratch; repeatable")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="[STEP:]KEY=VALUE",
        help="override KEY in every step (or in STEP), over the step's own overrides; value read as YAML; repeatable",
    )
    args = ap.parse_args(argv)
    spec = load_pipeline(args.spec)
    try:
        spec = with_overrides(spec, args.set)
    except ValueError as e:
        ap.error(str(e))
    if args.output_root:
        spec = PipelineSpec(spec.name, spec.steps, args.output_root, spec.tags)
    unknown = sorted(set(args.skip + args.force) - {s.name for s in spec.steps})
    if unknown:
        ap.error(f"unknown step(s) {unknown}; steps: {[s.name for s in spec.steps]}")
    run_name = args.run_name or spec.name
    run_dir = Path(spec.output_root) / run_name
    if args.command == "plan":
        for step in spec.steps:
            print(
                f"[{step_status(run_dir / step.name):7s}] {step.name}: python -m lit_rlhf.experiments.{step.stage} "
                f"{shlex.join(step_args(spec, step, run_dir, run_name))}"
            )
        return 0
    outcome = run(spec, run_name, args.in_process, tuple(args.skip), tuple(args.force))
    print(f"[pipeline] {run_name}: " + ", ".join(f"{k} {v}" for k, v in outcome.items()) + f"; outputs in {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
