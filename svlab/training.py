"""The machinery around ``train.py``'s loop: precision, learning-rate schedule, stop signals,
divergence checks and ``torch.compile`` with a fallback.

``amp_dtype_for``          the ``torch.autocast`` dtype for ``train.amp`` on a device (None: float32)
``autocast``               ``torch.autocast`` for that dtype, or a context that does nothing
``lr_lambda``              the learning-rate factor per optimiser step (warm-up, then cosine or steps)
``apply_changed_schedule`` ``--resume`` with another ``train.lr`` / schedule: the new one takes effect
``warm_up_margin``         ``loss.margin_warmup_epochs``: the margin grows linearly from 0
``StopFlag``               SIGINT/SIGTERM become a flag checked between steps (a consistent save)
``RunLock``                one train.py per run folder: the lock file, naming its holder; stale ones go
``check_loss``             stop before a non-finite loss touches the weights, on every process at once
``check_weights``          stop before non-finite weights are saved as a good checkpoint
``compile_with_fallback``  ``torch.compile`` that trains uncompiled where compiling fails
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import socket
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

from svlab import distributed as dd
from svlab.checkpoint import list_epoch_checkpoints
from svlab.config import key_source
from svlab.cpu_runtime import native_bfloat16
from svlab.errors import ConfigError, FileWriteError, TrainingError
from svlab.text import excerpt


def quiet(*args, **kwargs) -> None:
    """Log function of the processes other than rank 0: only rank 0 prints."""


def amp_dtype_for(cfg: dict, device: torch.device, log=print) -> torch.dtype | None:
    """The ``torch.autocast`` dtype ``train`` uses for ``train.amp`` on ``device``; None: float32.

    ``auto``: on CUDA bfloat16 where the GPU has it, else float16 (``train`` then adds a gradient
    scaler); float32 on the CPU (and a hint where the CPU has native bfloat16). ``bf16`` on a CPU
    without native bfloat16 runs, with a note that it is emulated. Raises ``ConfigError`` for
    ``fp16`` on the CPU (no fast kernels) and ``bf16`` on a GPU without bfloat16.
    """
    setting = cfg["train"]["amp"]
    where = key_source(cfg, "train.amp")
    cuda = device.type == "cuda"
    if setting == "fp32":
        return None
    if setting == "auto":
        if cuda:
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        native, what = native_bfloat16()
        if native and device.type == "cpu":
            log(f"note: this CPU has {what}: --amp bf16 (bfloat16 autocast) trains faster "
                "(docs/performance.md, 'bfloat16 training on the CPU')")
        return None
    if setting == "fp16":
        if not cuda:
            raise ConfigError(f"{where}: train.amp=fp16 needs a CUDA GPU; float16 has no fast {device.type} "
                              "kernels for these layers (far slower than fp32); use bf16 or fp32")
        return torch.float16
    if cuda and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"{where}: train.amp=bf16 but {torch.cuda.get_device_name(device)} has no bfloat16; "
                          "use fp16 (with a gradient scaler) or auto")
    if not cuda:
        native, what = native_bfloat16()
        if not native:
            log(f"note: train.amp=bf16: {what}, likely slower than train.amp=fp32")
    return torch.bfloat16


def autocast(device: torch.device, amp_dtype: torch.dtype | None):
    """``torch.autocast`` in ``amp_dtype`` on ``device``; a context that changes nothing for None."""
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=amp_dtype)


def lr_lambda(cfg_train: dict, steps_per_epoch: int):
    """Learning-rate factor per optimiser step: linear warm-up, then cosine decay or steps."""
    total = cfg_train["epochs"] * steps_per_epoch
    warm = min(cfg_train["warmup_epochs"] * steps_per_epoch, max(total - 1, 0))
    kind = cfg_train["scheduler"]

    def factor(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if kind == "cosine":
            progress = (step - warm) / max(1, total - warm)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress))) * 0.99 + 0.01
        if kind == "step":
            return cfg_train["gamma"] ** (step // (cfg_train["step_size"] * steps_per_epoch))
        return 1.0
    return factor


def apply_changed_schedule(old: dict, new: dict, optimizer, scheduler, log=print) -> None:
    """On --resume, a changed train.lr takes effect (the saved optimiser/scheduler state would
    silently keep the old one); a changed train.epochs re-spreads the schedule. Both are logged."""
    if float(old.get("lr", new["lr"])) != float(new["lr"]):
        scheduler.base_lrs = [float(new["lr"]) for _ in scheduler.base_lrs]
        factor = scheduler.lr_lambdas[0](scheduler.last_epoch)
        for group in optimizer.param_groups:
            group["initial_lr"] = float(new["lr"])
            group["lr"] = float(new["lr"]) * factor
        scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
        log(f"note: train.lr changed from {old['lr']} to {new['lr']} for the resumed run")
    for key in ("epochs", "scheduler", "warmup_epochs", "step_size", "gamma"):
        if key in old and old[key] != new[key]:
            log(f"note: train.{key} changed from {old[key]} to {new[key]}; the learning-rate schedule follows "
                "the new value from here on")


def warm_up_margin(head: nn.Module, loss_cfg: dict, epoch: int, step: int, steps_per_epoch: int) -> None:
    """``loss.margin_warmup_epochs`` > 0: set a margin head's margin to its share of ``loss.margin``
    (0 at the first step, the full margin after that many epochs). Heads without a margin: nothing."""
    warm = loss_cfg["margin_warmup_epochs"]
    if hasattr(head, "margin") and warm > 0:
        head.margin = loss_cfg["margin"] * min(1.0, (epoch - 1 + step / steps_per_epoch) / warm)


class StopFlag:
    """Turns SIGINT/SIGTERM into a flag checked between steps, so the state saved is consistent."""

    def __init__(self):
        self.signum = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not in the main thread (e.g. called from a test runner thread)
                pass
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:  # second Ctrl-C: give up immediately
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{signal.Signals(signum).name} received: saving a resumable checkpoint after this step ...",
              file=sys.stderr)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


LOCK = ".train.lock"  # in the run folder, while a train.py uses it (``RunLock``)


def _host() -> str:
    return socket.gethostname()


def _process_start(pid: int) -> str | None:
    """The start time of process ``pid`` (Linux ``/proc``; None elsewhere): a reused pid differs."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
        return stat.rsplit(")", 1)[1].split()[19]  # field 22, starttime, counted after the command name
    except (OSError, IndexError):
        return None


def pid_alive(pid: int, started: str | None = None) -> bool:
    """Whether process ``pid`` of this host still runs (and, where known, is the one started at
    ``started`` rather than a later process given the same pid)."""
    if os.name == "nt":
        import ctypes  # os.kill(pid, 0) would send Ctrl-C on Windows
        kernel = ctypes.windll.kernel32
        handle = kernel.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return ctypes.GetLastError() == 5  # access denied: it exists
        code = ctypes.c_ulong()
        ok = kernel.GetExitCodeProcess(handle, ctypes.byref(code))
        kernel.CloseHandle(handle)
        return bool(ok) and code.value == 259  # STILL_ACTIVE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    except (OSError, OverflowError):
        return False
    now = _process_start(pid)
    return not (started and now and now != str(started))


class RunLock:
    """``<folder>/.train.lock`` (``LOCK``), created atomically (``O_CREAT | O_EXCL``) with its owner as
    JSON: pid, host, start time, command. Hand-written rather than ``filelock``: the refusal must name
    the other process, and a lock whose process is gone (killed, power cut) must not block; an OS lock
    (``flock``) says neither, and does not work on every network file system. Under torchrun only
    rank 0 takes it (``svlab.run_folder.RunSession``)."""

    FRESH_SECONDS = 10  # an unreadable lock younger than this is being written by its owner right now

    def __init__(self, folder: Path):
        self.folder, self.path = Path(folder), Path(folder) / LOCK
        self.data: bytes | None = None

    def owner(self) -> dict:
        return {"pid": os.getpid(), "host": _host(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "process_start": _process_start(os.getpid()), "command": " ".join(sys.argv)}

    def acquire(self, log=print) -> None:
        """Take the lock or raise ``TrainingError`` naming its holder; a stale lock is taken over."""
        data = json.dumps(self.owner()).encode("utf-8")
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._judge(log)  # raises if the holder runs; removes a stale lock
                continue
            except OSError as e:
                raise FileWriteError(f"could not create the lock {self.path}: {e.strerror or e}") from e
            try:
                os.write(fd, data)
            except OSError as e:
                os.close(fd)
                self.path.unlink(missing_ok=True)
                raise FileWriteError(f"could not write the lock {self.path}: {e.strerror or e}") from e
            os.close(fd)
            self.data = data
            return
        raise TrainingError(f"{self.folder}: another train.py keeps taking {self.path}; is one starting there?")

    def _judge(self, log) -> None:
        try:
            seen = self.path.read_bytes()
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return  # released meanwhile: try again
        except OSError as e:
            raise TrainingError(f"cannot read the lock {self.path} ({e.strerror or e}); if no train.py uses "
                                f"{self.folder}, delete it") from e
        try:
            holder = json.loads(seen.decode("utf-8"))
            pid, host = int(holder["pid"]), str(holder["host"])
            if not 0 < pid < 2 ** 31:  # never os.kill(0 or -1, ...): those mean process groups
                raise ValueError
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            if age < self.FRESH_SECONDS:
                raise TrainingError(f"{self.folder} is being taken by another train.py right now ({self.path}); "
                                    "wait for it or use another --n_folder") from None
            log(f"note: {self.path} names no owner (left by a process killed while taking it); taking it over")
            self._break(seen)
            return
        who = (f"pid {pid} on {excerpt(host, 60)}, started {excerpt(holder.get('started', '?'), 40)}: "
               f"{excerpt(holder.get('command', '?'), 160)}")
        if host != _host():
            raise TrainingError(f"{self.folder} is in use by another train.py ({who}); that is another host, so "
                                f"this one cannot tell whether it still runs: if it has ended, delete {self.path}")
        if pid_alive(pid, holder.get("process_start")):
            raise TrainingError(f"{self.folder} is in use by another train.py ({who}); wait for it to finish or "
                                f"train into another --n_folder (if pid {pid} is no train.py, delete {self.path})")
        log(f"note: {self.path} was left by {who}, which no longer runs; taking it over")
        self._break(seen)

    def _break(self, seen: bytes) -> None:
        """Remove a stale lock, unless another process replaced it meanwhile (then it is put back)."""
        grave = self.path.with_name(f"{LOCK}.{os.getpid()}.stale")
        try:
            os.replace(self.path, grave)
        except FileNotFoundError:
            return
        try:
            if grave.read_bytes() != seen:  # a live lock taken after we looked: not ours to remove
                os.link(grave, self.path)
        except OSError:
            pass
        finally:
            grave.unlink(missing_ok=True)

    def release(self) -> None:
        """Remove the lock if it is still this process's own."""
        if self.data is None:
            return
        try:
            if self.path.read_bytes() == self.data:
                self.path.unlink()
        except OSError:
            pass
        self.data = None


def diverged_message(what: str, epoch: int, step: int, folder: Path) -> str:
    """Why training stopped, where, and how to go on from the last good checkpoint in ``folder``."""
    good = list_epoch_checkpoints(folder)
    last = (f"The last good checkpoint, epoch {max(good)}, is kept in {folder}; lower the learning rate and "
            "continue from it with: python train.py --resume --lr <smaller>" if good else
            "No checkpoint was saved yet; lower the learning rate (--lr) and start again with --overwrite")
    return f"training diverged: {what} at epoch {epoch}, step {step}; stopped. {last}"


def check_loss(loss: torch.Tensor, info: dd.DistInfo, epoch: int, step: int, folder: Path) -> None:
    """Raise ``TrainingError`` when the loss of step ``step`` is NaN or infinite on any process, before
    it touches the weights. Every process takes the decision together, so none waits forever in the
    next gradient all-reduce."""
    finite = bool(torch.isfinite(loss))
    if dd.any_rank(not finite, info):
        what = f"loss became {loss.item()}" if not finite else "the loss became non-finite on another process"
        raise TrainingError(diverged_message(what, epoch, step, folder))


def check_weights(modules: list[nn.Module], epoch: int, step: int, folder: Path) -> None:
    """Raise ``TrainingError`` when a weight or buffer is not finite: the last step's update
    overflowed, and such weights must never be saved as a good checkpoint."""
    bad = [name for m in modules for name, t in m.state_dict().items()
           if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise TrainingError(diverged_message(f"weights became non-finite ({', '.join(bad[:3])})", epoch, step,
                                             folder))


def _backward_compiled_at_once():
    """Make ``torch.compile`` compile the backward graph together with the forward one (it otherwise
    waits for the first ``backward()``), so that a failure there too shows in the first call."""
    from torch._functorch import config as functorch_config
    return functorch_config.patch(force_non_lazy_backward_lowering=True)


class CompiledWithFallback(nn.Module):
    """``compiled`` (``torch.compile(model)``) that falls back to ``model`` if its first call fails.

    ``torch.compile`` compiles at the first call (forward and backward graph), and compiling can fail
    there (no C++ compiler, an unsupported operation) before any weight changed; that call is then run
    uncompiled, with a note, and so is the rest of training. ``model`` is the one registered
    submodule: the parameters, buffers and ``train()``/``eval()`` are its own.
    """

    def __init__(self, model: nn.Module, compiled, log=print):
        super().__init__()
        self.model = model
        self._compiled = [compiled]  # in a list: not a second registered copy of the same weights
        self._first_call = True
        self._log = log

    def forward(self, *args, **kwargs):
        if not self._compiled:
            return self.model(*args, **kwargs)
        if not self._first_call:
            return self._compiled[0](*args, **kwargs)
        t0 = time.perf_counter()
        try:
            with _backward_compiled_at_once():
                out = self._compiled[0](*args, **kwargs)
        except Exception as e:  # no C++ compiler, unsupported op, ...
            reason = " ".join(str(e).split())[:200]
            self._log(f"note: torch.compile failed at the first step ({type(e).__name__}: {reason}); "
                      "training uncompiled")
            self._compiled.clear()
            return self.model(*args, **kwargs)
        self._first_call = False
        self._log(f"torch.compile: model compiled (first step {time.perf_counter() - t0:.1f}s)")
        return out


def compile_with_fallback(model: nn.Module, log=print) -> nn.Module:
    """``model`` compiled with ``torch.compile``, falling back to ``model`` itself where that fails
    (see ``CompiledWithFallback``). Train ``model``'s own parameters: they are the same tensors."""
    try:
        compiled = torch.compile(model)
    except Exception as e:  # platform without a working compiler
        log(f"note: torch.compile unavailable ({type(e).__name__}: {e}); training uncompiled")
        return model
    return CompiledWithFallback(model, compiled, log)
