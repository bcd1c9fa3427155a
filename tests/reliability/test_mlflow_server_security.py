"""The two claims docs/reliability.md ("Security") makes about running the MLflow server, each shown
on a real `mlflow server`: bound to 127.0.0.1 it cannot be reached from another host (a network
namespace host made here, joined by a veth pair), and with MLflow's basic-auth app nobody writes
without credentials while our Tracker, given them, logs as usual."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from mythos_dist.config import TrackingConfig
from mythos_dist.tracking import Tracker
from tests.mlflow_servers import Server
from tests.multiproc import free_port

HOST_IP, PEER_IP = "10.213.99.1", "10.213.99.2"  # a /30 of our own, on the veth pair only


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def peer_host() -> Iterator[str]:
    """A second host: a network namespace whose only link is a veth pair to this one (no route
    anywhere else). Yields the namespace name; removed afterwards, also when the test fails."""
    ns, tag = f"mythos-peer-{os.getpid()}", f"{os.getpid() % 100000}"
    _ip("netns", "add", ns)
    try:
        _ip("link", "add", f"mpa{tag}", "type", "veth", "peer", "name", f"mpb{tag}")
        _ip("link", "set", f"mpb{tag}", "netns", ns)
        _ip("addr", "add", f"{HOST_IP}/30", "dev", f"mpa{tag}")
        _ip("link", "set", f"mpa{tag}", "up")
        _ip("-n", ns, "addr", "add", f"{PEER_IP}/30", "dev", f"mpb{tag}")
        _ip("-n", ns, "link", "set", f"mpb{tag}", "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        yield ns
    finally:
        subprocess.run(["ip", "link", "del", f"mpa{tag}"], capture_output=True)  # takes its peer along
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _reach_from(ns: str, url: str) -> str:
    """GET url from inside the namespace: the HTTP status, or the connection error's name."""
    probe = (
        "import sys, urllib.request\n"
        "try:\n"
        "    print(urllib.request.urlopen(sys.argv[1], timeout=5).status)\n"
        "except urllib.error.HTTPError as e:\n"
        "    print(e.code)\n"
        "except OSError as e:\n"
        "    print(type(getattr(e, 'reason', e)).__name__)\n"
    )
    out = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", probe, url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return out.stdout.strip() or out.stderr[-500:]


@pytest.mark.distributed
def test_server_bound_to_loopback_is_unreachable_from_another_host(peer_host: str, tmp_path: Path) -> None:
    loopback = Server(tmp_path / "loopback", free_port())
    shared = Server(tmp_path / "shared", free_port(), host=HOST_IP)  # what --host 0.0.0.0 would expose
    for s in (loopback, shared):
        s.root.mkdir()
    try:
        loopback.start()
        shared.start()
        assert _reach_from(peer_host, f"http://{HOST_IP}:{shared.port}/health") == "200"
        assert _reach_from(peer_host, f"http://{HOST_IP}:{loopback.port}/health") == "ConnectionRefusedError"
    finally:
        loopback.stop()
        shared.stop()


def _post(url: str, body: dict, user: str | None = None, password: str | None = None) -> int:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    req.add_header("Content-Type", "application/json")
    if user is not None:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.mark.distributed
def test_basic_auth_server_refuses_anonymous_writes_and_takes_ours(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ini = tmp_path / "basic_auth.ini"
    ini.write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = sqlite:///{tmp_path / 'auth.db'}\nadmin_username = admin\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    secret = "s3cret-for-this-test"
    env = {"MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_AUTH_ADMIN_PASSWORD": secret}
    env["MLFLOW_FLASK_SERVER_SECRET_KEY"] = "csrf-key-for-this-test"  # the auth app requires one
    server = Server(tmp_path, free_port(), extra_args=("--app-name", "basic-auth"), env=env)
    create = f"{server.url}/api/2.0/mlflow/experiments/create"
    try:
        server.start()
        assert _post(create, {"name": "anonymous"}) == 401
        assert _post(create, {"name": "wrong"}, "admin", "guess") == 401
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", secret)
        tracker = Tracker(TrackingConfig(experiment="authorised"), enabled_on_this_rank=True)
        run_id = tracker.start("with-credentials", {"a": 1})
        tracker.log_metrics({"loss": 0.5}, step=1)
        tracker.finish()
        assert run_id and tracker.pending == 0
        req = urllib.request.Request(f"{server.url}/api/2.0/mlflow/runs/get?run_id={run_id}")
        req.add_header("Authorization", "Basic " + base64.b64encode(f"admin:{secret}".encode()).decode())
        with urllib.request.urlopen(req, timeout=10) as r:
            run = json.loads(r.read())["run"]
        assert run["data"]["metrics"][0]["key"] == "loss" and run["info"]["status"] == "FINISHED"
    finally:
        server.stop()
