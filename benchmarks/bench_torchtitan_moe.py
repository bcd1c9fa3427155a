"""Side-by-side speed of our MoE layer vs torchtitan's (PyPI torchtitan 0.3.0), one process.

    make bench-torchtitan      # installs torchtitan into .venv/bench-torchtitan, then runs this

torchtitan lives in its own directory (`pip install --no-deps --target .venv/bench-torchtitan
torchtitan==0.3.0` plus the few modules it imports at load: spmd_types, tyro, docstring_parser,
typeguard, torchdata, torch_checkpointing, and triton, which its token dispatcher imports even
on CPU) so our torch 2.13.0 CPU build stays the only torch. Its MoE as its DeepSeek-V3 models build
it: softmax top-k router with renormalised weights, grouped SwiGLU experts (its GroupedExperts
always casts to bf16 for the grouped GEMMs), one shared SwiGLU expert, dropless. Config as
bench_moe's MoE case: dim 256, 64 experts, expert_dim 128, shared width 128·k. Ours in fp32, and
ours in bf16 (parameters and activations) beside it, since torchtitan's experts run in bf16.
forward+backward tokens/s; CPU seconds of the process by default (robust on a shared machine).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_moe import host_line, time_pair  # noqa: E402

from mythos_dist.model.moe import MoEFFN  # noqa: E402

TITAN_DIR = HERE.parent / ".venv" / "bench-torchtitan"
DIM, N_EXPERTS, EXPERT_DIM = 256, 64, 128


def init_small(module: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(0)
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return module


def titan_layer(k: int) -> torch.nn.Module:
    sys.path.insert(0, str(TITAN_DIR))
    from torchtitan.models.common.feed_forward import FeedForward
    from torchtitan.models.common.linear import Linear
    from torchtitan.models.common.moe import GroupedExperts, MoE, RoutedExperts, TokenChoiceTopKRouter
    from torchtitan.models.common.token_dispatcher import LocalTokenDispatcher

    def linear(i: int, o: int) -> Linear.Config:
        return Linear.Config(in_features=i, out_features=o)

    shared = EXPERT_DIM * k
    cfg = MoE.Config(
        num_experts=N_EXPERTS,
        routed_experts=RoutedExperts.Config(
            inner_experts=GroupedExperts.Config(dim=DIM, hidden_dim=EXPERT_DIM, num_experts=N_EXPERTS),
            token_dispatcher=LocalTokenDispatcher.Config(num_experts=N_EXPERTS, top_k=k),
        ),
        router=TokenChoiceTopKRouter.Config(
            num_experts=N_EXPERTS, gate=linear(DIM, N_EXPERTS), top_k=k, score_func="softmax", route_norm=True
        ),
        shared_experts=FeedForward.Config(
            w1=linear(DIM, shared), w2=linear(shared, DIM), w3=linear(DIM, shared)
        ),
    )
    return init_small(cfg.build())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tokens", type=int, nargs="+", default=[512, 4096])
    ap.add_argument("--top-k", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    args = ap.parse_args()
    if not (TITAN_DIR / "torchtitan").is_dir():
        raise SystemExit(f"torchtitan is not installed in {TITAN_DIR}: run `make bench-torchtitan`")
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    print(host_line(args.threads, clock)[0] + f", clock={args.clock}")
    print(
        f"{'case':28s} {'ours fp32':>10s} {'ours bf16':>10s} {'titan':>10s} {'fp32/titan':>10s} {'bf16/titan':>10s}"
    )
    for k in args.top_k:
        ours = init_small(MoEFFN(DIM, N_EXPERTS, k, EXPERT_DIM, n_shared=1, shared_dim=EXPERT_DIM * k))
        ours_bf16 = init_small(MoEFFN(DIM, N_EXPERTS, k, EXPERT_DIM, n_shared=1, shared_dim=EXPERT_DIM * k))
        ours_bf16 = ours_bf16.to(torch.bfloat16)
        titan = titan_layer(k)
        for n in args.tokens:
            torch.manual_seed(1)
            x = torch.randn(1, n, DIM, requires_grad=True)
            x_bf16 = x.detach().to(torch.bfloat16).requires_grad_()

            def step_ours(layer=ours, x=x) -> None:
                layer(x)[0].sum().backward()

            def step_ours_bf16(layer=ours_bf16, x=x_bf16) -> None:
                layer(x)[0].float().sum().backward()

            def step_titan(layer=titan, x=x) -> None:
                layer(x).sum().backward()

            fns = {"fp32": step_ours, "bf16": step_ours_bf16, "titan": step_titan}
            secs = time_pair(fns, args.repeats, 1 if n > 1024 else 3, clock=clock)
            tps = {name: n / s for name, s in secs.items()}
            print(
                f"{f'k={k}, {n} tokens':28s} {tps['fp32']:10.0f} {tps['bf16']:10.0f} {tps['titan']:10.0f} "
                f"{tps['fp32'] / tps['titan']:9.2f}x {tps['bf16'] / tps['titan']:9.2f}x"
            )


if __name__ == "__main__":
    main()
