"""Real multi-process training on gloo (2 ranks): expert parallelism, resume, export, multi-node.

Every run trains a tiny MoE RDT (dim 32, 4 experts, top-2, one shared expert) for 4 steps on the
same in-memory digit chains. The reference is EP=1 in ONE process with grad_accum=2, which sees
exactly the samples the two ranks see per step (see ChainBatches). Runs are module-scoped and shared.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.multiproc import TINY_MODEL, free_port, run, start, torchrun, worker_env

pytestmark = pytest.mark.distributed

WORKER = Path(__file__).with_name("train_worker.py")
TINY = [*TINY_MODEL, "model.n_shared_experts=1", "train.steps=4", "train.grad_clip=0.5"]
EP2_Z2 = ("parallel.ep_size=2", "parallel.zero_stage=2", "checkpoint.every=2")


def sets(*items: str) -> list[str]:
    return [a for item in (*TINY, *items) for a in ("--set", item)]


def launch(tmp: Path, name: str, nproc: int, *items: str, ckpt: str = "") -> Path:
    """One training job; returns its output dir (summary_rank*.json, logits_rank*.pt, log.txt)."""
    out = tmp / name
    args = [str(out), *sets(f"checkpoint.dir={tmp / 'ckpt' / (ckpt or name)}", *items)]
    out.mkdir(parents=True, exist_ok=True)
    if nproc == 1:
        cmd = [torchrun(1, WORKER)[0], str(WORKER), *args]  # plain python: no launcher at all
    else:
        cmd = torchrun(nproc, WORKER, *args)
    run(cmd, worker_env(tmp / name), out / "log.txt")
    return out


def summary(out: Path, rank: int = 0) -> dict:
    f = out / f"summary_rank{rank}.json"
    logs = "".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in sorted(out.glob("log*.txt")))
    assert f.is_file(), f"no {f.name}\n{logs}"
    return json.loads(f.read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("train")
    return {
        "ep1": launch(tmp, "ep1", 1, "parallel.ep_size=1", "train.grad_accum_steps=2"),
        # ZeRO-1 with the padded (sync-free) all-to-all, ZeRO-2 with the exact one: both ≡ EP=1
        "ep2_z1": launch(
            tmp, "ep2_z1", 2, "parallel.ep_size=2", "parallel.zero_stage=1", "parallel.ep_dispatch=padded"
        ),
        "ep2_z2": launch(
            tmp, "ep2_z2", 2, "parallel.ep_size=2", "parallel.zero_stage=2", "checkpoint.every=2"
        ),
        # the same over gloo's all-to-all instead of local sockets (parallel.ep_transport)
        "ep2_z2_gloo": launch(tmp, "ep2_z2_gloo", 2, *EP2_Z2, "parallel.ep_transport=process_group"),
        "tmp": tmp,
    }


def assert_same_export(a: Path, b: Path) -> None:
    ta, tb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert ta.keys() == tb.keys()
    assert any(".experts.3.w_in_DH" in k for k in ta)  # experts keyed by global id
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("zero", [1, 2])
def test_ep2_matches_ep1_single_process(runs: dict[str, Path], zero: int) -> None:
    ref, ep2 = runs["ep1"], runs[f"ep2_z{zero}"]
    want, norms = summary(ref)["losses"], summary(ref)["grad_norms"]
    assert len(want) == 4 and want[-1] < want[0]
    assert max(norms) > 0.5  # train.grad_clip=0.5 is active, so the global norm over EP ranks matters
    for rank in (0, 1):
        torch.testing.assert_close(summary(ep2, rank)["losses"], want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(summary(ep2, rank)["grad_norms"], norms, rtol=1e-4, atol=1e-6)
    assert_same_export(Path(summary(ref)["export"]), Path(summary(ep2)["export"]))


def test_local_socket_all_to_all_trains_bit_identically_to_gloo(runs: dict[str, Path]) -> None:
    sockets, gloo = runs["ep2_z2"], runs["ep2_z2_gloo"]
    assert (
        "EP=2, all-to-all over local Unix sockets (2 ranks on this host)" in (sockets / "log.txt").read_text()
    )
    assert "EP=2, all-to-all over the process group (gloo)" in (gloo / "log.txt").read_text()
    for rank in (0, 1):
        for key in ("losses", "grad_norms"):
            assert summary(sockets, rank)[key] == summary(gloo, rank)[key]
    a, b = (load_file(str(Path(summary(r)["export"]) / "model.safetensors")) for r in (sockets, gloo))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_export_from_ep2_loads_in_one_process(runs: dict[str, Path]) -> None:
    from mythos_dist.export import load_exported

    out = runs["ep2_z2"]
    model = load_exported(summary(out)["export"])
    for rank in (0, 1):
        dumped = torch.load(out / f"logits_rank{rank}.pt")
        with torch.no_grad():
            logits = model(dumped["input_ids"], 2).logits
        torch.testing.assert_close(logits, dumped["logits"], rtol=1e-4, atol=1e-5)


def test_relaunched_finished_run_exports_mean_of_last_checkpoints(runs: dict[str, Path]) -> None:
    """A finished run launched again (2 ranks) trains nothing and exports as now configured: with
    checkpoint.average_last=2, the mean of the weights at steps 2 and 4, experts by global id."""
    from mythos_dist.checkpoint import META, export
    from mythos_dist.export import exported_steps
    from mythos_dist.safe_io import CheckpointError

    tmp = runs["tmp"]
    shutil.copytree(tmp / "ckpt" / "ep2_z2", tmp / "ckpt" / "avg")
    out = launch(tmp, "avg", 2, *EP2_Z2, "checkpoint.average_last=2")
    for rank in (0, 1):
        assert summary(out, rank)["start_step"] == summary(out, rank)["end_step"] == 4
        assert summary(out, rank)["losses"] == []
    averaged = Path(summary(out)["export"])
    assert exported_steps(averaged) == [2, 4]
    ends = [load_file(str(export(tmp / "ckpt" / "avg" / f"step_0000000{n}", tmp / f"at{n}") / "model.safetensors"))
            for n in (2, 4)]  # fmt: skip
    got = load_file(str(averaged / "model.safetensors"))
    assert got.keys() == ends[0].keys() and any(".experts.3.w_in_DH" in k for k in got)
    moved = [k for k in got if not torch.equal(ends[0][k], ends[1][k])]
    assert any(".experts." in k for k in moved) and any(".experts." not in k for k in moved)
    for k in got:
        torch.testing.assert_close(got[k], (ends[0][k] + ends[1][k]) / 2, rtol=1e-6, atol=1e-7)
    # checkpoints of another model config are not averaged
    other = shutil.copytree(tmp / "ckpt" / "avg" / "step_00000002", tmp / "other" / "step_00000002")
    meta = json.loads((other / META).read_text())
    meta["config"]["model"]["rope_theta"] = 500.0
    (other / META).write_text(json.dumps(meta))
    with pytest.raises(
        CheckpointError,
        match=r"model configs differ:\n  model\.rope_theta: checkpoint 500\.0, this run 10000\.0",
    ):
        export([tmp / "ckpt" / "avg" / "step_00000004", other], tmp / "mixed")
    assert not (tmp / "mixed").exists()


@pytest.fixture(scope="module")
def two_nodes(runs: dict[str, Path]) -> Path:
    """Steps 1-2 of the EP=2 ZeRO-2 run as two torchrun invocations (--nnodes=2, one process each,
    c10d rendezvous on 127.0.0.1), checkpointing at step 2 and stopping: the interrupted run.
    Nodes with their own addresses, hostnames and /dev/shm: tests/multihost."""
    tmp = runs["tmp"]
    out = tmp / "two_nodes"
    out.mkdir()
    port = free_port()
    args = [str(out), "--stop-after", "2", *sets(f"checkpoint.dir={tmp / 'ckpt' / 'two_nodes'}", *EP2_Z2)]
    procs = []
    for node in (0, 1):
        rdzv = [
            "--nnodes=2",
            f"--node_rank={node}",
            "--rdzv_backend=c10d",
            f"--rdzv_endpoint=127.0.0.1:{port}",
        ]
        env = worker_env(tmp / f"node{node}")
        procs.append(
            start(
                torchrun(1, WORKER, *args, extra=[*rdzv, "--rdzv_id=two-nodes"]),
                env,
                out / f"log_node{node}.txt",
            )
        )
    try:
        rcs = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    logs = "".join(f"--- {f.name}\n{f.read_text()[-3000:]}" for f in sorted(out.glob("log_node*.txt")))
    assert rcs == [0, 0], logs  # each torchrun exits 0 only when all its ranks did
    return out


def test_two_nodes_train_like_one_node(runs: dict[str, Path], two_nodes: Path) -> None:
    want = summary(runs["ep2_z2"])["losses"][:2]
    for rank in (0, 1):
        s = summary(two_nodes, rank)
        assert s["end_step"] == 2
        torch.testing.assert_close(s["losses"], want, rtol=1e-6, atol=1e-7)


def test_resume_reproduces_uninterrupted_losses(runs: dict[str, Path], two_nodes: Path) -> None:
    """1 node x 2 processes resumes the two-node job's step-2 checkpoint and must continue exactly
    like the uninterrupted run (weights, Adam moments, LR schedule, router biases, data position)."""
    assert (runs["tmp"] / "ckpt" / "two_nodes" / "latest").read_text() == "step_00000002"
    resumed = launch(runs["tmp"], "resumed", 2, *EP2_Z2, ckpt="two_nodes")
    s = summary(resumed)
    assert s["start_step"] == 2 and s["end_step"] == 4
    torch.testing.assert_close(s["losses"], summary(runs["ep2_z2"])["losses"][2:], rtol=1e-6, atol=1e-7)
