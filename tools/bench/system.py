"""The process and the machine: statistics of repeated measurements, peak memory, CPU model, load,
and the fresh Python processes some measurements need."""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import torch

PROJECT = Path(__file__).resolve().parents[2]  # the project folder: svlab and the lab's files
TOOLS = PROJECT / "tools"  # the commands, and the bench package the probes import
SUBPROCESS_TIMEOUT_S = 900


def quiet(*args, **kwargs) -> None:
    """A ``log`` callable that drops everything."""


def summarize(samples: list[float]) -> dict:
    """Median and spread of a list of measurements."""
    xs = sorted(float(s) for s in samples)
    if not xs:
        return {"median": None, "min": None, "max": None, "q1": None, "q3": None, "iqr": None, "n": 0, "samples": []}
    if len(xs) >= 2:
        q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    else:
        q1 = q3 = xs[0]
    return {"median": statistics.median(xs), "min": xs[0], "max": xs[-1], "q1": q1, "q3": q3, "iqr": q3 - q1,
            "n": len(xs), "samples": [float(s) for s in samples]}


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so a timer reads the time the work took."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_rss_mb() -> float | None:
    """Peak resident set size of this process in MiB (``/proc/self/status`` VmHWM on Linux, else
    ``getrusage``: bytes on macOS; the peak working set on Windows)."""
    hwm = vm_hwm_mb()
    if hwm is not None:
        return hwm
    try:
        import resource
    except ImportError:  # Windows
        return _windows_peak_rss_mb()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024.0 * 1024.0) if sys.platform == "darwin" else rss / 1024.0


def _windows_peak_rss_mb() -> float | None:
    try:
        import ctypes
        from ctypes import wintypes

        class Counters(ctypes.Structure):
            _fields_ = [("cb", wintypes.DWORD), ("PageFaultCount", wintypes.DWORD)] + [
                (name, ctypes.c_size_t) for name in (
                    "PeakWorkingSetSize", "WorkingSetSize", "QuotaPeakPagedPoolUsage", "QuotaPagedPoolUsage",
                    "QuotaPeakNonPagedPoolUsage", "QuotaNonPagedPoolUsage", "PagefileUsage", "PeakPagefileUsage")]
        c = Counters()
        c.cb = ctypes.sizeof(Counters)
        ctypes.windll.psapi.GetProcessMemoryInfo(ctypes.windll.kernel32.GetCurrentProcess(), ctypes.byref(c), c.cb)
        return c.PeakWorkingSetSize / (1024.0 * 1024.0)
    except Exception:
        return None


def vm_hwm_mb(pid: int | str = "self") -> float | None:
    """Peak resident set size ("high water mark") of a live process in MiB, from
    ``/proc/<pid>/status`` (Linux); None elsewhere or once the process is gone. Unlike ``getrusage``
    after ``fork``/``exec`` it counts only the program itself, not the parent's pages at fork time."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def package_version(name: str) -> str | None:
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:
        return None


def subprocess_env(threads: int) -> dict:
    """The environment of the benchmark's child processes: ``threads`` BLAS/OpenMP threads, no
    progress bars, and the project folder and ``tools/`` importable (``svlab``, the lab's files,
    ``bench``)."""
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1",
                "TQDM_DISABLE": "1"})
    env["PYTHONPATH"] = os.pathsep.join([str(PROJECT), str(TOOLS)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH")
                                                                       else []))
    return env


def run_bench_script(script: str, env: dict, what: str) -> dict:
    """Run ``python -c script`` in the project folder; return the JSON of its last ``BENCH {...}`` line.
    Raises with the end of its output if it fails or prints no such line."""
    out = subprocess.run([sys.executable, "-c", script], cwd=PROJECT, env=env, capture_output=True, text=True,
                         timeout=SUBPROCESS_TIMEOUT_S)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("BENCH ")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"{what} subprocess failed (exit {out.returncode}): {(out.stderr or out.stdout)[-800:]}")
    return json.loads(lines[-1][6:])
