"""Attention: RoPE, GQA (SDPA) and MLA (DeepSeek-V2 latent KV cache), plus the KV cache object."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mythos_dist.config import ModelConfig
from mythos_dist.model.norm import RMSNorm


class KVCache:
    """Per-(layer, loop iteration) cached tensors, concatenated along the sequence axis (dim 1).

    GQA stores (k, v) of shape (B, S, H_kv, head_dim); MLA stores (c_kv (B,S,kv_lora_rank),
    k_rope (B,S,rope_dim)) — the compressed latent and the single shared RoPE key per token.
    """

    def __init__(self) -> None:
        self.entries: dict[str, tuple[torch.Tensor, ...]] = {}
        self.pos = 0  # tokens processed so far: the next token's position
        self.n_loops: int | None = None  # loop count it was filled with (entries are per loop)

    def seq_len(self, key: str) -> int:
        return self.entries[key][0].shape[1] if key in self.entries else 0

    def extend(self, key: str, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        old = self.entries.get(key)
        full = new if old is None else tuple(torch.cat([o, n], dim=1) for o, n in zip(old, new))
        self.entries[key] = tuple(t.detach() for t in full)
        return full

    def values_per_token(self, key: str) -> int:
        """Cached scalars per token per batch row for one entry."""
        return sum(t[0, 0].numel() for t in self.entries[key])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for ts in self.entries.values() for t in ts)


def rope_rotations(positions_T: torch.Tensor, rot_dim: int, theta: float, dtype: torch.dtype) -> torch.Tensor:
    """Unit complex rotations (T, rot_dim/2) for absolute positions (decode passes offset positions);
    complex128 for a float64 model, complex64 otherwise."""
    real = torch.float64 if dtype == torch.float64 else torch.float32
    inv_freq = 1.0 / theta ** (torch.arange(0, rot_dim, 2, device=positions_T.device, dtype=real) / rot_dim)
    angles_TF = positions_T.to(real)[:, None] * inv_freq[None, :]
    return torch.polar(torch.ones_like(angles_TF), angles_TF)


def apply_rope(x_BTHD: torch.Tensor, rot_TF: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (2i, 2i+1) by position-dependent angles: one complex multiply (in fp32),
    where the real-arithmetic form costs six strided elementwise ops and a stack, each way."""
    x = x_BTHD if x_BTHD.dtype == torch.float64 else x_BTHD.float()
    x_c = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(x_c * rot_TF[:, None, :]).flatten(-2).to(x_BTHD.dtype)


def _attend(q_BHTE: torch.Tensor, k_BHSE: torch.Tensor, v_BHSV: torch.Tensor, dropout: float) -> torch.Tensor:
    """Causal SDPA; with a cache the T queries are the last T of S positions (bottom-right aligned)."""
    T, S = q_BHTE.shape[2], k_BHSE.shape[2]
    gqa = q_BHTE.shape[1] != k_BHSE.shape[1]
    if T == S:
        return F.scaled_dot_product_attention(
            q_BHTE, k_BHSE, v_BHSV, is_causal=True, dropout_p=dropout, enable_gqa=gqa
        )
    pos_q = torch.arange(S - T, S, device=q_BHTE.device)
    mask_TS = torch.arange(S, device=q_BHTE.device)[None, :] <= pos_q[:, None]
    return F.scaled_dot_product_attention(
        q_BHTE, k_BHSE, v_BHSV, attn_mask=mask_TS, dropout_p=dropout, enable_gqa=gqa
    )


Rope = torch.Tensor | None  # complex rotations (T, rot_dim/2) for the current positions, or no RoPE


class GQAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * self.head_dim, bias=False)
        self.wkv = nn.Linear(cfg.dim, 2 * cfg.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * self.head_dim, cfg.dim, bias=False)
        self.dropout = cfg.dropout

    def forward(self, x_BTD: torch.Tensor, rope: Rope, cache: KVCache | None, key: str) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        q = self.wq(x_BTD).view(B, T, self.n_heads, self.head_dim)
        k, v = self.wkv(x_BTD).view(B, T, 2, self.n_kv_heads, self.head_dim).unbind(2)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        if cache is not None:
            k, v = cache.extend(key, k, v)
        drop = self.dropout if self.training else 0.0
        out = _attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), drop)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class MLAttention(nn.Module):
    """Multi-head Latent Attention (DeepSeek-V2).

    Queries come from a low-rank latent. Keys/values come from a compressed latent c_kv
    (kv_lora_rank) plus ONE decoupled RoPE key per token shared by all heads (qk_rope_head_dim);
    only those two are cached: kv_lora_rank + qk_rope_head_dim values per token per layer.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.nope, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        self.q_down = nn.Linear(cfg.dim, cfg.q_lora_rank, bias=False)
        self.q_norm = RMSNorm(cfg.q_lora_rank, eps=cfg.norm_eps)
        self.q_up = nn.Linear(cfg.q_lora_rank, cfg.n_heads * (self.nope + self.rope_dim), bias=False)
        self.kv_down = nn.Linear(cfg.dim, cfg.kv_lora_rank + self.rope_dim, bias=False)
        self.kv_norm = RMSNorm(cfg.kv_lora_rank, eps=cfg.norm_eps)
        self.kv_up = nn.Linear(cfg.kv_lora_rank, cfg.n_heads * (self.nope + self.v_dim), bias=False)
        self.wo = nn.Linear(cfg.n_heads * self.v_dim, cfg.dim, bias=False)
        self.dropout = cfg.dropout

    def forward(self, x_BTD: torch.Tensor, rope: Rope, cache: KVCache | None, key: str) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        H = self.n_heads
        q = self.q_up(self.q_norm(self.q_down(x_BTD))).view(B, T, H, self.nope + self.rope_dim)
        q_nope, q_rope = q.split([self.nope, self.rope_dim], dim=-1)
        c_kv_BTC, k_rope_BTR = self.kv_down(x_BTD).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        if rope is not None:
            q_rope = apply_rope(q_rope, rope)
            k_rope_BTR = apply_rope(k_rope_BTR.unsqueeze(2), rope).squeeze(2)
        if cache is not None:
            c_kv_BTC, k_rope_BTR = cache.extend(key, c_kv_BTC, k_rope_BTR)
        S = c_kv_BTC.shape[1]
        k_nope, v = (
            self.kv_up(self.kv_norm(c_kv_BTC))
            .view(B, S, H, self.nope + self.v_dim)
            .split([self.nope, self.v_dim], dim=-1)
        )
        k = torch.cat([k_nope, k_rope_BTR.unsqueeze(2).expand(B, S, H, self.rope_dim)], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1)
        drop = self.dropout if self.training else 0.0
        out = _attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), drop)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


def make_attention(cfg: ModelConfig) -> nn.Module:
    return MLAttention(cfg) if cfg.attn_type == "mla" else GQAttention(cfg)
