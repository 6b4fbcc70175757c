"""Every module of the package imports (catches syntax errors and broken imports in rarely-run code)."""

import importlib
import pkgutil

import lit_rlhf


def all_modules():
    yield "lit_rlhf"
    for info in pkgutil.walk_packages(lit_rlhf.__path__, prefix="lit_rlhf."):
        if not info.name.endswith("__main__"):
            yield info.name


def test_every_module_imports():
    names = list(all_modules())
    assert "lit_rlhf.stages.dpo" in names and "lit_rlhf.experiments.dpo" in names
    for name in names:
        importlib.import_module(name)
