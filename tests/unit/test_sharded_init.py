"""Keyed initialisation and activation checkpointing of the looped block (single process).

The 2-rank versions (a rank's shard, no foreign experts, checkpointing under expert parallelism)
are in tests/distributed/test_scale.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mythos_dist.config import ConfigError, ModelConfig, load_config
from mythos_dist.model import RDT, attention_window
from mythos_dist.model.moe import GroupedExperts


def tiny(**kw) -> ModelConfig:
    base = dict(dim=32, n_heads=4, n_kv_heads=2, n_experts=4, n_experts_per_tok=2, expert_dim=16,
                max_seq_len=64, max_loop_iters=8, lora_rank=4, attn_sink=True, act_enabled=True)  # fmt: skip
    base.update(kw)
    return ModelConfig(**base)


def tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def random_names(model: nn.Module) -> set[str]:
    """The tensors drawn at random: Linear / Embedding weights and routed experts."""
    names = set()
    for prefix, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            names.add(f"{prefix}.weight")
        elif isinstance(m, GroupedExperts):
            names |= {f"{prefix}.w_in_EDH", f"{prefix}.w_out_EHD"}
    return names


def meta_shard(cfg: ModelConfig, seed: int, ep_size: int, ep_rank: int) -> RDT:
    """What build_model does on one rank: meta build, keep this rank's experts, materialise, init."""
    with torch.device("meta"):
        model = RDT(cfg)
    n_local = cfg.n_experts // ep_size
    for moe in model.moe_layers():
        moe.experts.shard(ep_rank * n_local, n_local)
    model.to_empty(device="cpu")
    model.reset_parameters(seed)
    return model


@pytest.mark.parametrize("ep_size", [1, 2, 4])
def test_every_shard_equals_the_slice_of_the_full_keyed_init(ep_size: int) -> None:
    cfg = tiny()
    full = RDT(cfg)
    full.reset_parameters(seed=5)
    want = tensors(full)
    n_local = cfg.n_experts // ep_size
    for rank in range(ep_size):
        got = tensors(meta_shard(cfg, 5, ep_size, rank))
        assert got.keys() == want.keys()
        for name, t in got.items():
            ref = want[name][rank * n_local : (rank + 1) * n_local] if ".experts.w_" in name else want[name]
            assert torch.equal(t, ref), f"ep_size={ep_size} rank {rank}: {name}"


def test_keyed_init_keeps_the_distributions_and_constants_of_the_default_init() -> None:
    cfg = tiny(embed_init_std=1.0)
    torch.manual_seed(0)
    default = tensors(RDT(cfg))
    model = meta_shard(cfg, 3, 1, 0)
    other_seed = tensors(meta_shard(cfg, 4, 1, 0))
    drawn = random_names(model)
    for name, t in tensors(model).items():
        if name not in drawn:  # constants (norm gains, LTI, LoRA up/scale, sinks, router buffers, biases)
            assert torch.equal(t, default[name]), name
            continue
        std = 1.0 if name == "embed.weight" else cfg.init_std
        assert abs(t.std().item() / std - 1) < 5 / math.sqrt(2 * t.numel()), name  # 5 sampling sigmas
        assert not torch.equal(t, other_seed[name]), f"{name} does not depend on the seed"
    # every expert of a layer gets its own values (keyed by global id, not by local index)
    w = model.recurrent.block.ffn.experts.w_in_EDH
    assert not torch.equal(w[0], w[1])
    assert torch.equal(meta_shard(cfg, 3, 2, 1).recurrent.block.ffn.experts.w_in_EDH[0], w[2])


def test_keyed_init_in_bf16_is_the_fp32_init_rounded() -> None:
    """A model materialised in bf16 (build_model when training in bf16; values drawn in fp32 on the
    CPU and copied, as for CUDA tensors) holds the fp32 initialisation rounded to bf16."""
    cfg = tiny()
    with torch.device("meta"):
        model = RDT(cfg).to(torch.bfloat16)
    model.to_empty(device="cpu")
    model.reset_parameters(seed=5)
    want = meta_shard(cfg, 5, 1, 0).to(torch.bfloat16)
    for (name, got), ref in zip(tensors(model).items(), tensors(want).values()):
        assert got.dtype == torch.bfloat16 and torch.equal(got, ref), name


def test_shard_refuses_experts_it_does_not_hold() -> None:
    experts = GroupedExperts(8, 4, n_local=2, first_expert_id=2)
    with pytest.raises(ValueError, match=r"experts \[0, 2\) are not among the \[2, 4\) held"):
        experts.shard(0, 2)


# --------------------------------------------------------------------------- activation checkpointing


def loss_and_grads(
    model: RDT, ids: torch.Tensor, checkpointing: bool, **fwd
) -> tuple[torch.Tensor, dict, torch.Tensor]:
    model.recurrent.checkpoint_loops = checkpointing
    model.zero_grad()
    torch.manual_seed(11)  # dropout draws
    out = model(ids, **fwd)
    loss = out.logits.float().square().mean() + out.aux_loss + 0.01 * out.ponder_cost
    loss = loss + sum(v.square().mean() for v in out.loop_logits.values())
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    load = torch.stack([m.router.load_E.clone() for m in model.moe_layers()])
    for m in model.moe_layers():
        m.router.load_E.zero_()
    return loss.detach(), grads, load


MLA = dict(
    attn_type="mla", kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8
)


@pytest.mark.parametrize(
    ("model_kw", "fwd"),
    [
        ({}, dict(n_loops=3)),
        ({}, dict(n_loops=5, loops_out=[1, 2, 4])),  # several loop counts' logits from one pass
        ({}, dict(n_loops=4, backprop_loops=2)),  # truncated backprop
        ({"act_enabled": False, **MLA}, dict(n_loops=3)),
        ({"dropout": 0.1, "capacity_factor": 1.0}, dict(n_loops=3)),  # recomputation redraws the same dropout
    ],
)
def test_loop_checkpointing_gives_the_same_losses_gradients_and_load(model_kw: dict, fwd: dict) -> None:
    model = RDT(tiny(**model_kw)).train()
    model.reset_parameters(seed=1)
    ids = torch.randint(0, 12, (3, 10), generator=torch.Generator().manual_seed(2))
    loss0, grads0, load0 = loss_and_grads(model, ids, False, **fwd)
    loss1, grads1, load1 = loss_and_grads(model, ids, True, **fwd)
    torch.testing.assert_close(loss1, loss0, rtol=1e-6, atol=1e-7)
    assert grads1.keys() == grads0.keys()
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-5, atol=1e-7, msg=name)
    assert torch.equal(load1, load0) and load0.sum() > 0  # the recomputation does not count load again


def test_recomputation_uses_the_attention_window_of_the_forward() -> None:
    """train.attn_windows sets the window around the forward only; backward (which recomputes the
    iterations) runs after it is restored, and must still see the forward's window."""
    model = RDT(tiny(attn_window=6, act_enabled=False)).train()
    ids = torch.randint(0, 12, (2, 12), generator=torch.Generator().manual_seed(3))
    grads = []
    for checkpointing in (False, True):
        model.recurrent.checkpoint_loops = checkpointing
        model.zero_grad()
        with attention_window(model, 2):
            out = model(ids, n_loops=3)
        out.logits.square().mean().backward()  # outside: windows back to 6
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)


def saved_bytes(model: RDT, ids: torch.Tensor, n_loops: int) -> int:
    """Bytes autograd keeps from the forward, counted where the graph stores them (distinct storages)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(ids, n_loops=n_loops)
    del out  # kept until counted: no saved storage is freed and its address reused
    return sum(seen.values())


def test_loop_checkpointing_keeps_only_the_loop_state_per_loop() -> None:
    cfg = tiny(act_enabled=False, dim=64, expert_dim=64)
    model = RDT(cfg).train()
    ids = torch.randint(0, 12, (4, 32))
    state_bytes = 4 * 32 * cfg.dim * 4  # one (N, D) fp32 tensor
    model.recurrent.checkpoint_loops = False
    per_loop_none = (saved_bytes(model, ids, 8) - saved_bytes(model, ids, 2)) / 6
    model.recurrent.checkpoint_loops = True
    per_loop_ckpt = (saved_bytes(model, ids, 8) - saved_bytes(model, ids, 2)) / 6
    # Without checkpointing every loop keeps its attention, MoE and norm activations; with it, the
    # graph outside the recomputed iterations keeps nothing per loop (the iteration's input, the
    # loop state h, stays referenced by the checkpoint itself).
    assert per_loop_none > 10 * state_bytes
    assert per_loop_ckpt <= state_bytes


def test_activation_checkpointing_setting_is_validated() -> None:
    assert load_config(None, ["train.activation_checkpointing=loop"]).train.activation_checkpointing == "loop"
    with pytest.raises(
        ConfigError, match=r"train\.activation_checkpointing: must be one of \['none', 'loop'\], got 'all'"
    ):
        load_config(None, ["train.activation_checkpointing=all"])
