"""Sharded export (safetensors shards + model.safetensors.index.json, the Hugging Face layout) of a
real 2-rank EP=2 ZeRO-2 checkpoint: round trip, streamed averaging, lazy per-tensor reading, clear
errors for damaged shards, and a peak memory bounded by one shard rather than the model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from mythos_dist.checkpoint import export
from mythos_dist.config import load_config, parse_size
from mythos_dist.export import INDEX_FILE, ExportReader, load_exported, rank_of_tensor
from mythos_dist.safe_io import CheckpointError
from mythos_dist.sweep import chain_batches
from mythos_dist.upcycle import upcycle
from tests.multiproc import REPO, TINY_MODEL, run, run_torchrun, start, torchrun, worker_env
from tests.reliability._common import logs, run_ranks

pytestmark = pytest.mark.distributed

WORKER = REPO / "tests" / "distributed" / "train_worker.py"
SHARD = 20_000  # bytes: the tiny model (~80 kB) spreads over several shards


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Checkpoints at steps 2 and 4 of a 2-rank EP=2 ZeRO-2 run (experts in files by global id)."""
    tmp = tmp_path_factory.mktemp("sharded")
    items = [
        *TINY_MODEL,
        "train.steps=4",
        "parallel.ep_size=2",
        "parallel.zero_stage=2",
        "checkpoint.every=2",
    ]
    items += [f"checkpoint.dir={tmp / 'ckpt'}", "checkpoint.keep_last=2"]
    out = tmp / "out"
    out.mkdir()
    run(
        torchrun(2, WORKER, str(out), *(a for i in items for a in ("--set", i))),
        worker_env(tmp),
        out / "log.txt",
    )
    assert (tmp / "ckpt" / "step_00000004" / "mythos_meta.json").is_file(), (out / "log.txt").read_text()[
        -3000:
    ]
    return tmp / "ckpt"


def state(path: Path) -> dict[str, torch.Tensor]:
    return load_exported(path).state_dict()


def test_sharded_export_round_trips_and_indexes_every_tensor(ckpt: Path, tmp_path: Path) -> None:
    single = export(ckpt, tmp_path / "single")
    sharded = export(ckpt, tmp_path / "sharded", max_shard_bytes=SHARD)
    assert (single / "model.safetensors").is_file() and not (single / INDEX_FILE).exists()
    index = json.loads((sharded / INDEX_FILE).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 3 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert sorted(p.name for p in sharded.glob("*.safetensors")) == files
    for f in files:  # each shard within the bound, unless it holds one tensor larger than it
        with safe_open(str(sharded / f), framework="pt") as h:
            sizes = [h.get_slice(k).get_shape() for k in h.keys()]  # noqa: SIM118 - a handle, not a dict
        nbytes = sum(4 * int(torch.Size(s).numel()) for s in sizes)
        assert nbytes <= SHARD or len(sizes) == 1
    assert any(".experts.3.w_in_DH" in k for k in index["weight_map"])  # experts keyed by global id
    shapes = ExportReader(single).shapes()
    assert set(index["weight_map"]) == set(shapes)
    assert index["metadata"]["total_size"] == sum(4 * torch.Size(s).numel() for s in shapes.values())
    a, b = state(single), state(sharded)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _export_on_two_ranks(ckpt: Path, out: Path, tmp: Path) -> subprocess.CompletedProcess[str]:
    args = ["mythos_dist.cli", "export", "--checkpoint", str(ckpt), "--out", str(out)]
    return run_torchrun("-m", 2, [*args, "--max-shard-size", str(SHARD)], worker_env(tmp), timeout=240)


def test_export_from_two_ranks_equals_the_one_process_export(ckpt: Path, tmp_path: Path) -> None:
    """`torchrun --nproc_per_node 2 -m mythos_dist.cli export`: rank 0 writes the dense shards and
    the index, each rank the shards of its own experts (2 of 4); tensor by tensor the 1-process
    export."""
    one = export(ckpt, tmp_path / "one", max_shard_bytes=SHARD)
    proc = _export_on_two_ranks(ckpt, tmp_path / "two", tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    index = json.loads((tmp_path / "two" / INDEX_FILE).read_text())["weight_map"]
    writer_of = {}  # file -> the ranks whose tensors it holds
    for name, f in index.items():
        writer_of.setdefault(f, set()).add(rank_of_tensor(name, 4, 2) or 0)  # dense: rank 0
    assert all(len(r) == 1 for r in writer_of.values()), writer_of  # no file mixes two ranks' tensors
    assert {r for rs in writer_of.values() for r in rs} == {0, 1}
    assert {rank_of_tensor(k, 4, 2) for k in index if ".experts.3." in k} == {1}
    assert sorted(p.name for p in (tmp_path / "two").glob("*.safetensors")) == sorted(writer_of)
    a, b = state(one), state(tmp_path / "two")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_export_from_two_ranks_fails_on_both_when_one_cannot_read(ckpt: Path, tmp_path: Path) -> None:
    """Rank 1's expert file is corrupt: both ranks end promptly (rank 0 does not wait for rank 1's
    shards), the error names the file, the export already there is untouched, nothing partial is
    left behind."""
    src = tmp_path / "ckpt"
    shutil.copytree(ckpt / "step_00000004", src / "step_00000004")
    (src / "latest").write_text("step_00000004")
    bad = src / "step_00000004" / "layer_0_expert_3_mp_rank_00_model_states.pt"
    os.truncate(bad, bad.stat().st_size // 2)
    out = export(ckpt, tmp_path / "out", max_shard_bytes=SHARD)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    t = time.perf_counter()
    proc = _export_on_two_ranks(src, out, tmp_path)
    took = time.perf_counter() - t
    assert proc.returncode != 0
    assert str(bad) in proc.stdout + proc.stderr, proc.stderr[-3000:]
    assert "failed on another rank" in proc.stdout + proc.stderr, proc.stderr[-3000:]
    assert took < 120, took  # the collective timeout (parallel.timeout_s) is 120 s
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_streamed_mean_equals_the_fp64_mean(ckpt: Path, tmp_path: Path) -> None:
    steps = [ckpt / "step_00000002", ckpt / "step_00000004"]
    ends = [ExportReader(export(s, tmp_path / s.name)) for s in steps]
    mean = ExportReader(export(steps, tmp_path / "mean", max_shard_bytes=SHARD))
    assert json.loads((mean.dir / "config.json").read_text())["averaged_steps"] == [2, 4]
    moved = 0
    for k in ends[0].names:
        want = ((ends[0].get(k).double() + ends[1].get(k).double()) / 2).float()
        assert torch.equal(mean.get(k), want), k
        moved += not torch.equal(ends[0].get(k), ends[1].get(k))
    assert moved > 0


def test_reader_reads_only_the_tensors_asked_for(ckpt: Path, tmp_path: Path) -> None:
    reader = ExportReader(export(ckpt, tmp_path / "x", max_shard_bytes=SHARD))
    shapes = reader.shapes()  # headers only
    assert reader.bytes_read == 0
    mine = [k for k in shapes if ".experts.1." in k]
    for k in mine:
        reader.get(k)
    assert reader.bytes_read == sum(4 * torch.Size(shapes[k]).numel() for k in mine)


def test_damaged_shards_and_index_are_clear_errors(ckpt: Path, tmp_path: Path) -> None:
    out = export(ckpt, tmp_path / "x", max_shard_bytes=SHARD)
    second = out / sorted(json.loads((out / INDEX_FILE).read_text())["weight_map"].values())[1]
    os.truncate(second, second.stat().st_size // 2)
    with pytest.raises(CheckpointError, match=f"cannot read {second}: truncated or corrupt"):
        load_exported(out)
    second.unlink()
    with pytest.raises(
        CheckpointError, match=f"{out / INDEX_FILE} names {second.name}, which does not exist"
    ):
        load_exported(out)
    (out / INDEX_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match=f"{out / INDEX_FILE}: not valid JSON"):
        load_exported(out)


def test_export_refuses_to_replace_a_directory_that_is_not_an_export(ckpt: Path, tmp_path: Path) -> None:
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="is not an export directory: refusing to replace it"):
        export(ckpt, tmp_path / "results")
    assert (tmp_path / "results" / "notes.txt").read_text() == "mine"
    again = export(ckpt, export(ckpt, tmp_path / "e"))  # an export is replaced as a whole
    assert sorted(p.name for p in again.iterdir()) == ["config.json", "model.safetensors"]
    assert not list(tmp_path.glob(".e.*"))


PEAK = """
import json, sys, threading, time
from pathlib import Path
import torch
from mythos_dist import checkpoint
from mythos_dist.config import ModelConfig, from_dict
from mythos_dist.model import RDT
def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))
with torch.device("meta"):  # torch's one-time cost of a first meta-device build (~70 MB) is not the export's
    RDT(from_dict(ModelConfig, checkpoint.read_meta(Path(sys.argv[1]))["config"]["model"]))
before, peak, done = status("RssAnon:"), [0], threading.Event()
def sample():  # the kernel keeps no peak of anonymous memory: sample it
    while not done.is_set():
        peak[0] = max(peak[0], status("RssAnon:"))
        time.sleep(0.002)
sampler = threading.Thread(target=sample)
sampler.start()
checkpoint.export(sys.argv[1:3], sys.argv[3], max_shard_bytes=int(sys.argv[4]))
done.set()
sampler.join()
print(json.dumps({"before": before, "peak": peak[0]}))
"""


def test_averaging_export_peak_memory_is_one_shard_not_the_model(tmp_path: Path) -> None:
    """A 1-rank run of a 232 MB model; the mean of its two checkpoints, exported in 16 MB shards,
    raises the process's anonymous memory by far less than the model's bytes (the in-memory mean
    held both checkpoints and an fp64 sum: > 4x the model). The dense files are memory-mapped:
    their pages are the page cache's, reclaimable, not counted here."""
    sets = [
        *TINY_MODEL,
        "model.dim=512",
        "model.n_heads=4",
        "model.expert_dim=512",
        "model.n_experts=64",
        "model.lora_rank=0",
        "train.steps=2",
        "checkpoint.every=1",
        "parallel.zero_stage=0",
        f"checkpoint.dir={tmp_path / 'ckpt'}",
    ]
    run_ranks(tmp_path, tmp_path / "out", 1, sets=sets)
    steps = [str(tmp_path / "ckpt" / f"step_0000000{n}") for n in (1, 2)]
    assert all(Path(s, "mythos_meta.json").is_file() for s in steps), logs(tmp_path / "out")
    shard = 16 * 2**20
    proc = subprocess.run(
        [sys.executable, "-c", PEAK, *steps, str(tmp_path / "export"), str(shard)],
        env=worker_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    mem = json.loads(proc.stdout.strip().splitlines()[-1])
    model_bytes = sum(4 * torch.Size(s).numel() for s in ExportReader(tmp_path / "export").shapes().values())
    assert model_bytes > 130e6
    print(
        f"export of the mean of 2: anon +{(mem['peak'] - mem['before']) / 2**20:.1f} MiB, model {model_bytes / 2**20:.1f} MiB"
    )
    assert mem["peak"] - mem["before"] < shard + 0.25 * model_bytes, (mem, model_bytes)


def test_shard_sizes_parse_like_hugging_face() -> None:
    assert [parse_size(t) for t in ("2GB", "500MB", "64KiB", "1.5 GiB", "1024")] == [
        2 * 10**9,
        500 * 10**6,
        64 * 1024,
        int(1.5 * 2**30),
        1024,
    ]
    with pytest.raises(ValueError, match="not a size: '2 parsecs'"):
        parse_size("2 parsecs")


def test_upcycle_keeps_the_function_and_trains_on_at_a_new_ep_size(ckpt: Path, tmp_path: Path) -> None:
    """4 trained experts (top-2) -> 8 of half the width (top-4): the same logits at every loop
    count; then 2-rank EP=2 jobs started from each (train.init_from) log the same first loss."""
    src = export(ckpt, tmp_path / "src")
    big = upcycle(src, tmp_path / "big", 8, max_shard_bytes=SHARD)
    a, b = load_exported(src), load_exported(big)
    assert (b.cfg.n_experts, b.cfg.n_experts_per_tok, b.cfg.expert_dim) == (8, 4, 8)
    assert a.state_dict()["recurrent.block.ffn.router.expert_bias"].abs().sum() > 0  # balancing moved
    cfg = load_config(None, TINY_MODEL)
    ids = next(chain_batches(cfg, "id", 0, 64, 64))["input_ids"]
    with torch.no_grad():
        for n in (1, 2, 4):
            torch.testing.assert_close(b(ids, n).logits, a(ids, n).logits, rtol=1e-5, atol=1e-5)
    for bad, why in ((6, "must be a multiple > 1"), (128, "expert_dim=16 is not divisible")):
        with pytest.raises(CheckpointError, match=why):
            upcycle(src, tmp_path / "bad", bad)
    jobs = {}
    for name, model in (
        ("src", []),
        ("big", ["model.n_experts=8", "model.n_experts_per_tok=4", "model.expert_dim=8"]),
    ):
        items = [*TINY_MODEL, *model, "train.steps=1", "parallel.ep_size=2", "parallel.zero_stage=2"]
        items += [f"train.init_from={tmp_path / name}", f"checkpoint.dir={tmp_path / 'ckpt' / name}"]
        out = tmp_path / f"train_{name}"
        out.mkdir()
        cmd = torchrun(2, WORKER, str(out), *(a for i in items for a in ("--set", i)))
        jobs[name] = (start(cmd, worker_env(tmp_path / name), out / "log.txt"), out)
    losses = {}
    for name, (proc, out) in jobs.items():
        proc.wait(timeout=300)
        f = out / "summary_rank0.json"
        assert f.is_file(), (out / "log.txt").read_text()[-3000:]
        losses[name] = json.loads(f.read_text())["losses"][0]
    assert losses["big"] == pytest.approx(losses["src"], rel=1e-5)
