"""Parallelism applied to a finished model from outside (torchtitan style).

`init_distributed` starts the process group (gloo on CPU, NCCL on CUDA) with our collective timeout.
`build_model` builds a rank's expert-parallel shard of the RDT on the meta device and materialises
only what the rank owns; `parallelize` (also usable on a full RDT) makes each MoEFFN keep only its
local experts' slice, gives it the all-to-all dispatcher and wraps it in `ExpertParallelMoE`, a subclass of DeepSpeed's MoE
layer. DeepSpeed recognises MoE only through that class: it then reduces expert gradients over the
expert-data-parallel group only, puts expert params in their own optimizer groups and writes one
checkpoint file per global expert id. `deepspeed_config` derives DeepSpeed's JSON from our config.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

# DeepSpeed picks its accelerator at import time; CPU-only hosts need it set before that.
os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")

import deepspeed
import torch.distributed as dist
from deepspeed.moe.layer import MoE
from deepspeed.utils import groups
from torch import nn

from mythos_dist.comm import init_process_group
from mythos_dist.config import Config
from mythos_dist.ep_transport import all_to_all_for
from mythos_dist.model import RDT, init
from mythos_dist.model.dispatch import DISPATCHERS, start_each_forward
from mythos_dist.model.moe import MoEFFN
from mythos_dist.optim import lr_schedule, param_groups
from mythos_dist.weight_names import (
    DS_EXPERT_SEGMENT,
    DS_MOE_LAYER,
    EXPERT_WEIGHTS,
    ROUTER_BIAS,
    ROUTER_BIAS_DS,
)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def init_distributed(timeout_s: float) -> DistInfo:
    """Join (or, for a plain `python` run, create) the process group (`comm.init_process_group`)
    and hand it to DeepSpeed, which adopts an existing group. Idempotent."""
    device = init_process_group(timeout_s)
    if device.type == "cpu":
        # DeepSpeed's CPU shared-memory allreduce op is JIT-loaded on every init (20-90 s here,
        # even when cached) and only speeds up its inference allreduce; gloo does our collectives.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(
        dist_backend=dist.get_backend(), auto_mpi_discovery=False, timeout=timedelta(seconds=timeout_s)
    )
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), device)


# --------------------------------------------------------------------------- expert parallelism


class ExpertParallelMoE(MoE):
    """Our MoEFFN (router → dispatcher → grouped experts, plus shared experts) as a DeepSpeed MoE.

    DeepSpeed's MoE.__init__ would build its own gate and expert list, so it is bypassed; this sets
    the attributes the engine reads (num_experts, ep_size, expert_group_name, num_local_experts) and
    marks the routed expert params `allreduce=False` with their `group_name`. The state dict shows
    DeepSpeed one entry per local expert (`…deepspeed_experts.<l>.w_in_DH`), which its checkpoint
    code renames to the global id; hooks convert to and from our stacked weights.
    """

    def __init__(
        self,
        layer: MoEFFN,
        ep_size: int,
        dispatch: str = "exact",
        transport: str = "auto",
        timeout_s: float = 120.0,
    ):
        nn.Module.__init__(self)
        self.layer = layer
        self.ep_size = ep_size
        self.dispatcher_cls = DISPATCHERS[dispatch]
        self.transport, self.timeout_s = transport, timeout_s
        self.num_experts = layer.n_experts
        self.num_local_experts = layer.n_experts // ep_size
        self.expert_group_name = f"ep_size_{ep_size}"
        self.use_residual = False
        self.enable_expert_tensor_parallelism = False
        for p in layer.experts.parameters():
            p.allreduce = False
            p.group_name = self.expert_group_name
        self.register_state_dict_post_hook(_to_deepspeed_view)
        self.register_load_state_dict_pre_hook(_from_deepspeed_view)

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Create the EP / expert-DP groups (once per ep_size) and route tokens through the EP group."""
        expert_parallel_rank(self.ep_size, use_data_before_expert_parallel_)
        if self.ep_size > 1 and type(self.layer.dispatcher) is not self.dispatcher_cls:
            group = groups._get_expert_parallel_group(self.expert_group_name)
            exchange = all_to_all_for(group, self.transport, self.timeout_s)
            self.layer.dispatcher = self.dispatcher_cls(self.num_experts, group, exchange)

    @property
    def ep_rank(self) -> int:
        return groups._get_expert_parallel_rank(self.expert_group_name)

    def forward(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        return self.layer(x_BTD)


def _to_deepspeed_view(module: ExpertParallelMoE, state: dict, prefix: str, _meta: Any) -> None:
    experts = f"{prefix}{DS_MOE_LAYER}experts."
    for stacked, single in EXPERT_WEIGHTS:
        w_L = state.pop(experts + stacked)
        for i in range(w_L.shape[0]):
            state[f"{prefix}{DS_EXPERT_SEGMENT}{i}.{single}"] = w_L[i]
    state[prefix + DS_MOE_LAYER + ROUTER_BIAS_DS] = state.pop(prefix + DS_MOE_LAYER + ROUTER_BIAS)


def _from_deepspeed_view(module: ExpertParallelMoE, state: dict, prefix: str, *_: Any) -> None:
    if prefix + DS_MOE_LAYER + ROUTER_BIAS_DS in state:
        state[prefix + DS_MOE_LAYER + ROUTER_BIAS] = state.pop(prefix + DS_MOE_LAYER + ROUTER_BIAS_DS)
    for stacked, single in EXPERT_WEIGHTS:
        keys = [f"{prefix}{DS_EXPERT_SEGMENT}{i}.{single}" for i in range(module.num_local_experts)]
        if all(k in state for k in keys):
            state[f"{prefix}{DS_MOE_LAYER}experts.{stacked}"] = torch.stack([state.pop(k) for k in keys])


def expert_parallel_rank(ep_size: int, use_data_before_expert_parallel_: bool = False) -> int:
    """This rank's index in its expert-parallel group (DeepSpeed's groups, created once per ep_size)."""
    name = f"ep_size_{ep_size}"
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(
            ep_size, use_data_before_expert_parallel_=use_data_before_expert_parallel_
        )
    return groups._get_expert_parallel_rank(name)


def parallelize(
    model: nn.Module, ep_size: int, dispatch: str = "exact", transport: str = "auto", timeout_s: float = 120.0
) -> nn.Module:
    """In place: wrap every MoEFFN for DeepSpeed and keep only this rank's experts [r·L, (r+1)·L).
    dispatch: the all-to-all's kind (parallel.ep_dispatch: exact splits, or padded, sync-free);
    transport: how its bytes travel (parallel.ep_transport, mythos_dist.ep_transport), failing
    after timeout_s without an answer.

    The model is either the full model, identical on every rank (its experts are then sliced), or
    already holds exactly this rank's experts (`build_model`).
    """
    for name, module in list(model.named_modules()):
        if not isinstance(module, MoEFFN):
            continue
        wrapper = ExpertParallelMoE(module, ep_size, dispatch, transport, timeout_s)
        wrapper.set_deepspeed_parallelism()
        n_local = wrapper.num_local_experts
        module.experts.shard(wrapper.ep_rank * n_local, n_local)
        for p in module.experts.parameters():
            p.allreduce, p.group_name = False, wrapper.expert_group_name
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, wrapper)
    if dispatch == "padded" and ep_size > 1:
        start_each_forward(model)
    return model


def build_model(cfg: Config, device: torch.device) -> nn.Module:
    """This rank's expert-parallel RDT, never holding more than its own part.

    Built on the meta device, then only the dense parameters and this rank's n_experts/ep_size
    routed experts are materialised on `device` (in bf16 when training in it) and initialised by
    `RDT.reset_parameters(train.seed)`, keyed by (seed, parameter name, global expert id): a
    rank's experts equal the same slice of the ep_size=1 model, and dense parameters are identical
    on every rank. Applies train.activation_checkpointing.
    """
    ep_size = cfg.parallel.ep_size
    with torch.device("meta"):
        model = RDT(cfg.model)
    n_local = cfg.model.n_experts // ep_size
    first = expert_parallel_rank(ep_size) * n_local
    for moe in model.moe_layers():
        moe.experts.shard(first, n_local)
    if use_bf16(cfg):  # materialised in the dtype DeepSpeed trains in: no fp32 copy on the way
        model.to(torch.bfloat16)
    init.materialize(model, device)
    model.reset_parameters(cfg.train.seed)
    if cfg.train.init_from:  # an export's weights instead (e.g. an upcycled model): this rank's part
        from mythos_dist.export import ExportReader, load_into

        load_into(model, ExportReader(cfg.train.init_from))
    model.recurrent.checkpoint_loops = cfg.train.activation_checkpointing == "loop"
    par = cfg.parallel
    return parallelize(model, ep_size, par.ep_dispatch, par.ep_transport, par.timeout_s)


def sync_router_biases(model: nn.Module, update: bool = True) -> list[torch.Tensor]:
    """Balancing step from the load summed over all ranks, so biases stay identical everywhere.

    Returns that global load (assignments per expert since the last step) per MoE layer.
    update=False (a skipped step): the load is returned and reset, the biases stay as they are.
    """
    loads = []
    for moe in model.moe_layers():
        load_E = moe.router.load_E.clone()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(load_E)
        if update:
            load_E = moe.router.update_bias(load_E)
        else:
            moe.router.load_E.zero_()
        loads.append(load_E)
    return loads


# --------------------------------------------------------------------------- DeepSpeed engine


def deepspeed_config(cfg: Config, world_size: int) -> dict[str, Any]:
    """DeepSpeed's JSON, derived from our config (before `parallel.ds_config_override`)."""
    t = cfg.train
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "train_batch_size": t.micro_batch_size * t.grad_accum_steps * world_size,
        "gradient_clipping": t.grad_clip,  # explicit: DeepSpeed's default is 1.0
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": t.lr,
                "betas": list(t.betas),
                "eps": 1e-8,
                "weight_decay": t.weight_decay,
                "torch_adam": True,  # plain torch AdamW: no fused-kernel JIT build, works on CPU
            },
        },
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        "bf16": {"enabled": use_bf16(cfg)},
        "steps_per_print": 1 << 30,  # our loop prints progress
        "wall_clock_breakdown": False,
    }


def use_bf16(cfg: Config) -> bool:
    """bf16 only where it is supported (CUDA); CPU trains in fp32."""
    return cfg.train.dtype == "bf16" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def merge_override(base: dict[str, Any], override: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Deep-merge `override` into a copy of `base`; returns (merged, ['key: old -> new', ...])."""
    merged = copy.deepcopy(base)
    diff: list[str] = []

    def merge(dst: dict[str, Any], src: dict[str, Any], path: str) -> None:
        for k, v in src.items():
            key = f"{path}{k}"
            if isinstance(v, dict) and isinstance(dst.get(k), dict):
                merge(dst[k], v, key + ".")
            elif dst.get(k, "<unset>") != v:
                diff.append(f"{key}: {dst.get(k, '<unset>')!r} -> {v!r}")
                dst[k] = copy.deepcopy(v)

    merge(merged, override, "")
    return merged, diff


def build_engine(
    model: nn.Module, cfg: Config, world_size: int, log: Any = print
) -> tuple[deepspeed.runtime.engine.DeepSpeedEngine, dict[str, Any]]:
    """DeepSpeed engine with AdamW (expert params in their own MoE groups) and our LR schedule.

    Returns (engine, the DeepSpeed config it was built with); override differences go to `log`.
    """
    ds_cfg, diff = merge_override(deepspeed_config(cfg, world_size), cfg.parallel.ds_config_override)
    for line in diff:
        log(f"ds_config_override: {line}")
    if cfg.train.dtype == "bf16" and not use_bf16(cfg):
        log("train.dtype=bf16 is not supported on this device; training in fp32")
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model),
        config=ds_cfg,
        lr_scheduler=lambda optimizer: lr_schedule(optimizer, cfg.train),
    )
    return engine, ds_cfg
