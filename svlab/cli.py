"""The ``svlab`` console script (``pip install -e .``) and ``python -m svlab``: one command, subcommands.

    svlab --help                                   # every subcommand with one line
    svlab verify a.wav b.wav                       # = python tools/verify.py a.wav b.wav
    svlab verify --help                            # the tool's own options
    python -m svlab student-kit --out ../lab4-student

A subcommand in ``TOOLS`` *is* a command of the project folder (``tools/<file>``), run as ``python
tools/<file> ARGS`` would run it: same code, same options, same output and exit status, never a copy.
The file is executed as ``__main__`` with ``sys.argv = ["svlab <name>", *ARGS]`` (so its usage line says
``svlab verify``) and ``tools/`` first on ``sys.path``. ``runpy.run_path`` would do the same but resets
``sys.argv[0]`` to the file's path (usage ``verify.py``), hence the few lines of ``_run_script``. The tools
are found beside the package (``<svlab>/../tools``): an editable install (``pip install -e .``) from the
project folder has them; any other install says so in one line.

A subcommand in ``MODULES`` lives in the package: a module with ``HELP`` (one line), ``configure(parser)``
and ``run(args) -> int``.

``svlab --help`` reads each tool's one-line help from the first line of its docstring (``ast``, no
import), so it starts at once and imports neither torch nor a tool. Layout rule (tests/test_layout.py):
this module and ``svlab/__main__.py`` are the package's command layer; nothing else in the package
imports them, and they reach the tools only by running their files.
"""
from __future__ import annotations

import argparse
import ast
import importlib
import sys
import types
from pathlib import Path

from svlab.errors import LabError
from svlab.guard import run_command

TOOLS = {  # subcommand: the file in tools/ it runs
    "embed": "extract.py",
    "similarity": "similarity.py",
    "verify": "verify.py",
    "export": "export.py",
    "prepare": "prepare_data.py",
    "report": "report.py",
    "bench": "benchmark.py",
    "channel-probe": "channel_probe.py",
}
MODULES = {  # subcommand: the package module it runs
    "student-kit": "svlab.student_kit",
}
PROJECT = Path(__file__).resolve().parents[1]   # the project folder, for an editable install
PROJECT_MARK = "train.py"   # a tools/ folder counts only beside the lab's own files, never another package's


class ProjectFolderError(LabError):
    """A subcommand that needs the project folder (its tools, its files), from an install without it."""


def tools_dir() -> Path | None:
    """The project's ``tools/`` folder beside the package, or None (a non-editable install)."""
    tools = PROJECT / "tools"
    return tools if tools.is_dir() and (PROJECT / PROJECT_MARK).is_file() else None


def require_project(name: str) -> Path:
    """The project's ``tools/`` folder; one line naming subcommand ``name`` if this install has none."""
    tools = tools_dir()
    if tools is None:
        why = f"it runs tools/{TOOLS[name]} there" if name in TOOLS else "it works on the project's own files"
        raise ProjectFolderError(f"svlab {name} needs the project folder ({why}), and this svlab "
                                 f"({PROJECT / 'svlab'}) is installed without it: from the project folder, "
                                 "install with `pip install -e .`")
    return tools


def tool_path(name: str) -> Path:
    """The file subcommand ``name`` runs; one line if the project folder or the file is not there."""
    path = require_project(name) / TOOLS[name]
    if not path.is_file():
        raise ProjectFolderError(f"svlab {name} runs {path}, which is missing; restore it from the project "
                                 "(git checkout tools/)")
    return path


def help_line(name: str) -> str:
    """One line for ``svlab --help``: a tool's first docstring line, read without importing it."""
    if name in MODULES:
        return importlib.import_module(MODULES[name]).HELP
    tools = tools_dir()
    if tools is None:
        return f"(needs the project folder: tools/{TOOLS[name]}; install with `pip install -e .` there)"
    if not (tools / TOOLS[name]).is_file():
        return f"(tools/{TOOLS[name]} is missing)"
    doc = ast.get_docstring(ast.parse((tools / TOOLS[name]).read_text(encoding="utf-8"))) or ""
    first = doc.strip().splitlines()[0].replace("``", "").rstrip(".") if doc.strip() else ""
    return f"{first} (tools/{TOOLS[name]})"


def build_parser(prog: str = "svlab") -> argparse.ArgumentParser:
    """The top-level parser: its help lists every subcommand; a subcommand's own parser is the tool's."""
    parser = argparse.ArgumentParser(
        prog=prog, description="The speaker-verification lab's commands.",
        epilog=f"`{prog} COMMAND --help` shows a command's own options. The lab's own steps stay "
               "`python train.py` and `python EER.py` in the project folder. See docs/cli.md.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in [*TOOLS, *MODULES]:
        sub.add_parser(name, help=help_line(name).replace("%", "%%"), add_help=False)  # argparse %-formats help
    return parser


def exit_status(code: object) -> int:
    """The exit status ``sys.exit(code)`` gives: None is 0, an int itself, anything else printed and 1."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _run_script(path: Path, argv: list[str]) -> int:
    """Run ``path`` as Python runs a script (``__main__``, its folder first on ``sys.path``), with
    ``sys.argv = argv``; everything it changes in ``sys`` is put back. Returns its exit status."""
    code = compile(path.read_bytes(), str(path), "exec", dont_inherit=True)  # not this file's __future__
    module = types.ModuleType("__main__")
    module.__file__ = str(path)
    saved = sys.argv, sys.path[:], sys.modules.get("__main__")
    sys.argv, sys.modules["__main__"] = list(argv), module
    sys.path.insert(0, str(path.parent))
    try:
        exec(code, module.__dict__)
    except SystemExit as e:
        return exit_status(e.code)
    finally:
        sys.argv, sys.path[:] = saved[0], saved[1]
        if saved[2] is not None:
            sys.modules["__main__"] = saved[2]
        else:
            sys.modules.pop("__main__", None)
    return 0


def _run_module(name: str, rest: list[str], prog: str) -> int:
    module = importlib.import_module(MODULES[name])
    parser = argparse.ArgumentParser(prog=f"{prog} {name}", description=module.HELP)
    module.configure(parser)
    args = parser.parse_args(rest)
    require_project(name)   # its --help works anywhere; its work needs the project (e.g. the kit copies it)
    return module.run(args)


def main(argv: list[str] | None = None, prog: str = "svlab") -> int:
    """``svlab COMMAND ARGS``: the exit status of the command (2 with one line for a user error)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in (*TOOLS, *MODULES):
        parser = build_parser(prog)
        try:   # --help (exit 0), no command or an unknown one (usage and exit 2)
            parser.parse_args(argv)
            parser.error("the command comes first: svlab COMMAND [ARGS]")
        except SystemExit as e:
            return exit_status(e.code)
    name, rest = argv[0], argv[1:]
    status = 0

    def work() -> None:
        nonlocal status
        try:
            if name in MODULES:
                status = _run_module(name, rest, prog)
            else:
                status = _run_script(tool_path(name), [f"{prog} {name}", *rest])
        except SystemExit as e:  # argparse of a package subcommand: --help, a usage error
            status = exit_status(e.code)
    guarded = run_command(work)  # a LabError outside a tool's own guard: one line, exit 2; Ctrl-C: 130
    return guarded or status
