"""``kvjax eval``: registered with the ``kvjax`` command through the ``kvjax.commands`` entry point."""
from __future__ import annotations


def add_command(sub) -> None:
    """Add the ``eval`` subcommand to the ``kvjax`` CLI's subparsers."""
    from . import runner

    e = sub.add_parser("eval", help="run the paper's benchmarks over models x methods x budgets (resumable)")
    runner.add_args(e)
    e.set_defaults(fn=runner.main)
