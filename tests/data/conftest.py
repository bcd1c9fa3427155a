"""Shared fixtures of the data-pipeline tests: one small shard set built once per session."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import pytest

from data_pipeline.shards import build
from mythos_dist.config import Config, load_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared `multiproc` helper

# 2048 train samples in 8 shards; 200 per eval split. Global batch 32 divides 2048: 64 steps.
SMALL = [
    "data.task.n_train=2048",
    "data.task.n_eval=200",
    "data.samples_per_shard=256",
    "data.build_workers=2",
    "data.num_workers=2",
]


@pytest.fixture(scope="session")
def small_overrides(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Config overrides pointing at a built, verified small shard set."""
    overrides = [*SMALL, f"data.remote={tmp_path_factory.mktemp('shards') / 'digit_chain'}"]
    build(load_config(None, overrides).data)
    return overrides


@pytest.fixture
def cfg(small_overrides: list[str]) -> Config:
    return load_config(None, small_overrides)


@pytest.fixture(autouse=True)
def own_tmpdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A TMPDIR per test, also for streaming in this process (it leaves file locks there)."""
    (tmp_path / "tmpdir").mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmpdir"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmpdir"))
