"""Opening a checkpoint never runs code from it. A real 2-rank EP=2 ZeRO-1 run writes a checkpoint;
copies of it get one file replaced by a valid-looking pickle that also calls os.system (it would
create a marker file). Every command that reads checkpoints must refuse it, naming the file and the
call, and the marker must never appear."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

from mythos_dist import checkpoint
from mythos_dist.cli import main
from mythos_dist.safe_io import UntrustedCheckpointError
from tests.multiproc import REPO
from tests.reliability._common import logs, result, run_ranks, start_ranks

STEP = "step_00000002"
BASE = ["parallel.ep_size=2", "parallel.zero_stage=1", "checkpoint.every=2"]
FILES = {  # file kind -> the file of the step dir that gets the payload
    "dense": "mp_rank_00_model_states.pt",
    "expert": "layer_0_expert_3_mp_rank_00_model_states.pt",
    "extra": "extra_rank1.pt",  # read by rank 1 only
    "optimizer": "zero_pp_rank_0_mp_rank_00_optim_states.pt",  # read by DeepSpeed only, at resume
}


class Payload:
    """Unpickling this calls os.system: what a hostile checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def poisoned_copy(run: Path, dest: Path, kind: str) -> tuple[Path, Path]:
    """(checkpoint dir, marker path): a copy of the run's checkpoints whose `kind` file keeps its
    content and gains one entry that runs the payload when unpickled."""
    ckpt = shutil.copytree(run / "ckpt", dest / "ckpt")
    marker = dest / "payload_ran"
    f = ckpt / STEP / FILES[kind]
    content = torch.load(f, weights_only=False)  # our own file, written by the run above
    content["payload"] = Payload(marker)
    torch.save(content, f)
    return ckpt, marker


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("untrusted")
    run_ranks(tmp, tmp / "out", 2, sets=[*BASE, "train.steps=2", f"checkpoint.dir={tmp / 'ckpt'}"])
    assert checkpoint.latest_tag(tmp / "ckpt") == STEP, logs(tmp / "out")
    return tmp


@pytest.mark.distributed
@pytest.mark.parametrize("command", ["eval", "spectral", "export"])
@pytest.mark.parametrize("kind", ["dense", "expert"])
def test_commands_refuse_a_pickle_that_runs_code(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture, kind: str, command: str
) -> None:
    ckpt, marker = poisoned_copy(run, tmp_path, kind)
    args = ["--checkpoint", str(ckpt)]
    if command == "export":
        args += ["--out", str(tmp_path / "export")]
    else:
        args += ["--config", str(REPO / "configs" / "digit_chain.yaml"), "--set", "tracking.enabled=false"]
    assert main([command, *args]) == 2
    err = capsys.readouterr().err
    assert f"mythos {command}: error: refusing to read {ckpt / STEP / FILES[kind]}" in err
    assert "posix.system" in err and "nothing in it was run" in err
    assert not marker.exists()
    assert not (tmp_path / "export").exists()


@pytest.fixture(scope="module")
def resumed(run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path, Path]]:
    """Relaunch the 2-rank job on each poisoned copy (and on a clean one), all at once:
    kind -> (checkpoint dir, marker, worker output dir)."""
    jobs, procs = {}, []
    for kind in [*FILES, "clean"]:
        tmp = tmp_path_factory.mktemp(f"resume_{kind}")
        if kind == "clean":
            ckpt, marker = shutil.copytree(run / "ckpt", tmp / "ckpt"), tmp / "payload_ran"
        else:
            ckpt, marker = poisoned_copy(run, tmp, kind)
        sets = [*BASE, "train.steps=4", f"checkpoint.dir={ckpt}"]
        procs += start_ranks(tmp, tmp / "out", 2, sets=sets)
        jobs[kind] = (ckpt, marker, tmp / "out")
    try:
        for p in procs:
            p.wait(timeout=300)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return jobs


@pytest.mark.distributed
@pytest.mark.parametrize("kind", list(FILES))
def test_resume_refuses_a_pickle_that_runs_code_on_every_rank(
    resumed: dict[str, tuple[Path, Path, Path]], kind: str
) -> None:
    ckpt, marker, out = resumed[kind]
    bad = ckpt / STEP / FILES[kind]
    for rank in (0, 1):  # every rank vets every file, so both name it (none is left waiting)
        res = result(out, rank)
        assert res["error_type"] == "UntrustedCheckpointError", logs(out)
        assert res["error"].startswith(f"refusing to read {bad}: loading it would call posix.system")
    assert not marker.exists()
    assert checkpoint.latest_tag(ckpt) == STEP


@pytest.mark.distributed
def test_own_checkpoint_resumes_through_the_safe_reader(resumed: dict[str, tuple[Path, Path, Path]]) -> None:
    ckpt, _, out = resumed["clean"]
    for rank in (0, 1):
        res = result(out, rank)
        assert res["error"] is None, logs(out)
        assert (res["start_step"], res["end_step"]) == (2, 4)
    assert checkpoint.latest_tag(ckpt) == "step_00000004"


@pytest.mark.distributed
def test_deepspeed_reader_is_routed_through_the_safe_loader(run: Path, tmp_path: Path) -> None:
    """The second line of defence: while resume runs, DeepSpeed's own reader (weights_only=False)
    goes through `safe_io.torch_load`, and is restored afterwards."""
    ckpt, marker = poisoned_copy(run, tmp_path, "optimizer")
    engine = type("Engine", (), {"checkpoint_engine": TorchCheckpointEngine()})()
    with checkpoint._deepspeed_reads_safely(engine), pytest.raises(UntrustedCheckpointError, match="posix"):
        engine.checkpoint_engine.load(str(ckpt / STEP / FILES["optimizer"]))
    assert not marker.exists()
    assert "load" not in vars(engine.checkpoint_engine)  # DeepSpeed's method is back
    clean = engine.checkpoint_engine.load(str(run / "ckpt" / STEP / FILES["optimizer"]))
    assert "optimizer_state_dict" in clean
