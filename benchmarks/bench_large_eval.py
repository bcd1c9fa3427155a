"""Large checkpoints on this machine: `mythos init` of a scale config as a sharded export, then
its evaluation at EP=1 (1 rank, the whole model) and EP=2 (2 ranks, each holding the dense part and
half the experts), each process's peak RSS beside its lower bound (the bytes of what it must hold).

  .venv/bin/python benchmarks/bench_large_eval.py [--config configs/scales/mythos_1b.yaml]
      [--max-shard-size 1GB] [--n-samples 16] [--out runs/bench_large_eval]

Between them, `mythos export` of the init's weights in a DeepSpeed checkpoint's file layout.
Prints a markdown table (and writes OUT/bench_large_eval.json). Lower bounds: init and export hold
one shard (they write tensor by tensor); an evaluating rank holds dense + n_experts/ep experts. Peaks are
VmHWM (resident set high-water mark) of each process, read at its exit; "runtime" is the process's
RSS once Python, torch and the CLI are imported, before any model work (printed by the wrapper).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Runs the CLI; prints the RSS once it is imported and the peak RSS at exit (lines the benchmark parses).
WRAPPER = (
    "import atexit, os, sys\n"
    "def peak():\n"
    "    hwm = next(l for l in open('/proc/self/status') if l.startswith('VmHWM:'))\n"
    "    print(f\"PEAK rank={os.environ.get('RANK', '0')} bytes={int(hwm.split()[1]) * 1024}\", flush=True)\n"
    "atexit.register(peak)\n"
    "from mythos_dist.cli import main\n"
    "rss = next(l for l in open('/proc/self/status') if l.startswith('VmRSS:'))\n"
    "print(f\"RUNTIME rank={os.environ.get('RANK', '0')} bytes={int(rss.split()[1]) * 1024}\", flush=True)\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def run(cmd: list[str], env: dict[str, str]) -> tuple[float, dict[int, int], dict[int, int], str]:
    """(wall seconds, peak RSS per rank, runtime RSS per rank, stderr: evaluation's progress lines)."""
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")

    def per_rank(what: str) -> dict[int, int]:
        return {int(r): int(b) for r, b in re.findall(rf"{what} rank=(\d+) bytes=(\d+)", proc.stdout)}

    return wall, per_rank("PEAK"), per_rank("RUNTIME"), proc.stderr


def eval_times(stderr: str) -> str:
    """'s per batch of the sweep / s of the spectral report', from evaluation's progress lines."""
    per_batch = re.findall(r"([\d.]+) s/batch", stderr)
    spectral = re.search(r"spectral report: .*?(\d+) block\(s\) per rank, ([\d.]+) s", stderr)
    if not per_batch or not spectral:
        raise SystemExit(f"no progress lines in the evaluation's output:\n{stderr[-2000:]}")
    return f"{float(per_batch[-1]):.1f} / {float(spectral[2]):.1f} ({spectral[1]} blocks)"


def deepspeed_layout(export: Path, step_dir: Path) -> None:
    """The export's weights in the files a DeepSpeed checkpoint of the model has (the dense module
    in mp_rank_00_model_states.pt, each routed expert in its own file by global id, our meta file),
    which `mythos export` reads: the 1B model's DeepSpeed engine does not fit this machine."""
    from mythos_dist.checkpoint import META, _moe_prefixes
    from mythos_dist.export import ExportReader, expert_id
    from mythos_dist.weight_names import DS_EXPERT_SEGMENT, ROUTER_BIAS, ROUTER_BIAS_DS

    reader = ExportReader(export)
    prefixes = _moe_prefixes(reader.model_cfg)
    step_dir.mkdir(parents=True, exist_ok=True)

    def ds_key(k: str) -> str:  # the inverse of checkpoint._plain_key
        for p in prefixes:
            if k.startswith(f"{p}."):
                return f"{p}.layer.{k[len(p) + 1 :]}".replace(ROUTER_BIAS, ROUTER_BIAS_DS)
        return k

    dense = {ds_key(k): reader.get(k) for k in reader.names if expert_id(k) is None}
    torch.save({"module": dense}, step_dir / "mp_rank_00_model_states.pt")
    del dense
    for layer, p in enumerate(prefixes):
        for g in range(reader.model_cfg.n_experts):
            state = {
                f"{p}.{DS_EXPERT_SEGMENT}{g}.{w}": reader.get(f"{p}.experts.{g}.{w}")
                for w in ("w_in_DH", "w_out_HD")
            }
            torch.save(state, step_dir / f"layer_{layer}_expert_{g}_mp_rank_00_model_states.pt")
    meta = {"step": 1, "world_size": 1, "config": {"model": reader.saved["model"]}, "lineage": "bench"}
    (step_dir / META).write_text(json.dumps(meta))
    (step_dir.parent / "latest").write_text(step_dir.name)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/scales/mythos_1b.yaml")
    ap.add_argument("--max-shard-size", default="1GB")
    ap.add_argument("--n-samples", type=int, default=16)
    ap.add_argument("--out", default="runs/bench_large_eval")
    ap.add_argument("--set", action="append", default=[])
    args = ap.parse_args()

    from benchmarks.bench_moe import matmul_gflops
    from mythos_dist.config import parse_size
    from mythos_dist.export import ExportReader

    torch.set_num_threads(1)
    rate = statistics.median(matmul_gflops(1024) for _ in range(5))
    host = f"cpu={torch.backends.cpu.get_cpu_capability()}, 1-thread fp32 matmul {rate:.1f} GFLOP/s"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    export = out / "init"
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO))
    sets = [a for kv in ["tracking.enabled=false", "train.dtype=fp32", *args.set] for a in ("--set", kv)]
    wrapper = out / "_peak_wrapper.py"
    wrapper.write_text(WRAPPER)
    py = [sys.executable, str(wrapper)]
    init_cmd = [*py, "init", "--config", args.config, *sets, "--out", str(export)]
    init_cmd += ["--max-shard-size", args.max_shard_size]
    init_s, init_peak, init_base, _ = run(init_cmd, env)

    reader = ExportReader(export)
    shapes = reader.shapes()
    cfg = reader.model_cfg
    nbytes = {k: 4 * torch.Size(s).numel() for k, s in shapes.items()}
    experts = sum(b for k, b in nbytes.items() if re.search(r"\.experts\.\d+\.", k))
    dense = sum(nbytes.values()) - experts
    shard = max(f.stat().st_size for f in export.glob("*.safetensors"))
    rows = [("init", init_s, init_peak[0], init_base[0], shard, "")]
    deepspeed_layout(export, out / "ckpt" / "step_00000001")
    ex_cmd = [*py, "export", "--checkpoint", str(out / "ckpt"), "--out", str(out / "export")]
    ex_s, ex_peak, ex_base, _ = run([*ex_cmd, "--max-shard-size", args.max_shard_size], env)
    rows.append(
        (
            "export",
            ex_s,
            ex_peak[0],
            ex_base[0],
            max(f.stat().st_size for f in (out / "export").glob("*.safetensors")),
            "",
        )
    )
    shutil.rmtree(out / "ckpt")
    ev = [
        "eval",
        "--config",
        args.config,
        *sets,
        "--checkpoint",
        str(export),
        "--n-samples",
        str(args.n_samples),
    ]
    ev += ["--loops", "1,2,4", "--splits", "id", "--out", str(out / "eval")]
    for ep in (1, 2):
        if ep == 1:
            cmd = [*py, *ev]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
            cmd += [str(wrapper), *ev, "--set", f"parallel.ep_size={ep}"]
        wall, peaks, base, stderr = run(cmd, env)
        for rank, peak in sorted(peaks.items()):
            rows.append(
                (
                    f"eval EP={ep}, rank {rank}",
                    wall,
                    peak,
                    base[rank],
                    dense + experts / ep,
                    eval_times(stderr),
                )
            )
    print(f"host: {host}, torch {torch.__version__}; {args.config}: {sum(nbytes.values()) / 2**30:.2f} GiB "
          f"fp32 ({experts / sum(nbytes.values()):.0%} routed experts, {cfg.n_experts} experts); "
          f"largest shard {shard / 2**30:.2f} GiB ({args.max_shard_size}); eval of {args.n_samples} samples, loops 1,2,4\n")  # fmt: skip
    print("| step | wall s | s per batch / spectral report s | peak RSS GiB | lower bound GiB | peak / bound "
          "| runtime GiB | (peak − runtime) / bound |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for name, wall, peak, base, bound, times in rows:
        print(f"| {name} | {wall:.1f} | {times or '—'} | {peak / 2**30:.2f} | {bound / 2**30:.2f} | {peak / bound:.3f}× "
              f"| {base / 2**30:.2f} | {(peak - base) / bound:.3f}× |")  # fmt: skip
    ep1 = max(r[2] for r in rows if r[0].startswith("eval EP=1"))
    ep2 = max(r[2] for r in rows if r[0].startswith("eval EP=2"))
    print(
        f"\nEP=2 per-rank peak / EP=1 peak: {ep2 / ep1:.3f} (lower bounds: {(dense + experts / 2) / (dense + experts):.3f})"
    )
    print(f"export peak - largest shard: {(ex_peak[0] - rows[1][4]) / 2**30:.2f} GiB")
    print(f"init peak - largest shard: {(init_peak[0] - shard) / 2**30:.2f} GiB (target ≤ 1 GiB over the shard: "
          f"{'met' if init_peak[0] <= shard + 2**30 else 'not met'}); shard bound {parse_size(args.max_shard_size) / 2**30:.2f} GiB")  # fmt: skip
    (out / "bench_large_eval.json").write_text(json.dumps({"host": host, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
