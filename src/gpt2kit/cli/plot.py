"""`gpt2kit plot`: draw a run's train/val loss curves to a PNG."""

from __future__ import annotations

import argparse

EXAMPLE = """examples:
  gpt2kit plot runs/quickstart                 # writes runs/quickstart/loss.png
  gpt2kit plot runs/shk --out shk-loss.png
"""


def register(sub: argparse._SubParsersAction) -> None:
    from gpt2kit.cli import HelpFormatter

    p = sub.add_parser(
        "plot",
        help="draw a run's loss curves to a PNG",
        description="Plot train loss (every logged step) and train/val loss (every evaluation) of a run "
        "directory, from its metrics.jsonl. Works while the run is still training.",
        epilog=EXAMPLE,
        formatter_class=HelpFormatter,
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a gpt2kit train --out directory")
    p.add_argument("--out", default=None, help="PNG file to write (default: RUN_DIR/loss.png)")
    p.add_argument("--title", default=None, help="plot title (default: the run directory's name)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from gpt2kit.training.plot import plot_run

    path = plot_run(args.run_dir, args.out, title=args.title)
    print(path)
    return 0
