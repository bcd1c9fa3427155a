"""Training that counts only some chains (length curriculum + receptive field of windowed
attention): real 2-rank runs (EP=2, ZeRO-2). Each step's cap is the one the objective computes
for the step's drawn loop count (and, in the crop run, its drawn attention window), on both ranks,
also when a rank's micro batch counts no chain; with the crop curriculum no chain past the
curriculum's cap is trained on, with the mask there are."""

from __future__ import annotations

import math
import sqlite3
from pathlib import Path

import pytest

from mythos_dist.config import load_config
from mythos_dist.model import LoopPolicy
from mythos_dist.objective import curriculum_cap, longest_counted
from tests.reliability._common import TINY, logs, result, run_ranks, steps

SETS = [
    "train.steps=8",
    "model.attn_window=3",  # 2 tokens per layer: 1 loop reaches 6 digits, 3 loops 10
    "train.reachable_only=true",
    "train.length_curriculum_steps=6",
    "train.loops.kind=uniform",
    "train.loops.min_loops=1",
    "train.loops.max_loops=3",
    "parallel.ep_size=2",
    "parallel.zero_stage=2",
    "checkpoint.every=0",
    "tracking.enabled=true",
]


@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["mask", "crop"])
def test_counted_chains_follow_curriculum_and_reach(tmp_path: Path, mode: str) -> None:
    out = tmp_path / "out"
    sets = [*SETS, f"train.length_curriculum_mode={mode}", f"checkpoint.dir={tmp_path / 'ckpt'}",
            f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"]  # fmt: skip
    if mode == "crop":  # windows 2 (weight 2) and 3 drawn per step; eval would use the model's 3
        sets.append("train.attn_windows=[2, 2, 3]")
    run_ranks(tmp_path, out, 2, sets=sets)
    for rank in (0, 1):
        assert result(out, rank)["end_step"] == 8, logs(out)
        assert all(math.isfinite(r["loss"]) and not r["skipped"] for r in steps(out, rank)), logs(out)
    cfg = load_config(None, [*TINY, *sets])
    policy = LoopPolicy(cfg.train.loops, cfg.train.seed, cfg.train.attn_windows)
    want = {s + 1: longest_counted(cfg, s, policy(s).n_loops, policy(s).attn_window) for s in range(8)}
    assert min(want.values()) < 6 < max(want.values())  # both caps bind somewhere in these 8 steps
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        got = dict(db.execute("SELECT step, value FROM metrics WHERE key = 'longest_counted'").fetchall())
        trained = dict(db.execute("SELECT step, value FROM metrics WHERE key = 'longest_chain'").fetchall())
        acc = [v for (v,) in db.execute("SELECT value FROM metrics WHERE key = 'acc'")]
        windows = dict(db.execute("SELECT step, value FROM metrics WHERE key = 'attn_window'").fetchall())
    assert got == want
    want_windows = {s + 1: policy(s).attn_window for s in range(8)} if mode == "crop" else {}
    assert windows == want_windows and set(want_windows.values()) in ({2, 3}, set())
    assert len(acc) == 8 and all(0.0 <= a <= 1.0 for a in acc)
    over_cap = [trained[s + 1] > curriculum_cap(cfg, s) for s in range(8)]
    assert not any(over_cap) if mode == "crop" else any(over_cap), trained
