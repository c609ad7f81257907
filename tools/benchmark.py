"""Performance benchmark: features, training throughput, FLOPs, embedding, scoring, memory, start-up.

    python tools/benchmark.py --json bench_results/cpu.json          # full run
    python tools/benchmark.py --quick --json /tmp/smoke.json         # smoke mode (small sizes)
    python tools/benchmark.py --runs 7 --threads 4 --json out.json   # more repetitions, 4 torch threads
    python tools/benchmark.py --gpu --json bench_results/gpu.json    # training/embedding on CUDA (autocast)
    python tools/benchmark.py --memory 1,4,16 --json mem.json        # train.py's peak RSS and crops/s vs corpus size

Everything runs on a small synthetic corpus generated into a temporary folder (``demo_corpus``), so
the numbers do not depend on the data you have. The model, loss and feature settings are those of
``config.yaml`` (the lab default: x-vector, GAP, softmax, 40 MFCCs); training is measured at batch 64
with 2-s crops (200 frames), 4 steps (one epoch of the 256-utterance corpus) per run after 2 warm-up
steps (``--quick``: batch 8, 2 steps). Every measurement is repeated ``--runs`` times (default 5; the ones that
start a fresh process, MFCC cold start and train.py's first epoch, 3 times unless ``--runs`` is given;
``--quick``: 2 and 1, on smaller sizes). The JSON holds the median of each measurement; ``stats``
holds its spread. Run it on an otherwise idle machine: the timings are only as quiet as the machine
(``loadavg_start``/``loadavg_end`` record how busy it was). A full run takes a few minutes.

JSON keys (numbers are medians over the runs unless noted; rates are per second of wall time)

==============================  =========================================================================
key                             meaning
==============================  =========================================================================
train_crops_per_s               training throughput through the real input path: ``SpkTrainDataset``
                                crops + ``DataLoader`` (shuffle, ``collate_fn``, as ``train.py``
                                builds it, a new loader each epoch) + train.py's loop body (forward,
                                loss, backward, Adam step, LR-scheduler step; ``lab_train_step``) +
                                the per-step ``loss.item()``/``acc.item()`` of the training loop.
                                Crops (training examples) per second.
reference_crops_per_s           the same model, optimizer and step on random tensors already in memory
                                (no data loading); measured interleaved with the above, same process
train_vs_reference              ``train_crops_per_s / reference_crops_per_s`` (1.0 = the input path
                                costs nothing; 0.8 = data loading takes 20 % of a step)
input_seconds_per_step          the input path alone (no model): seconds to produce one batch of crops
                                through SpkTrainDataset + DataLoader (new loader each epoch)
train_vs_reference_paired       median of the per-run ratios (the two loops run back to back in each
                                run, A-B-B-A): more robust than the ratio of medians on a busy machine
step_flops                      floating-point operations of one training step at the benchmark batch,
                                counted analytically: every Conv1d/Linear (and a margin head's cosine
                                matmul) costs ``2 * MACs`` forward, ``2 * MACs`` for the weight gradient
                                and ``2 * MACs`` for the input gradient (not for the first layer, whose
                                input needs no gradient). Pointwise ops (BatchNorm, ReLU, pooling,
                                softmax, Adam) are not counted, as in ``FlopCounterMode``.
step_flops_counted              the same, counted by ``torch.utils.flop_counter.FlopCounterMode`` on one
                                forward + backward (on the meta device; for real on the CPU where a
                                module cannot run there, e.g. a margin head's autocast region);
                                ``step_flops_rel_diff`` = ``|step_flops - step_flops_counted| /
                                step_flops_counted`` (0 for every model/pooling/loss of the project)
step_flops_rule_of_three        the textbook estimate ``6 * MACs`` (forward + 2x backward everywhere)
step_flops_per_s                achieved FLOP/s of training: ``step_flops / batch * train_crops_per_s``
reference_flops_per_s           the same for the reference loop
matmul_peak_flops_per_s         measured matmul peak on this machine, same thread count: the best of
                                several ``torch.matmul`` timings of n x n matrices, ``2 n^3 / seconds``
                                (CPU: fp32, n = 2048 and 4096, --quick 512 and 1024; GPU: the autocast
                                dtype, n = 4096 and 8192)
flops_vs_peak                   ``step_flops_per_s / matmul_peak_flops_per_s``: how much of the
                                machine's dense-matmul speed training achieves
gemm_seconds_per_step           the step's own matrix products (``layer_gemms``: per Conv1d/Linear the
                                forward, weight-gradient and input-gradient product) timed as plain
                                ``torch.matmul`` calls on contiguous fp32 matrices of exactly those
                                shapes, summed (median per product over the runs)
gemm_ceiling_flops_per_s        ``step_flops / gemm_seconds_per_step``: what a step could reach if
                                everything else (BatchNorm, ReLU, pooling, copies, Adam) were free
gemm_ceiling_vs_peak            ``gemm_ceiling_flops_per_s / matmul_peak_flops_per_s``: the upper bound
                                of ``flops_vs_peak`` at these layer shapes (small ``k``/``n`` run below
                                the square-matmul peak)
reference_vs_gemm_ceiling       ``reference_flops_per_s / gemm_ceiling_flops_per_s``: how close the
                                step is to its own GEMMs
gemm_by_layer                   per product: shape, seconds and FLOP/s
nongemm_seconds_per_step        reference step time minus ``gemm_seconds_per_step``: what the step
                                spends outside its matrix products (BatchNorm, ReLU, pooling, copies,
                                Adam, and GEMMs running below their stand-alone speed)
memory_bandwidth_bytes_per_s    copying one fp32 buffer into another (256 MiB; --quick 32 MiB), bytes
                                read + written per second, median over the runs
activation_bytes_per_step       fp32 bytes of all Conv1d/Linear outputs of the embedding network in
                                one step (``activation_bytes``)
elementwise_floor_seconds       ``elementwise_passes`` (5) x ``activation_bytes_per_step`` /
                                ``memory_bandwidth_bytes_per_s``: the least time the step's elementwise
                                work (ReLU, BatchNorm forward and backward) can take even perfectly
                                fused, outside the GEMM kernels (see ``ELEMENTWISE_PASSES``)
step_bound_flops_per_s          ``step_flops / (gemm_seconds_per_step + elementwise_floor_seconds)``:
                                the fastest such a step can run on this machine
step_bound_vs_peak              ``step_bound_flops_per_s / matmul_peak_flops_per_s``: the highest
                                ``flops_vs_peak`` any fp32 implementation built on these GEMMs can reach
stock_elementwise_seconds       PyTorch's own ReLU + BatchNorm kernels, forward and backward in training
                                mode, timed on tensors shaped like every Conv1d output of the step
                                (``stock_elementwise_seconds``; median per layer, summed)
stock_bound_flops_per_s         ``step_flops / (gemm_seconds_per_step + stock_elementwise_seconds)`` and
stock_bound_vs_peak             its ratio to the peak: the best any implementation that keeps those
                                stock kernels can do, however fast its convolutions are
keep_freed_memory               whether ``keep_freed_memory`` was applied before the training
                                section (``train.keep_freed_memory``, as ``train.py`` does)
allocator_default_crops_per_s   the reference loop in a fresh process with glibc's default ``malloc``
allocator_keep_crops_per_s      ... and with ``svlab.cpu_runtime.keep_freed_memory()`` (pairs alternate A-B,
                                B-A; 3 pairs, --quick 1); ``allocator_speedup`` is the median of the
                                per-pair ratios kept / default; null where the C library is not glibc
allocator_default_faults_per_step  minor page faults per training step in those processes
allocator_keep_faults_per_step     (``getrusage``), and ``allocator_default_peak_rss_mb`` /
                                ``allocator_keep_peak_rss_mb`` their peak resident memory (MiB)
bf16_reference_crops_per_s      the reference loop under ``torch.autocast("cpu", dtype=torch.bfloat16)``
                                (``train.amp: bf16``), interleaved A-B-B-A with the fp32 reference loop
                                in one process (``bf16_fp32_reference_crops_per_s``); ``bf16_speedup`` is
                                the median of the per-run ratios bf16 / fp32. CPU runs on a CPU with
                                native bfloat16 only (``bf16_native``: AMX-BF16 or AVX512-BF16, else null
                                and ``bf16_skipped`` says why; the keys are then absent)
bf16_flops_per_s                ``step_flops`` per second in that loop; ``bf16_flops_vs_peak`` against
bf16_matmul_peak_flops_per_s    the bfloat16 matmul peak measured like ``matmul_peak_flops_per_s``,
                                ``bf16_flops_vs_fp32_peak`` against the fp32 one
bf16_gemm_seconds_per_step      the step's GEMMs (``layer_gemms``) as plain bfloat16 matmuls;
                                ``bf16_gemm_ceiling_flops_per_s`` and ``bf16_gemm_ceiling_vs_peak`` (its
                                ratio to the bf16 peak) as for fp32
compiled_reference_crops_per_s  (``--compile`` only) the reference loop with the network wrapped in
                                ``torch.compile`` (as ``train.py --compile``); ``compiled_flops_per_s``,
                                ``compiled_flops_vs_peak``, ``compiled_vs_reference`` (speed-up over the
                                eager reference) and ``compile_seconds`` (the first, compiling step)
bf16_compiled_reference_crops_per_s  (``--compile`` on a CPU with native bfloat16) the same compiled
                                network under bfloat16 autocast (``train.py --compile --amp bf16``);
                                ``bf16_compiled_vs_reference`` is its ratio to the eager fp32
                                ``reference_crops_per_s``, ``bf16_compiled_flops_vs_peak`` its FLOP/s
                                over ``bf16_matmul_peak_flops_per_s``
mfcc_utts_per_s                 warm feature extraction (``extract_features`` = ``load_audio``
                                + ``mfcc`` per file, one process), utterances per second
mfcc_x_realtime                 the same as seconds of audio processed per second of wall time
mfcc_parallel_utts_per_s        ``extract_features`` with its default worker pool (what ``train.py``
mfcc_parallel_x_realtime        does for 64 files or more, pool start-up included); null with fewer
                                files (--quick)
mfcc_cold_seconds               latency of the first ``mfcc(load_audio(...))`` call in a fresh process:
                                librosa import, numba JIT start-up (or cache load), one utterance
mfcc_cold_warm_call_seconds     the second call on the same file in that process (the warm cost)
mfcc_cold_process_seconds       wall time of that whole subprocess (interpreter, torch and numpy
                                imports, both calls)
mfcc_cold_nocache_seconds       the first call with an empty numba cache (``NUMBA_CACHE_DIR`` = a new
                                folder): the one-off cost of the very first run after installing
                                librosa (one sample; null in --quick)
embed_utts_per_s                embedding extraction through ``svlab.embedding.embed_features`` on a
                                ``SpkTestDataset`` of whole 2-4 s utterances (equal-length batches of at
                                most ``test.batch_frames`` frames, exactly as ``EER.py`` does)
embed_unbudgeted_utts_per_s     the same without the frame budget (up to ``test.batch_size`` utterances
                                of one length a batch, however long), timed interleaved with it
embed_budget_speedup            ``embed_utts_per_s`` / ``embed_unbudgeted_utts_per_s``: what the budget
                                gains (> 1) or costs (< 1) in speed on this device
embed_fixed_batch_utts_per_s    the model on one batch of ``test.batch_size`` 3-s (300-frame) inputs:
                                the speed-up batching could give
embed_x_realtime                ``embed_utts_per_s`` in seconds of audio per second
score_trials_per_s              ``svlab.scoring.cosine_scores`` on random ``score_embeddings x 512`` embeddings
                                (10,000) and ``score_trials`` random pairs (1,000,000)
first_epoch_seconds             cold time to the first epoch: wall time from starting
                                ``python train.py --epochs 1`` (on the generated corpus, a fresh empty
                                feature cache, config.yaml's training settings: batch 64, 1-s crops) to
                                its
                                ``Train Stage: 1/`` line: interpreter + imports + MFCC extraction of the
                                training set + model build + one epoch
first_epoch_startup_seconds     ... of which until its first output line (imports, config)
first_epoch_features_seconds    ... of which reading the training data (as train.py reports it)
first_epoch_train_seconds       ... of which the epoch itself (as train.py reports it)
first_epoch_process_seconds     wall time of the whole train.py run (checkpoint, log and plot included)
peak_rss_mb                     peak resident memory of the benchmark process (VmHWM on Linux, else
                                ``getrusage``), MiB
first_epoch_peak_rss_mb         peak resident memory of the train.py process of the first-epoch run
                                (config.yaml's batch and crop; its MFCC worker processes not included),
                                read from ``/proc/<pid>/status`` VmHWM at its last output line; null
                                where there is no /proc, MiB
rss_after_section_mb            peak resident memory after each section (shows which one sets it)
stats                           per measurement: ``median``, ``min``, ``max``, ``q1``, ``q3``, ``iqr``,
                                ``n`` and the raw ``samples`` (rates per run)
==============================  =========================================================================

Per model (``--models``, default all; ``--models_only`` runs just this): ``models`` and ``models_*``, the
training step and embedding throughput of the x-vector, ECAPA-TDNN, ResNet34 and CAM++ in fp32 and bf16
with their FLOPs against the best dense kernel measured; every key is listed in ``tools/bench/models.py``.

Also recorded: ``torch_version``, ``python_version``, ``librosa_version``, ``numpy_version``,
``threads`` (torch intra-op threads; subprocesses get ``OMP_NUM_THREADS`` = this), ``device``,
``device_name``, ``amp_dtype`` (``train.amp`` on this device; null: fp32), ``matmul_dtype``,
``cpu_model`` (``/proc/cpuinfo``), ``cpu_count``, ``platform``,
``loadavg_start``/``loadavg_end`` (1-minute load; a loaded machine gives slow, noisy numbers),
``quick``, ``runs``, ``batch_size``, ``crop_frames``, ``model`` (tag), ``model_params``,
``n_classes``, ``train_steps_per_run``, ``matmul_sizes``, ``matmul_by_size`` (best FLOP/s per
size), ``train_step_source`` (which step function was timed), ``errors`` (sections that failed).

``--gpu`` runs training, reference, matmul peak and embedding on CUDA with ``torch.autocast`` in
bfloat16 where supported (else float16 with a ``GradScaler``), exactly as ``train.py`` does on a GPU
(``train.amp: auto``); MFCC, scoring and the FLOP count stay on the CPU.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

if __name__ == "__main__":  # progress bars would bury the table; tqdm reads this when torch imports it
    os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project folder: svlab and the lab's files

from bench import data, kernels, memory, models, training  # noqa: E402  (tools/, this file's folder, is on sys.path)
from bench.system import (cpu_model, loadavg, package_version, peak_rss_mb, quiet,  # noqa: E402
                          summarize)
from svlab import config as config_mod  # noqa: E402
from svlab import cpu_runtime  # noqa: E402
from svlab import demo_corpus  # noqa: E402
from svlab.errors import LabError  # noqa: E402
from svlab.files import atomic_write, json_with_keys, refuse_overwrite  # noqa: E402

REQUIRED_KEYS = ("train_crops_per_s", "reference_crops_per_s", "train_vs_reference", "step_flops",
                 "step_flops_per_s", "matmul_peak_flops_per_s", "flops_vs_peak", "mfcc_x_realtime",
                 "embed_utts_per_s", "score_trials_per_s", "peak_rss_mb")

# Benchmark sizes. "full" is the default; "quick" is the smoke mode of the test suite.
SETTINGS = {
    "full": dict(corpus=dict(n_train_speakers=32, n_test_speakers=8, utts_per_speaker=8, test_utts_per_speaker=8,
                             min_seconds=2.0, max_seconds=4.0),
                 batch=64, crop_frames=200, train_steps=4, warmup_steps=2, matmul_sizes=(2048, 4096),
                 matmul_reps=5, score_embeddings=10_000, score_trials=1_000_000, cold_runs=3,
                 bandwidth_mib=256),
    "quick": dict(corpus=dict(n_train_speakers=8, n_test_speakers=4, utts_per_speaker=4, test_utts_per_speaker=4,
                              min_seconds=2.0, max_seconds=4.0),
                  batch=8, crop_frames=200, train_steps=2, warmup_steps=1, matmul_sizes=(512, 1024),
                  matmul_reps=3, score_embeddings=2_000, score_trials=100_000, cold_runs=1,
                  bandwidth_mib=32),
}
QUICK_RUNS = 2


class Bench:
    """One benchmark run: its settings, the generated corpus and config, and what the sections
    (``bench.data``, ``bench.kernels``, ``bench.training``) record into it."""

    def __init__(self, args, workdir: Path):
        self.args = args
        self.quick = args.quick
        self.s = SETTINGS["quick" if args.quick else "full"]
        self.runs = args.runs if args.runs is not None else (QUICK_RUNS if args.quick else 5)
        # fresh-process measurements (MFCC cold start, train.py first epoch) take seconds each: fewer
        # of them unless --runs asks for a number explicitly
        self.cold_runs = args.runs if args.runs is not None else self.s["cold_runs"]
        self.reps = max(self.s["matmul_reps"], self.runs)  # timings per kernel shape
        self.workdir = workdir
        self.threads = torch.get_num_threads()
        self.device = torch.device("cuda") if args.gpu else torch.device("cpu")
        self.result: dict = {}
        self.stats: dict = {}
        self.errors: dict = {}
        self.rss_by_section: dict = {}
        self.corpus = None
        self.cfg = None
        self.model = None  # the trained-for-a-few-steps network, set by the training section

    def record(self, key: str, samples: list[float]) -> float:
        """Store the median of ``samples`` under ``key`` and their spread under ``stats[key]``."""
        st = summarize(samples)
        self.stats[key] = st
        self.result[key] = st["median"]
        return st["median"]

    def section(self, name: str, fn) -> None:
        """Run one section; a failure is recorded under ``errors[name]`` and the others still run."""
        print(f"[benchmark] {name} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            fn(self)
        except Exception as e:  # one failed section must not lose the others
            import traceback
            traceback.print_exc()
            self.errors[name] = f"{type(e).__name__}: {e}"
        rss = peak_rss_mb()
        self.rss_by_section[name] = round(rss, 1) if rss is not None else None
        print(f"[benchmark] {name} done in {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)

    def make_corpus(self) -> None:
        base = self.workdir / "corpus"
        root, files = base / "audio", base / "files"
        demo_corpus.generate(root, params=self.s["corpus"], files_dir=files, workers=None, log=quiet)
        self.corpus = {"root": root, "train": files / "split_train_set.txt", "test": files / "test_set.txt",
                       "trials": files / "trials.txt"}
        self.cfg = config_mod.load_config(None, self.overrides(self.workdir / "feature_cache", self.workdir / "runs"))
        self.cfg["train"]["batchsize"] = self.s["batch"]
        self.cfg["train"]["crop_frames"] = self.s["crop_frames"]

    def overrides(self, cache_dir: Path, save_dir: Path) -> dict:
        """Config overrides pointing at the generated corpus, ``cache_dir`` and ``save_dir``."""
        c = self.corpus
        return {"data.root": str(c["root"]), "data.train_manifest": str(c["train"]), "test.root": str(c["root"]),
                "test.test_manifest": str(c["test"]), "test.trials": str(c["trials"]),
                "features.cache_dir": str(cache_dir), "train.save_dir": str(save_dir)}

    def audio_paths(self, manifest: Path) -> list[Path]:
        lines = [ln.split(maxsplit=1) for ln in manifest.read_text(encoding="utf-8").splitlines() if ln.strip()]
        return [self.corpus["root"] / rel for _, rel in lines]

    def run(self) -> dict:
        args = self.args
        self.result.update({
            "quick": bool(self.quick), "runs": self.runs, "threads": self.threads, "device": str(self.device),
            "device_name": torch.cuda.get_device_name(0) if self.device.type == "cuda" else cpu_model(),
            "cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "torch_version": torch.__version__, "python_version": platform.python_version(),
            "numpy_version": np.__version__, "librosa_version": package_version("librosa"),
            "loadavg_start": loadavg(), "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        })
        cpu_runtime.warm_up_vector_math()  # as train.py and EER.py do
        if args.models_only:  # the per-model section alone (bench.models): no corpus needed
            self.section("models", models.measure_models)
            self.result.update(stats=self.stats, errors=self.errors, loadavg_end=loadavg())
            return self.result
        self.section("corpus", Bench.make_corpus)
        if self.corpus is None:
            raise RuntimeError(f"could not generate the benchmark corpus: {self.errors.get('corpus')}")
        self.section("mfcc", data.measure_mfcc)
        self.section("mfcc_cold", data.measure_mfcc_cold)
        self.section("training", training.measure_training)
        self.section("matmul", kernels.measure_matmul)
        self.section("gemms", kernels.measure_gemms)
        self.section("allocator", training.measure_allocator)
        self.section("bf16", training.measure_bf16)
        if args.compile:
            self.section("compiled", training.measure_compiled)
        self.section("embedding", data.measure_embedding)
        self.section("scoring", data.measure_scoring)
        self.section("models", models.measure_models)  # after the matmul and bf16 sections: reuses their peaks
        if not args.skip_first_epoch:
            self.section("first_epoch", data.measure_first_epoch)
        add_ratios(self.result)
        r = self.result
        rss = peak_rss_mb()
        r["peak_rss_mb"] = round(rss, 1) if rss is not None else None
        r["rss_after_section_mb"] = self.rss_by_section
        r["loadavg_end"] = loadavg()
        r["stats"] = self.stats
        r["errors"] = self.errors
        missing = [k for k in REQUIRED_KEYS if not _is_positive_number(r.get(k))]
        if missing:
            self.errors["missing"] = f"no value for {', '.join(missing)}"
        return r


def add_ratios(r: dict) -> None:
    """The keys that compare two sections' results (achieved FLOP/s against the peaks)."""
    peak = r.get("matmul_peak_flops_per_s")
    if r.get("step_flops_per_s") and peak:
        r["flops_vs_peak"] = r["step_flops_per_s"] / peak
    if r.get("gemm_ceiling_flops_per_s") and peak:
        r["gemm_ceiling_vs_peak"] = r["gemm_ceiling_flops_per_s"] / peak
        r["step_bound_vs_peak"] = r["step_bound_flops_per_s"] / peak
        r["stock_bound_vs_peak"] = r["stock_bound_flops_per_s"] / peak
        if r.get("reference_flops_per_s"):
            r["reference_vs_gemm_ceiling"] = r["reference_flops_per_s"] / r["gemm_ceiling_flops_per_s"]
    if r.get("bf16_flops_per_s") and peak:
        r["bf16_flops_vs_fp32_peak"] = r["bf16_flops_per_s"] / peak
        r["bf16_flops_vs_peak"] = r["bf16_flops_per_s"] / r["bf16_matmul_peak_flops_per_s"]
        r["bf16_gemm_ceiling_vs_peak"] = r["bf16_gemm_ceiling_flops_per_s"] / r["bf16_matmul_peak_flops_per_s"]
    if r.get("compiled_flops_per_s") and peak:
        r["compiled_flops_vs_peak"] = r["compiled_flops_per_s"] / peak
        r["compiled_vs_reference"] = r["compiled_reference_crops_per_s"] / r["reference_crops_per_s"]
    if r.get("bf16_compiled_flops_per_s"):
        r["bf16_compiled_vs_reference"] = r["bf16_compiled_reference_crops_per_s"] / r["reference_crops_per_s"]
        r["bf16_compiled_flops_vs_peak"] = r["bf16_compiled_flops_per_s"] / r["bf16_matmul_peak_flops_per_s"]


def _is_positive_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


# ---------------------------------------------------------------------------------------- report
TABLE = [
    ("MFCC extraction, warm (1 process)", "mfcc_utts_per_s", "utt/s", 1.0),
    ("  x real time", "mfcc_x_realtime", "x", 1.0),
    ("MFCC extraction, worker pool", "mfcc_parallel_utts_per_s", "utt/s", 1.0),
    ("  x real time", "mfcc_parallel_x_realtime", "x", 1.0),
    ("MFCC first call, fresh process", "mfcc_cold_seconds", "s", 1.0),
    ("  second call", "mfcc_cold_warm_call_seconds", "s", 1.0),
    ("  with an empty numba cache", "mfcc_cold_nocache_seconds", "s", 1.0),
    ("Training, real input path", "train_crops_per_s", "crops/s", 1.0),
    ("Training, in-memory reference", "reference_crops_per_s", "crops/s", 1.0),
    ("  train / reference", "train_vs_reference", "", 1.0),
    ("  same, median of per-run ratios", "train_vs_reference_paired", "", 1.0),
    ("  input path alone, per batch", "input_seconds_per_step", "ms", 1e3),
    ("FLOPs per training step (analytic)", "step_flops", "GFLOP", 1e-9),
    ("  FlopCounterMode", "step_flops_counted", "GFLOP", 1e-9),
    ("Achieved (training)", "step_flops_per_s", "GFLOP/s", 1e-9),
    ("Matmul peak", "matmul_peak_flops_per_s", "GFLOP/s", 1e-9),
    ("  training / peak", "flops_vs_peak", "", 1.0),
    ("The step's GEMMs alone (plain matmuls)", "gemm_ceiling_flops_per_s", "GFLOP/s", 1e-9),
    ("  GEMMs / peak (the step's ceiling)", "gemm_ceiling_vs_peak", "", 1.0),
    ("  reference / GEMMs", "reference_vs_gemm_ceiling", "", 1.0),
    ("  reference step outside its GEMMs", "nongemm_seconds_per_step", "ms", 1e3),
    ("Memory bandwidth (copy, read + write)", "memory_bandwidth_bytes_per_s", "GB/s", 1e-9),
    ("  BatchNorm/ReLU floor per step", "elementwise_floor_seconds", "ms", 1e3),
    ("  bound: GEMMs + floor, / peak", "step_bound_vs_peak", "", 1.0),
    ("ReLU + BatchNorm, PyTorch's kernels", "stock_elementwise_seconds", "ms", 1e3),
    ("  bound: GEMMs + those, / peak", "stock_bound_vs_peak", "", 1.0),
    ("Reference, glibc malloc default", "allocator_default_crops_per_s", "crops/s", 1.0),
    ("Reference, keep_freed_memory", "allocator_keep_crops_per_s", "crops/s", 1.0),
    ("  speed-up (median of pairs)", "allocator_speedup", "x", 1.0),
    ("  page faults per step, default", "allocator_default_faults_per_step", "", 1.0),
    ("  page faults per step, kept", "allocator_keep_faults_per_step", "", 1.0),
    ("  peak RSS, default", "allocator_default_peak_rss_mb", "MiB", 1.0),
    ("  peak RSS, kept", "allocator_keep_peak_rss_mb", "MiB", 1.0),
    ("Reference, bf16 autocast (train.amp)", "bf16_reference_crops_per_s", "crops/s", 1.0),
    ("  fp32 reference, interleaved", "bf16_fp32_reference_crops_per_s", "crops/s", 1.0),
    ("  speed-up (median of pairs)", "bf16_speedup", "x", 1.0),
    ("  achieved", "bf16_flops_per_s", "GFLOP/s", 1e-9),
    ("  bf16 matmul peak", "bf16_matmul_peak_flops_per_s", "GFLOP/s", 1e-9),
    ("  achieved / bf16 peak", "bf16_flops_vs_peak", "", 1.0),
    ("  achieved / fp32 peak", "bf16_flops_vs_fp32_peak", "", 1.0),
    ("  the step's GEMMs in bf16 / bf16 peak", "bf16_gemm_ceiling_vs_peak", "", 1.0),
    ("Reference, torch.compile (--compile)", "compiled_reference_crops_per_s", "crops/s", 1.0),
    ("  achieved", "compiled_flops_per_s", "GFLOP/s", 1e-9),
    ("  compiled / peak", "compiled_flops_vs_peak", "", 1.0),
    ("  compiled / eager reference", "compiled_vs_reference", "", 1.0),
    ("  compile time (first step)", "compile_seconds", "s", 1.0),
    ("Reference, bf16 + torch.compile", "bf16_compiled_reference_crops_per_s", "crops/s", 1.0),
    ("  / fp32 eager reference", "bf16_compiled_vs_reference", "x", 1.0),
    ("  achieved / bf16 peak", "bf16_compiled_flops_vs_peak", "", 1.0),
    ("Embedding (as EER.py embeds)", "embed_utts_per_s", "utt/s", 1.0),
    ("Embedding, one fixed batch", "embed_fixed_batch_utts_per_s", "utt/s", 1.0),
    ("Cosine scoring", "score_trials_per_s", "trials/s", 1.0),
    ("First epoch, cold (train.py)", "first_epoch_seconds", "s", 1.0),
    ("  start-up (imports)", "first_epoch_startup_seconds", "s", 1.0),
    ("  features", "first_epoch_features_seconds", "s", 1.0),
    ("  epoch", "first_epoch_train_seconds", "s", 1.0),
    ("Peak RSS (benchmark process)", "peak_rss_mb", "MiB", 1.0),
    ("Peak RSS (train.py, first epoch)", "first_epoch_peak_rss_mb", "MiB", 1.0),
]


def _fmt(v) -> str:
    if v is None:
        return "-"
    av = abs(v)
    if av >= 1e5:
        return f"{v:,.0f}"
    if av >= 100:
        return f"{v:.0f}"
    if av >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def format_table(r: dict) -> str:
    stats = r.get("stats", {})
    head = f"{'measurement':38s} {'median':>12s} {'min':>10s} {'max':>10s} {'n':>3s}  unit"
    lines = [head, "-" * len(head)]
    for label, key, unit, scale in TABLE:
        v = r.get(key)
        st = stats.get(key, {})
        lo, hi = st.get("min"), st.get("max")
        lines.append(f"{label:38s} {_fmt(v * scale if v is not None else None):>12s} "
                     f"{_fmt(lo * scale if lo is not None else None):>10s} "
                     f"{_fmt(hi * scale if hi is not None else None):>10s} {st.get('n', ''):>3}  {unit}")
    lines.append("")
    lines.append(f"{r.get('model')} | batch {r.get('batch_size')} x {r.get('crop_frames')} frames | "
                 f"device {r.get('device')} ({r.get('device_name')}) | {r.get('threads')} threads | "
                 f"torch {r.get('torch_version')} | load {r.get('loadavg_start')} -> {r.get('loadavg_end')}")
    lines.append(f"timed step: {r.get('train_step_source')}")
    lines.append(models.format_models(r))  # the per-model table (bench.models), when measured
    if r.get("errors"):
        lines.append("ERRORS: " + "; ".join(f"{k}: {v}" for k, v in r["errors"].items()))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Benchmark features, training throughput, FLOPs, embedding, scoring, "
                                             "memory and start-up time on a generated corpus.")
    ap.add_argument("--json", default=None, help="write the results to this JSON file")
    ap.add_argument("--quick", action="store_true", help="fast smoke mode (small sizes, 2 runs)")
    ap.add_argument("--runs", type=int, default=None, help="repetitions of every measurement (default 5; quick 2)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads, also OMP_NUM_THREADS of subprocesses (default: torch's default)")
    ap.add_argument("--gpu", action="store_true", help="training, matmul peak and embedding on CUDA with autocast")
    ap.add_argument("--skip_first_epoch", action="store_true", help="leave out the train.py cold-start runs")
    ap.add_argument("--compile", action="store_true",
                    help="also time the reference loop with torch.compile (needs a C++ compiler on the CPU)")
    ap.add_argument("--models", default="all", help="networks of the per-model section (tools/bench/models.py), "
                    "comma-separated: xvector,ecapa,resnet34,campplus; all (default) or none")
    ap.add_argument("--models_only", action="store_true", help="run only the per-model section")
    ap.add_argument("--keep", default=None, help="keep the generated corpus and runs in this folder (default: temp)")
    ap.add_argument("--memory", default=None, metavar="SCALES",
                    help="only train.py's memory and crops/s on demo corpora of these sizes, e.g. 1,4,16 "
                         "(tools/bench/memory.py; docs/large_corpora.md)")
    return ap


# What every earlier --json of this command holds: the only existing file --json may replace.
JSON_KEYS = ("torch_version", "loadavg_start", "timestamp", "device")


def check_json_out(path: Path) -> None:
    """--json may replace only an earlier benchmark result (``svlab.files.refuse_overwrite``)."""
    refuse_overwrite(path, flag="--json", command="tools/benchmark.py", ours=lambda p: json_with_keys(p, JSON_KEYS),
                     recognised_by=f"a JSON object with {', '.join(JSON_KEYS)}")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.json:
        try:
            check_json_out(Path(args.json))        # before minutes of measurements
        except LabError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    if args.runs is not None and args.runs < 1:
        print("error: --runs must be at least 1", file=sys.stderr)
        return 2
    if args.gpu and not torch.cuda.is_available():
        print("error: --gpu given but CUDA is not available (torch " + torch.__version__ + ")", file=sys.stderr)
        return 2
    if args.threads is not None:
        if args.threads < 1:
            print("error: --threads must be at least 1", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    if args.keep:
        workdir = Path(args.keep).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        cleanup = None
    else:
        cleanup = tempfile.TemporaryDirectory(prefix="speaker_bench_")
        workdir = Path(cleanup.name)
    try:
        result = memory.run_mode(args, workdir) if args.memory else Bench(args, workdir).run()
        if not args.memory:
            print(models.format_models(result) if args.models_only else format_table(result))
        if args.json:
            out = Path(args.json)
            text = json.dumps(result, indent=1, allow_nan=False, default=str) + "\n"
            check_json_out(out)
            atomic_write(out, lambda tmp: tmp.write_text(text, encoding="utf-8"))
            print(f"results written to {out}")
    except LabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if cleanup is not None:
            cleanup.cleanup()
    return 1 if result.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
