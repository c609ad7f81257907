"""The exported networks: onnxruntime against PyTorch on the CPU, speed (utterances per second) and parity.

    python tools/onnx_bench.py                                   # speed: x-vector, ECAPA-TDNN, ResNet34; 1, 2 threads
    python tools/onnx_bench.py --models campplus --runs 5 --json speed.json
    python tools/onnx_bench.py --parity --models xvector,ecapa,resnet34,campplus   # every pooling, real speech

``--parity``: every network with every pooling at tiny widths (random weights), exported, then the
largest absolute difference of L2-normalised embeddings of real utterances (``--audio``; default: four
speechocean762 test utterances of different lengths from ../shared/data) between ``SpeakerEncoder``
on the ``.pth`` and on the ``.onnx``.

Each network is built at its published size (config.yaml's defaults; random weights: speed does not
depend on them), exported with ``svlab.onnx_export.export`` (checked against PyTorch), and both run
one utterance at a time (batch 1, as ``verify`` does) on features of each length. The front end
(librosa, the same for both) is not timed. PyTorch and onnxruntime are timed alternately, run after
run, so a machine loaded by other work slows both alike; the figure is the median of ``--runs`` runs.
Results: docs/api.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project folder: svlab and the lab's files

import numpy as np  # noqa: E402
import torch  # noqa: E402

from svlab import config  # noqa: E402
from svlab.checkpoint import save_checkpoint  # noqa: E402
from svlab.features import feature_dim, feature_signature  # noqa: E402
from svlab.guard import run_command, say  # noqa: E402
from svlab.models import build_model, describe  # noqa: E402

PUBLISHED = {  # the settings each network is published with (config.yaml's comments)
    "xvector": {"model.name": "xvector", "model.embedding_size": 512, "features.n_mfcc": 40},
    "ecapa": {"model.name": "ecapa", "model.pooling": "asp", "model.embedding_size": 192, "model.channels": 512},
    "resnet34": {"model.name": "resnet34", "model.pooling": "stats", "model.embedding_size": 256,
                 "features.type": "fbank", "features.n_fbank": 80},
    "campplus": {"model.name": "campplus", "model.pooling": "stats", "model.embedding_size": 512,
                 "features.type": "fbank", "features.n_fbank": 80},
}


TINY = {"xvector": {"model.channels": 32, "model.stat_channels": 48, "features.n_mfcc": 20},
        "ecapa": {"model.channels": 32, "features.n_mfcc": 20},
        "resnet34": {"model.base_channels": 4, "features.n_fbank": 24},
        "campplus": {"model.base_channels": 4, "features.n_fbank": 24}}


def checkpoint(name: str, folder: Path, extra: dict | None = None) -> tuple[Path, int]:
    cfg = config.load_config(None, {**PUBLISHED[name], **(extra or {})})
    torch.manual_seed(0)
    model = build_model(cfg["model"], feature_dim(cfg["features"]))
    path = folder / f"{name}_{cfg['model']['pooling']}.pth"
    save_checkpoint({"epoch": 0, "model_state": model.state_dict(), "config": config.public_config(cfg),
                     "speakers": ["a", "b"], "history": [], "tag": describe(cfg["model"], cfg["loss"]),
                     "features": feature_signature(cfg["features"])}, path)
    return path, feature_dim(cfg["features"])


def rate(fn, x, min_seconds: float) -> float:
    """Utterances per second of ``fn(x)`` over at least ``min_seconds``."""
    n, t0 = 0, time.perf_counter()
    while True:
        fn(x)
        n += 1
        dt = time.perf_counter() - t0
        if dt >= min_seconds:
            return n / dt


def measure(name: str, folder: Path, seconds: list[float], threads: list[int], runs: int, min_seconds: float) -> dict:
    import onnxruntime as ort
    from svlab.models import model_from_checkpoint
    from svlab.onnx_export import export
    pth, n = checkpoint(name, folder)
    t0 = time.perf_counter()
    result = export(pth, pth.with_suffix(".onnx"), log=lambda *a: None)
    out = {"export_s": time.perf_counter() - t0, "parity": result["parity"], "rows": []}
    model = model_from_checkpoint(torch.load(pth, weights_only=True))
    for t in threads:
        torch.set_num_threads(t)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = t, 1
        # no busy-waiting between runs: onnxruntime's spinning threads would take the cores from the
        # PyTorch run that follows (in one process, alternately), which then measures far too slow
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sess = ort.InferenceSession(str(pth.with_suffix(".onnx")), opts, providers=["CPUExecutionProvider"])
        for s in seconds:
            x = np.random.default_rng(0).standard_normal((1, n, int(s * 100) + 1)).astype(np.float32)
            xt = torch.from_numpy(x)

            def run_torch(v):
                with torch.no_grad():
                    model(v)
            run_torch(xt), sess.run(None, {"features": x})  # warm-up
            pt, ox = [], []
            for _ in range(runs):  # alternately, so both see the same load
                pt.append(rate(run_torch, xt, min_seconds))
                ox.append(rate(lambda v: sess.run(None, {"features": v}), x, min_seconds))
            row = {"threads": t, "seconds": s, "pytorch": statistics.median(pt), "onnxruntime": statistics.median(ox)}
            out["rows"].append(row)
            say(f"{name:9s} {t} thread(s) {s:4.1f} s: PyTorch {row['pytorch']:7.1f} utt/s, onnxruntime "
                f"{row['onnxruntime']:7.1f} utt/s (x{row['onnxruntime'] / row['pytorch']:.2f})")
    return out


def default_audio(n: int = 4) -> list[Path]:
    """``n`` speechocean762 test utterances, from the shortest to the longest of the first 60."""
    import soundfile as sf
    from svlab.config import PROJECT_ROOT
    from svlab.errors import DataError
    root = PROJECT_ROOT.parent / "shared" / "data" / "speechocean762"
    if not (root / "test.txt").is_file():
        raise DataError(f"{root}/test.txt not found; pass recordings with --audio")
    rows = [ln.split()[1] for ln in (root / "test.txt").read_text().splitlines()[:60] if ln.strip()]
    by_length = sorted((sf.info(root / r).frames, root / r) for r in rows)
    return [by_length[round(i * (len(by_length) - 1) / (n - 1))][1] for i in range(n)]


def parity_rows(names: list[str], audio: list[Path], folder: Path) -> list[dict]:
    """One row per network and pooling: real-speech parity, the export's own check, the export time."""
    from svlab.encoder import SpeakerEncoder, l2_normalize
    from svlab.onnx_export import export
    rows = []
    for name in names:
        for pooling in ("gap", "stats", "asp"):
            pth, _ = checkpoint(name, folder, {**TINY[name], "model.pooling": pooling, "model.embedding_size": 16})
            t0 = time.perf_counter()
            check = export(pth, pth.with_suffix(".onnx"), log=lambda *a: None)["parity"]
            seconds = time.perf_counter() - t0
            a = SpeakerEncoder.from_checkpoint(pth).embed(audio)
            b = SpeakerEncoder.from_checkpoint(pth.with_suffix(".onnx")).embed(audio)
            real = float(np.abs(l2_normalize(a) - l2_normalize(b)).max())
            rows.append({"model": name, "pooling": pooling, "real": real, "check": check, "export_s": seconds})
            say(f"| {name} | {pooling} | {real:.1e} | {check:.1e} | {seconds:.0f} s |")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="onnxruntime vs PyTorch speed of the exported networks (CPU).")
    ap.add_argument("--models", default="xvector,ecapa,resnet34", help="comma-separated: " + ", ".join(PUBLISHED))
    ap.add_argument("--seconds", default="2,4,8", help="utterance lengths in seconds")
    ap.add_argument("--threads", default="1,2", help="thread counts (both runtimes)")
    ap.add_argument("--runs", type=int, default=5, help="runs per measurement (median reported)")
    ap.add_argument("--min_seconds", type=float, default=0.5, help="each run lasts at least this long")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--parity", action="store_true", help="parity of every network and pooling instead of speed")
    ap.add_argument("--audio", nargs="+", default=None, help="--parity: recordings (default: speechocean762's)")
    args = ap.parse_args(argv)

    def work() -> None:
        results = {"load_average_start": os.getloadavg()}
        say(f"load average: {' '.join(f'{x:.1f}' for x in os.getloadavg())} ({os.cpu_count()} CPUs)")
        with tempfile.TemporaryDirectory() as tmp:
            if args.parity:
                torch.set_num_threads(1)
                audio = [Path(a) for a in args.audio] if args.audio else default_audio()
                results["parity"] = parity_rows(args.models.split(","), audio, Path(tmp))
            for name in [] if args.parity else args.models.split(","):
                results[name] = measure(name, Path(tmp), [float(s) for s in args.seconds.split(",")],
                                        [int(t) for t in args.threads.split(",")], args.runs, args.min_seconds)
                say(f"{name}: export {results[name]['export_s']:.0f} s, parity {results[name]['parity']:.1e}")
        results["load_average_end"] = os.getloadavg()
        say(f"load average: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
        if args.json:
            from svlab.files import atomic_write
            atomic_write(Path(args.json), lambda tmp: tmp.write_text(json.dumps(results, indent=1)))
    return run_command(work)


if __name__ == "__main__":
    sys.exit(main())
