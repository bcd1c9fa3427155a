"""Recurrent-Depth Transformer: embed → prelude → looped MoE block (n_loops times) → coda → head."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from mythos_dist.model import init
from mythos_dist.model.attention import GQAttention, KVCache, MLAttention, Rope, TokenLayout, rope_rotations
from mythos_dist.model.block import TransformerBlock
from mythos_dist.model.config import ModelConfig
from mythos_dist.model.moe import GroupedExperts, MoEFFN, Router
from mythos_dist.model.norm import RMSNorm
from mythos_dist.model.recurrent import DepthLoRA, LoopHalting, LTIInjection, RecurrentBlock


@dataclass
class RDTOutput:
    logits: torch.Tensor  # (B, T, V) after n_loops; (B, V) when forward got logits_at_B
    aux_loss: torch.Tensor  # MoE balance loss per token per MoE layer use (0 unless enabled)
    ponder_cost: torch.Tensor  # ACT ponder cost (0 unless enabled)
    loop_logits: dict[int, torch.Tensor]  # loop count -> logits, for every count in loops_out
    delta_norms: list[torch.Tensor]  # ‖h_t − h_{t−1}‖ (B, T) per loop, when track_deltas
    loops_used: torch.Tensor | None = None  # with halting: loops each sample ran, (B,) int64


class RDT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed = init.Embedding(cfg.vocab_size, cfg.dim)
        self.prelude = nn.ModuleList(
            TransformerBlock(cfg, moe=False, own_window=cfg.prelude_attn_window)
            for _ in range(cfg.prelude_layers)
        )
        self.recurrent = RecurrentBlock(cfg)
        self.coda = nn.ModuleList(
            TransformerBlock(cfg, moe=False, own_window=cfg.coda_attn_window) for _ in range(cfg.coda_layers)
        )
        self.norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        """Initial weights: N(0, init_std²) matrices (embeddings N(0, embed_init_std²)), zero biases,
        and every module's constants (norm gains, LTI, LoRA, router buffers).

        seed None: drawn from torch's global RNG in module order. seed given: each tensor from its
        own generator keyed by (seed, parameter name, global expert id) (`model.init`), so a model
        materialised from the meta device with only some experts (one expert-parallel rank's) gets
        exactly the values of the full model there.
        """
        std = self.cfg.init_std
        for name, m in self.named_modules():
            prefix = f"{name}." if name else ""
            if isinstance(m, (nn.Linear, nn.Embedding)):
                init.normal_(m.weight, std, seed, prefix + "weight")
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, GroupedExperts):
                for w_name in ("w_in_EDH", "w_out_EHD"):
                    w = getattr(m, w_name)
                    if seed is None:  # one draw for the whole stack
                        init.normal_(w, std, None, prefix + w_name)
                        continue
                    for local in range(m.n_local):
                        init.normal_(w[local], std, seed, prefix + w_name, m.first_expert_id + local)
            elif isinstance(m, (RMSNorm, LTIInjection, DepthLoRA, Router, GQAttention, MLAttention)):
                m.reset_parameters()  # constants only; no random draws
        init.normal_(self.embed.weight, self.cfg.embed_init_std, seed, "embed.weight")
        if self.recurrent.halt is not None:
            nn.init.constant_(self.recurrent.halt.bias, -2.0)  # start by pondering, not halting

    def moe_layers(self) -> list[MoEFFN]:
        return [m for m in self.modules() if isinstance(m, MoEFFN)]

    def rope(self, start: int, T: int, device: torch.device, dtype: torch.dtype) -> Rope:
        cfg = self.cfg
        if cfg.pos_encoding == "none":
            return None
        rot = cfg.qk_rope_head_dim if cfg.attn_type == "mla" else cfg.head_dim
        return rope_rotations(torch.arange(start, start + T, device=device), rot, cfg.rope_theta, dtype)

    def forward(
        self,
        ids_BT: torch.Tensor,
        n_loops: int,
        cache: KVCache | None = None,
        loops_out: Iterable[int] = (),
        backprop_loops: int = 0,
        track_deltas: bool = False,
        valid_BT: torch.Tensor | None = None,
        logits_at_B: torch.Tensor | None = None,
        halting: LoopHalting | None = None,
    ) -> RDTOutput:
        """Logits after `n_loops` iterations of the looped block (any count ≥ 1, also past training).

        loops_out: further loop counts ≤ n_loops whose logits are computed in the same pass (the
        recurrence runs once; coda and head run once per count).
        cache: KV cache for incremental decoding; positions continue from what it holds.
        valid_BT: tokens that matter, a prefix of each row (False for right padding). Only these
        are computed (rows of the residual stream); causal attention never lets later tokens back
        in, so their values equal the full forward's. Logits and delta norms elsewhere are 0.
        logits_at_B: one valid position per row; only there does the last coda layer's FFN and the
        head run, and logits come back as (B, V).
        halting: each sample stops looping once its state has converged (LoopHalting), at most
        n_loops; `loops_used` says how many loops each ran. Inference only.

        Long on purpose: the whole forward (embed, prelude, loop, coda, head) reads top to bottom.
        """
        loops_out = sorted(set(loops_out))
        if n_loops < 1 or any(n < 1 or n > n_loops for n in loops_out):
            raise ValueError(
                f"loop counts must be in [1, n_loops={n_loops}], got n_loops={n_loops}, {loops_out}"
            )
        if cache is not None and loops_out:
            raise ValueError("loops_out needs a full forward (the coda's cache holds one loop count)")
        if cache is not None and cache.n_loops not in (None, n_loops):
            raise ValueError(f"cache was filled with n_loops={cache.n_loops}; decode with the same count")
        if valid_BT is not None:
            _check_valid(valid_BT, logits_at_B, cache)
        B, T = ids_BT.shape
        start = cache.pos if cache is not None else 0
        layout = TokenLayout(B, T, None if valid_BT is None else valid_BT.flatten().nonzero().squeeze(1))
        x = self.embed(layout.from_grid(ids_BT))
        rope = self.rope(start, T, x.device, x.dtype)
        # answer rows as indices into the kept rows (which must include them)
        answer_R = None
        if logits_at_B is not None:
            answer_R = torch.arange(B, device=x.device) * T + logits_at_B
            if layout.rows_N is not None:
                answer_R = torch.searchsorted(layout.rows_N, answer_R)
        for i, layer in enumerate(self.prelude):
            x, _ = layer(x, layout, rope, cache, f"prelude{i}")  # dense: no aux loss (only the loop is MoE)
        loop = self.recurrent(
            x, n_loops, rope, layout, cache, loops_out, backprop_loops, track_deltas, halting=halting
        )
        loop_logits = {n: self._coda(h, layout, rope, cache, answer_R) for n, h in loop.outputs.items()}
        if cache is not None:  # with halting the cache holds the iterations that ran
            cache.pos, cache.n_loops = start + T, loop.loops_run if halting is not None else n_loops
        return RDTOutput(
            loop_logits[n_loops],
            loop.aux_loss,
            loop.ponder_cost,
            loop_logits,
            [layout.to_grid(d) for d in loop.delta_norms],
            loop.loops_used_B,
        )

    def _coda(
        self,
        h: torch.Tensor,
        layout: TokenLayout,
        rope: Rope,
        cache: KVCache | None,
        answer_R: torch.Tensor | None,
    ) -> torch.Tensor:
        """Coda + head on rows (N, D) -> logits (B, T, V), or (B, V) at answer_R only."""
        for i, layer in enumerate(self.coda):
            keep = answer_R if i == len(self.coda) - 1 else None
            h, _ = layer(h, layout, rope, cache, f"coda{i}", keep)
        if answer_R is not None and not self.coda:
            h = h[answer_R]
        logits = self.head(self.norm(h))
        return logits if answer_R is not None else layout.to_grid(logits)

    @torch.no_grad()
    def generate(
        self,
        ids_BT: torch.Tensor,
        max_new_tokens: int,
        n_loops: int,
        temperature: float = 0.0,
        top_k: int = 0,
        halting: LoopHalting | None = None,
    ) -> torch.Tensor:
        """Autoregressive decoding with a KV cache (one entry per layer and loop iteration).

        temperature 0 is greedy. Returns (B, T + max_new_tokens).
        halting: the prompt's samples stop looping once converged (n_loops is the cap); the loop
        iterations that ran fix the count every decoded token runs (the cache holds one entry per
        iteration), within which each sample again stops once its state has converged.
        """
        cache = KVCache()
        logits = self(ids_BT, n_loops, cache=cache, halting=halting).logits[:, -1]
        n_loops = cache.n_loops
        out = [ids_BT]
        for i in range(max_new_tokens):
            if temperature <= 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k > 0:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(torch.softmax(logits, -1), 1)
            out.append(nxt)
            if i + 1 < max_new_tokens:
                logits = self(nxt, n_loops, cache=cache, halting=halting).logits[:, -1]
        return torch.cat(out, dim=1)


def _check_valid(valid_BT: torch.Tensor, logits_at_B: torch.Tensor | None, cache: KVCache | None) -> None:
    if cache is not None:
        raise ValueError("valid_BT with a KV cache: later tokens need the keys of every cached token")
    not_prefix = (valid_BT[:, 1:] & ~valid_BT[:, :-1]).any()
    if logits_at_B is not None:
        not_prefix = not_prefix | ~valid_BT.gather(1, logits_at_B[:, None]).all()
    if not_prefix:  # one host sync for both checks
        raise ValueError("valid_BT must be a prefix of each row (right padding) that includes logits_at_B")


@dataclass(frozen=True)
class ParamCount:
    total: int
    active_per_token: int  # routed experts counted at top-k/E


def count_params(cfg: ModelConfig) -> ParamCount:
    """Parameter counts from a model built on the meta device (no weights are allocated)."""
    with torch.device("meta"):
        model = RDT(cfg)
    total = sum(p.numel() for p in model.parameters())
    routed = sum(p.numel() for m in model.modules() if isinstance(m, GroupedExperts) for p in m.parameters())
    return ParamCount(total, total - routed + routed * cfg.n_experts_per_tok // cfg.n_experts)
