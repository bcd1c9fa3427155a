"""CUDA checks: the same model on a GPU computes what it computes on the CPU, and trains in bf16.

Marked `cuda` and deselected by default (pyproject addopts): CI has no GPU. Run on a GPU machine with
`pytest -m cuda tests/gpu` (benchmarks/gpu_check.sh does, next to the model tests on CUDA).
"""

import copy
import math

import pytest
import torch

from data_pipeline.batch import chains_batch
from data_pipeline.digit_chain import TRAIN, generate
from mythos_dist.config import ModelConfig, TaskConfig
from mythos_dist.model import RDT, KVCache
from mythos_dist.model import moe as moe_mod
from mythos_dist.model.moe import MoEFFN
from mythos_dist.objective import answer_forward, loss_and_metrics

pytestmark = pytest.mark.cuda
CUDA = torch.device("cuda")


def digit_chain_model(attn_type: str) -> RDT:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=12, dim=64, n_heads=4, n_kv_heads=2, max_seq_len=64, attn_type=attn_type,
                      n_experts=8, n_experts_per_tok=2, expert_dim=32, kv_lora_rank=32, q_lora_rank=32,
                      qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, max_loop_iters=8)  # fmt: skip
    return RDT(cfg)


def chain_batch(n: int, index: int, device: torch.device) -> dict[str, torch.Tensor]:
    """The index-th batch of n training chains."""
    batch = chains_batch(generate(TaskConfig(n_train=40_000, n_eval=100), TRAIN, index * n, (index + 1) * n))
    return {k: v.to(device) for k, v in batch.items()}


def test_cuda_is_present() -> None:
    assert torch.cuda.is_available(), "these tests are meant for a GPU machine"


@pytest.mark.parametrize("attn_type", ["gqa", "mla"])
def test_loss_and_grads_on_cuda_equal_cpu(attn_type: str) -> None:
    """fp32, TF32 off (torch's default for matmul): the answer-only forward, MoE dispatch and
    backward agree with the CPU to float32 rounding."""
    cpu = digit_chain_model(attn_type)
    gpu = copy.deepcopy(cpu).to(CUDA)
    losses, grads = [], []
    for model, dev in ((cpu, torch.device("cpu")), (gpu, CUDA)):
        batch = chain_batch(64, 0, dev)
        loss, _ = loss_and_metrics(answer_forward(model, batch, n_loops=4), batch, model.cfg)
        loss.backward()
        losses.append(loss.detach().cpu())
        grads.append({n: p.grad.detach().cpu() for n, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=1e-5)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 20
    for name, g_cpu in grads[0].items():
        scale = g_cpu.abs().max().clamp(min=1e-6)
        assert (grads[1][name] - g_cpu).abs().max() / scale < 1e-3, name


@pytest.mark.parametrize("attn_type", ["gqa", "mla"])
def test_cached_decode_on_cuda_equals_full_forward_bf16(attn_type: str) -> None:
    model = digit_chain_model(attn_type).to(CUDA, torch.bfloat16).eval()
    ids = torch.randint(0, 12, (4, 20), device=CUDA)
    with torch.no_grad():
        full = model(ids, n_loops=4).logits.float()
        cache = KVCache()
        parts = [
            model(ids[:, a:b], n_loops=4, cache=cache).logits.float() for a, b in [(0, 9), (9, 10), (10, 20)]
        ]
    # bf16: compare against the spread of the logits, not elementwise float32 tolerances
    err = (torch.cat(parts, dim=1) - full).norm() / full.norm()
    assert err < 2e-2


def test_grouped_mm_kernel_is_used_in_bf16_and_equals_per_expert_loop() -> None:
    assert moe_mod._grouped_mm_works("cuda", torch.bfloat16), "F.grouped_mm unavailable for bf16 on this GPU"
    torch.manual_seed(0)
    layer = MoEFFN(256, 64, 4, 128, n_shared=1, shared_dim=512).to(CUDA, torch.bfloat16)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(4096, 256, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
    y_fast, _ = layer(x[None])
    gx_fast, gw_fast = torch.autograd.grad(y_fast.float().square().sum(), [x, layer.experts.w_in_EDH])
    works = moe_mod._grouped_mm_works
    moe_mod._grouped_mm_works = lambda *a: False  # the per-expert loop, same math
    try:
        y_loop, _ = layer(x[None])
        gx_loop, gw_loop = torch.autograd.grad(y_loop.float().square().sum(), [x, layer.experts.w_in_EDH])
    finally:
        moe_mod._grouped_mm_works = works
    for fast, loop in ((y_fast, y_loop), (gx_fast, gx_loop), (gw_fast, gw_loop)):
        assert ((fast.float() - loop.float()).norm() / loop.float().norm()) < 1e-2


def test_bf16_training_on_cuda_fits_a_batch() -> None:
    """bf16 parameters, AdamW at 4 loops: 150 steps on one batch of 64 chains drive the answer
    cross-entropy from chance (ln 7 ≈ 1.95) to under a third of it (forward, backward through
    the loops and the MoE, optimizer, all on the GPU)."""
    model = digit_chain_model("gqa").to(CUDA, torch.bfloat16).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    batch = chain_batch(64, 0, CUDA)
    losses = []
    for _ in range(150):
        loss, _ = loss_and_metrics(answer_forward(model, batch, n_loops=4), batch, model.cfg)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert all(map(math.isfinite, losses))
    assert losses[0] > 1.5 and min(losses[-10:]) < 0.65, losses[::10]


def test_host_tensor_collectives_under_nccl(tmp_path) -> None:
    """The trainer's counters and flags are CPU tensors; NCCL reduces CUDA tensors only."""
    import torch.distributed as dist

    from mythos_dist.comm import all_reduce_host

    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        out = all_reduce_host(torch.tensor([3.0, 1.0], dtype=torch.float64), dist.ReduceOp.MAX)
        assert out.device.type == "cpu" and out.tolist() == [3.0, 1.0]
    finally:
        dist.destroy_process_group()
