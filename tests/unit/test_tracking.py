"""Tracker against a real `mlflow server` (sqlite store) on 127.0.0.1, checked through its REST API."""

import time
import warnings

import pytest

from mythos_dist.config import Config, TrackingConfig, flatten, to_dict
from mythos_dist.tracking import Tracker, TrackingWarning, resolve_uri
from tests.mlflow_servers import HangingProxy, HangingServer, Server
from tests.multiproc import free_port


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("mlflow"))
    srv.start()
    yield srv
    srv.stop()


def test_run_params_metrics_artifacts_via_rest(server, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    cfg = Config()
    cfg.train.loops.sigma = 0.25
    tracker = Tracker(TrackingConfig(experiment="t-basic"), enabled_on_this_rank=True)
    long_value = "x" * 10_000
    run_id = tracker.start("basic", to_dict(cfg) | {"note": long_value}, tags={"kind": "test"})
    assert run_id
    for step in range(3):
        tracker.log_metrics({"train/loss": 1.0 / (step + 1), "lr": 0.1}, step=step)
    (tmp_path / "table.csv").write_text("a,b\n1,2\n")
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "zarr.json").write_text("{}")
    tracker.log_artifact(tmp_path / "table.csv")
    tracker.log_artifact(tmp_path / "store", artifact_path="eval")
    tracker.log_dict({"x": 1}, "summary.json")
    tracker.finish()

    run = server.get("runs/get", run_id=run_id)["run"]
    assert run["info"]["status"] == "FINISHED"
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    flat = flatten(to_dict(cfg))
    assert params["train.loops.sigma"] == "0.25"
    assert params["data.task.eval_splits.id"] == "[2, 12]"
    assert set(flat) <= set(params)
    assert params["note"].endswith("...") and len(params["note"]) <= 6000
    assert {t["key"]: t["value"] for t in run["data"]["tags"]}["kind"] == "test"
    assert server.metric_history(run_id, "train/loss") == [(0, 1.0), (1, 0.5), (2, pytest.approx(1 / 3))]
    top = {f["path"]: f for f in server.get("artifacts/list", run_id=run_id).get("files", [])}
    assert {"table.csv", "summary.json", "eval"} <= set(top)
    assert int(top["table.csv"]["file_size"]) > 0
    nested = server.get("artifacts/list", run_id=run_id, path="eval/store")["files"]
    assert [f["path"] for f in nested] == ["eval/store/zarr.json"]


def test_eval_run_nested_under_training_run(server, tmp_path, monkeypatch):
    """An evaluation logs metrics, table, plots and the zarr store under the training run."""
    import torch

    from mythos_dist.config import load_config
    from mythos_dist.evaluate import acc_metric, run_eval
    from mythos_dist.model import RDT

    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    overrides = ["model.dim=32", "model.n_heads=4", "model.n_kv_heads=2", "model.expert_dim=16"]
    overrides += ["model.n_experts=4", "data.task.n_eval=16", "tracking.experiment=t-eval"]
    cfg = load_config(None, overrides)
    train = Tracker(cfg.tracking, True)
    parent_id = train.start("train", {"a": 1})
    torch.manual_seed(0)
    res = run_eval(
        RDT(cfg.model), cfg, "1,2", ["id"], 16, tmp_path / "eval", parent_run_id=parent_id, batch_size=8
    )
    train.finish()

    run = server.get("runs/get", run_id=res.run_id)["run"]
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    assert tags["mlflow.parentRunId"] == parent_id
    metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    assert metrics[acc_metric("id", 2)] == pytest.approx(res.summary["splits"]["id"]["acc"][1])
    assert 0 < metrics["spectral/rho_A"] < 1 and metrics["spectral/jacobian_radius"] > 0
    assert server.metric_history(res.run_id, "eval/id/acc") == [
        (n, pytest.approx(a)) for n, a in zip((1, 2), res.summary["splits"]["id"]["acc"])
    ]

    def files(path: str) -> dict[str, int]:
        listing = server.get("artifacts/list", run_id=res.run_id, path=path).get("files", [])
        return {f["path"]: int(f.get("file_size", -1)) for f in listing}

    assert set(files("")) >= {"plots", "summary", "results.zarr"}
    plots = files("plots")
    assert {
        f"plots/{n}.png" for n in ("accuracy_vs_loops", "accuracy_heatmap", "convergence", "stability")
    } <= set(plots)
    assert all(size > 0 for size in plots.values())
    assert files("summary")["summary/accuracy.csv"] > 0
    assert "results.zarr/id/correct" in files("results.zarr/id")


def test_disabled_tracker_is_a_no_op(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/never/mlflow.db")
    for cfg, rank_ok in [(TrackingConfig(enabled=False), True), (TrackingConfig(), False)]:
        tracker = Tracker(cfg, rank_ok)
        assert tracker.start("x", {"a": 1}) is None
        tracker.log_metrics({"m": 1.0}, step=0)
        tracker.finish()
    assert not (tmp_path / "never").exists()


def test_sqlite_uri_creates_parent_and_env_overrides(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path}/a/b/mlflow.db"
    assert resolve_uri(TrackingConfig(uri=uri)) == uri
    assert (tmp_path / "a" / "b").is_dir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://example.invalid:1")
    assert resolve_uri(TrackingConfig(uri=uri)) == "http://example.invalid:1"


def _timed(fn, *args, **kwargs) -> float:
    t0 = time.monotonic()
    fn(*args, **kwargs)
    return time.monotonic() - t0


def test_hanging_server_never_stalls_logging(monkeypatch):
    """A server that accepts the connection and never answers: start() gives up on the run after
    tracking.timeout_s, every logging call returns at once, the buffer stays bounded (the oldest
    metrics are dropped and counted) and finish() is bounded too."""
    with HangingServer() as hanging:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", hanging.url)
        cfg = TrackingConfig(experiment="t-hang")
        cfg.timeout_s, cfg.buffer = 2.0, 20
        tracker = Tracker(cfg, True, retry_interval_s=0.5)
        t0 = time.monotonic()
        run_id = tracker.start("hang", {"a": 1})
        start_s = time.monotonic() - t0
        assert run_id is None and start_s < cfg.timeout_s + 3, start_s
        assert hanging.accepted, "the tracker never connected: this tests a hanging, not a refused, server"
        call_s = [_timed(tracker.log_metrics, {"loss": float(s), "lr": 0.1}, step=s) for s in range(200)]
        assert max(call_s) < 0.5, max(call_s)
        assert tracker.pending <= cfg.buffer
        assert tracker.dropped_metrics >= 2 * (200 - cfg.buffer)  # two values per step
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            finish_s = _timed(tracker.finish)
        assert finish_s < cfg.timeout_s + 3, finish_s
        report = [str(w.message) for w in caught if issubclass(w.category, TrackingWarning)]
        assert any("dropped from the full buffer" in m for m in report), report


def test_refused_connection_does_not_wait_for_the_timeout(monkeypatch):
    """A server that is simply not there fails fast: start() returns once the first attempt failed,
    not after tracking.timeout_s."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    cfg = TrackingConfig(experiment="t-refused", timeout_s=60.0)
    tracker = Tracker(cfg, True)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        t0 = time.monotonic()
        assert tracker.start("refused", {"a": 1}) is None
        assert time.monotonic() - t0 < 20
        tracker.log_metrics({"loss": 1.0}, step=1)
        cfg.timeout_s = 1.0
        tracker.finish()


def test_server_that_hangs_mid_run_warns_once_and_buffered_metrics_arrive(server, monkeypatch):
    """Last in the module but one. The server starts hanging mid-run (a proxy in front of the real
    server stops answering): logging calls stay fast, one warning is issued, and once the server
    answers again every buffered metric arrives exactly once, at its step."""
    proxy = HangingProxy(server.port)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", proxy.url)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    cfg = TrackingConfig(experiment="t-outage")
    cfg.timeout_s = 60.0
    tracker = Tracker(cfg, True, retry_interval_s=0.5)
    try:
        run_id = tracker.start("outage", {"a": 1})
        assert run_id
        tracker.log_metrics({"loss": 0.0}, step=0)
        assert tracker.flush()
        proxy.hang()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call_s = []
            for step in range(1, 11):  # "training" goes on while the server hangs
                call_s.append(_timed(tracker.log_metrics, {"loss": float(step)}, step=step))
                time.sleep(0.5)
            assert max(call_s) < 0.5, call_s
            assert tracker.pending >= 5  # held back, not lost
            proxy.recover()
            tracker.log_metrics({"loss": 11.0}, step=11)
            assert tracker.flush()
        outage = [str(w.message) for w in caught if issubclass(w.category, TrackingWarning)]
        assert len(outage) == 1 and "unreachable" in outage[0], outage
        tracker.finish()
    finally:
        proxy.close()
    assert server.metric_history(run_id, "loss") == [(s, float(s)) for s in range(12)]
    assert server.get("runs/get", run_id=run_id)["run"]["info"]["status"] == "FINISHED"


def test_an_evaluation_dataset_names_its_held_out_set() -> None:
    from mythos_dist.config import load_config
    from mythos_dist.tracking import dataset_record

    test = dataset_record(load_config(None, []), "ood1", from_shards=False)
    val = dataset_record(load_config(None, ["eval.heldout=val"]), "ood1", from_shards=False)
    assert (test.name, val.name) == ("digit-chain/ood1/test", "digit-chain/ood1/val")
    assert test.digest != val.digest and val.profile["heldout"] == "val"
    assert "heldout='val'" in val.source
