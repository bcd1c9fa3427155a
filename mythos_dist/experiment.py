"""`mythos experiment`: the digit-chain loop-scaling experiment, end to end, on this machine.

shards (`mythos data build`) → training on N local processes (`mythos train` under torchrun:
DeepSpeed ZeRO + expert parallelism as the config says) → loop-sweep evaluation of the exported
model on every eval split, logged as an MLflow run nested under the training run → the accuracy
table, plots and where to look. On a cluster run the same three subcommands with the launchers in
launch/; nothing here is specific to one machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from mythos_dist.config import ConfigError, load_config

SUMMARY_FILE = "train_summary.json"  # written by `mythos train` on rank 0 next to the checkpoints


def _check_writable(path: Path, what: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    probe = path / f".write-test-{os.getpid()}"
    try:
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"{what} {path} is not writable: {e}") from e


def run_experiment(config: str, overrides: list[str], nproc: int) -> int:
    from data_pipeline import shards
    from mythos_dist.evaluate import run_eval, stability_over_training
    from mythos_dist.export import exported_steps
    from mythos_dist.loading import load_model
    from mythos_dist.report import format_table
    from mythos_dist.safe_io import read_json
    from mythos_dist.tracking import resolve_uri, run_page

    cfg = load_config(config, overrides)
    cfg.validate(world_size=nproc)  # every config error before any process, file or shard
    ckpt_dir = Path(cfg.checkpoint.dir)
    for path, what in [(ckpt_dir, "checkpoint.dir"), (Path(cfg.eval.out_dir), "eval.out_dir")]:
        _check_writable(path, what)
    t0 = time.perf_counter()

    print(f"[1/3] shards: {cfg.data.remote}", flush=True)
    built = shards.build(cfg.data)
    print(f"      {'built' if built.rebuilt else 'reusing verified'} {built.n_shards} shards {built.counts}")

    print(
        f"[2/3] training on {nproc} local processes (ZeRO-{cfg.parallel.zero_stage}, EP={cfg.parallel.ep_size})"
    )
    summary_path = ckpt_dir / SUMMARY_FILE
    summary_path.unlink(missing_ok=True)
    set_args = [a for kv in overrides for a in ("--set", kv)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "mythos_dist.cli", "train", "--config", config, *set_args]  # fmt: skip
    # One rank's share of the cores, unless the caller chose (several jobs sharing a machine).
    env = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc)), **os.environ}
    rc = subprocess.run(cmd, env=env).returncode
    # A rank can rarely abort at exit after finishing: judge by the summary rank 0 writes last.
    if not summary_path.is_file():
        print(f"training failed (exit code {rc}); checkpoints so far are in {ckpt_dir}", file=sys.stderr)
        return rc or 1
    train_summary = read_json(summary_path)
    train_s = time.perf_counter() - t0

    steps = exported_steps(train_summary["export"])
    weights = f"the mean of the weights at steps {steps}" if len(steps) > 1 else f"step {steps[0]}"
    print(f"[3/3] loop-sweep evaluation of {train_summary['export']} ({weights})", flush=True)
    # Stability over training: every retained checkpoint, after the trained and the longest loop count.
    loop_counts = sorted({cfg.train.loops.n_loops, max(cfg.eval.loops)})
    over_training = stability_over_training(cfg, ckpt_dir, loop_counts)
    model = load_model(train_summary["export"], cfg)
    res = run_eval(
        model,
        cfg,
        checkpoint=train_summary["export"],
        parent_run_id=train_summary["run_id"],
        over_training=over_training,
    )
    assert res is not None  # single process: rank 0

    print(f"\naccuracy (split × loops), trained at {cfg.train.loops.kind} {cfg.train.loops.n_loops} loops:")
    print(format_table(res.summary))
    start, end = train_summary["start_step"], train_summary["end_step"]
    if end > start:
        done = f"steps {start + 1}-{end}" if start else f"{end} steps"
        trained = f"{done}, {train_summary['wall_s']:.0f} s, final batch acc {train_summary['final_acc']:.3f}"
    else:  # launched again after the run had finished: re-export and evaluate only
        trained = f"nothing left to train (resumed at step {end})"
    print(f"\ntraining: {trained}; whole job {time.perf_counter() - t0:.0f} s (train+data {train_s:.0f} s)")
    radii = "; ".join(
        f"step {r['step']}: ρ(A) {r['rho_A']:.3f}, "
        + ", ".join(f"J@{n} {v:.3f}" for n, v in r["jacobian_radius"].items())
        for r in over_training
    )
    print(f"loop stability over training (Jacobian radius of the loop map at h_n): {radii}")
    print(f"results and plots: {res.out_dir}")
    for f in res.files:
        if f.suffix == ".png":
            print(f"  {f}")
    uri = resolve_uri(cfg.tracking)
    print(f"MLflow: {uri}  training run {train_summary['run_id']}, eval run {res.run_id}")
    if uri.startswith("sqlite:"):
        print(f"  open the UI:  .venv/bin/mlflow ui --backend-store-uri {uri}  (then http://127.0.0.1:5000)")
    elif res.run_id and (page := run_page(uri, train_summary["run_id"])):
        print(f"  training run page: {page}")
    return 0
