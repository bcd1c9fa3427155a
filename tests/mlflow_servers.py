"""Tracking servers for tests, all on 127.0.0.1: a real `mlflow server` (sqlite store), a server that
accepts connections and never answers, and a proxy in front of a real server that can start hanging
like that mid-run and come back."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from tests.multiproc import free_port

MLFLOW = str(Path(sys.executable).parent / "mlflow")


class Server:
    """`mlflow server --workers 1` on host:port in its own process group (gunicorn/uvicorn workers
    die with it); extra_args/env e.g. for the auth app."""

    def __init__(
        self,
        root: Path,
        port: int | None = None,
        host: str = "127.0.0.1",
        extra_args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ):
        self.root, self.port, self.proc = root, port or free_port(), None
        self.host, self.extra_args, self.env = host, extra_args, env or {}
        self.url = f"http://{host}:{self.port}"

    def start(self) -> None:
        env = os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"} | self.env
        cmd = [MLFLOW, "server", "--workers", "1", "--host", self.host, "--port", str(self.port)]
        cmd += [*self.extra_args, "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}"]
        cmd += ["--artifacts-destination", str(self.root / "artifacts")]
        log = open(self.root / "server.log", "ab")  # noqa: SIM115 - lives as long as the server
        self.proc = subprocess.Popen(
            cmd, cwd=self.root, env=env, stdout=log, stderr=log, start_new_session=True
        )
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=1)
                return
            except (urllib.error.URLError, OSError):
                if self.proc.poll() is not None:
                    raise RuntimeError((self.root / "server.log").read_text()[-2000:]) from None
                time.sleep(0.3)
        self.stop()
        raise TimeoutError("mlflow server did not come up")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def get(self, endpoint: str, **params) -> dict:
        q = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/2.0/mlflow/{endpoint}?{q}", timeout=10) as r:
            return json.loads(r.read())

    def post(self, endpoint: str, body: dict) -> dict:
        req = urllib.request.Request(
            f"{self.url}/api/2.0/mlflow/{endpoint}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    def metric_history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        hist = self.get("metrics/get-history", run_id=run_id, metric_key=key)["metrics"]
        return sorted((int(m.get("step", 0)), m["value"]) for m in hist)


class HangingServer:
    """Listens on 127.0.0.1, accepts every connection and never answers (nor closes it)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.accepted: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # closed
                return
            self.accepted.append(conn)  # held open, never read or written

    def close(self) -> None:
        self.sock.close()
        for c in self.accepted:
            c.close()

    def __enter__(self) -> HangingServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class HangingProxy:
    """Forwards 127.0.0.1:port to a real server until `hang()`: from then on it accepts connections
    and forwards nothing either way, as a server that hangs does; `recover()` closes the connections
    it stalled and forwards again."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream = upstream_port
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.hanging = False
        self.stalled: list[socket.socket] = []  # client connections that got no answer
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def hang(self) -> None:
        self.hanging = True

    def recover(self) -> None:
        with self.lock:
            self.hanging = False
            stalled, self.stalled = self.stalled, []
        for c in stalled:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            c.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                if self.hanging:
                    self.stalled.append(client)
                    continue
            up = socket.create_connection(("127.0.0.1", self.upstream))
            threading.Thread(target=self._pump, args=(client, up, client), daemon=True).start()
            threading.Thread(target=self._pump, args=(up, client, client), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, client: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                with self.lock:
                    if self.hanging:  # swallow it: the client waits for an answer that never comes
                        if client not in self.stalled:
                            self.stalled.append(client)
                        continue
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.recover()
        self.sock.close()
