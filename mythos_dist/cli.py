"""`mythos` command line. Each subcommand validates its input before any expensive work starts."""

from __future__ import annotations

import argparse
import sys

from mythos_dist.config import ConfigError, load_config


def _cmd_params(args: argparse.Namespace) -> int:
    from mythos_dist.model import count_params

    cfg = load_config(args.config, args.set)
    pc = count_params(cfg.model)
    print(f"total parameters:  {pc.total:,}")
    print(f"active per token:  {pc.active_per_token:,}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mythos", description="MoE recurrent-depth transformers")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", required=True, help="YAML config (see configs/)")
        p.add_argument(
            "--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. train.steps=200"
        )
        return p

    with_config(
        sub.add_parser("params", help="count parameters (total / active per token) without allocating")
    )
    from data_pipeline.cli import add_data_commands

    add_data_commands(sub)
    return parser


COMMANDS = {"params": _cmd_params}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        handler = getattr(args, "handler", None) or COMMANDS[args.command]
        return handler(args) or 0
    except (ConfigError, FileNotFoundError, ValueError) as e:
        # Bad input: one clear line plus usage, not a traceback.
        parser.print_usage(sys.stderr)
        print(f"mythos {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
