"""Launch helpers for tests that start real processes (torchrun / plain python) on this machine."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(tmp: Path, **extra: str) -> dict[str, str]:
    """One thread per rank, DeepSpeed on CPU, a per-test TMPDIR, the shared JIT-op cache."""
    env = dict(os.environ)
    tmpdir = tmp / "tmpdir"
    tmpdir.mkdir(parents=True, exist_ok=True)
    env.update(
        OMP_NUM_THREADS="1",
        DS_ACCELERATOR="cpu",
        TMPDIR=str(tmpdir),
        TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".venv" / "torch_extensions")),
        PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]),
    )
    env.update(extra)
    return env


def torchrun(nproc: int, script: Path | str, *args: str, extra: list[str] | None = None) -> list[str]:
    """Command for `torch.distributed.run`: --standalone unless `extra` gives rendezvous flags."""
    rdzv = extra if extra is not None else ["--standalone"]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *rdzv,
        f"--nproc_per_node={nproc}",
        str(script),
        *args,
    ]


def run(cmd: list[str], env: dict[str, str], log: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run to completion with stdout+stderr in `log`; a non-zero exit code (of the launcher: torchrun
    fails when any rank does) raises AssertionError with the log's tail. Workers leave the process
    group before exiting, so a rank does not abort at interpreter exit."""
    with open(log, "w") as f:
        proc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, f"exit code {proc.returncode}: {cmd}\n{log.read_text()[-4000:]}"
    return proc


def start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """Start without waiting (e.g. the nodes of a multi-node job)."""
    return subprocess.Popen(cmd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=REPO)


def run_torchrun(
    script_path: Path | str,
    nproc: int,
    args: Sequence[str] = (),
    env: dict[str, str] | None = None,
    timeout: float = 300,
) -> subprocess.CompletedProcess[str]:
    """Run `python -m torch.distributed.run --standalone --nproc_per_node=nproc script args` to the end.

    env defaults to `worker_env` of a fresh temp dir (OMP_NUM_THREADS=1, own TMPDIR). stdout and
    stderr come back as text. On timeout the whole process group is killed (no rank outlives the
    test) and AssertionError carries the output. Callers check the files the workers wrote.
    """
    env = env if env is not None else worker_env(Path(tempfile.mkdtemp(prefix="torchrun-")))
    cmd = torchrun(nproc, script_path, *args)
    proc = subprocess.Popen(
        cmd,
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise AssertionError(
            f"timed out after {timeout} s: {cmd}\n{stdout[-3000:]}\n{stderr[-3000:]}"
        ) from None
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


# A tiny MoE RDT (4 experts: 2 per rank at ep_size=2, top-2) for real multi-rank training tests.
TINY_MODEL = [
    "model.dim=32",
    "model.n_heads=2",
    "model.n_kv_heads=1",
    "model.n_experts=4",
    "model.n_experts_per_tok=2",
    "model.expert_dim=16",
    "model.lora_rank=4",
    "train.micro_batch_size=8",
    "train.warmup_steps=1",
    "train.lr=0.01",
    "train.loops.n_loops=2",
    "train.log_every=1",
    "data.task.n_train=2000",
    "tracking.enabled=false",
]
