"""Non-finite loss or gradient: the step is skipped on every rank, counted in MLflow, and a run of
them stops training with the last good state checkpointed. One 2-rank run (EP=2, ZeRO-1) shared."""

from __future__ import annotations

import math
import sqlite3
from pathlib import Path

import pytest

from mythos_dist.checkpoint import export, latest_tag
from mythos_dist.export import load_exported
from mythos_dist.train_metrics import loop_divergence
from tests.reliability._common import logs, result, run_ranks, steps

SKIPPED = [2, 4, 6, 7, 8]
FAULTS = [
    "inf-grad@2:1",  # finite loss, inf gradient, on rank 1 only
    "nan-loss@4:0",  # NaN hidden state and loss on rank 0 only
    "nan-loss@6:1",
    "nan-loss@7:0",
    "nan-loss@8:1",  # third in a row: stop
]


STATE = ("digest", "buffers", "optimizer", "lr_schedule")  # parameters, router biases, AdamW, LR


def assert_skipped_steps_change_nothing(rows: list[dict], skipped: list[int], applied: list[int]) -> None:
    """Every skipped step leaves parameters, buffers, optimizer state and LR schedule as the step
    before left them; every applied step (after a skipped one) changes each of them."""
    at = {r["step"]: r for r in rows}
    for s in skipped:
        for key in STATE:
            assert at[s][key] == at[s - 1][key], f"{key} changed in skipped step {s}"
    for s in applied:
        for key in STATE:
            assert at[s][key] != at[s - 1][key], f"{key} unchanged in applied step {s}"


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
        assert_skipped_steps_change_nothing(rows, SKIPPED, applied=[3, 5])
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


@pytest.mark.distributed
@pytest.mark.parametrize("zero", [0, 2])
def test_skipped_step_leaves_all_state_on_zero_stage(tmp_path: Path, zero: int) -> None:
    """ZeRO-0 (our own skip) and ZeRO-2 (DeepSpeed's), 2 ranks, EP=2: a NaN loss on rank 1 at step
    2 and an infinite gradient on rank 0 at step 3 leave every parameter, router bias, optimizer
    moment and the LR schedule's position as step 1 left them, on both ranks."""
    sets = [
        "train.steps=4",
        "parallel.ep_size=2",
        f"parallel.zero_stage={zero}",
        "checkpoint.every=0",
        f"checkpoint.dir={tmp_path / 'ckpt'}",
    ]
    out = tmp_path / "out"
    run_ranks(tmp_path, out, 2, "--fault", "nan-loss@2:1", "--fault", "inf-grad@3:0", sets=sets)
    for rank in (0, 1):
        rows = steps(out, rank)
        assert [r["step"] for r in rows if r["skipped"]] == [2, 3], logs(out)
        assert_skipped_steps_change_nothing(rows, [2, 3], applied=[4])
        assert result(out, rank)["error"] is None, logs(out)
