"""SIGTERM (SLURM's time limit or scancel, torchrun stopping its ranks) on ONE rank of two: every rank
saves the same checkpoint at the next step boundary and returns normally; relaunching resumes there
and continues exactly like the uninterrupted run. Plain processes on 127.0.0.1; the same on
namespace hosts under torchrun and under SLURM is in tests/multihost."""

from __future__ import annotations

import pytest
import torch

from mythos_dist.checkpoint import latest_tag
from tests.reliability._common import logs, result, run_ranks, steps

pytestmark = pytest.mark.distributed

SETS = ["train.steps=5", "checkpoint.every=0", "parallel.ep_size=2", "parallel.zero_stage=1"]


def test_sigterm_on_one_rank_checkpoints_all_and_resumes(tmp_path) -> None:
    ref, term, again = tmp_path / "ref", tmp_path / "term", tmp_path / "again"
    run_ranks(tmp_path, ref, 2, sets=[*SETS, f"checkpoint.dir={tmp_path / 'ckpt_ref'}"])
    job = [*SETS, f"checkpoint.dir={tmp_path / 'ckpt'}"]
    run_ranks(tmp_path, term, 2, "--fault", "term@2:1", sets=job)
    for rank in (0, 1):
        r = result(term, rank)
        assert r["error"] is None and r["preempted"] and r["end_step"] == 2, logs(term)
        assert [s["step"] for s in steps(term, rank)] == [1, 2]
    assert latest_tag(tmp_path / "ckpt") == "step_00000002"  # no periodic checkpoints: the SIGTERM one
    assert "step 2: SIGTERM on another rank: saved" in (term / "log_rank0.txt").read_text()
    run_ranks(tmp_path, again, 2, sets=job)
    for rank in (0, 1):
        assert result(again, rank)["start_step"] == 2 and result(again, rank)["end_step"] == 5
        got = steps(term, rank) + steps(again, rank)
        want = steps(ref, rank)
        assert [s["ids"] for s in got] == [s["ids"] for s in want]
        torch.testing.assert_close([s["loss"] for s in got], [s["loss"] for s in want], rtol=1e-5, atol=1e-6)
