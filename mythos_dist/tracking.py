"""MLflow experiment tracking: the ONE place with MLflow side effects, active on rank 0 only
(plus, when tracking.system_metrics is on, one system-metrics sampler per node).

Every logging call only appends to a bounded buffer of pending operations (create or continue the
run, params, metrics, datasets, artifacts, the model, terminate); one background thread sends them
in order. So a tracking server that is down, slow, or hangs (accepts the connection and never
answers) never stalls training: a call costs the time to append, `start` waits at most
tracking.timeout_s for the run to exist, and `finish` at most as long for the backlog. While the
server is away a single warning is issued and the sender retries every `retry_interval_s`; when the
buffer is full the oldest metric batches are dropped and counted (the count is reported at finish).
Metrics keep their original step and timestamp, so after the server returns the history is
complete. Re-sent batches are harmless: MLflow ignores exact duplicate metric entries.

One MLflow run per training job: the run id is stored with each checkpoint, and a resumed job
continues that run (`start(resume_run_id=...)`). Before a checkpoint is written the buffer is flushed
(bounded), and a continued run does not send metric entries up to the last step it already holds
for that key, so a step trained again after a crash appears once.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mythos_dist.config import Config, ConfigError, TrackingConfig, flatten

log = logging.getLogger(__name__)

# MLflow's own HTTP retries back off for minutes by default; the sender retries from the buffer instead.
_HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}
_SQLITE = "sqlite:///"
MODEL_NAME = "export"  # the logged model of a training run: `runs:/<run id>/export`
# MLflow's experiment kind tag: the UI opens such an experiment in its model-training view.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
_DOWNLOADS = "mythos-mlflow-models"  # under the temp dir: exports fetched by `mythos eval`


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


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_commit() -> str:
    """HEAD of the source tree, with '-dirty' when it has uncommitted changes; 'unknown' outside git."""
    sha = _git("rev-parse", "HEAD")
    if not sha:
        return "unknown"
    return sha + ("-dirty" if _git("status", "--porcelain") else "")


def source_tags() -> dict[str, str]:
    """MLflow's own source tags (the UI's Source column and run page): git commit, branch and
    whether the tree had uncommitted changes, plus the command line that started the process."""
    from mlflow.utils import mlflow_tags as t

    argv = list(sys.argv) if sys.argv and sys.argv[0] else ["python"]
    if Path(argv[0]).name in ("cli.py", "mythos"):  # `python -m mythos_dist.cli` is `mythos`
        argv[0] = "mythos"
    command = shlex.join([Path(argv[0]).name, *argv[1:]])
    config = _config_file()
    name = " ".join([Path(argv[0]).name, *argv[1:2], *(["--config", config] if config else [])])
    tags = {t.MLFLOW_SOURCE_TYPE: "LOCAL", t.MLFLOW_SOURCE_NAME: name, "command": command}
    sha = _git("rev-parse", "HEAD")
    if sha:
        tags[t.MLFLOW_GIT_COMMIT] = sha
        tags[t.MLFLOW_GIT_DIRTY] = str(bool(_git("status", "--porcelain"))).lower()
        tags[t.MLFLOW_GIT_BRANCH] = _git("rev-parse", "--abbrev-ref", "HEAD") or ""
    return tags


def _config_file() -> str | None:
    """The --config argument of this process's command line (the recipe), if any."""
    argv = sys.argv
    for i, a in enumerate(argv):
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--config="):
            return a.split("=", 1)[1]
    return None


def training_tags(cfg: Config, run_info: dict[str, Any]) -> dict[str, str]:
    """Tags of a training run: source, hosts, world size and a description of what the run is."""
    from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE

    t, recipe = cfg.train, _config_file() or "(no config file)"
    note = (
        f"Training run: recipe {recipe}, seed {t.seed}, {t.steps} steps ({t.loops.describe()}, lr {t.lr}), "
        f"{run_info['world_size']} ranks (ZeRO-{cfg.parallel.zero_stage}, EP={cfg.parallel.ep_size}) on "
        f"{run_info['hosts']}; data {cfg.data.remote}; checkpoints {cfg.checkpoint.dir}."
    )
    tags = source_tags() | {"kind": "train", "recipe": recipe, "hosts": str(run_info["hosts"])}
    return tags | {"world_size": str(run_info["world_size"]), "seed": str(t.seed), MLFLOW_RUN_NOTE: note}


def eval_tags(name: str, checkpoint: str | None) -> dict[str, str]:
    """Tags of an evaluation run: source, and a description naming what was evaluated."""
    from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE

    note = f"Loop-sweep evaluation ({name}) of {checkpoint or 'a freshly initialised model'}."
    return source_tags() | {"kind": "eval", MLFLOW_RUN_NOTE: note}


def run_page(tracking_uri: str, run_id: str, experiment_id: str | None = None) -> str | None:
    """The run's page in the MLflow UI of an http(s) tracking server, in the model-training view
    (MLflow 3.17's UI picks its view from a global switch, not from the experiment's kind tag)."""
    if not tracking_uri.startswith(("http://", "https://")):
        return None
    if experiment_id is None:
        from mlflow.tracking import MlflowClient

        try:
            experiment_id = MlflowClient(tracking_uri=tracking_uri).get_run(run_id).info.experiment_id
        except Exception:  # only a link to print: never fail for it
            return None
    return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


# ------------------------------------------------------------------------------------ datasets


@dataclass(frozen=True)
class DatasetRecord:
    """One MLflow dataset input: the same shards (or generator spec) give the same name and digest."""

    name: str
    digest: str  # 32 hex digits (MLflow keeps at most 36)
    source_type: str  # "local": shard files; "code": generated on the fly from the task spec
    source: str
    profile: dict[str, Any]


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:32]


def dataset_record(cfg: Config, split: str, from_shards: bool, n_samples: int | None = None) -> DatasetRecord:
    """`split` of the digit-chain task. From shards: the digest covers the manifest's task spec and
    that split's index and shard hashes, the source is the split's shard directory. Otherwise (the
    samples generated from the spec, as evaluation does): the digest covers the spec, the split and
    the held-out set (eval.heldout: val or test)."""
    from data_pipeline.digit_chain import task_spec
    from data_pipeline.shards import read_manifest, shard_root

    spec = task_spec(cfg.data.task)
    profile: dict[str, Any] = {"task": spec}
    if n_samples is not None:
        profile["n_samples"] = n_samples
    if from_shards:
        root = shard_root(cfg.data.remote)
        manifest = read_manifest(root)
        entry = manifest["splits"][split]
        profile |= {
            "samples": entry["count"],
            "lengths": entry["lengths"],
            "manifest": str(root / "manifest.json"),
        }
        return DatasetRecord(
            f"digit-chain/{split}",
            _digest({"task": manifest["task"], "split": split, "shards": entry}),
            "local",
            str(root / split),
            profile,
        )
    heldout = cfg.eval.heldout  # which held-out set of the split evaluation drew
    profile["heldout"] = heldout
    source = f"data_pipeline.digit_chain.generate(task, {split!r}, heldout={heldout!r})"
    return DatasetRecord(
        f"digit-chain/{split}/{heldout}", _digest({"task": spec, "split": split, "heldout": heldout}), "code",
        source, profile,
    )  # fmt: skip


# ------------------------------------------------------------------------------------ the tracker


@dataclass
class _Op:
    send: Callable[[], None]
    metrics: int = 0  # metric values it carries; only such operations are dropped when the buffer is full


class Tracker:
    def __init__(self, cfg: TrackingConfig, enabled_on_this_rank: bool, retry_interval_s: float = 30.0):
        self.cfg = cfg
        self.enabled = cfg.enabled and enabled_on_this_rank
        self.retry_interval_s = retry_interval_s
        self.uri = ""  # resolved in start(): the env may change between construction and start
        self.dropped_metrics = 0  # metric values dropped because the buffer was full
        self._ops: deque[_Op] = deque()
        self._cv = threading.Condition()
        self._sending = False  # _ops[0] is being sent (never dropped meanwhile)
        self._closed = False
        self._closing = threading.Event()  # set by finish: ends the sender's wait between retries
        self._settled = threading.Event()  # the run exists, or the server failed: start() stops waiting
        self._thread: threading.Thread | None = None
        self._client: Any = None
        self._run_id: str | None = None
        self._experiment_id: str | None = None
        self._down = False
        self._logged_through: dict[str, int] = {}  # continued run: last step per metric key on the server
        self._model_id: str | None = None  # metrics of this run are linked to this logged model

    @property
    def run_id(self) -> str | None:
        """None until the run exists on the server (or when tracking is off on this rank)."""
        return self._run_id

    @property
    def pending(self) -> int:
        """Operations not yet sent (buffered while the server is unreachable)."""
        with self._cv:
            return len(self._ops)

    # ----------------------------------------------------------------------------------- public API

    def start(
        self,
        run_name: str,
        params: dict[str, Any],
        parent_run_id: str | None = None,
        tags: dict[str, str] | None = None,
        resume_run_id: str | None = None,
    ) -> str | None:
        """Create the run (nested under parent_run_id when given), or continue `resume_run_id` when it
        exists on the server, and log flattened params. Waits at most tracking.timeout_s for the run."""
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
        self._client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        run_tags = {k: _truncate(str(v), MAX_TAG_VAL_LENGTH) for k, v in (tags or {}).items()}
        if parent_run_id:
            run_tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
        name = run_name or self.cfg.run_name or None
        existing: dict[str, str] = {}  # a continued run's params
        self._enqueue(_Op(lambda: self._open_run(name, run_tags, resume_run_id, existing)))

        flat = {
            _truncate(str(k), MAX_ENTITY_KEY_LENGTH): _truncate(_param_str(v), MAX_PARAM_VAL_LENGTH)
            for k, v in flatten(params).items()
        }

        def send_params() -> None:
            # A continued run keeps the params it has (MLflow refuses to change one); new keys are added.
            items = [Param(k, v) for k, v in flat.items() if k not in existing]
            for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
                self._client.log_batch(self._run_id, params=items[i : i + MAX_PARAMS_TAGS_PER_BATCH])
            changed = sorted(k for k, v in flat.items() if k in existing and existing[k] != v)
            if changed:
                self._client.set_tag(self._run_id, "resumed_with_changed_params", ",".join(changed))

        self._enqueue(_Op(send_params))
        self._thread = threading.Thread(target=self._sender, name="mlflow-sender", daemon=True)
        self._thread.start()
        self._settled.wait(self.cfg.timeout_s)
        return self._run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        from mlflow.utils.validation import MAX_METRICS_PER_BATCH

        ts = int(time.time() * 1000)
        items = [(k, float(v)) for k, v in metrics.items()]
        for i in range(0, len(items), MAX_METRICS_PER_BATCH):
            chunk = items[i : i + MAX_METRICS_PER_BATCH]
            self._enqueue(_Op(lambda c=chunk: self._send_metrics(c, ts, int(step)), metrics=len(chunk)))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """A file, or a directory (logged under artifact_path, default its own name)."""
        if not self.enabled:
            return
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"artifact not found: {p}")
        if p.is_dir():
            dest = f"{artifact_path}/{p.name}" if artifact_path else p.name
            self._enqueue(_Op(lambda: self._client.log_artifacts(self._run_id, str(p), dest)))
        else:
            self._enqueue(_Op(lambda: self._client.log_artifact(self._run_id, str(p), artifact_path)))

    def log_dict(self, data: dict[str, Any], artifact_file: str) -> None:
        if self.enabled:
            self._enqueue(_Op(lambda: self._client.log_dict(self._run_id, data, artifact_file)))

    def log_text(self, text: str, artifact_file: str) -> None:
        if self.enabled:
            self._enqueue(_Op(lambda: self._client.log_text(self._run_id, text, artifact_file)))

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.enabled:
            for k, v in tags.items():
                self._enqueue(_Op(lambda k=k, v=v: self._client.set_tag(self._run_id, k, str(v))))

    def log_datasets(self, records: Sequence[DatasetRecord], context: str) -> None:
        """Record datasets as the run's inputs (context: "training" or "evaluation")."""
        if not self.enabled:
            return
        from mlflow.entities import Dataset, DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        inputs = [
            DatasetInput(
                Dataset(
                    r.name,
                    r.digest,
                    r.source_type,
                    json.dumps({"uri": r.source}),
                    None,
                    json.dumps(r.profile),
                ),
                [InputTag(MLFLOW_DATASET_CONTEXT, context)],
            )
            for r in records
        ]
        self._enqueue(_Op(lambda: self._client.log_inputs(self._run_id, datasets=inputs)))

    def log_data(
        self,
        cfg: Config,
        splits: Sequence[str],
        from_shards: bool,
        context: str,
        n_samples: int | None = None,
    ) -> None:
        """`log_datasets` of these splits (see `dataset_record`); a shard manifest that cannot be read
        is warned about, never fatal: tracking must not stop training."""
        if not self.enabled:
            return
        try:
            records = [dataset_record(cfg, s, from_shards, n_samples) for s in splits]
        except Exception as e:
            warnings.warn(f"datasets not recorded in MLflow: {e}", TrackingWarning, stacklevel=2)
            return
        self.log_datasets(records, context)

    def log_model(self, export_dir: str | Path, step: int) -> None:
        """The export (safetensors + JSON) as this run's MLflow model `export`, an output of the run at
        `step`; registered as a new version of tracking.registered_model when that is set."""
        if not self.enabled:
            return
        from mlflow.entities import LoggedModelOutput, LoggedModelStatus

        from mythos_dist.export import EXPORT_FORMAT, exported_steps

        d = Path(export_dir)
        steps = ",".join(map(str, exported_steps(d)))

        def send() -> None:
            model = self._client.create_logged_model(
                self._experiment_id,
                name=MODEL_NAME,
                source_run_id=self._run_id,
                params={"weights_of_steps": steps},
                tags={"format": EXPORT_FORMAT},
                model_type=EXPORT_FORMAT,
            )
            self._client.log_model_artifacts(model.model_id, str(d))
            self._client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
            self._client.log_outputs(self._run_id, [LoggedModelOutput(model.model_id, step)])
            self._model_id = model.model_id
            if self.cfg.registered_model:
                version = _register(self._client, model.model_id, self._run_id, self.cfg.registered_model)
                self._client.set_tag(
                    self._run_id, "registered_model", f"models:/{self.cfg.registered_model}/{version}"
                )

        self._enqueue(_Op(send))

    def link_model(self, checkpoint: str | None, parent_run_id: str | None) -> None:
        """Link this run's later metrics to the logged model that `checkpoint` is: a models:/ or runs:/
        URI, or a local export of the training run `parent_run_id` (its newest logged model)."""
        if not self.enabled or not checkpoint:
            return

        def send() -> None:
            self._model_id = _model_id_of(self._client, checkpoint, parent_run_id)

        self._enqueue(_Op(send))

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until everything queued is sent (at most timeout_s, default tracking.timeout_s)."""
        if not self.enabled or self._thread is None:
            return True
        deadline = time.monotonic() + (self.cfg.timeout_s if timeout_s is None else timeout_s)
        with self._cv:
            while self._ops and time.monotonic() < deadline:
                self._cv.wait(max(0.0, deadline - time.monotonic()))
            return not self._ops

    def checkpoint_run_id(self) -> str | None:
        """The run id to store with a checkpoint, once the metrics logged so far are on the server:
        a job killed after this checkpoint resumes here and never logs these steps again. Waits at
        most tracking.timeout_s, and not at all while the server is known to be away."""
        if self.enabled and not self._down:
            self.flush()
        return self._run_id

    def finish(self, status: str = "FINISHED") -> None:
        """Mark the run terminated; waits at most tracking.timeout_s for the backlog, then reports what
        could not be sent (and what the full buffer dropped) and leaves it."""
        if not self.enabled or self._client is None:
            return
        self._enqueue(_Op(lambda: self._client.set_terminated(self._run_id, status)))
        sent = self.flush()
        with self._cv:
            self._closed = True  # the sender stops after its current call
            left = len(self._ops)
            self._ops.clear()
            self._cv.notify_all()
        self._closing.set()
        if not sent or self.dropped_metrics:
            warnings.warn(
                f"MLflow at {self.uri}: {left} logging operation(s) not sent by finish "
                f"(tracking.timeout_s={self.cfg.timeout_s}) and {self.dropped_metrics} metric value(s) "
                f"dropped from the full buffer (tracking.buffer={self.cfg.buffer}) were not recorded",
                TrackingWarning,
                stacklevel=2,
            )
        self._client = None

    # ---------------------------------------------------------------------------------- internals

    def _enqueue(self, op: _Op) -> None:
        with self._cv:
            if self._closed:
                return
            if len(self._ops) >= self.cfg.buffer:
                first = 1 if self._sending else 0  # the batch being sent stays
                victim = next((o for o in list(self._ops)[first:] if o.metrics), None)
                if victim is None and op.metrics:  # nothing older to drop: drop this batch
                    self.dropped_metrics += op.metrics
                    return
                if victim is not None:
                    self._ops.remove(victim)
                    self.dropped_metrics += victim.metrics
            self._ops.append(op)
            self._cv.notify_all()

    def _sender(self) -> None:
        from mlflow.exceptions import MlflowException

        while True:
            with self._cv:
                while not self._ops and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return
                op = self._ops[0]
                self._sending = True
            try:
                op.send()
            except MlflowException as e:
                code = e.get_http_status_code()
                if 400 <= code < 500:  # rejected as invalid (not an outage): retrying would block forever
                    self._settled.set()
                    warnings.warn(f"MLflow rejected a logging call: {e}", TrackingWarning, stacklevel=2)
                else:
                    self._outage(e)
                    continue
            except Exception as e:  # any transport/server error: tracking must never stop training
                self._outage(e)
                continue
            with self._cv:
                self._sending = False
                if self._ops and self._ops[0] is op:
                    self._ops.popleft()
                self._cv.notify_all()
            if self._down:
                self._down = False
                log.info("MLflow at %s reachable again; buffered logging sent", self.uri)

    def _outage(self, e: Exception) -> None:
        self._settled.set()  # a server that refuses or fails: start() need not wait longer
        if self._closed:  # finish() already reported what was left
            return
        if not self._down:
            self._down = True
            warnings.warn(
                f"MLflow at {self.uri} unreachable ({type(e).__name__}: {str(e)[:200]}); "
                "training continues, logging is buffered and retried",
                TrackingWarning,
                stacklevel=2,
            )
        with self._cv:
            self._sending = False
        self._closing.wait(self.retry_interval_s)

    def _experiment(self) -> str:
        exp = self._client.get_experiment_by_name(self.cfg.experiment)
        if exp is not None:
            if exp.tags.get(EXPERIMENT_KIND[0]) is None:
                self._client.set_experiment_tag(exp.experiment_id, *EXPERIMENT_KIND)
            return exp.experiment_id
        location = None
        if self.uri.startswith(_SQLITE):  # beside the db, not ./mlruns in whatever cwd we have
            db = Path(self.uri[len(_SQLITE) :]).resolve()
            location = (db.parent / "mlartifacts").as_uri()
        tags = dict([EXPERIMENT_KIND])
        return self._client.create_experiment(self.cfg.experiment, artifact_location=location, tags=tags)

    def _open_run(
        self,
        name: str | None,
        tags: dict[str, str],
        resume_run_id: str | None,
        existing: dict[str, str],
    ) -> None:
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

        run = None
        if resume_run_id:
            try:
                run = self._client.get_run(resume_run_id)
            except MlflowException as e:
                if e.error_code != ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
                    raise
                warnings.warn(
                    f"the checkpoint's MLflow run {resume_run_id} is not on {self.uri}; starting a new run",
                    TrackingWarning,
                    stacklevel=2,
                )
        if run is not None:
            self._client.update_run(run.info.run_id, status="RUNNING")
            self._logged_through = {m.key: m.step for m in run.data._metric_objs}
            existing.update(run.data.params)
            self._experiment_id = run.info.experiment_id
            self._run_id = run.info.run_id
        else:
            self._experiment_id = self._experiment()
            self._run_id = self._client.create_run(self._experiment_id, run_name=name, tags=tags).info.run_id
        self._settled.set()

    def _send_metrics(self, items: list[tuple[str, float]], ts: int, step: int) -> None:
        from mlflow.entities import Metric

        metrics = [
            Metric(k, v, ts, step, model_id=self._model_id)
            for k, v in items
            if step > self._logged_through.get(k, -1)  # a continued run already has it
        ]
        if metrics:
            self._client.log_batch(self._run_id, metrics=metrics)


def _register(client: Any, model_id: str, run_id: str, name: str) -> str:
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

    try:
        client.create_registered_model(name)
    except MlflowException as e:
        if e.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
    return client.create_model_version(name, f"models:/{model_id}", run_id=run_id, model_id=model_id).version


def _model_id_of(client: Any, checkpoint: str, parent_run_id: str | None) -> str | None:
    if checkpoint.startswith("models:/"):
        name, _, version = checkpoint[len("models:/") :].strip("/").partition("/")
        if not version.isdigit():
            raise ConfigError(f"{checkpoint}: expected models:/NAME/VERSION")
        mv = client.get_model_version(name, version)
        # The server may not echo model_id; the version's source is models:/<model id>.
        return mv.model_id or mv.source.rstrip("/").rsplit("/", 1)[-1]
    run_id = parent_run_id
    if checkpoint.startswith("runs:/"):
        run_id = checkpoint[len("runs:/") :].split("/")[0]
    elif not (Path(checkpoint) / "config.json").is_file():
        return None  # a DeepSpeed checkpoint: not a logged model
    if not run_id:
        return None
    run = client.get_run(run_id)
    models = client.search_logged_models(
        [run.info.experiment_id],
        filter_string=f"source_run_id = '{run_id}' AND name = '{MODEL_NAME}'",
        order_by=[{"field_name": "creation_timestamp", "ascending": False}],
        max_results=1,
    )
    return models[0].model_id if models else None


def register_model(cfg: TrackingConfig, run_id: str, name: str) -> str:
    """Register the newest export logged by training run `run_id` as a new version of `name`;
    returns 'models:/NAME/VERSION'. Synchronous: it is a command of its own, not training."""
    from mlflow.tracking import MlflowClient

    uri = resolve_uri(cfg)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    model_id = _model_id_of(client, f"runs:/{run_id}", None)
    if model_id is None:
        raise ConfigError(
            f"MLflow run {run_id} has no logged model {MODEL_NAME!r} (an export of a training run)"
        )
    version = _register(client, model_id, run_id, name)
    client.set_tag(run_id, "registered_model", f"models:/{name}/{version}")
    return f"models:/{name}/{version}"


# ------------------------------------------------------------------------ models:/ and runs:/ exports


def is_model_uri(checkpoint: str | Path | None) -> bool:
    return isinstance(checkpoint, str) and checkpoint.startswith(("models:/", "runs:/"))


def export_dir_of(checkpoint: str) -> Path:
    """Where `fetch_export` puts the export of a models:/ or runs:/ URI: one place per URI and
    process (ranks download their own copy), removed when the process exits."""
    key = hashlib.sha256(checkpoint.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / _DOWNLOADS / f"{key}-{os.getpid()}"


def fetch_export(checkpoint: str, cfg: TrackingConfig, shard: tuple[int, int] | None = None) -> Path:
    """Download the export (one file or shards) a models:/NAME/VERSION or runs:/RUN_ID URI names
    (a training run: its newest logged export) into
    `export_dir_of(checkpoint)` and return it. Only safetensors and JSON files are accepted (nothing
    downloaded is ever unpickled); `export.load_exported` reads them.

    shard (ep_size, ep_rank): of a sharded export, only config.json, the index and the files
    holding that rank's tensors (the dense part and its own experts, `export.rank_of_tensor`) are
    downloaded; read it with `export.ExportReader(dir, shard)`. A single file is downloaded whole."""
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from mythos_dist.export import INDEX_FILE

    for k, v in _HTTP_DEFAULTS.items():
        os.environ.setdefault(k, v)
    dest = export_dir_of(checkpoint)
    fresh = dest.with_name(f"{dest.name}.tmp")
    shutil.rmtree(fresh, ignore_errors=True)
    fresh.mkdir(parents=True)
    tracking_uri = resolve_uri(cfg)
    try:
        # Resolved here to the model's artifact location: MLflow's own models:/ resolution in
        # download_artifacts looks in the default store, not the tracking_uri it is given.
        client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        model_id = _model_id_of(client, checkpoint, None)
        if model_id is None:
            raise ConfigError(f"{checkpoint}: the run has no logged model {MODEL_NAME!r}")
        location = client.get_logged_model(model_id).artifact_location

        def download(path: str | None = None) -> None:
            mlflow.artifacts.download_artifacts(
                artifact_uri=location if path is None else f"{location.rstrip('/')}/{path}",
                dst_path=str(fresh),
                tracking_uri=tracking_uri,
            )

        listed = None
        if shard is not None:
            # paths come back relative to the location's parent: the file names are their last part
            found = mlflow.artifacts.list_artifacts(artifact_uri=location, tracking_uri=tracking_uri)
            listed = {Path(f.path).name: f for f in found}
        if listed is None or INDEX_FILE not in listed or "config.json" not in listed:
            download()  # everything: a single-file export, or not one we know how to select from
        else:
            _fetch_shards_of(checkpoint, fresh, listed, download, shard)
    except MlflowException as e:
        shutil.rmtree(fresh, ignore_errors=True)
        raise ConfigError(f"cannot fetch {checkpoint} from MLflow at {tracking_uri}: {e.message}") from e
    except ConfigError:
        shutil.rmtree(fresh, ignore_errors=True)
        raise

    try:
        got = _downloaded_export(checkpoint, fresh)
    except ConfigError:
        shutil.rmtree(fresh, ignore_errors=True)
        raise
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(got, dest)
    shutil.rmtree(fresh, ignore_errors=True)
    atexit.register(shutil.rmtree, dest, ignore_errors=True)
    return dest


def _downloaded_export(checkpoint: str, fresh: Path) -> Path:
    """The export directory inside a download, once it holds one export of JSON and safetensors
    files only (nothing else is ever opened); ConfigError otherwise."""
    from mythos_dist.export import INDEX_FILE, SINGLE_FILE

    found = list(fresh.rglob("config.json"))
    weights = found and any((found[0].parent / f).is_file() for f in (SINGLE_FILE, INDEX_FILE))
    if len(found) != 1 or not weights:
        raise ConfigError(
            f"{checkpoint} is not a mythos export (needs config.json and {SINGLE_FILE} or {INDEX_FILE})"
        )
    unsafe = [p.name for p in found[0].parent.iterdir() if p.suffix not in (".json", ".safetensors")]
    if unsafe or any(p.is_dir() for p in found[0].parent.iterdir()):
        raise ConfigError(
            f"{checkpoint}: refusing an export with files other than JSON and safetensors: {unsafe}"
        )
    return found[0].parent


def _fetch_shards_of(
    checkpoint: str,
    into: Path,
    listed: dict[str, Any],
    download: Callable[[str], None],
    shard: tuple[int, int],
) -> None:
    """config.json, the index, and the files the index names for the tensors of rank shard[1] of
    shard[0]; every file must be one the model lists (an index cannot point outside it)."""
    from mythos_dist.export import INDEX_FILE, rank_of_tensor
    from mythos_dist.safe_io import read_json

    others = [p for p in listed if p not in ("config.json", INDEX_FILE)]
    unsafe = [p for p in others if not p.endswith(".safetensors") or listed[p].is_dir]
    if unsafe:
        raise ConfigError(
            f"{checkpoint}: refusing an export with files other than JSON and safetensors: {unsafe}"
        )
    download("config.json")
    download(INDEX_FILE)
    model = read_json(into / "config.json", ConfigError).get("model")
    n_experts = model.get("n_experts") if isinstance(model, dict) else None
    if not isinstance(n_experts, int) or n_experts < 1 or n_experts % shard[0]:
        raise ConfigError(
            f"{checkpoint}: config.json's n_experts={n_experts!r} does not split over ep_size={shard[0]}"
        )
    weight_map = read_json(into / INDEX_FILE, ConfigError).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ConfigError(f"{checkpoint}: {INDEX_FILE} has no weight_map")
    needed = sorted(
        {f for name, f in weight_map.items() if rank_of_tensor(name, n_experts, shard[0]) in (None, shard[1])}
    )
    missing = [f for f in needed if f not in others]
    if missing:
        raise ConfigError(f"{checkpoint}: {INDEX_FILE} names {missing}, which the model does not hold")
    for f in needed:
        download(f)
    size = sum(listed[f].file_size or 0 for f in needed)
    total = sum(listed[f].file_size or 0 for f in others)
    print(
        f"fetched {len(needed)} of {len(others)} shards of {checkpoint} ({size / 2**20:,.1f} of "
        f"{total / 2**20:,.1f} MiB): those of expert-parallel rank {shard[1]} of {shard[0]}",
        flush=True,
    )


def eval_run_name(checkpoint: str | None, version_dir: Path) -> str:
    """'eval export@6 (eval-1)', 'eval models:/m/2@3+6 (eval-2)' (the mean of steps 3 and 6),
    'eval runs:/9a26b4fb@6 (eval-3)', 'eval step_00000250@250 (eval-4)'."""
    from mythos_dist import checkpoint as ckpt
    from mythos_dist.export import exported_steps
    from mythos_dist.safe_io import CheckpointError

    if not checkpoint:
        return f"eval init ({version_dir.name})"
    local = export_dir_of(checkpoint) if is_model_uri(checkpoint) else Path(checkpoint)
    label = checkpoint if is_model_uri(checkpoint) else local.name
    if checkpoint.startswith("runs:/"):  # the run id shortened as the UI does; the param has it whole
        label = "runs:/" + checkpoint[len("runs:/") :][:8]
    try:
        if (local / "config.json").is_file():
            steps = "+".join(map(str, exported_steps(local)))
        else:
            tag = local if (local / ckpt.META).is_file() else ckpt.latest_dir(local)
            steps = str(ckpt.read_meta(tag)["step"]) if tag else "?"
    except (OSError, ValueError, KeyError, CheckpointError):
        steps = "?"
    return f"eval {label}@{steps} ({version_dir.name})"


# ---------------------------------------------------------------------------- system metrics per node


class NodeMetrics:
    """MLflow's system-metrics sampler (CPU, memory, disk, network; GPU where present) for this node,
    logging into the training run as system/<node>/... at tracking.system_metrics_interval_s. Its
    thread talks to the server; construction and shutdown are bounded so a hanging server never
    holds up training."""

    def __init__(self, cfg: TrackingConfig, run_id: str, node: str):
        self.cfg, self.run_id, self.node = cfg, run_id, node
        self._monitor: Any = None
        self._starting = threading.Thread(target=self._start, name="mlflow-system-metrics", daemon=True)
        self._starting.start()

    def _start(self) -> None:
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            monitor = SystemMetricsMonitor(
                self.run_id,
                sampling_interval=self.cfg.system_metrics_interval_s,
                resume_logging=True,  # a continued run: the node's series goes on
                node_id=self.node,
                tracking_uri=resolve_uri(self.cfg),
            )
            monitor.start()
            self._monitor = monitor
        except Exception as e:
            log.warning("system metrics for node %s not started: %s", self.node, e)

    def finish(self) -> None:
        """Stop sampling after one last sample, so even a job shorter than the interval has a point."""
        self._starting.join(self.cfg.timeout_s)
        monitor = self._monitor
        if monitor is None:
            return

        def last_sample() -> None:
            monitor.finish()
            monitor.collect_metrics()
            monitor.publish_metrics(monitor.aggregate_metrics())
            monitor.mlflow_logger.flush()

        t = threading.Thread(target=last_sample, name="mlflow-system-metrics-stop", daemon=True)
        t.start()
        t.join(self.cfg.timeout_s)


def start_node_metrics(cfg: TrackingConfig, tracker: Tracker) -> NodeMetrics | None:
    """Collective when a process group is up: rank 0's run id goes to every rank, and the first local
    rank of each node starts its node's sampler. None when off, or when the run does not exist."""
    if not (cfg.enabled and cfg.system_metrics):
        return None
    import torch.distributed as dist

    holder = [tracker.run_id]
    if dist.is_available() and dist.is_initialized():
        dist.broadcast_object_list(holder, src=0)
    if holder[0] is None or int(os.environ.get("LOCAL_RANK", "0")) != 0:
        return None
    for k, v in _HTTP_DEFAULTS.items():
        os.environ.setdefault(k, v)
    return NodeMetrics(cfg, holder[0], socket.gethostname())
