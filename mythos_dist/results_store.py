"""The evaluation's zarr v3 store: every array sized for all samples by rank 0, each rank writing
exactly the chunk of its own contiguous sample range (no gather of predictions), read back whole
for the summary."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mythos_dist.config import Config, to_dict
from mythos_dist.sweep import SweepResult
from mythos_dist.tracking import git_commit

STORE_NAME = "results.zarr"


def rank_region(n: int, world: int, rank: int, batch_size: int) -> tuple[int, int, int]:
    """(start, stop, chunk rows): contiguous sample ranges, one zarr chunk per rank, each a whole
    number of batches so that batches (hence results) are the same for every world size."""
    chunk = max(batch_size, math.ceil(math.ceil(n / world) / batch_size) * batch_size)
    return min(rank * chunk, n), min((rank + 1) * chunk, n), chunk


def new_version_dir(out_dir: Path) -> Path:
    """Create and return out_dir/eval-K, K one above the highest existing: an old result is never
    overwritten, and evaluations started together into one out_dir each get their own (mkdir
    claims K atomically; the loser of a race takes the next)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    while True:
        taken = [int(p.name[5:]) for p in out_dir.glob("eval-*") if p.name[5:].isdigit()]
        version_dir = out_dir / f"eval-{max(taken, default=0) + 1}"
        try:
            version_dir.mkdir()
            return version_dir
        except FileExistsError:
            continue


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
    """Rank 0: the group, its attributes and every array at full size (no data written yet).
    With cfg.eval.auto also each sample's prediction and loops used at its own loop count."""
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
            "heldout": cfg.eval.heldout,
            "auto": _auto_attrs(cfg),
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
        ] + [
            ("auto_prediction", (n_samples,), "int16", -1),
            ("auto_correct", (n_samples,), "bool", False),
            ("auto_loops", (n_samples,), "int16", -1),
        ] * cfg.eval.auto:
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
    if res.auto_prediction_N is not None:
        g["auto_prediction"][start:stop] = res.auto_prediction_N
        g["auto_correct"][start:stop] = res.auto_prediction_N == res.answer_N
        g["auto_loops"][start:stop] = res.auto_loops_N


def _auto_attrs(cfg: Config) -> dict[str, Any] | None:
    e = cfg.eval
    if not e.auto:
        return None
    return {"threshold": e.auto_threshold, "min_loops": e.auto_min_loops, "max_loops": e.auto_max_loops}


def summarize(path: Path) -> dict[str, Any]:
    """Accuracy per split × loop count, per chain length × loop count, and mean ‖Δh‖ per loop; with
    auto: accuracy at each sample's own loop count, mean / p90 / max loops used (also per length),
    beside the best fixed count."""
    import zarr

    root = zarr.open_group(str(path), mode="r")
    loops = list(root.attrs["loops"])
    auto = root.attrs.get("auto")
    out: dict[str, Any] = {"loops": loops, "store": str(path), "heldout": root.attrs.get("heldout", "val"),
                           "auto": auto, "splits": {}}  # fmt: skip
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
        if auto:
            correct_N, used_N = g["auto_correct"][:], g["auto_loops"][:].astype(np.int64)
            acc = correct_NL.mean(0)
            out["splits"][split]["auto"] = {
                "acc": float(correct_N.mean()),
                "loops_mean": float(used_N.mean()),
                "loops_p90": float(np.percentile(used_N, 90)),
                "loops_max": int(used_N.max()),
                "best_fixed_loops": int(loops[int(acc.argmax())]),
                "best_fixed_acc": float(acc.max()),
                "by_length": {
                    int(n): [float(correct_N[length_N == n].mean()), float(used_N[length_N == n].mean())]
                    for n in np.unique(length_N)
                },  # chain length -> [accuracy, mean loops used]
            }
    return out
