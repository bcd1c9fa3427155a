"""Pre-norm transformer block: attention + FFN (dense SwiGLU in prelude/coda, MoE when looped)."""

from __future__ import annotations

import torch
from torch import nn

from mythos_dist.config import ModelConfig
from mythos_dist.model.attention import KVCache, Rope, make_attention
from mythos_dist.model.moe import MoEFFN, SwiGLU
from mythos_dist.model.norm import RMSNorm


def make_moe(cfg: ModelConfig) -> MoEFFN:
    return MoEFFN(
        dim=cfg.dim,
        n_experts=cfg.n_experts,
        top_k=cfg.n_experts_per_tok,
        expert_dim=cfg.expert_dim,
        n_shared=cfg.n_shared_experts,
        shared_dim=cfg.expert_dim * cfg.n_experts_per_tok,
        capacity_factor=cfg.capacity_factor,
        bias_update_rate=cfg.router_bias_update_rate,
        aux_loss_coef=cfg.aux_loss_coef,
    )


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, moe: bool):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = make_attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.ffn: nn.Module = make_moe(cfg) if moe else SwiGLU(cfg.dim, cfg.ffn_dim())
        self.drop = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x_BTD: torch.Tensor,
        rope: Rope,
        cache: KVCache | None,
        key: str,
        rows_R: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (output, MoE aux loss or 0).

        rows_R: flat indices into B·T of the tokens whose FFN output matters (e.g. not padding after
        the answer, which causal attention never lets back in). Other rows skip the FFN/MoE: they
        cost nothing there and do not count toward expert load.
        """
        x_BTD = x_BTD + self.drop(self.attn(self.attn_norm(x_BTD), rope, cache, key))
        x_ND = x_BTD.reshape(-1, x_BTD.shape[-1])
        h = x_ND if rows_R is None else x_ND[rows_R]
        y = self.ffn(self.ffn_norm(h))
        y, aux = y if isinstance(y, tuple) else (y, x_BTD.new_zeros(()))
        out = x_ND + self.drop(y) if rows_R is None else x_ND.index_add(0, rows_R, self.drop(y))
        return out.view_as(x_BTD), aux
