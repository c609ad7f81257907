"""Mixed precision (``train.amp``): which autocast dtype ``train`` uses where, the errors for
settings that cannot work, and bfloat16 training on the CPU (weights and checkpoints stay float32).

The CUDA branches are checked with ``torch.cuda`` capability queries replaced (no GPU here); the CPU
bfloat16 runs are real.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

PROJECT = Path(__file__).resolve().parents[1]
if str(PROJECT) not in sys.path:
    sys.path.insert(0, str(PROJECT))

from svlab import cpu_runtime  # noqa: E402
from svlab import models as speaker_model  # noqa: E402
from svlab import training  # noqa: E402
import train  # noqa: E402
from svlab.checkpoint import INTERRUPTED, load_checkpoint  # noqa: E402
from svlab.config import ConfigError, load_config  # noqa: E402

CPU = torch.device("cpu")
CUDA = torch.device("cuda", 0)


def amp_for(setting: str, device: torch.device) -> tuple[torch.dtype | None, list[str]]:
    lines: list[str] = []
    cfg = load_config(None, {"train.amp": setting})
    return training.amp_dtype_for(cfg, device, log=lines.append), lines


@pytest.mark.parametrize("native", [True, False])
def test_cpu_choices(monkeypatch, native):
    why = "AMX-BF16" if native else "this CPU has neither AMX-BF16 nor AVX512-BF16: bfloat16 is emulated there"
    monkeypatch.setattr(training, "native_bfloat16", lambda: (native, why))
    dtype, lines = amp_for("auto", CPU)
    assert dtype is None  # fp32 unless asked: the lab's results do not depend on the CPU model
    assert len(lines) == (1 if native else 0) and (not native or "--amp bf16" in lines[0])
    assert amp_for("fp32", CPU) == (None, [])
    dtype, lines = amp_for("bf16", CPU)
    assert dtype is torch.bfloat16
    assert len(lines) == (0 if native else 1) and (native or "emulated" in lines[0])


def test_fp16_on_the_cpu_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match=r"train\.amp=fp16 needs a CUDA GPU.*use bf16 or fp32"):
        amp_for("fp16", CPU)


@pytest.mark.parametrize("has_bf16", [True, False])
def test_cuda_choices(monkeypatch, has_bf16):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: has_bf16)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla T4")
    assert amp_for("auto", CUDA)[0] is (torch.bfloat16 if has_bf16 else torch.float16)
    assert amp_for("fp16", CUDA)[0] is torch.float16
    assert amp_for("fp32", CUDA)[0] is None
    if has_bf16:
        assert amp_for("bf16", CUDA)[0] is torch.bfloat16
    else:
        with pytest.raises(ConfigError, match="Tesla T4 has no bfloat16; use fp16"):
            amp_for("bf16", CUDA)


def test_unknown_and_yaml_boolean_values_name_the_fix():
    with pytest.raises(ConfigError, match="choose one of auto, fp32, bf16, fp16"):
        load_config(None, {"train.amp": "half"})
    # --set train.amp=off: YAML reads the word as False
    with pytest.raises(ConfigError, match="train.amp.*got False; YAML reads unquoted yes/no/on/off"):
        load_config(None, {"train.amp": False})


def test_native_bfloat16_reads_the_cpu_capabilities(monkeypatch):
    caps = {"amx_bf16": True, "avx512_bf16": True, "cpu_name": "Xeon"}
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: caps)
    assert cpu_runtime.native_bfloat16() == (True, "AMX-BF16")
    caps["amx_bf16"] = False
    assert cpu_runtime.native_bfloat16() == (True, "AVX512-BF16")
    caps["avx512_bf16"] = False
    native, why = cpu_runtime.native_bfloat16()
    assert native is False and "Xeon" in why and "emulated" in why


def test_bf16_step_runs_the_layers_in_bf16_and_keeps_fp32_weights():
    torch.manual_seed(0)
    model = speaker_model.build_model({"name": "xvector", "pooling": "stats", "embedding_size": 16,
                                       "channels": 32, "stat_channels": 48}, 20)
    head = speaker_model.build_loss({"type": "amsoftmax", "scale": 30.0, "margin": 0.2}, 16, 5)
    model.train()
    head.train()
    params = [*model.parameters(), *head.parameters()]
    optimizer = torch.optim.Adam(params, lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
             for m in model.modules() if isinstance(m, torch.nn.Conv1d)]
    x, y = torch.randn(4, 20, 60), torch.tensor([0, 1, 2, 3])
    before = [p.detach().clone() for p in params]
    with training.autocast(CPU, torch.bfloat16):  # train.py's loop body
        loss, _ = head(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    for h in hooks:
        h.remove()
    assert seen and all(d is torch.bfloat16 for d in seen)  # autocast ran the convolutions in bf16
    assert torch.isfinite(loss) and loss.dtype is torch.float32
    assert all(p.dtype is torch.float32 for p in params)
    assert any(not torch.equal(a, p) for a, p in zip(before, params))  # the step updated the weights


def test_bf16_training_matches_fp32_closely_and_saves_fp32(make_config, tmp_path):
    results = {}
    for amp in ("fp32", "bf16"):
        lines: list[str] = []
        cfg = make_config(tmp_path / amp, {"train.epochs": 2, "train.amp": amp})
        out = train.train(cfg, log=lambda *a, **k: lines.append(" ".join(map(str, a))))
        state = load_checkpoint(out["final_checkpoint"])
        results[amp] = [h["loss"] for h in out["history"]]
        assert all(t.dtype == torch.float32 for t in state["model_state"].values() if t.is_floating_point())
        assert state["config"]["train"]["amp"] == amp
        precision = [ln for ln in lines if ln.startswith("mixed precision")]
        assert precision == ([] if amp == "fp32" else
                             ["mixed precision: torch.autocast bfloat16 on cpu (train.amp=bf16); weights, "
                              "optimiser and checkpoints stay float32"])
    fp32, bf16 = results["fp32"], results["bf16"]
    assert fp32 != bf16  # the bf16 run really computed in bf16
    # ... and learned the same: per-epoch losses within 2 %, both decreasing
    assert bf16 == pytest.approx(fp32, rel=0.02)
    assert bf16[1] < bf16[0] and fp32[1] < fp32[0]


def test_resume_with_another_precision_says_so(make_config, tmp_path):
    train.train(make_config(tmp_path, {"train.epochs": 1}), log=lambda *a, **k: None)
    lines: list[str] = []
    cfg = make_config(tmp_path, {"train.epochs": 2, "train.amp": "bf16"})
    out = train.train(cfg, resume=True, log=lambda *a, **k: lines.append(" ".join(map(str, a))))
    assert [h["epoch"] for h in out["history"]] == [1, 2]
    assert "note: train.amp changed from auto to bf16 for the resumed run" in lines


def test_fp16_on_the_cpu_fails_before_any_work(write_config_yaml, tmp_path, capsys):
    path = write_config_yaml(tmp_path)
    rc = train.main(["--config", str(path), "--amp", "fp16", "--gpu", "-1"])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.amp=fp16 needs a CUDA GPU" in err[0]
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()


def test_fp16_grad_scaler_state_is_saved_and_resumed(make_config, tmp_path, monkeypatch):
    # fp16 autocast is CUDA-only in train.py; on the tiny model the CPU runs it, which is enough to
    # follow the GradScaler's state through interrupted.pth and --resume.
    monkeypatch.setattr(train, "amp_dtype_for", lambda cfg, device, log=print: torch.float16)
    from svlab.checkpoint import save_checkpoint
    cfg = make_config(tmp_path, {"train.epochs": 2})
    out = train.train(cfg, log=lambda *a, **k: None, stop_after_steps=2)
    inter = out["run_folder"] / INTERRUPTED
    state = load_checkpoint(inter)
    assert state["scaler_state"]["scale"] == 65536.0 and state["scaler_state"]["_growth_tracker"] == 2
    state["scaler_state"].update(scale=1024.0, _growth_tracker=7)  # as if it had backed off earlier
    save_checkpoint(state, inter)
    out = train.train(cfg, resume=True, log=lambda *a, **k: None)
    final = load_checkpoint(out["final_checkpoint"])
    steps_after_resume = 2 * 4 - 2  # 32 utterances at batch 8: 4 steps per epoch
    assert final["scaler_state"]["scale"] == 1024.0
    assert final["scaler_state"]["_growth_tracker"] == 7 + steps_after_resume
