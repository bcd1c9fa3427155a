"""The main job in miniature: `mythos experiment` on 2 real ranks, every stage checked by its outputs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import zarr
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[2]


def test_experiment_end_to_end(tmp_path: Path) -> None:
    db = tmp_path / "mlflow.db"
    sets = {
        "train.steps": 6,
        "train.warmup_steps": 2,
        "train.log_every": 3,
        "train.micro_batch_size": 16,
        "model.dim": 32,
        "model.expert_dim": 16,
        "model.n_experts": 4,
        "data.task.n_train": 2000,
        "data.task.n_eval": 64,
        "data.samples_per_shard": 500,
        "data.remote": str(tmp_path / "shards"),
        "checkpoint.dir": str(tmp_path / "ckpt"),
        "checkpoint.every": 3,
        "eval.n_samples": 32,
        "eval.loops": "[1, 2, 4, 6]",
        "eval.out_dir": str(tmp_path / "eval"),
        "tracking.uri": f"sqlite:///{db}",
    }
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    env = {**os.environ, "TMPDIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)

    def experiment(*more: str) -> str:
        cmd = [sys.executable, "-m", "mythos_dist.cli", "experiment", "--config", "configs/digit_chain.yaml"]
        proc = subprocess.run(
            [*cmd, *args, *more], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc.stdout

    out = experiment()

    # shards with a manifest
    assert (tmp_path / "shards" / "manifest.json").is_file()
    # checkpoints: two periodic ones, `latest` on the last, and the export
    ckpt = tmp_path / "ckpt"
    assert (ckpt / "latest").read_text().strip().endswith("6")
    assert (ckpt / "export" / "model.safetensors").stat().st_size > 0
    summary = json.loads((ckpt / "train_summary.json").read_text())
    assert summary["end_step"] == 6
    # the zarr store: every split, every sample, every loop count
    eval_dir = tmp_path / "eval" / "eval-1"
    store = zarr.open_group(str(eval_dir / "results.zarr"), mode="r")
    for split in ("id", "ood1", "ood2"):
        assert store[split]["prediction"].shape == (32, 4)
        assert (store[split]["sample_id"][:] >= 0).all()
    pngs = ("accuracy_vs_loops.png", "accuracy_heatmap.png", "convergence.png", "stability.png",
            "stability_over_training.png")  # fmt: skip
    for png in pngs:
        assert (eval_dir / png).stat().st_size > 1000
    # stability over training: both retained checkpoints (steps 3 and 6), at 4 and at 6 loops
    rows = json.loads((eval_dir / "stability_over_training.json").read_text())
    assert [r["step"] for r in rows] == [3, 6]
    assert all(set(r["jacobian_radius"]) == {"4", "6"} and 0 < r["rho_A"] < 1 for r in rows)
    # the printed report
    assert "ood2" in out and "@6" in out and "mlflow ui --backend-store-uri" in out

    # MLflow: a training run with metrics and an eval run nested under it with the table and plots
    # Not mlflow.set_tracking_uri: it exports MLFLOW_TRACKING_URI, which later tests' workers inherit.
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    train_run = client.get_run(summary["run_id"])
    assert train_run.info.status == "FINISHED"
    assert {"loss", "lr", "rho_A", "tokens_per_s", "moe0/load_cv"} <= set(train_run.data.metrics)
    params = train_run.data.params
    assert params["run.world_size"] == "2" and params["parallel.ep_size"] == "2" and params["run.hosts"]
    assert len(params["run.git_commit"]) >= 40
    assert params["run.torch_threads"] == "1"  # OMP_NUM_THREADS=1 above: recorded, it changes results
    children = client.search_runs(
        [train_run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{train_run.info.run_id}'"
    )
    assert len(children) == 1
    ev = children[0]
    assert "eval/ood1/acc_at_4" in ev.data.metrics and "spectral/rho_A" in ev.data.metrics
    history = client.get_metric_history(ev.info.run_id, "stability/jacobian_radius_at_4")
    assert sorted(m.step for m in history) == [3, 6] and all(m.value > 0 for m in history)
    plots = {a.path: a.file_size for a in client.list_artifacts(ev.info.run_id, "plots")}
    assert plots.get("plots/accuracy_vs_loops.png", 0) > 1000
    tables = {a.path for a in client.list_artifacts(ev.info.run_id, "summary")}
    assert "summary/accuracy.csv" in tables

    # Launched again with checkpoint.average_last=2: nothing is trained, the export becomes the mean
    # of the weights at steps 3 and 6, and a second evaluation records whose weights it evaluated.
    again = experiment("--set", "checkpoint.average_last=2")
    assert "nothing left to train (resumed at step 6)" in again
    assert "the mean of the weights at steps [3, 6]" in again
    assert json.loads((ckpt / "export" / "config.json").read_text())["averaged_steps"] == [3, 6]
    assert (tmp_path / "eval" / "eval-2" / "accuracy_vs_loops.png").stat().st_size > 1000
    evals = client.search_runs([train_run.info.experiment_id], filter_string="tags.kind = 'eval'")
    assert sorted(r.data.params.get("eval_run.weights_of_steps") for r in evals) == ["3,6", "6"]
    # one MLflow run per job: the relaunch continued the training run, both evaluations nest under it
    trains = client.search_runs([train_run.info.experiment_id], filter_string="tags.kind = 'train'")
    assert [r.info.run_id for r in trains] == [train_run.info.run_id]
    assert {r.data.tags["mlflow.parentRunId"] for r in evals} == {train_run.info.run_id}
