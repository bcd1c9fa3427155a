"""Real 2-rank × 2-worker loading under torchrun: coverage, disjointness, resume, rank-independent order."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from multiproc import run_torchrun, worker_env

from data_pipeline.loader import make_loader
from mythos_dist.config import load_config

pytestmark = pytest.mark.distributed

BATCH = 16  # per rank; global batch 32
INTERRUPT_AT = 5
WORKER = Path(__file__).with_name("_loader_worker.py")


@pytest.fixture(scope="module")
def two_ranks(small_overrides: list[str], tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("two_ranks")
    args = ["--out", str(out), "--batch", str(BATCH), "--interrupt-at", str(INTERRUPT_AT)]
    args += [f"--set={o}" for o in small_overrides]
    done = run_torchrun(WORKER, 2, args, env=worker_env(tmp_path_factory.mktemp("env")), timeout=240)
    files = [out / f"rank{r}.json" for r in range(2)]
    assert done.returncode == 0 and all(f.is_file() for f in files), (
        f"rc={done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    )
    return [json.loads(f.read_text()) for f in files]


def _flat(steps: list[list[int]]) -> list[int]:
    return [i for step in steps for i in step]


def test_every_train_sample_once_and_ranks_disjoint(
    two_ranks: list[dict], small_overrides: list[str]
) -> None:
    n_train = load_config(None, small_overrides).data.task.n_train
    r0, r1 = (r["full"] for r in two_ranks)
    assert len(r0) == len(r1) == n_train // (2 * BATCH)  # equal step counts: no rank waits at a collective
    assert all(len(step) == BATCH for step in r0 + r1)
    assert not set(_flat(r0)) & set(_flat(r1))
    assert Counter(_flat(r0) + _flat(r1)) == Counter(range(n_train))  # every sample exactly once


def test_eval_split_covered_once_in_order(two_ranks: list[dict], small_overrides: list[str]) -> None:
    task = load_config(None, small_overrides).data.task
    first_id = task.n_train  # `id` is the first eval split (by name) after train
    ids = _flat(two_ranks[0]["eval"]) + _flat(two_ranks[1]["eval"])
    assert Counter(ids) == Counter(range(first_id, first_id + task.n_eval))
    assert _flat(two_ranks[0]["eval"]) == sorted(_flat(two_ranks[0]["eval"]))  # not shuffled


def test_resume_mid_epoch_matches_uninterrupted_run(two_ranks: list[dict]) -> None:
    for r in two_ranks:
        assert r["state"]["sample_in_epoch"] == INTERRUPT_AT * BATCH * 2
        assert r["first"] + r["resumed"] == r["full"]  # nothing lost, nothing repeated, same order


def test_global_batches_same_with_one_rank(two_ranks: list[dict], cfg, tmp_path: Path) -> None:
    """One rank with batch 2·BATCH sees, step by step, the union of what the two ranks saw."""
    one = [b["sample_id"].tolist() for b in make_loader(cfg.data, "train", 2 * BATCH, local=str(tmp_path))]
    two = [a + b for a, b in zip(two_ranks[0]["full"], two_ranks[1]["full"])]
    assert len(one) == len(two)
    assert [sorted(s) for s in one] == [sorted(s) for s in two]
