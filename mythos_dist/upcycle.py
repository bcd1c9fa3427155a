"""Expert-count scaling: grow a trained export's experts m-fold without changing its function."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from mythos_dist.config import ModelConfig, from_dict
from mythos_dist.export import _EXPERT_ID, ExportReader, expert_id, write_export
from mythos_dist.safe_io import CheckpointError


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
            t, g = reader.get(name), expert_id(name)
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
