"""Cost per epoch of online augmentation against offline copies and none (issue 20.4).

    python tools/bench/online_augment.py --json /tmp/online_augment.json          # 200 speakers x 5, 2 epochs
    python tools/bench/online_augment.py --speakers 40 --utts 5 --workers 0,2     # smaller, faster

On a generated demo corpus, for each augmentation mode (none, offline ``--copies`` copies, online) and each
``train.num_workers`` of ``--workers``: the setup of the training set (clean features, offline copies:
``SpkTrainDataset``, first time; the feature cache is shared, so ``none`` pays for the clean features), the
data path alone (one epoch of the DataLoader, no model) and ``python train.py`` itself (the mean seconds of
its epochs after the first, from ``train_log.csv``). All runs are made in one invocation, so their ratios
hold on a machine shared with other work; the absolute seconds do not. Results: docs/large_corpora.md.
"""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOOLS = Path(__file__).resolve().parents[1]
for _p in (TOOLS.parent, TOOLS):  # the lab's files and svlab; bench.*
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from bench.system import PROJECT, SUBPROCESS_TIMEOUT_S, cpu_model, loadavg, quiet, subprocess_env  # noqa: E402
from dataset import SpkTrainDataset  # noqa: E402
from svlab import config, demo_corpus  # noqa: E402
from svlab.files import atomic_write  # noqa: E402

MODES = {"none": {}, "offline": {"augment.mode": "offline"}, "online": {"augment.mode": "online"}}
# the same chain for both: noise, reverberation, gain; speed off (it changes the voice)
CHAIN = {"augment.noise_prob": 0.7, "augment.reverb_prob": 0.5, "augment.gain_prob": 0.5, "augment.speed_prob": 0.0}


def overrides(base: Path, mode: str, copies: int) -> dict:
    files = base / "files"
    out = {"data.root": str(base / "corpus"), "data.train_manifest": str(files / "split_train_set.txt"),
           "test.root": str(base / "corpus"), "test.test_manifest": str(files / "test_set.txt"),
           "test.trials": str(files / "trials.txt"), "features.cache_dir": str(base / "cache"),
           "train.save_dir": str(base / "runs"), "validation.mode": "off", **MODES[mode]}
    if mode != "none":
        out.update(CHAIN)
    if mode == "offline":
        out["augment.copies"] = copies
    return out


def data_epoch(ds: SpkTrainDataset, workers: int, batch: int) -> float:
    """Seconds of one epoch of the DataLoader alone (every crop made, no model)."""
    ds.set_epoch(1)
    loader = DataLoader(ds, batch_size=batch, collate_fn=ds.collate_fn, num_workers=workers, shuffle=True,
                        generator=torch.Generator().manual_seed(1))
    t0 = time.perf_counter()
    for _ in loader:
        pass
    return time.perf_counter() - t0


def train_epochs(over: dict, workers: int, epochs: int, folder: str) -> float:
    """Mean seconds of train.py's epochs after the first (``train_log.csv``), ``train.num_workers`` = ``workers``."""
    cmd = [sys.executable, str(PROJECT / "train.py"), "--n_folder", folder, "--epochs", str(epochs)]
    for k, v in {**over, "train.num_workers": workers}.items():
        cmd += ["--set", f"{k}={v}"]
    out = subprocess.run(cmd, cwd=PROJECT, env=subprocess_env(1), capture_output=True, text=True,
                         timeout=SUBPROCESS_TIMEOUT_S)
    if out.returncode != 0:
        raise RuntimeError(f"train.py failed ({out.returncode}): {out.stderr[-800:]}")
    with open(Path(over["train.save_dir"]) / folder / "train_log.csv", newline="") as f:
        seconds = [float(r["seconds"]) for r in csv.DictReader(f)]
    return sum(seconds[1:]) / max(1, len(seconds) - 1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Epoch cost of online augmentation vs offline copies vs none, "
                                             "for several DataLoader worker counts (docs/large_corpora.md)")
    ap.add_argument("--speakers", type=int, default=200, help="training speakers of the demo corpus (default 200)")
    ap.add_argument("--utts", type=int, default=5, help="utterances per speaker (default 5: 1,000 utterances)")
    ap.add_argument("--copies", type=int, default=2, help="offline copies per utterance (default 2)")
    ap.add_argument("--workers", default="0,1,2", help="train.num_workers values, comma-separated (default 0,1,2)")
    ap.add_argument("--epochs", type=int, default=2, help="train.py epochs per run; the first is not counted")
    ap.add_argument("--no_train", action="store_true", help="time the data path only (no train.py runs)")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    workers = [int(w) for w in args.workers.split(",")]
    torch.set_num_threads(1)
    rows, result = [], {"cpu": cpu_model(), "load_before": loadavg(), "args": vars(args)}
    with tempfile.TemporaryDirectory(prefix="online_augment_bench_") as tmp:
        base = Path(tmp)
        params = dict(n_train_speakers=args.speakers, utts_per_speaker=args.utts, n_test_speakers=2,
                      test_utts_per_speaker=2)
        demo_corpus.generate(base / "corpus", params=params, files_dir=base / "files", log=quiet)
        batch = config.load_config()["train"]["batchsize"]
        for mode in MODES:
            over = overrides(base, mode, args.copies)
            t0 = time.perf_counter()
            ds = SpkTrainDataset(config.load_config(None, over), log=quiet)
            setup = time.perf_counter() - t0
            for w in workers:
                row = {"mode": mode, "workers": w, "setup_s": round(setup, 2),
                       "data_epoch_s": round(data_epoch(ds, w, batch), 2)}
                if not args.no_train:
                    row["train_epoch_s"] = round(train_epochs(over, w, args.epochs, f"{mode}_{w}"), 2)
                rows.append(row)
                print(json.dumps(row), flush=True)
    result.update(rows=rows, load_after=loadavg())
    ref = {r["workers"]: r for r in rows if r["mode"] == "none"}
    print("\n| augmentation | workers | setup (s) | data path / epoch (s) | x none | train.py epoch (s) | x none |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        base_row = ref[r["workers"]]
        train = (f"{r['train_epoch_s']:.1f} | {r['train_epoch_s'] / base_row['train_epoch_s']:.2f}"
                 if "train_epoch_s" in r else "- | -")
        print(f"| {r['mode']} | {r['workers']} | {r['setup_s']:.1f} | {r['data_epoch_s']:.2f} | "
              f"{r['data_epoch_s'] / max(base_row['data_epoch_s'], 1e-9):.1f} | {train} |")
    if args.json:
        atomic_write(Path(args.json), lambda p: p.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
