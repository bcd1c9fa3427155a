"""Checkpoints: periodic DeepSpeed checkpoints with our state, exact resume, framework-free export.

Layout under `checkpoint.dir`:
  step_00000500/               DeepSpeed's files (module, one file per *global* expert id, ZeRO
                               optimizer shards) + extra_rank<r>.pt (step, data-loader state, RNG)
                               + mythos_meta.json, written last: a tag without it is partial
  latest                       tag of the newest complete checkpoint, replaced atomically
  export/model.safetensors     consolidated weights, experts keyed by global id (see `export`):
                               the final ones, or the mean of the last checkpoint.average_last;
                               past checkpoint.max_shard_size: model-0000i-of-0000n.safetensors
                               + model.safetensors.index.json (tensor -> file, Hugging Face layout)
  export/config.json           the model config; `load_exported` / `ExportReader` need nothing else
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import pickle
import random
import re
import shutil
import socket
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save_file

from mythos_dist.comm import all_reduce_host
from mythos_dist.config import Config, ModelConfig, from_dict, parse_size, to_dict
from mythos_dist.model import RDT, count_params
from mythos_dist.model.moe import MoEFFN

LATEST = "latest"
META = "mythos_meta.json"
# Bytes on disk per parameter: fp32 weights + the optimizer's fp32 copy and two AdamW moments.
CHECKPOINT_BYTES_PER_PARAM = 16
EXPORT_FORMAT = "mythos-rdt/1"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"  # with shards: tensor name -> file (Hugging Face layout)
# Must match mythos_dist.parallel (kept literal so exporting needs neither DeepSpeed nor a process group).
_DS_EXPERT_KEY = re.compile(r"^(.*)\.deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\.(w_in_DH|w_out_HD)$")
_EXPERT_WEIGHTS = (("w_in_EDH", "w_in_DH"), ("w_out_EHD", "w_out_HD"))


class CheckpointError(RuntimeError):
    """A checkpoint or export is missing, incomplete or does not match this run."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # readers see the old or the new content, never a torn file


def read_json(path: Path, error: type[Exception] = CheckpointError) -> dict[str, Any]:
    """A JSON object from a file we wrote; a malformed one raises `error` naming the file."""
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e}); the file is corrupt") from e
    if not isinstance(value, dict):
        raise error(f"{path}: expected a JSON object, got {type(value).__name__}; the file is corrupt")
    return value


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
    if _rank() == 0 and latest_tag(root) != tag:
        shutil.rmtree(root / tag, ignore_errors=True)
    _barrier()
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
            torch.save(extra, root / tag / f"extra_rank{_rank()}.pt")
        except (OSError, RuntimeError) as e:
            error = e
    _agree(error, root, tag)
    if _rank() == 0:
        try:
            world = dist.get_world_size() if dist.is_initialized() else 1
            meta = {"step": step, "world_size": world, "config": to_dict(cfg), "lineage": lineage}
            meta["mlflow_run_id"] = run_id
            _write_atomic(root / tag / META, json.dumps(meta, indent=1))
            _write_atomic(root / LATEST, tag)
        except OSError as e:
            error = e
    _agree(error, root, tag)
    if _rank() == 0:
        _prune(root, cfg.checkpoint.keep_last)
    _barrier()
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


def config_diff(saved: dict[str, Any], current: dict[str, Any], prefix: str) -> list[str]:
    """['model.dim: checkpoint 32, this run 64', ...] for every differing key."""
    keys = sorted(set(saved) | set(current))
    return [
        f"{prefix}.{k}: checkpoint {saved.get(k, '<absent>')!r}, this run {current.get(k, '<absent>')!r}"
        for k in keys
        if saved.get(k) != current.get(k)
    ]


# Settings a resumed run may change: its length and logging, activation recomputation, where the
# shards live, how they are read.
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
    world = dist.get_world_size() if dist.is_initialized() else 1
    check_compatible(meta, cfg, world, tag_dir)
    extra_path = tag_dir / f"extra_rank{_rank()}.pt"
    if not extra_path.is_file():
        raise CheckpointError(f"checkpoint {tag_dir} is partial: {extra_path.name} missing")
    error: CheckpointError | None = None
    try:  # every file is vetted before DeepSpeed reads any, and every rank stops if one refuses
        for f in sorted(tag_dir.glob("*.pt")):
            _globals_needed(f)
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
# A .pt file is a pickle, and a pickle can call any function while it loads. Every .pt file of a
# checkpoint (ours and DeepSpeed's) is read with torch's weights_only unpickler, which builds only
# tensors, containers and primitives, plus the few types below; a file naming anything else is
# refused before any of it is unpickled. Exports are safetensors + JSON and need none of this.
ALLOWED_GLOBALS = {
    # np.random.get_state() in extra_rank*.pt (numpy 2 and 1.x spell the module differently)
    "numpy._core.multiarray._reconstruct": "numpy RNG state",
    "numpy.core.multiarray._reconstruct": "numpy RNG state",
    "numpy.ndarray": "numpy RNG state",
    "numpy.dtype": "numpy RNG state",
    # DeepSpeed's ZeRO-1/2 optimizer files (zero_pp_rank_*_optim_states.pt), fp32 and bf16
    "deepspeed.runtime.zero.config.ZeroStageEnum": "ZeRO optimizer state",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler": "ZeRO optimizer state",
    "deepspeed.utils.tensor_fragment.fragment_address": "ZeRO optimizer state",
}


class UntrustedCheckpointError(CheckpointError):
    """A checkpoint file would need to run code (or build a type no checkpoint holds) to load."""


def _allowed_objects(names: list[str]) -> list[Any]:
    """The objects safe_globals needs for these allowed names (DeepSpeed is imported only for its files)."""
    objs = [getattr(importlib.import_module(n.rpartition(".")[0]), n.rpartition(".")[2]) for n in names]
    if "numpy.dtype" in names:  # np.dtype(...) builds an instance of a dtype class (the RNG key: uint32)
        objs += [type(np.dtype(t)) for t in (np.uint32, np.int64, np.float64)]
    return objs


def _globals_needed(path: Path) -> list[str]:
    """The globals path's pickle names beyond torch's own safe set, read from its opcodes without
    running any; UntrustedCheckpointError if one is not in ALLOWED_GLOBALS."""
    try:
        needed = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # not a zip checkpoint, or a damaged one: the weights_only unpickler decides
        return []
    refused = sorted(needed - ALLOWED_GLOBALS.keys())
    if refused:
        raise UntrustedCheckpointError(
            f"refusing to read {path}: loading it would call {', '.join(refused)}, which no checkpoint "
            "holds (a pickle that runs code?); nothing in it was run. Only open checkpoints you trust."
        )
    return sorted(needed)


def torch_load(path: str | Path, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """torch.load that never runs code from the file: the pickle's globals are listed from its
    opcodes first (nothing executes) and must all be in ALLOWED_GLOBALS; the weights_only unpickler
    then builds the objects with exactly those allowed."""
    path = Path(path)
    needed = _globals_needed(path)
    try:
        with torch.serialization.safe_globals(_allowed_objects(needed)):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:  # the unpickler refused what the opcode listing did not show
        reason = str(e).split("\n\n")[1].strip() if "\n\n" in str(e) else str(e)
        raise UntrustedCheckpointError(
            f"refusing to read {path}: {reason}; nothing in it was run. Only open checkpoints you trust."
        ) from e
    except (RuntimeError, OSError, EOFError) as e:
        raise CheckpointError(f"cannot read {path}: truncated or corrupt ({e})") from e


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


def _moe_prefixes(model_cfg: ModelConfig) -> list[str]:
    with torch.device("meta"):
        model = RDT(model_cfg)
    return [name for name, m in model.named_modules() if isinstance(m, MoEFFN)]


def _plain_key(key: str, moe_prefixes: list[str]) -> str:
    """DeepSpeed-view key of the wrapped model -> key of the plain RDT."""
    for p in moe_prefixes:
        if key.startswith(f"{p}.layer."):
            key = f"{p}.{key[len(p) + 7 :]}"
            return key.replace(".router.balance_bias", ".router.expert_bias")
    return key


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


def export_run(cfg: Config) -> Path:
    """Collective: rank 0 writes checkpoint.dir/export from the run's final checkpoint, or from the
    mean of its last checkpoint.average_last ones; if that fails, every rank raises."""
    root, k = Path(cfg.checkpoint.dir), cfg.checkpoint.average_last
    out = root / "export"
    error: Exception | None = None
    if _rank() == 0:
        try:
            export(last_checkpoints(root, k), out, parse_size(cfg.checkpoint.max_shard_size))
        except (CheckpointError, OSError) as e:
            error = e
    if _failed_anywhere(error):
        raise CheckpointError(f"exporting {root} failed: {error or 'see rank 0'}")
    return out


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
                for _, single in _EXPERT_WEIGHTS:
                    name = f"{m}.experts.{g}.{single}"
                    self._expert_file[name] = f
                    self._expert_key[name] = f"{m}.deepspeed_moe.experts.deepspeed_experts.{g}.{single}"
        shapes = {k: tuple(v.shape) for k, v in self._dense.items()}
        self._expected = _expected_export_shapes(self.model_cfg)
        shapes |= {k: self._expected[k] for k, f in self._expert_file.items() if f.is_file()}
        _check_keys(self._expected, shapes, src)
        self.names = list(self._dense) + list(self._expert_file)
        self._open: tuple[Path, dict[str, torch.Tensor]] | None = None

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    def read_into(self, name: str, out: torch.Tensor) -> None:
        out.copy_(self.get(name))

    def get(self, name: str) -> torch.Tensor:
        if name in self._dense:
            return self._dense[name]
        f = self._expert_file[name]
        if self._open is None or self._open[0] != f:  # experts are asked for file by file
            state = torch_load(f)
            if any(_DS_EXPERT_KEY.match(k) is None for k in state):
                bad = next(k for k in state if _DS_EXPERT_KEY.match(k) is None)
                raise CheckpointError(f"{f.name}: unexpected key {bad}")
            self._open = (f, state)
        tensor = self._open[1].get(self._expert_key[name])
        if tensor is None or tuple(tensor.shape) != self._expected[name]:
            found = "missing" if tensor is None else f"shape {tuple(tensor.shape)}"
            raise CheckpointError(f"{f}: {self._expert_key[name]} {found}, model {self._expected[name]}")
        return tensor


class _ShardWriter:
    """Writes tensors into safetensors shards of at most max_bytes each (a tensor larger than that
    gets a shard of its own), holding at most one shard in memory."""

    def __init__(self, out: Path, max_bytes: int | None):
        self.out, self.max_bytes = out, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.max_bytes is not None and self.pending and self.pending_bytes + size > self.max_bytes:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        save_file(
            self.pending, str(self.out / f"shard-{len(self.shards)}.tmp"), metadata={"format": EXPORT_FORMAT}
        )
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        """Name the shards (model.safetensors alone, or model-0000i-of-0000n.safetensors + index)."""
        if self.pending or not self.shards:
            self._flush()
        n = len(self.shards)
        if n == 1:
            os.replace(self.out / "shard-0.tmp", self.out / SINGLE_FILE)
            return
        weight_map = {}
        for i, names in enumerate(self.shards):
            file = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.out / f"shard-{i}.tmp", self.out / file)
            weight_map |= dict.fromkeys(names, file)
        index = {
            "metadata": {"total_size": self.total_bytes, "format": EXPORT_FORMAT},
            "weight_map": weight_map,
        }
        (self.out / INDEX_FILE).write_text(json.dumps(index, indent=1))


def export(
    checkpoints: str | Path | list[str | Path], out_dir: str | Path, max_shard_bytes: int | None = None
) -> Path:
    """Consolidate DeepSpeed checkpoints (checkpoint dirs with `latest`, or step_* dirs) into
    out_dir: model.safetensors, or with max_shard_bytes safetensors shards of at most that size +
    model.safetensors.index.json (the Hugging Face layout), and config.json. Runs in one CPU
    process, whatever world/ep size wrote them, reading and writing tensor by tensor: memory holds
    one shard, not the model.

    Several checkpoints: the export holds the mean of their weights (summed in fp64 per tensor,
    stored in each tensor's dtype); they must share the model config. config.json records every
    averaged step. out_dir is replaced as a whole, once complete.
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
    return write_export(((name, mean(name)) for name in first.names), config, out_dir, max_shard_bytes)


def write_export(
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    config: dict[str, Any],
    out_dir: str | Path,
    max_shard_bytes: int | None = None,
) -> Path:
    """Write an export directory from (export key, tensor) pairs consumed one at a time, and its
    config.json; out_dir is replaced as a whole once complete (a non-export dir is refused)."""
    out = Path(out_dir)
    if out.is_dir() and any(out.iterdir()) and not (out / "config.json").is_file():
        raise CheckpointError(f"{out} exists and is not an export directory: refusing to replace it")
    partial = out.with_name(f".{out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)  # left by an interrupted export
    partial.mkdir(parents=True)
    writer = _ShardWriter(partial, max_shard_bytes)
    for name, tensor in named_tensors:
        writer.add(name, tensor)
    writer.close()
    (partial / "config.json").write_text(json.dumps(config, indent=1))
    _replace_dir(partial, out)
    return out


def export_keys(model: RDT) -> Iterator[tuple[str, torch.Tensor]]:
    """(export key, tensor) of a model or one rank's shard of it: stacked local experts become one
    entry per global id."""
    for k, v in model.state_dict().items():
        prefix, _, name = k.rpartition(".experts.")
        single = dict(_EXPERT_WEIGHTS).get(name)
        if not (prefix and single):
            yield k, v
            continue
        first = model.get_submodule(f"{prefix}.experts").first_expert_id
        for i in range(v.shape[0]):
            yield f"{prefix}.experts.{first + i}.{single}", v[i]


def init_export(
    cfg: Config, out_dir: str | Path, max_shard_bytes: int | None = None, pieces: int = 1
) -> Path:
    """A freshly initialised model (keyed by train.seed: training's initial weights) written as an
    export, built `pieces` parts at a time (the dense part once, then n_experts/pieces experts per
    part), so no more than one part is ever held."""
    if cfg.model.n_experts % pieces:
        raise CheckpointError(f"n_experts={cfg.model.n_experts} is not divisible by {pieces} pieces")
    n_local = cfg.model.n_experts // pieces

    def parts() -> Iterator[tuple[str, torch.Tensor]]:
        for r in range(pieces):
            with torch.device("meta"):
                model = RDT(cfg.model)
            for moe in model.moe_layers():
                moe.experts.shard(r * n_local, n_local)
            model.to_empty(device="cpu")
            model.reset_parameters(cfg.train.seed)
            yield from ((k, v) for k, v in export_keys(model) if r == 0 or _expert_id(k) is not None)

    config = {"format": EXPORT_FORMAT, "step": 0, "model": to_dict(cfg.model), "init_seed": cfg.train.seed}
    return write_export(parts(), config, out_dir, max_shard_bytes)


def _replace_dir(new: Path, dest: Path) -> None:
    """dest := new. Readers see the old export, then (briefly) none, then the new one: never a mix
    of old and new files."""
    old = dest.with_name(f".{dest.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        os.replace(dest, old)
    os.replace(new, dest)
    shutil.rmtree(old, ignore_errors=True)


def exported_steps(export_dir: str | Path) -> list[int]:
    """The training steps whose weights an export holds: one, or every averaged one."""
    path = Path(export_dir) / "config.json"
    saved = read_json(path)
    try:
        return [int(n) for n in saved.get("averaged_steps", [saved["step"]])]
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(
            f"{path}: no valid 'step' / 'averaged_steps' ({e!r}); the file is corrupt"
        ) from e


def _expected_export_shapes(model_cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = RDT(model_cfg)
    shapes: dict[str, tuple[int, ...]] = {}
    for k, v in model.state_dict().items():
        prefix, _, name = k.rpartition(".experts.")
        single = dict(_EXPERT_WEIGHTS).get(name)
        if prefix and single:
            for g in range(v.shape[0]):
                shapes[f"{prefix}.experts.{g}.{single}"] = tuple(v.shape[1:])
        else:
            shapes[k] = tuple(v.shape)
    return shapes


def _check_keys(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], where: Any) -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
    if missing or unexpected or wrong:
        lines = [f"missing: {k}" for k in missing] + [f"unexpected: {k}" for k in unexpected]
        lines += [f"shape of {k}: file {found[k]}, model {expected[k]}" for k in wrong]
        raise CheckpointError(f"{where} does not match the model config:\n  " + "\n  ".join(lines))


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip


def _safetensors_header(f: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]:
    """name -> (dtype, shape, first byte, end byte) of a safetensors file, from its header only
    (8-byte length, JSON); every range is checked against the file's size."""
    try:
        size = f.stat().st_size
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if not 0 < n <= size - 8:
                raise ValueError(f"header length {n} in a file of {size} bytes")
            header = json.loads(fh.read(n))
        entries = {}
        for name, e in header.items():
            if name == "__metadata__":
                continue
            dtype, shape, (lo, hi) = _SAFETENSORS_DTYPES[e["dtype"]], tuple(e["shape"]), e["data_offsets"]
            nbytes = math.prod(shape) * dtype.itemsize
            if hi - lo != nbytes or 8 + n + hi > size:
                raise ValueError(
                    f"{name}: bytes [{lo}, {hi}) do not hold {shape} {e['dtype']} within the file"
                )
            entries[name] = (dtype, shape, 8 + n + lo, 8 + n + hi)
        return entries
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read {f}: truncated or corrupt ({e})") from e


class ExportReader:
    """An export directory (single model.safetensors, or shards + model.safetensors.index.json),
    read one tensor at a time straight from the files (no memory map): a caller that needs some
    tensors (a rank's dense part and its own experts) reads only those, and `read_into` reads a
    tensor's bytes into its destination with no copy in between. bytes_read counts what was read."""

    def __init__(self, path: str | Path):
        d = Path(path)
        if not (d / "config.json").is_file() or not (
            (d / SINGLE_FILE).is_file() or (d / INDEX_FILE).is_file()
        ):
            raise CheckpointError(
                f"{d} is not an export directory (needs config.json and {SINGLE_FILE} or {INDEX_FILE})"
            )
        saved = read_json(d / "config.json")
        if saved.get("format") != EXPORT_FORMAT:
            raise CheckpointError(
                f"{d}: unknown export format {saved.get('format')!r}, expected {EXPORT_FORMAT}"
            )
        if not isinstance(saved.get("model"), dict):
            raise CheckpointError(f"{d / 'config.json'}: no 'model' section; the file is corrupt")
        self.dir, self.saved = d, saved
        self.model_cfg = from_dict(ModelConfig, saved["model"], "model")
        if (d / INDEX_FILE).is_file():
            try:
                index = json.loads((d / INDEX_FILE).read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{d / INDEX_FILE}: not valid JSON ({e})") from e
            if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
                raise CheckpointError(f"{d / INDEX_FILE}: no weight_map")
            files = {d / f for f in index["weight_map"].values()}
            for f in sorted(files):
                if not f.is_file():
                    raise CheckpointError(f"{d / INDEX_FILE} names {f.name}, which does not exist")
        else:
            files = {d / SINGLE_FILE}
        self._where = {}  # name -> (file, dtype, shape, first byte, end byte)
        for f in sorted(files):
            self._where |= {k: (f, *e) for k, e in _safetensors_header(f).items()}
        self.names = list(self._where)
        _check_keys(_expected_export_shapes(self.model_cfg), self.shapes(), d)  # headers only
        self.bytes_read = 0

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape, from the files' headers (no tensor data is read)."""
        return {k: w[2] for k, w in self._where.items()}

    def get(self, name: str) -> torch.Tensor:
        _, dtype, shape, _, _ = self._where[name]
        out = torch.empty(shape, dtype=dtype)
        self.read_into(name, out)
        return out

    def read_into(self, name: str, out: torch.Tensor) -> None:
        """out := the tensor `name`; read into out's own memory when dtype, shape and layout allow."""
        f, dtype, shape, lo, hi = self._where[name]
        if (
            out.dtype != dtype
            or tuple(out.shape) != shape
            or not out.is_contiguous()
            or out.device.type != "cpu"
        ):
            out.copy_(self.get(name))
            return
        with open(f, "rb", buffering=0) as fh:
            fh.seek(lo)
            dest = memoryview(out.detach().reshape(-1).view(torch.uint8).numpy())
            got = fh.readinto(dest) if hi > lo else 0
        if got != hi - lo:
            raise CheckpointError(
                f"cannot read {name} from {f}: truncated or corrupt ({got} of {hi - lo} bytes)"
            )
        self.bytes_read += hi - lo


def upcycle(
    source_dir: str | Path, out_dir: str | Path, n_experts: int, max_shard_bytes: int | None = None
) -> Path:
    """Grow an export's E routed experts to E' = m·E, preserving the function at step 0.

    Each expert's hidden units are split into m experts of expert_dim/m (expert e becomes experts
    e·m .. e·m+m-1; their output weights are scaled by m), the router's gate rows and balancing
    bias are repeated (the bias divided by m) and top-k becomes m·k. A token then picks the m
    pieces of each expert it picked before, each with 1/m of that expert's renormalised weight:
    the same sum of the same hidden units. Active compute per token is unchanged. Written tensor
    by tensor; a top-1 source is refused (its unnormalised weight cannot be split so).
    """
    reader = ExportReader(source_dir)
    cfg = reader.model_cfg
    m = n_experts // cfg.n_experts
    if n_experts <= cfg.n_experts or n_experts % cfg.n_experts:
        raise CheckpointError(
            f"--n-experts {n_experts} must be a multiple > 1 of the export's {cfg.n_experts}"
        )
    if cfg.expert_dim % m:
        raise CheckpointError(f"expert_dim={cfg.expert_dim} is not divisible by the growth factor {m}")
    if cfg.n_experts_per_tok == 1:
        raise CheckpointError(
            "a top-1 source keeps its softmax weight unnormalised: it cannot be split exactly"
        )
    h = cfg.expert_dim // m

    def grown() -> Iterator[tuple[str, torch.Tensor]]:
        for name in reader.names:
            t, g = reader.get(name), _expert_id(name)
            if name.endswith(".router.gate.weight"):
                yield name, t.repeat_interleave(m, dim=0)
            elif name.endswith(".router.expert_bias"):
                yield name, t.repeat_interleave(m) / m
            elif g is None:
                yield name, t
            elif name.endswith(".w_in_DH"):  # [gate | up]: the same hidden slice of both halves
                gate, up = t.chunk(2, dim=-1)
                for j in range(m):
                    part = slice(j * h, (j + 1) * h)
                    yield (
                        _EXPERT_ID.sub(f".experts.{g * m + j}.w_in_DH", name),
                        torch.cat([gate[:, part], up[:, part]], -1),
                    )
            else:  # w_out_HD
                for j in range(m):
                    yield _EXPERT_ID.sub(f".experts.{g * m + j}.w_out_HD", name), t[j * h : (j + 1) * h] * m

    model = dict(
        reader.saved["model"], n_experts=n_experts, n_experts_per_tok=m * cfg.n_experts_per_tok, expert_dim=h
    )
    from_dict(ModelConfig, model, "model").validate()
    config = dict(
        reader.saved, model=model, upcycled_from={"dir": str(reader.dir), "n_experts": cfg.n_experts}
    )
    return write_export(grown(), config, out_dir, max_shard_bytes)


def load_shard(source: ExportReader | CheckpointTensors, ep_size: int = 1, ep_rank: int = 0) -> RDT:
    """The RDT (CPU, eval mode) holding the dense part and routed experts [r·E/ep, (r+1)·E/ep)
    only (every expert at ep_size=1), read tensor by tensor from an export or a DeepSpeed
    checkpoint: another rank's experts are neither allocated nor read. Wrap it with
    `mythos_dist.parallel.parallelize(model, ep_size)` to run it expert-parallel."""
    cfg = source.model_cfg
    if cfg.n_experts % ep_size:
        raise CheckpointError(f"n_experts={cfg.n_experts} is not divisible by ep_size={ep_size}")
    n_local = cfg.n_experts // ep_size
    first = ep_rank * n_local
    with torch.device("meta"):
        model = RDT(cfg)
    for moe in model.moe_layers():
        moe.experts.shard(first, n_local)
    model.to_empty(device="cpu")
    load_into(model, source)
    persistent = set(model.state_dict())
    for name, buf in model.named_buffers():  # counters (the router's load since the last step)
        if name not in persistent:
            buf.zero_()
    return model.eval()


def load_into(model: RDT, source: ExportReader | CheckpointTensors) -> None:
    """Copy the source's weights into `model`, the whole RDT or one rank's shard of it (before
    `parallelize`): the dense tensors and the experts it holds, read tensor by tensor."""
    diff = config_diff(to_dict(source.model_cfg), to_dict(model.cfg), "model")
    if diff:
        raise CheckpointError(
            f"{getattr(source, 'dir', source)} holds another model:\n  " + "\n  ".join(diff)
        )
    targets = model.state_dict(keep_vars=True)  # the parameters and buffers themselves
    with torch.no_grad():
        for name, moe in ((n, m) for n, m in model.named_modules() if isinstance(m, MoEFFN)):
            first = moe.experts.first_expert_id
            for stacked, single in _EXPERT_WEIGHTS:
                dest = targets.pop(f"{name}.experts.{stacked}")
                for i in range(dest.shape[0]):
                    source.read_into(f"{name}.experts.{first + i}.{single}", dest[i])
        dense = [k for k in source.names if _expert_id(k) is None]
        if set(dense) != set(targets):
            raise CheckpointError(f"{getattr(source, 'dir', source)}: dense tensors do not match the model")
        for k in dense:
            source.read_into(k, targets[k])


_EXPERT_ID = re.compile(r"\.experts\.(\d+)\.(w_in_DH|w_out_HD)$")


def _expert_id(key: str) -> int | None:
    m = _EXPERT_ID.search(key)
    return None if m is None else int(m.group(1))


def load_exported(path: str | Path, model_cfg: ModelConfig | None = None) -> RDT:
    """Full RDT (all experts, CPU, eval mode) from an export directory; no DeepSpeed involved.

    model_cfg: when given, must equal the exported config (mismatched fields are listed).
    One rank's part only: `load_shard(ExportReader(path), ep_size, ep_rank)`.
    """
    reader = ExportReader(path)
    if model_cfg is not None:
        diff = config_diff(reader.saved["model"], to_dict(model_cfg), "model")
        if diff:
            raise CheckpointError(
                f"{reader.dir} was exported with another model config:\n  " + "\n  ".join(diff)
            )
    return load_shard(reader)
