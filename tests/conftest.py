"""Test-session settings shared by every test directory.

`MYTHOS_TEST_DEVICE=cuda pytest tests/unit/test_model.py ...` runs the model tests with that default
device (every tensor and module they create lands there): how the GPU check runs the CPU suite's
model tests on a GPU (benchmarks/gpu_check.sh). Unset, nothing changes.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

if device := os.environ.get("MYTHOS_TEST_DEVICE"):
    torch.set_default_device(device)


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A real 2-step training run (one process, EP=1, ZeRO-0, tests/distributed/train_worker.py):
    its DeepSpeed checkpoint dir, the model config, and the logits its trained module gave on an
    unseen batch (`input_ids`, `logits`). Round-trip tests export it with checkpoint.export rather
    than writing the export format themselves."""
    from tests.multiproc import REPO, TINY_MODEL, run, worker_env

    tmp = tmp_path_factory.mktemp("trained")
    worker = REPO / "tests" / "distributed" / "train_worker.py"
    sets = [*TINY_MODEL, "train.steps=2", "parallel.zero_stage=0", f"checkpoint.dir={tmp / 'ckpt'}"]
    cmd = [sys.executable, str(worker), str(tmp / "out"), *(a for s in sets for a in ("--set", s))]
    run(cmd, worker_env(tmp), tmp / "log.txt", timeout=240)
    from mythos_dist.config import load_config

    dumped = torch.load(tmp / "out" / "logits_rank0.pt")
    return {"ckpt": tmp / "ckpt", "model_cfg": load_config(None, sets).model, **dumped}
