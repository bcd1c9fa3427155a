"""Checkpoints: periodic DeepSpeed checkpoints with our state, exact resume, export of a run.

Layout under `checkpoint.dir`:
  step_00000500/               DeepSpeed's files (module, one file per *global* expert id, ZeRO
                               optimizer shards) + extra_rank<r>.pt (step, data-loader state, RNG)
                               + mythos_meta.json, written last: a tag without it is partial
  latest                       tag of the newest complete checkpoint, replaced atomically
  export/                      the run's weights in the export format (mythos_dist.export): the
                               final ones, or the mean of the last checkpoint.average_last

Every .pt file is read through `mythos_dist.safe_io.torch_load` (no code from a file runs).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import mmap
import os
import pickle
import random
import re
import shutil
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from mythos_dist.comm import all_reduce_host, barrier, rank, world_size
from mythos_dist.config import Config, ModelConfig, config_diff, from_dict, parse_size, to_dict
from mythos_dist.export import (
    EXPORT_FORMAT,
    check_keys,
    expected_shapes,
    rank_of_tensor,
    write_export,
    write_export_across_ranks,
)
from mythos_dist.model import RDT, count_params
from mythos_dist.model.moe import MoEFFN
from mythos_dist.safe_io import (
    CheckpointError,
    UntrustedCheckpointError,
    globals_needed,
    read_json,
    torch_load,
)
from mythos_dist.weight_names import (
    DS_EXPERT_KEY,
    DS_EXPERT_SEGMENT,
    DS_MOE_LAYER,
    EXPERT_WEIGHTS,
    ROUTER_BIAS,
    ROUTER_BIAS_DS,
)

LATEST = "latest"
META = "mythos_meta.json"
# Bytes on disk per parameter: fp32 weights + the optimizer's fp32 copy and two AdamW moments.
CHECKPOINT_BYTES_PER_PARAM = 16


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # readers see the old or the new content, never a torn file


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# --------------------------------------------------------------------------- save / resume


def checkpoint_bytes(cfg: Config) -> int:
    """Rough size of one checkpoint (all ranks together), from the parameter count alone."""
    return count_params(cfg.model).total * CHECKPOINT_BYTES_PER_PARAM


def preflight(cfg: Config) -> None:
    """Fail before training when checkpoint.dir cannot take a checkpoint: not creatable or writable,
    or less free space than one checkpoint needs. Needs no process group or model."""
    root = Path(cfg.checkpoint.dir)
    probe = root / f".write_probe_{socket.gethostname()}_{os.getpid()}"  # unique per rank and node
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"\0")
        probe.unlink()
    except OSError as e:
        raise CheckpointError(f"checkpoint.dir={root} is not writable: {e}") from e
    need, free = checkpoint_bytes(cfg), shutil.disk_usage(root).free
    if free < need:
        raise CheckpointError(
            f"checkpoint.dir={root}: {free / 2**20:,.1f} MiB free, one checkpoint needs about "
            f"{need / 2**20:,.1f} MiB ({CHECKPOINT_BYTES_PER_PARAM} bytes per parameter); free space or "
            "point checkpoint.dir elsewhere"
        )


def _save_deepspeed(engine: Any, root: Path, tag: str) -> Exception | None:
    """engine.save_checkpoint, returning the first write error instead of raising it.

    DeepSpeed's save has collectives of its own (barriers between and after the writes): a rank
    that raised out of a failed write would meet the others in a different collective and hang
    (gloo: until parallel.timeout_s). So a failed write of its checkpoint engine is recorded, the
    rank's remaining writes are skipped, and it goes through the rest of the save like the others.
    RuntimeError too: torch's zip writer reports a full disk as one.
    """
    writer = engine.checkpoint_engine
    errors: list[Exception] = []
    write = writer.save

    def write_or_record(state_dict: Any, path: str, *args: Any, **kwargs: Any) -> None:
        if errors:
            return
        try:
            write(state_dict, path, *args, **kwargs)
        except (OSError, RuntimeError) as e:
            errors.append(e)

    writer.save = write_or_record  # an instance attribute shadows the method
    try:
        engine.save_checkpoint(str(root), tag=tag, save_latest=False)
    except OSError as e:  # a write outside the checkpoint engine
        errors.append(e)
    finally:
        del writer.save
    return errors[0] if errors else None


def _failed_anywhere(error: Exception | None) -> bool:
    """Collective: True on every rank when `error` is set on any rank."""
    return bool(all_reduce_host(torch.tensor([float(error is not None)]), dist.ReduceOp.MAX).item())


def _agree(error: Exception | None, root: Path, tag: str) -> None:
    """Collective: when a write failed on any rank, every rank raises (none waits at a barrier for
    a rank that gave up) and the partial tag directory is removed; `latest` was not touched."""
    if not _failed_anywhere(error):
        return
    if rank() == 0 and latest_tag(root) != tag:
        shutil.rmtree(root / tag, ignore_errors=True)
    barrier()
    cause = str(error) if error is not None else "a write failed on another rank"
    raise CheckpointError(
        f"saving checkpoint {root / tag} failed ({cause}); removed the partial checkpoint, "
        f"{LATEST} still names {latest_tag(root)}"
    )


def save(
    engine: Any,
    cfg: Config,
    step: int,
    data_state: dict[str, Any] | None,
    lineage: str | None = None,
    run_id: str | None = None,
) -> Path:
    """Collective: every rank writes its part; `latest` moves only once all parts are on disk.
    run_id (rank 0's MLflow run) goes into the meta file: a resumed job continues that run.

    lineage: names the run (a fresh start and its resumes, see `run_lineage`) in the meta file, so
    pruning and averaging keep to this run's checkpoints when a directory holds another's too.

    A write error on any rank (disk full, I/O error) raises CheckpointError on every rank and
    leaves no partial directory; a killed save leaves one without META, which resume never reads.
    """
    root = Path(cfg.checkpoint.dir)
    tag = tag_for(step)
    error = _save_deepspeed(engine, root, tag)
    if error is None:
        try:
            extra = {"step": step, "data": data_state, "rng": rng_state()}
            torch.save(extra, root / tag / f"extra_rank{rank()}.pt")
        except (OSError, RuntimeError) as e:
            error = e
    _agree(error, root, tag)
    if rank() == 0:
        try:
            world = world_size()
            meta = {"step": step, "world_size": world, "config": to_dict(cfg), "lineage": lineage}
            meta["mlflow_run_id"] = run_id
            _write_atomic(root / tag / META, json.dumps(meta, indent=1))
            _write_atomic(root / LATEST, tag)
        except OSError as e:
            error = e
    _agree(error, root, tag)
    if rank() == 0:
        _prune(root, cfg.checkpoint.keep_last)
    barrier()
    return root / tag


def _prune(root: Path, keep_last: int) -> None:
    """Keep the last keep_last checkpoints of this run (`run_checkpoints`, up to the one `latest`
    names, just saved). Another run's tags in this directory (e.g. relaunched with
    checkpoint.resume=false) are neither counted nor deleted: sorting them in deleted the
    checkpoint `latest` names. Partial tags before `latest` (killed saves) go."""
    latest = latest_tag(root)
    if latest is None:
        return
    dead = [p for p in root.glob("step_*") if p.name < latest and not (p / META).is_file()]  # killed saves
    for old in run_checkpoints(root)[:-keep_last] + dead:
        shutil.rmtree(old, ignore_errors=True)


def latest_tag(root: str | Path) -> str | None:
    """Tag named by `latest`, or None when the directory holds no checkpoint yet."""
    pointer = Path(root) / LATEST
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    if not re.fullmatch(r"step_\d{8}", tag):
        raise CheckpointError(f"{pointer}: names {tag[:80]!r}, not a step_* tag; the file is corrupt")
    return tag


def read_meta(tag_dir: Path) -> dict[str, Any]:
    if not tag_dir.is_dir():
        raise CheckpointError(f"checkpoint {tag_dir} does not exist")
    if not (tag_dir / META).is_file():
        raise CheckpointError(
            f"checkpoint {tag_dir} is partial ({META} missing): it was interrupted while saving"
        )
    return read_json(tag_dir / META)


def saved_run_id(root: str | Path) -> str | None:
    """The MLflow run of the job whose checkpoint `latest` names (None: none, or not tracked)."""
    tag = latest_tag(root)
    return None if tag is None else read_meta(Path(root) / tag).get("mlflow_run_id")


RESUMABLE_CHANGES = {
    "train": {"steps", "log_every", "max_nonfinite_steps", "activation_checkpointing"},
    "data": {"remote", "local", "num_workers", "predownload"},
}


def check_compatible(meta: dict[str, Any], cfg: Config, world_size: int, where: Path) -> None:
    """To resume a DeepSpeed checkpoint the model, world size, ep_size and ZeRO stage must match,
    and so must the training recipe and data (all of train/data but RESUMABLE_CHANGES): a checkpoint
    dir left by another recipe is refused, not silently continued."""
    current = json.loads(json.dumps(to_dict(cfg)))  # tuples -> lists, as in the saved meta
    saved = meta["config"]
    problems = config_diff(saved["model"], current["model"], "model")
    problems += [
        line
        for line in config_diff(saved["parallel"], current["parallel"], "parallel")
        if line.split(":")[0] in ("parallel.ep_size", "parallel.zero_stage")
    ]
    for section, free in RESUMABLE_CHANGES.items():
        problems += [
            line
            for line in config_diff(saved.get(section, {}), current[section], section)
            if line.split(":")[0].split(".", 1)[1] not in free
        ]
    if meta["world_size"] != world_size:
        problems.append(f"world size: checkpoint {meta['world_size']}, this run {world_size}")
    if problems:
        raise CheckpointError(
            f"cannot resume from {where}: it does not match this run:\n  "
            + "\n  ".join(problems)
            + "\n(to change world size or ep_size, export the checkpoint and start from the exported weights;"
            " to start over, use a new checkpoint.dir or set checkpoint.resume=false)"
        )


def resume(engine: Any, cfg: Config) -> tuple[int, dict[str, Any] | None]:
    """Load `latest` into the engine; returns (step to continue from, data-loader state).

    (0, None) when the directory holds no checkpoint.
    """
    root = Path(cfg.checkpoint.dir)
    tag = latest_tag(root)
    if tag is None:
        return 0, None
    tag_dir = root / tag
    meta = read_meta(tag_dir)
    world = world_size()
    check_compatible(meta, cfg, world, tag_dir)
    extra_path = tag_dir / f"extra_rank{rank()}.pt"
    if not extra_path.is_file():
        raise CheckpointError(f"checkpoint {tag_dir} is partial: {extra_path.name} missing")
    error: CheckpointError | None = None
    try:  # every file is vetted before DeepSpeed reads any, and every rank stops if one refuses
        for f in sorted(tag_dir.glob("*.pt")):
            globals_needed(f)
        extra = torch_load(extra_path)
    except CheckpointError as e:
        error = e
    if _failed_anywhere(error):
        raise error or CheckpointError(f"cannot resume from {tag_dir}: reading it failed on another rank")
    try:
        with _deepspeed_reads_safely(engine):
            load_path, _ = engine.load_checkpoint(str(root), tag=tag, load_module_strict=True)
    except UntrustedCheckpointError:
        raise
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as e:  # e.g. a truncated file
        raise CheckpointError(f"cannot load checkpoint {tag_dir}: {e}") from e
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {tag_dir}")
    set_rng_state(extra["rng"])
    return int(extra["step"]), extra["data"]


# --------------------------------------------------------------------------- reading without running code


@contextlib.contextmanager
def _deepspeed_reads_safely(engine: Any) -> Iterator[None]:
    """DeepSpeed reads every checkpoint file through `engine.checkpoint_engine.load`, which unpickles
    with weights_only=False: route it through `torch_load` while loading."""
    reader = engine.checkpoint_engine
    reader.load = lambda path, map_location=None: torch_load(path, map_location)
    try:
        yield
    finally:
        del reader.load  # the instance attribute only shadowed the class's method


# --------------------------------------------------------------------------- export / import


def retained(root: str | Path) -> list[Path]:
    """The complete checkpoints (step_* dirs with their meta file) in root, oldest first."""
    return sorted(p for p in Path(root).glob("step_*") if (p / META).is_file())


def run_lineage(root: str | Path) -> str | None:
    """The lineage of the run `latest` belongs to, for a run resuming it (None: older checkpoints)."""
    tag = latest_dir(root)
    return None if tag is None else read_meta(tag).get("lineage")


def new_lineage() -> str:
    """For a run that starts from scratch (fresh weights), whatever the directory holds."""
    return uuid.uuid4().hex


def run_checkpoints(root: str | Path, upto: Path | None = None) -> list[Path]:
    """The complete checkpoints of the run that `upto` (default: `latest`) belongs to, up to it,
    oldest first: not another run's left in the same directory (a later tag of a longer run, or
    one in between, e.g. after a relaunch with checkpoint.resume=false)."""
    last = latest_dir(root) if upto is None else upto
    if last is None:
        return []
    lineage = read_meta(last).get("lineage")
    return [p for p in retained(root) if p.name <= last.name and read_meta(p).get("lineage") == lineage]


def latest_dir(root: str | Path) -> Path | None:
    """The step dir `latest` names, or None when root holds no checkpoint yet."""
    tag = latest_tag(root)
    return None if tag is None else Path(root) / tag


def last_checkpoints(checkpoint: str | Path, k: int) -> list[Path]:
    """The last k complete checkpoints of one run (`run_checkpoints`), oldest first, up to
    `checkpoint`: a step_* dir, or a run's checkpoint dir, meaning its `latest`."""
    src = Path(checkpoint)
    found = (run_checkpoints(src.parent, src) if (src / META).is_file() else run_checkpoints(src))[-k:]
    if len(found) < k:
        raise CheckpointError(f"averaging the last {k} checkpoints, but {src} holds {len(found)} complete")
    return found


# --------------------------------------------------------------------------- export from a checkpoint


def _moe_prefixes(model_cfg: ModelConfig) -> list[str]:
    with torch.device("meta"):
        model = RDT(model_cfg)
    return [name for name, m in model.named_modules() if isinstance(m, MoEFFN)]


def _plain_key(key: str, moe_prefixes: list[str]) -> str:
    """DeepSpeed-view key of the wrapped model -> key of the plain RDT."""
    for p in moe_prefixes:
        if key.startswith(f"{p}.{DS_MOE_LAYER}"):
            key = f"{p}.{key[len(p) + 1 + len(DS_MOE_LAYER) :]}"
            return key.replace(ROUTER_BIAS_DS, ROUTER_BIAS)
    return key


def export_run(cfg: Config) -> Path:
    """Collective: rank 0 writes checkpoint.dir/export from the run's final checkpoint, or from the
    mean of its last checkpoint.average_last ones; if that fails, every rank raises."""
    root, k = Path(cfg.checkpoint.dir), cfg.checkpoint.average_last
    out = root / "export"
    error: Exception | None = None
    if rank() == 0:
        try:
            export(last_checkpoints(root, k), out, parse_size(cfg.checkpoint.max_shard_size))
        except (CheckpointError, OSError) as e:
            error = e
    if _failed_anywhere(error):
        raise CheckpointError(f"exporting {root} failed: {error or 'see rank 0'}")
    return out


def _unmap_pages(mapped: torch.Tensor) -> None:
    """Drop the whole pages of a tensor of a memory-mapped (private, read-only use) checkpoint file
    from this process's resident set (madvise MADV_DONTNEED; the file is read again if they are
    touched again). Without it, every dense tensor an export has read stays resident until the
    file is unmapped: the whole dense part, not one shard. A no-op where libc has no madvise."""
    page = mmap.PAGESIZE
    start = mapped.data_ptr()
    lo, hi = -(-start // page) * page, (start + mapped.numel() * mapped.element_size()) // page * page
    if hi > lo and _LIBC is not None:
        _LIBC.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), 4)  # 4: MADV_DONTNEED


try:
    _LIBC: ctypes.CDLL | None = ctypes.CDLL("libc.so.6", use_errno=True)
except OSError:
    _LIBC = None


class CheckpointTensors:
    """One DeepSpeed checkpoint's weights in export form (experts keyed by global id), read tensor
    by tensor: the dense file is memory-mapped, each expert file is read when one of its tensors is
    asked for. So an export never holds the model, whatever world/ep size wrote the checkpoint:
    DeepSpeed stores the dense weights once and each routed expert in its own file by global id."""

    def __init__(self, checkpoint: str | Path):
        src = Path(checkpoint)
        if not (src / META).exists():  # a run's checkpoint dir: its `latest`
            src = latest_dir(src) or src
        self.src, self.meta = src, read_meta(src)
        self.model_cfg = from_dict(ModelConfig, self.meta["config"]["model"], "model")
        dense_file = src / "mp_rank_00_model_states.pt"
        if not dense_file.is_file():
            raise CheckpointError(f"checkpoint {src} is partial: {dense_file.name} missing")
        prefixes = _moe_prefixes(self.model_cfg)
        module = torch_load(dense_file, mmap=True)["module"]
        self._dense = {_plain_key(k, prefixes): v for k, v in module.items()}
        self._expert_file: dict[str, Path] = {}  # export key -> its DeepSpeed file
        self._expert_key: dict[str, str] = {}  # export key -> key inside that file
        for m in prefixes:
            for g in range(self.model_cfg.n_experts):
                f = src / f"layer_{prefixes.index(m)}_expert_{g}_mp_rank_00_model_states.pt"
                for _, single in EXPERT_WEIGHTS:
                    name = f"{m}.experts.{g}.{single}"
                    self._expert_file[name] = f
                    self._expert_key[name] = f"{m}.{DS_EXPERT_SEGMENT}{g}.{single}"
        shapes = {k: tuple(v.shape) for k, v in self._dense.items()}
        self._expected = expected_shapes(self.model_cfg)
        shapes |= {k: self._expected[k] for k, f in self._expert_file.items() if f.is_file()}
        check_keys(self._expected, shapes, src)
        self.names = list(self._dense) + list(self._expert_file)
        self._open: tuple[Path, dict[str, torch.Tensor]] | None = None

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    def read_into(self, name: str, out: torch.Tensor) -> None:
        out.copy_(self.get(name))

    def get(self, name: str) -> torch.Tensor:
        if name in self._dense:  # a private copy; the mapped pages it was read from leave the RSS
            mapped = self._dense[name]
            tensor = mapped.clone()
            _unmap_pages(mapped)
            return tensor
        f = self._expert_file[name]
        if self._open is None or self._open[0] != f:  # experts are asked for file by file
            state = torch_load(f)
            if any(DS_EXPERT_KEY.match(k) is None for k in state):
                bad = next(k for k in state if DS_EXPERT_KEY.match(k) is None)
                raise CheckpointError(f"{f.name}: unexpected key {bad}")
            self._open = (f, state)
        tensor = self._open[1].get(self._expert_key[name])
        if tensor is None or tuple(tensor.shape) != self._expected[name]:
            found = "missing" if tensor is None else f"shape {tuple(tensor.shape)}"
            raise CheckpointError(f"{f}: {self._expert_key[name]} {found}, model {self._expected[name]}")
        return tensor


def export(
    checkpoints: str | Path | list[str | Path],
    out_dir: str | Path,
    max_shard_bytes: int | None = None,
    across_ranks: bool = False,
) -> Path:
    """Consolidate DeepSpeed checkpoints (checkpoint dirs with `latest`, or step_* dirs) into
    out_dir: model.safetensors, or with max_shard_bytes safetensors shards of at most that size +
    model.safetensors.index.json (the Hugging Face layout), and config.json. Runs in one CPU
    process, whatever world/ep size wrote them, reading and writing tensor by tensor: memory holds
    one shard, not the model.

    Several checkpoints: the export holds the mean of their weights (summed in fp64 per tensor,
    stored in each tensor's dtype); they must share the model config. config.json records every
    averaged step. out_dir is replaced as a whole, once complete.

    across_ranks: collective; every rank of the process group reads and writes its share
    (rank 0 the dense tensors, each rank a block of experts by `export.rank_of_tensor`, its own
    when the world size is the ep_size that wrote the checkpoint) into one directory all ranks see.
    """
    sources = [checkpoints] if isinstance(checkpoints, (str, Path)) else list(checkpoints)
    if not sources:
        raise CheckpointError("no checkpoint to export")
    readers = [CheckpointTensors(s) for s in sources]
    first = readers[0]
    for r in readers[1:]:
        diff = config_diff(r.meta["config"]["model"], first.meta["config"]["model"], "model")
        if diff:
            raise CheckpointError(
                f"cannot average {r.src} with {first.src} (as 'this run'): the model configs differ:\n  "
                + "\n  ".join(diff)
            )

    def mean(name: str) -> torch.Tensor:
        tensor = first.get(name)
        if len(readers) == 1:
            return tensor
        total = tensor.double()  # fp64 sums: the mean is exact to fp32
        for r in readers[1:]:
            total.add_(r.get(name))
        return total.div_(len(readers)).to(tensor.dtype)

    steps = [r.step for r in readers]
    config = {"format": EXPORT_FORMAT, "step": steps[-1], "model": first.meta["config"]["model"]}
    if len(steps) > 1:
        config["averaged_steps"] = steps
    if not across_ranks:
        return write_export(((name, mean(name)) for name in first.names), config, out_dir, max_shard_bytes)
    n, world, me = first.model_cfg.n_experts, world_size(), rank()
    mine = (name for name in first.names if (rank_of_tensor(name, n, world) or 0) == me)  # dense: rank 0
    return write_export_across_ranks(((name, mean(name)) for name in mine), config, out_dir, max_shard_bytes)
