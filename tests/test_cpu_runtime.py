"""svlab/cpu_runtime.py: freed tensor memory is reused without page faults (train.keep_freed_memory), and
oneMKL's vector math gives the same, accurate result at its first multi-threaded call.

Both are measured in fresh processes: neither setting can be undone in this one.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

PROJECT = Path(__file__).resolve().parents[1]
if str(PROJECT) not in sys.path:
    sys.path.insert(0, str(PROJECT))

from svlab import cpu_runtime  # noqa: E402
import train  # noqa: E402

GLIBC = cpu_runtime.has_tunable_malloc()

# Allocate, touch and free a 64 MiB tensor (the size of the x-vector's widest activation) 20 times;
# count the minor page faults of the last 5 rounds. With the setting, glibc's heap needs a few rounds
# before the freed block is reused every time: small allocations split it at first.
PROBE = """
import json, resource, sys
sys.path.insert(0, {project!r})
import torch
if {keep}:
    from svlab import cpu_runtime
    assert cpu_runtime.keep_freed_memory()[0]
def one_round():
    t = torch.empty(16 * 2 ** 20)
    t.fill_(1.0)
    del t
for _ in range(15):
    one_round()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    one_round()
print("FAULTS " + json.dumps((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5))
"""


def faults_per_round(keep: bool) -> float:
    out = subprocess.run([sys.executable, "-c", PROBE.format(project=str(PROJECT), keep=keep)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(next(ln for ln in out.stdout.splitlines() if ln.startswith("FAULTS "))[7:])


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's (Linux); elsewhere keep_freed_memory changes nothing")
def test_kept_memory_is_reused_without_page_faults():
    default = faults_per_round(False)
    kept = faults_per_round(True)
    # glibc's default unmaps the 64 MiB block on free: the next one is faulted in again, page by page
    # (16 384 pages of 4 KiB; fewer where transparent huge pages are always on)
    assert default > 0
    assert kept * 10 < default, (kept, default)


def test_not_glibc_changes_nothing_and_says_why(monkeypatch):
    monkeypatch.setattr(platform, "libc_ver", lambda *a, **k: ("musl", "1.2"))
    applied, why = cpu_runtime.keep_freed_memory()
    assert applied is False and "not glibc" in why


@pytest.mark.parametrize("setting", [True, False])
def test_train_applies_the_config_setting(setting, make_config, tmp_path, monkeypatch):
    calls, lines = [], []
    monkeypatch.setattr(train, "keep_freed_memory", lambda: calls.append(1) or (False, "the C library is not glibc"))
    cfg = make_config(tmp_path, {"train.epochs": 1, "train.keep_freed_memory": setting})
    train.train(cfg, log=lambda *a, **k: lines.append(" ".join(map(str, a))))
    assert len(calls) == (1 if setting else 0)
    notes = [ln for ln in lines if "keep_freed_memory has no effect" in ln]
    assert len(notes) == (1 if setting else 0)
    assert not setting or "not glibc" in notes[0]


def test_setting_is_validated_as_a_boolean(make_config, tmp_path):
    from svlab.config import ConfigError
    with pytest.raises(ConfigError, match="keep_freed_memory"):
        make_config(tmp_path, {"train.keep_freed_memory": "sometimes"})


# The race of pytorch/pytorch#188792 as it showed here: threads busy with a big matrix product, then
# the process's first parallel sqrt; without the warm-up some runs got a second thread's half of the
# result from a low-accuracy kernel.
FIRST_CALL_PROBE = """
import sys
sys.path.insert(0, {project!r})
import torch
from svlab import cpu_runtime
cpu_runtime.warm_up_vector_math()
torch.manual_seed(0)
v = torch.rand(102400) * 1e-3
a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
a.t() @ b
first, second = v.sqrt(), v.sqrt()
print("SAME" if torch.equal(first, second) else "DIFFERENT")
"""


@pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="no oneMKL in this torch build: nothing to warm up")
def test_first_multithreaded_sqrt_equals_the_next_after_warm_up():
    env = {**os.environ, "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
    for _ in range(10):  # one process is one chance for the race: 10 clean ones make a fix very likely
        out = subprocess.run([sys.executable, "-c", FIRST_CALL_PROBE.format(project=str(PROJECT))],
                             capture_output=True, text=True, timeout=120, env=env)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.split()[-1] == "SAME"


def test_warm_up_calls_every_vml_function_once_per_process(monkeypatch):
    called = []
    for name in cpu_runtime.VML_FUNCTIONS:
        real = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda x, _real=real, _name=name: called.append((_name, x.dtype)) or _real(x))
    monkeypatch.setattr(cpu_runtime, "_vector_math_ready", False)
    assert cpu_runtime.warm_up_vector_math() is torch.backends.mkl.is_available()
    if torch.backends.mkl.is_available():
        assert sorted(called, key=str) == sorted(((n, d) for n in cpu_runtime.VML_FUNCTIONS
                                                  for d in (torch.float32, torch.float64)), key=str)
    assert cpu_runtime.warm_up_vector_math() is False  # once per process
    assert len(called) == (2 * len(cpu_runtime.VML_FUNCTIONS) if torch.backends.mkl.is_available() else 0)

