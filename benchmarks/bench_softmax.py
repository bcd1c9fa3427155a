"""The padded CPU softmax (mythos_dist/model/softmax.py) against torch's own, side by side in one process.

    .venv/bin/python benchmarks/bench_softmax.py [--repeats 9]

1. The kernel alone, forward + backward, at the shapes the main job's model gives it: attention
   scores of 128 chains (2 KV heads × 2 stacked query heads, 13 keys plus the sink) and the router's
   8 experts per row.
2. One training step (forward + backward, no optimizer) of each recipe the main job trains, one
   process, one real batch of 128 chains: the seed protocol (4 loops) and recipe 7 (7 loops, gradient
   through the last 4, attention window 3), with padding on and off, alternated.
CPU seconds (time.process_time), median of the repeats; ratios are off / on in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_moe import host_line

from data_pipeline.batch import chains_batch
from data_pipeline.digit_chain import TRAIN, generate
from mythos_dist.config import load_config
from mythos_dist.model import RDT, attention_window, softmax
from mythos_dist.objective import answer_forward, loss_and_metrics

ROOT = Path(__file__).resolve().parents[1]


def set_padding(on: bool) -> None:
    (softmax._PADDED_ON.add if on else softmax._PADDED_ON.discard)("cpu")


def seconds(fn: Callable[[], None], on: bool) -> float:
    set_padding(on)
    t = time.process_time()
    fn()
    return time.process_time() - t


def side_by_side(fn: Callable[[], None], repeats: int) -> tuple[float, float]:
    """(median s off, median s on), alternated so drifts of the machine fall on both."""
    for on in (False, True):
        seconds(fn, on)  # warm-up
    off, on = [], []
    for _ in range(repeats):
        off.append(seconds(fn, False))
        on.append(seconds(fn, True))
    set_padding(True)
    return statistics.median(off), statistics.median(on)


def kernel_case(shape: tuple[int, ...], masked: bool) -> Callable[[], None]:
    x = torch.randn(shape)
    if masked:  # causal / window masking: most keys of a short window are −inf
        x[..., 4:13] = float("-inf")
    x.requires_grad_()
    g = torch.randn(shape)

    def fn() -> None:
        for _ in range(20):
            softmax.softmax_lastdim(x).backward(g)

    return fn


def step_case(config: str, seed: int = 0) -> tuple[str, Callable[[], None]]:
    cfg = load_config(str(ROOT / "configs" / config), [])
    torch.manual_seed(seed)
    model = RDT(cfg.model).train()
    batch = chains_batch(generate(cfg.data.task, TRAIN, 0, 128))
    loops = cfg.train.loops
    n_loops = loops.n_loops if loops.kind == "fixed" else 7
    backprop = min(loops.backprop_loops, n_loops)
    window = min(cfg.train.attn_windows) if cfg.train.attn_windows else None

    def fn() -> None:
        with attention_window(model, window):
            out = answer_forward(model, batch, n_loops, backprop_loops=backprop)
            loss, _ = loss_and_metrics(out, batch, cfg.model)
        loss.backward()

    what = f"{config}: {n_loops} loops" + (f", gradient through {backprop}" if backprop else "")
    return what + (f", window {window}" if window else ""), fn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(host_line(1, time.process_time)[0])
    print(f"{'case':<70} {'torch ms':>9} {'padded ms':>9} {'torch/padded':>12}")
    cases = [
        ("attention scores (128, 2, 26, 14), 20 × fwd+bwd", kernel_case((128, 2, 26, 14), True)),
        ("router scores (1664, 8), 20 × fwd+bwd", kernel_case((1664, 8), False)),
        step_case("digit_chain.yaml"),
        step_case("digit_chain_recipe7.yaml"),
    ]
    for what, fn in cases:
        off, on = side_by_side(fn, args.repeats)
        print(f"{what:<70} {1e3 * off:>9.1f} {1e3 * on:>9.1f} {off / on:>11.2f}×")


if __name__ == "__main__":
    main()
