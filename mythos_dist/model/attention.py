"""Attention: RoPE, GQA (SDPA) and MLA (DeepSeek-V2 latent KV cache), plus the KV cache object."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mythos_dist.model.config import ModelConfig
from mythos_dist.model.norm import RMSNorm
from mythos_dist.model.softmax import softmax_lastdim


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


@dataclass(frozen=True)
class TokenLayout:
    """Where the N rows of the residual stream sit in the batch's (B, T) grid.

    The model carries only the tokens that can matter as rows (N, D): `rows_N` holds their flat
    indices into B·T in ascending order (None: every token, N = B·T). Right padding after the
    answer can be left out because causal attention never reads it back. Attention alone needs the
    grid: left-out tokens are zeros there, and no kept query ever attends to them.
    """

    B: int
    T: int
    rows_N: torch.Tensor | None = None

    def to_grid(self, x_N: torch.Tensor) -> torch.Tensor:
        """(N, ...) -> (B, T, ...), zeros at left-out tokens."""
        if self.rows_N is not None:
            x_N = x_N.new_zeros(self.B * self.T, *x_N.shape[1:]).index_copy(0, self.rows_N, x_N)
        return x_N.view(self.B, self.T, *x_N.shape[1:])

    def from_grid(self, x_BT: torch.Tensor) -> torch.Tensor:
        """(B, T, ...) -> (N, ...)."""
        x = x_BT.reshape(self.B * self.T, *x_BT.shape[2:])
        return x if self.rows_N is None else x[self.rows_N]


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


def _attend(
    q_BHTE: torch.Tensor,
    k_BHSE: torch.Tensor,
    v_BHSV: torch.Tensor,
    dropout: float,
    window: int = 0,
    sink_H: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention (sliding-window when window > 0); with a cache the T queries are the last T
    of S positions (bottom-right aligned). sink_H: per-head logit of an extra key whose value is 0,
    so a head can attend to nothing (its output shrinks toward 0 when no key scores above it)."""
    T, S = q_BHTE.shape[2], k_BHSE.shape[2]
    if q_BHTE.device.type == "cpu" and T * S <= _SMALL_ATTENTION:
        return _attend_matmul(q_BHTE, k_BHSE, v_BHSV, dropout, window, sink_H)
    gqa = q_BHTE.shape[1] != k_BHSE.shape[1]
    if T == S and not window and sink_H is None:
        return F.scaled_dot_product_attention(
            q_BHTE, k_BHSE, v_BHSV, is_causal=True, dropout_p=dropout, enable_gqa=gqa
        )
    mask = _causal_mask(T, S, q_BHTE.device, window)
    if sink_H is not None:  # a zero key (score 0) whose logit the float mask sets to sink_H
        B, Hk = k_BHSE.shape[:2]
        k_BHSE = torch.cat([k_BHSE, k_BHSE.new_zeros(B, Hk, 1, k_BHSE.shape[-1])], dim=2)
        v_BHSV = torch.cat([v_BHSV, v_BHSV.new_zeros(B, Hk, 1, v_BHSV.shape[-1])], dim=2)
        bias_TS = torch.zeros(T, S, dtype=q_BHTE.dtype, device=q_BHTE.device).masked_fill(
            ~mask, float("-inf")
        )
        H = q_BHTE.shape[1]
        mask = torch.cat(
            [bias_TS.expand(H, T, S), sink_H.to(q_BHTE.dtype)[:, None, None].expand(H, T, 1)], -1
        )
    return F.scaled_dot_product_attention(
        q_BHTE, k_BHSE, v_BHSV, attn_mask=mask, dropout_p=dropout, enable_gqa=gqa
    )


# Below this many (query, key) pairs per head, plain matmuls beat torch's CPU flash kernel, whose
# per-block overhead dominates at short lengths (fwd+bwd at 128 × 4 heads × 13²: 3.3 ms vs 6.3 ms).
_SMALL_ATTENTION = 64 * 64


def _causal_mask(T: int, S: int, device: torch.device, window: int = 0) -> torch.Tensor:
    """(T, S) True where query i (position S−T+i) may attend to key j: j ≤ S−T+i, and with a
    window also j > S−T+i − window."""
    gap_TS = torch.arange(S - T, S, device=device)[:, None] - torch.arange(S, device=device)[None, :]
    return (gap_TS >= 0) & (gap_TS < window) if window else gap_TS >= 0


def _attend_matmul(
    q_BHTE: torch.Tensor,
    k_BHSE: torch.Tensor,
    v_BHSV: torch.Tensor,
    dropout: float,
    window: int = 0,
    sink_H: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention as two batched matmuls; the G query heads sharing a KV head are stacked
    along the query axis, so K and V are never repeated."""
    B, H, T, E = q_BHTE.shape
    Hk, S = k_BHSE.shape[1], k_BHSE.shape[2]
    G = H // Hk
    scores = (q_BHTE.reshape(B, Hk, G * T, E) @ k_BHSE.transpose(-1, -2)) * E**-0.5
    scores = scores.masked_fill(~_causal_mask(T, S, q_BHTE.device, window).repeat(G, 1), float("-inf"))
    if sink_H is not None:  # one more column, the sink's logit, dropped again after the softmax
        sink = sink_H.to(scores.dtype).view(1, Hk, G, 1, 1).expand(B, Hk, G, T, 1).reshape(B, Hk, G * T, 1)
        probs = softmax_lastdim(torch.cat([scores, sink], dim=-1))[..., :S]
    else:
        probs = softmax_lastdim(scores)
    if dropout > 0:
        probs = F.dropout(probs, dropout)
    return (probs @ v_BHSV).view(B, H, T, v_BHSV.shape[-1])


Rope = torch.Tensor | None  # complex rotations (T, rot_dim/2) for the current positions, or no RoPE


class _Attention(nn.Module):
    """What GQA and MLA share: dropout, the sliding window and the optional per-head sink logit."""

    def _attend_settings(self, cfg: ModelConfig, own_window: int) -> None:
        """own_window: this layer's window, kept by `attention_window` (0: the model's attn_window)."""
        self.dropout, self.window, self.own_window = (
            cfg.dropout,
            own_window or cfg.attn_window,
            own_window > 0,
        )
        self.sink_H = nn.Parameter(torch.zeros(cfg.n_heads)) if cfg.attn_sink else None

    def reset_parameters(self) -> None:
        """The sink logits; the projections are Linears, initialised with the model's matrices."""
        if self.sink_H is not None:
            nn.init.zeros_(self.sink_H)


class GQAttention(_Attention):
    def __init__(self, cfg: ModelConfig, own_window: int = 0):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wqkv = nn.Linear(cfg.dim, (cfg.n_heads + 2 * cfg.n_kv_heads) * self.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * self.head_dim, cfg.dim, bias=False)
        self._attend_settings(cfg, own_window)

    def forward(
        self, x_ND: torch.Tensor, layout: TokenLayout, rope: Rope, cache: KVCache | None, key: str
    ) -> torch.Tensor:
        B, T = layout.B, layout.T
        qkv = layout.to_grid(self.wqkv(x_ND)).view(B, T, -1, self.head_dim)
        q, k, v = qkv.split([self.n_heads, self.n_kv_heads, self.n_kv_heads], dim=2)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        if cache is not None:
            k, v = cache.extend(key, k, v)
        drop = self.dropout if self.training else 0.0
        out = _attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), drop, self.window, self.sink_H)
        return self.wo(layout.from_grid(out.transpose(1, 2)).flatten(1))


class MLAttention(_Attention):
    """Multi-head Latent Attention (DeepSeek-V2).

    Queries come from a low-rank latent. Keys/values come from a compressed latent c_kv
    (kv_lora_rank) plus ONE decoupled RoPE key per token shared by all heads (qk_rope_head_dim);
    only those two are cached: kv_lora_rank + qk_rope_head_dim values per token per layer.
    """

    def __init__(self, cfg: ModelConfig, own_window: int = 0):
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
        self._attend_settings(cfg, own_window)

    def forward(
        self, x_ND: torch.Tensor, layout: TokenLayout, rope: Rope, cache: KVCache | None, key: str
    ) -> torch.Tensor:
        B, T, H = layout.B, layout.T, self.n_heads
        q_NX = self.q_up(self.q_norm(self.q_down(x_ND)))
        grid = layout.to_grid(torch.cat([q_NX, self.kv_down(x_ND)], dim=-1))
        q, c_kv_BTC, k_rope_BTR = grid.split([q_NX.shape[-1], self.kv_lora_rank, self.rope_dim], dim=-1)
        q_nope, q_rope = q.view(B, T, H, self.nope + self.rope_dim).split([self.nope, self.rope_dim], dim=-1)
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
        out = _attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), drop, self.window, self.sink_H)
        return self.wo(layout.from_grid(out.transpose(1, 2)).flatten(1))


def make_attention(cfg: ModelConfig, own_window: int = 0) -> nn.Module:
    return MLAttention(cfg, own_window) if cfg.attn_type == "mla" else GQAttention(cfg, own_window)


@contextmanager
def attention_window(model: nn.Module, window: int | None) -> Iterator[None]:
    """Inside the block every attention layer of `model` sees `window` tokens (None: unchanged),
    except layers with a window of their own (model.prelude_attn_window, model.coda_attn_window); the
    layers' windows are restored after, also on error. For per-step window draws in training (train.attn_windows);
    autograd keeps the masks it used, so backward may run outside."""
    layers = [m for m in model.modules() if isinstance(m, (GQAttention, MLAttention)) and not m.own_window]
    saved = [m.window for m in layers]
    try:
        if window is not None:
            for m in layers:
                m.window = window
        yield
    finally:
        for m, w in zip(layers, saved):
            m.window = w
