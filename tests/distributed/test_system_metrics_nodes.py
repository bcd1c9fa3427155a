"""System metrics from every node: a 2-rank gloo job whose ranks are two "nodes" (each its own
hostname, `unshare --uts`, and LOCAL_RANK 0) logs MLflow's system metrics of both into the one
training run on a real `mlflow server`, one series per node (system/<hostname>/...)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.mlflow_servers import Server
from tests.multiproc import REPO, TINY_MODEL, free_port, worker_env
from tests.reliability._common import result

pytestmark = pytest.mark.distributed

WORKER = REPO / "tests" / "reliability" / "_worker.py"


def test_each_node_logs_its_own_series(tmp_path):
    (tmp_path / "mlflow").mkdir()
    server = Server(tmp_path / "mlflow")
    server.start()
    nodes = [f"mythos-node{r}-{free_port()}" for r in range(2)]
    sets = [*TINY_MODEL, "train.steps=6", f"checkpoint.dir={tmp_path / 'ckpt'}", "tracking.enabled=true",
            f"tracking.uri={server.url}", "tracking.experiment=t-nodes", "tracking.system_metrics=true",
            "tracking.system_metrics_interval_s=0.5", "parallel.ep_size=2"]  # fmt: skip
    port = str(free_port())
    procs = []
    try:
        for rank, node in enumerate(nodes):
            env = worker_env(tmp_path, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                             MASTER_ADDR="127.0.0.1", MASTER_PORT=port)  # fmt: skip
            cmd = [
                sys.executable,
                str(WORKER),
                str(tmp_path / "out"),
                *(a for s in sets for a in ("--set", s)),
            ]
            # its own hostname (UTS namespace), same loopback network: a second node as MLflow sees it
            wrapped = ["unshare", "--uts", "sh", "-c", f'hostname {node} && exec "$@"', "sh", *cmd]
            log = open(tmp_path / f"log{rank}.txt", "w")  # noqa: SIM115 - the child keeps its own descriptor
            procs.append(subprocess.Popen(wrapped, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 300
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
        logs = "".join((tmp_path / f"log{r}.txt").read_text()[-3000:] for r in range(2))
        for rank in range(2):  # judged by what each rank recorded (a rank may abort at exit after it)
            assert result(tmp_path / "out", rank)["error"] is None, logs
        exp = server.get("experiments/get-by-name", experiment_name="t-nodes")["experiment"]
        (run,) = server.post("runs/search", {"experiment_ids": [exp["experiment_id"]]})["runs"]
        keys = {m["key"] for m in run["data"]["metrics"]}
        for node in nodes:
            assert f"system/{node}/cpu_utilization_percentage" in keys, sorted(keys)
            assert f"system/{node}/system_memory_usage_megabytes" in keys
        assert {t["key"]: t["value"] for t in run["data"]["tags"]}["hosts"] == ",".join(sorted(nodes))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        server.stop()
