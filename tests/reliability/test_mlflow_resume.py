"""One MLflow run per training job: a job interrupted twice (rank 0 SIGKILLed, relaunched, killed
again, relaunched to the end) is one run on a real `mlflow server`, its loss curve has every step
once at the value training computed, and an evaluation of the export nests under that run."""

from __future__ import annotations

import json

import pytest

from mythos_dist.checkpoint import latest_dir
from mythos_dist.config import load_config
from tests.mlflow_servers import Server
from tests.reliability._common import TINY, logs, result, run_ranks, steps

pytestmark = pytest.mark.distributed


def test_interrupted_job_is_one_run_and_eval_nests_under_it(tmp_path):
    root = tmp_path / "mlflow"
    root.mkdir()
    server = Server(root)
    server.start()
    try:
        sets = [
            "train.steps=6",
            "checkpoint.every=2",
            f"checkpoint.dir={tmp_path / 'ckpt'}",
            "tracking.enabled=true",
            "tracking.experiment=t-resume",
            f"tracking.uri={server.url}",
        ]
        # killed after step 3 (last checkpoint: 2), then after step 5 (checkpoint 4), then to the end
        for i, fault in enumerate(["kill@3:0", "kill@5:0", None]):
            out = tmp_path / f"launch{i}"
            run_ranks(tmp_path, out, 1, *(["--fault", fault] if fault else []), sets=sets)
        final = result(out, 0)
        assert final["error"] is None and final["start_step"] == 4 and final["end_step"] == 6, logs(out)

        exp = server.get("experiments/get-by-name", experiment_name="t-resume")["experiment"]
        runs = server.post("runs/search", {"experiment_ids": [exp["experiment_id"]]})["runs"]
        assert len(runs) == 1, [r["info"]["run_name"] for r in runs]
        run = runs[0]
        run_id = run["info"]["run_id"]
        assert run["info"]["status"] == "FINISHED"
        assert (
            json.loads((latest_dir(tmp_path / "ckpt") / "mythos_meta.json").read_text())["mlflow_run_id"]
            == run_id
        )
        # every step once, at the loss the worker saw (the re-trained steps 3 and 5 give the same loss)
        trained = {r["step"]: r["loss"] for i in range(3) for r in steps(tmp_path / f"launch{i}", 0)}
        history = server.metric_history(run_id, "loss")
        assert [s for s, _ in history] == [1, 2, 3, 4, 5, 6]
        assert history == [(s, pytest.approx(trained[s], rel=1e-6)) for s in range(1, 7)]

        # the evaluation of the export nests under the one run
        from mythos_dist.evaluate import run_eval
        from mythos_dist.loading import load_model

        cfg = load_config(None, [*TINY, *sets, "data.task.n_eval=16", "eval.loops=[1,2]", "eval.splits=[id]"])
        export = str(tmp_path / "ckpt" / "export")
        res = run_eval(load_model(export, cfg), cfg, n_samples=16, out_dir=tmp_path / "eval",
                       checkpoint=export, parent_run_id=run_id)  # fmt: skip
        child = server.get("runs/get", run_id=res.run_id)["run"]
        tags = {t["key"]: t["value"] for t in child["data"]["tags"]}
        assert tags["mlflow.parentRunId"] == run_id
    finally:
        server.stop()
