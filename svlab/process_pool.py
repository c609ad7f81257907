"""Running one function over many jobs in worker processes that never outlive what started them.

``run_jobs`` maps a function over a list of jobs, in a process pool when there are enough of them
(feature extraction and augmentation, ``svlab.feature_cache``). Whatever ends it early stops the
workers at once: an error inside the pool (one ``DataError``), Ctrl-C, SIGTERM or SIGHUP (the main
process unwinds, stops its workers, prints one line and exits with 128 + the signal number); on
Linux each worker is also killed by the kernel when the main process dies in any other way
(SIGKILL, the out-of-memory killer). Without this a worker goes on through the files already queued
to it, holding its memory, for as long as that takes.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor

import torch
from threadpoolctl import threadpool_limits

from svlab.audio import one_line
from svlab.errors import DataError


def quiet_worker() -> None:
    """Pool initializer: Ctrl-C is handled by the main process alone (no traceback per worker), and
    each worker computes with one BLAS/OpenMP thread: N workers x N threads on N cores oversubscribe
    the CPU, and the pool then runs slower than a single process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threadpool_limits(1)
    torch.set_num_threads(1)


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _start_worker(parent: int, initializer, initargs) -> None:
    """First thing in every worker process: take the default action for SIGTERM again (the main
    process's handler came along with fork), ask Linux to kill this worker when the main process dies
    in any way (even SIGKILL or the out-of-memory killer), then ``initializer(*initargs)``."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the main process died before prctl took effect
        os._exit(1)
    initializer(*initargs)


class _Terminated(BaseException):
    """SIGTERM or SIGHUP arrived while a process pool was running (``_unwind_on_termination``)."""


@contextlib.contextmanager
def _unwind_on_termination(kept: str = "nothing was written"):
    """While a pool runs: SIGTERM/SIGHUP, whose default action would kill this process at once and leave
    its workers computing on as orphans, unwind the main thread instead, so that the pool's clean-up
    stops the workers; then one line, and the process exits with status 128 + the signal number. A
    handler someone else installed (e.g. the training loop's stop flag) is left alone."""
    owner, installed, fired = os.getpid(), {}, []

    def handler(signum, frame):
        if os.getpid() != owner:  # a worker, forked before its initializer reset the handler
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if fired:  # a second signal must not interrupt the clean-up the first one started
            return
        fired.append(signum)
        raise _Terminated(signum)
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
            if sig is not None and signal.getsignal(sig) == signal.SIG_DFL:
                installed[sig] = signal.signal(sig, handler)
    try:
        yield
    except _Terminated as e:
        signum = e.args[0]
        print(f"\n{signal.Signals(signum).name} received: feature extraction stopped, its worker processes "
              f"too; {kept}", file=sys.stderr, flush=True)
        raise SystemExit(128 + signum) from None
    finally:
        for sig, old in installed.items():
            signal.signal(sig, old)


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """Stop a pool's worker processes now (SIGTERM, then SIGKILL for any still there after 2 s), not
    after they finish the work already queued to them. A second Ctrl-C meanwhile is ignored: it
    would leave the rest running."""
    main = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
    try:
        procs = list((getattr(pool, "_processes", None) or {}).values())
        for p in procs:
            if p.is_alive():
                p.terminate()
        pool.shutdown(wait=False, cancel_futures=True)
        deadline = time.monotonic() + 2.0
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(1.0)
    finally:
        if old is not None:
            signal.signal(signal.SIGINT, old)


def run_jobs(fn, jobs: list, workers: int | None, desc: str, initializer=quiet_worker, initargs=(),
             what: str = "feature extraction", chunksize: int = 16, on_result=None) -> list:
    """``[fn(job) for job in jobs]`` with a progress bar; in a process pool (``initializer(*initargs)``
    in each worker) when ``workers > 1`` (default: up to 8) and there are 64 jobs or more. A dying
    worker or any other pool failure is one DataError naming ``what`` failed. Whatever ends the pool early (an error,
    Ctrl-C, SIGTERM, SIGHUP) stops its workers at once, and they die with the main process.

    ``on_result``: called with each result, in job order, as soon as it is ready, instead of keeping
    it (the list returned is then empty): ``svlab.feature_store`` writes each one to disk, so a corpus's
    features never all sit in memory. It runs in the main process, inside the pool's clean-up."""
    from tqdm import tqdm
    workers = workers if workers is not None else min(os.cpu_count() or 1, 8)
    results: list = []
    take = results.append if on_result is None else on_result
    if not (workers > 1 and len(jobs) >= 64):
        for j in tqdm(jobs, desc=desc, unit="utt", leave=False, file=sys.stderr):
            take(fn(j))
        return results
    import multiprocessing as mp
    from concurrent.futures.process import BrokenProcessPool
    ctx = mp.get_context("fork") if sys.platform != "win32" else None
    with _unwind_on_termination("nothing was written" if on_result is None else "what was finished is kept"):
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_start_worker,
                                   initargs=(os.getpid(), initializer, initargs))
        finished = False
        try:
            for result in tqdm(pool.map(fn, jobs, chunksize=chunksize), total=len(jobs),
                               desc=desc, unit="utt", leave=False, file=sys.stderr):
                take(result)
            finished = True
        except BrokenProcessPool as e:
            raise DataError(f"a {what} worker process died ({one_line(e, 160)}) during {len(jobs)} jobs; "
                            "usually out of memory or a crash inside an audio library. Free memory and "
                            "run again") from None
        except Exception as e:  # anything else the pool passes back, as one line
            raise DataError(f"{what} failed ({type(e).__name__}: {one_line(e, 200)})") from None
        finally:  # also on KeyboardInterrupt and _Terminated
            if finished:
                pool.shutdown(wait=True)
            else:
                _stop_workers(pool)
    return results
