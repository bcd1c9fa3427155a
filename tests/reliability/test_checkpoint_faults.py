"""Checkpoint faults and bad checkpoints. One single-process run (ZeRO-0) is shared: it skips a NaN
step (the ZeRO-0 path, where DeepSpeed itself would apply non-finite gradients) and is SIGKILLed
while writing its step-4 checkpoint. Its intact step-2 checkpoint then serves the bad-input tests."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

from mythos_dist import checkpoint
from mythos_dist.checkpoint import check_compatible, export, latest_tag, read_meta
from mythos_dist.config import Config, from_dict, load_config
from mythos_dist.export import exported_steps, load_exported
from mythos_dist.safe_io import CheckpointError
from tests.reliability._common import TINY, logs, result, run_ranks, steps


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("save_kill")
    sets = ["train.steps=4", "checkpoint.every=2", "parallel.zero_stage=0", f"checkpoint.dir={tmp / 'ckpt'}"]
    run_ranks(tmp, tmp / "out", 1, "--fault", "nan-loss@3:0", "--fault", "kill-save@4:0", sets=sets)
    return tmp


@pytest.mark.distributed
def test_kill_during_save_keeps_previous_checkpoint(run: Path, tmp_path: Path) -> None:
    ckpt = run / "ckpt"
    assert [r["step"] for r in steps(run / "out", 0)] == [1, 2, 3, 4]
    assert not (run / "out" / "result_rank0.json").exists(), logs(run / "out")  # it died in save
    assert latest_tag(ckpt) == "step_00000002"
    partial = ckpt / "step_00000004"
    assert (partial / "mp_rank_00_model_states.pt").is_file()  # DeepSpeed's part was written
    with pytest.raises(CheckpointError, match=r"is partial .* interrupted while saving"):
        read_meta(partial)
    model = load_exported(export(ckpt, tmp_path / "export"))  # `latest` -> step 2, loads completely
    assert all(p.isfinite().all() for p in model.parameters())


@pytest.mark.distributed
def test_zero0_nonfinite_step_skipped_params_unchanged(run: Path) -> None:
    rows = steps(run / "out", 0)
    assert [r["step"] for r in rows if r["skipped"]] == [3]
    assert rows[2]["digest"] == rows[1]["digest"]
    assert rows[3]["digest"] != rows[2]["digest"]


@pytest.mark.distributed
@pytest.mark.parametrize(
    "name", ["mp_rank_00_model_states.pt", "layer_0_expert_3_mp_rank_00_model_states.pt"]
)
def test_truncated_checkpoint_file_is_a_clear_error(run: Path, tmp_path: Path, name: str) -> None:
    tag = shutil.copytree(run / "ckpt" / "step_00000002", tmp_path / "step_00000002")
    os.truncate(tag / name, (tag / name).stat().st_size // 2)
    with pytest.raises(CheckpointError, match=f"cannot read {tag / name}: truncated or corrupt"):
        export(tag, tmp_path / "export")


@pytest.mark.distributed
def test_truncated_export_is_a_clear_error(run: Path, tmp_path: Path) -> None:
    out = export(run / "ckpt", tmp_path / "export")
    f = out / "model.safetensors"
    os.truncate(f, f.stat().st_size // 2)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated or corrupt"):
        load_exported(out)


class _TorchLoadEngine:
    """Stands in for DeepSpeed's engine at resume: load_checkpoint reads the module file through its
    checkpoint_engine, as DeepSpeed's does."""

    checkpoint_engine = TorchCheckpointEngine()

    def load_checkpoint(self, root: str, tag: str, **_: Any) -> tuple[str, dict]:
        self.checkpoint_engine.load(str(Path(root) / tag / "mp_rank_00_model_states.pt"))
        return root, {}


@pytest.mark.distributed
def test_resume_from_truncated_checkpoint_is_a_clear_error(run: Path, tmp_path: Path) -> None:
    ckpt = shutil.copytree(run / "ckpt", tmp_path / "ckpt")
    dense = ckpt / "step_00000002" / "mp_rank_00_model_states.pt"
    os.truncate(dense, dense.stat().st_size // 2)
    cfg = load_config(None, [*TINY, "parallel.zero_stage=0", f"checkpoint.dir={ckpt}"])
    with pytest.raises(CheckpointError, match=r"cannot load checkpoint .*step_00000002: .*zip archive"):
        checkpoint.resume(_TorchLoadEngine(), cfg)


@pytest.mark.distributed
def test_resume_with_other_model_lists_every_mismatch(run: Path) -> None:
    tag = run / "ckpt" / "step_00000002"
    cfg = load_config(None, [*TINY, "model.n_experts=8", "model.dim=64", "parallel.zero_stage=0"])
    with pytest.raises(CheckpointError, match="does not match this run") as e:
        check_compatible(read_meta(tag), cfg, 2, tag)
    for line in (
        "model.n_experts: checkpoint 4, this run 8",
        "model.dim: checkpoint 32, this run 64",
        "world size: checkpoint 1, this run 2",
    ):
        assert line in str(e.value)


def test_preflight_refuses_too_little_free_space(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_config(None, [*TINY, f"checkpoint.dir={tmp_path / 'ckpt'}"])
    need = checkpoint.checkpoint_bytes(cfg)
    monkeypatch.setattr(
        checkpoint.shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10**12, 0, need - 1)
    )
    with pytest.raises(CheckpointError, match=r"MiB free, one checkpoint needs about .* MiB"):
        checkpoint.preflight(cfg)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10**12, 0, need))
    checkpoint.preflight(cfg)
    assert list((tmp_path / "ckpt").iterdir()) == []  # the write probe is gone


def test_preflight_refuses_unwritable_dir(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    cfg = load_config(None, [*TINY, f"checkpoint.dir={tmp_path / 'file' / 'ckpt'}"])
    with pytest.raises(
        CheckpointError, match=r"checkpoint.dir=.*file/ckpt is not writable: .*Not a directory"
    ):
        checkpoint.preflight(cfg)


@pytest.mark.distributed
def test_resume_refuses_another_recipe_but_allows_longer_training(run: Path) -> None:
    tag = run / "ckpt" / "step_00000002"
    meta = read_meta(tag)
    longer = from_dict(Config, meta["config"])
    check_compatible(meta, longer, 1, tag)  # the same run
    longer.train.steps *= 2
    longer.data.num_workers += 1
    check_compatible(meta, longer, 1, tag)  # extended, read with more workers: fine
    other = from_dict(Config, meta["config"])
    other.train.lr *= 10
    other.train.loops.kind = "uniform"
    other.data.task.modulus = 5
    with pytest.raises(CheckpointError, match="does not match this run") as e:
        check_compatible(meta, other, 1, tag)
    msg = str(e.value)
    assert (
        "train.lr: checkpoint" in msg and "train.loops: checkpoint" in msg and "data.task: checkpoint" in msg
    )
    assert "train.steps" not in msg and "checkpoint.resume=false" in msg


@pytest.mark.distributed
def test_restart_with_resume_false_in_a_used_dir_keeps_its_own_checkpoints(tmp_path: Path) -> None:
    """A run of 9 steps leaves steps 3, 6, 9; a new 4-step run (other lr, saves every 2) in the same
    directory with checkpoint.resume=false must keep its own steps 2 and 4, `latest` naming step 4,
    and export the mean of those two, not of the earlier run's step 3 in between. On main, pruning
    sorted the earlier run's tags in and deleted the new run's, the one `latest` named first."""
    ckpt = tmp_path / "ckpt"
    common = ["parallel.zero_stage=0", f"checkpoint.dir={ckpt}"]
    run_ranks(
        tmp_path,
        tmp_path / "long",
        1,
        sets=[*common, "train.steps=9", "checkpoint.every=3", "checkpoint.keep_last=3"],
    )
    assert latest_tag(ckpt) == "step_00000009", logs(tmp_path / "long")
    (ckpt / "step_00000001").mkdir()  # a partial tag (a killed save) is never counted as complete
    new = [*common, "train.steps=4", "checkpoint.every=2", "train.lr=0.005", "checkpoint.resume=false",
           "checkpoint.keep_last=2", "checkpoint.average_last=2"]  # fmt: skip
    run_ranks(tmp_path, tmp_path / "new", 1, sets=new)
    assert result(tmp_path / "new", 0)["error"] is None, logs(tmp_path / "new")
    assert latest_tag(ckpt) == "step_00000004"
    for tag in ("step_00000002", "step_00000004"):
        assert read_meta(ckpt / tag)["config"]["train"]["lr"] == 0.005  # this run's, complete
    assert exported_steps(ckpt / "export") == [2, 4]
    assert [p.name for p in checkpoint.run_checkpoints(ckpt)] == ["step_00000002", "step_00000004"]
    for tag in ("step_00000003", "step_00000006", "step_00000009"):  # the earlier run's: not pruned
        assert read_meta(ckpt / tag)["config"]["train"]["lr"] == 0.01
    assert not (ckpt / "step_00000001").exists()


@pytest.mark.distributed
@pytest.mark.parametrize(("fault", "file"), [("enospc-optim@4:1", "zero_pp_rank_1_mp_rank_00_optim_states.pt"),
                                             ("enospc-model@4:0", "layer_0_expert_0_mp_rank_00_model_states.pt")])  # fmt: skip
def test_write_error_inside_deepspeed_save_fails_every_rank_promptly(
    tmp_path: Path, fault: str, file: str
) -> None:
    """A full disk in one of DeepSpeed's own files (ZeRO optimizer state on rank 1, or the model
    states on rank 0; 2 ranks, EP=2, ZeRO-1): every rank raises the same clear CheckpointError well
    within parallel.timeout_s instead of waiting in mismatched collectives, and `latest` still
    names the previous checkpoint."""
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    sets = ["train.steps=4", "checkpoint.every=2", "parallel.ep_size=2", "parallel.zero_stage=1",
            "parallel.timeout_s=300", f"checkpoint.dir={ckpt}"]  # fmt: skip
    run_ranks(tmp_path, out, 2, "--fault", fault, sets=sets, timeout=200)  # < timeout_s: a hang fails
    failed_rank = int(fault.rsplit(":", 1)[1])
    for rank in (0, 1):
        res = result(out, rank)
        assert res["error_type"] == "CheckpointError", logs(out)
        assert f"saving checkpoint {ckpt / 'step_00000004'} failed" in res["error"]
        assert "removed the partial checkpoint, latest still names step_00000002" in res["error"]
        cause = f"No space left on device: '{ckpt / 'step_00000004' / file}'"
        assert (
            cause in res["error"] if rank == failed_rank else "a write failed on another rank" in res["error"]
        )
    assert latest_tag(ckpt) == "step_00000002"
    assert not (ckpt / "step_00000004").exists()
