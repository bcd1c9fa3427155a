"""What upcycling buys on the digit-chain task: per seed, train an E-expert model (the base), grow
it to m·E experts with `mythos upcycle` (the same function at step 0) and train on for S steps,
against an m·E-expert model of the same shape trained from scratch for the same S steps with the
same schedule. Every model is evaluated on the same held-out samples (the first N of each split).

  .venv/bin/python tools/upcycle_report.py [--config configs/digit_chain.yaml] [--seeds 0,1,2]
      [--base-steps 300] [--steps 300] [--n-experts 16] [--nproc 2] [--out runs/upcycle_report]

Stages already done (their export or eval summary exists) are skipped, so a killed run resumes.
Prints a markdown table per seed and the mean; writes OUT/upcycle_report.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mythos_dist.config import load_config  # noqa: E402


def with_sets(items: list[str]) -> list[str]:
    return [a for kv in items for a in ("--set", kv)]


def sh(cmd: list[str], env: dict[str, str]) -> None:
    print("+ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, env=env, cwd=REPO, check=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/digit_chain.yaml")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--base-steps", type=int, default=300)
    ap.add_argument("--steps", type=int, default=300, help="steps after upcycling, and from scratch")
    ap.add_argument("--n-experts", type=int, default=16)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--n-samples", type=int, default=1000)
    ap.add_argument("--loops", default="1,2,4,6,8")
    ap.add_argument("--splits", default="id,ood1")
    ap.add_argument("--out", default="runs/upcycle_report")
    ap.add_argument("--set", action="append", default=[], help="extra overrides for every training run")
    args = ap.parse_args()

    cfg = load_config(args.config, args.set)
    m = args.n_experts // cfg.model.n_experts
    grown = [
        f"model.n_experts={args.n_experts}",
        f"model.n_experts_per_tok={m * cfg.model.n_experts_per_tok}",
        f"model.expert_dim={cfg.model.expert_dim // m}",
    ]
    out = (REPO / args.out).resolve()
    py = str(REPO / ".venv" / "bin" / "python")
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), DS_ACCELERATOR="cpu")
    sh([py, "-m", "mythos_dist.cli", "data", "build", "--config", args.config, *with_sets(args.set)], env)  # fmt: skip

    def train(name: str, steps: int, seed: int, extra: list[str]) -> Path:
        ckpt = out / name
        export = ckpt / "export"
        if (ckpt / "train_summary.json").is_file():
            return export
        sets = [*args.set, f"train.seed={seed}", f"train.steps={steps}", f"checkpoint.dir={ckpt}",
                f"checkpoint.every={steps}", "tracking.enabled=false", *extra]  # fmt: skip
        t = time.perf_counter()
        sh([py, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}", "-m",
            "mythos_dist.cli", "train", "--config", args.config, *with_sets(sets)], env)  # fmt: skip
        print(f"  {name}: {steps} steps in {time.perf_counter() - t:.0f} s", flush=True)
        return export

    def evaluate(name: str, export: Path) -> dict[str, list[float]]:
        dest = out / "eval" / name
        if not any(dest.glob("eval-*/summary.json")):
            sets = [*args.set, "tracking.enabled=false"]
            sh([py, "-m", "mythos_dist.cli", "eval", "--config", args.config, *with_sets(sets),
                "--checkpoint", str(export), "--loops", args.loops, "--splits", args.splits,
                "--n-samples", str(args.n_samples), "--out", str(dest)], env)  # fmt: skip
        found = sorted(dest.glob("eval-*/summary.json"))
        return {s: d["acc"] for s, d in json.loads(found[0].read_text())["splits"].items()}

    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        base = train(f"base_s{seed}", args.base_steps, seed, [])
        up = out / f"upcycled_s{seed}"
        if not (up / "config.json").is_file():
            sh([py, "-m", "mythos_dist.cli", "upcycle", "--checkpoint", str(base), "--n-experts",
                str(args.n_experts), "--out", str(up)], env)  # fmt: skip
        on = train(f"upcycled_on_s{seed}", args.steps, seed, [*grown, f"train.init_from={up}"])
        scratch = train(f"scratch_s{seed}", args.steps, seed, grown)
        for kind, export in (("base", base), ("upcycled, step 0", up), ("upcycled + train", on),
                             ("scratch", scratch)):  # fmt: skip
            rows.append({"seed": seed, "kind": kind, "acc": evaluate(f"{kind.split(',')[0].replace(' + ', '_')}_s{seed}", export)})  # fmt: skip

    loops = args.loops.split(",")
    print(f"\n{args.config}: base {cfg.model.n_experts} experts × {args.base_steps} steps; "
          f"{args.n_experts} experts ({', '.join(grown)}) × {args.steps} steps, upcycled vs scratch; "
          f"{args.n_samples} samples per split\n")  # fmt: skip
    head = "| seed | model | " + " | ".join(f"{s} @{n}" for s in args.splits.split(",") for n in loops)
    print(head + " |\n|" + "---|" * (2 + len(loops) * len(args.splits.split(","))))
    for r in rows:
        accs = [f"{100 * a:.1f}" for s in args.splits.split(",") for a in r["acc"][s]]
        print(f"| {r['seed']} | {r['kind']} | " + " | ".join(accs) + " |")
    for kind in dict.fromkeys(r["kind"] for r in rows):
        sel = [r for r in rows if r["kind"] == kind]
        accs = [
            f"{100 * statistics.mean(r['acc'][s][i] for r in sel):.1f}"
            for s in args.splits.split(",")
            for i in range(len(loops))
        ]
        print(f"| mean | {kind} | " + " | ".join(accs) + " |")
    (out / "upcycle_report.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
