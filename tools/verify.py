"""Verify a speaker: is ``b.wav`` the same speaker as ``a.wav``? Prints the score and ACCEPT / REJECT.

    python tools/verify.py a.wav b.wav                                 # checkpoint: test.model_path
    python tools/verify.py a.wav b.wav --checkpoint saved_model/000/checkpoint_030.pth
    python tools/verify.py a.wav b.wav --threshold 0.5                 # your own threshold (cosine score)
    python tools/verify.py --enroll x1.wav x2.wav x3.wav --test z.wav  # enrol with several recordings

The default threshold is the EER threshold of the last evaluation of the checkpoint (``EER.py``
records every evaluation in ``<checkpoint folder>/evaluations.json``); the decision uses the same
scoring system as that evaluation (cosine, PLDA, AS-norm, centering), so score and threshold always
match. ``--eval DIR`` picks another evaluation folder. If the checkpoint has a calibrated evaluation
(``EER.py --calibrate``), the calibrated log-likelihood ratio is printed as well, with the Bayes
decision it implies. Any sample rate, mono or stereo (averaged to mono, resampled). Several enrolment
recordings are combined by averaging their (length-normalised, for cosine) embeddings.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from pathlib import Path

if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")  # a few files: progress bars are noise (read when tqdm loads)


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project folder: svlab and the lab's files

import numpy as np  # noqa: E402
import torch  # noqa: E402

from svlab import metrics, scoring  # noqa: E402
from svlab.checkpoint import load_checkpoint  # noqa: E402
from svlab.config import config_path_value, load_config, parse_override, resolve_path  # noqa: E402
from svlab.embedding import checkpoint_features, cli_path, embed_files, select_device  # noqa: E402
from svlab.errors import LabError, VerifyError  # noqa: E402
from svlab.evaluation import EVAL_INDEX, evaluation_folder, evaluations_of, load_system  # noqa: E402
from svlab.models import model_from_checkpoint  # noqa: E402
from svlab.scoring_system import score_trials  # noqa: E402

P_TARGETS = (0.5, 0.01)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Same speaker or not? Score two recordings with a trained checkpoint.")
    ap.add_argument("files", nargs="*", help="two recordings: ENROLL TEST")
    ap.add_argument("--enroll", nargs="+", default=None, metavar="WAV", help="enrolment recording(s) (averaged)")
    ap.add_argument("--test", nargs="+", default=None, metavar="WAV", help="test recording(s)")
    ap.add_argument("--checkpoint", default=None, help="checkpoint file (default: test.model_path)")
    ap.add_argument("--threshold", type=float, default=None,
                    help="accept when score >= THRESHOLD (default: EER threshold of the last evaluation)")
    ap.add_argument("--eval", default=None, metavar="DIR",
                    help="evaluation folder (with metrics.json) whose system and threshold to use")
    ap.add_argument("--config", default=None, help="YAML config with the keys to change (default: config.yaml)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    ap.add_argument("--gpu", default=None, help="CUDA device index, or -1 for CPU")
    return ap


def _metrics(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def system_score(opts, fb, enroll_emb: np.ndarray, test_emb: np.ndarray) -> float:
    """Score of (enrolment set, test set) under a scoring system (see ``svlab.scoring_system.score_trials``)."""
    def combine(e: np.ndarray) -> np.ndarray:
        x = scoring.center(e, fb.mean if opts.center else None)
        return (scoring.length_normalize(x) if opts.backend == "cosine" else x).mean(axis=0)
    pair = np.stack([combine(enroll_emb), combine(test_emb)])
    no_center = dataclasses.replace(opts, center=False)  # already centred above
    return float(score_trials(fb, no_center, pair, np.array([0]), np.array([1]))[0])


def plain_cosine(enroll_emb: np.ndarray, test_emb: np.ndarray) -> float:
    e = scoring.length_normalize(enroll_emb).mean(axis=0)
    t = scoring.length_normalize(test_emb).mean(axis=0)
    return float(e @ t / (np.linalg.norm(e) * np.linalg.norm(t)))


def _rel(p: Path) -> str:
    try:
        return str(Path(p).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(p)


def verify(cfg: dict, checkpoint: Path, enroll: list[Path], test: list[Path], threshold: float | None = None,
           eval_dir: Path | None = None, device=None, out=print) -> dict:
    """Score enrolment vs test recordings and decide; returns a dict of everything printed."""
    device = device or torch.device("cpu")
    state = load_checkpoint(checkpoint)
    feat_cfg = checkpoint_features(cfg, state, log=lambda *a: None, cache=False)
    model = model_from_checkpoint(state, device)
    paths = [Path(p) for p in enroll] + [Path(p) for p in test]
    emb, _, _ = embed_files(model, paths, feat_cfg, cfg["test"]["batch_size"], device, policy="error",
                            log=lambda *a: None, desc="audio")
    e_emb, t_emb = emb[:len(enroll)], emb[len(enroll):]
    cosine = plain_cosine(e_emb, t_emb)

    if eval_dir is not None:
        candidates = [Path(eval_dir) / "metrics.json"]
        if not candidates[0].is_file():
            raise VerifyError(f"{candidates[0]} not found; --eval must be an EER.py output folder")
    else:
        candidates = evaluations_of(checkpoint)
    decision_metrics = candidates[-1] if candidates and (threshold is None or eval_dir is not None) else None
    if threshold is None and decision_metrics is None:
        raise VerifyError(
            f"no evaluation of {checkpoint} found (looked in {checkpoint.parent / EVAL_INDEX} and "
            f"{evaluation_folder(checkpoint)}); run "
            f"'python EER.py --checkpoint {checkpoint}' first to get its EER threshold, or pass --threshold T")
    result = {"checkpoint": str(checkpoint), "cosine": cosine, "enroll": [str(p) for p in enroll],
              "test": [str(p) for p in test]}
    out(f"checkpoint: {_rel(checkpoint)} ({state.get('tag', 'model')}, epoch {state['epoch']})")
    out(f"enrol: {', '.join(_rel(p) for p in enroll)}  |  test: {', '.join(_rel(p) for p in test)}")
    out(f"cosine score: {cosine:.5f}")

    if decision_metrics is not None:
        opts, fb, m = load_system(decision_metrics, checkpoint)
        score = cosine if opts.plain else system_score(opts, fb, e_emb, t_emb)
        if not opts.plain:
            out(f"{opts.label} score: {score:.5f}")
        if threshold is None:
            threshold = float(m["threshold"])
            which = "the last evaluation" if eval_dir is None else "the evaluation"
            source = (f"EER threshold of {which}, {_rel(decision_metrics)} (EER {m['eer'] * 100:.2f}% "
                      f"on {Path(m.get('trials', '?')).name}, {opts.label})")
        else:
            source = f"given with --threshold, applied to the {opts.label} score of {_rel(decision_metrics)}"
        result.update(system=opts.label, metrics=str(decision_metrics))
    else:
        score, source = cosine, "given with --threshold (cosine score)"
        result["system"] = "cosine"
    accept = score >= threshold
    result.update(score=score, threshold=threshold, accept=bool(accept))
    out(f"threshold: {threshold:.5f} ({source})")
    out(f"decision: {'ACCEPT (same speaker)' if accept else 'REJECT (different speakers)'}  "
        f"[score {score:.5f} {'>=' if accept else '<'} threshold {threshold:.5f}]")

    calibrated = [p for p in candidates if _metrics(p).get("calibrated")]
    if calibrated:
        opts_c, fb_c, m_c = load_system(calibrated[-1], checkpoint)
        raw = system_score(opts_c, fb_c, e_emb, t_emb)
        llr = float(fb_c.calibrator.transform(np.array([raw]))[0])
        ratio = math.exp(min(max(llr, -700.0), 700.0))
        out(f"calibrated LLR: {llr:+.3f} ({opts_c.label}, {_rel(calibrated[-1].parent)}): the recordings are "
            + (f"{ratio:.3g} times more likely if they are the same speaker" if llr >= 0 else
               f"{1 / ratio:.3g} times more likely if they are different speakers"))
        decisions = {}
        for p in P_TARGETS:
            bt = metrics.bayes_threshold(p)
            decisions[p] = llr >= bt
            out(f"  Bayes decision if a same-speaker trial has prior probability {p:g} (equal error costs): "
                f"accept when LLR >= {bt:.2f} -> {'ACCEPT' if llr >= bt else 'REJECT'}")
        result.update(llr=llr, bayes_decisions=decisions, calibrated_metrics=str(calibrated[-1]))
    return result


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        if args.enroll or args.test:
            if args.files or not (args.enroll and args.test):
                raise VerifyError("use either two files (tools/verify.py a.wav b.wav) or --enroll X.wav [...] "
                                  "--test Z.wav")
            enroll, test = args.enroll, args.test
        else:
            if len(args.files) != 2:
                raise VerifyError(f"expected two recordings (ENROLL TEST), got {len(args.files)}; "
                                  "or use --enroll ... --test ...")
            enroll, test = [args.files[0]], [args.files[1]]
        cfg = load_config(args.config, dict(parse_override(s) for s in args.set))
        checkpoint = cli_path(args.checkpoint) if args.checkpoint \
            else config_path_value(cfg, "test.model_path")
        verify(cfg, checkpoint, [resolve_path(p, base=Path.cwd()) for p in enroll],
               [resolve_path(p, base=Path.cwd()) for p in test], threshold=args.threshold,
               eval_dir=resolve_path(args.eval, base=Path.cwd()) if args.eval else None,
               device=select_device(args.gpu))
    except LabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
