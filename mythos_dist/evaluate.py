"""Loop-sweep evaluation: accuracy per split × loop count in one forward per batch, on N ranks.

Flow (`run_eval`): validate input → rank 0 creates a versioned zarr v3 store (`<out>/eval-K/`) with
every array sized for all samples → barrier → each rank evaluates its own contiguous range of
sample indices and writes exactly the chunks of that range (no gather of predictions) → barrier →
rank 0 reads the store back and writes the summary table (stdout, CSV, JSON), plots, a spectral
report and the MLflow run.

Sample i of a split is the same on any number of ranks (`data_pipeline.digit_chain.generate` is a
pure function of the index), and every rank's range starts on a multiple of the batch size, so the
batches — and therefore the predictions — are identical for any world size.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from data_pipeline.batch import Batch, chains_batch
from mythos_dist.checkpoint import read_json
from mythos_dist.config import Config, ConfigError, load_config, to_dict
from mythos_dist.model.dispatch import AllToAllDispatcher
from mythos_dist.model.rdt import RDT
from mythos_dist.objective import answer_forward, answer_positions, valid_positions
from mythos_dist.tracking import git_commit, is_model_uri

STORE_NAME = "results.zarr"


# ------------------------------------------------------------------------------------ validation


def parse_loops(spec: str | Sequence[Any]) -> tuple[int, ...]:
    """'1,2,4' or a sequence -> sorted unique loop counts; each must be an integer ≥ 1."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = []
    for item in items:
        text = item.strip() if isinstance(item, str) else None
        if text is not None and text.isascii() and text.isdigit():
            item = int(text)
        if isinstance(item, bool) or not isinstance(item, int) or item < 1:
            raise ConfigError(f"loop counts must be integers ≥ 1, got {item!r}")
        out.append(item)
    if not out:
        raise ConfigError("need at least one loop count")
    return tuple(sorted(set(out)))


def check_splits(cfg: Config, splits: Sequence[str]) -> tuple[str, ...]:
    known = cfg.data.task.eval_splits
    unknown = [s for s in splits if s not in known]
    if unknown or not splits:
        raise ConfigError(f"eval splits: unknown {unknown or '(none given)'}; configured: {sorted(known)}")
    return tuple(dict.fromkeys(splits))


# ------------------------------------------------------------------------------------- batches


def chain_batches(cfg: Config, split: str, start: int, stop: int, batch_size: int) -> Iterator[Batch]:
    """Samples [start, stop) of `split` in the loader's batch format, batch starts on multiples of
    batch_size (relative to `start`); the width is the split's longest input, for every batch."""
    from data_pipeline.digit_chain import generate

    for lo in range(start, stop, batch_size):
        yield chains_batch(generate(cfg.data.task, split, lo, min(lo + batch_size, stop)))


# ------------------------------------------------------------------------------------ the sweep


@dataclass
class SweepResult:
    """Per-sample results, rows in batch order."""

    prediction_NL: np.ndarray  # argmax token at the EQ position, per loop count in `loops`
    correct_NL: np.ndarray  # bool
    length_N: np.ndarray
    answer_N: np.ndarray
    sample_id_N: np.ndarray
    delta_NM: np.ndarray  # ‖h_t − h_{t−1}‖ at the EQ position for t = 1..max(loops)


@torch.no_grad()
def sweep(model: RDT, batches: Iterable[Batch], loops: Sequence[int]) -> SweepResult:
    """All loop counts from ONE forward per batch (the recurrence runs max(loops) times and the coda
    is applied to the state after each requested count), predictions read at the EQ position."""
    loops = sorted(loops)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    parts: list[tuple[np.ndarray, ...]] = []
    try:
        for b in batches:
            b = {k: v.to(device) for k, v in b.items()}
            if not bool((b["loss_mask"].sum(1) == 1).all()):
                raise ValueError("each sample's loss_mask must mark exactly one (the EQ) position")
            pos_B = answer_positions(b["loss_mask"])
            rows_B = torch.arange(len(pos_B), device=device)
            out = answer_forward(model, b, loops[-1], loops_out=loops, track_deltas=True)
            pred_BL = torch.stack([out.loop_logits[n].argmax(-1) for n in loops], 1)
            delta_BM = torch.stack([d[rows_B, pos_B] for d in out.delta_norms], 1)
            answer_B = b["answer"]
            fields = (pred_BL, pred_BL == answer_B[:, None], b["length"], answer_B, b["sample_id"], delta_BM)
            parts.append(tuple(t.cpu().numpy() for t in fields))
    finally:
        model.train(was_training)
    if not parts:
        raise ValueError("sweep got no batches")
    cols = [np.concatenate(c) for c in zip(*parts)]
    return SweepResult(cols[0].astype(np.int16), cols[1], *cols[2:5], cols[5].astype(np.float32))


# ------------------------------------------------------------------------------------ the store


def rank_region(n: int, world: int, rank: int, batch_size: int) -> tuple[int, int, int]:
    """(start, stop, chunk rows): contiguous sample ranges, one zarr chunk per rank, each a whole
    number of batches so that batches (hence results) are the same for every world size."""
    chunk = max(batch_size, math.ceil(math.ceil(n / world) / batch_size) * batch_size)
    return min(rank * chunk, n), min((rank + 1) * chunk, n), chunk


def next_version_dir(out_dir: Path) -> Path:
    """out_dir/eval-K with K one above the highest existing: an old result is never overwritten."""
    taken = [int(p.name[5:]) for p in out_dir.glob("eval-*") if p.name[5:].isdigit()]
    return out_dir / f"eval-{max(taken, default=0) + 1}"


def create_store(
    path: Path,
    cfg: Config,
    splits: Sequence[str],
    loops: Sequence[int],
    n_samples: int,
    world: int,
    batch_size: int,
    checkpoint: str | None,
) -> None:
    """Rank 0: the group, its attributes and every array at full size (no data written yet)."""
    import zarr

    from data_pipeline.digit_chain import task_spec

    if path.exists():
        raise FileExistsError(f"eval store {path} already exists; refusing to overwrite it")
    root = zarr.open_group(str(path), mode="w-", zarr_format=3)
    root.attrs.update(
        {
            "checkpoint": checkpoint or "",
            "config": to_dict(cfg),
            "task_spec": task_spec(cfg.data.task),
            "git_commit": git_commit(),
            "loops": list(loops),
            "splits": list(splits),
            "n_samples": n_samples,
            "world_size": world,
            "batch_size": batch_size,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
    )
    L, M = len(loops), max(loops)
    _, _, chunk = rank_region(n_samples, world, 0, batch_size)
    for split in splits:
        g = root.create_group(split)
        g.attrs["length_range"] = list(cfg.data.task.eval_splits[split])
        for name, shape, dtype, fill in [
            ("prediction", (n_samples, L), "int16", -1),
            ("correct", (n_samples, L), "bool", False),
            ("length", (n_samples,), "int32", -1),
            ("answer", (n_samples,), "int16", -1),
            ("sample_id", (n_samples,), "int64", -1),
            ("delta_norm", (n_samples, M), "float32", float("nan")),
        ]:
            g.create_array(name, shape=shape, dtype=dtype, chunks=(chunk, *shape[1:]), fill_value=fill)


def write_region(path: Path, split: str, start: int, res: SweepResult) -> None:
    """Write rows [start, start + len) of every array of `split` (a whole chunk per rank)."""
    import zarr

    g = zarr.open_group(str(path), mode="r+")[split]
    stop = start + len(res.length_N)
    g["prediction"][start:stop] = res.prediction_NL
    g["correct"][start:stop] = res.correct_NL
    g["length"][start:stop] = res.length_N.astype(np.int32)
    g["answer"][start:stop] = res.answer_N.astype(np.int16)
    g["sample_id"][start:stop] = res.sample_id_N
    g["delta_norm"][start:stop] = res.delta_NM


# ------------------------------------------------------------------------------------ summaries


def summarize(path: Path) -> dict[str, Any]:
    """Accuracy per split × loop count, per chain length × loop count, and mean ‖Δh‖ per loop."""
    import zarr

    root = zarr.open_group(str(path), mode="r")
    loops = list(root.attrs["loops"])
    out: dict[str, Any] = {"loops": loops, "store": str(path), "splits": {}}
    for split in root.attrs["splits"]:
        g = root[split]
        correct_NL, length_N, delta_NM = g["correct"][:], g["length"][:], g["delta_norm"][:]
        if (length_N < 0).any():
            raise RuntimeError(f"{path}/{split}: {int((length_N < 0).sum())} sample rows were never written")
        by_len = {
            int(n): correct_NL[length_N == n].mean(0).tolist() for n in np.unique(length_N)
        }  # chain length -> accuracy per loop count
        out["splits"][split] = {
            "n": len(length_N),
            "acc": correct_NL.mean(0).tolist(),
            "acc_by_length": by_len,
            "delta_norm_mean": delta_NM.mean(0).tolist(),
        }
    return out


def format_table(summary: dict[str, Any]) -> str:
    loops = summary["loops"]
    head = f"{'split':<10}{'n':>7}" + "".join(f"{'@' + str(n):>8}" for n in loops)
    rows = [
        f"{s:<10}{d['n']:>7}" + "".join(f"{a:>8.3f}" for a in d["acc"]) for s, d in summary["splits"].items()
    ]
    return "\n".join([head, *rows])


def write_summary(summary: dict[str, Any], out_dir: Path) -> list[Path]:
    loops = summary["loops"]
    csv = out_dir / "accuracy.csv"
    lines = ["split,n," + ",".join(f"acc@{n}" for n in loops)]
    lines += [f"{s},{d['n']}," + ",".join(f"{a:.6f}" for a in d["acc"]) for s, d in summary["splits"].items()]
    csv.write_text("\n".join(lines) + "\n")
    by_len = out_dir / "accuracy_by_length.csv"
    lines = ["split,length," + ",".join(f"acc@{n}" for n in loops)]
    for s, d in summary["splits"].items():
        lines += [f"{s},{n}," + ",".join(f"{a:.6f}" for a in accs) for n, accs in d["acc_by_length"].items()]
    by_len.write_text("\n".join(lines) + "\n")
    js = out_dir / "summary.json"
    js.write_text(json.dumps(summary, indent=2))
    return [csv, by_len, js]


def aggregate_runs(eval_dirs: Sequence[str | Path]) -> dict[str, Any]:
    """Several evaluations of one recipe (e.g. seeds) -> mean, std, min and max accuracy per split ×
    loop count, plus each run's accuracies. Every run must have the same loop counts and splits."""
    if len(eval_dirs) < 1:
        raise ConfigError("report needs at least one eval directory")
    runs = []
    for d in eval_dirs:
        path = Path(d) / "summary.json"
        if not path.is_file():
            raise ConfigError(f"{path} not found: pass eval-K directories written by `mythos eval`")
        runs.append(read_json(path, ConfigError))
    loops, splits = runs[0]["loops"], list(runs[0]["splits"])
    for d, r in zip(eval_dirs, runs):
        if r["loops"] != loops or list(r["splits"]) != splits:
            raise ConfigError(
                f"{d}: loops {r['loops']} / splits {list(r['splits'])} differ from {eval_dirs[0]}: "
                f"{loops} / {splits}"
            )
    out: dict[str, Any] = {"loops": loops, "runs": [str(d) for d in eval_dirs], "splits": {}}
    for split in splits:
        acc_RL = np.array([r["splits"][split]["acc"] for r in runs])
        out["splits"][split] = {
            "n": [r["splits"][split]["n"] for r in runs],
            "acc": acc_RL.mean(0).tolist(),  # the mean: format_table and the plots read "acc"
            "std": acc_RL.std(0, ddof=1).tolist() if len(runs) > 1 else [0.0] * len(loops),
            "min": acc_RL.min(0).tolist(),
            "max": acc_RL.max(0).tolist(),
            "per_run": acc_RL.tolist(),
        }
    return out


def write_report(report: dict[str, Any], out_dir: Path) -> list[Path]:
    """CSV (mean ± std per split × loops), JSON and the mean-accuracy plot with every run drawn."""
    from mythos_dist.plots import accuracy_vs_loops_runs

    out_dir.mkdir(parents=True, exist_ok=True)
    loops = report["loops"]
    lines = ["split,stat," + ",".join(f"acc@{n}" for n in loops)]
    for split, d in report["splits"].items():
        lines += [
            f"{split},{label}," + ",".join(f"{a:.6f}" for a in d[key])
            for label, key in (("mean", "acc"), ("std", "std"), ("min", "min"))
        ]
    csv = out_dir / "accuracy_over_runs.csv"
    csv.write_text("\n".join(lines) + "\n")
    js = out_dir / "report.json"
    js.write_text(json.dumps(report, indent=1))
    return [csv, js, accuracy_vs_loops_runs(report, out_dir / "accuracy_vs_loops_runs.png")]


def main_report(eval_dirs: Sequence[str], out_dir: str) -> int:
    """`mythos report`: mean ± std over runs (seeds) of one recipe, as a table, CSV, JSON and plot."""
    report = aggregate_runs(eval_dirs)
    files = write_report(report, Path(out_dir))
    print(f"accuracy over {len(eval_dirs)} runs, mean (± std):")
    loops = report["loops"]
    print(f"{'split':<10}" + "".join(f"{'@' + str(n):>14}" for n in loops))
    for split, d in report["splits"].items():
        print(f"{split:<10}" + "".join(f"{m:>8.3f} ±{s:.3f}" for m, s in zip(d["acc"], d["std"])))
    for f in files:
        print(f"  {f}")
    return 0


# ------------------------------------------------------------------------------------ loading


def load_model(checkpoint: str | Path | None, cfg: Config, ep_size: int = 1) -> RDT:
    """The model to evaluate, in eval mode on CPU; `cfg.model` is replaced by the model's own config.

    checkpoint: an export directory (single file or shards + index), or a DeepSpeed checkpoint
    directory (a run's checkpoint dir with `latest`, or one step_* dir), read tensor by tensor, or
    an MLflow model (models:/NAME/VERSION, runs:/RUN_ID), downloaded first (safetensors + JSON
    only) and then read as a local export. None: a freshly initialised model from cfg.model and
    cfg.train.seed (the initial weights of training). ep_size > 1 (process group joined): this rank
    holds and reads only the dense part and its own experts, and the model runs expert-parallel.
    """
    from mythos_dist import checkpoint as ckpt
    from mythos_dist import tracking

    ep = ep_size
    if checkpoint is None:  # the weights training starts from (keyed by train.seed)
        if ep > 1:
            from mythos_dist.parallel import build_model

            return build_model(cfg, torch.device("cpu")).eval().requires_grad_(False)
        model = RDT(cfg.model)
        model.reset_parameters(cfg.train.seed)
        return model.eval().requires_grad_(False)
    path = (
        tracking.fetch_export(checkpoint, cfg.tracking)
        if tracking.is_model_uri(checkpoint)
        else Path(checkpoint)
    )
    if not path.exists():
        raise ConfigError(f"checkpoint {path} does not exist")
    try:
        source = ckpt.ExportReader(path) if (path / "config.json").is_file() else ckpt.CheckpointTensors(path)
        if ep == 1:
            model = ckpt.load_shard(source)
        else:
            from mythos_dist.parallel import expert_parallel_rank, parallelize

            model = parallelize(ckpt.load_shard(source, ep, expert_parallel_rank(ep)), ep)
    except ckpt.CheckpointError as e:
        raise ConfigError(str(e)) from e
    longest = cfg.data.task.max_length() + 1
    if model.cfg.max_seq_len < longest:
        raise ConfigError(
            f"{path}: model.max_seq_len={model.cfg.max_seq_len} < longest eval input ({longest})"
        )
    cfg.model = model.cfg
    return model.requires_grad_(False)  # evaluated, never trained: no weight gradients (the spectral tools)


def _refuse_missing(checkpoint: str | None) -> None:
    """A local checkpoint path that does not exist is bad input (an MLflow model is fetched later)."""
    if checkpoint is not None and not is_model_uri(checkpoint) and not Path(checkpoint).exists():
        raise ConfigError(f"checkpoint {checkpoint} does not exist")


def _join(cfg: Config) -> tuple[torch.device, int]:
    """(device, ep_size) to evaluate with. Under torchrun / deepspeed: join the process group (each
    rank gets a share of samples) and run expert-parallel at parallel.ep_size; alone: the whole
    model in this process."""
    if "RANK" not in os.environ:
        return torch.device("cpu"), 1
    from mythos_dist.parallel import init_distributed

    device = init_distributed(cfg.parallel.timeout_s).device
    cfg.validate(dist.get_world_size())  # world size divisible by ep_size
    return device, cfg.parallel.ep_size


def main_eval(
    config: str | None,
    overrides: list[str],
    checkpoint: str | None,
    loops: str | None,
    splits: str | None,
    n_samples: int | None,
    out_dir: str | None,
    parent_run_id: str | None,
) -> int:
    """`mythos eval`: validates every argument first, joins the process group under torchrun."""
    cfg = load_config(config, overrides)
    loops_t = parse_loops(loops) if loops is not None else None
    splits_t = check_splits(cfg, [s.strip() for s in splits.split(",")]) if splits is not None else None
    _refuse_missing(checkpoint)  # before joining any process group
    device, ep_size = _join(cfg)
    distributed = dist.is_initialized()
    model = load_model(checkpoint, cfg, ep_size).to(device)
    if checkpoint is None and _dist()[0] == 0:
        print("note: no --checkpoint, evaluating a freshly initialised model", file=sys.stderr)
    if ep_size > 1 and _dist()[0] == 0:
        n = model.cfg.n_experts
        print(f"expert-parallel evaluation: ep_size={ep_size}, {n // ep_size} of {n} experts per rank")
    try:
        res = run_eval(model, cfg, loops_t, splits_t, n_samples, out_dir, checkpoint, parent_run_id)
        if res is not None:
            print(f"results: {res.out_dir}" + (f"  (MLflow run {res.run_id})" if res.run_id else ""))
        _barrier()  # ranks leave together; one exiting with a live process group can stall the others
    finally:
        if distributed:
            dist.destroy_process_group()
    return 0


def spectral_inputs(cfg: Config, split: str, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The stability tools' inputs: the first min(n, 64) samples of `split` (n defaults to the
    split size) -> (input_ids (B,T), valid positions (B,T))."""
    batch = next(chain_batches(cfg, split, 0, min(64, cfg.data.task.n_eval if n is None else n), 64))
    return batch["input_ids"], valid_positions(batch["loss_mask"])


def main_spectral(
    config: str | None, overrides: list[str], checkpoint: str | None, n_loops: int | None
) -> int:
    """`mythos spectral`: ρ(A), Jacobian radius and contraction ratios on real eval inputs."""
    from mythos_dist.stability import spectral_report

    cfg = load_config(config, overrides)
    n = cfg.train.loops.n_loops if n_loops is None else parse_loops([n_loops])[0]
    _refuse_missing(checkpoint)  # before joining any process group
    device, ep_size = _join(cfg)  # expert-parallel: every rank runs the same iterations, rank 0 prints
    try:
        model = load_model(checkpoint, cfg, ep_size).to(device)
        split = cfg.eval.splits[0]
        ids_BT, valid_BT = spectral_inputs(cfg, split)
        rep = spectral_report(model, ids_BT.to(device), n, valid_BT.to(device))
        rank = _dist()[0]
        _barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if rank != 0:
        return 0
    print(f"checkpoint:         {checkpoint or '(fresh init)'}  inputs: {split}, n_loops={n}")
    print(f"rho(A):             {rep['rho_A']:.6f}")
    print(f"Jacobian radius:    {rep['jacobian_radius']:.6f}  (Rayleigh {rep['jacobian_rayleigh']:+.6f})")
    print("contraction ratios: " + " ".join(f"{r:.3f}" for r in rep["contraction_ratios"]))
    return 0


def stability_over_training(
    cfg: Config, checkpoint_dir: str | Path, loop_counts: Sequence[int]
) -> list[dict]:
    """ρ(A) and the Jacobian radius of the loop map at each retained checkpoint (step_* dirs of a
    training run), on the first eval batch, after each of `loop_counts` loops; sorted by step.

    -> [{"step": s, "rho_A": ..., "jacobian_radius": {n: radius}}, ...]. Each checkpoint is
    consolidated (any EP layout) into a temporary export and evaluated in this process.
    """
    from mythos_dist import checkpoint as ckpt
    from mythos_dist.stability import spectral_report

    tags = ckpt.run_checkpoints(checkpoint_dir)
    if not tags:
        raise ValueError(f"{checkpoint_dir}: no complete step_* checkpoint")
    ids_BT, valid_BT = spectral_inputs(cfg, cfg.eval.splits[0])
    rows = []
    for tag in tags:
        model = load_model(tag, cfg)
        radii = {n: spectral_report(model, ids_BT, n, valid_BT) for n in loop_counts}
        rows.append(
            {
                "step": int(ckpt.read_meta(tag)["step"]),
                "rho_A": next(iter(radii.values()))["rho_A"],
                "jacobian_radius": {n: r["jacobian_radius"] for n, r in radii.items()},
            }
        )
    return rows


# ------------------------------------------------------------------------------------ the driver


@dataclass
class EvalResult:
    out_dir: Path
    store: Path
    summary: dict[str, Any]
    spectral: dict[str, Any]
    files: list[Path]
    run_id: str | None


def _dist() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


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
    rank, world = _dist()

    # Rank 0 picks the version directory and creates the store; the others learn its name.
    holder: list[Any] = [None]
    if rank == 0:
        try:
            version_dir = next_version_dir(Path(out_dir or cfg.eval.out_dir))
            version_dir.mkdir(parents=True)
            create_store(version_dir / STORE_NAME, cfg, splits, loops, n, world, bs, checkpoint)
            holder[0] = str(version_dir)
        except Exception as e:  # the other ranks must not wait at the barrier for a store that never comes
            holder[0] = e
    if world > 1:
        dist.broadcast_object_list(holder, src=0)
    if isinstance(holder[0], Exception):
        raise holder[0]
    version_dir = Path(holder[0])
    store = version_dir / STORE_NAME

    start, stop, _ = rank_region(n, world, rank, bs)
    # Under expert parallelism every forward is collective: each rank runs as many batches as the
    # busiest one (known to all without communicating), the extra ones on a filler batch whose
    # results are dropped, so no rank leaves while another still needs its experts.
    expert_parallel = any(isinstance(m.dispatcher, AllToAllDispatcher) for m in model.moe_layers())
    regions = [rank_region(n, world, r, bs) for r in range(world)]
    lockstep = max(math.ceil((b - a) / bs) for a, b, _ in regions) if expert_parallel else 0
    for split in splits:
        if start < stop:
            res = sweep(model, chain_batches(cfg, split, start, stop, bs), loops)
            write_region(store, split, start, res)
        fillers = lockstep - math.ceil((stop - start) / bs)
        if fillers > 0:
            sweep(model, itertools.repeat(next(chain_batches(cfg, split, 0, min(bs, n), bs)), fillers), loops)
    spectral = None
    if expert_parallel or rank == 0:  # collective under expert parallelism: every rank joins
        ids_BT, valid_BT = spectral_inputs(cfg, splits[0], n)
        device = next(model.parameters()).device
        spectral = spectral_report(model, ids_BT.to(device), max(loops), valid_BT.to(device))
    _barrier()
    # Rank 0 summarises, plots and tracks; every rank learns whether that worked, so none is left
    # waiting for a rank that failed (e.g. at main_eval's closing barrier) and all end with the error.
    result: EvalResult | None = None
    error: Exception | None = None
    if rank == 0:
        try:
            result = _report(cfg, version_dir, store, spectral, checkpoint, parent_run_id, over_training)
        except Exception as e:
            error = e
    outcome = [None if error is None else f"{type(error).__name__}: {error}"]
    if world > 1:
        dist.broadcast_object_list(outcome, src=0)
    if error is not None:
        raise error
    if outcome[0] is not None:
        raise RuntimeError(
            f"evaluation failed on rank 0 while writing the results in {version_dir}: {outcome[0]}"
        )
    return result


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
    from mythos_dist import checkpoint as ckpt
    from mythos_dist import tracking

    tracker = tracking.Tracker(cfg.tracking, enabled_on_this_rank=True)
    # The config as a training run logs it, plus what this evaluation actually ran (CLI overrides).
    run = {k: summary[k] for k in ("loops", "store")} | {"splits": list(summary["splits"])}
    run["checkpoint"] = checkpoint or ""
    export = tracking.export_dir_of(checkpoint) if tracking.is_model_uri(checkpoint) else checkpoint
    if export and (Path(export) / "config.json").is_file():  # an export: whose weights
        run["weights_of_steps"] = ",".join(map(str, ckpt.exported_steps(export)))
    params = to_dict(cfg) | {"eval_run": run}
    name = tracking.eval_run_name(checkpoint, version_dir)
    tracker.start(name, params, parent_run_id=parent_run_id, tags=tracking.eval_tags(name, checkpoint))
    n = next(iter(summary["splits"].values()))["n"]
    tracker.log_data(cfg, list(summary["splits"]), from_shards=False, context="evaluation", n_samples=n)
    tracker.link_model(checkpoint, parent_run_id)  # the metrics below belong to that model
    metrics = {"spectral/rho_A": spectral["rho_A"], "spectral/jacobian_radius": spectral["jacobian_radius"]}
    for split, d in summary["splits"].items():
        metrics |= {acc_metric(split, n): a for n, a in zip(summary["loops"], d["acc"])}
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
