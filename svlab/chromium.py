"""Headless Chromium, for the report: ``print_pdf`` turns ``report.html`` into ``report.pdf`` with the
page's print styles (A4); ``run_browser`` runs any other headless call (the tests take screenshots and
read the page's DOM with it).

Every call gets a fresh temporary profile and no network, sync, updates or first-run pages, and runs in
its own process group: a timeout, Ctrl-C or SIGTERM ends the browser and every process it started.
``find_browser`` looks for ``chromium``, ``chromium-browser``, ``google-chrome`` (or ``$SVLAB_CHROMIUM``).
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from svlab.errors import ReportError
from svlab.text import excerpt

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars")
PDF_FLAGS = ("--no-pdf-header-footer", "--print-to-pdf-no-header")  # the newer and the older spelling
TIMEOUT_S = 120


def find_browser() -> str | None:
    """The headless browser to use: ``$SVLAB_CHROMIUM`` if set, else the first of ``BROWSERS`` on PATH."""
    chosen = os.environ.get("SVLAB_CHROMIUM")
    if chosen:
        return shutil.which(chosen)
    return next((p for p in map(shutil.which, BROWSERS) if p), None)


def _end(proc: subprocess.Popen) -> None:
    try:
        if os.name == "posix":
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
    except OSError:
        pass
    proc.wait()


def run_browser(args: list[str], timeout: float = TIMEOUT_S, env: dict | None = None,
                browser: str | None = None) -> subprocess.CompletedProcess:
    """Run headless Chromium with ``args`` after the fixed ``FLAGS`` and a temporary profile; returns the
    finished process (text stdout/stderr). ``ReportError`` when there is no browser or it times out."""
    browser = browser or find_browser()
    if browser is None:
        raise ReportError("Chromium not found (install the chromium package)")
    with tempfile.TemporaryDirectory(prefix="svlab-chromium-") as profile:
        cmd = [browser, *FLAGS, f"--user-data-dir={profile}", *args]
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, errors="replace", env=env, start_new_session=os.name == "posix")
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _end(proc)
            raise ReportError(f"Chromium did not finish within {timeout:.0f} s") from None
        except BaseException:
            _end(proc)
            raise
        _end(proc)  # helpers it left behind
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _last_error(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip() and "dbus" not in ln.lower()]
    return excerpt(lines[-1]) if lines else "no message"


def print_pdf(page: Path, out: Path, timeout: float = TIMEOUT_S, browser: str | None = None) -> None:
    """Print ``page`` (an HTML file) to ``out`` with its print styles; ``ReportError`` when no PDF came out."""
    out = Path(out)
    if out.exists():
        out.unlink()  # a temporary file named for it: only what Chromium writes may be there afterwards
    proc = run_browser([*PDF_FLAGS, f"--print-to-pdf={out}", Path(page).resolve().as_uri()], timeout, browser=browser)
    try:
        head = out.read_bytes()[:5]
    except OSError:
        head = b""
    if head != b"%PDF-":
        raise ReportError(f"Chromium printed no PDF (exit {proc.returncode}: {_last_error(proc.stderr)})")


def cjk_font_installed() -> bool | None:
    """Whether fontconfig knows a font with Chinese glyphs (``fc-list :lang=zh``); None if it cannot tell."""
    fc_list = shutil.which("fc-list")
    if fc_list is None:
        return None
    try:
        proc = subprocess.run([fc_list, ":lang=zh", "family"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(proc.stdout.strip()) if proc.returncode == 0 else None
