"""The handout's steps and the marked regions of the lab's files that hold them.

The solution files mark every region the handout leaves blank with a pair of ``# =====> code <=====``
lines. ``REGIONS`` names the step of each region by file and function; ``svlab.student_kit`` blanks
exactly those regions, and the autograder (``autograde/``) reports its feedback per step.

A blank region becomes ``pass`` where doing nothing is valid Python (the function then returns None,
which the autograder reports as "not filled in yet"), and a call of ``not_filled_in`` where later lines
use the names the region defines: a student who runs ``train.py`` or ``EER.py`` too early gets one line
naming the step (``error: step 2.4 not filled in yet ...``) instead of a NameError.
"""
from __future__ import annotations

from typing import NoReturn

from svlab.errors import StepNotFilledIn

MARKER = "# =====> code <====="
PASS = "pass"      # placeholder: the statement ``pass``
RAISE = "raise"    # placeholder: ``not_filled_in(step)``, which raises StepNotFilledIn

# (file, function or Class.method holding the region): (handout step, placeholder)
REGIONS: dict[tuple[str, str], tuple[str, str]] = {
    ("pooling.py", "GlobalAveragePooling.forward"): ("2.1", PASS),
    ("xvector.py", "Xvector.__init__"): ("2.2", PASS),
    ("xvector.py", "Xvector.forward"): ("2.2", PASS),
    ("loss.py", "Softmax.forward"): ("2.3", PASS),
    # the model, loss and optimiser; the forward pass; the backward pass and update. All raise: with a
    # ``pass`` in the last one training would run without learning and without a word.
    ("train.py", "train"): ("2.4", RAISE),
    ("EER.py", "load_model"): ("3.1", RAISE),
    ("EER.py", "embed"): ("3.1", RAISE),
    ("EER.py", "cosine_score"): ("3.1", RAISE),
    ("EER.py", "roc"): ("3.2", RAISE),
}
STEPS: tuple[str, ...] = tuple(sorted({step for step, _ in REGIONS.values()},
                                     key=lambda s: tuple(map(int, s.split(".")))))


def where(step: str) -> str:
    """Where step ``step`` is filled in: ``"xvector.py Xvector.__init__(), Xvector.forward()"``."""
    places: dict[str, list[str]] = {}
    for (file, function), (s, _) in REGIONS.items():
        if s == step:
            places.setdefault(file, []).append(f"{function}()")
    if not places:
        raise ValueError(f"unknown handout step {step!r}; the steps are {', '.join(STEPS)}")
    return "; ".join(f"{file} {', '.join(functions)}" for file, functions in places.items())


def message(step: str) -> str:
    """The one-line message of a step that is not filled in yet, in English and Chinese."""
    place = where(step)
    return (f"step {step} not filled in yet / 第 {step} 步尚未完成: fill in the region marked {MARKER} in {place} "
            f"/ 请在 {place} 中标有 {MARKER} 的区域填写代码")


def not_filled_in(step: str) -> NoReturn:
    """The placeholder of a blank region whose names later lines use: raises ``StepNotFilledIn``."""
    raise StepNotFilledIn(message(step))
