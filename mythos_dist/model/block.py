"""Pre-norm transformer block: attention + FFN (dense SwiGLU in prelude/coda, MoE when looped)."""

from __future__ import annotations

import torch
from torch import nn

from mythos_dist.model.attention import KVCache, Rope, TokenLayout, make_attention
from mythos_dist.model.config import ModelConfig
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
    def __init__(self, cfg: ModelConfig, moe: bool, own_window: int = 0):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = make_attention(cfg, own_window)
        self.ffn_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.ffn: nn.Module = make_moe(cfg) if moe else SwiGLU(cfg.dim, cfg.ffn_dim())
        self.drop = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x_ND: torch.Tensor,
        layout: TokenLayout,
        rope: Rope,
        cache: KVCache | None,
        key: str,
        keep_R: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, D) rows placed by `layout` -> (output rows, MoE aux loss or 0).

        keep_R: indices of the rows still needed after attention (e.g. only the answer position in
        the last layer); the FFN/MoE runs on those alone and only they are returned. Attention
        still reads every row: they are its keys and values.
        """
        x_ND = x_ND + self.drop(self.attn(self.attn_norm(x_ND), layout, rope, cache, key))
        if keep_R is not None:
            x_ND = x_ND[keep_R]
        y = self.ffn(self.ffn_norm(x_ND))
        y, aux = y if isinstance(y, tuple) else (y, x_ND.new_zeros(()))
        return x_ND + self.drop(y), aux
