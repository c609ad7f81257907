"""Memory against corpus size (``python tools/benchmark.py --memory``): ``train.py`` on demo corpora of
1x, 4x and 16x the demo's training utterances, each trained for one epoch twice (the first run extracts
the features, the second reads them from the cache or store), with the on-disk store
(``features.store: true``) and, for comparison, the in-memory path (``features.store: false``); then
``EER.py`` the same way on test lists of 1x, 4x and 16x the demo's test utterances (``measure_eer_memory``).

The larger corpora repeat the 1x corpus's audio under new speaker names (``x<k>/`` folders of hard
links, or copies where links are impossible): the same utterance lengths, the same extraction work per
utterance, no hours of synthesis. Per run it records the peak RSS of the ``train.py`` process
(``VmHWM`` from ``/proc``, polled while it runs), the largest peak among it and every process it
started (``getrusage(RUSAGE_CHILDREN)`` in a wrapper process: the extraction workers), the seconds to
features ready and of the epoch, and training crops per second (the epoch's items / its seconds).
Validation is off so that an epoch is training alone; the network is a narrow x-vector (``MODEL``).
Then, in this process and interleaved (A-B-A-B, so that a busy machine slows both alike), the crops per
second of the input path alone (``SpkTrainDataset`` + ``DataLoader``, no model) from each scale's store
against the 1x in-memory path: the part of a training step the store changes.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.system import PROJECT, SUBPROCESS_TIMEOUT_S, subprocess_env, vm_hwm_mb

# Runs train.py (argv) as its child and prints the largest peak RSS among its descendants (KiB on Linux).
WRAPPER = ("import resource, subprocess, sys\n"
           "rc = subprocess.call(sys.argv[1:])\n"
           "print('CHILDREN_MAXRSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, flush=True)\n"
           "sys.exit(rc)\n")


def scaled_corpus(root: Path, manifest: Path, out: Path, factor: int, name: str = "train") -> Path:
    """A manifest of ``factor`` times the utterances of ``manifest``: copy ``k`` of every
    file as ``x<k>/<relpath>`` under ``out`` (a hard link), spoken by speaker ``<speaker>x<k>``. Returns
    the manifest's path (``out/<name>_<factor>x.txt``); ``out`` is then the corpus root."""
    lines = [ln.split(maxsplit=1) for ln in manifest.read_text(encoding="utf-8").splitlines() if ln.strip()]
    rows = []
    for k in range(factor):
        for spk, rel in lines:
            dst = out / f"x{k}" / rel
            if not dst.exists():
                dst.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(root / rel, dst)
                except OSError:
                    shutil.copyfile(root / rel, dst)
            rows.append(f"{spk}x{k} x{k}/{rel}")
    path = out / f"{name}_{factor}x.txt"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def scaled_trials(trials: Path, out: Path, factor: int, same_count: bool = True) -> Path:
    """The trial list of ``scaled_corpus(..., factor, "test")``: with ``same_count`` the 1x list's pairs, each
    between the copies ``x<k>/`` of its two files, ``k`` = the sum of the files' numbers (order of first use)
    modulo ``factor``: as many trials as at 1x, and every copy's utterances used (a file meets files of every
    number), so the memory that grows is the test list's alone; else every pair in every copy (``factor`` times
    the trials). Returns ``out/trials_<factor>x[_all].txt``."""
    lines = [ln.split() for ln in trials.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if same_count:
        number: dict[str, int] = {}
        for a, b, _ in lines:
            number.setdefault(a, len(number))
            number.setdefault(b, len(number))
        rows = [f"x{k}/{a} x{k}/{b} {label}" for a, b, label in lines
                for k in [(number[a] + number[b]) % factor]]
    else:
        rows = [f"x{k}/{a} x{k}/{b} {label}" for k in range(factor) for a, b, label in lines]
    path = out / f"trials_{factor}x{'' if same_count else '_all'}.txt"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def run_tracked(script: str, args: list, threads: int) -> tuple[str, float, float, float | None]:
    """Run ``script`` (a file of the project) with ``args`` under ``WRAPPER``: ``(its output, wall seconds,
    its peak RSS in MiB (VmHWM, polled at each line it prints: the high-water mark only grows), the largest
    peak RSS among it and the processes it started, MiB)``. A failure raises with the output's end."""
    cmd = [sys.executable, "-c", WRAPPER, sys.executable, "-u", str(PROJECT / script), *map(str, args)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=PROJECT, env=subprocess_env(threads), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    out: list[str] = []
    peak = 0.0
    pid = None  # the script's process, the wrapper's child
    try:
        for line in proc.stdout:
            out.append(line)
            if pid is None:
                pid = _child_of(proc.pid)
            hwm = vm_hwm_mb(pid) if pid else None
            peak = max(peak, hwm or 0.0)
        rc = proc.wait(timeout=SUBPROCESS_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = "".join(out)
    if rc != 0:
        raise RuntimeError(f"{script} exited with {rc}: {text[-1500:]}")
    children_kb = _number(r"CHILDREN_MAXRSS_KB (\d+)", text)
    return text, time.perf_counter() - t0, peak, children_kb / 1024.0 if children_kb else None


def _number(pattern: str, text: str) -> float | None:
    m = re.search(pattern, text)
    return float(m.group(1)) if m else None


def run_train(root: Path, manifest: Path, cache_dir: Path, save_dir: Path, store: bool, threads: int,
              extra: tuple = (), n_folder: str | None = None) -> dict:
    """One ``train.py --epochs 1``; its peak memory, timings and crops per second."""
    args = ["--epochs", "1", "--n_folder", n_folder or f"m{time.monotonic_ns()}", "--gpu", "-1"]
    sets = {"data.root": root, "data.train_manifest": manifest, "test.root": root, "features.cache_dir": cache_dir,
            "train.save_dir": save_dir, "features.store": str(store).lower(), "validation.mode": "off"}
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    text, wall, peak, child = run_tracked("train.py", args + list(extra), threads)
    n = _number(r"training data: (\d+) utterances", text)
    epoch_s = _number(r"Train Stage: 1/1 .*\(lr [^,]+, ([0-9.]+)s\)", text)
    return {"utterances": int(n) if n else None, "wall_s": round(wall, 1),
            "features_s": _number(r"features ready in ([0-9.]+)s", text), "epoch_s": epoch_s,
            "crops_per_s": round(n / epoch_s, 1) if n and epoch_s else None,
            "train_peak_rss_mb": round(peak, 1) if peak else None,
            "max_child_rss_mb": round(child, 1) if child else None,
            "loss": _number(r"Loss ([0-9.]+)", text)}


def run_eer(checkpoint: Path, root: Path, manifest: Path, trials: Path, cache_dir: Path, out: Path, store: bool,
            threads: int, batch_size: int | None = None) -> dict:
    """One ``EER.py`` of ``checkpoint`` on the test list ``manifest`` / ``trials`` under ``root``; its peak memory,
    the utterances embedded, the trials, the seconds of embedding (feature extraction or the store's check
    included) and scoring, and the EER."""
    args = ["--checkpoint", checkpoint, "--out", out, "--gpu", "-1"]
    sets = {"test.root": root, "test.test_manifest": manifest, "test.trials": trials, "features.cache_dir": cache_dir,
            "features.store": str(store).lower(), **({"test.batch_size": batch_size} if batch_size else {})}
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    text, wall, peak, child = run_tracked("EER.py", args, threads)
    m = json.loads((Path(out) / "metrics.json").read_text(encoding="utf-8"))
    return {"utterances": m.get("n_utterances"), "trials": (m.get("n_target") or 0) + (m.get("n_nontarget") or 0),
            "wall_s": round(wall, 1), "embed_s": m.get("embed_seconds"), "score_s": m.get("score_seconds"),
            "eer_peak_rss_mb": round(peak, 1) if peak else None,
            "max_child_rss_mb": round(child, 1) if child else None, "eer": m.get("eer")}


def _child_of(pid: int) -> int | None:
    """The (first) child process of ``pid``: train.py under the wrapper."""
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        return int(kids[0]) if kids else None
    except (OSError, ValueError):
        return None


def disk_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


# A narrow x-vector on 1-s crops: the lab's (512 channels, 2-s crops) trains too slowly on a loaded 2-core
# machine for an epoch of the 16x corpus; the data path (what the store changes) is the same, and weighs more.
MODEL = ("--set", "model.channels=64", "--set", "model.stat_channels=192", "--set", "model.embedding_size=64",
         "--set", "train.crop_frames=100")
INPUT_CROPS = 4096  # crops drawn through the input path per timing


def input_crops_per_s(cfg: dict, reps: int = 1) -> list[float]:
    """Crops per second through ``SpkTrainDataset`` + ``DataLoader`` as train.py builds them (shuffled,
    ``collate_fn``, no model): what reading crops from RAM or from the store costs."""
    import torch
    from torch.utils.data import DataLoader

    from bench.system import quiet
    from dataset import SpkTrainDataset
    ds = SpkTrainDataset(cfg, log=quiet)
    out = []
    for rep in range(reps):
        ds.set_epoch(rep + 1)
        loader = DataLoader(ds, batch_size=cfg["train"]["batchsize"], shuffle=True, collate_fn=ds.collate_fn,
                            generator=torch.Generator().manual_seed(rep))
        n, t0 = 0, time.perf_counter()
        while n < INPUT_CROPS:
            for _, y in loader:
                n += len(y)
                if n >= INPUT_CROPS:
                    break
        out.append(n / (time.perf_counter() - t0))
    return out


def train_crops_per_s(cfgs: list[dict], reps: int = 3, steps: int = 20) -> list[list[float]]:
    """Crops per second of train.py's loop body (``bench.training``) fed through the input path of each
    config's ``SpkTrainDataset``, one network for all (sized for the most speakers), the configs
    timed in turn ``reps`` times (A-B-A-B): what the store costs a training step."""
    import torch

    from bench.system import quiet
    from bench.training import amp_dtype, build_training, rates, real_batches
    from dataset import SpkTrainDataset
    device = torch.device("cpu")
    sets = [SpkTrainDataset(c, log=quiet) for c in cfgs]
    t = build_training(cfgs[0], max(len(d.speakers) for d in sets), steps, device)
    t.train()
    feeds = [real_batches(d, c, device) for d, c in zip(sets, cfgs)]
    dtype = amp_dtype(cfgs[0], device)
    rates(t, feeds[0], 1, 3, dtype, device)  # warm-up
    out: list[list[float]] = [[] for _ in cfgs]
    for _ in range(reps):
        for k, feed in enumerate(feeds):
            out[k] += rates(t, feed, 1, steps, dtype, device)
    return out


def cache_folder(workdir: Path, prefix: str, factor: int, store: bool) -> Path:
    """The feature cache / store folder of one scale's runs: ``<prefix>cache_<factor>x_store`` (or ``_ram``)."""
    return workdir / f"{prefix}cache_{factor}x_{'store' if store else 'ram'}"


def first_and_cached(runs: dict, factor: int, in_memory: bool, cache, label: str, run_one, log=print) -> None:
    """One scale's runs into ``runs``: with the store and (``in_memory``) without, a first run (extracting into
    ``cache(factor, store)``) and a cached run (reading it), ``run_one(store, name)`` returning each one's
    figures, named ``<factor>x_<store|ram>_<first|cached>``; the first store run also gets the store's bytes."""
    for store in (True, False) if in_memory else (True,):
        for run in ("first", "cached"):
            name = f"{factor}x_{'store' if store else 'ram'}_{run}"
            log(f"[memory] {label}{name} ...")
            r = run_one(store, name)
            if store and run == "first":
                r["store_bytes"] = disk_bytes(cache(factor, store))
            runs[name] = r
            log(f"[memory] {label}{name}: {json.dumps(r)}")


def drop_caches(cache, factor: int) -> None:
    """A larger scale's caches, once measured (the 1x ones stay: later scales compare with them)."""
    if factor != 1:
        for store in (True, False):
            shutil.rmtree(cache(factor, store), ignore_errors=True)


def rss_ratios(runs: dict, scales, field: str, prefix: str, kinds=("first", "cached")) -> dict:
    """``<prefix><factor>x_vs_1x_<kind>``: the store runs' peak RSS ``field`` at each scale over 1x's."""
    out = {}
    for factor in scales:
        for kind in kinds:
            a, b = runs.get(f"1x_store_{kind}", {}), runs.get(f"{factor}x_store_{kind}", {})
            if a.get(field) and b.get(field):
                out[f"{prefix}{factor}x_vs_1x_{kind}"] = round(b[field] / a[field], 3)
    return out


def measure_memory(root: Path, manifest: Path, workdir: Path, scales=(1, 4, 16), in_memory_scales=(1, 4),
                   threads: int = 1, log=print) -> dict:
    """Every scale with the store (first and cached run) and ``in_memory_scales`` without; the input path's
    crops/s from each scale's store against the 1x in-memory path (interleaved in this process); the
    ratios the issue's targets name; the store's disk use per hour of audio."""
    import soundfile as sf

    from svlab.config import load_config, parse_override
    result: dict = {"scales": list(scales), "model": " ".join(MODEL[1::2]), "runs": {}, "input_crops_per_s": {},
                    "step_crops_per_s": {}}
    lines = [ln.split(maxsplit=1) for ln in manifest.read_text(encoding="utf-8").splitlines() if ln.strip()]
    hours = sum(sf.info(str(root / rel)).duration for _, rel in lines) / 3600.0
    result["audio_hours_1x"] = round(hours, 3)
    corpus = workdir / "corpus"

    def cache(factor, store):
        return cache_folder(workdir, "", factor, store)
    for factor in scales:
        m = scaled_corpus(root, manifest, corpus, factor)
        first_and_cached(result["runs"], factor, factor in in_memory_scales, cache, "",
                         lambda store, name: run_train(corpus, m, cache(factor, store), workdir / "runs", store,
                                                       threads, MODEL), log)
        if cache(1, False).is_dir():  # the input path, the 1x in-memory one and this scale's store, A-B-A-B
            sets = {"data.root": str(corpus), "train.save_dir": str(workdir / "runs"), "validation.mode": "off",
                    **dict(parse_override(kv) for kv in MODEL[1::2])}
            ram = load_config(None, {**sets, "data.train_manifest": str(corpus / "train_1x.txt"),
                                     "features.cache_dir": str(cache(1, False)), "features.store": False})
            disk = load_config(None, {**sets, "data.train_manifest": str(m),
                                      "features.cache_dir": str(cache(factor, True)), "features.store": True})
            a, b = [], []
            for _ in range(2):
                a += input_crops_per_s(ram)
                b += input_crops_per_s(disk)
            result["input_crops_per_s"][f"{factor}x_store"] = round(statistics.median(b), 1)
            result["input_crops_per_s"][f"1x_ram_vs_{factor}x"] = round(statistics.median(a), 1)
            log(f"[memory] input path {factor}x store {b} vs 1x in memory {a} crops/s")
            a, b = train_crops_per_s([ram, disk])
            result["step_crops_per_s"][f"{factor}x_store"] = round(statistics.median(b), 1)
            result["step_crops_per_s"][f"1x_ram_vs_{factor}x"] = round(statistics.median(a), 1)
            log(f"[memory] training steps {factor}x store {b} vs 1x in memory {a} crops/s")
        drop_caches(cache, factor)
        shutil.rmtree(workdir / "runs", ignore_errors=True)
    runs, inp = result["runs"], result["input_crops_per_s"]
    first = runs.get("1x_store_first", {})
    if first.get("store_bytes"):
        result["store_mb_per_audio_hour"] = round(first["store_bytes"] / 2**20 / hours, 1)
    result.update(rss_ratios(runs, scales, "train_peak_rss_mb", "rss_"))
    for factor in scales:
        ram, b = runs.get("1x_ram_cached", {}), runs.get(f"{factor}x_store_cached", {})
        if ram.get("crops_per_s") and b.get("crops_per_s"):
            result[f"train_crops_{factor}x_store_vs_1x_ram"] = round(b["crops_per_s"] / ram["crops_per_s"], 3)
        for what, d in (("input", inp), ("step", result["step_crops_per_s"])):
            if d.get(f"{factor}x_store") and d.get(f"1x_ram_vs_{factor}x"):
                result[f"{what}_crops_{factor}x_store_vs_1x_ram"] = round(d[f"{factor}x_store"]
                                                                         / d[f"1x_ram_vs_{factor}x"], 3)
    return result


def measure_eer_memory(root: Path, train_manifest: Path, test_manifest: Path, trials: Path, workdir: Path,
                       scales=(1, 4, 16), in_memory_scales=(1, 4), threads: int = 1, log=print) -> dict:
    """``EER.py``'s side: a checkpoint of ``MODEL`` trained one epoch on the 1x training corpus, then ``EER.py`` on
    test lists of each scale (``scaled_corpus(..., "test")``, the 1x trial count: ``scaled_trials``), a first run
    (extracting into the test list's store) and a cached run (reading it), with the store and, at
    ``in_memory_scales``, in RAM; and the largest scale's cached run with every copy's trials (``factor`` x the
    trials), to show what trials cost. At 1x nearly every length has one utterance, at 16x sixteen, embedded
    together (up to ``test.batch_size``): the 1x and largest scale's cached runs once more with
    ``test.batch_size=1`` separate the batches' size from the test list's. Ratios: peak RSS at each scale over
    1x, with the store."""
    corpus = workdir / "corpus"
    result: dict = {"eer_scales": list(scales), "eer_runs": {}}
    m1 = scaled_corpus(root, train_manifest, corpus, 1)
    train_cache = workdir / "cache_1x_store"  # measure_memory's 1x store, when it ran: no second extraction
    log("[memory] EER.py: training the checkpoint (1 epoch, 1x corpus) ...")
    shutil.rmtree(workdir / "eer_model", ignore_errors=True)  # a kept workdir's earlier one (--keep)
    run_train(corpus, m1, train_cache, workdir / "eer_model", True, threads, MODEL, n_folder="eer")
    ckpt = workdir / "eer_model" / "eer" / "checkpoint_001.pth"
    runs = result["eer_runs"]

    def cache(factor, store):
        return cache_folder(workdir, "eer_", factor, store)
    for factor in scales:
        manifest = scaled_corpus(root, test_manifest, corpus, factor, "test")
        same = scaled_trials(trials, corpus, factor)
        first_and_cached(runs, factor, factor in in_memory_scales, cache, "EER.py ",
                         lambda store, name: run_eer(ckpt, corpus, manifest, same, cache(factor, store),
                                                     workdir / "eer_out" / name, store, threads), log)
        extra = {}
        if factor in (1, max(scales)):  # one utterance per batch, as at 1x
            extra[f"{factor}x_store_cached_batch1"] = (same, 1)
        if factor == max(scales) and factor > 1:  # every copy's trials: factor x as many
            every = scaled_trials(trials, corpus, factor, same_count=False)
            extra[f"{factor}x_store_cached_all_trials"] = (every, None)
        for name, (trial_list, batch_size) in extra.items():
            log(f"[memory] EER.py {name} ...")
            runs[name] = run_eer(ckpt, corpus, manifest, trial_list, cache(factor, True), workdir / "eer_out" / name,
                                 True, threads, batch_size)
            log(f"[memory] EER.py {name}: {json.dumps(runs[name])}")
        drop_caches(cache, factor)
        shutil.rmtree(workdir / "eer_out", ignore_errors=True)
    result.update(rss_ratios(runs, scales, "eer_peak_rss_mb", "eer_rss_", ("first", "cached", "cached_batch1")))
    return result


def format_memory(r: dict) -> str:
    rows = [f"{'run':<20} {'utts':>6} {'feat s':>7} {'epoch s':>8} {'crops/s':>8} {'train.py MB':>12} "
            f"{'max child MB':>13}"]
    for name, x in r.get("runs", {}).items():
        rows.append(f"{name:<20} {x.get('utterances') or '-':>6} {x.get('features_s') or '-':>7} "
                    f"{x.get('epoch_s') or '-':>8} {x.get('crops_per_s') or '-':>8} "
                    f"{x.get('train_peak_rss_mb') or '-':>12} {x.get('max_child_rss_mb') or '-':>13}")
    if r.get("eer_runs"):
        rows += ["", f"{'EER.py run':<30} {'utts':>6} {'trials':>8} {'embed s':>8} {'score s':>8} {'EER.py MB':>10} "
                     f"{'max child MB':>13}"]
        for name, x in r["eer_runs"].items():
            rows.append(f"{name:<30} {x.get('utterances') or '-':>6} {x.get('trials') or '-':>8} "
                        f"{x.get('embed_s') or '-':>8} {x.get('score_s') or '-':>8} "
                        f"{x.get('eer_peak_rss_mb') or '-':>10} {x.get('max_child_rss_mb') or '-':>13}")
    rows += [f"{k}: {v}" for k, v in r.items() if k not in ("runs", "scales", "errors", "eer_runs", "eer_scales")]
    return "\n".join(rows)


def run_mode(args, workdir: Path) -> dict:
    """``tools/benchmark.py --memory 1,4,16``: the demo corpus (generated into ``workdir/demo1x`` unless
    it is there already, e.g. with ``--keep``), then ``measure_memory``; the result for ``--json``."""
    import torch

    from bench.system import cpu_model, loadavg, quiet
    from svlab import demo_corpus
    scales = [int(x) for x in str(args.memory).split(",") if x.strip()]
    base = workdir / "demo1x"
    if not demo_corpus.is_complete(base):
        demo_corpus.generate(base, files_dir=base / "files", log=quiet)
    r = {"mode": "memory", "device": "cpu", "cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
         "threads": torch.get_num_threads(), "torch_version": torch.__version__, "loadavg_start": loadavg(),
         "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "errors": {}}
    files, small = base / "files", [s for s in scales if s <= 4]

    def log(m):
        print(m, file=sys.stderr, flush=True)
    try:
        r.update(measure_memory(base, files / "split_train_set.txt", workdir, scales, small, torch.get_num_threads(),
                                log=log))
    except Exception as e:  # the runs done so far are printed with the error
        r["errors"]["memory"] = f"{type(e).__name__}: {str(e)[-800:]}"
    try:  # EER.py on test lists of the same scales
        r.update(measure_eer_memory(base, files / "split_train_set.txt", files / "test_set.txt", files / "trials.txt",
                                    workdir, scales, small, torch.get_num_threads(), log=log))
    except Exception as e:
        r["errors"]["eer_memory"] = f"{type(e).__name__}: {str(e)[-800:]}"
    r["loadavg_end"] = loadavg()
    if "runs" in r or "eer_runs" in r:
        print(format_memory(r))
    return r
