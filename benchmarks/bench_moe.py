"""Side-by-side speed of our MoE layer and training step vs open-mythos 0.5.0 (run in one process).

    make bench            # or: .venv/bin/python benchmarks/bench_moe.py --threads 1
    python benchmarks/bench_moe.py --device cuda --dtype bf16 --tokens 512 4096 65536 --batch 128 4096

Prints forward+backward tokens/s, achieved GFLOP/s (FLOPs counted with torch.utils.flop_counter)
and the fraction of this machine's measured fp32 matmul rate at the same thread count. The peer is
installed with `pip install --no-deps open-mythos==0.5.0` (the Makefile's bench target does it).
Interleaved repeats, median reported: these machines are noisy, so only the ratios are meaningful.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from data_pipeline.batch import chains_batch
from data_pipeline.digit_chain import TRAIN, generate
from mythos_dist.config import ModelConfig, TaskConfig
from mythos_dist.model import RDT
from mythos_dist.model import moe as moe_mod
from mythos_dist.model.moe import MoEFFN
from mythos_dist.objective import answer_forward, loss_and_metrics

DEVICE, DTYPE = torch.device("cpu"), torch.float32  # set once from the command line
CLOCK: Callable[[], float] = time.perf_counter  # --clock


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def peer_autocast() -> torch.autocast:
    """The peer upcasts attention scores to fp32 and then multiplies them with bf16 values, which
    fails with bf16 parameters; autocast makes it run. Our model runs in bf16 without it."""
    return torch.autocast(DEVICE.type, dtype=DTYPE, enabled=DTYPE.itemsize == 2)


def place(module: torch.nn.Module) -> torch.nn.Module:
    """To DEVICE, real tensors to DTYPE. Module.to(dtype) would also cast the peer's complex RoPE
    buffer to a real one (dropping the imaginary part), changing what it computes."""
    return module.to(DEVICE)._apply(lambda t: t.to(DTYPE) if t.is_floating_point() else t)


def matmul_gflops(n: int, reps: int = 20, clock: Callable[[], float] = time.perf_counter) -> float:
    a, b = (torch.randn(n, n, device=DEVICE, dtype=DTYPE) for _ in range(2))
    a @ b
    sync()
    t = clock()
    for _ in range(reps):
        a @ b
    sync()
    return 2 * n**3 * reps / (clock() - t) / 1e9


def host_line(threads: int, clock: Callable[[], float] = time.perf_counter) -> tuple[str, float]:
    """(the host line docs/benchmarks.md records: CPU model, vector ISA, threads, fp32 matmul rate
    at that thread count, timed with `clock` as the cases are; and that rate in GFLOP/s)."""
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    model = next((ln.split(":", 1)[1].strip() for ln in cpuinfo if ln.startswith("model name")), "?")
    peak = statistics.median(
        matmul_gflops(1024 if DEVICE.type == "cpu" else 8192, clock=clock) for _ in range(5)
    )
    # The CPU's vector ISA sets the matmul rate more than anything in our code (see docs/benchmarks.md).
    where = f"{model}, cpu={torch.backends.cpu.get_cpu_capability()}, threads={threads}"
    if DEVICE.type == "cuda":
        where = torch.cuda.get_device_name(DEVICE)
    dtype = {torch.float32: "fp32", torch.bfloat16: "bf16"}[DTYPE]
    return f"{where}, {dtype} matmul {peak:.1f} GFLOP/s, torch {torch.__version__}", peak


def count_flops(fn: Callable[[], None]) -> int:
    """FLOPs of one call. Our grouped GEMM is counted through its per-expert fallback and attention
    through SDPA's math backend (same math): torch's counter handles neither grouped_mm nor the
    fused attention kernels' grouped-query shapes."""
    works = moe_mod._grouped_mm_works
    moe_mod._grouped_mm_works = lambda *a: False
    try:
        with FlopCounterMode(display=False) as fc, sdpa_kernel(SDPBackend.MATH):
            fn()
    finally:
        moe_mod._grouped_mm_works = works
    return fc.get_total_flops()


def time_pair(
    fns: dict[str, Callable[[], None]],
    repeats: int,
    inner: int,
    fence: Callable[[], None] = sync,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, float]:
    """Median seconds per call, alternating the contenders so drift hits both alike. `fence` runs
    before and after each timed stretch (the device's sync; a barrier across ranks). `clock`:
    wall time, or time.process_time (this process's CPU seconds, user + system: on a CPU shared
    with other jobs it leaves out the time the process waits for a core)."""
    for fn in fns.values():
        fn()
        fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            fence()
            t = clock()
            for _ in range(inner):
                fn()
            fence()
            samples[name].append((clock() - t) / inner)
    return {k: statistics.median(v) for k, v in samples.items()}


def moe_case(n_tokens: int, repeats: int) -> list[tuple[str, float, float]]:
    from open_mythos.main import MoEFFN as RefMoE
    from open_mythos.main import MythosConfig

    dim, n_exp, top_k, edim = 256, 64, 4, 128
    torch.manual_seed(0)
    ours = MoEFFN(dim, n_exp, top_k, edim, n_shared=1, shared_dim=edim * top_k)
    for p in ours.parameters():
        torch.nn.init.normal_(p, std=0.02)
    ref = RefMoE(
        MythosConfig(dim=dim, n_experts=n_exp, n_experts_per_tok=top_k, expert_dim=edim, n_shared_experts=1)
    )
    ours, ref = place(ours), place(ref)
    x = torch.randn(1, n_tokens, dim, device=DEVICE, dtype=DTYPE, requires_grad=True)

    def step_ours() -> None:
        y, _ = ours(x)
        y.sum().backward()

    def step_ref() -> None:
        with peer_autocast():
            y = ref(x)
        y.sum().backward()

    secs = time_pair({"ours": step_ours, "ref": step_ref}, repeats, 1 if n_tokens > 1024 else 3, clock=CLOCK)
    flops = {"ours": count_flops(step_ours), "ref": count_flops(step_ref)}
    return [(k, n_tokens / secs[k], flops[k] / secs[k] / 1e9) for k in ("ours", "ref")]


def train_step_case(B: int, repeats: int) -> list[tuple[str, float, float]]:
    from open_mythos.main import MythosConfig, OpenMythos

    T, loops = 13, 4
    common = dict(
        vocab_size=12, dim=128, n_heads=4, n_kv_heads=2, max_seq_len=64, prelude_layers=1, coda_layers=1
    )
    torch.manual_seed(0)
    ours = RDT(
        ModelConfig(
            **common, attn_type="gqa", n_experts=8, n_experts_per_tok=2, expert_dim=64, max_loop_iters=16
        )
    )
    # ACT threshold above 1: the peer runs all 4 loops instead of exiting after 2-3 (same work as ours).
    ref_cfg = MythosConfig(**common, attn_type="gqa", n_experts=8, n_experts_per_tok=2, expert_dim=64,
                           n_shared_experts=1, max_loop_iters=loops, act_threshold=2.0, lora_rank=8)  # fmt: skip
    ref = OpenMythos(ref_cfg)
    ours, ref = place(ours), place(ref)
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-3)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    # One real batch of training chains (lengths 2-12, right-padded to 13 tokens) for both.
    batch = chains_batch(generate(TaskConfig(n_train=B, n_eval=100), TRAIN, 0, B))
    batch = {k: v.to(DEVICE) for k, v in batch.items()}
    ids, pos = batch["input_ids"], batch["length"]
    assert ids.shape == (B, T)

    def step_ours() -> None:
        loss, _ = loss_and_metrics(answer_forward(ours, batch, n_loops=loops), batch, ours.cfg)
        loss.backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)

    def step_ref() -> None:
        with peer_autocast():
            logits = ref(ids, n_loops=loops)[torch.arange(B, device=DEVICE), pos]
        F.cross_entropy(logits.float(), batch["answer"]).backward()
        opt_ref.step()
        opt_ref.zero_grad(set_to_none=True)

    secs = time_pair({"ours": step_ours, "ref": step_ref}, repeats, 2 if B <= 1024 else 1, clock=CLOCK)
    # Each side's FLOP/s counts what it executes; ours skips padding and non-answer positions.
    flops = {"ours": count_flops(step_ours), "ref": count_flops(step_ref)}
    return [(k, B * T / secs[k], flops[k] / secs[k] / 1e9) for k in ("ours", "ref")]


def main() -> None:
    global DEVICE, DTYPE, CLOCK
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="cpu: the process's CPU seconds for the cases and the matmul rate (on a shared CPU machine)",
    )
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--device", default="cpu", help="cpu | cuda")
    ap.add_argument(
        "--dtype", choices=["fp32", "bf16"], default="fp32", help="parameters and activations, both sides"
    )
    ap.add_argument("--tokens", type=int, nargs="+", default=[512, 4096], help="MoE layer cases")
    ap.add_argument(
        "--batch", type=int, nargs="+", default=[128], help="training-step cases (chains of 13 tokens)"
    )
    args = ap.parse_args()
    DEVICE, DTYPE = torch.device(args.device), {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible to torch")
    torch.set_num_threads(args.threads)
    # TF32 stays off (torch's default): fp32 numbers are true fp32 on both sides and in the rate.
    if args.clock == "cpu":
        if DEVICE.type != "cpu":
            raise SystemExit("--clock cpu: CPU time does not measure a GPU's work")
        CLOCK = time.process_time
    line, peak = host_line(args.threads, CLOCK)
    print(f"{line}, clock={args.clock}")
    rows = [(f"MoE layer fwd+bwd, {n} tokens", moe_case(n, args.repeats)) for n in args.tokens]
    rows += [
        (f"training step, batch {b} x 13, 4 loops", train_step_case(b, args.repeats)) for b in args.batch
    ]
    print(f"{'case':46s} {'impl':5s} {'tokens/s':>10s} {'GFLOP/s':>8s} {'of matmul':>9s} {'ours/ref':>8s}")
    for case, res in rows:
        ratio = res[0][1] / res[1][1]
        for impl, tps, gf in res:
            r = f"{ratio:7.2f}x" if impl == "ours" else ""
            print(f"{case:46s} {impl:5s} {tps:10.0f} {gf:8.1f} {gf / peak:8.1%} {r:>8s}")


if __name__ == "__main__":
    main()
