"""MLflow experiment tracking: the ONE place with MLflow side effects, active on rank 0 only.

Every call goes through a queue of pending operations (create run, params, metrics, artifacts,
terminate) that is flushed in order. When the tracking server is unreachable the failing call is
caught, a single warning is issued for the outage, and later calls keep queuing; the queue is
retried at most every `retry_interval_s` so an outage never stalls training for long. Metrics keep
their original step and timestamp, so after the server returns the history is complete. Re-sent
batches are harmless: MLflow ignores exact duplicate metric entries.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
import warnings
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mythos_dist.config import TrackingConfig, flatten

log = logging.getLogger(__name__)

# MLflow's own HTTP retries back off for minutes by default; we retry from our queue instead.
_HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}
_SQLITE = "sqlite:///"


class TrackingWarning(RuntimeWarning):
    """The tracking server could not be reached; training continues and logging is buffered."""


def resolve_uri(cfg: TrackingConfig) -> str:
    """MLFLOW_TRACKING_URI wins over the config; a sqlite file gets its parent directory created."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or cfg.uri
    if uri.startswith(_SQLITE):
        Path(uri[len(_SQLITE) :]).parent.mkdir(parents=True, exist_ok=True)
    return uri


def _param_str(value: Any) -> str:
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value)
    return str(value)


def _truncate(text: str, limit: int) -> str:
    # Keep a visible marker so a cut value is never mistaken for the real one.
    return text if len(text) <= limit else text[: limit - 3] + "..."


def git_commit() -> str:
    """HEAD of the source tree, with '-dirty' when it has uncommitted changes; 'unknown' outside git."""
    cwd = Path(__file__).resolve().parent

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)

    try:
        sha = git("rev-parse", "HEAD")
        if sha.returncode != 0:
            return "unknown"
        return sha.stdout.strip() + ("-dirty" if git("status", "--porcelain").stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class Tracker:
    def __init__(self, cfg: TrackingConfig, enabled_on_this_rank: bool, retry_interval_s: float = 30.0):
        self.cfg = cfg
        self.enabled = cfg.enabled and enabled_on_this_rank
        self.retry_interval_s = retry_interval_s
        self.uri = ""  # resolved in start(): the env may change between construction and start
        self._pending: deque[Callable[[], None]] = deque()
        self._run_id: str | None = None
        self._client: Any = None
        self._down = False
        self._last_attempt = -float("inf")

    @property
    def run_id(self) -> str | None:
        """None until the run exists on the server (or when tracking is off on this rank)."""
        return self._run_id

    @property
    def pending(self) -> int:
        """Operations queued while the server is unreachable."""
        return len(self._pending)

    # ----------------------------------------------------------------------------------- public API

    def start(
        self,
        run_name: str,
        params: dict[str, Any],
        parent_run_id: str | None = None,
        tags: dict[str, str] | None = None,
    ) -> str | None:
        """Create the run (nested under parent_run_id when given) and log flattened params."""
        if not self.enabled:
            return None
        if self._client is not None:
            raise RuntimeError("Tracker.start called twice; use one Tracker per run")
        # mlflow is imported only here (and in the logging calls): ranks > 0 never pay for it.
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
        from mlflow.utils.validation import (
            MAX_ENTITY_KEY_LENGTH,
            MAX_PARAM_VAL_LENGTH,
            MAX_PARAMS_TAGS_PER_BATCH,
            MAX_TAG_VAL_LENGTH,
        )

        for k, v in _HTTP_DEFAULTS.items():
            os.environ.setdefault(k, v)
        self.uri = resolve_uri(self.cfg)
        self._client = MlflowClient(tracking_uri=self.uri)
        run_tags = {k: _truncate(str(v), MAX_TAG_VAL_LENGTH) for k, v in (tags or {}).items()}
        if parent_run_id:
            run_tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
        name = run_name or self.cfg.run_name or None
        self._pending.append(lambda: self._create_run(name, run_tags))

        flat = flatten(params)
        items = [
            Param(_truncate(str(k), MAX_ENTITY_KEY_LENGTH), _truncate(_param_str(v), MAX_PARAM_VAL_LENGTH))
            for k, v in flat.items()
        ]
        for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
            chunk = items[i : i + MAX_PARAMS_TAGS_PER_BATCH]
            self._pending.append(lambda c=chunk: self._client.log_batch(self._run_id, params=c))
        self._flush(force=True)
        return self._run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Metric
        from mlflow.utils.validation import MAX_METRICS_PER_BATCH

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, int(step)) for k, v in metrics.items()]
        for i in range(0, len(items), MAX_METRICS_PER_BATCH):
            chunk = items[i : i + MAX_METRICS_PER_BATCH]
            self._pending.append(lambda c=chunk: self._client.log_batch(self._run_id, metrics=c))
        self._flush()

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """A file, or a directory (logged under artifact_path, default its own name)."""
        if not self.enabled:
            return
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"artifact not found: {p}")
        if p.is_dir():
            dest = f"{artifact_path}/{p.name}" if artifact_path else p.name
            self._pending.append(lambda: self._client.log_artifacts(self._run_id, str(p), dest))
        else:
            self._pending.append(lambda: self._client.log_artifact(self._run_id, str(p), artifact_path))
        self._flush()

    def log_dict(self, data: dict[str, Any], artifact_file: str) -> None:
        if self.enabled:
            self._pending.append(lambda: self._client.log_dict(self._run_id, data, artifact_file))
            self._flush()

    def log_text(self, text: str, artifact_file: str) -> None:
        if self.enabled:
            self._pending.append(lambda: self._client.log_text(self._run_id, text, artifact_file))
            self._flush()

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.enabled:
            for k, v in tags.items():
                self._pending.append(lambda k=k, v=v: self._client.set_tag(self._run_id, k, str(v)))
            self._flush()

    def flush(self) -> bool:
        """Try to send everything queued now (ignoring the retry interval). True when empty."""
        return not self.enabled or self._flush(force=True)

    def finish(self, status: str = "FINISHED") -> None:
        """Mark the run terminated; whatever still cannot be sent is reported, then dropped."""
        if not self.enabled or self._client is None:
            return
        self._pending.append(lambda: self._client.set_terminated(self._run_id, status))
        if not self._flush(force=True):
            warnings.warn(
                f"MLflow at {self.uri} still unreachable at finish: {len(self._pending)} logging "
                "operation(s) were not recorded",
                TrackingWarning,
                stacklevel=2,
            )
        self._pending.clear()
        self._client = None

    # ---------------------------------------------------------------------------------- internals

    def _create_run(self, name: str | None, tags: dict[str, str]) -> None:
        exp = self._client.get_experiment_by_name(self.cfg.experiment)
        if exp is None:
            location = None
            if self.uri.startswith(_SQLITE):  # beside the db, not ./mlruns in whatever cwd we have
                db = Path(self.uri[len(_SQLITE) :]).resolve()
                location = (db.parent / "mlartifacts").as_uri()
            exp_id = self._client.create_experiment(self.cfg.experiment, artifact_location=location)
        else:
            exp_id = exp.experiment_id
        self._run_id = self._client.create_run(exp_id, run_name=name, tags=tags).info.run_id

    def _flush(self, force: bool = False) -> bool:
        """Send queued operations in order; on failure keep the rest queued. True when empty."""
        if not self._pending:
            return True
        now = time.monotonic()
        if self._down and not force and now - self._last_attempt < self.retry_interval_s:
            return False
        self._last_attempt = now
        from mlflow.exceptions import MlflowException

        try:
            while self._pending:
                try:
                    self._pending[0]()
                except MlflowException as e:
                    if not 400 <= e.get_http_status_code() < 500:
                        raise
                    # Rejected as invalid (not an outage): retrying would block the queue forever.
                    warnings.warn(f"MLflow rejected a logging call: {e}", TrackingWarning, stacklevel=3)
                self._pending.popleft()
        except Exception as e:  # any transport/server error: tracking must never stop training
            if not self._down:
                self._down = True
                warnings.warn(
                    f"MLflow at {self.uri} unreachable ({type(e).__name__}: {str(e)[:200]}); "
                    "training continues, logging is buffered and retried",
                    TrackingWarning,
                    stacklevel=3,
                )
            return False
        if self._down:
            self._down = False
            log.info("MLflow at %s reachable again; buffered logging sent", self.uri)
        return True
