"""Typed configuration: one dataclass per component, nested under `Config`.

`load_config(path, overrides)` reads YAML, applies `section.key=value` overrides and validates
everything (types, unknown keys with close-match suggestions, cross-field rules) before any
process group or file is touched. Errors are `ConfigError` naming the offending field.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

# The model's sections live beside the model; they are part of this config (nested in Config).
from mythos_dist.model.config import ConfigError, LoopPolicyConfig, ModelConfig, require


def parse_size(text: str) -> int:
    """'2GB' / '500MB' / '64KiB' / '1024' -> bytes (decimal units, as Hugging Face's max_shard_size)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", text.upper().replace("IB", "iB"))
    if m is None:
        raise ConfigError(f"not a size: {text!r} (e.g. 2GB, 500MB, 1048576)")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** " KMGT".index(m.group(2) or " "))


@dataclass
class TaskConfig:
    """The digit-chain task: digits d_1..d_n, EQ, answer (Σ d_i) mod `modulus`."""

    modulus: int = 7
    train_lengths: tuple[int, int] = (2, 12)
    # split name -> inclusive chain-length range
    eval_splits: dict[str, tuple[int, int]] = field(
        default_factory=lambda: {"id": (2, 12), "ood1": (13, 24), "ood2": (25, 48)}
    )
    n_train: int = 200_000
    n_eval: int = 2_000  # per split
    seed: int = 1234  # train chains
    # Every eval split is drawn twice, with its own seed each: the validation set, for every choice
    # of recipe, step count or averaging window, and the test set, for reported numbers only.
    # val_seed 1234 draws the samples every evaluation before the split into val/test read.
    val_seed: int = 1234
    test_seed: int = 4321

    def max_length(self) -> int:
        return max([self.train_lengths[1], *(hi for _, hi in self.eval_splits.values())])

    def validate(self, prefix: str = "data.task") -> None:
        require(2 <= self.modulus <= 10, f"{prefix}.modulus", "must be in [2, 10] (answers are digit tokens)")
        ranges = {"train_lengths": self.train_lengths} | {
            f"eval_splits.{k}": v for k, v in self.eval_splits.items()
        }
        for name, (lo, hi) in ranges.items():
            require(1 <= lo <= hi, f"{prefix}.{name}", f"needs 1 ≤ lo ≤ hi, got [{lo}, {hi}]")
        require(self.n_train >= 1, f"{prefix}.n_train", "must be ≥ 1")
        require(self.n_eval >= 1, f"{prefix}.n_eval", "must be ≥ 1")
        require(len(self.eval_splits) >= 1, f"{prefix}.eval_splits", "needs at least one split")
        require(
            self.val_seed != self.test_seed,
            f"{prefix}.test_seed",
            f"must differ from val_seed ({self.val_seed}): the test set is drawn apart from the validation set",
        )
        for name in self.eval_splits:  # split names become shard directory names
            require(
                name != "train" and name.isascii() and name.replace("_", "").replace("-", "").isalnum(),
                f"{prefix}.eval_splits.{name}",
                "split names must be letters, digits, '_' or '-', and not 'train'",
            )


@dataclass
class DataConfig:
    """Where shards live and how they are streamed."""

    task: TaskConfig = field(default_factory=TaskConfig)
    remote: str = "runs/data/shards"  # shared path or object-store URL holding the MDS shards
    local: str = ""  # per-node cache; "" -> a directory under $TMPDIR keyed by the run
    samples_per_shard: int = 20_000
    build_workers: int = 2
    num_workers: int = 1  # DataLoader worker processes per rank
    num_canonical_nodes: int = 1  # fixed so sample order does not depend on the node count
    shuffle_seed: int = 17
    predownload: int = 0  # 0: streaming's default

    def validate(self, prefix: str = "data") -> None:
        self.task.validate(f"{prefix}.task")
        require(bool(self.remote), f"{prefix}.remote", "must name the shard directory or URL")
        require(self.samples_per_shard >= 1, f"{prefix}.samples_per_shard", "must be ≥ 1")
        require(self.build_workers >= 1, f"{prefix}.build_workers", "must be ≥ 1")
        require(self.num_workers >= 0, f"{prefix}.num_workers", "must be ≥ 0")
        require(self.num_canonical_nodes >= 1, f"{prefix}.num_canonical_nodes", "must be ≥ 1")


@dataclass
class TrainConfig:
    steps: int = 1500
    micro_batch_size: int = 64  # per rank
    grad_accum_steps: int = 1
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0  # explicit: DeepSpeed's default would silently be 1.0 too
    dtype: Literal["fp32", "bf16"] = "fp32"
    seed: int = 0
    log_every: int = 20
    max_nonfinite_steps: int = 5  # skipped steps (non-finite loss/grad) in a row before stopping
    loops: LoopPolicyConfig = field(default_factory=LoopPolicyConfig)
    # Which chains count in a step's loss (the others are still in the batch, weight 0):
    # reachable_only: only chains whose first digit lies within the answer position's receptive
    # field at the step's loop count (needs model.attn_window > 0), so no step asks for an answer
    # the model cannot see; length_curriculum_steps: the longest counted chain grows linearly from
    # the shortest train length + 1 to the longest over these steps (0 = all lengths from the start).
    # length_curriculum_mode: how chains past the cap are kept out: "mask" (weight 0 in the loss) or
    # "crop" (cut to a prefix of a length drawn uniformly up to the cap, answer recomputed, so every
    # chain of the batch counts and early steps are shorter).
    reachable_only: bool = False
    length_curriculum_steps: int = 0
    length_curriculum_mode: Literal["mask", "crop"] = "mask"
    # Attention windows drawn per step, uniformly from this list (repeat a value to weight it), as
    # a pure function of (seed, step); empty = model.attn_window at every step. Evaluation always
    # uses model.attn_window. A narrower window makes chains of the same length need more loops,
    # so steps with it train the loop map to keep carrying information at later loops.
    attn_windows: tuple[int, ...] = ()
    # Draw those windows only before this step, model.attn_window alone from it on (0: draw at every
    # step): the end of the cosine then trains the map at the window evaluation uses.
    attn_windows_until: int = 0
    # "loop": each loop iteration's activations are recomputed in backward instead of kept, so a
    # step's activation memory grows with the loop count only by the (tokens, dim) loop state.
    # Same losses and gradients as "none"; costs about one more forward of the looped block.
    activation_checkpointing: Literal["none", "loop"] = "none"
    # An export directory to start from instead of the seeded init (e.g. an upcycled model); each
    # rank reads only its part. A resumed run continues from its checkpoint as always.
    init_from: str = ""

    def validate(self, prefix: str = "train") -> None:
        for name in ("steps", "micro_batch_size", "grad_accum_steps", "log_every", "max_nonfinite_steps"):
            require(getattr(self, name) >= 1, f"{prefix}.{name}", f"must be ≥ 1, got {getattr(self, name)}")
        require(self.lr > 0, f"{prefix}.lr", "must be > 0")
        require(0 <= self.min_lr_ratio <= 1, f"{prefix}.min_lr_ratio", "must be in [0, 1]")
        require(0 <= self.warmup_steps <= self.steps, f"{prefix}.warmup_steps", "must be in [0, steps]")
        require(self.grad_clip >= 0, f"{prefix}.grad_clip", "must be ≥ 0 (0 disables)")
        require(
            self.length_curriculum_steps >= 0, f"{prefix}.length_curriculum_steps", "must be ≥ 0 (0 = off)"
        )
        require(
            self.length_curriculum_mode == "mask" or self.length_curriculum_steps > 0,
            f"{prefix}.length_curriculum_mode",
            "'crop' needs train.length_curriculum_steps > 0 (there is no cap to crop to)",
        )
        require(
            all(w >= 2 for w in self.attn_windows),
            f"{prefix}.attn_windows",
            f"every window must be ≥ 2 (a token and the one before it), got {self.attn_windows}",
        )
        require(self.attn_windows_until >= 0, f"{prefix}.attn_windows_until", "must be ≥ 0 (0 = every step)")
        require(
            not self.attn_windows_until or self.attn_windows,
            f"{prefix}.attn_windows_until",
            "needs train.attn_windows (there are no windows to stop drawing)",
        )
        self.loops.validate(f"{prefix}.loops")
        if self.init_from:
            require(
                (Path(self.init_from) / "config.json").is_file(),
                f"{prefix}.init_from",
                f"{self.init_from} is not an export directory (no config.json)",
            )


@dataclass
class ParallelConfig:
    ep_size: int = 1
    # How the expert-parallel all-to-all learns its sizes: "exact" reads them to the host once per
    # MoE layer use and sends only the real rows; "padded" reads only the ranks' token counts, once
    # per forward (fixed buffers of the dropless worst case, ep_size·min(k, L)/k times the rows; for
    # devices where a host sync per loop costs more than the bytes). Same results (model/dispatch.py).
    ep_dispatch: Literal["exact", "padded"] = "exact"
    # How its bytes travel: "auto" = Unix sockets between the ranks of an EP group that all run on
    # this host on gloo (≈ 5× less latency per call than gloo's, mythos_dist/ep_transport.py), else
    # the process group; "process_group" = always the process group. Bit-identical results.
    ep_transport: Literal["auto", "process_group"] = "auto"
    zero_stage: int = 1
    timeout_s: float = 120.0  # collective timeout: a dead rank fails the others within this bound
    ds_config_override: dict[str, Any] = field(default_factory=dict)  # merged last, logged

    def validate(self, prefix: str = "parallel") -> None:
        require(self.ep_size >= 1, f"{prefix}.ep_size", "must be ≥ 1")
        require(
            self.ep_dispatch in ("exact", "padded"),
            f"{prefix}.ep_dispatch",
            f"must be 'exact' or 'padded', got {self.ep_dispatch!r}",
        )
        require(
            self.ep_transport in ("auto", "process_group"),
            f"{prefix}.ep_transport",
            f"must be 'auto' or 'process_group', got {self.ep_transport!r}",
        )
        require(
            self.zero_stage in (0, 1, 2, 3), f"{prefix}.zero_stage", f"must be 0-3, got {self.zero_stage}"
        )
        require(self.timeout_s > 0, f"{prefix}.timeout_s", "must be > 0")


@dataclass
class CheckpointConfig:
    dir: str = "runs/digit_chain/checkpoints"
    every: int = 500  # steps; 0 = only at the end
    keep_last: int = 2
    resume: bool = True  # resume from `latest` in dir when present
    # The export (what evaluation loads) holds the mean of the weights of the last `average_last`
    # checkpoints, the final one included; 1 = the final weights.
    average_last: int = 1
    # The export is one model.safetensors, or shards of at most this size + an index (HF layout).
    max_shard_size: str = "2GB"

    def validate(self, prefix: str = "checkpoint") -> None:
        require(bool(self.dir), f"{prefix}.dir", "must be set")
        require(self.every >= 0, f"{prefix}.every", "must be ≥ 0")
        require(self.keep_last >= 1, f"{prefix}.keep_last", "must be ≥ 1")
        require(self.average_last >= 1, f"{prefix}.average_last", "must be ≥ 1")
        try:
            shard_bytes = parse_size(self.max_shard_size)
        except ValueError as e:
            raise ConfigError(f"{prefix}.max_shard_size: {e}") from None
        require(shard_bytes > 0, f"{prefix}.max_shard_size", f"must be > 0, got {self.max_shard_size!r}")
        require(
            self.average_last <= self.keep_last,
            f"{prefix}.average_last",
            f"{self.average_last} checkpoints to average, but keep_last={self.keep_last} retains fewer",
        )

    def n_saved(self, steps: int) -> int:
        """How many checkpoints a run of `steps` steps writes: every `every` steps, and at the end."""
        return (steps - 1) // self.every + 1 if self.every else 1


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str = "sqlite:///runs/mlflow.db"  # MLFLOW_TRACKING_URI overrides
    experiment: str = "digit-chain"
    run_name: str = ""
    # Logging runs in a background thread: start() waits this long for the run to exist, finish()
    # for the backlog; a server that hangs never stalls training longer.
    timeout_s: float = 10.0
    buffer: int = 10000  # logging calls held while the server is away; then the oldest metrics go
    # MLflow's system metrics (CPU, memory, GPU where present), one series per node, every interval
    system_metrics: bool = False
    system_metrics_interval_s: float = 10.0
    registered_model: str = ""  # set: each export becomes a new version of this registered model

    def validate(self, prefix: str = "tracking") -> None:
        require(bool(self.experiment), f"{prefix}.experiment", "must be set")
        require(self.timeout_s > 0, f"{prefix}.timeout_s", "must be > 0")
        require(self.buffer >= 1, f"{prefix}.buffer", "must be ≥ 1")
        require(self.system_metrics_interval_s > 0, f"{prefix}.system_metrics_interval_s", "must be > 0")


@dataclass
class EvalConfig:
    loops: tuple[int, ...] = (1, 2, 4, 6, 8, 12, 16)
    splits: tuple[str, ...] = ("id", "ood1", "ood2")
    n_samples: int = 2000  # per split
    batch_size: int = 256
    out_dir: str = "runs/digit_chain/eval"
    # Which held-out set of every split to evaluate on: "test" for reported numbers, "val" for every
    # choice made from evaluations (recipe, step count, averaging window, loop threshold).
    heldout: str = "test"
    # Also evaluate with the loop count each sample picks itself (`mythos eval --loops auto`): it
    # stops once max over its tokens of ‖h_t − h_{t−1}‖ / ‖h_t‖ < auto_threshold (after at least
    # auto_min_loops), at most auto_max_loops loops; the loops used per sample go in the store.
    auto: bool = False
    auto_threshold: float = 0.01
    auto_min_loops: int = 1
    auto_max_loops: int = 32
    # The spectral report's Jacobian-vector products in blocks of at most this many samples: memory
    # of one block's autograd graph instead of all samples', at 5-6× the report's time (the 1B
    # config, docs/scale.md). The report takes at most 64 samples: 64 is one block, one graph
    # kept. Lower it for models whose activations are large beside the weights (configs/scales/).
    spectral_batch_size: int = 64

    def validate(self, prefix: str = "eval") -> None:
        require(
            self.heldout in ("val", "test"),
            f"{prefix}.heldout",
            f"must be 'val' (choosing) or 'test' (reporting), got {self.heldout!r}",
        )
        require(
            isinstance(self.auto_threshold, (int, float)) and 0 < self.auto_threshold < float("inf"),
            f"{prefix}.auto_threshold",
            f"must be a number > 0, got {self.auto_threshold!r}",
        )
        require(
            1 <= self.auto_min_loops <= self.auto_max_loops,
            f"{prefix}.auto_min_loops",
            f"needs 1 ≤ auto_min_loops ≤ auto_max_loops, got {self.auto_min_loops} and {self.auto_max_loops}",
        )
        require(len(self.loops) >= 1, f"{prefix}.loops", "needs at least one loop count")
        for n in self.loops:
            require(
                isinstance(n, int) and not isinstance(n, bool) and n >= 1,
                f"{prefix}.loops",
                f"loop counts must be integers ≥ 1, got {n!r}",
            )
        require(self.n_samples >= 1, f"{prefix}.n_samples", "must be ≥ 1")
        require(self.spectral_batch_size >= 1, f"{prefix}.spectral_batch_size", "must be ≥ 1")
        require(self.batch_size >= 1, f"{prefix}.batch_size", "must be ≥ 1")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self, world_size: int | None = None) -> Config:
        """Check every section and the rules that span sections. Returns self.

        Long on purpose: one flat list of cross-section rules, each a few lines, read top to bottom.
        """
        self.model.validate()
        self.data.validate()
        self.train.validate()
        self.parallel.validate()
        self.checkpoint.validate()
        self.tracking.validate()
        self.eval.validate()
        m, par = self.model, self.parallel
        require(
            m.n_experts % par.ep_size == 0,
            "parallel.ep_size",
            f"n_experts={m.n_experts} is not divisible by ep_size={par.ep_size}",
        )
        require(
            par.zero_stage != 3,
            "parallel.zero_stage",
            "ZeRO stage 3 is not supported with MoE layers (DeepSpeed refuses native MoE under "
            "stage 3); use stage 1 or 2",
        )
        longest = self.data.task.max_length() + 1  # digits + EQ; the answer is predicted, not fed
        require(
            m.max_seq_len >= longest,
            "model.max_seq_len",
            f"{m.max_seq_len} is below the longest chain's input ({longest} tokens incl. EQ)",
        )
        require(
            not self.train.reachable_only or m.attn_window > 0,
            "train.reachable_only",
            "needs model.attn_window > 0 (with full attention every chain is within reach)",
        )
        require(
            not self.train.attn_windows or m.attn_window > 0,
            "train.attn_windows",
            "needs model.attn_window > 0 (the window evaluation uses; full attention has none)",
        )
        ck = self.checkpoint
        require(
            ck.average_last <= ck.n_saved(self.train.steps),
            "checkpoint.average_last",
            f"{ck.average_last} checkpoints to average, but a run of train.steps={self.train.steps} with "
            f"checkpoint.every={ck.every} writes {ck.n_saved(self.train.steps)}",
        )
        require(m.vocab_size >= 12, "model.vocab_size", "digit chains need ≥ 12 tokens (0-9, EQ, PAD)")
        unknown = set(self.eval.splits) - set(self.data.task.eval_splits)
        require(
            not unknown,
            "eval.splits",
            f"unknown split(s) {sorted(unknown)}; configured: {sorted(self.data.task.eval_splits)}",
        )
        if self.train.init_from:  # the export must hold this model (one JSON read, no weights)
            import json

            saved = json.loads((Path(self.train.init_from) / "config.json").read_text()).get("model", {})
            here = json.loads(json.dumps(to_dict(m)))  # tuples as JSON has them
            diff = [
                f"model.{k}: export {saved.get(k)!r}, this run {here[k]!r}"
                for k in here
                if saved.get(k) != here[k]
            ]
            require(
                not diff, "train.init_from", f"{self.train.init_from} holds another model: " + "; ".join(diff)
            )
        if world_size is not None:
            require(
                world_size % par.ep_size == 0,
                "parallel.ep_size",
                f"world size {world_size} is not divisible by ep_size={par.ep_size}",
            )
        return self


# --------------------------------------------------------------------------- (de)serialisation


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML value to the annotated type, or raise ConfigError naming `where`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for section {tp.__name__}, got {value!r}")
        return from_dict(tp, value, where)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: must be one of {list(args)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {value!r} matches none of {[_type_name(a) for a in args]}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        kt, vt = args
        return {_coerce(k, kt, where): _coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported field type {tp}")


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass `cls` from a mapping; unknown keys get a close-match suggestion."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(names)})"
            raise ConfigError(f"{path}: unknown key{hint}")
        kwargs[key] = _coerce(value, hints[key], path)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) suitable for YAML/JSON."""

    def plain(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(dataclasses.asdict(cfg))


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}, for MLflow params."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` strings (value parsed as YAML) to a raw config mapping."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected section.key=value")
        dotted, text = item.split("=", 1)
        keys = dotted.strip().split(".")
        node = raw
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {k} is not a section")
        node[keys[-1]] = yaml.safe_load(text)
    return raw


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_config_file(path: str | Path, _including: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config file's raw mapping. `base: other.yaml` (relative to the file) starts from that file:
    mappings merge key by key, every other value (lists included) replaces the base's."""
    p = Path(path)
    where = f" (the base of {_including[-1]})" if _including else ""
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}{where}")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: top level must be a mapping of sections")
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ConfigError(f"{p}: base must be the path of another config file, got {base!r}")
    chain = (*_including, p.resolve())
    base_path = (p.parent / base).resolve()
    if base_path in chain:
        raise ConfigError(f"{p}: base {base} includes itself: " + " -> ".join(map(str, (*chain, base_path))))
    return _merge(read_config_file(base_path, chain), raw)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """YAML file (optional, with its `base` chain) + overrides -> validated Config."""
    raw = read_config_file(path) if path is not None else {}
    raw = apply_overrides(raw, overrides or [])
    return from_dict(Config, raw).validate()


def config_diff(saved: dict[str, Any], current: dict[str, Any], prefix: str) -> list[str]:
    """['model.dim: checkpoint 32, this run 64', ...] for every differing key."""
    keys = sorted(set(saved) | set(current))
    return [
        f"{prefix}.{k}: checkpoint {saved.get(k, '<absent>')!r}, this run {current.get(k, '<absent>')!r}"
        for k in keys
        if saved.get(k) != current.get(k)
    ]


# Settings a resumed run may change: its length and logging, activation recomputation, where the
