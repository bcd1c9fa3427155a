"""Non-finite loss or gradient: the step is skipped on every rank, counted in MLflow, and a run of
them stops training with the last good state checkpointed. One 2-rank run (EP=2, ZeRO-1) shared."""

from __future__ import annotations

import math
import sqlite3
from pathlib import Path

import pytest

from mythos_dist.checkpoint import export, latest_tag, load_exported
from mythos_dist.train import loop_divergence
from tests.reliability._common import logs, result, run_ranks, steps

SKIPPED = [2, 4, 6, 7, 8]
FAULTS = [
    "inf-grad@2:1",  # finite loss, inf gradient, on rank 1 only
    "nan-loss@4:0",  # NaN hidden state and loss on rank 0 only
    "nan-loss@6:1",
    "nan-loss@7:0",
    "nan-loss@8:1",  # third in a row: stop
]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("nonfinite")
    out = tmp / "out"
    sets = [
        "train.steps=10",
        "train.max_nonfinite_steps=3",
        "parallel.ep_size=2",
        "parallel.zero_stage=1",
        "checkpoint.every=0",
        f"checkpoint.dir={tmp / 'ckpt'}",
        "tracking.enabled=true",
        f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}",
    ]
    run_ranks(tmp, out, 2, *(a for f in FAULTS for a in ("--fault", f)), sets=sets)
    return out


@pytest.mark.distributed
def test_nonfinite_steps_skipped_on_all_ranks_params_unchanged(run: Path) -> None:
    for rank in (0, 1):
        rows = steps(run, rank)
        assert [r["step"] for r in rows] == list(range(1, 9)), logs(run)
        assert [r["step"] for r in rows if r["skipped"]] == SKIPPED  # both ranks agree
        digest = {r["step"]: r["digest"] for r in rows}
        for s in SKIPPED:
            assert digest[s] == digest[s - 1], f"rank {rank}: parameters changed in skipped step {s}"
        for s in (3, 5):
            assert digest[s] != digest[s - 1], f"rank {rank}: step {s} was not applied"
        loss = {r["step"]: r["loss"] for r in rows}
        assert math.isfinite(loss[2])  # skipped for its gradient alone
        assert math.isnan(loss[4])


@pytest.mark.distributed
def test_nonfinite_in_a_row_stops_with_last_good_checkpoint(run: Path, tmp_path: Path) -> None:
    for rank in (0, 1):
        res = result(run, rank)
        assert res["error_type"] == "TrainingStopped", logs(run)
        assert "steps 6-8 all had a non-finite loss or gradient" in res["error"]
        assert "train.max_nonfinite_steps=3" in res["error"]
        assert "last good state (that of step 5)" in res["error"]
    ckpt = run.parent / "ckpt"
    assert latest_tag(ckpt) == "step_00000008"
    model = load_exported(export(ckpt, tmp_path / "export"))
    assert all(p.isfinite().all() for p in model.parameters())


@pytest.mark.distributed
def test_nonfinite_count_in_mlflow_and_divergence_warned(run: Path) -> None:
    with sqlite3.connect(run.parent / "mlflow.db") as db:
        rows = db.execute("SELECT step, value FROM metrics WHERE key = 'nonfinite_steps'").fetchall()
        diverging = db.execute("SELECT step, value FROM metrics WHERE key = 'loop/diverging'").fetchall()
    counts = dict(rows)
    assert counts[2] == 1 and counts[4] == 2 and counts[8] == 5, rows
    assert dict(diverging)[4] == 1.0  # rank 0's NaN hidden state at step 4
    log0 = (run / "log_rank0.txt").read_text()
    assert "step 4: non-finite loss or gradient (1 of 2 micro batches with a non-finite loss)" in log0
    assert "warning: step 4: hidden state diverging across loops: ‖h_t − h_t-1‖ is non-finite" in log0


@pytest.mark.parametrize(
    ("deltas", "expected"),
    [
        ([4.0, 2.0, 1.0], None),
        ([1.0, 2.0], None),  # too few loops to call it a trend
        ([1.0, 0.5, 0.6, 0.9], "grows over the last loops (0.5, 0.6, 0.9)"),
        ([1.0, float("nan")], "is non-finite"),
        ([1.0, float("inf"), 2.0], "is non-finite"),
    ],
)
def test_loop_divergence(deltas: list[float], expected: str | None) -> None:
    why = loop_divergence(deltas)
    assert why is None if expected is None else expected in why
