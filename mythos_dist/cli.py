"""`mythos` command line. Each subcommand validates its input before any expensive work starts.

Bad input (ConfigError, DataError: a wrong argument, config value or input file) prints the usage
and one line, exit 2. A failure inside a run prints one line, exit 1; `--debug` (anywhere on the
command line) adds the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

from mythos_dist.config import ConfigError, load_config, parse_size


def _cmd_params(args: argparse.Namespace) -> int:
    from mythos_dist.model import count_params

    cfg = load_config(args.config, args.set)
    pc = count_params(cfg.model)
    print(f"total parameters:  {pc.total:,}")
    print(f"active per token:  {pc.active_per_token:,}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    # Long on purpose: a declarative list of every subcommand and its options, one block each.
    parser = argparse.ArgumentParser(prog="mythos", description="MoE recurrent-depth transformers")
    parser.add_argument("--debug", action="store_true", help="print the traceback of a failure")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", required=True, help="YAML config (see configs/)")
        p.add_argument(
            "--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. train.steps=200"
        )
        return p

    def with_shard_size(p: argparse.ArgumentParser) -> None:
        p.add_argument("--max-shard-size", default="2GB", help="shard bound, e.g. 2GB, 500MB (default 2GB)")

    with_config(
        sub.add_parser("params", help="count parameters (total / active per token) without allocating")
    )
    ev = with_config(
        sub.add_parser("eval", help="loop-sweep evaluation (any number of ranks under torchrun)")
    )
    ev.add_argument(
        "--checkpoint",
        help="export dir, DeepSpeed checkpoint dir, or MLflow model models:/NAME/VERSION or runs:/RUN_ID "
        "(default: fresh init)",
    )
    ev.add_argument(
        "--loops",
        help="comma-separated loop counts, e.g. 1,2,4,8 (default: eval.loops); 'auto' adds the count each "
        "sample picks itself (eval.auto_*): --loops auto or --loops 4,8,16,32,auto",
    )
    ev.add_argument("--splits", help="comma-separated eval splits (default: eval.splits)")
    ev.add_argument("--n-samples", type=int, help="samples per split (default: eval.n_samples)")
    ev.add_argument("--out", help="output directory; results go to OUT/eval-K (default: eval.out_dir)")
    ev.add_argument("--parent-run-id", help="MLflow run to nest the eval run under (e.g. the training run)")
    sp = with_config(sub.add_parser("spectral", help="ρ(A), Jacobian radius, contraction ratios"))
    sp.add_argument("--checkpoint", help="export dir or DeepSpeed checkpoint dir (default: fresh init)")
    sp.add_argument("--n-loops", type=int, help="loops before the Jacobian (default: train.loops.n_loops)")
    xp = sub.add_parser(
        "export", help="DeepSpeed checkpoint -> safetensors (shards + index) + config.json, any EP layout"
    )
    xp.add_argument(
        "--checkpoint", required=True, help="a run's checkpoint dir (its `latest`) or a step_* dir"
    )
    xp.add_argument("--out", required=True, help="export directory (model.safetensors + config.json)")
    with_shard_size(xp)
    xp.add_argument(
        "--average-last",
        type=int,
        default=1,
        metavar="K",
        help="the mean of the last K checkpoints (default 1)",
    )
    it = with_config(sub.add_parser("init", help="a freshly initialised model written as an export"))
    it.add_argument("--out", required=True, help="export directory")
    with_shard_size(it)
    up = sub.add_parser("upcycle", help="grow an export to m·E experts, the same function at step 0")
    up.add_argument("--checkpoint", required=True, help="export directory")
    up.add_argument("--n-experts", type=int, required=True, help="new expert count, a multiple of the old")
    up.add_argument("--out", required=True, help="export directory to write")
    with_shard_size(up)
    tr = with_config(sub.add_parser("train", help="train with DeepSpeed (launch with torchrun, see launch/)"))
    tr.add_argument("--stop-after", type=int, help="leave after N steps (checkpointed); resume later")
    ex = sub.add_parser("experiment", help="shards → train on local processes → loop-sweep eval, per recipe")
    ex.add_argument(
        "--config", action="append", required=True,
        help="YAML config (see configs/); repeat it to run several recipes one after the other and compare them",
    )  # fmt: skip
    ex.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override for every config, e.g. train.steps=200"
    )  # fmt: skip
    ex.add_argument("--nproc", type=int, default=2, help="local training processes (default 2)")
    ex.add_argument(
        "--out", help="with several configs: the side-by-side table and figure (default runs/experiment)"
    )
    rg = with_config(
        sub.add_parser("register", help="put a training run's export in the MLflow Model Registry")
    )
    rg.add_argument("--run-id", required=True, help="the training run (train_summary.json's run_id)")
    rg.add_argument("--name", required=True, help="registered model name; each call adds a version")
    rp = sub.add_parser("report", help="mean ± std over several eval runs of one recipe (seeds)")
    rp.add_argument("eval_dirs", nargs="+", help="eval-K directories (each holds summary.json)")
    rp.add_argument("--out", required=True, help="directory for the table, JSON and plot")
    from data_pipeline.cli import add_data_commands
    from mythos_dist.plan import add_plan_command

    add_data_commands(sub)
    add_plan_command(sub)
    return parser


def _cmd_eval(args: argparse.Namespace) -> int:
    """Validates every argument first, joins the process group under torchrun, prints the table."""
    import torch.distributed as dist

    from mythos_dist import comm
    from mythos_dist.evaluate import join, run_eval
    from mythos_dist.loading import load_model, refuse_missing
    from mythos_dist.report import format_table
    from mythos_dist.sweep import check_splits, parse_loop_spec

    cfg = load_config(args.config, args.set)
    loops, auto = parse_loop_spec(args.loops) if args.loops is not None else (None, False)
    if auto:
        cfg.eval.auto = True
    splits = (
        check_splits(cfg, [s.strip() for s in args.splits.split(",")]) if args.splits is not None else None
    )
    refuse_missing(args.checkpoint)  # before joining any process group
    device, ep_size = join(cfg)
    try:
        model = load_model(args.checkpoint, cfg, ep_size, args.set).to(device)
        if comm.rank() == 0 and args.checkpoint is None:
            print("note: no --checkpoint, evaluating a freshly initialised model", file=sys.stderr)
        if comm.rank() == 0 and ep_size > 1:
            n = model.cfg.n_experts
            print(f"expert-parallel evaluation: ep_size={ep_size}, {n // ep_size} of {n} experts per rank")
        res = run_eval(
            model, cfg, loops, splits, args.n_samples, args.out, args.checkpoint, args.parent_run_id
        )
        if res is not None:
            print(format_table(res.summary))
            print(f"results: {res.out_dir}" + (f"  (MLflow run {res.run_id})" if res.run_id else ""))
        comm.barrier()  # ranks leave together; one exiting with a live process group can stall the others
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def _cmd_spectral(args: argparse.Namespace) -> int:
    """ρ(A), Jacobian radius and contraction ratios on real eval inputs (under torchrun every rank
    runs its share of the samples, norms summed over the ranks; rank 0 prints)."""
    import torch.distributed as dist

    from mythos_dist import comm
    from mythos_dist.evaluate import join
    from mythos_dist.loading import load_model, refuse_missing
    from mythos_dist.stability import spectral_report
    from mythos_dist.sweep import parse_loops, spectral_inputs

    cfg = load_config(args.config, args.set)
    n = cfg.train.loops.n_loops if args.n_loops is None else parse_loops([args.n_loops])[0]
    refuse_missing(args.checkpoint)  # before joining any process group
    device, ep_size = join(cfg)
    try:
        model = load_model(args.checkpoint, cfg, ep_size, args.set).to(device)
        split = cfg.eval.splits[0]
        ids_BT, valid_BT = spectral_inputs(cfg, split)
        rep = spectral_report(
            model, ids_BT.to(device), n, valid_BT.to(device), across_ranks=dist.is_initialized(),
            batch_size=cfg.eval.spectral_batch_size,
        )  # fmt: skip
        rank = comm.rank()
        comm.barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if rank != 0:
        return 0
    print(f"checkpoint:         {args.checkpoint or '(fresh init)'}  inputs: {split}, n_loops={n}")
    print(f"rho(A):             {rep['rho_A']:.6f}")
    print(f"Jacobian radius:    {rep['jacobian_radius']:.6f}  (Rayleigh {rep['jacobian_rayleigh']:+.6f})")
    print("contraction ratios: " + " ".join(f"{r:.3f}" for r in rep["contraction_ratios"]))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from mythos_dist import checkpoint
    from mythos_dist.export import exported_steps
    from mythos_dist.safe_io import CheckpointError

    if args.average_last < 1:
        raise ConfigError(f"--average-last must be ≥ 1, got {args.average_last}")
    if not Path(args.checkpoint).exists():
        raise ConfigError(f"checkpoint {args.checkpoint} does not exist")
    shard_bytes = parse_size(args.max_shard_size)
    across_ranks = int(os.environ.get("WORLD_SIZE", "1")) > 1  # under torchrun: each rank its share
    me = 0
    if across_ranks:
        import torch.distributed as dist

        from mythos_dist.comm import init_process_group
        from mythos_dist.config import ParallelConfig

        init_process_group(ParallelConfig().timeout_s)
        me = dist.get_rank()
    try:
        sources = checkpoint.last_checkpoints(args.checkpoint, args.average_last)
        out = checkpoint.export(sources, args.out, shard_bytes, across_ranks=across_ranks)
    except CheckpointError as e:  # a bad or untrusted checkpoint is bad input
        raise ConfigError(str(e)) from e
    finally:
        if across_ranks:
            dist.destroy_process_group()
    if me != 0:
        return 0
    steps = ", ".join(map(str, exported_steps(out)))
    print(f"exported the weights of step {steps} to {out}")
    return 0


def _cmd_init(args: argparse.Namespace) -> int:
    from mythos_dist.export import init_export

    cfg = load_config(args.config, args.set)
    shard_bytes = parse_size(args.max_shard_size)
    out = init_export(cfg, args.out, shard_bytes)
    print(f"initialised (train.seed={cfg.train.seed}) and wrote {out}")
    return 0


def _cmd_upcycle(args: argparse.Namespace) -> int:
    from mythos_dist.safe_io import CheckpointError
    from mythos_dist.upcycle import upcycle

    shard_bytes = parse_size(args.max_shard_size)
    try:
        out = upcycle(args.checkpoint, args.out, args.n_experts, shard_bytes)
    except CheckpointError as e:  # a bad source or factor is bad input
        raise ConfigError(str(e)) from e
    m = json.loads((out / "config.json").read_text())["model"]
    print(
        f"wrote {out}: {m['n_experts']} experts of expert_dim {m['expert_dim']}, top-{m['n_experts_per_tok']}"
    )
    print(f"train on from it: --set train.init_from={out} (and model.* as in {out / 'config.json'})")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from mythos_dist.experiment import TrainRecord
    from mythos_dist.resilience import EXIT_STUCK, PeerLost
    from mythos_dist.safe_io import CheckpointError
    from mythos_dist.train import TrainingStopped, train

    cfg = load_config(args.config, args.set)
    try:
        summary = train(cfg, stop_after_steps=args.stop_after)
    except PeerLost as e:  # the same status as a rank that the heartbeat watchdog ends
        print(f"mythos train: error: {e}", file=sys.stderr)
        return EXIT_STUCK
    except (CheckpointError, TrainingStopped) as e:
        # Explained failures (unwritable/full checkpoint dir, failed save, divergence): no traceback.
        print(f"mythos train: error: {e}", file=sys.stderr)
        return 1
    if summary.rank == 0:
        TrainRecord.of(summary).write(cfg.checkpoint.dir)  # last: its presence means training finished
        # No loss when launched again after the run had finished (nothing left to train).
        loss = "-" if summary.final_loss is None else f"{summary.final_loss:.4f}"
        print(f"done: step {summary.end_step}, loss {loss}, export {summary.export}")
    return 0


def _cmd_experiment(args: argparse.Namespace) -> int:
    from mythos_dist.experiment import run_experiment

    if args.nproc < 1:
        raise ConfigError(f"--nproc must be ≥ 1, got {args.nproc}")
    return run_experiment(args.config, args.set, args.nproc, args.out)


def _cmd_register(args: argparse.Namespace) -> int:
    from mythos_dist.tracking import register_model

    uri = register_model(load_config(args.config, args.set).tracking, args.run_id, args.name)
    print(f"registered {uri}  (evaluate it: mythos eval --config ... --checkpoint {uri})")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    """Mean ± std over runs (seeds) of one recipe, as a table, CSV, JSON and plot."""
    from mythos_dist.report import aggregate_runs, format_report, write_report

    report = aggregate_runs(args.eval_dirs)
    files = write_report(report, Path(args.out))
    print(f"accuracy over {len(args.eval_dirs)} runs, mean (± std):")
    print(format_report(report))
    for f in files:
        print(f"  {f}")
    return 0


COMMANDS = {
    "report": _cmd_report,
    "register": _cmd_register,
    "experiment": _cmd_experiment,
    "train": _cmd_train,
    "params": _cmd_params,
    "eval": _cmd_eval,
    "spectral": _cmd_spectral,
    "export": _cmd_export,
    "init": _cmd_init,
    "upcycle": _cmd_upcycle,
}


def main(argv: list[str] | None = None) -> int:
    from data_pipeline.digit_chain import DataError

    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    parser = build_parser()
    args = parser.parse_args([a for a in argv if a != "--debug"])
    try:
        handler = getattr(args, "handler", None) or COMMANDS[args.command]
        return handler(args) or 0
    except (ConfigError, DataError) as e:
        # Bad input: one clear line plus usage, not a traceback.
        parser.print_usage(sys.stderr)
        print(f"mythos {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # a failure inside the run, not the user's input
        if debug:
            traceback.print_exc()
        hint = "" if debug else " (rerun with --debug for the traceback)"
        print(f"mythos {args.command}: error: {type(e).__name__}: {e}{hint}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
