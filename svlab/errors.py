"""The errors a user can fix, each with a one-line message naming the file, line or key and the fix.

Every command catches ``LabError`` once and prints ``error: <message>`` (exit status 2); anything else
is a bug and keeps its traceback.
"""
from __future__ import annotations


class LabError(Exception):
    """A problem with the user's input or files, with a message meant for the user."""


class ConfigError(LabError, ValueError):
    """A problem in a configuration file or override."""


class DataError(LabError, ValueError):
    """Bad manifest, trial list or audio."""


class CheckpointError(LabError, RuntimeError):
    """A checkpoint is missing, unreadable or does not fit the current configuration."""


class FileWriteError(CheckpointError):
    """A file could not be written (full disk, no permission); the previous file is intact.

    A ``CheckpointError`` because most writes that fail are checkpoints and the files of a run."""


class TrainingError(LabError, RuntimeError):
    """Training cannot go on (non-finite loss, inconsistent resume, ...)."""


class BackendError(LabError, RuntimeError):
    """A PLDA / calibration back-end file is missing, corrupt or made for another checkpoint."""


class MetricError(LabError, ValueError):
    """Scores and labels from which no error rate can be computed (e.g. no target trial)."""


class PrepareError(LabError, ValueError):
    """A corpus that cannot give the manifests asked for, an unsafe archive or an uneditable config."""


class ReportError(LabError, ValueError):
    """No run folder to write a report for."""


class VerifyError(LabError, ValueError):
    """tools/verify.py cannot decide: wrong recordings on the command line, or no threshold to decide with."""


class OutputError(LabError, ValueError):
    """An output path that would replace an input or a file the command did not write (``svlab.files.refuse_overwrite``)."""


class YamlSyntaxError(ConfigError):
    """Text that is not valid YAML (``svlab.yaml_files``); a ``--set`` value then stays a plain string."""


class StepNotFilledIn(LabError, NotImplementedError):
    """A handout step whose marked region still holds the student version's placeholder (``svlab.lab_steps``)."""
