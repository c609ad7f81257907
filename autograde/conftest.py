"""The autograder's setup: this project's own files first on ``sys.path``, one torch thread, and a
per-step summary at the end of the run.

Run it from the project folder: ``python -m pytest autograde`` (one step: ``python -m pytest
autograde/test_step_2_1.py``). It needs no data: every test makes its own tiny inputs.
"""
from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROJECT = HERE.parent
for _folder in (HERE, PROJECT):  # the project's files (pooling.py, train.py, svlab) win over any other copy
    if str(_folder) in sys.path:
        sys.path.remove(str(_folder))
    sys.path.insert(0, str(_folder))

import torch  # noqa: E402

torch.set_num_threads(1)  # tiny models: one thread is as fast, and the results do not depend on the machine

_outcomes: dict[str, list[str]] = {}


def _step(nodeid: str) -> str | None:
    name = Path(nodeid.split("::")[0]).stem  # test_step_2_1
    return name[len("test_step_"):].replace("_", ".") if name.startswith("test_step_") else None


def pytest_runtest_logreport(report) -> None:
    step = _step(report.nodeid)
    if step and (report.when == "call" or report.outcome != "passed"):
        _outcomes.setdefault(step, []).append(report.outcome)


def pytest_terminal_summary(terminalreporter) -> None:
    if not _outcomes:
        return
    terminalreporter.write_sep("=", "handout steps / 实验步骤")
    for step in sorted(_outcomes, key=lambda s: tuple(map(int, s.split(".")))):
        results = _outcomes[step]
        passed = sum(r == "passed" for r in results)
        mark = "done / 完成" if passed == len(results) else "not yet / 未完成"
        terminalreporter.write_line(f"step {step}: {passed}/{len(results)} checks passed   {mark}")
