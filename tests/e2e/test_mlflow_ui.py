"""MLflow the way its users see it: a real `mlflow server` on 127.0.0.1, a tiny training job on the
real shard loader (`mythos train`, system metrics on, the export sharded and registered), `mythos register`,
`mythos eval` of the registered model (models:/) and of the run (runs:/); then what the REST API
records (source tags, description, datasets, the logged model with the eval metrics linked, the
registry) and what a person sees on the run page in headless Chromium (Debian's `chromium`)."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from data_pipeline.shards import build
from mythos_dist.config import load_config
from mythos_dist.export import INDEX_FILE, rank_of_tensor
from tests.mlflow_servers import Server
from tests.multiproc import REPO, TINY_MODEL, worker_env

pytestmark = pytest.mark.distributed

MODEL = "tiny-rdt"
EXPERIMENT = "ui-check"


def _sets(tmp: Path, url: str) -> list[str]:
    return [
        *TINY_MODEL,
        "parallel.ep_size=1",
        "train.steps=8",
        "checkpoint.every=4",
        "checkpoint.max_shard_size=8KB",  # a sharded export (expert-only shards too): what models:/ and runs:/ fetch
        f"checkpoint.dir={tmp / 'ckpt'}",
        f"data.remote={tmp / 'shards'}",
        "data.task.n_train=256",
        "data.task.n_eval=32",
        "data.samples_per_shard=64",
        "data.build_workers=1",
        "data.num_workers=0",
        "eval.n_samples=32",
        "eval.loops=[1,2,4]",
        f"eval.out_dir={tmp / 'eval'}",
        "tracking.enabled=true",
        f"tracking.uri={url}",
        f"tracking.experiment={EXPERIMENT}",
        f"tracking.registered_model={MODEL}",
        "tracking.system_metrics=true",
        "tracking.system_metrics_interval_s=0.5",
    ]


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("ui")
    (tmp / "mlflow").mkdir()
    server = Server(tmp / "mlflow")
    server.start()
    try:
        sets = _sets(tmp, server.url)
        cfg = load_config(None, sets)
        build(cfg.data)
        env = worker_env(tmp)
        env.pop("MLFLOW_TRACKING_URI", None)
        args = ["--config", "configs/digit_chain.yaml", *(a for s in sets for a in ("--set", s))]

        def mythos(*cmd: str) -> str:
            proc = subprocess.run(
                [sys.executable, "-m", "mythos_dist.cli", *cmd[:1], *args, *cmd[1:]],
                cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
            )  # fmt: skip
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
            return proc.stdout

        mythos("train")
        run_id = json.loads((tmp / "ckpt" / "train_summary.json").read_text())["run_id"]
        registered = mythos("register", "--run-id", run_id, "--name", MODEL)
        eval_models = mythos("eval", "--checkpoint", f"models:/{MODEL}/1", "--parent-run-id", run_id)
        eval_runs = mythos("eval", "--checkpoint", f"runs:/{run_id}", "--parent-run-id", run_id)
        yield {
            "server": server, "tmp": tmp, "cfg": cfg, "run_id": run_id, "registered": registered,
            "eval_outputs": [eval_models, eval_runs],
        }  # fmt: skip
    finally:
        server.stop()


def _tags(run: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def _children(job) -> list[dict]:
    server = job["server"]
    exp = server.get("experiments/get-by-name", experiment_name=EXPERIMENT)["experiment"]
    flt = f"tags.mlflow.parentRunId = '{job['run_id']}'"
    runs = server.post("runs/search", {"experiment_ids": [exp["experiment_id"]], "filter": flt})["runs"]
    return sorted(runs, key=lambda r: r["info"]["run_name"])


def test_source_tags_description_and_experiment_kind(job):
    server = job["server"]
    run = server.get("runs/get", run_id=job["run_id"])["run"]
    tags = _tags(run)
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    assert tags["mlflow.source.git.commit"] == head
    assert tags["mlflow.source.git.branch"]
    assert tags["mlflow.source.git.dirty"] in ("true", "false")
    assert tags["mlflow.source.name"] == "mythos train --config configs/digit_chain.yaml"
    assert tags["command"].startswith("mythos train --config configs/digit_chain.yaml --set ")
    assert tags["hosts"] == socket.gethostname() and tags["world_size"] == "1"
    note = tags["mlflow.note.content"]
    assert "recipe configs/digit_chain.yaml" in note and "seed 0" in note and "8 steps" in note
    exp = server.get("experiments/get", experiment_id=run["info"]["experiment_id"])["experiment"]
    assert {t["key"]: t["value"] for t in exp["tags"]}["mlflow.experimentKind"] == "custom_model_development"
    # eval runs say what they evaluated, and at which step
    names = [r["info"]["run_name"] for r in _children(job)]
    assert names == [f"eval models:/{MODEL}/1@8 (eval-1)", f"eval runs:/{job['run_id'][:8]}@8 (eval-2)"]


def test_datasets_are_the_shards(job):
    """The training run's input is the train shards (digest of the manifest's spec and the split's
    shard hashes, source the split's directory); the same shards built elsewhere give the same
    dataset, other shards another one."""
    from mythos_dist.tracking import dataset_record

    server, cfg, tmp = job["server"], job["cfg"], job["tmp"]
    run = server.get("runs/get", run_id=job["run_id"])["run"]
    (inp,) = run["inputs"]["dataset_inputs"]
    ds = inp["dataset"]
    assert ds["name"] == "digit-chain/train" and json.loads(ds["source"])["uri"] == str(
        tmp / "shards" / "train"
    )
    assert {t["key"]: t["value"] for t in inp["tags"]}["mlflow.data.context"] == "training"
    assert json.loads(ds["profile"])["samples"] == 256

    again = load_config(None, [*_sets(tmp, server.url), f"data.remote={tmp / 'shards_again'}"])
    build(again.data)
    assert dataset_record(again, "train", from_shards=True).digest == ds["digest"]
    other = load_config(
        None, [*_sets(tmp, server.url), f"data.remote={tmp / 'shards_other'}", "data.task.seed=7"]
    )
    build(other.data)
    assert dataset_record(other, "train", from_shards=True).digest != ds["digest"]
    assert dataset_record(cfg, "train", from_shards=True).digest == ds["digest"]
    for child in _children(job):  # the eval splits, as evaluation inputs
        names = {d["dataset"]["name"] for d in child["inputs"]["dataset_inputs"]}
        assert names == {
            "digit-chain/id/test",
            "digit-chain/ood1/test",
            "digit-chain/ood2/test",
        }  # eval.heldout


def test_export_is_the_runs_model_registered_with_eval_metrics_linked(job):
    server, run_id, tmp = job["server"], job["run_id"], job["tmp"]
    run = server.get("runs/get", run_id=run_id)["run"]
    (out,) = run["outputs"]["model_outputs"]
    assert int(out["step"]) == 8
    model = server.get(f"logged-models/{out['model_id']}")["model"]
    assert model["info"]["name"] == "export" and model["info"]["source_run_id"] == run_id
    assert model["info"]["status"] == "LOGGED_MODEL_READY"
    import mlflow.artifacts

    listed = mlflow.artifacts.list_artifacts(
        artifact_uri=model["info"]["artifact_uri"], tracking_uri=server.url
    )
    names = sorted(Path(f.path).name for f in listed)
    assert names == sorted(p.name for p in (tmp / "ckpt" / "export").iterdir())
    assert "model.safetensors.index.json" in names and sum(n.endswith(".safetensors") for n in names) > 1
    # both versions (the config switch at export, `mythos register` after) are this model
    versions = server.get("registered-models/get-latest-versions", name=MODEL)["model_versions"]
    assert versions and all(v["source"] == f"models:/{out['model_id']}" for v in versions)
    assert f"registered models:/{MODEL}/2" in job["registered"]
    # the eval metrics are linked to the model: the model page lists them
    linked = {(m["key"], m["run_id"]) for m in model["data"].get("metrics", [])}
    for child in _children(job):
        assert ("eval/id/acc_at_1", child["info"]["run_id"]) in linked
    # what was downloaded and evaluated is the export, bit for bit: same accuracies as the local export
    from mythos_dist.evaluate import run_eval
    from mythos_dist.loading import load_model

    cfg = load_config(None, [*_sets(tmp, server.url), "tracking.enabled=false"])
    local = run_eval(load_model(str(tmp / "ckpt" / "export"), cfg), cfg, out_dir=tmp / "eval_local")
    for k in (1, 2):
        remote = json.loads((tmp / "eval" / f"eval-{k}" / "summary.json").read_text())
        assert {s: d["acc"] for s, d in remote["splits"].items()} == {
            s: d["acc"] for s, d in local.summary["splits"].items()
        }


def test_a_model_with_other_files_than_safetensors_and_json_is_refused(job, tmp_path):
    """Nothing downloaded is unpickled: a registered model carrying a pickle is refused outright."""
    from mlflow.entities import LoggedModelStatus
    from mlflow.tracking import MlflowClient

    from mythos_dist.tracking import fetch_export

    server = job["server"]
    client = MlflowClient(tracking_uri=server.url, registry_uri=server.url)
    bad = tmp_path / "bad"
    shutil.copytree(job["tmp"] / "ckpt" / "export", bad)
    (bad / "weights.pkl").write_bytes(b"\x80\x04N.")
    exp = client.get_experiment_by_name(EXPERIMENT).experiment_id
    model = client.create_logged_model(exp, name="export")
    client.log_model_artifacts(model.model_id, str(bad))
    client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    client.create_registered_model("pickled")
    client.create_model_version("pickled", f"models:/{model.model_id}", model_id=model.model_id)
    with pytest.raises(ValueError, match=r"other than JSON and safetensors.*weights\.pkl"):
        fetch_export("models:/pickled/1", job["cfg"].tracking)


def test_system_metrics_per_node(job):
    run = job["server"].get("runs/get", run_id=job["run_id"])["run"]
    node = socket.gethostname()
    keys = {m["key"] for m in run["data"]["metrics"]}
    assert f"system/{node}/cpu_utilization_percentage" in keys
    assert f"system/{node}/system_memory_usage_megabytes" in keys


# ------------------------------------------------------------------------------ the browser


def _chromium(url: str, *flags: str, size: str = "1600,2000") -> str:
    """Headless Debian chromium with a fresh profile; returns the DOM once the page has rendered."""
    exe = shutil.which("chromium")
    assert exe, "Debian's chromium is needed (.ci/run installs it: apt-get install -y chromium)"
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={profile}", "--virtual-time-budget=20000", f"--window-size={size}",
               *flags, url]  # fmt: skip
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=180, env=os.environ | {"HOME": profile}
        )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def _text(dom: str) -> str:
    body = re.sub(r"<script.*?</script>|<style.*?</style>", " ", dom, flags=re.S)
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", body)))


def test_run_page_in_a_real_browser(job, tmp_path):
    """What a person looks for on the training run's page: the metric names (training, MoE, loop and
    the node's system metrics), the description, source, the eval child runs, the dataset and the
    model in the registry; on the eval run's page the plot artifacts."""
    from mythos_dist.tracking import run_page

    server, run_id = job["server"], job["run_id"]
    page = run_page(server.url, run_id)
    text = _text(_chromium(page, "--dump-dom"))
    node = socket.gethostname()
    for expected in ("loss", "tokens_per_s", "moe0/load_cv", "loop/delta_last", f"system/{node}/cpu_utilization_percentage",
                     "Training run: recipe configs/digit_chain.yaml", "digit-chain/train", "Logged models", "export",
                     MODEL, f"eval models:/{MODEL}/1@8 (eval-1)", "Model training"):  # fmt: skip
        assert expected in text, f"{expected!r} not on the run page {page}:\n{text[:3000]}"
    eval_id = _children(job)[0]["info"]["run_id"]
    plots = _text(_chromium(run_page(server.url, eval_id).replace("?", "/artifacts/plots?"), "--dump-dom"))
    for png in ("accuracy_vs_loops.png", "accuracy_heatmap.png", "convergence.png", "stability.png"):
        assert png in plots, f"{png} not among the eval run's artifacts:\n{plots[:3000]}"

    shot = tmp_path / "run_page.png"
    _chromium(page, f"--screenshot={shot}", size="1600,2900")
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 50_000
    if os.environ.get("MYTHOS_SCREENSHOT_DIR"):  # docs/: refresh the committed screenshot
        shutil.copy(shot, Path(os.environ["MYTHOS_SCREENSHOT_DIR"]) / "mlflow_run_page.png")


def test_registered_model_evaluated_expert_parallel(job):
    """`mythos eval --checkpoint models:/...` on 2 ranks at parallel.ep_size=2: each rank fetches the
    (sharded) export and reads only the dense part and its own experts; the accuracies equal the
    1-rank evaluation of the same model version."""
    tmp, server = job["tmp"], job["server"]
    sets = [*_sets(tmp, server.url), "parallel.ep_size=2"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "mythos_dist.cli", "eval", "--config", "configs/digit_chain.yaml",
           *(a for s in sets for a in ("--set", s)), "--checkpoint", f"models:/{MODEL}/1",
           "--out", str(tmp / "eval_ep2")]  # fmt: skip
    env = worker_env(tmp)
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    summary = tmp / "eval_ep2" / "eval-1" / "summary.json"
    assert summary.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    ep2 = json.loads(summary.read_text())
    one = json.loads((tmp / "eval" / "eval-1" / "summary.json").read_text())
    assert {s: d["acc"] for s, d in ep2["splits"].items()} == {s: d["acc"] for s, d in one["splits"].items()}
    # each rank downloaded the index and only the shards holding the dense part and its 2 experts
    weight_map = json.loads((tmp / "ckpt" / "export" / INDEX_FILE).read_text())["weight_map"]
    files = set(weight_map.values())
    lines = re.findall(
        r"fetched (\d+) of (\d+) shards .*: those of expert-parallel rank (\d) of 2", proc.stdout
    )
    assert sorted(r for _, _, r in lines) == ["0", "1"], proc.stdout[-3000:]
    for n, total, r in lines:
        need = {f for k, f in weight_map.items() if rank_of_tensor(k, 4, 2) in (None, int(r))}
        assert (int(n), int(total)) == (len(need), len(files))
        assert len(need) < len(files)  # the other rank's experts live in shards of their own here
