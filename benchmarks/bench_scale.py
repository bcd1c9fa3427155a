"""Scale benchmark: memory per rank of configs/scales/mythos_1b.yaml on 2 CPU ranks, beside `mythos plan`.

  python benchmarks/bench_scale.py [--budget-gib 12] [--part all|1b|loops] [--plot docs/scale_loops.png]

Part "1b": the 1B config (vocabulary 512 instead of 32000, sequences of 128 tokens, micro batch 1,
fp32 as on CPU, ZeRO-2, activation_checkpointing=loop, reduce bucket 5e7 elements) on 2 ranks
(torchrun, gloo). The planner decides first, for the memory a rank may use (--budget-gib, both
ranks together, less the runtime's own resident memory): a layout it refuses is not launched;
only its model build is measured, which fits. Then the largest expert count at which EP=2 fits is
trained for 2 steps (EP=1 there too when the planner lets it). Peak RSS per rank (VmHWM) after
the model build, after the engine build and through steps 1 and 2, each less the process's RSS
before the build, beside the planner's prediction and the lower bound (the bytes a rank must
hold: its weights; + the fp32 master partition; + moments and gradient partition).

Part "loops": activation memory of one forward+backward against the loop count (4, 8, 16, 32)
with and without checkpointing, at a mid-size config, each in a fresh process: peak RSS over the
RSS before the step (weights and gradients already allocated), beside the planner's count.

A watchdog kills a job whose processes together exceed --budget-gib. glibc's mmap threshold is
fixed (MALLOC_MMAP_THRESHOLD_) so freed tensors leave the resident set at once.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GiB = 2**30
SEQ_LEN = 128
ONE_B = [
    "model.vocab_size=512", "train.dtype=fp32", "train.micro_batch_size=1", "parallel.zero_stage=2",
    "train.activation_checkpointing=loop", "tracking.enabled=false",
    "parallel.ds_config_override={zero_optimization: {reduce_bucket_size: 50000000}}",
]  # fmt: skip
# configs/scales/mythos_1b.yaml's shape (2 + 2 dense layers, 2 shared experts, top-4) at a quarter of its width.
MID = ["model.vocab_size=512", "model.dim=512", "model.n_heads=8", "model.n_kv_heads=4", "model.prelude_layers=2",
       "model.coda_layers=2", "model.n_experts=16", "model.n_experts_per_tok=4", "model.n_shared_experts=2",
       "model.expert_dim=512", "model.max_seq_len=256", "model.max_loop_iters=32", "tracking.enabled=false"]  # fmt: skip
MID_BATCH, MID_SEQ = 2, 256
LAUNCHER = 0.15 * GiB  # torchrun's agent process, counted by the watchdog


def rss(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def host_line() -> str:
    import torch

    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    model = next((ln.split(":", 1)[1].strip() for ln in cpuinfo if ln.startswith("model name")), "?")
    flags = next((ln for ln in cpuinfo if ln.startswith("flags")), "")
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    torch.set_num_threads(1)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    gflops = 2 * 1024**3 * 10 / (time.perf_counter() - t) / 1e9
    return f"{model}, {isa}, 1-thread fp32 matmul {gflops:.1f} GFLOP/s, torch {torch.__version__}"


def fixed_batch(batch: int, seq_len: int, vocab: int, seed: int):
    """Random tokens, the answer predicted at the last position (every token counted)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    loss_mask = torch.zeros(batch, seq_len, dtype=torch.bool)
    loss_mask[:, -1] = True
    return {
        "input_ids": torch.randint(0, vocab, (batch, seq_len), generator=g),
        "loss_mask": loss_mask,
        "answer": torch.randint(0, 10, (batch,), generator=g),
    }


# --------------------------------------------------------------------------- rank workers


def worker_1b(out: Path, sets: list[str], phases: str) -> None:
    import torch

    from mythos_dist.config import ModelConfig, load_config
    from mythos_dist.model import RDT
    from mythos_dist.objective import answer_forward, loss_and_metrics
    from mythos_dist.parallel import build_engine, build_model, init_distributed

    cfg = load_config(REPO / "configs" / "scales" / "mythos_1b.yaml", sets)
    info = init_distributed(600)
    with torch.device("meta"):  # the first meta build loads ~70 MB of torch code: not the model's
        RDT(ModelConfig())
    rec: dict[str, float] = {"rss_before_build": rss()}
    reset_peak()
    model = build_model(cfg, info.device)
    rec["build"] = rss("VmHWM")
    rec["own_param_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    if phases == "step":
        engine, _ = build_engine(model, cfg, info.world_size, log=lambda *_: None)
        rec["engine"] = rss("VmHWM")
        for step in (1, 2):
            batch = fixed_batch(1, SEQ_LEN, cfg.model.vocab_size, 100 * step + info.rank)
            loss, _ = loss_and_metrics(
                answer_forward(engine, batch, cfg.train.loops.n_loops), batch, cfg.model
            )
            engine.backward(loss)
            engine.step()
            rec[f"step{step}"] = rss("VmHWM")
            rec[f"loss{step}"] = loss.item()
    (out / f"rank{info.rank}.json").write_text(json.dumps(rec))


def worker_loops(out: Path, n_loops: int, checkpointing: str) -> None:
    import torch

    from mythos_dist.config import load_config
    from mythos_dist.model import RDT
    from mythos_dist.objective import answer_forward, loss_and_metrics

    torch.set_num_threads(1)
    cfg = load_config(None, [*MID, f"train.activation_checkpointing={checkpointing}"])
    model = RDT(cfg.model).train()
    model.recurrent.checkpoint_loops = checkpointing == "loop"
    batch = fixed_batch(MID_BATCH, MID_SEQ, cfg.model.vocab_size, 0)

    def step() -> None:
        loss, _ = loss_and_metrics(answer_forward(model, batch, n_loops), batch, cfg.model)
        loss.backward()

    step()  # gradients now exist: the measured step allocates activations (and backward temporaries) only
    reset_peak()
    before = rss()
    step()
    (out / f"loops{n_loops}_{checkpointing}.json").write_text(json.dumps({"act": rss("VmHWM") - before}))


# --------------------------------------------------------------------------- driver


def run_watched(cmd: list[str], budget: int, log: Path) -> int:
    """Run cmd in its own process group; kill the group if its resident memory exceeds budget."""
    import psutil

    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", MALLOC_MMAP_THRESHOLD_="131072",
               PYTHONPATH=str(REPO))  # fmt: skip
    with open(log, "w") as f:
        proc = subprocess.Popen(
            cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO
        )
    killed = []

    def watch() -> None:
        while proc.poll() is None:
            try:
                root = psutil.Process(proc.pid)
                total = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
            except psutil.Error:
                total = 0
            if total > budget:
                killed.append(total)
                os.killpg(proc.pid, signal.SIGKILL)
                return
            time.sleep(0.2)

    threading.Thread(target=watch, daemon=True).start()
    rc = proc.wait()
    if killed:
        raise SystemExit(f"watchdog: {' '.join(cmd[-6:])} reached {killed[0] / GiB:.2f} GiB > budget; killed")
    return rc


def torchrun(*args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        __file__,
        *args,
    ]


def gib(n: float) -> str:
    return f"{n / GiB:.2f}"


def part_1b(args: argparse.Namespace, out: Path, baseline: int) -> list[str]:
    from mythos_dist.config import load_config
    from mythos_dist.plan import plan

    per_rank = (args.budget_gib * GiB - LAUNCHER) / 2
    lines = [
        "| layout | planner: job needs (GiB) | launched | phase | measured peak − RSS before build (GiB) "
        "| planner (GiB) | measured / planner | lower bound (GiB) | measured / lower bound |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def cfg_sets(ep: int, n_experts: int) -> list[str]:
        return [*ONE_B, f"parallel.ep_size={ep}", f"model.n_experts={n_experts}"]

    def plan_for(ep: int, n_experts: int):
        return plan(
            load_config(REPO / "configs" / "scales" / "mythos_1b.yaml", cfg_sets(ep, n_experts)),
            2,
            SEQ_LEN,
            "cpu",
        )

    def device_mem() -> float:
        """What a rank may give to tensors: its share of the budget less the runtime's own memory
        (the largest RSS before the build seen so far; the driver's own RSS until a rank reports)."""
        return per_rank - baseline

    cases = [(1, 64), (2, 64)]
    fitting = None
    for ep, n_experts in cases:
        p = plan_for(ep, n_experts)
        fits = p.peak(True) <= device_mem()
        name = f"EP={ep}, {n_experts} experts"
        where = out / f"ep{ep}_e{n_experts}"
        where.mkdir(parents=True, exist_ok=True)
        # A refused layout is not trained; its build alone (this rank's weights) is still measured.
        phases = "step" if fits else "build"
        sets = [a for s in cfg_sets(ep, n_experts) for a in ("--set", s)]
        rc = run_watched(torchrun("--worker", "1b", str(where), "--phases", phases, *sets), args.budget_gib * GiB,
                         where / "log.txt")  # fmt: skip
        recs = [
            json.loads((where / f"rank{r}.json").read_text())
            for r in (0, 1)
            if (where / f"rank{r}.json").is_file()
        ]
        if rc != 0 or len(recs) < 2:
            lines.append(f"| {name} | {gib(p.peak(True))} | failed (rc {rc}), see {where / 'log.txt'} |")
            continue
        verdict = "yes" if fits else "refused by the planner"
        bound_step = p.params + p.master + p.moments + p.partition_numel * 4
        rows = [("model build", "build", p.params, p.params), ("engine build", "engine", p.engine_built, p.params + p.master),
                ("step 1", "step1", p.total(True), bound_step), ("step 2", "step2", p.total(True), bound_step)]  # fmt: skip
        for phase, key, predicted, bound in rows:
            if key not in recs[0]:
                continue
            measured = max(r[key] - r["rss_before_build"] for r in recs)
            lines.append(
                f"| {name} | {gib(p.peak(True))} | {verdict} | {phase} | {gib(measured)} | {gib(predicted)} | "
                f"{measured / predicted:.2f} | {gib(bound)} | {measured / bound:.2f} |"
            )
        if "build" in recs[0]:
            own = recs[0]["own_param_bytes"]
            lines.append(f"|   | build peak / this rank's own parameter bytes ({gib(own)} GiB) | | | "
                         f"{max(r['build'] - r['rss_before_build'] for r in recs) / own:.3f} | | | | |")  # fmt: skip
        if "loss2" in recs[0]:
            lines.append(
                f"|   | losses rank 0: {recs[0]['loss1']:.4f}, {recs[0]['loss2']:.4f} | | | | | | | |"
            )
        baseline = max(baseline, *(r["rss_before_build"] for r in recs))
        if len(cases) == 2 and (ep, n_experts) == (2, 64):  # now the runtime's memory is known
            fitting = next((n for n in (64, 32, 16, 8, 4) if plan_for(2, n).peak(True) <= device_mem()), None)
            if fitting not in (None, 64):
                cases += [(1, fitting), (2, fitting)]
    lines.insert(
        0,
        f"memory a rank may use: {gib(per_rank)} GiB (budget {args.budget_gib} GiB for both ranks and the launcher) "
        f"less the runtime's {gib(baseline)} GiB (RSS before the build) = {gib(device_mem())} GiB for tensors "
        "(the planner's device memory)",
    )
    lines.append(f"largest expert count at which EP=2 fits: {fitting}")
    return lines


def part_loops(args: argparse.Namespace, out: Path) -> list[str]:
    from mythos_dist.config import load_config
    from mythos_dist.plan import activation_bytes

    cfg = load_config(None, MID)
    loops = (4, 8, 16, 32)
    measured: dict[str, list[float]] = {"none": [], "loop": []}
    planned: dict[str, list[float]] = {"none": [], "loop": []}
    for mode in ("none", "loop"):
        for n in loops:
            predicted = activation_bytes(
                cfg.model, MID_BATCH, MID_SEQ, n, 0, mode == "loop", device_type="cpu"
            )
            if predicted > args.budget_gib * GiB * 0.8:
                raise SystemExit(f"loops {n} {mode}: planner says {gib(predicted)} GiB; lower the size")
            rc = run_watched([sys.executable, __file__, "--worker", "loops", str(out), "--loops", str(n), "--mode", mode],
                             args.budget_gib * GiB, out / f"log_loops{n}_{mode}.txt")  # fmt: skip
            if rc != 0:
                raise SystemExit(f"loops {n} {mode} failed, see {out}")
            measured[mode].append(json.loads((out / f"loops{n}_{mode}.json").read_text())["act"])
            planned[mode].append(predicted)
    lines = [
        f"mid-size config: {' '.join(MID[:-1])}; batch {MID_BATCH} x {MID_SEQ} tokens, fp32, 1 thread",
        "| loops | none: measured (MiB) | none: planner (MiB) | loop: measured (MiB) | loop: planner (MiB) |",
        "|---|---|---|---|---|",
    ]
    for i, n in enumerate(loops):
        lines.append(f"| {n} | {measured['none'][i] / 2**20:,.0f} | {planned['none'][i] / 2**20:,.0f} | "
                     f"{measured['loop'][i] / 2**20:,.0f} | {planned['loop'][i] / 2**20:,.0f} |")  # fmt: skip
    for mode in ("none", "loop"):
        lines.append(f"{mode}: 32 loops / 4 loops = {measured[mode][-1] / measured[mode][0]:.2f} (measured)")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for mode, color in (("none", "tab:red"), ("loop", "tab:blue")):
            ax.plot(loops, [m / 2**20 for m in measured[mode]], "o-", color=color, label=f"{mode}: measured")
            ax.plot(loops, [m / 2**20 for m in planned[mode]], "x--", color=color, label=f"{mode}: planner")
        ax.set_xscale("log", base=2)
        ax.set_xticks(loops, [str(n) for n in loops])
        ax.set_xlabel("loops per step")
        ax.set_ylabel("activation memory of one step (MiB)")
        ax.set_title("train.activation_checkpointing: none vs loop")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        lines.append(f"plot: {args.plot}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget-gib", type=float, default=12.0, help="memory for both ranks together")
    ap.add_argument("--part", choices=["all", "1b", "loops"], default="all")
    ap.add_argument("--plot", default=str(REPO / "docs" / "scale_loops.png"))
    ap.add_argument("--out", default="/tmp/bench_scale")
    ap.add_argument("--worker", choices=["1b", "loops"], help=argparse.SUPPRESS)
    ap.add_argument("worker_out", nargs="?", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--phases", default="step", help=argparse.SUPPRESS)
    ap.add_argument("--loops", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker == "1b":
        return worker_1b(args.worker_out, args.set, args.phases)
    if args.worker == "loops":
        return worker_loops(args.worker_out, args.loops, args.mode)
    import deepspeed  # noqa: F401  (the ranks import it too: part of the runtime's own memory)

    baseline = rss()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"host: {host_line()}")
    print(f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    lines: list[str] = []
    if args.part in ("all", "1b"):
        lines += part_1b(args, out, baseline)
    if args.part in ("all", "loops"):
        lines += part_loops(args, out)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
