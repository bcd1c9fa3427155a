"""Expert-parallel evaluation of large checkpoints: `mythos init` writes a sharded export without
holding the model; 2 ranks at parallel.ep_size=2 each read only the dense part and their own
experts, move tokens by all-to-all, and give the per-sample predictions of the 1-rank evaluation
exactly, also when the sample count leaves one rank with fewer batches (it keeps joining every
collective); `mythos spectral` runs expert-parallel too."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zarr

from mythos_dist.cli import main
from mythos_dist.config import load_config
from mythos_dist.evaluate import run_eval
from mythos_dist.export import INDEX_FILE, ExportReader, load_exported, load_shard, rank_of_tensor
from mythos_dist.loading import load_model
from mythos_dist.safe_io import CheckpointError
from tests.multiproc import REPO, worker_env

pytestmark = pytest.mark.distributed

CONFIG = {
    "model": {"dim": 32, "n_heads": 4, "n_kv_heads": 2, "expert_dim": 16, "n_experts": 4, "max_seq_len": 16},
    "data": {"task": {"train_lengths": [2, 6], "eval_splits": {"id": [2, 6], "ood1": [7, 12]}, "n_eval": 40}},
    # batch 4. 17 samples: rank 0 holds [0, 12) in 3 batches, rank 1 [12, 17) in 2 (it runs one
    # filler); 13: [0, 8) and [8, 13), 2 batches each, one short; 3: rank 1 holds none (2 fillers)
    "eval": {"splits": ["id", "ood1"], "loops": [1, 2, 4], "batch_size": 4},
    "parallel": {"ep_size": 2},
    "train": {"seed": 3},
    "tracking": {"enabled": False},
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(config path, export dir): a fresh init written tensor by tensor, in 8 kB shards."""
    tmp = tmp_path_factory.mktemp("ep_eval")
    cfg_path = tmp / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(CONFIG))
    args = ["init", "--config", str(cfg_path), "--out", str(tmp / "init"), "--max-shard-size", "8kB"]
    assert main(args) == 0
    return cfg_path, tmp / "init"


def test_init_tensor_by_tensor_equals_the_whole_models_keyed_init(
    exported: tuple[Path, Path], tmp_path: Path
) -> None:
    cfg_path, out = exported
    assert (
        len(list(out.glob("model-*-of-*.safetensors"))) >= 3
        and (out / "model.safetensors.index.json").is_file()
    )
    cfg = load_config(cfg_path)
    whole = load_model(None, cfg)  # 1 process, all experts, keyed by train.seed
    got = load_exported(out).state_dict()
    assert got.keys() == whole.state_dict().keys()
    for k, v in whole.state_dict().items():
        assert torch.equal(got[k], v), k


def test_a_shard_reads_only_dense_and_its_own_experts(exported: tuple[Path, Path]) -> None:
    _, out = exported
    reader = ExportReader(out)
    shapes = reader.shapes()
    model = load_shard(reader, ep_size=2, ep_rank=1)
    theirs = [k for k in shapes if ".experts.0." in k or ".experts.1." in k]
    assert theirs and reader.bytes_read == sum(
        4 * torch.Size(s).numel() for k, s in shapes.items() if k not in theirs
    )
    full = load_exported(out).state_dict()
    w = model.state_dict()["recurrent.block.ffn.experts.w_in_EDH"]
    assert w.shape[0] == 2 and torch.equal(w, full["recurrent.block.ffn.experts.w_in_EDH"][2:4])


def test_a_shard_needs_only_the_files_holding_its_tensors(
    exported: tuple[Path, Path], tmp_path: Path
) -> None:
    """What a per-rank download leaves: without the shards holding only another rank's experts,
    the rank's reader (shard=(ep, rank)) loads the same weights; the whole-model reader names the
    missing file."""
    _, out = exported
    part = tmp_path / "part"
    shutil.copytree(out, part)
    weight_map = json.loads((out / INDEX_FILE).read_text())["weight_map"]
    n_experts = ExportReader(out).model_cfg.n_experts
    mine = {f for k, f in weight_map.items() if rank_of_tensor(k, n_experts, 2) in (None, 1)}
    gone = sorted(set(weight_map.values()) - mine)
    assert gone  # the fixture's 8 kB shards put rank 0's experts in files of their own
    for f in gone:
        (part / f).unlink()
    with pytest.raises(CheckpointError, match=f"names {gone[0]}, which does not exist"):
        ExportReader(part)
    want = load_shard(ExportReader(out), ep_size=2, ep_rank=1).state_dict()
    got = load_shard(ExportReader(part, shard=(2, 1)), ep_size=2, ep_rank=1).state_dict()
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


def _torchrun(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", "mythos_dist.cli", *args]
    return subprocess.run(cmd, env=worker_env(tmp), capture_output=True, text=True, timeout=300, cwd=REPO)


@pytest.mark.parametrize("n_samples,dispatch", [(17, "exact"), (13, "padded"), (3, "exact")])
def test_two_rank_expert_parallel_eval_equals_one_rank(
    exported: tuple[Path, Path], tmp_path: Path, n_samples: int, dispatch: str
) -> None:
    cfg_path, out = exported
    args = ["eval", "--config", str(cfg_path), "--checkpoint", str(out), "--n-samples", str(n_samples)]
    # The spectral report in blocks of <= 3 samples: 17 -> shares 8 | 9, 3 blocks per rank; 13 -> 6 | 7; 3 -> 1 | 2.
    # Padded all-to-all: its token counts change between blocks and between the ranks' shares.
    blocks = ["--set", "eval.spectral_batch_size=3", "--set", f"parallel.ep_dispatch={dispatch}"]
    proc = _torchrun(tmp_path, *args, *blocks, "--out", str(tmp_path / "two"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "expert-parallel evaluation: ep_size=2, 2 of 4 experts per rank" in proc.stdout
    cfg = load_config(cfg_path)
    one = run_eval(load_model(out, cfg), cfg, n_samples=n_samples, out_dir=tmp_path / "one")
    two = zarr.open_group(str(tmp_path / "two" / "eval-1" / "results.zarr"), mode="r")
    ref = zarr.open_group(str(one.store), mode="r")
    assert two.attrs["world_size"] == 2
    for split in ("id", "ood1"):
        for name in ("prediction", "correct", "sample_id"):
            np.testing.assert_array_equal(two[split][name][:], ref[split][name][:], err_msg=f"{split}/{name}")
        np.testing.assert_allclose(two[split]["delta_norm"][:], ref[split]["delta_norm"][:], rtol=1e-5)
    assert (tmp_path / "two" / "eval-1" / "accuracy.csv").read_text() == (
        one.out_dir / "accuracy.csv"
    ).read_text()
    spectral = json.loads((tmp_path / "two" / "eval-1" / "spectral.json").read_text())
    for key in ("jacobian_radius", "jacobian_norm_ratios", "contraction_ratios"):
        assert spectral[key] == pytest.approx(one.spectral[key], rel=1e-4), key


def test_spectral_runs_expert_parallel(exported: tuple[Path, Path], tmp_path: Path) -> None:
    cfg_path, out = exported
    proc = _torchrun(tmp_path, "spectral", "--config", str(cfg_path), "--checkpoint", str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    env = worker_env(tmp_path) | {"RANK": ""}
    env.pop("RANK")
    one = subprocess.run(
        [
            sys.executable,
            "-m",
            "mythos_dist.cli",
            "spectral",
            "--config",
            str(cfg_path),
            "--checkpoint",
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert one.returncode == 0, one.stderr[-3000:]

    def radius(text: str) -> float:
        return float(
            next(line for line in text.splitlines() if line.startswith("Jacobian radius")).split()[2]
        )

    assert proc.stdout.count("Jacobian radius") == 1  # rank 0 prints
    assert radius(proc.stdout) == pytest.approx(radius(one.stdout), rel=1e-4)
    assert os.environ.get("RANK") is None


@pytest.mark.parametrize("dispatch", ["exact", "padded"])
def test_two_rank_expert_parallel_auto_loops_equal_one_rank(
    exported: tuple[Path, Path], tmp_path: Path, dispatch: str
) -> None:
    """`--loops ...,auto` on 2 ranks at EP=2: each sample stops once converged; ranks whose samples
    have all stopped keep stepping (and rank 1 runs a filler batch) until every rank is done, so the
    loops used and predictions equal the 1-rank evaluation's sample for sample, and every sample's
    prediction is the fixed-count prediction at its own loops used."""
    cfg_path, out = exported
    sets = ["--set", "eval.auto_threshold=0.14", "--set", "eval.auto_max_loops=12"]
    sets += ["--set", f"parallel.ep_dispatch={dispatch}"]
    args = ["eval", "--config", str(cfg_path), "--checkpoint", str(out), "--n-samples", "17", *sets]
    proc = _torchrun(tmp_path, *args, "--loops", "1,2,4,auto", "--out", str(tmp_path / "two"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "@auto" in proc.stdout and "loops mean/p90" in proc.stdout
    cfg = load_config(cfg_path, [s for s in sets if s != "--set"])
    cfg.eval.auto = True
    one = run_eval(
        load_model(out, cfg), cfg, loops=list(range(1, 13)), n_samples=17, out_dir=tmp_path / "one"
    )
    two = zarr.open_group(str(tmp_path / "two" / "eval-1" / "results.zarr"), mode="r")
    ref = zarr.open_group(str(one.store), mode="r")
    assert two.attrs["auto"] == {"threshold": 0.14, "min_loops": 1, "max_loops": 12}
    assert two.attrs["heldout"] == "test"
    used_all = []
    for split in ("id", "ood1"):
        for name in ("auto_prediction", "auto_correct", "auto_loops"):
            np.testing.assert_array_equal(two[split][name][:], ref[split][name][:], err_msg=f"{split}/{name}")
        used = ref[split]["auto_loops"][:].astype(int)
        pred_at_used = ref[split]["prediction"][:][np.arange(17), used - 1]  # ref holds loops 1..12
        np.testing.assert_array_equal(ref[split]["auto_prediction"][:], pred_at_used)
        used_all += used.tolist()
    assert min(used_all) >= 1 and max(used_all) <= 12 and len(set(used_all)) >= 2  # not all the same
    summary = json.loads((tmp_path / "two" / "eval-1" / "summary.json").read_text())
    auto = summary["splits"]["id"]["auto"]
    assert auto["loops_mean"] == pytest.approx(np.mean(two["id"]["auto_loops"][:]))
    assert (tmp_path / "two" / "eval-1" / "auto_loops.csv").is_file()
