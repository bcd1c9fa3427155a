"""`mythos experiment`: the digit-chain loop-scaling experiment, end to end, on this machine.

shards (`mythos data build`) → training on N local processes (`mythos train` under torchrun:
DeepSpeed ZeRO + expert parallelism as the config says) → loop-sweep evaluation of the exported
model on every eval split (the test set unless eval.heldout says val), logged as an MLflow run
nested under the training run → the accuracy table, plots and where to look. Given several
configs (recipes), it runs them one after the other and ends with their accuracy tables side by
side and one comparison figure. On a cluster run the same three subcommands with the launchers in
launch/; nothing here is specific to one machine.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from mythos_dist.config import ConfigError, load_config


@dataclass(frozen=True)
class TrainRecord:
    """What a finished `mythos train` hands the next stage: rank 0 writes it next to the
    checkpoints, last, so its presence means training finished; evaluation reads the export path
    and the run id (to nest its MLflow run) from it."""

    FILE: ClassVar[str] = "train_summary.json"
    run_id: str | None
    export: str | None  # None when stopped before train.steps
    checkpoint: str | None
    start_step: int
    end_step: int
    final_loss: float | None
    final_acc: float | None
    wall_s: float

    @classmethod
    def of(cls, result: Any) -> TrainRecord:
        """From a `train.TrainResult`."""
        return cls(**{f.name: getattr(result, f.name) for f in dataclasses.fields(cls)})

    def write(self, ckpt_dir: str | Path) -> Path:
        path = Path(ckpt_dir) / self.FILE
        tmp = path.with_name(f".{self.FILE}.tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(self), indent=2))
        tmp.replace(path)  # readers see no record or a whole one
        return path

    @classmethod
    def read(cls, ckpt_dir: str | Path) -> TrainRecord:
        from mythos_dist.safe_io import CheckpointError, read_json

        path = Path(ckpt_dir) / cls.FILE
        saved = read_json(path)
        names = {f.name for f in dataclasses.fields(cls)}
        if set(saved) != names:
            raise CheckpointError(
                f"{path}: fields {sorted(saved)}, expected {sorted(names)}; the file is corrupt"
            )
        return cls(**saved)


def _check_writable(path: Path, what: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    probe = path / f".write-test-{os.getpid()}"
    try:
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"{what} {path} is not writable: {e}") from e


def run_experiment(configs: list[str], overrides: list[str], nproc: int, out_dir: str | None = None) -> int:
    """Each config (recipe) end to end, in order; with several, then their tables side by side and
    the comparison figure in `out_dir`. --set overrides apply to every config."""
    if not configs:
        raise ConfigError("experiment needs at least one --config")
    cfgs = [load_config(c, overrides) for c in configs]
    for config, cfg in zip(configs, cfgs):  # every config error before any process, file or shard
        try:
            cfg.validate(world_size=nproc)
        except ConfigError as e:
            raise ConfigError(f"{config}: {e}") from None
    dirs = {
        "checkpoint.dir": [Path(c.checkpoint.dir) for c in cfgs],
        "eval.out_dir": [Path(c.eval.out_dir) for c in cfgs],
    }
    for what, paths in dirs.items():
        if len({p.absolute() for p in paths}) < len(paths):
            raise ConfigError(f"{what}: the recipes share {sorted(set(map(str, paths)))}; each needs its own")
        for path in paths:
            _check_writable(path, what)
    compare_dir = Path(out_dir or "runs/experiment")
    if len(configs) > 1:
        _check_writable(compare_dir, "--out")
    t0 = time.perf_counter()
    results = []
    for i, (config, cfg) in enumerate(zip(configs, cfgs)):
        if len(configs) > 1:
            print(f"\n=== recipe {i + 1} of {len(configs)}: {config} ===", flush=True)
        res = _run_one(config, cfg, overrides, nproc)
        if res is None:
            return 1
        results.append(res)
    if len(configs) > 1:
        _compare(configs, results, compare_dir, time.perf_counter() - t0)
    return 0


def _compare(configs: list[str], results: list[Any], out_dir: Path, wall_s: float) -> None:
    """The recipes' accuracy tables side by side (stdout, CSV) and one figure of accuracy vs loops
    per split with every recipe in it."""
    from mythos_dist.plots import accuracy_vs_loops_recipes

    names = [Path(c).stem for c in configs]
    summaries = [r.summary for r in results]
    heldout = {s.get("heldout", "test") for s in summaries}
    print(
        f"\n=== the recipes side by side: accuracy on the {'/'.join(sorted(heldout))} set, split × loops ==="
    )
    print(side_by_side(names, summaries))
    lines = ["recipe,split,loops,accuracy"]
    for name, s in zip(names, summaries):
        for split, d in s["splits"].items():
            lines += [f"{name},{split},{n},{a:.6f}" for n, a in zip(s["loops"], d["acc"])]
    csv = out_dir / "comparison.csv"
    csv.write_text("\n".join(lines) + "\n")
    png = accuracy_vs_loops_recipes(dict(zip(names, summaries)), out_dir / "comparison.png")
    print(f"comparison: {png}  (table: {csv}); all recipes {wall_s:.0f} s")


def side_by_side(names: list[str], summaries: list[dict[str, Any]]) -> str:
    """One row per loop count (the union), per recipe a column group of its splits' accuracies (%);
    with eval.auto also the accuracy at each sample's own loop count and the mean loops it used."""
    loops = sorted({n for s in summaries for n in s["loops"]})
    splits = [list(s["splits"]) for s in summaries]
    widths = [max(len(name), 8 * len(sp) - 2) for name, sp in zip(names, splits)]
    head1 = f"{'':>6}" + "".join(f" | {name:<{w}}" for name, w in zip(names, widths))
    head2 = f"{'loops':>6}" + "".join(
        f" | {''.join(f'{x:>6}  ' for x in sp)[:-2]:<{w}}" for sp, w in zip(splits, widths)
    )
    rows = [head1, head2]
    for n in loops:
        cells = []
        for s, sp, w in zip(summaries, splits, widths):
            k = s["loops"].index(n) if n in s["loops"] else None
            vals = [f"{100 * s['splits'][x]['acc'][k]:6.1f}" if k is not None else f"{'–':>6}" for x in sp]
            cells.append(f" | {'  '.join(vals):<{w}}")
        rows.append(f"{n:>6}" + "".join(cells))
    for label, key, fmt in (
        ("auto", "acc", lambda v: f"{100 * v:6.1f}"),
        ("used", "loops_mean", lambda v: f"{v:6.1f}"),
    ):
        if not any(s.get("auto") for s in summaries):
            break
        cells = []
        for s, sp, w in zip(summaries, splits, widths):
            vals = [fmt(s["splits"][x]["auto"][key]) if s.get("auto") else f"{'–':>6}" for x in sp]
            cells.append(f" | {'  '.join(vals):<{w}}")
        rows.append(f"{label:>6}" + "".join(cells))  # the count each sample picked, and its mean
    return "\n".join(rows)


def _run_one(config: str, cfg: Any, overrides: list[str], nproc: int) -> Any:
    """shards → training → evaluation of one config; prints its report, returns the EvalResult
    (None when training failed)."""
    from data_pipeline import shards
    from mythos_dist.evaluate import run_eval, stability_over_training
    from mythos_dist.export import exported_steps
    from mythos_dist.loading import load_model

    ckpt_dir = Path(cfg.checkpoint.dir)
    t0 = time.perf_counter()

    print(f"[1/3] shards: {cfg.data.remote}", flush=True)
    built = shards.build(cfg.data)
    print(f"      {'built' if built.rebuilt else 'reusing verified'} {built.n_shards} shards {built.counts}")

    print(
        f"[2/3] training on {nproc} local processes (ZeRO-{cfg.parallel.zero_stage}, EP={cfg.parallel.ep_size})"
    )
    summary_path = ckpt_dir / TrainRecord.FILE
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
        return None
    trained_run = TrainRecord.read(ckpt_dir)
    train_s = time.perf_counter() - t0

    steps = exported_steps(trained_run.export)
    weights = f"the mean of the weights at steps {steps}" if len(steps) > 1 else f"step {steps[0]}"
    print(f"[3/3] loop-sweep evaluation of {trained_run.export} ({weights})", flush=True)
    # Stability over training: every retained checkpoint, after the trained and the longest loop count.
    loop_counts = sorted({cfg.train.loops.n_loops, max(cfg.eval.loops)})
    over_training = stability_over_training(cfg, ckpt_dir, loop_counts)
    model = load_model(trained_run.export, cfg)
    res = run_eval(
        model,
        cfg,
        checkpoint=trained_run.export,
        parent_run_id=trained_run.run_id,
        over_training=over_training,
    )
    assert res is not None  # single process: rank 0

    _print_run(cfg, trained_run, res, over_training, time.perf_counter() - t0, train_s)
    return res


def _print_run(
    cfg: Any, trained_run: TrainRecord, res: Any, over_training: list[dict], job_s: float, train_s: float
) -> None:
    """One recipe's report: its accuracy table, training, loop stability, files and MLflow runs."""
    from mythos_dist.report import format_table
    from mythos_dist.tracking import resolve_uri, run_page

    print(
        f"\naccuracy on the {cfg.eval.heldout} set (split × loops), trained with {cfg.train.loops.describe()}:"
    )
    print(format_table(res.summary))
    start, end = trained_run.start_step, trained_run.end_step
    if end > start:
        done = f"steps {start + 1}-{end}" if start else f"{end} steps"
        trained = f"{done}, {trained_run.wall_s:.0f} s, final batch acc {trained_run.final_acc:.3f}"
    else:  # launched again after the run had finished: re-export and evaluate only
        trained = f"nothing left to train (resumed at step {end})"
    print(f"\ntraining: {trained}; whole job {job_s:.0f} s (train+data {train_s:.0f} s)")
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
    if not cfg.tracking.enabled:
        print("MLflow: off (tracking.enabled=false): nothing was logged")
        return
    uri = resolve_uri(cfg.tracking)
    print(f"MLflow: {uri}  training run {trained_run.run_id}, eval run {res.run_id}")
    if uri.startswith("sqlite:"):
        print(f"  open the UI:  .venv/bin/mlflow ui --backend-store-uri {uri}  (then http://127.0.0.1:5000)")
    elif res.run_id and (page := run_page(uri, trained_run.run_id)):
        print(f"  training run page: {page}")
