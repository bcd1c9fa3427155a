"""Loop-sweep evaluation on N ranks: the driver (`run_eval`) and stability over training.

Flow (`run_eval`): validate input → rank 0 creates a versioned zarr v3 store (`<out>/eval-K/`,
mythos_dist.results_store) → each rank sweeps its own contiguous range of sample indices
(mythos_dist.sweep) and writes exactly its chunks → barrier → rank 0 reads the store back and
writes the summary table (mythos_dist.report), plots, a spectral report and the MLflow run.
Every rank's range starts on a multiple of the batch size, so the batches, and therefore the
predictions, are identical for any world size.
"""

from __future__ import annotations

import ctypes
import dataclasses
import itertools
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from mythos_dist import comm
from mythos_dist.config import Config, ConfigError, to_dict
from mythos_dist.loading import load_model
from mythos_dist.model.dispatch import AllToAllDispatcher
from mythos_dist.model.rdt import RDT
from mythos_dist.model.recurrent import LoopHalting
from mythos_dist.report import write_summary
from mythos_dist.results_store import (
    STORE_NAME,
    create_store,
    new_version_dir,
    rank_region,
    summarize,
    write_region,
)
from mythos_dist.sweep import chain_batches, check_splits, parse_loops, spectral_inputs, sweep
from mythos_dist.train_metrics import fmt_time

T = TypeVar("T")


def _freed_tensors_leave_memory() -> None:
    """glibc: serve every allocation of 1 MiB or more by mmap, so a freed activation goes back to
    the OS at once. Its default threshold rises to the largest block freed so far (up to 32 MiB):
    a model's load and sweep then leave freed activations in the heap, and the resident set of a
    rank holding a large model grows by them (docs/scale.md). A no-op elsewhere."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD; a fixed value also stops the dynamic rise


def join(cfg: Config) -> tuple[torch.device, int]:
    """(device, ep_size) to evaluate with. Under torchrun / deepspeed: join the process group (each
    rank gets a share of samples) and run expert-parallel at parallel.ep_size; alone: the whole
    model in this process."""
    _freed_tensors_leave_memory()
    if "RANK" not in os.environ:
        return torch.device("cpu"), 1
    device = comm.init_process_group(cfg.parallel.timeout_s)
    cfg.validate(dist.get_world_size())  # world size divisible by ep_size
    return device, cfg.parallel.ep_size


def stability_over_training(
    cfg: Config, checkpoint_dir: str | Path, loop_counts: Sequence[int]
) -> list[dict]:
    """ρ(A) and the Jacobian radius of the loop map at each retained checkpoint (step_* dirs of a
    training run), on the first eval batch, after each of `loop_counts` loops; sorted by step.

    -> [{"step": s, "rho_A": ..., "jacobian_radius": {n: radius}}, ...]. Each checkpoint is
    consolidated (any EP layout) into a temporary export and evaluated in this process.
    """
    from mythos_dist.checkpoint import read_meta, run_checkpoints
    from mythos_dist.stability import spectral_report

    tags = run_checkpoints(checkpoint_dir)
    if not tags:
        raise ValueError(f"{checkpoint_dir}: no complete step_* checkpoint")
    ids_BT, valid_BT = spectral_inputs(cfg, cfg.eval.splits[0])
    rows = []
    for tag in tags:
        model = load_model(tag, cfg)
        radii = {
            n: spectral_report(model, ids_BT, n, valid_BT, batch_size=cfg.eval.spectral_batch_size)
            for n in loop_counts
        }
        rows.append(
            {
                "step": int(read_meta(tag)["step"]),
                "rho_A": next(iter(radii.values()))["rho_A"],
                "jacobian_radius": {n: r["jacobian_radius"] for n, r in radii.items()},
            }
        )
    return rows


@dataclass
class EvalResult:
    out_dir: Path
    store: Path
    summary: dict[str, Any]
    spectral: dict[str, Any]
    files: list[Path]
    run_id: str | None


def run_eval(
    model: RDT,
    cfg: Config,
    loops: Sequence[Any] | str | None = None,
    splits: Sequence[str] | None = None,
    n_samples: int | None = None,
    out_dir: str | Path | None = None,
    checkpoint: str | None = None,
    parent_run_id: str | None = None,
    batch_size: int | None = None,
    over_training: list[dict] | None = None,
) -> EvalResult | None:
    """Evaluate `model` on every rank of the current process group (or alone); see module doc.

    Returns the result on rank 0 and None elsewhere. Arguments left None come from cfg.eval.
    over_training: `stability_over_training` rows, written, plotted and tracked with the results.

    Long on purpose: the collective steps (store, sweep with lockstep fillers, spectral, report)
    must be read in the order every rank runs them.
    """
    from mythos_dist.stability import spectral_report

    loops = parse_loops(cfg.eval.loops if loops is None else loops)
    splits = check_splits(cfg, cfg.eval.splits if splits is None else splits)
    n = cfg.eval.n_samples if n_samples is None else n_samples
    bs = cfg.eval.batch_size if batch_size is None else batch_size
    if not isinstance(n, int) or not 1 <= n <= cfg.data.task.n_eval:
        raise ConfigError(
            f"n_samples must be an integer in [1, data.task.n_eval={cfg.data.task.n_eval}], got {n!r}"
        )
    if not isinstance(bs, int) or bs < 1:
        raise ConfigError(f"batch_size must be an integer ≥ 1, got {bs!r}")
    cfg = dataclasses.replace(cfg, model=model.cfg)  # the checkpoint's own, in the store and the run
    rank, world = comm.rank(), comm.world_size()

    # Rank 0 picks the version directory and creates the store; the others learn its name.
    version_dir = _on_rank0(lambda: _new_store(cfg, out_dir, splits, loops, n, world, bs, checkpoint))
    store = version_dir / STORE_NAME

    start, stop, _ = rank_region(n, world, rank, bs)
    # Under expert parallelism every forward is collective: each rank runs as many batches as the
    # busiest one (known to all without communicating), the extra ones on a filler batch whose
    # results are dropped, so no rank leaves while another still needs its experts.
    expert_parallel = any(isinstance(m.dispatcher, AllToAllDispatcher) for m in model.moe_layers())
    regions = [rank_region(n, world, r, bs) for r in range(world)]
    lockstep = max(math.ceil((b - a) / bs) for a, b, _ in regions) if expert_parallel else 0
    halting = _halting(cfg, expert_parallel and world > 1)
    cap = cfg.eval.auto_max_loops
    for split in splits:
        if start < stop:
            progress = (
                _Progress(f"eval {split}" + (f" (rank 0 of {world})" if world > 1 else ""), stop - start)
                if rank == 0
                else None
            )
            res = sweep(model, chain_batches(cfg, split, start, stop, bs), loops, halting, cap, progress)
            write_region(store, split, start, res)
        fillers = lockstep - math.ceil((stop - start) / bs)
        if fillers > 0:
            filler = next(chain_batches(cfg, split, 0, min(bs, n), bs))
            sweep(model, itertools.repeat(filler, fillers), loops, halting, cap)
    spectral = None
    if expert_parallel or rank == 0:  # collective under expert parallelism: every rank joins
        ids_BT, valid_BT = spectral_inputs(cfg, splits[0], n)
        device = next(model.parameters()).device
        t0 = time.perf_counter()
        spectral = spectral_report(
            model, ids_BT.to(device), max(loops), valid_BT.to(device), across_ranks=expert_parallel,
            batch_size=cfg.eval.spectral_batch_size,
        )  # fmt: skip
        if rank == 0:
            print(f"spectral report: {len(ids_BT)} samples at {max(loops)} loops, {spectral['blocks']} "
                  f"block(s) per rank, {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)  # fmt: skip
    comm.barrier()
    # Rank 0 summarises, plots and tracks; every rank learns whether that worked, so none is left
    # waiting for a rank that failed (e.g. at `mythos eval`'s closing barrier) and all end with the error.
    return _on_rank0(
        lambda: _report(cfg, version_dir, store, spectral, checkpoint, parent_run_id, over_training),
        failure=f"while writing the results in {version_dir}",
    )


class _Progress:
    """Rank 0's progress line after each batch: samples done of its share, seconds per batch, ETA
    (under expert parallelism the ranks run in lockstep, so rank 0's pace is every rank's)."""

    def __init__(self, what: str, total: int):
        self.what, self.total, self.done, self.batches = what, total, 0, 0
        self.t0 = time.perf_counter()

    def __call__(self, n: int) -> None:
        self.done += n
        self.batches += 1
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / self.done * (self.total - self.done)
        print(f"{self.what}: {self.done}/{self.total} samples  {elapsed / self.batches:.2f} s/batch  "
              f"eta {fmt_time(eta)}", file=sys.stderr, flush=True)  # fmt: skip


def _on_rank0(work: Callable[[], T], failure: str | None = None) -> T | None:
    """Collective: rank 0 runs `work`. When it raises, every rank raises, so none waits at a later
    barrier for a rank that failed. failure None: every rank gets rank 0's result or its exception;
    else only rank 0 gets the result, and the others a RuntimeError naming `failure` and the cause."""
    result: Any = None
    error: Exception | None = None
    if comm.rank() == 0:
        try:
            result = work()
        except Exception as e:
            error = e
    if comm.world_size() > 1:
        cause = error if failure is None or error is None else f"{type(error).__name__}: {error}"
        shipped = [result if failure is None else None, cause]
        dist.broadcast_object_list(shipped, src=0)
        if comm.rank() != 0:
            result, cause = shipped
            error = (
                cause
                if failure is None
                else cause and RuntimeError(f"evaluation failed on rank 0 {failure}: {cause}")
            )
    if error is not None:
        raise error
    return result


def _new_store(cfg: Config, out_dir: str | Path | None, splits: Sequence[str], loops: Sequence[int], n: int,
               world: int, bs: int, checkpoint: str | None) -> Path:  # fmt: skip
    version_dir = new_version_dir(Path(out_dir or cfg.eval.out_dir))
    create_store(version_dir / STORE_NAME, cfg, splits, loops, n, world, bs, checkpoint)
    return version_dir


def _halting(cfg: Config, collective: bool) -> LoopHalting | None:
    """eval.auto's halting rule. collective (expert parallelism): a loop ends the forward only once
    every rank's samples have stopped, so every rank runs the same iterations (and all-to-alls)."""
    if not cfg.eval.auto:
        return None

    def all_done(local: bool) -> bool:
        running = torch.tensor([0 if local else 1], dtype=torch.int64)
        dist.all_reduce(running, op=dist.ReduceOp.MAX)
        return int(running) == 0

    e = cfg.eval
    rule = LoopHalting(e.auto_threshold, e.auto_min_loops)
    return dataclasses.replace(rule, all_done=all_done) if collective else rule


def _report(
    cfg: Config,
    version_dir: Path,
    store: Path,
    spectral: dict[str, Any],
    checkpoint: str | None,
    parent_run_id: str | None,
    over_training: list[dict] | None,
) -> EvalResult:
    """Rank 0, after every rank wrote its region: summary, spectral report file, plots, MLflow."""
    from mythos_dist.plots import write_plots

    summary = summarize(store)
    files = write_summary(summary, version_dir)
    (version_dir / "spectral.json").write_text(json.dumps(spectral, indent=2))
    files += [version_dir / "spectral.json", *write_plots(summary, spectral, version_dir)]
    if over_training:
        from mythos_dist.plots import stability_over_training as plot_over_training

        (version_dir / "stability_over_training.json").write_text(json.dumps(over_training, indent=1))
        files += [
            version_dir / "stability_over_training.json",
            plot_over_training(over_training, version_dir / "stability_over_training.png"),
        ]

    run_id = _track(
        cfg, version_dir, store, summary, spectral, files, checkpoint, parent_run_id, over_training
    )
    return EvalResult(version_dir, store, summary, spectral, files, run_id)


def acc_metric(split: str, n_loops: int) -> str:
    """MLflow name of a split's accuracy after n loops; MLflow refuses '@' in names."""
    return f"eval/{split}/acc_at_{n_loops}"


def _track(
    cfg: Config,
    version_dir: Path,
    store: Path,
    summary: dict[str, Any],
    spectral: dict[str, Any],
    files: list[Path],
    checkpoint: str | None,
    parent_run_id: str | None,
    over_training: list[dict] | None = None,
) -> str | None:
    if not cfg.tracking.enabled:  # MLflow's client is ~0.1 GiB of memory: not imported for nothing
        return None
    from mythos_dist import tracking
    from mythos_dist.export import exported_steps

    tracker = tracking.Tracker(cfg.tracking, enabled_on_this_rank=True)
    # The config as a training run logs it, plus what this evaluation actually ran (CLI overrides).
    run = {k: summary[k] for k in ("loops", "store", "heldout")} | {"splits": list(summary["splits"])}
    run["checkpoint"] = checkpoint or ""
    export = tracking.export_dir_of(checkpoint) if tracking.is_model_uri(checkpoint) else checkpoint
    if export and (Path(export) / "config.json").is_file():  # an export: whose weights
        run["weights_of_steps"] = ",".join(map(str, exported_steps(export)))
    params = to_dict(cfg) | {"eval_run": run}
    name = tracking.eval_run_name(checkpoint, version_dir)
    tracker.start(name, params, parent_run_id=parent_run_id, tags=tracking.eval_tags(name, checkpoint))
    n = next(iter(summary["splits"].values()))["n"]
    tracker.log_data(cfg, list(summary["splits"]), from_shards=False, context="evaluation", n_samples=n)
    tracker.link_model(checkpoint, parent_run_id)  # the metrics below belong to that model
    metrics = {"spectral/rho_A": spectral["rho_A"], "spectral/jacobian_radius": spectral["jacobian_radius"]}
    for split, d in summary["splits"].items():
        metrics |= {acc_metric(split, n): a for n, a in zip(summary["loops"], d["acc"])}
        if "auto" in d:  # the loop count each sample picked itself
            a = d["auto"]
            metrics |= {f"eval/{split}/acc_auto": a["acc"], f"eval/{split}/loops_auto_mean": a["loops_mean"],
                        f"eval/{split}/loops_auto_p90": a["loops_p90"]}  # fmt: skip
    tracker.log_metrics(metrics, step=0)
    for split, d in summary["splits"].items():  # the same numbers as curves over loop count
        for n, a in zip(summary["loops"], d["acc"]):
            tracker.log_metrics({f"eval/{split}/acc": a}, step=n)
    for row in over_training or []:  # curves over training steps
        radii = {f"stability/jacobian_radius_at_{n}": r for n, r in row["jacobian_radius"].items()}
        tracker.log_metrics({"stability/rho_A": row["rho_A"], **radii}, step=row["step"])
    for f in files:
        tracker.log_artifact(f, "summary" if f.suffix in (".csv", ".json") else "plots")
    tracker.log_artifact(store)
    tracker.finish()
    return tracker.run_id
