"""Memory planner: the bytes one rank of a training job holds, worked out without allocating.

Arithmetic over the model built on the meta device and the DeepSpeed layout (0.19, ZeRO 0-2,
torch AdamW, expert parallelism). Per rank, with P = dense parameters + this rank's
n_experts/ep_size routed experts and p = its ZeRO partition of them (dense groups split over all
W ranks, expert groups over the W/ep_size ranks holding the same experts):

  parameters    P in the training dtype
  gradients     ZeRO-0/1: P in the training dtype (ZeRO-1 also turns its partition into an fp32
                copy at the step); ZeRO-2: p, plus the reduce bucket (reduce_bucket_size elements;
                on CPU only the part the parameters fill is ever touched)
  optimizer     ZeRO-1/2: DeepSpeed's fp32 master copy of p (kept even when training in fp32) and
                AdamW's two fp32 moments of p; ZeRO-0: the moments of P (bf16: plus an fp32 master)
  step          temporaries while the optimizer steps one group at a time: ZeRO-1/2 flatten its
                gradient partition into a new tensor (+ an fp32 copy in bf16), AdamW makes two fp32
                tensors of its size
  activations   per micro batch (micro_batch_size × seq_len tokens, at the most loops a step draws):
                every tensor autograd saves (but the parameters), counted by running the model's
                forward on the meta device, plus backward's working set (one loop iteration's worth);
                with train.activation_checkpointing=loop, what is saved outside the iterations
                (incl. their (tokens, dim) inputs), one iteration recomputed, and that working set

A step's peak is everything but activations and step temporaries, plus the larger of those two;
the job's peak is the larger of that and the engine build's (flattening a group copies it once).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from mythos_dist.config import Config, ConfigError, ModelConfig, load_config
from mythos_dist.model import RDT, softmax
from mythos_dist.model.attention import _SMALL_ATTENTION
from mythos_dist.model.moe import GroupedExperts
from mythos_dist.optim import decays

GiB = 2**30
FP32 = 4
DEFAULT_REDUCE_BUCKET = 500_000_000  # DeepSpeed's zero_optimization.reduce_bucket_size (elements)
ALIGNMENT = 2  # DeepSpeed's nccl_start_alignment_factor: each group is padded to 2·(ranks) elements


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per rank (counts where named so)."""

    world_size: int
    ep_size: int
    zero_stage: int
    dtype: str
    device_type: str
    micro_batch_size: int
    seq_len: int
    n_loops: int  # the most loops a step draws
    grad_loops: int  # of those, how many backprop runs through
    dense_numel: int
    local_expert_numel: int
    partition_numel: int
    largest_group_numel: int  # this rank's largest optimizer group, before partitioning
    params: int
    grads: int
    grad_bucket: int
    master: int
    moments: int
    step_temporaries: int
    activations: int  # per micro batch, activation_checkpointing=none
    activations_checkpointed: int  # per micro batch, activation_checkpointing=loop

    @property
    def optimizer(self) -> int:
        return self.master + self.moments

    @property
    def engine_built(self) -> int:
        """Peak while DeepSpeed builds its engine: it flattens one group at a time into a new buffer
        (the module's tensors become views of it) and clones its fp32 master partition."""
        return self.params + self.master + self.largest_group_numel * _elem_bytes(self.dtype)

    @property
    def static(self) -> int:
        """Held through the whole step once the optimizer has stepped once."""
        return self.params + self.grads + self.grad_bucket + self.master + self.moments

    def total(self, checkpointing: bool) -> int:
        """Peak of a training step."""
        act = self.activations_checkpointed if checkpointing else self.activations
        return self.static + max(act, self.step_temporaries)

    def peak(self, checkpointing: bool) -> int:
        """Peak of the job: building the engine or a training step, whichever is higher."""
        return max(self.engine_built, self.total(checkpointing))


def _elem_bytes(dtype: str) -> int:
    return 2 if dtype == "bf16" else FP32


def parse_bytes(text: str) -> int:
    """'80GB', '80GiB', '24 G', '1.5TB' -> bytes (powers of 2: GB = GiB, as device memory is quoted)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B)?\s*", text, re.IGNORECASE)
    if m is None:
        raise ConfigError(f"--device-mem {text!r}: expected a size such as 80GB, 24GiB or 512MB")
    return int(float(m.group(1)) * 1024 ** "KMGT".find(m.group(2).upper()) * (1024 if m.group(2) else 1))


def _reduce_bucket(cfg: Config) -> int:
    zero = cfg.parallel.ds_config_override.get("zero_optimization", {})
    return int(float(zero.get("reduce_bucket_size", DEFAULT_REDUCE_BUCKET)))


def _param_groups(model: RDT, ep_size: int) -> dict[tuple[bool, bool], list[int]]:
    """numel of every parameter, by (is routed expert, has weight decay) as DeepSpeed groups them."""
    experts = {id(p) for m in model.modules() if isinstance(m, GroupedExperts) for p in m.parameters()}
    groups: dict[tuple[bool, bool], list[int]] = {}
    for name, p in model.named_parameters():
        decay = decays(name, p)
        is_expert = id(p) in experts
        groups.setdefault((is_expert, decay), []).append(p.numel() // (ep_size if is_expert else 1))
    return groups


def _partition(numels: list[int], dp: int, elem_bytes: int) -> int:
    """This rank's share of one flattened group (DeepSpeed pads each parameter to 16 bytes and the
    group to a multiple of ALIGNMENT·dp elements)."""
    align = 16 // math.gcd(16, elem_bytes)
    padded = sum(n + (-n) % align for n in numels)
    return math.ceil(padded / (ALIGNMENT * dp)) * ALIGNMENT


# --------------------------------------------------------------------------- activations


class _SavedLikeFlashAttention(torch.autograd.Function):
    """Meta-device stand-in for SDPA that saves what torch's fused kernels save (q, k, v, the
    output and the log-sum-exp per query); the meta device's own SDPA is the math path, which
    would save the full (T, S) attention matrix."""

    @staticmethod
    def forward(ctx, q, k, v):  # type: ignore[override]
        B, H, T, _ = q.shape
        out = q.new_empty(B, T, H, v.shape[-1]).transpose(1, 2)  # laid out as the kernels return it
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        raise NotImplementedError  # never run: the planner only counts the forward's saved tensors


class _FusedAttentionOnMeta(TorchFunctionMode):
    """SDPA as the fused kernels run it; on CPU, query and value head dims that differ (MLA)
    make torch fall back to the math path, which the meta device runs as is."""

    def __init__(self, device_type: str):
        super().__init__()
        self.device_type = device_type

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        if func is F.scaled_dot_product_attention:
            q, k, v = args[:3]
            if self.device_type != "cpu" or q.shape[-1] == v.shape[-1]:
                return _SavedLikeFlashAttention.apply(q, k, v)
        return func(*args, **(kwargs or {}))


def _saved_bytes(
    model: RDT, batch: int, seq_len: int, n_loops: int, backprop_loops: int, device_type: str
) -> int:
    """Bytes of the distinct storages autograd saves in one forward on the meta device, less the
    parameters it saves (resident anyway)."""
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s._cdata not in params:
            storages[s._cdata] = s.nbytes()
        return t

    ids = torch.zeros(batch, seq_len, dtype=torch.long, device="meta")
    answer = torch.full((batch,), seq_len - 1, device="meta")
    # On CPU, short sequences take the two-matmul attention, which saves its probabilities; the
    # meta device runs it as is. Elsewhere (and for long sequences) torch's fused kernels.
    fused = device_type != "cpu" or seq_len * seq_len > _SMALL_ATTENTION
    # The softmax pads short rows on CPU (model/softmax.py) and saves the padded probabilities.
    as_on_cpu = softmax.padded_on("meta") if device_type == "cpu" else nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), as_on_cpu:
        if fused:
            with _FusedAttentionOnMeta(device_type):
                out = model(ids, n_loops, backprop_loops=backprop_loops, logits_at_B=answer)
        else:
            out = _attend_matmul_on_meta(model, ids, n_loops, backprop_loops, answer)
    del out  # only now: while the graph lives, no storage is freed and its key reused
    return sum(storages.values())


def _attend_matmul_on_meta(
    model: RDT, ids: torch.Tensor, n_loops: int, backprop_loops: int, answer: torch.Tensor
) -> None:
    """The CPU path for short sequences: `_attend` picks it by device type, so present as cpu."""
    from mythos_dist.model import attention

    real = attention._attend

    def attend(q, k, v, dropout, window=0, sink_H=None):  # the two-matmul path, whatever the device
        return attention._attend_matmul(q, k, v, dropout, window, sink_H)

    attention._attend = attend
    try:
        return model(ids, n_loops, backprop_loops=backprop_loops, logits_at_B=answer)
    finally:
        attention._attend = real


def saved_bytes(
    model_cfg: ModelConfig,
    batch: int,
    seq_len: int,
    n_loops: int,
    backprop_loops: int = 0,
    checkpointing: bool = False,
    dtype: torch.dtype = torch.float32,
    device_type: str = "cuda",
) -> int:
    """Bytes a training forward saves for backward (parameters excluded), micro batch of
    batch × seq_len tokens, every token counted; run on the meta device."""
    # Dropless: every routed copy is kept (an upper bound with a capacity factor).
    cfg = dataclasses.replace(model_cfg, capacity_factor=0.0)
    with torch.device("meta"):
        model = RDT(cfg).to(dtype).train()
    model.recurrent.checkpoint_loops = checkpointing
    return _saved_bytes(model, batch, seq_len, n_loops, backprop_loops, device_type)


def activation_bytes(
    model_cfg: ModelConfig,
    batch: int,
    seq_len: int,
    n_loops: int,
    backprop_loops: int,
    checkpointing: bool,
    dtype: torch.dtype = torch.float32,
    device_type: str = "cuda",
) -> int:
    """Activation memory of a training step's forward + backward: what the forward saves, plus
    backward's working set, taken as one loop iteration's saved tensors (the gradients it holds
    at a time). With checkpointing, the forward saves the iterations' inputs only, and backward
    recomputes one iteration at a time: one more iteration's worth."""
    one_iteration = saved_bytes(model_cfg, batch, seq_len, 2, 0, False, dtype, device_type) - saved_bytes(
        model_cfg, batch, seq_len, 1, 0, False, dtype, device_type
    )
    saved = saved_bytes(model_cfg, batch, seq_len, n_loops, backprop_loops, checkpointing, dtype, device_type)
    return saved + (2 if checkpointing else 1) * one_iteration


# --------------------------------------------------------------------------- the plan


def plan(cfg: Config, world_size: int, seq_len: int | None = None, device_type: str = "cuda") -> MemoryPlan:
    """Bytes per rank of training `cfg` on `world_size` ranks (raises ConfigError for a layout
    training would refuse). seq_len: tokens per sample (default model.max_seq_len)."""
    cfg.validate(world_size=world_size)
    if device_type not in ("cuda", "cpu"):
        raise ConfigError(f"device type must be cuda or cpu, got {device_type!r}")
    m, par, t = cfg.model, cfg.parallel, cfg.train
    seq_len = seq_len or m.max_seq_len
    if seq_len < 1:
        raise ConfigError(f"sequence length must be ≥ 1, got {seq_len}")
    ep, stage, W = par.ep_size, par.zero_stage, world_size
    b = _elem_bytes(t.dtype)
    with torch.device("meta"):
        model = RDT(m)
    groups = _param_groups(model, ep)
    dense = sum(sum(v) for (e, _), v in groups.items() if not e)
    experts = sum(sum(v) for (e, _), v in groups.items() if e)
    local = dense + experts
    if stage == 0:
        parts = {key: sum(v) for key, v in groups.items()}  # no partitioning
    else:
        parts = {(e, d): _partition(v, W // ep if e else W, b) for (e, d), v in groups.items()}
    part = sum(parts.values())
    params = local * b
    bucket = 0
    if stage == 0:
        grads = local * b + (local * FP32 if b != FP32 else 0)  # bf16: DeepSpeed's fp32 gradients too
        master = local * FP32 if b != FP32 else 0
        moments = 2 * FP32 * local
    else:
        master, moments = FP32 * part, 2 * FP32 * part
        if stage == 1:
            grads = local * b + FP32 * part
        else:
            grads = part * b
            bucket = min(_reduce_bucket(cfg), local) * b if device_type == "cpu" else _reduce_bucket(cfg) * b
    # DeepSpeed steps one group at a time: ZeRO-1/2 first flatten its gradient partition into a new
    # tensor (+ an fp32 copy when training in bf16), then AdamW's update makes two fp32 temporaries.
    largest = max(parts.values())
    flat_grad = 0 if stage == 0 else largest * (b + (FP32 if b != FP32 else 0))
    step_temporaries = flat_grad + 2 * FP32 * largest
    n_loops = t.loops.n_loops if t.loops.kind == "fixed" else t.loops.max_loops
    bp = t.loops.backprop_loops
    grad_loops = min(bp, n_loops) if bp > 0 else n_loops
    dtype = torch.bfloat16 if b == 2 else torch.float32
    mb = t.micro_batch_size
    act = activation_bytes(m, mb, seq_len, n_loops, bp, False, dtype, device_type)
    act_ckpt = activation_bytes(m, mb, seq_len, n_loops, bp, True, dtype, device_type)
    return MemoryPlan(
        world_size=W, ep_size=ep, zero_stage=stage, dtype=t.dtype, device_type=device_type,
        micro_batch_size=mb, seq_len=seq_len, n_loops=n_loops, grad_loops=grad_loops,
        dense_numel=dense, local_expert_numel=experts, partition_numel=part,
        largest_group_numel=max(sum(v) for v in groups.values()), params=params,
        grads=grads, grad_bucket=bucket, master=master, moments=moments,
        step_temporaries=step_temporaries, activations=act, activations_checkpointed=act_ckpt,
    )  # fmt: skip


def _gib(n: int) -> str:
    return f"{n / GiB:9.2f} GiB"


def format_plan(p: MemoryPlan, checkpointing: str, device_mem: int | None) -> str:
    n_local = p.local_expert_numel
    lines = [
        f"per rank of {p.world_size} (ep_size {p.ep_size}, ZeRO-{p.zero_stage}, {p.dtype}, {p.device_type}): "
        f"micro batch {p.micro_batch_size} x {p.seq_len} tokens, {p.n_loops} loops ({p.grad_loops} with gradients)",
        f"  parameters      {_gib(p.params)}   dense {p.dense_numel / 1e6:,.1f} M + this rank's experts "
        f"{n_local / 1e6:,.1f} M",
        f"  gradients       {_gib(p.grads + p.grad_bucket)}   (reduce bucket {p.grad_bucket / GiB:.2f} GiB)",
        f"  optimizer       {_gib(p.optimizer)}   fp32 master {p.master / GiB:.2f} GiB + AdamW moments "
        f"{p.moments / GiB:.2f} GiB over a partition of {p.partition_numel / 1e6:,.1f} M",
        f"  step temporaries{_gib(p.step_temporaries)}",
        f"  engine build    {_gib(p.engine_built)}   peak while DeepSpeed flattens the groups",
        f"  activations     {_gib(p.activations)}   per micro batch, activation_checkpointing=none",
        f"                  {_gib(p.activations_checkpointed)}   per micro batch, activation_checkpointing=loop",
        f"  total           {_gib(p.total(False))}   activation_checkpointing=none",
        f"                  {_gib(p.total(True))}   activation_checkpointing=loop",
    ]
    if device_mem is not None:
        need = p.peak(checkpointing == "loop")
        verdict = "fits" if need <= device_mem else "does NOT fit"
        lines.append(
            f"  device memory   {_gib(device_mem)}   {verdict} with train.activation_checkpointing={checkpointing} "
            f"({need / device_mem:.0%} of it)"
        )
    return "\n".join(lines)


def add_plan_command(sub: Any) -> None:
    p = sub.add_parser(
        "plan", help="memory per rank of a training job, before launching it (allocates nothing)"
    )
    p.add_argument("--config", required=True, help="YAML config (see configs/)")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. parallel.ep_size=8"
    )
    p.add_argument("--world-size", type=int, required=True, help="ranks (GPUs) of the job")
    p.add_argument(
        "--device-mem", help="memory per device, e.g. 80GB; exit status 1 when the job does not fit"
    )
    p.add_argument("--seq-len", type=int, help="tokens per sample (default model.max_seq_len)")
    p.add_argument(
        "--device-type", choices=["cuda", "cpu"], default="cuda", help="where the ranks run (default cuda)"
    )
    p.set_defaults(handler=_cmd_plan)


def _cmd_plan(args: argparse.Namespace) -> int:
    if args.world_size < 1:
        raise ConfigError(f"--world-size must be ≥ 1, got {args.world_size}")
    device_mem = parse_bytes(args.device_mem) if args.device_mem else None
    cfg = load_config(args.config, args.set)
    p = plan(cfg, args.world_size, args.seq_len, args.device_type)
    print(format_plan(p, cfg.train.activation_checkpointing, device_mem))
    return (
        1
        if device_mem is not None and p.total(cfg.train.activation_checkpointing == "loop") > device_mem
        else 0
    )
