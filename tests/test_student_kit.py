"""The course kit (issue 23): the students' version and the autograder, tested both ways.

One students' version is generated (through ``python -m svlab student-kit``'s ``main``) and shared:
- it differs from the solution only inside the marked regions, each now one placeholder line;
- the autograder passes on the solution and fails every step in the students' version, each test with
  "step X not filled in yet" for its own step;
- filling one step's regions back in from the solution makes exactly that step's group pass;
- the students' ``train.py`` stops with the one-line step message (exit 2), not a traceback.
The autograder runs in subprocesses from the folder it grades, as a student or teacher runs it.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from conftest import PROJECT
from svlab import cli, lab_steps, student_kit
from svlab.errors import LabError
from svlab.student_kit import find_regions, split_lines

LAB_FILES = sorted({file for file, _ in lab_steps.REGIONS})


def group(step: str) -> str:
    return f"autograde/test_step_{step.replace('.', '_')}.py"


@pytest.fixture(scope="module")
def kit(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("kit") / "student"
    assert cli.main(["student-kit", "--out", str(out)]) == 0
    return out


def autograde(folder: Path, tmp_path: Path, *files: str) -> dict[str, tuple[str, str]]:
    """Run the autograder of ``folder`` there: ``{"autograde/test_step_2_1.py::test_x": (outcome, message)}``."""
    report = tmp_path / f"autograde-{len(list(tmp_path.glob('autograde-*.xml')))}.xml"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # a rewritten lab file is never shadowed by a stale .pyc
    proc = subprocess.run([sys.executable, "-m", "pytest", *(files or ["autograde"]), "-q", "-p", "no:cacheprovider",
                           f"--junitxml={report}"], cwd=folder, env=env, capture_output=True, text=True, timeout=300)
    assert report.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    results = {}
    for case in ET.parse(report).iter("testcase"):
        file = "/".join(case.get("classname").split(".")) + ".py"
        problem = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
        outcome = "passed" if problem is None else {"failure": "failed"}.get(problem.tag, problem.tag)
        text = "" if problem is None else f"{problem.get('message', '')}\n{problem.text or ''}"
        results[f"{file}::{case.get('name')}"] = (outcome, text)
    assert results, proc.stdout[-3000:]
    return results


def step_of(test_id: str) -> str:
    return Path(test_id.split("::")[0]).stem[len("test_step_"):].replace("_", ".")


def fill_in(kit_text: str, solution_text: str, file: str, step: str | None = None) -> str:
    """``kit_text`` with the insides of its marked regions (of ``step``, or all) taken from the solution."""
    kit_lines, solution_lines = split_lines(kit_text), split_lines(solution_text)
    kit_regions, solution_regions = find_regions(kit_text, file), find_regions(solution_text, file)
    assert [(r.function, r.step) for r in kit_regions] == [(r.function, r.step) for r in solution_regions], file
    for k, s in reversed(list(zip(kit_regions, solution_regions))):
        if step is None or k.step == step:
            kit_lines[k.start:k.end - 1] = solution_lines[s.start:s.end - 1]
    return "".join(kit_lines)


def test_the_kit_differs_from_the_solution_only_inside_the_marked_regions(kit):
    files = student_kit.project_files(PROJECT)
    assert sorted(p.relative_to(kit) for p in kit.rglob("*") if p.is_file()) == files
    assert Path("autograde/conftest.py") in files and Path("svlab/lab_steps.py") in files
    for rel in files:
        solution, student = (PROJECT / rel).read_bytes(), (kit / rel).read_bytes()
        if rel.as_posix() not in LAB_FILES:
            assert student == solution, rel
            continue
        text = student.decode("utf-8")
        compile(text, str(rel), "exec")  # the placeholders are valid Python
        regions = find_regions(text, rel.as_posix())
        lines = split_lines(text)
        for r in regions:
            assert r.end - r.start == 2, (rel, r)  # one placeholder line between the markers
            line = lines[r.start].strip()
            if r.placeholder == lab_steps.PASS:
                assert line.startswith("pass  #"), (rel, line)
            else:
                assert f'not_filled_in("{r.step}")' in line, (rel, line)
        assert fill_in(text, solution.decode("utf-8"), rel.as_posix()).encode("utf-8") == solution, rel


def test_every_step_has_blanks_in_the_kit(kit):
    steps = {r.step for file in LAB_FILES for r in find_regions((kit / file).read_text(encoding="utf-8"), file)}
    assert steps == set(lab_steps.STEPS)
    assert all((PROJECT / group(step)).is_file() for step in lab_steps.STEPS)


def test_the_file_walk_is_what_git_tracks():
    """The walk mirrors .gitignore (a project without git, e.g. from a zip, gets the same kit)."""
    if shutil.which("git") is None or not (PROJECT / ".git").exists():
        pytest.skip("no git repository here")
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=PROJECT,
                            capture_output=True, check=True).stdout.decode("utf-8").split("\0")
    expected = sorted(Path(p) for p in listed if p and (PROJECT / p).is_file())
    assert student_kit.project_files(PROJECT) == expected


def test_the_file_walk_leaves_out_data_caches_and_runs(tmp_path):
    for rel in ["train.py", "saved_model/.gitkeep", "saved_model/000/checkpoint_001.pth", "saved_model/notes.txt",
                "data/demo_corpus/S0001/a.wav", ".cache/features/x.npz", ".venv/bin/python", "svlab/__pycache__/a.pyc",
                "svlab/a.py", "files/trials.txt", "files/aishell_sample_eval/trials.txt", "tests/data/x.txt",
                "bench_results/cpu.json", "x.egg-info/PKG-INFO", ".git/HEAD", ".ci/run"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    assert [p.as_posix() for p in student_kit.project_files(tmp_path)] == [
        ".ci/run", "files/trials.txt", "saved_model/.gitkeep", "svlab/a.py", "train.py"]


def test_the_autograder_passes_on_the_solution(tmp_path):
    results = autograde(PROJECT, tmp_path)
    failed = {k: v[1][:500] for k, v in results.items() if v[0] != "passed"}
    assert not failed, failed
    per_step = {step: sum(step_of(k) == step for k in results) for step in lab_steps.STEPS}
    assert all(n >= 2 for n in per_step.values()), per_step  # every step has its checks


def test_the_autograder_fails_every_step_of_the_kit_as_not_filled_in(kit, tmp_path):
    results = autograde(kit, tmp_path)
    assert {step_of(k) for k in results} == set(lab_steps.STEPS)
    for test_id, (outcome, text) in results.items():
        assert outcome == "failed", (test_id, outcome, text[:300])
        assert f"step {step_of(test_id)} not filled in yet" in text, (test_id, text[:500])
        assert "Traceback" not in text and "site-packages" not in text, (test_id, text[:800])


@pytest.mark.parametrize("step", lab_steps.STEPS)
def test_filling_in_one_step_makes_exactly_its_group_pass(kit, tmp_path, step):
    other = lab_steps.STEPS[(lab_steps.STEPS.index(step) + 1) % len(lab_steps.STEPS)]
    originals = {file: (kit / file).read_bytes() for file in LAB_FILES}
    try:
        for file in LAB_FILES:
            text = fill_in(originals[file].decode("utf-8"), (PROJECT / file).read_text(encoding="utf-8"), file, step)
            (kit / file).write_bytes(text.encode("utf-8"))
        results = autograde(kit, tmp_path, group(step), group(other))
    finally:
        for file, data in originals.items():
            (kit / file).write_bytes(data)
    mine = {k: v for k, v in results.items() if step_of(k) == step}
    others = {k: v for k, v in results.items() if step_of(k) == other}
    assert mine and others
    assert all(outcome == "passed" for outcome, _ in mine.values()), {k: v[1][:500] for k, v in mine.items()}
    assert all(outcome == "failed" and f"step {other} not filled in yet" in text for outcome, text in others.values())


def test_the_students_train_py_stops_with_the_step_message(kit, write_config_yaml, tmp_path):
    cfg = write_config_yaml(tmp_path, {"train.epochs": 1, "features.cache_dir": ""})
    proc = subprocess.run([sys.executable, "train.py", "--config", str(cfg)], cwd=kit, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: step 2.4 not filled in yet / 第 2.4 步尚未完成"), last
    assert "train.py train()" in last


def test_the_out_folder_must_be_new_and_outside_the_project(tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine\n")
    with pytest.raises(LabError, match="already exists"):
        student_kit.make_student_kit(PROJECT, taken)
    assert sorted(p.name for p in taken.iterdir()) == ["notes.txt"]
    with pytest.raises(LabError, match="inside the project"):
        student_kit.make_student_kit(PROJECT, PROJECT / "docs" / "kit")
    assert not (PROJECT / "docs" / "kit").exists()
    assert cli.main(["student-kit", "--out", str(taken)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --out ") and "already exists" in err[0]


def without_first_marker_line(text: str) -> str:
    lines = split_lines(text)
    lines.pop(next(i for i, line in enumerate(lines) if line.strip() == lab_steps.MARKER))
    return "".join(lines)


def without_first_region_markers(text: str) -> str:
    """The first marked region's code kept, its two marker lines gone."""
    lines = split_lines(text)
    first = next(i for i, line in enumerate(lines) if line.strip() == lab_steps.MARKER)
    second = next(i for i in range(first + 1, len(lines)) if lines[i].strip() == lab_steps.MARKER)
    return "".join(lines[:first] + lines[first + 1:second] + lines[second + 1:])


@pytest.mark.parametrize("file, edit, problem", [
    ("loss.py", without_first_marker_line, "do not pair up"),
    ("pooling.py", without_first_region_markers, "no marked region in pooling.py GlobalAveragePooling.forward()"),
])
def test_bad_markers_are_refused_and_leave_nothing_behind(tmp_path, file, edit, problem):
    project = tmp_path / "project"  # the lab files alone: all the kit needs
    project.mkdir()
    for name in LAB_FILES:
        text = (PROJECT / name).read_text(encoding="utf-8")
        (project / name).write_text(edit(text) if name == file else text, encoding="utf-8")
    out = tmp_path / "out" / "kit"
    with pytest.raises(LabError, match=re.escape(problem)):
        student_kit.make_student_kit(project, out)
    assert not out.exists() and list((tmp_path / "out").iterdir()) == []


def test_a_region_the_step_table_does_not_name_is_refused():
    text = f"def helper():\n    {lab_steps.MARKER}\n    return 1\n    {lab_steps.MARKER}\n"
    with pytest.raises(LabError, match="in helper, which svlab/lab_steps.py REGIONS does not name"):
        find_regions(text, "pooling.py")


def test_placeholders_keep_indentation_and_line_endings():
    text = (f"class Softmax:\r\n    def forward(self, x):\r\n        {lab_steps.MARKER}\r\n        y = x\r\n"
            f"        return y\r\n        {lab_steps.MARKER}\r\n")
    blank, regions = student_kit.blank_regions(text, "loss.py")
    assert [r.step for r in regions] == ["2.3"]
    assert blank == (f"class Softmax:\r\n    def forward(self, x):\r\n        {lab_steps.MARKER}\r\n"
                     f"        pass  # your code here / 在此填写代码\r\n        {lab_steps.MARKER}\r\n")
