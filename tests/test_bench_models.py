"""tools/bench/models.py (issue 21.5): per-model training and embedding throughput, fp32 and bf16, FLOPs
against the best dense kernel. Run in-process at the --quick sizes (narrow networks, one run); the
timings are not checked, only that every documented key is there and that the numbers are the ratios
and FLOP counts they claim to be (``svlab.models.forward_flops``)."""
from __future__ import annotations

import math

import pytest

import benchmark
from bench import models
from svlab import models as speaker_model
from svlab.features import feature_dim

PER_MODEL = ("params", "forward_flops_per_audio_second", "step_flops", "embed_flops")
RATES = ("train_crops_per_s", "train_flops_per_s", "train_vs_peak", "embed_utts_per_s", "embed_flops_per_s",
         "embed_vs_peak", "embed_x_realtime")


def positive(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    # bfloat16 is measured only where the CPU has it natively; here it is measured anyway (emulated, at these
    # tiny sizes still fast), so that its keys are checked on every machine
    patch = pytest.MonkeyPatch()
    patch.setattr(models.cpu_runtime, "native_bfloat16", lambda: (True, "forced by the test"))
    patch.setitem(models.SIZES, "quick", {**models.SIZES["quick"], "crop_frames": 30, "embed_frames": 40})
    # two of the four networks (a TDNN and a 2-D ResNet): each costs seconds of FLOP counting on the meta device
    args = benchmark.build_parser().parse_args(["--quick", "--models_only", "--runs", "1",
                                                "--models", "xvector,resnet34"])
    bench = benchmark.Bench(args, tmp_path_factory.mktemp("bench_models"))
    bench.s = {**bench.s, "matmul_sizes": (64, 128)}  # an emulated bfloat16 matmul of 1024^2 takes seconds
    try:
        r = bench.run()
    finally:
        patch.undo()
    assert r["errors"] == {}
    return r


def test_every_model_has_every_key(result):
    assert list(result["models"]) == ["xvector", "resnet34"]
    for key in ("models_peak_flops_per_s", "models_matmul_peak_flops_per_s", "models_conv1d_peak_flops_per_s",
                "models_conv2d_peak_flops_per_s", "models_bf16_peak_flops_per_s"):
        assert positive(result[key]), key
    for prefix in ("models_", "models_bf16_"):
        kernels = {k: result[f"{prefix}{k}_peak_flops_per_s"] for k in ("matmul", "conv1d", "conv2d")}
        assert result[f"{prefix}peak_flops_per_s"] == max(kernels.values())
        assert result[f"{prefix}peak_kernel"] == max(kernels, key=kernels.get)
    for name, e in result["models"].items():
        for key in PER_MODEL + RATES + tuple(f"bf16_{k}" for k in RATES) + ("bf16_train_speedup",
                                                                             "bf16_embed_speedup"):
            assert positive(e[key]), (name, key)
        assert e["model"]["name"] == name


def test_flops_are_svlab_forward_flops_and_the_ratios_hold(result, tmp_path):
    s = result["models_settings"]
    for name, e in result["models"].items():
        cfg = models.model_config(name, s, tmp_path, quick=True)
        n_feat = feature_dim(cfg["features"])
        assert n_feat == 80 and cfg["model"] == e["model"]
        assert e["params"] == speaker_model.parameter_count(cfg["model"], n_feat)
        assert e["forward_flops_per_audio_second"] == speaker_model.forward_flops(cfg["model"], n_feat, 100)
        assert e["embed_flops"] == speaker_model.forward_flops(cfg["model"], n_feat, s["embed_frames"])
        # a training step: forward (= forward_flops per crop) + backward (about twice that; the first layer
        # needs no input gradient) over the batch
        forward = s["batch"] * speaker_model.forward_flops(cfg["model"], n_feat, s["crop_frames"])
        assert 2.0 < e["step_flops"] / forward <= 3.0 + 1e-9, name
        for pre, peak in (("", result["models_peak_flops_per_s"]), ("bf16_", result["models_bf16_peak_flops_per_s"])):
            assert e[f"{pre}train_flops_per_s"] == pytest.approx(e[f"{pre}train_crops_per_s"] * e["step_flops"]
                                                                 / s["batch"])
            assert e[f"{pre}train_vs_peak"] == pytest.approx(e[f"{pre}train_flops_per_s"] / peak)
            assert e[f"{pre}embed_flops_per_s"] == pytest.approx(e[f"{pre}embed_utts_per_s"] * e["embed_flops"])
            assert e[f"{pre}embed_vs_peak"] == pytest.approx(e[f"{pre}embed_flops_per_s"] / peak)
            assert e[f"{pre}embed_x_realtime"] == pytest.approx(e[f"{pre}embed_utts_per_s"] * s["embed_frames"] / 100)


def test_conv_flops_and_model_selection():
    assert models.conv_flops("conv1d", (2, 3, 5, 3, 10)) == 2 * 2 * 5 * 10 * 3 * 3
    assert models.conv_flops("conv2d", (2, 3, 5, 3, (4, 6))) == 2 * 2 * 5 * 24 * 3 * 9
    assert models.selected_models(None) == list(models.MODELS)
    assert models.selected_models("none") == []
    assert models.selected_models("ecapa, resnet34") == ["ecapa", "resnet34"]
    with pytest.raises(ValueError, match="unknown network.*xvec.*choose from xvector"):
        models.selected_models("xvec")


def test_table_lists_every_model(result):
    text = models.format_models(result)
    for name in result["models"]:
        assert f"\n{name}" in text
    assert "fp32 peak" in text and "bf16 peak" in text
