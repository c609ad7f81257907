"""The shape of the project (issue 17): what lives at the top, which way imports point, one source of truth.

Imports are read from the source with ``ast`` (every ``import``, also those inside functions), so
the rules hold for lazy imports too:

- commands (``train.py``, ``EER.py`` and ``tools/*.py``) are on top and never import one another;
- the model files (``xvector.py``, ``ecapa.py``, ``pooling.py``, ``loss.py``) and the data layer
  (``dataset.py``) never import each other or a command;
- the library package ``svlab`` never imports a command or ``dataset.py``; only ``svlab.models``
  knows the model files;
- ``svlab.cli`` (the ``svlab`` console script) and ``svlab.__main__`` are the package's command layer:
  nothing else imports them, and they reach the tools only by running their files, never by import;
- no import cycle, at module level.
"""
from __future__ import annotations

import argparse
import ast
import re
from pathlib import Path

import pytest

from conftest import PROJECT
from svlab import config, models

LAB_COMMANDS = {"train", "EER"}
MODEL_FILES = {"xvector", "ecapa", "pooling", "loss"}
DATA_LAYER = {"dataset"}
PACKAGE_COMMANDS = {"svlab.cli", "svlab.__main__"}  # the console script; it runs tools/*.py by path
TOP_LEVEL = {  # the handout's files and what a project needs at its root (README: "What is where")
    "config.yaml", "train.py", "EER.py", "xvector.py", "ecapa.py", "pooling.py", "loss.py", "dataset.py",
    "files", "saved_model", "requirements.txt", "requirements-dev.txt", "README.md", "tests", "recipes",
    "results", "scripts", "docs", "svlab", "tools", "pyproject.toml", "autograde",
}
GENERATED = {"data", "bench_results", "__pycache__",   # made by the programs, ignored by git
             "build", "svlab.egg-info"}                # and by a (non-editable) `pip install .`
MARKER = "# =====> code <====="
MAX_LINES = 600


def source_modules() -> dict[str, Path]:
    """Every module of the project except the tests: ``{dotted name: file}``."""
    found = {p.stem: p for p in PROJECT.glob("*.py")}
    for folder in ("svlab", "tools"):
        for p in (PROJECT / folder).rglob("*.py"):
            parts = p.relative_to(PROJECT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = p
    return found


def commands(modules: dict[str, Path]) -> set[str]:
    tools = {name for name, p in modules.items() if p.parent == PROJECT / "tools" and p.stem != "__init__"}
    return LAB_COMMANDS | tools


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules ``path`` imports (a tool's ``import verify`` means ``tools.verify``)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    found = set()
    for name in names:
        for candidate in (name, f"tools.{name}"):
            if candidate in modules:
                found.add(candidate)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = source_modules()
    return {name: imports_of(path, modules) - {name} for name, path in modules.items()}


def test_top_level_holds_only_the_handout_files_and_project_folders():
    extra = sorted(p.name for p in PROJECT.iterdir()
                   if not p.name.startswith(".") and p.name not in TOP_LEVEL | GENERATED)
    assert not extra, f"move these into svlab/ (library) or tools/ (commands): {extra}"


def test_no_command_imports_another_command(graph):
    cmds = commands(source_modules())
    bad = {m: sorted(graph[m] & cmds) for m in cmds if graph[m] & cmds}
    assert not bad, f"commands importing commands (move what they share into svlab): {bad}"


def test_models_and_data_layer_import_neither_each_other_nor_commands(graph):
    cmds = commands(source_modules())
    for m in MODEL_FILES:
        assert not graph[m] & (cmds | DATA_LAYER), (m, graph[m])
    for m in DATA_LAYER:
        assert not graph[m] & (cmds | MODEL_FILES), (m, graph[m])


def test_library_imports_no_command_and_only_models_knows_the_model_files(graph):
    cmds = commands(source_modules())
    for m, deps in graph.items():
        if m == "svlab" or m.startswith("svlab."):
            assert not deps & (cmds | DATA_LAYER), (m, sorted(deps & (cmds | DATA_LAYER)))
            if m != "svlab.models":
                assert not deps & MODEL_FILES, (m, sorted(deps & MODEL_FILES))


def test_the_console_script_is_a_command_layer_that_imports_no_tool(graph):
    cmds = commands(source_modules())
    importers = {m: sorted(deps & PACKAGE_COMMANDS) for m, deps in graph.items()
                 if deps & PACKAGE_COMMANDS and m not in PACKAGE_COMMANDS}
    assert not importers, f"only svlab/__main__.py may import the command layer: {importers}"
    for m in PACKAGE_COMMANDS:
        assert not graph[m] & (cmds | DATA_LAYER | MODEL_FILES), (m, sorted(graph[m] & (cmds | DATA_LAYER)))


def test_no_import_cycle(graph):
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(d):] + [m, d])
                                     if d in path else f"import cycle through {m} -> {d}")
            if d not in state:
                visit(d, path + [m])
        state[m] = 2
    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def test_no_file_is_too_long_to_read_in_one_sitting():
    files = [p for p in PROJECT.rglob("*.py") if not any(part.startswith(".") for part in p.relative_to(PROJECT).parts)
             and "data" not in p.relative_to(PROJECT).parts[:1]]
    long = {str(p.relative_to(PROJECT)): n for p in files if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"split these by topic (over {MAX_LINES} lines): {long}"


@pytest.mark.parametrize("name, limit", [("dataset.py", 250), ("EER.py", 250), ("train.py", 300)])
def test_handout_files_stay_short(name, limit):
    n = len((PROJECT / name).read_text(encoding="utf-8").splitlines())
    assert n <= limit, f"{name} has {n} lines; the machinery belongs in svlab/"


def marked_regions(path: Path) -> dict[str, int]:
    """``{function or class.method: number of marked regions}`` of a handout file; pairs must close."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    lines = path.read_text(encoding="utf-8").splitlines()
    marks = [i + 1 for i, line in enumerate(lines) if line.strip() == MARKER]
    assert len(marks) % 2 == 0, f"{path.name}: an unclosed {MARKER!r} pair (lines {marks})"
    owners: dict[str, int] = {}
    for start, end in zip(marks[::2], marks[1::2]):
        inner = None
        for node in ast.walk(tree):
            # the closing marker is a comment after the last statement, outside the node's lines: test the opening one
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.lineno < start <= node.end_lineno:
                if inner is None or node.lineno > inner[1]:
                    inner = (node.name, node.lineno)
        assert inner is not None, f"{path.name}: marked region at line {start} is outside any function"
        assert end - start > 1, f"{path.name}: empty marked region at line {start}"
        owners[inner[0]] = owners.get(inner[0], 0) + 1
    return owners


@pytest.mark.parametrize("name, expected", [
    ("pooling.py", {"forward": 1}),                    # 2.1 GlobalAveragePooling.forward
    ("xvector.py", {"__init__": 1, "forward": 1}),     # 2.2 pooling and final layer; forward
    ("loss.py", {"forward": 1}),                       # 2.3 Softmax.forward
])
def test_model_files_mark_the_handout_blanks(name, expected):
    assert marked_regions(PROJECT / name) == expected


def test_train_and_eer_mark_the_handout_blanks():
    train = marked_regions(PROJECT / "train.py")
    assert train.get("train", 0) >= 2, train         # 2.4: model, loss, optimiser; the loop body
    eer = marked_regions(PROJECT / "EER.py")
    for function in ("load_model", "embed", "cosine_score", "roc"):   # 3.1 and 3.2
        assert eer.get(function, 0) >= 1, (function, eer)


def test_the_marked_lab_code_is_the_lab_code():
    """The regions hold what the handout asks for, in the classes it names."""
    text = (PROJECT / "pooling.py").read_text(encoding="utf-8")
    gap = text[text.index("class GlobalAveragePooling"):text.index("class StatisticsPooling")]
    assert gap.count(MARKER) == 2 and "x.mean(dim=2)" in gap.split(MARKER)[1]
    text = (PROJECT / "loss.py").read_text(encoding="utf-8")
    softmax = text[text.index("class Softmax"):text.index("class Amsoftmax")]
    assert softmax.count(MARKER) == 2 and "cross_entropy" in softmax.split(MARKER)[1]


def _argparse_choices(module) -> dict[str, tuple]:
    parser: argparse.ArgumentParser = module.build_parser()
    return {a.dest: tuple(a.choices) for a in parser._actions if a.choices is not None}


def test_choice_lists_come_from_the_config_schema():
    import EER
    import train
    flags = _argparse_choices(train)
    assert flags["model"] == config.CHOICES["model.name"]
    assert flags["pooling"] == config.CHOICES["model.pooling"]
    assert flags["loss_type"] == config.CHOICES["loss.type"]
    assert flags["amp"] == config.CHOICES["train.amp"]
    flags = _argparse_choices(EER)
    assert flags["backend"] == config.CHOICES["test.backend"]
    assert flags["score_norm"] == config.CHOICES["test.score_norm"]
    # the model factory builds exactly the names the schema allows
    assert set(models.POOLINGS) == set(config.CHOICES["model.pooling"])
    assert set(models.LOSSES) == set(config.CHOICES["loss.type"])


def test_every_choice_is_refused_outside_the_schema(make_config, tmp_path):
    for key, choices in config.CHOICES.items():
        with pytest.raises(config.ConfigError, match=re.escape(key)):
            make_config(tmp_path, {key: "no-such-choice"})


FIGURE = re.compile(r"\b\d+(\.\d+)?\s?x (faster|slower)\b|\b(faster|slower) than \S+ here\b", re.IGNORECASE)


def test_code_holds_no_machine_specific_figures():
    """Speed-ups measured on one machine go stale in code; they live in docs/ beside their command."""
    hits = []
    for p in list(source_modules().values()) + [PROJECT / "config.yaml"]:
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if FIGURE.search(line):
                hits.append(f"{p.relative_to(PROJECT)}:{i}: {line.strip()}")
    assert not hits, "\n".join(hits)
