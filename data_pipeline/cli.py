"""`mythos data build|verify`. Importing this module is cheap: streaming is imported by the handlers."""

from __future__ import annotations

import argparse
import time

from mythos_dist.config import load_config


def add_data_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add `data build` and `data verify` to a parser's subcommands; each sets `args.handler`."""
    data = subparsers.add_parser("data", help="build or verify the digit-chain shards")
    sub = data.add_subparsers(dest="data_command", required=True)
    build = sub.add_parser("build", help="write MDS shards for train and every eval split")
    build.add_argument("--force", action="store_true", help="rebuild even if identical shards exist")
    build.set_defaults(handler=_cmd_build)
    verify = sub.add_parser("verify", help="check shards against the config (manifest, hashes, samples)")
    verify.add_argument("--shallow", action="store_true", help="skip decoding and checking every sample")
    verify.set_defaults(handler=_cmd_verify)
    for p in (build, verify):
        p.add_argument("--config", required=True, help="YAML config (see configs/)")
        p.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override, e.g. data.task.n_train=1000",
        )


def _cmd_build(args: argparse.Namespace) -> int:
    from data_pipeline.shards import build

    cfg = load_config(args.config, args.set)
    result = build(cfg.data, force=args.force)
    state = "built" if result.rebuilt else "up to date (identical spec, verified)"
    counts = ", ".join(f"{k}={v:,}" for k, v in result.counts.items())
    print(f"{state}: {result.root}  {result.n_shards} shards  {counts}  in {result.seconds:.1f} s")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from data_pipeline.digit_chain import split_counts
    from data_pipeline.shards import verify

    cfg = load_config(args.config, args.set)
    t0 = time.perf_counter()
    manifest = verify(cfg.data, deep=not args.shallow)
    counts = ", ".join(f"{k}={manifest['splits'][k]['count']:,}" for k in split_counts(cfg.data.task))
    n_shards = sum(len(v["shards"]) for v in manifest["splits"].values())
    depth = "shallow" if args.shallow else "every sample checked"
    print(
        f"ok ({depth}): {cfg.data.remote}  {n_shards} shards  {counts}  in {time.perf_counter() - t0:.1f} s"
    )
    return 0
