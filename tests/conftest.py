"""Test-session settings shared by every test directory.

`MYTHOS_TEST_DEVICE=cuda pytest tests/unit/test_model.py ...` runs the model tests with that default
device (every tensor and module they create lands there): how the GPU check runs the CPU suite's
model tests on a GPU (benchmarks/gpu_check.sh). Unset, nothing changes.
"""

from __future__ import annotations

import os

import torch

if device := os.environ.get("MYTHOS_TEST_DEVICE"):
    torch.set_default_device(device)
