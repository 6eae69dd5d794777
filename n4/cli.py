"""`n4 <command>`: one entry point over the layers (server, benchmarks, quantize) without making any of them
import another against the layering in DESIGN.md."""
from __future__ import annotations

import argparse
import logging
import sys

import benchmarks.cli
import quantize.cli
import server.api.cli


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="n4", description="Serve Nemotron-4 models in FP8")
    sub = parser.add_subparsers(dest="command", required=True)
    server.api.cli.add_commands(sub)
    benchmarks.cli.add_commands(sub)
    quantize.cli.add_commands(sub)
    args = parser.parse_args(argv)
    level = getattr(args, "log_level", "info")
    logging.basicConfig(level=getattr(logging, level.upper()), format="%(levelname)s %(name)s: %(message)s")
    try:
        args.func(args)
    except (ValueError, OSError) as e:
        print(f"n4 {args.command}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
