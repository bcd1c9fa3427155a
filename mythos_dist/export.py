"""The export format: framework-free safetensors weights + config.json, and reading them back.

  <export>/model.safetensors            every weight, experts keyed by global id
                                        (`<moe>.experts.<g>.w_in_DH` / `w_out_HD`); or, past a
                                        size limit, model-0000i-of-0000n.safetensors shards +
                                        model.safetensors.index.json (tensor -> file, Hugging Face)
  <export>/config.json                  {"format", "step", "model": ModelConfig, ...}

Written tensor by tensor (`write_export`, at most one shard held) from any source of (key, tensor)
pairs: a DeepSpeed checkpoint (`mythos_dist.checkpoint.export`), a fresh init tensor by
tensor (`init_export`), an upcycled export (`mythos_dist.upcycle`). Read tensor by tensor (`ExportReader`):
a rank reads only the dense part and its own experts (`load_shard`). Needs no DeepSpeed.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import save_file

from mythos_dist import comm
from mythos_dist.config import Config, ModelConfig, config_diff, from_dict, to_dict
from mythos_dist.model import RDT, init
from mythos_dist.model.moe import MoEFFN
from mythos_dist.safe_io import CheckpointError, read_json
from mythos_dist.weight_names import EXPERT_WEIGHTS

EXPORT_FORMAT = "mythos-rdt/1"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"  # with shards: tensor name -> file (Hugging Face layout)
_EXPERT_ID = re.compile(r"\.experts\.(\d+)\.(w_in_DH|w_out_HD)$")


def expert_id(key: str) -> int | None:
    """The global expert id of an export key, None for a dense tensor."""
    m = _EXPERT_ID.search(key)
    return None if m is None else int(m.group(1))


def rank_of_tensor(name: str, n_experts: int, ranks: int) -> int | None:
    """Which of `ranks` ranks holding contiguous blocks of routed experts by global id holds export
    key `name` (expert g: rank g·ranks // n_experts; at ranks = ep_size, `load_shard`'s
    [r·E/ep, (r+1)·E/ep)); None for a dense tensor, which every rank holds."""
    g = expert_id(name)
    return None if g is None else g * ranks // n_experts


class TensorSource(Protocol):
    """Weights in export form, read one tensor at a time: an `ExportReader` or a DeepSpeed
    checkpoint (`mythos_dist.checkpoint.CheckpointTensors`)."""

    model_cfg: ModelConfig
    names: list[str]

    def get(self, name: str) -> torch.Tensor: ...

    def read_into(self, name: str, out: torch.Tensor) -> None: ...


class _ShardWriter:
    """Writes tensors into safetensors shards of at most max_bytes each (a tensor larger than that
    gets a shard of its own), holding at most one shard in memory. Files are `<stem>-<i>.tmp` until
    `_name_shards` names them."""

    def __init__(self, out: Path, max_bytes: int | None, stem: str = "shard"):
        self.out, self.max_bytes, self.stem = out, max_bytes, stem
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[tuple[str, list[str]]] = []  # (temporary file name, tensor names)
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.max_bytes is not None and self.pending and self.pending_bytes + size > self.max_bytes:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        file = f"{self.stem}-{len(self.shards)}.tmp"
        save_file(self.pending, str(self.out / file), metadata={"format": EXPORT_FORMAT})
        self.shards.append((file, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> list[tuple[str, list[str]]]:
        if self.pending:
            self._flush()
        return self.shards


def _name_shards(out: Path, shards: list[tuple[str, list[str]]], total_bytes: int, single: bool) -> None:
    """Name the written shards: model.safetensors alone (single, one shard), or
    model-0000i-of-0000n.safetensors + the index (tensor -> file, Hugging Face layout)."""
    n = len(shards)
    if single and n == 1:
        os.replace(out / shards[0][0], out / SINGLE_FILE)
        return
    weight_map = {}
    for i, (tmp, names) in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        os.replace(out / tmp, out / file)
        weight_map |= dict.fromkeys(names, file)
    index = {"metadata": {"total_size": total_bytes, "format": EXPORT_FORMAT}, "weight_map": weight_map}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=1))


def _refuse_non_export(out: Path) -> None:
    if out.is_dir() and any(out.iterdir()) and not (out / "config.json").is_file():
        raise CheckpointError(f"{out} exists and is not an export directory: refusing to replace it")


def write_export(
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    config: dict[str, Any],
    out_dir: str | Path,
    max_shard_bytes: int | None = None,
) -> Path:
    """Write an export directory from (export key, tensor) pairs consumed one at a time, and its
    config.json; out_dir is replaced as a whole once complete (a non-export dir is refused)."""
    out = Path(out_dir)
    _refuse_non_export(out)
    partial = out.with_name(f".{out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)  # left by an interrupted export
    partial.mkdir(parents=True)
    writer = _ShardWriter(partial, max_shard_bytes)
    for name, tensor in named_tensors:
        writer.add(name, tensor)
    shards = writer.finish()
    _name_shards(partial, shards, writer.total_bytes, single=True)
    (partial / "config.json").write_text(json.dumps(config, indent=1))
    replace_dir(partial, out)
    return out


def write_export_across_ranks(
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    config: dict[str, Any],
    out_dir: str | Path,
    max_shard_bytes: int | None = None,
) -> Path:
    """Collective `write_export`: every rank of the process group writes the shards of its own
    (key, tensor) pairs into one directory all ranks see; rank 0 then names them (in rank order),
    writes the index and config.json and replaces out_dir as a whole. A failure on any rank (bad
    file, full disk) makes every rank raise after the step it is in, with the partial directory
    removed and out_dir untouched: no rank waits for one that gave up.

    Long on purpose: each collective step and its agreement on failure must be seen in order.
    """
    out, r = Path(out_dir), comm.rank()
    partial = out.with_name(f".{out.name}.partial")

    def agree(error: BaseException | None, what: str) -> None:
        failed = comm.all_reduce_host(
            torch.tensor([float(error is not None)]), torch.distributed.ReduceOp.MAX
        )
        if not failed.item():
            return
        comm.barrier()
        if r == 0:
            shutil.rmtree(partial, ignore_errors=True)
        if error is not None:
            raise error
        raise CheckpointError(f"exporting to {out} failed on another rank while {what}; {out} is unchanged")

    error: BaseException | None = None
    if r == 0:
        try:
            _refuse_non_export(out)
            shutil.rmtree(partial, ignore_errors=True)  # left by an interrupted export
            partial.mkdir(parents=True)
        except (CheckpointError, OSError) as e:
            error = e
    agree(error, "preparing")
    shards: list[tuple[str, list[str]]] = []
    total = 0
    try:
        writer = _ShardWriter(partial, max_shard_bytes, stem=f"rank{r}")
        for name, tensor in named_tensors:
            writer.add(name, tensor)
        shards, total = writer.finish(), writer.total_bytes
    except Exception as e:  # any failure: the others must not wait for this rank
        error = e
    agree(error, "writing its shards")
    gathered: list[Any] = [None] * comm.world_size()
    torch.distributed.all_gather_object(gathered, (shards, total))
    if r == 0:
        try:
            _name_shards(
                partial,
                [s for ranks, _ in gathered for s in ranks],
                sum(t for _, t in gathered),
                single=False,
            )
            (partial / "config.json").write_text(json.dumps(config, indent=1))
            replace_dir(partial, out)
        except OSError as e:
            error = e
    agree(error, "naming the shards")
    return out


def export_keys(model: RDT) -> Iterator[tuple[str, torch.Tensor]]:
    """(export key, tensor) of a model or one rank's shard of it: stacked local experts become one
    entry per global id."""
    for k, v in model.state_dict().items():
        prefix, _, name = k.rpartition(".experts.")
        single = dict(EXPERT_WEIGHTS).get(name)
        if not (prefix and single):
            yield k, v
            continue
        first = model.get_submodule(f"{prefix}.experts").first_expert_id
        for i in range(v.shape[0]):
            yield f"{prefix}.experts.{first + i}.{single}", v[i]


def init_export(cfg: Config, out_dir: str | Path, max_shard_bytes: int | None = None) -> Path:
    """A freshly initialised model (keyed by train.seed: training's initial weights) written as an
    export one tensor at a time: the model stays on the meta device and only the tensor being
    written is materialised and initialised (`RDT.reset_parameters` skips meta tensors), each
    routed expert on its own. Memory: one shard plus one tensor, never a part of the model."""
    from mythos_dist.model.moe import GroupedExperts

    seed = cfg.train.seed
    with torch.device("meta"):
        model = RDT(cfg.model)

    def initialised(module: torch.nn.Module, leaf: str) -> torch.Tensor:
        """module.<leaf> materialised on the CPU and initialised, then returned to the meta device."""
        meta = getattr(module, leaf)
        cpu = torch.empty_like(meta, device="cpu")
        if isinstance(meta, torch.nn.Parameter):
            setattr(module, leaf, torch.nn.Parameter(cpu, requires_grad=meta.requires_grad))
        else:
            module._buffers[leaf] = cpu
        model.reset_parameters(seed)
        if isinstance(meta, torch.nn.Parameter):
            setattr(module, leaf, meta)
        else:
            module._buffers[leaf] = meta
        return cpu

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for name in model.state_dict():  # the order `export_keys` writes
            prefix, _, leaf = name.rpartition(".")
            module = model.get_submodule(prefix)
            if not isinstance(module, GroupedExperts):
                yield name, initialised(module, leaf)
                continue
            moe = model.get_submodule(prefix.rpartition(".")[0])
            stack = module
            for g in range(cfg.model.n_experts):  # global expert g alone, keyed by its id
                with torch.device("meta"):
                    moe.experts = GroupedExperts(cfg.model.dim, stack.hidden, 1, g)
                single = dict(EXPERT_WEIGHTS)[leaf]
                yield f"{prefix}.{g}.{single}", initialised(moe.experts, leaf)[0]
            moe.experts = stack

    config = {"format": EXPORT_FORMAT, "step": 0, "model": to_dict(cfg.model), "init_seed": seed}
    return write_export(tensors(), config, out_dir, max_shard_bytes)


def replace_dir(new: Path, dest: Path) -> None:
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


def expected_shapes(model_cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = RDT(model_cfg)
    shapes: dict[str, tuple[int, ...]] = {}
    for k, v in model.state_dict().items():
        prefix, _, name = k.rpartition(".experts.")
        single = dict(EXPERT_WEIGHTS).get(name)
        if prefix and single:
            for g in range(v.shape[0]):
                shapes[f"{prefix}.experts.{g}.{single}"] = tuple(v.shape[1:])
        else:
            shapes[k] = tuple(v.shape)
    return shapes


def check_keys(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], where: Any) -> None:
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

    def __init__(self, path: str | Path, shard: tuple[int, int] | None = None):
        """shard (ep_size, ep_rank): only the tensors that rank holds (`rank_of_tensor`) are indexed, and
        only the files holding them need to exist (e.g. a per-rank download)."""
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
        if shard is not None and self.model_cfg.n_experts % shard[0]:
            raise CheckpointError(
                f"{d}: n_experts={self.model_cfg.n_experts} is not divisible by ep_size={shard[0]}"
            )
        if (d / INDEX_FILE).is_file():
            try:
                index = json.loads((d / INDEX_FILE).read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{d / INDEX_FILE}: not valid JSON ({e})") from e
            if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
                raise CheckpointError(f"{d / INDEX_FILE}: no weight_map")
            wanted = {k: f for k, f in index["weight_map"].items() if shard is None or self._holds(k, shard)}
            files = {d / f for f in wanted.values()}
            for f in sorted(files):
                if not f.is_file():
                    raise CheckpointError(f"{d / INDEX_FILE} names {f.name}, which does not exist")
        else:
            files = {d / SINGLE_FILE}
        self._where = {}  # name -> (file, dtype, shape, first byte, end byte)
        for f in sorted(files):
            self._where |= {
                k: (f, *e)
                for k, e in _safetensors_header(f).items()
                if shard is None or self._holds(k, shard)
            }
        self.names = list(self._where)
        expected = expected_shapes(self.model_cfg)
        if shard is not None:
            expected = {k: v for k, v in expected.items() if self._holds(k, shard)}
        check_keys(expected, self.shapes(), d)  # headers only
        self.bytes_read = 0

    def _holds(self, name: str, shard: tuple[int, int]) -> bool:
        return rank_of_tensor(name, self.model_cfg.n_experts, shard[0]) in (None, shard[1])

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


def load_shard(source: TensorSource, ep_size: int = 1, ep_rank: int = 0) -> RDT:
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
    init.materialize(model, "cpu")
    load_into(model, source)
    persistent = set(model.state_dict())
    for name, buf in model.named_buffers():  # counters (the router's load since the last step)
        if name not in persistent:
            buf.zero_()
    return model.eval()


def load_into(model: RDT, source: TensorSource) -> None:
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
            for stacked, single in EXPERT_WEIGHTS:
                dest = targets.pop(f"{name}.experts.{stacked}")
                for i in range(dest.shape[0]):
                    source.read_into(f"{name}.experts.{first + i}.{single}", dest[i])
        dense = [k for k in source.names if expert_id(k) is None]
        if set(dense) != set(targets):
            raise CheckpointError(f"{getattr(source, 'dir', source)}: dense tensors do not match the model")
        for k in dense:
            source.read_into(k, targets[k])


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
