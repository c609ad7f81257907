"""tools/benchmark.py: the --quick smoke run writes every documented number, consistently.

The timings themselves are not checked (the test machine is shared and noisy); what is checked is
that each required key is a finite positive number, that the derived keys are the ratios they claim
to be, and that the analytic FLOP count agrees with torch's FlopCounterMode.
"""
from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import benchmark
import tdnn_formulations
from bench import kernels
from bench.system import summarize
from svlab import config, cpu_runtime
from svlab import models as speaker_model

PROJECT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quick_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    # --models none: the per-model section has its own test (tests/test_bench_models.py)
    proc = subprocess.run([sys.executable, str(PROJECT / "tools" / "benchmark.py"), "--quick", "--threads", "1",
                           "--models", "none", "--json", str(out)],
                          cwd=PROJECT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"benchmark.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "train / reference" in proc.stdout  # the readable table was printed
    return json.loads(out.read_text(encoding="utf-8"))


def positive(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def test_required_keys_are_finite_positive_numbers(quick_result):
    r = quick_result
    assert r["errors"] == {}
    for key in benchmark.REQUIRED_KEYS:
        assert key in r, key
        assert positive(r[key]), (key, r[key])
    for key in ("mfcc_utts_per_s", "mfcc_cold_seconds", "first_epoch_seconds", "embed_fixed_batch_utts_per_s",
                "step_flops_counted", "reference_flops_per_s", "train_vs_reference_paired",
                "input_seconds_per_step"):
        assert positive(r[key]), (key, r[key])
    if Path("/proc/self/status").is_file():  # train.py's peak memory is read from /proc
        assert positive(r["first_epoch_peak_rss_mb"])
    assert r["quick"] is True and r["threads"] == 1 and r["device"] == "cpu"
    assert r["torch_version"] and r["cpu_model"]
    cfg = config.load_config()  # the benchmark measures the model and loss of config.yaml
    assert r["model"] == speaker_model.describe(cfg["model"], cfg["loss"]) and r["crop_frames"] == 200


def test_derived_keys_are_the_ratios_they_claim(quick_result):
    r = quick_result
    assert r["train_vs_reference"] == pytest.approx(r["train_crops_per_s"] / r["reference_crops_per_s"], rel=1e-9)
    assert r["flops_vs_peak"] == pytest.approx(r["step_flops_per_s"] / r["matmul_peak_flops_per_s"], rel=1e-9)
    assert r["step_flops_per_s"] == pytest.approx(r["step_flops"] / r["batch_size"] * r["train_crops_per_s"],
                                                  rel=1e-9)
    assert r["matmul_peak_flops_per_s"] == max(r["matmul_by_size"].values())
    # first epoch: start-up (first output line) < the "Train Stage: 1/" line <= end of the process
    assert r["first_epoch_startup_seconds"] < r["first_epoch_seconds"] <= r["first_epoch_process_seconds"]


def test_gemm_ceiling_is_the_steps_own_matmuls(quick_result):
    r = quick_result
    layers = r["gemm_by_layer"]
    assert len(layers) == r["layers_counted"]
    assert sum(g["seconds"] for g in layers) == pytest.approx(r["gemm_seconds_per_step"], rel=1e-9)
    assert sum(kernels.gemm_flops(g) for g in layers) == pytest.approx(r["step_flops"], rel=1e-9)
    assert r["gemm_ceiling_flops_per_s"] == pytest.approx(r["step_flops"] / r["gemm_seconds_per_step"], rel=1e-9)
    assert r["gemm_ceiling_vs_peak"] == pytest.approx(
        r["gemm_ceiling_flops_per_s"] / r["matmul_peak_flops_per_s"], rel=1e-9)
    assert r["reference_vs_gemm_ceiling"] == pytest.approx(
        r["reference_flops_per_s"] / r["gemm_ceiling_flops_per_s"], rel=1e-9)
    assert "compiled_reference_crops_per_s" not in r  # only with --compile


def test_roofline_keys_are_what_they_claim(quick_result):
    r = quick_result
    act = sum(4 * g["groups"] * g["m"] * g["n"] for g in r["gemm_by_layer"] if not g["layer"].startswith("head"))
    assert r["activation_bytes_per_step"] == act
    assert r["elementwise_passes"] == kernels.ELEMENTWISE_PASSES == 5
    assert r["elementwise_floor_seconds"] == pytest.approx(5 * act / r["memory_bandwidth_bytes_per_s"], rel=1e-9)
    assert r["step_bound_flops_per_s"] == pytest.approx(
        r["step_flops"] / (r["gemm_seconds_per_step"] + r["elementwise_floor_seconds"]), rel=1e-9)
    assert r["stock_bound_flops_per_s"] == pytest.approx(
        r["step_flops"] / (r["gemm_seconds_per_step"] + r["stock_elementwise_seconds"]), rel=1e-9)
    assert r["step_bound_vs_peak"] == pytest.approx(r["step_bound_flops_per_s"] / r["matmul_peak_flops_per_s"])
    assert r["stock_bound_vs_peak"] == pytest.approx(r["stock_bound_flops_per_s"] / r["matmul_peak_flops_per_s"])
    # each bound adds time to the GEMMs, so it lies below the GEMM ceiling
    assert r["stock_bound_vs_peak"] < r["gemm_ceiling_vs_peak"] and r["step_bound_vs_peak"] < r["gemm_ceiling_vs_peak"]
    assert r["nongemm_seconds_per_step"] == pytest.approx(
        r["batch_size"] / r["reference_crops_per_s"] - r["gemm_seconds_per_step"], rel=1e-9)


@pytest.mark.skipif(not cpu_runtime.has_tunable_malloc(), reason="keep_freed_memory is a glibc setting")
def test_allocator_comparison_is_paired(quick_result):
    r = quick_result
    assert r["keep_freed_memory"] is True  # config.yaml's default, applied as train.py applies it
    default = r["stats"]["allocator_default_crops_per_s"]["samples"]
    kept = r["stats"]["allocator_keep_crops_per_s"]["samples"]
    assert len(default) == len(kept) >= 1
    assert r["allocator_speedup"] == pytest.approx(
        statistics.median([k / d for d, k in zip(default, kept)]), rel=1e-9)
    for key in ("allocator_default_faults_per_step", "allocator_keep_faults_per_step",
                "allocator_default_peak_rss_mb", "allocator_keep_peak_rss_mb"):
        assert r[key] is not None and r[key] >= 0, key


def test_bf16_keys_are_paired_and_consistent(quick_result):
    r = quick_result
    native, what = cpu_runtime.native_bfloat16()
    if not native:  # skipped, and says why
        assert r["bf16_native"] is None and r["bf16_skipped"] == what and "bf16_speedup" not in r
        return
    assert r["bf16_native"] == what
    fp32 = r["stats"]["bf16_fp32_reference_crops_per_s"]["samples"]
    bf16 = r["stats"]["bf16_reference_crops_per_s"]["samples"]
    assert len(fp32) == len(bf16) == r["runs"]
    assert r["bf16_speedup"] == pytest.approx(statistics.median([b / a for a, b in zip(fp32, bf16)]),
                                              rel=1e-9)
    assert r["bf16_flops_per_s"] == pytest.approx(r["step_flops"] / r["batch_size"] * r["bf16_reference_crops_per_s"],
                                                  rel=1e-9)
    assert r["bf16_matmul_peak_flops_per_s"] == max(r["bf16_matmul_by_size"].values())
    assert r["bf16_flops_vs_peak"] == pytest.approx(r["bf16_flops_per_s"] / r["bf16_matmul_peak_flops_per_s"])
    assert r["bf16_flops_vs_fp32_peak"] == pytest.approx(r["bf16_flops_per_s"] / r["matmul_peak_flops_per_s"])
    assert r["bf16_gemm_ceiling_vs_peak"] == pytest.approx(
        r["step_flops"] / r["bf16_gemm_seconds_per_step"] / r["bf16_matmul_peak_flops_per_s"])
    assert r["amp_dtype"] is None  # train.amp: auto trains in fp32 on the CPU; bf16 is only this section


def test_activation_bytes_and_stock_elementwise_time():
    model = speaker_model.build_model({"name": "xvector", "pooling": "gap", "embedding_size": 16, "channels": 32,
                                       "stat_channels": 48}, 20)
    head = speaker_model.build_loss({"type": "softmax", "scale": 30.0, "margin": 0.2}, 16, 10)
    gemms = kernels.layer_gemms(model, head, 4, 20, 60)
    frames = [56, 52, 46, 46, 46]
    widths = [32, 32, 32, 32, 48]
    # the five frame layers' outputs and the embedding layer's, not the head's logits
    assert kernels.activation_bytes(gemms) == 4 * (sum(4 * f * w for f, w in zip(frames, widths)) + 4 * 16)
    seconds = kernels.stock_elementwise_seconds(gemms, 4, torch.device("cpu"), reps=2)
    assert 0 < seconds < 1.0


def test_layer_gemms_of_the_xvector():
    model = speaker_model.build_model({"name": "xvector", "pooling": "gap", "embedding_size": 16, "channels": 32,
                                       "stat_channels": 48}, 20)
    head = speaker_model.build_loss({"type": "softmax", "scale": 30.0, "margin": 0.2}, 16, 10)
    gemms = kernels.layer_gemms(model, head, 4, 20, 60)
    frames = [60 - 4, 60 - 8, 60 - 14, 60 - 14, 60 - 14]  # (5,1), (3,2), (3,3), (1,1), (1,1)
    shapes = [(4 * f, k, n) for f, k, n in zip(frames, [20 * 5, 32 * 3, 32 * 3, 32, 32], [32, 32, 32, 32, 48])]
    assert [(g["m"], g["k"], g["n"]) for g in gemms[:5]] == shapes
    assert [g["input_grad"] for g in gemms[:5]] == [False, True, True, True, True]  # the data needs no gradient
    assert [(g["layer"], g["m"], g["k"], g["n"]) for g in gemms[5:]] == [("Linear", 4, 48, 16),
                                                                         ("head_linear", 4, 16, 10)]
    seconds = kernels.gemm_seconds(gemms[1], torch.device("cpu"), reps=2)
    assert 0 < seconds < 1.0


def test_spreads_bracket_the_medians(quick_result):
    r = quick_result
    for key in ("train_crops_per_s", "reference_crops_per_s", "mfcc_x_realtime", "embed_utts_per_s",
                "embed_unbudgeted_utts_per_s", "score_trials_per_s", "first_epoch_seconds"):
        st = r["stats"][key]
        assert st["n"] == len(st["samples"]) >= 1
        assert st["min"] <= st["q1"] <= st["median"] <= st["q3"] <= st["max"]
        assert st["median"] == r[key]


def test_embedding_is_timed_with_and_without_the_frame_budget(quick_result):
    r = quick_result
    assert r["stats"]["embed_utts_per_s"]["n"] == r["stats"]["embed_unbudgeted_utts_per_s"]["n"]  # interleaved
    assert r["embed_budget_speedup"] == pytest.approx(r["embed_utts_per_s"] / r["embed_unbudgeted_utts_per_s"])
    # the budget splits batches, never merges them
    assert r["embed_utterances"] >= r["embed_batches"] >= r["embed_unbudgeted_batches"] >= 1


def test_analytic_flops_match_flop_counter(quick_result):
    r = quick_result
    assert abs(r["step_flops"] - r["step_flops_counted"]) <= 0.05 * r["step_flops_counted"]
    assert r["step_flops_rel_diff"] <= 0.05
    # the textbook 6 x MACs overcounts only the first layer's input gradient
    assert r["step_flops"] < r["step_flops_rule_of_three"] <= 1.05 * r["step_flops"]


@pytest.mark.parametrize("model_cfg,loss_type", [
    ({"name": "xvector", "pooling": "stats", "embedding_size": 32, "channels": 64}, "amsoftmax"),
    ({"name": "xvector", "pooling": "asp", "embedding_size": 32, "channels": 64}, "aamsoftmax"),
    ({"name": "ecapa", "pooling": "asp", "embedding_size": 32, "channels": 64}, "softmax"),
])
def test_analytic_flops_other_architectures(model_cfg, loss_type):
    model = speaker_model.build_model(model_cfg, 20)
    head = speaker_model.build_loss({"type": loss_type, "scale": 30.0, "margin": 0.2}, model_cfg["embedding_size"], 10)
    analytic = kernels.analytic_step_flops(model, head, 4, 20, 60, 10)["step_flops"]
    counted = kernels.counted_step_flops(model, head, 4, 20, 60, 10)
    assert analytic == pytest.approx(counted, rel=0.05)


def test_summarize():
    st = summarize([3.0, 1.0, 2.0, 10.0])
    assert st["median"] == 2.5 and st["min"] == 1.0 and st["max"] == 10.0 and st["n"] == 4
    assert st["q1"] <= st["median"] <= st["q3"] and st["iqr"] == st["q3"] - st["q1"]
    one = summarize([4.0])
    assert one["median"] == one["q1"] == one["q3"] == 4.0 and one["iqr"] == 0.0


def test_other_tdnn_formulations_compute_the_same_function():
    """tools/tdnn_formulations.py times only formulations that equal the lab's Conv1d x-vector:
    output and every parameter gradient agree in float64 (a wrong tap, dilation or dropped row would
    be off by far more than rounding)."""
    for name in tdnn_formulations.EAGER_EQUIVALENT:
        errors = tdnn_formulations.max_relative_errors(name)
        assert len(errors) == 1 + len(list(tdnn_formulations.Xvector(
            tdnn_formulations.GlobalAveragePooling(48), 20, 32, 48, 16).parameters()))
        assert max(errors.values()) < 1e-10, (name, errors)


def test_shifted_matmul_tdnn_under_bfloat16_autocast():
    """``--amp bf16`` times the GEMM form under autocast as train.amp does: it must then compute in
    bfloat16, hand float32 parameters float32 gradients, and be as close to the float32 model as the
    Conv1d model under autocast is (a wrong tap or dilation would be off by 100 %, not by rounding)."""
    torch.manual_seed(0)
    net = tdnn_formulations.Xvector(tdnn_formulations.GlobalAveragePooling(48), 20, 32, 48, 16).train()
    x = torch.randn(4, 20, 60)

    def run(forward, amp: bool):
        net.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out = forward(x)
        assert out.dtype == (torch.bfloat16 if amp else torch.float32)
        out.float().square().sum().backward()
        grads = {n: p.grad.clone() for n, p in net.named_parameters()}
        assert all(g.dtype == torch.float32 for g in grads.values())
        return out.float(), grads

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    out_ref, grads_ref = run(net, amp=False)
    errors = {}
    for name, forward in (("conv1d", net), ("matmul", lambda v: tdnn_formulations.matmul_forward(net, v))):
        out, grads = run(forward, amp=True)
        errors[name] = (rel(out, out_ref), max(rel(grads[n], grads_ref[n]) for n in grads))
    assert errors["matmul"][0] < max(2 * errors["conv1d"][0], 0.02), errors
    assert errors["matmul"][1] < max(2 * errors["conv1d"][1], 0.3), errors
