"""torch.compile of the looped block on CPU vs eager: one training step side by side (one process).

    .venv/bin/python benchmarks/bench_compile.py [--repeats 7] [--batch 128]

The bench_moe training step (dim 128, GQA, 8 experts top-2, 4 loops, one real batch of chains,
AdamW left out: forward + backward only) with `RecurrentBlock.step` compiled by inductor, beside
the same model in eager. What cannot be compiled, and why:
- the routed experts' grouped GEMM (`GroupedExperts.forward`) runs in eager (torch.compiler.disable):
  torch's fake-tensor kernel for `_grouped_mm` accepts only bf16, so fp32 cannot be traced although
  the CPU kernel runs it (and the per-expert fallback needs host counts);
- the loop index is a Python int: one graph per loop index (recompiles up to the loop count).
Prints the compile time (first step), the graph breaks, whether the losses agree, and CPU seconds per step
(time.process_time, alternated, median).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_moe import host_line

from data_pipeline.batch import chains_batch
from data_pipeline.digit_chain import TRAIN, generate
from mythos_dist.config import ModelConfig, TaskConfig
from mythos_dist.model import RDT
from mythos_dist.model import moe as moe_mod
from mythos_dist.objective import answer_forward, loss_and_metrics


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--batch", type=int, default=128)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(host_line(1, time.process_time)[0] + ", clock=cpu")
    common = dict(
        vocab_size=12, dim=128, n_heads=4, n_kv_heads=2, max_seq_len=64, prelude_layers=1, coda_layers=1
    )
    cfg = ModelConfig(
        **common, attn_type="gqa", n_experts=8, n_experts_per_tok=2, expert_dim=64, max_loop_iters=16
    )
    batch = chains_batch(generate(TaskConfig(n_train=args.batch, n_eval=100), TRAIN, 0, args.batch))
    models = {}
    for name in ("eager", "compiled"):
        torch.manual_seed(0)
        models[name] = RDT(cfg)
    moe_mod.GroupedExperts.forward = torch.compiler.disable(moe_mod.GroupedExperts.forward)
    models["compiled"].recurrent.step = torch.compile(models["compiled"].recurrent.step)

    def step(model: RDT) -> float:
        loss, _ = loss_and_metrics(answer_forward(model, batch, n_loops=4), batch, cfg)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss.item()

    loss_eager = step(models["eager"])
    t = time.perf_counter()
    loss_compiled = step(models["compiled"])
    print(f"compile (first step): {time.perf_counter() - t:.0f} s wall")
    print(f"loss eager {loss_eager!r}, compiled {loss_compiled!r}")
    breaks = torch._dynamo.utils.counters["graph_break"]
    print(f"graph breaks: {sum(breaks.values())} ({'; '.join(k.splitlines()[0] for k in breaks)})")
    secs: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.repeats):
        for name, model in models.items():
            t = time.process_time()
            step(model)
            secs[name].append(time.process_time() - t)
    med = {name: statistics.median(s) for name, s in secs.items()}
    print(
        f"fwd+bwd per step: eager {med['eager'] * 1e3:.1f} ms, compiled {med['compiled'] * 1e3:.1f} ms, "
        f"eager / compiled {med['eager'] / med['compiled']:.2f}x"
    )


if __name__ == "__main__":
    main()
