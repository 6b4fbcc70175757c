"""Test-wide settings: everything offline, W&B offline, deterministic."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


@pytest.fixture
def fixtures_dir() -> str:
    return FIXTURES


@pytest.fixture(autouse=True)
def _no_shared_wandb_service():
    """A stage run in-process starts W&B's service and W&B records its address in ``os.environ["WANDB_SERVICE"]``;
    the subprocesses of later tests would inherit it and share that one service, which keeps every run id it has
    seen and refuses a killed-and-resumed run's id ("run ID ... is in use"). Each test starts without it."""
    os.environ.pop("WANDB_SERVICE", None)
    yield
    os.environ.pop("WANDB_SERVICE", None)
