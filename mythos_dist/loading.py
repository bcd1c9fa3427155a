"""The model an evaluation runs: from an export, a DeepSpeed checkpoint, an MLflow model or a fresh
init; whole, or one rank's expert-parallel shard."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import torch

from mythos_dist.config import Config, ConfigError
from mythos_dist.model.config import ModelConfig
from mythos_dist.model.rdt import RDT
from mythos_dist.tracking import is_model_uri

# Model settings no weight depends on: an evaluation may run a checkpoint's model with another
# value (`--set model.attn_window=3`). Any other model.* override that differs from the checkpoint
# is refused: the checkpoint fixes its model, and ignoring the override would report numbers for
# a model the user did not ask for.
EVAL_TIME_MODEL_KEYS = frozenset(
    {
        "attn_window",
        "prelude_attn_window",
        "coda_attn_window",
        "max_seq_len",
        "capacity_factor",
        "act_threshold",
    }
)


def checkpoint_model_cfg(saved: ModelConfig, cfg: Config, overrides: Sequence[str]) -> ModelConfig:
    """The checkpoint's model config with the `model.K=V` overrides among EVAL_TIME_MODEL_KEYS applied
    (values as parsed into cfg.model); ConfigError naming every other one that differs from it."""
    dotted = {o.split("=", 1)[0].strip() for o in overrides}  # as config.apply_overrides reads them
    keys = sorted(k.removeprefix("model.") for k in dotted if k.startswith("model."))
    refused = [
        f"model.{k}: checkpoint {getattr(saved, k)!r}, --set {getattr(cfg.model, k)!r}"
        for k in keys
        if k not in EVAL_TIME_MODEL_KEYS and getattr(saved, k) != getattr(cfg.model, k)
    ]
    if refused:
        raise ConfigError(
            "the checkpoint fixes its model; only "
            + ", ".join(f"model.{k}" for k in sorted(EVAL_TIME_MODEL_KEYS))
            + " may change at evaluation:\n  "
            + "\n  ".join(refused)
        )
    out = dataclasses.replace(saved, **{k: getattr(cfg.model, k) for k in keys if k in EVAL_TIME_MODEL_KEYS})
    out.validate()
    return out


def load_model(
    checkpoint: str | Path | None, cfg: Config, ep_size: int = 1, overrides: Sequence[str] = ()
) -> RDT:
    """The model to evaluate, in eval mode on CPU; its config is `model.cfg` (the
    checkpoint's own; `cfg` is not changed).

    checkpoint: an export directory (single file or shards + index), or a DeepSpeed checkpoint
    directory (a run's checkpoint dir with `latest`, or one step_* dir), read tensor by tensor, or
    an MLflow model (models:/NAME/VERSION, runs:/RUN_ID), downloaded first (safetensors + JSON
    only) and then read as a local export. None: a freshly initialised model from cfg.model and
    cfg.train.seed (the initial weights of training). ep_size > 1 (process group joined): this rank
    holds and reads only the dense part and its own experts, and the model runs expert-parallel.
    overrides: the command line's `--set` items; its model.* ones go through checkpoint_model_cfg
    before any weight is read.
    """
    from mythos_dist import tracking
    from mythos_dist.checkpoint import CheckpointTensors
    from mythos_dist.export import ExportReader, load_shard
    from mythos_dist.safe_io import CheckpointError

    ep = ep_size
    if checkpoint is None:  # the weights training starts from (keyed by train.seed)
        if ep > 1:
            from mythos_dist.parallel import build_model

            return build_model(cfg, torch.device("cpu")).eval().requires_grad_(False)
        model = RDT(cfg.model)
        model.reset_parameters(cfg.train.seed)
        return model.eval().requires_grad_(False)
    group, ep_rank = None, 0
    if ep > 1:  # torch's all-to-all on a plain process group: evaluation never imports DeepSpeed
        from mythos_dist.comm import expert_parallel_group

        group, ep_rank = expert_parallel_group(ep)
    shard = (ep, ep_rank) if ep > 1 else None
    path = (  # a rank downloads only the index and the shards holding its tensors
        tracking.fetch_export(checkpoint, cfg.tracking, shard)
        if tracking.is_model_uri(checkpoint)
        else Path(checkpoint)
    )
    if not path.exists():
        raise ConfigError(f"checkpoint {path} does not exist")
    try:
        source = ExportReader(path, shard) if (path / "config.json").is_file() else CheckpointTensors(path)
        source.model_cfg = checkpoint_model_cfg(source.model_cfg, cfg, overrides)
        model = load_shard(source, ep, ep_rank)
        if group is not None:
            from mythos_dist.ep_transport import all_to_all_for
            from mythos_dist.model.dispatch import use_all_to_all

            exchange = all_to_all_for(group, cfg.parallel.ep_transport, cfg.parallel.timeout_s)
            use_all_to_all(model, group, cfg.parallel.ep_dispatch, exchange)
    except CheckpointError as e:
        raise ConfigError(str(e)) from e
    longest = cfg.data.task.max_length() + 1
    if model.cfg.max_seq_len < longest:
        raise ConfigError(
            f"{path}: model.max_seq_len={model.cfg.max_seq_len} < longest eval input ({longest})"
        )
    return model.requires_grad_(False)  # evaluated, never trained: no weight gradients (the spectral tools)


def refuse_missing(checkpoint: str | None) -> None:
    """A local checkpoint path that does not exist is bad input (an MLflow model is fetched later)."""
    if checkpoint is not None and not is_model_uri(checkpoint) and not Path(checkpoint).exists():
        raise ConfigError(f"checkpoint {checkpoint} does not exist")
