"""2-rank evaluation in real processes writes one complete store equal to a 1-rank evaluation."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr

from mythos_dist.config import load_config
from mythos_dist.evaluate import run_eval
from mythos_dist.loading import load_model

WORKER = Path(__file__).with_name("_eval_worker.py")
CONFIG = {
    "model": {"dim": 32, "n_heads": 4, "n_kv_heads": 2, "expert_dim": 16, "n_experts": 4, "max_seq_len": 16},
    "data": {"task": {"train_lengths": [2, 6], "eval_splits": {"id": [2, 6], "ood1": [7, 12]}, "n_eval": 40}},
    # 37 samples, batch 8: rank 0 holds [0, 24), rank 1 [24, 37) — uneven on purpose
    "eval": {"splits": ["id", "ood1"], "loops": [1, 2, 4], "n_samples": 37, "batch_size": 8},
    "tracking": {"enabled": False},
}


@pytest.mark.distributed
def test_two_rank_eval_equals_one_rank(tmp_path):
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(CONFIG))
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.run(
        [*cmd, str(WORKER), str(cfg_path), str(tmp_path / "two")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]

    cfg = load_config(cfg_path)
    one = run_eval(load_model(None, cfg), cfg, out_dir=tmp_path / "one")
    two = zarr.open_group(str(tmp_path / "two" / "eval-1" / "results.zarr"), mode="r")
    assert two.attrs["world_size"] == 2
    ref = zarr.open_group(str(one.store), mode="r")
    for split in ("id", "ood1"):
        assert two[split]["prediction"].chunks == (24, 3)  # one chunk per rank's region
        for name in ("prediction", "correct", "length", "answer", "sample_id", "delta_norm"):
            a, b = two[split][name][:], ref[split][name][:]
            assert (b != -1).all() if name != "delta_norm" else np.isfinite(b).all()
            np.testing.assert_array_equal(a, b, err_msg=f"{split}/{name}")
    summary = (tmp_path / "two" / "eval-1" / "accuracy.csv").read_text()
    assert summary == (one.out_dir / "accuracy.csv").read_text()
    assert (tmp_path / "two" / "eval-1" / "accuracy_heatmap.png").stat().st_size > 0


FAILING_RANK0 = """
import errno, os, sys
import mythos_dist.plots as plots
def write_plots(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device", "accuracy_heatmap.png")
if os.environ["RANK"] == "0":
    plots.write_plots = write_plots  # after every rank's region is written and the last barrier
from mythos_dist.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.distributed
def test_rank0_failure_after_the_last_barrier_ends_every_rank(tmp_path):
    """`mythos eval` on 2 plain processes (no torchrun agent to kill the other rank): rank 0 fails
    while plotting, after the barrier that ends the sweep. Rank 1 must not be stranded at the
    closing barrier (parallel.timeout_s=300 here, the test waits 150 s): both exit 1 with the error.
    (Before: rank 1 sat at the closing barrier until rank 0's process was gone, then failed with
    gloo's "Connection closed by peer", not the cause; under NCCL it waits for the timeout.)"""
    from tests.multiproc import REPO, free_port, worker_env

    cfg = CONFIG | {"parallel": {"timeout_s": 300}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    args = ["eval", "--config", str(tmp_path / "cfg.yaml"), "--out", str(tmp_path / "eval")]
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        ranks = dict(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                     MASTER_ADDR="127.0.0.1", MASTER_PORT=port)  # fmt: skip
        procs.append(subprocess.Popen([sys.executable, "-c", FAILING_RANK0, *args], env=worker_env(tmp_path, **ranks),
                                      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))  # fmt: skip
    try:
        errs = [p.communicate(timeout=150)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()
    cause = "OSError: [Errno 28] No space left on device: 'accuracy_heatmap.png'"
    assert [p.returncode for p in procs] == [1, 1], errs
    assert f"mythos eval: error: {cause}" in errs[0], errs[0]
    want = f"mythos eval: error: RuntimeError: evaluation failed on rank 0 while writing the results in {tmp_path / 'eval' / 'eval-1'}: {cause}"
    assert want in errs[1], errs[1]
