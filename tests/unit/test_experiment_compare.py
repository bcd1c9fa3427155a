"""`mythos experiment` with several recipes: input checks before anything runs, the side-by-side table."""

import subprocess
import sys
from pathlib import Path

from mythos_dist.experiment import side_by_side

ROOT = Path(__file__).resolve().parents[2]


def _summary(loops: list[int], accs: dict[str, list[float]]) -> dict:
    return {"loops": loops, "splits": {s: {"acc": a, "n": 10} for s, a in accs.items()}}


def test_side_by_side_lines_up_every_loop_count_of_either_recipe() -> None:
    a = _summary([1, 4], {"id": [0.1, 0.995], "ood1": [0.2, 0.3]})
    b = _summary([4, 32], {"id": [0.99, 0.98], "ood1": [0.5, 0.9]})
    rows = side_by_side(["seed", "loops"], [a, b]).splitlines()
    assert "seed" in rows[0] and "loops" in rows[0] and rows[1].count("ood1") == 2
    by_loops = {r.split("|")[0].strip(): [c.split() for c in r.split("|")[1:]] for r in rows[2:]}
    assert by_loops == {
        "1": [["10.0", "20.0"], ["–", "–"]],
        "4": [["99.5", "30.0"], ["99.0", "50.0"]],
        "32": [["–", "–"], ["98.0", "90.0"]],
    }
    # with eval.auto: the accuracy at each sample's own count and the mean loops it used
    b["auto"] = {"threshold": 0.01}
    for split, (acc, used) in {"id": (0.99, 5.25), "ood1": (0.88, 14.0)}.items():
        b["splits"][split]["auto"] = {"acc": acc, "loops_mean": used}
    rows = side_by_side(["seed", "loops"], [a, b]).splitlines()
    assert [c.split() for c in rows[-2].split("|")] == [["auto"], ["–", "–"], ["99.0", "88.0"]]
    assert [c.split() for c in rows[-1].split("|")] == [["used"], ["–", "–"], ["5.2", "14.0"]]


def test_recipes_sharing_a_directory_are_refused_before_anything_runs(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "mythos_dist.cli", "experiment", "--config", "configs/digit_chain.yaml",
           "--config", "configs/digit_chain_recipe2.yaml", "--set", f"checkpoint.dir={tmp_path / 'ck'}",
           "--set", f"data.remote={tmp_path / 'shards'}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "checkpoint.dir: the recipes share" in proc.stderr and "each needs its own" in proc.stderr
    assert not (tmp_path / "shards").exists()  # nothing built
    bad = subprocess.run(
        [*cmd[:8], "--set", "train.stepz=3"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert bad.returncode == 2 and "stepz" in bad.stderr


def test_comparison_writes_one_figure_and_the_long_table(tmp_path: Path, capsys) -> None:
    from types import SimpleNamespace

    from mythos_dist.experiment import _compare

    a = _summary([1, 4], {"id": [0.1, 0.995], "ood1": [0.2, 0.3]})
    b = _summary([4, 32], {"id": [0.99, 0.98], "ood1": [0.5, 0.9]})
    _compare(
        ["configs/x.yaml", "configs/y.yaml"],
        [SimpleNamespace(summary=a), SimpleNamespace(summary=b)],
        tmp_path,
        1.0,
    )
    rows = (tmp_path / "comparison.csv").read_text().splitlines()
    assert rows[0] == "recipe,split,loops,accuracy" and "y,ood1,32,0.900000" in rows and len(rows) == 9
    assert (tmp_path / "comparison.png").stat().st_size > 5000
    assert "comparison.png" in capsys.readouterr().out


def test_train_record_round_trips_and_refuses_a_damaged_file(tmp_path):
    """The record training hands to evaluation: written whole, read back typed; a file with other
    fields is a clear error naming it."""
    import json

    import pytest

    from mythos_dist.experiment import TrainRecord
    from mythos_dist.safe_io import CheckpointError

    rec = TrainRecord("abc", str(tmp_path / "export"), None, 0, 6, 1.25, 0.5, 3.0)
    path = rec.write(tmp_path)
    assert path.name == "train_summary.json" and TrainRecord.read(tmp_path) == rec
    assert not list(tmp_path.glob(".*.tmp"))
    path.write_text(json.dumps({"run_id": "abc", "export": None}))
    with pytest.raises(CheckpointError, match=r"train_summary\.json: fields"):
        TrainRecord.read(tmp_path)


def test_report_names_the_mlflow_runs_or_says_tracking_was_off(capsys) -> None:
    from types import SimpleNamespace

    from mythos_dist.config import Config
    from mythos_dist.experiment import TrainRecord, _print_run

    cfg = Config()
    record = TrainRecord(run_id="abc123", export="x/export", checkpoint=None, start_step=0, end_step=10,
                         final_loss=0.5, final_acc=0.9, wall_s=3.0)  # fmt: skip
    res = SimpleNamespace(summary=_summary([4], {"id": [0.99]}), out_dir="x/eval", files=[], run_id="def456")
    cfg.tracking.uri = "sqlite:///x/mlflow.db"
    _print_run(cfg, record, res, [], 5.0, 4.0)
    shown = capsys.readouterr().out
    assert "training run abc123, eval run def456" in shown and "mlflow ui --backend-store-uri" in shown
    cfg.tracking.enabled = False  # no runs exist: say so instead of printing run ids of None
    _print_run(cfg, record, res, [], 5.0, 4.0)
    shown = capsys.readouterr().out
    assert "MLflow: off (tracking.enabled=false)" in shown and "training run" not in shown
