"""The guard around every command's work: one line for a user error or an interruption, and outside
text printed so that it cannot fake output.

``run_command(fn)`` runs a command's work: a ``LabError`` becomes ``error: <one line>`` (exit 2),
Ctrl-C or SIGTERM one line such as ``interrupted; the evaluation folder is unchanged`` (exit 130), never
a traceback. ``say`` prints a line whose parts came from outside (a checkpoint's ``tag``, file names,
config values) with control characters and line breaks escaped (``one_line``, i.e.
``svlab.files.shown``), so a crafted checkpoint can neither clear the screen nor print a fake ACCEPT.
"""
from __future__ import annotations

import signal
import sys
import threading

from svlab.errors import LabError
from svlab.files import shown


# outside text for one printed line: control characters escaped (``svlab.text.printable``) and line
# breaks and tabs too, so it can neither recolour the terminal nor start a fake line
one_line = shown


def say(*parts: object) -> None:
    """``print`` for every line a command shows: each part through ``one_line``."""
    print(*(one_line(p) for p in parts), flush=True)


def _sigterm_as_ctrl_c(signum, frame):
    raise KeyboardInterrupt


def run_command(fn, interrupted=lambda: "interrupted") -> int:
    """Run a command's work ``fn()``: 0 when it ends, 2 with one line ``error: ...`` for a user error
    (``LabError``), 130 with the one line ``interrupted()`` for Ctrl-C or SIGTERM (handled alike: the
    feature-extraction pool ends on the way out, files being written are left as they were)."""
    old = None
    if threading.current_thread() is threading.main_thread():
        old = signal.signal(signal.SIGTERM, _sigterm_as_ctrl_c)
    try:
        fn()
    except LabError as e:
        print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print(one_line(interrupted()), file=sys.stderr, flush=True)
        return 130
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)
    return 0
