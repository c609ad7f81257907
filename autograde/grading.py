"""Feedback for students: every failure names the step, what was expected and what came out, in English
and Chinese, and never shows a traceback from inside torch.

``call`` runs the student's code: a blank region (``StepNotFilledIn``, or a function that returns None)
fails with "step X not filled in yet"; any other exception fails with its one-line message and the line
of the lab file where it happened.
"""
from __future__ import annotations

import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NoReturn

import pytest
import torch

from svlab.errors import StepNotFilledIn
from svlab.lab_steps import message

PROJECT = Path(__file__).resolve().parents[1]


def fail(step: str, en: str, zh: str) -> NoReturn:
    """Fail with the step's feedback, first in English, then in Chinese."""
    __tracebackhide__ = True
    pytest.fail(f"step {step}: {en}\n第 {step} 步: {zh}", pytrace=False)


def _in_lab_file(exc: BaseException) -> str:
    """`` (at pooling.py:62: return x.mean(dim=1))``: the last line of a lab file the error passed through."""
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        path = Path(frame.filename).resolve()
        if path.parent == PROJECT and path.suffix == ".py":
            code = " ".join((frame.line or "").split("  #")[0].split())  # the statement, without its comment
            return f" (at {path.name}:{frame.lineno}: {code})"
    return ""


@dataclass
class Attempt:
    """The outcome of running student code: ``result``, or ``failure`` (the feedback to fail with)."""
    result: Any = None
    failure: str | None = None

    def get(self) -> Any:
        __tracebackhide__ = True
        if self.failure is not None:
            pytest.fail(self.failure, pytrace=False)
        return self.result


def attempt(step: str, what: str, fn: Callable, *args, **kwargs) -> Attempt:
    """Run ``fn(*args, **kwargs)`` (described as ``what``) and keep its result or the feedback."""
    try:
        result = fn(*args, **kwargs)
    except StepNotFilledIn as e:
        return Attempt(failure=str(e))
    except Exception as e:  # the student's bug: its message and where, not torch's internals
        text = (str(e).strip().splitlines() or [""])[0][:300]
        where = _in_lab_file(e)
        return Attempt(failure=f"step {step}: {what} raised {type(e).__name__}: {text}{where}\n"
                               f"第 {step} 步: {what} 出错 {type(e).__name__}: {text}{where}")
    if result is None:
        return Attempt(failure=f"{message(step)} ({what} returned None / 返回了 None)")
    return Attempt(result=result)


def call(step: str, what: str, fn: Callable, *args, **kwargs) -> Any:
    """``fn(*args, **kwargs)``, or fail with the step's feedback (see ``attempt``)."""
    __tracebackhide__ = True
    return attempt(step, what, fn, *args, **kwargs).get()


def expect_tensor(step: str, what: str, value: Any) -> torch.Tensor:
    __tracebackhide__ = True
    if not isinstance(value, torch.Tensor):
        fail(step, f"{what} should give a torch.Tensor, got {type(value).__name__}",
             f"{what} 应返回 torch.Tensor，实际得到 {type(value).__name__}")
    return value


def shape(value: Any) -> tuple:
    return tuple(getattr(value, "shape", ()))


def largest_difference(a, b) -> float:
    return float((torch.as_tensor(a, dtype=torch.float64) - torch.as_tensor(b, dtype=torch.float64)).abs().max())
