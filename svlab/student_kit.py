"""The students' version of the project: a copy in which the handout's blanks are blank again.

``make_student_kit(project, out)`` copies the project (what git would track: no ``.git``, ``.venv``,
caches, ``data/``, runs in ``saved_model/``) into the new folder ``out`` and replaces the inside of
every region marked by a pair of ``# =====> code <=====`` lines in the lab's files with one placeholder
line (``svlab.lab_steps``), keeping both marker lines. Every other byte is the solution's, so the
solution and the handout never drift apart. The copy is written to a temporary folder beside ``out``
and renamed at the end: a failure leaves no half-written kit.

Run it as ``python -m svlab student-kit --out DIR`` (``svlab/cli.py``).
"""
from __future__ import annotations

import argparse
import ast
import io
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from svlab.config import PROJECT_ROOT
from svlab.errors import LabError
from svlab.lab_steps import MARKER, PASS, REGIONS, STEPS

HELP = "write the students' version of the project: the handout's marked regions blank, all else identical"

# Mirrors .gitignore: names skipped wherever they are, and paths skipped under the project folder.
SKIP_NAMES = {".git", ".venv", ".cache", ".pytest_cache", "__pycache__", "data", "bench_results"}
SKIP_SUFFIXES = (".pyc", ".egg-info")
SKIP_PATHS = {"files/aishell_sample_eval"}
RUNS, KEEP_IN_RUNS = "saved_model", ".gitkeep"  # the runs are the teacher's: only the placeholder file goes


@dataclass(frozen=True)
class Region:
    """A marked region: ``start`` and ``end`` are the 1-based line numbers of its two marker lines."""
    file: str
    function: str
    step: str
    placeholder: str
    start: int
    end: int


@dataclass
class KitReport:
    """What ``make_student_kit`` wrote: the folder, how many files, and the regions it blanked."""
    out: Path
    files: int = 0
    regions: list[Region] = field(default_factory=list)

    def lines(self) -> list[str]:
        """What the command prints: where the kit is, each step's blanks, how to grade."""
        out = [f"student version written to {self.out}: {self.files} files, {len(self.regions)} blank regions"]
        for step in STEPS:
            places = {}  # "file function()": number of regions, in order
            for r in self.regions:
                if r.step == step:
                    places[f"{r.file} {r.function}()"] = places.get(f"{r.file} {r.function}()", 0) + 1
            out.append(f"  step {step}: " + ", ".join(place + (f" ({n} regions)" if n > 1 else "")
                                                      for place, n in places.items()))
        out.append(f"grade a student's copy with: cd {self.out} && python -m pytest autograde")
        return out


def split_lines(text: str) -> list[str]:
    """Lines with their own line endings (``\\n``, ``\\r\\n`` or ``\\r``), as ``ast`` counts them."""
    return io.StringIO(text, newline="").readlines()


def _functions(tree: ast.AST) -> list[tuple[str, int, int]]:
    """``(qualified name, first line, last line)`` of every function and class (``Class.method``)."""
    found = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = prefix + child.name
                found.append((name, child.lineno, child.end_lineno))
                visit(child, name + ".")
            else:
                visit(child, prefix)
    visit(tree, "")
    return found


def find_regions(text: str, file: str) -> list[Region]:
    """The marked regions of the lab file ``file`` (its name, e.g. ``"train.py"``) with contents ``text``.

    ``LabError`` for an unclosed pair, an empty region, or a region outside the functions that
    ``svlab.lab_steps.REGIONS`` names (a new blank must be given its handout step there)."""
    lines = split_lines(text)
    marks = [i + 1 for i, line in enumerate(lines) if line.strip() == MARKER]
    if len(marks) % 2:
        raise LabError(f"{file}: the '{MARKER}' lines do not pair up (lines {', '.join(map(str, marks))})")
    functions = _functions(ast.parse(text, filename=file))
    regions = []
    for start, end in zip(marks[::2], marks[1::2]):
        # the closing marker may follow the function's last statement: place the region by its opening one
        owners = [(first, name) for name, first, last in functions if first < start <= last]
        name = max(owners)[1] if owners else "<module>"
        if end - start < 2:
            raise LabError(f"{file}: the marked region at lines {start}-{end} is empty")
        if (file, name) not in REGIONS:
            raise LabError(f"{file}: the marked region at lines {start}-{end} is in {name}, which "
                           "svlab/lab_steps.py REGIONS does not name; add it there with its handout step")
        step, placeholder = REGIONS[(file, name)]
        regions.append(Region(file, name, step, placeholder, start, end))
    return regions


def placeholder_line(region: Region, indent: str, newline: str) -> str:
    if region.placeholder == PASS:
        code = "pass"
    else:
        code = f'from svlab.lab_steps import not_filled_in; not_filled_in("{region.step}")'
    return f"{indent}{code}  # your code here / 在此填写代码{newline}"


def blank_regions(text: str, file: str) -> tuple[str, list[Region]]:
    """``text`` with the inside of each marked region replaced by its placeholder line; the regions."""
    lines = split_lines(text)
    regions = find_regions(text, file)
    for r in reversed(regions):  # from the end, so earlier line numbers stay valid
        opening = lines[r.start - 1]
        indent = opening[:len(opening) - len(opening.lstrip())]
        newline = opening[len(opening.rstrip("\r\n")):] or "\n"
        lines[r.start:r.end - 1] = [placeholder_line(r, indent, newline)]
    return "".join(lines), regions


def _ignored(rel: Path) -> bool:
    """Whether git leaves out the file or folder ``rel`` (relative to the project) by ``.gitignore``."""
    if rel.name in SKIP_NAMES or rel.name.endswith(SKIP_SUFFIXES) or rel.as_posix() in SKIP_PATHS:
        return True
    return rel.parts[0] == RUNS and rel.as_posix() != f"{RUNS}/{KEEP_IN_RUNS}" and len(rel.parts) > 1


def project_files(project: Path) -> list[Path]:
    """The project's files relative to ``project``, sorted, without what ``.gitignore`` leaves out."""
    found = []
    for folder, dirs, files in os.walk(project):
        rel = Path(folder).relative_to(project)
        dirs[:] = [d for d in dirs if not _ignored(rel / d)]
        found.extend(rel / name for name in files if not _ignored(rel / name))
    return sorted(found)


def _check_out(project: Path, out: Path) -> None:
    if out == project or project in out.parents:
        raise LabError(f"--out {out} is inside the project {project}; give a folder outside it")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LabError(f"--out {out} already exists and is not an empty folder; give a new folder")


def make_student_kit(project: Path, out: Path) -> KitReport:
    """Write the students' version of ``project`` into the new folder ``out``; return what was done."""
    project, out = Path(project).resolve(), Path(out).resolve()
    _check_out(project, out)
    lab_files = {file for file, _ in REGIONS}
    missing = sorted(f for f in lab_files if not (project / f).is_file())
    if missing:
        raise LabError(f"{project} is not the lab project: no {', '.join(missing)}")
    report = KitReport(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        shutil.copymode(project, tmp)  # mkdtemp's folder is private (0700); the kit is meant to be shared
        for rel in project_files(project):
            src, dst = project / rel, tmp / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            if rel.as_posix() in lab_files:
                text, regions = blank_regions(src.read_bytes().decode("utf-8"), rel.as_posix())
                dst.write_bytes(text.encode("utf-8"))
                shutil.copymode(src, dst)
                report.regions.extend(regions)
            else:
                shutil.copy2(src, dst)
            report.files += 1
        found = {(r.file, r.function) for r in report.regions}
        unmarked = [f"{file} {function}()" for file, function in REGIONS if (file, function) not in found]
        if unmarked:
            raise LabError(f"no marked region in {', '.join(unmarked)}: the solution files lost their "
                           f"'{MARKER}' pairs, or svlab/lab_steps.py REGIONS names a function that moved")
        if out.exists():
            out.rmdir()  # empty (checked above); a rename onto a folder fails on Windows
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="new folder for the students' version (outside the project)")


def run(args: argparse.Namespace) -> int:
    report = make_student_kit(PROJECT_ROOT, Path(args.out))
    print("\n".join(report.lines()))
    return 0
