"""Size budget (DESIGN.md, principle 9): a stage module stays readable top to bottom in <= 350 lines, and no module of
the package grows past 500 lines without being split by concept."""

from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lit_rlhf"
STAGE_LIMIT = 350
MODULE_LIMIT = 500


def line_count(path: Path) -> int:
    return len(path.read_text().splitlines())


def test_the_package_has_modules_and_stages():
    assert len(list((PACKAGE / "stages").glob("*.py"))) >= 5 and len(list(PACKAGE.rglob("*.py"))) > 20


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_module_size(path):
    limit = STAGE_LIMIT if path.parent == PACKAGE / "stages" else MODULE_LIMIT
    assert line_count(path) <= limit, f"{path.relative_to(PACKAGE.parent)}: {line_count(path)} lines > {limit}"
