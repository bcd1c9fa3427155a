"""The model's own configuration: its architecture (`ModelConfig`) and the loop-count policy the
recurrence is trained with (`LoopPolicyConfig`). The rest of the project's config
(mythos_dist.config) nests these; the model package needs nothing else from it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or inconsistent."""


def require(cond: bool, field_name: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{field_name}: {msg}")


@dataclass
class ModelConfig:
    """Architecture of the MoE recurrent-depth transformer (prelude → looped block → coda)."""

    vocab_size: int = 12
    dim: int = 128
    n_heads: int = 4
    n_kv_heads: int = 2
    max_seq_len: int = 64
    max_loop_iters: int = 16  # size of the loop-indexed tables (depth LoRA); more loops still work
    prelude_layers: int = 1
    coda_layers: int = 1
    attn_type: Literal["gqa", "mla"] = "gqa"
    pos_encoding: Literal["rope", "none"] = "rope"
    # Sliding-window attention: each query sees itself and the attn_window − 1 keys before it, in
    # every layer; 0 = full causal. Information then travels ≤ attn_window − 1 tokens per layer, so
    # longer inputs need more loops, and RoPE only ever sees offsets below the window.
    attn_window: int = 0
    # The prelude's own window (0: attn_window), kept by per-step window draws (train.attn_windows).
    # The prelude runs once, so a wider window there is a fixed head start: its output at each
    # position can already hold the last prelude_attn_window − 1 digits, and every loop moves on from
    # there, ≤ attn_window − 1 tokens per loop as before; nothing in it grows with the length.
    prelude_attn_window: int = 0
    # The coda's own window (0: attn_window), also kept by window draws. The coda runs once, after
    # the loop, so a wider window there reaches further back at every loop count. Measured: too wide
    # a reach lets the coda do the loop's work (window 8 on the digit chains: OOD at chance;
    # docs/results.md, twenty-fifth session).
    coda_attn_window: int = 0
    # A learned per-head logit for an extra key with value 0 (an attention sink), so a head can
    # attend to nothing, e.g. when the key it looks for lies before the sequence start.
    attn_sink: bool = False
    rope_theta: float = 10000.0
    # MLA (DeepSeek-V2): low-rank Q, compressed KV latent plus one shared RoPE key per token
    kv_lora_rank: int = 64
    q_lora_rank: int = 64
    qk_rope_head_dim: int = 16
    qk_nope_head_dim: int = 32
    v_head_dim: int = 32
    # MoE FFN in the looped block (prelude/coda use a dense SwiGLU of width dense_ffn_dim)
    n_experts: int = 8
    n_shared_experts: int = 1
    n_experts_per_tok: int = 2
    expert_dim: int = 64
    dense_ffn_dim: int = 0  # 0: 4·dim·2/3 rounded up to a multiple of 8
    capacity_factor: float = 0.0  # 0: dropless
    router_bias_update_rate: float = 1e-3  # aux-loss-free balancing; 0 disables
    aux_loss_coef: float = 0.0  # optional Switch-style load-balance loss
    # Recurrence
    lora_rank: int = 8  # depth-wise LoRA; 0 disables
    loop_signal: bool = True  # sinusoidal loop-index signal added before the block
    act_enabled: bool = False
    act_threshold: float = 0.99
    act_ponder_coef: float = 0.01
    dropout: float = 0.0
    norm_eps: float = 1e-6
    init_std: float = 0.02
    # Token embeddings' init std. The first pre-norm divides by their scale, so at 0.02 their
    # gradient is ~50× the others' and each AdamW step moves them by lr/0.02 relative (the digit-chain
    # runs' gradient spikes, docs/results.md); 1.0 puts them at the scale the norm expects.
    embed_init_std: float = 0.02

    def ffn_dim(self) -> int:
        if self.dense_ffn_dim:
            return self.dense_ffn_dim
        return (8 * self.dim // 3 + 7) // 8 * 8

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def receptive_field(self, n_loops: int, attn_window: int | None = None) -> int | None:
        """How many tokens back a position can see after n_loops: (window − 1) per attention layer
        (each loop: window = attn_window if given else the model's; the prelude and the coda: their
        own windows if set); None for full causal attention (no bound)."""
        window = attn_window or self.attn_window
        if not window:
            return None
        prelude_window = self.prelude_attn_window or window
        coda_window = self.coda_attn_window or window
        return (
            (prelude_window - 1) * self.prelude_layers
            + (window - 1) * n_loops
            + (coda_window - 1) * self.coda_layers
        )

    def validate(self, prefix: str = "model") -> None:
        p = prefix
        for name in ("vocab_size", "dim", "n_heads", "n_kv_heads", "max_seq_len", "max_loop_iters"):
            require(getattr(self, name) >= 1, f"{p}.{name}", f"must be ≥ 1, got {getattr(self, name)}")
        for name in ("prelude_layers", "coda_layers", "n_shared_experts", "lora_rank"):
            require(getattr(self, name) >= 0, f"{p}.{name}", f"must be ≥ 0, got {getattr(self, name)}")
        require(
            self.dim % self.n_heads == 0,
            f"{p}.dim",
            f"dim={self.dim} is not divisible by n_heads={self.n_heads}",
        )
        require(
            self.n_heads % self.n_kv_heads == 0,
            f"{p}.n_kv_heads",
            f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}",
        )
        if self.attn_type == "gqa" and self.pos_encoding == "rope":
            require(
                self.head_dim % 2 == 0, f"{p}.n_heads", f"RoPE needs an even head_dim, got {self.head_dim}"
            )
        if self.attn_type == "mla":
            for name in ("kv_lora_rank", "q_lora_rank", "qk_nope_head_dim", "v_head_dim"):
                require(getattr(self, name) >= 1, f"{p}.{name}", "must be ≥ 1 for attn_type=mla")
            require(
                self.qk_rope_head_dim >= 2 and self.qk_rope_head_dim % 2 == 0,
                f"{p}.qk_rope_head_dim",
                f"must be even and ≥ 2 (RoPE rotates pairs), got {self.qk_rope_head_dim}",
            )
        require(self.n_experts >= 1, f"{p}.n_experts", f"must be ≥ 1, got {self.n_experts}")
        require(
            1 <= self.n_experts_per_tok <= self.n_experts,
            f"{p}.n_experts_per_tok",
            f"top-k={self.n_experts_per_tok} must be in [1, n_experts={self.n_experts}]",
        )
        require(self.expert_dim >= 1, f"{p}.expert_dim", "must be ≥ 1")
        require(self.capacity_factor >= 0, f"{p}.capacity_factor", "must be ≥ 0 (0 = dropless)")
        require(self.router_bias_update_rate >= 0, f"{p}.router_bias_update_rate", "must be ≥ 0")
        require(self.aux_loss_coef >= 0, f"{p}.aux_loss_coef", "must be ≥ 0")
        require(0 < self.act_threshold <= 1, f"{p}.act_threshold", "must be in (0, 1]")
        require(0 <= self.dropout < 1, f"{p}.dropout", "must be in [0, 1)")
        require(self.attn_window >= 0, f"{p}.attn_window", "must be ≥ 0 (0 = full causal attention)")
        for name in ("prelude_attn_window", "coda_attn_window"):
            own = getattr(self, name)
            require(
                own == 0 or (self.attn_window > 0 and own >= 2),
                f"{p}.{name}",
                f"must be 0 (= attn_window) or ≥ 2 with a sliding attn_window, got {own}"
                f" with attn_window={self.attn_window}",
            )
        require(self.rope_theta > 0, f"{p}.rope_theta", "must be > 0")
        for name in ("init_std", "embed_init_std"):
            require(getattr(self, name) > 0, f"{p}.{name}", f"must be > 0, got {getattr(self, name)}")


@dataclass
class LoopPolicyConfig:
    """How many loops each training step runs (see mythos_dist.model.recurrent.LoopPolicy)."""

    kind: Literal["fixed", "uniform", "poisson_lognormal", "choice"] = "fixed"
    n_loops: int = 4  # fixed: the count; uniform / poisson_lognormal: the mean
    # choice: the counts drawn from, uniformly (repeat a value to weight it, as train.attn_windows)
    counts: tuple[int, ...] = ()
    min_loops: int = 1  # uniform: lower bound (inclusive)
    max_loops: int = 8  # uniform: upper bound; all: hard cap
    sigma: float = 0.5  # poisson_lognormal: std of the log-normal rate
    backprop_loops: int = 0  # truncated backprop through the last k loops; 0 = all

    def describe(self) -> str:
        """The policy in words, for logs and run notes: 'a fixed 4 loops', '1-16 loops drawn
        uniformly (mean 8), gradient through the last 4'."""
        if self.kind == "fixed":
            text = f"a fixed {self.n_loops} loops"
        elif self.kind == "uniform":
            text = f"{self.min_loops}-{self.max_loops} loops drawn uniformly (mean {self.n_loops})"
        elif self.kind == "choice":
            mean = sum(self.counts) / max(len(self.counts), 1)
            text = f"loops drawn uniformly from {list(self.counts)} (mean {mean:.1f})"
        else:
            text = f"loops drawn Poisson-log-normal (mean {self.n_loops}, σ {self.sigma}, at most {self.max_loops})"
        return text + (f", gradient through the last {self.backprop_loops}" if self.backprop_loops else "")

    def validate(self, prefix: str = "train.loops") -> None:
        require(self.n_loops >= 1, f"{prefix}.n_loops", f"loop counts must be ≥ 1, got {self.n_loops}")
        require(self.min_loops >= 1, f"{prefix}.min_loops", f"loop counts must be ≥ 1, got {self.min_loops}")
        require(
            self.max_loops >= max(self.min_loops, 1),
            f"{prefix}.max_loops",
            f"must be ≥ min_loops={self.min_loops}",
        )
        require(
            self.kind == "choice" or not self.counts,
            f"{prefix}.counts",
            f"only kind=choice draws from counts (kind={self.kind})",
        )
        if self.kind == "choice":
            require(self.counts, f"{prefix}.counts", "kind=choice needs the loop counts to draw from")
            require(
                all(1 <= n <= self.max_loops for n in self.counts),
                f"{prefix}.counts",
                f"every count must lie in [1, max_loops={self.max_loops}], got {list(self.counts)}",
            )
        elif self.kind != "fixed":
            require(
                self.min_loops <= self.n_loops <= self.max_loops,
                f"{prefix}.n_loops",
                f"mean {self.n_loops} must lie in [min_loops, max_loops]",
            )
        require(self.sigma >= 0, f"{prefix}.sigma", "must be ≥ 0")
        require(self.backprop_loops >= 0, f"{prefix}.backprop_loops", "must be ≥ 0 (0 = all loops)")
