"""What people read: the accuracy table (stdout, CSV, JSON) of one evaluation, and mean ± std over
several evaluations of one recipe (seeds)."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mythos_dist.config import ConfigError
from mythos_dist.safe_io import read_json


def format_table(summary: dict[str, Any]) -> str:
    loops = summary["loops"]
    head = f"{'split':<10}{'n':>7}" + "".join(f"{'@' + str(n):>8}" for n in loops)
    rows = [
        f"{s:<10}{d['n']:>7}" + "".join(f"{a:>8.3f}" for a in d["acc"]) for s, d in summary["splits"].items()
    ]
    return "\n".join([head, *rows])


def _write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)
    return path


def _accs(values: Sequence[float]) -> list[str]:
    return [f"{a:.6f}" for a in values]


def write_summary(summary: dict[str, Any], out_dir: Path) -> list[Path]:
    """accuracy.csv (split × loops), accuracy_by_length.csv (split, length × loops), summary.json."""
    acc_cols = [f"acc@{n}" for n in summary["loops"]]
    splits = summary["splits"]
    table = _write_csv(
        out_dir / "accuracy.csv",
        ["split", "n", *acc_cols],
        [[s, d["n"], *_accs(d["acc"])] for s, d in splits.items()],
    )
    rows = [[s, n, *_accs(accs)] for s, d in splits.items() for n, accs in d["acc_by_length"].items()]
    by_len = _write_csv(out_dir / "accuracy_by_length.csv", ["split", "length", *acc_cols], rows)
    js = out_dir / "summary.json"
    js.write_text(json.dumps(summary, indent=2))
    return [table, by_len, js]


def aggregate_runs(eval_dirs: Sequence[str | Path]) -> dict[str, Any]:
    """Several evaluations of one recipe (e.g. seeds) -> mean, std, min and max accuracy per split ×
    loop count, plus each run's accuracies. Every run must have the same loop counts and splits."""
    if len(eval_dirs) < 1:
        raise ConfigError("report needs at least one eval directory")
    runs = []
    for d in eval_dirs:
        path = Path(d) / "summary.json"
        if not path.is_file():
            raise ConfigError(f"{path} not found: pass eval-K directories written by `mythos eval`")
        runs.append(read_json(path, ConfigError))
    loops, splits = runs[0]["loops"], list(runs[0]["splits"])
    for d, r in zip(eval_dirs, runs):
        if r["loops"] != loops or list(r["splits"]) != splits:
            raise ConfigError(
                f"{d}: loops {r['loops']} / splits {list(r['splits'])} differ from {eval_dirs[0]}: "
                f"{loops} / {splits}"
            )
    out: dict[str, Any] = {"loops": loops, "runs": [str(d) for d in eval_dirs], "splits": {}}
    for split in splits:
        acc_RL = np.array([r["splits"][split]["acc"] for r in runs])
        out["splits"][split] = {
            "n": [r["splits"][split]["n"] for r in runs],
            "acc": acc_RL.mean(0).tolist(),  # the mean: format_table and the plots read "acc"
            "std": acc_RL.std(0, ddof=1).tolist() if len(runs) > 1 else [0.0] * len(loops),
            "min": acc_RL.min(0).tolist(),
            "max": acc_RL.max(0).tolist(),
            "per_run": acc_RL.tolist(),
        }
    return out


def write_report(report: dict[str, Any], out_dir: Path) -> list[Path]:
    """CSV (mean, std, min per split × loops), JSON and the mean-accuracy plot with every run drawn."""
    from mythos_dist.plots import accuracy_vs_loops_runs

    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [
        [split, label, *_accs(d[key])]
        for split, d in report["splits"].items()
        for label, key in (("mean", "acc"), ("std", "std"), ("min", "min"))
    ]
    table = _write_csv(
        out_dir / "accuracy_over_runs.csv", ["split", "stat", *(f"acc@{n}" for n in report["loops"])], rows
    )
    js = out_dir / "report.json"
    js.write_text(json.dumps(report, indent=1))
    return [table, js, accuracy_vs_loops_runs(report, out_dir / "accuracy_vs_loops_runs.png")]


def format_report(report: dict[str, Any]) -> str:
    """Mean ± std per split × loop count, one row per split."""
    head = f"{'split':<10}" + "".join(f"{'@' + str(n):>14}" for n in report["loops"])
    rows = [
        f"{split:<10}" + "".join(f"{m:>8.3f} ±{s:.3f}" for m, s in zip(d["acc"], d["std"]))
        for split, d in report["splits"].items()
    ]
    return "\n".join([head, *rows])
