"""``python -m svlab <command>`` (later also the ``svlab`` console script): the package's subcommands.

A subcommand is a module with ``HELP`` (one line), ``configure(parser)`` (adds its arguments) and
``run(args) -> int``; registering one is one entry in ``COMMANDS``. A module keeps its heavy imports
(torch, librosa) inside ``run``, so ``--help`` stays fast. A ``LabError`` prints one line ``error: ...``
and exits with status 2, as in every command of the project.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from svlab.errors import LabError

COMMANDS = {  # name: module
    "student-kit": "svlab.student_kit",
}


def build_parser(prog: str = "svlab") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="The speaker-verification lab's course tools.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        command = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.configure(command)
        command.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None, prog: str = "svlab") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        return args.run(args)
    except LabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
