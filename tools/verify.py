"""Verify a speaker: is ``b.wav`` the same speaker as ``a.wav``? Prints the score and ACCEPT / REJECT.

    python tools/verify.py a.wav b.wav                                 # checkpoint: test.model_path
    python tools/verify.py a.wav b.wav --checkpoint saved_model/000/checkpoint_030.pth
    python tools/verify.py a.wav b.wav --threshold 0.5                 # your own threshold (cosine score)
    python tools/verify.py --enroll x1.wav x2.wav x3.wav --test z.wav  # enrol with several recordings
    python tools/verify.py --enroll x.wav --test z1.wav z2.wav         # one decision per test recording
    python tools/verify.py a.wav b.wav --checkpoint model.onnx         # onnxruntime: torch never imported
    python tools/verify.py a.wav b.wav --pretrained                    # the model shipped in svlab/pretrained/

The default threshold is a stable, named one: the EER threshold of the evaluation of this checkpoint
on the run's own test trial list with the run's own scoring system (``EER.py`` records every
evaluation in ``<checkpoint folder>/evaluations.json``; ``svlab.evaluation.decision_evaluation``), not
of whichever evaluation ran last; the line ``threshold:`` says which. The decision uses the scoring
system of that evaluation (cosine, PLDA, AS-norm, centering), so score and threshold always match.
``--eval DIR`` picks another evaluation folder. If the checkpoint has a calibrated evaluation
(``EER.py --calibrate``), the calibrated log-likelihood ratio is printed as well, with the Bayes
decision it implies. Any sample rate, mono or stereo (averaged to mono, resampled). Several enrolment
recordings are combined by averaging their (length-normalised, for cosine) embeddings, and the output
says so; several test recordings each get their own score and decision (never averaged).

With an ``.onnx`` model (``tools/export.py``) or ``--pretrained``, ``svlab.encoder.SpeakerEncoder``
decides on the plain cosine score at the threshold stored in the model (the same search, made at
export time; the pretrained ``.pth``: its model card); the ``.onnx`` path imports only numpy,
soundfile, librosa and onnxruntime, never torch, and reads no config file. torch is imported on the
``.pth`` path only.
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

from svlab import metrics  # noqa: E402
from svlab.config import config_path_value, resolve_path  # noqa: E402
from svlab.encoder import add_model_arguments, command_encoder, command_model, enrolment_cosine, is_onnx  # noqa: E402
from svlab.errors import VerifyError  # noqa: E402
from svlab.guard import run_command, say  # noqa: E402
# torch and the modules that import it (svlab.checkpoint, .embedding, .evaluation, .models, .scoring,
# .scoring_system) are imported inside the functions of the .pth path, so the .onnx path never loads torch

P_TARGETS = (0.5, 0.01)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Same speaker or not? Score two recordings with a trained checkpoint.")
    ap.add_argument("files", nargs="*", help="two recordings: ENROLL TEST")
    ap.add_argument("--enroll", nargs="+", default=None, metavar="WAV", help="enrolment recording(s) (averaged)")
    ap.add_argument("--test", nargs="+", default=None, metavar="WAV",
                    help="test recording(s), each scored and decided on its own")
    add_model_arguments(ap)
    ap.add_argument("--threshold", type=float, default=None,
                    help="accept when score >= THRESHOLD (default: the EER threshold of the checkpoint's evaluation "
                         "on its run's own trial list)")
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
    from svlab import scoring
    from svlab.scoring_system import score_trials
    def combine(e: np.ndarray) -> np.ndarray:
        x = scoring.center(e, fb.mean if opts.center else None)
        return (scoring.length_normalize(x) if opts.backend == "cosine" else x).mean(axis=0)
    pair = np.stack([combine(enroll_emb), combine(test_emb)])
    no_center = dataclasses.replace(opts, center=False)  # already centred above
    return float(score_trials(fb, no_center, pair, np.array([0]), np.array([1]))[0])


def plain_cosine(enroll_emb: np.ndarray, test_emb: np.ndarray) -> float:
    return enrolment_cosine(enroll_emb, test_emb)


def _rel(p: Path) -> str:
    try:
        return str(Path(p).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(p)


def _same(a, b) -> bool:  # two svlab.evaluation.TrialListRef
    return a.matches({"trials": str(b.path)}) or (a.id is not None and a.id == b.id)


def _decision(checkpoint: Path, cfg: dict, state: dict, threshold: float | None, eval_dir: Path | None):
    """``(metrics.json, metrics, why)`` of the evaluation whose system (and threshold) decides, or None
    when the user's ``--threshold`` is applied to the plain cosine score."""
    from svlab.evaluation import (EVAL_INDEX, TrialListRef, decision_evaluation, display_path, evaluation_entries,
                                  evaluation_folder, run_trial_list)
    from svlab.scoring_system import scoring_options
    if eval_dir is not None:
        path = Path(eval_dir) / "metrics.json"
        if not path.is_file():
            raise VerifyError(f"{path} not found; --eval must be an EER.py output folder")
        return path, _metrics(path), "chosen with --eval"
    if threshold is not None:
        return None
    own = TrialListRef(config_path_value(cfg, "test.trials"))
    run_own = run_trial_list(state)
    what = ("the run's own trial list" if run_own is None or _same(run_own, own)
            else "the trial list given (test.trials)")
    found = decision_evaluation(checkpoint, own, scoring_options(cfg), what=what)
    if found is not None:
        return found
    others = sorted({display_path(m.get("trials", "?")) for _, m in evaluation_entries(checkpoint)})
    where = (f" on {what} {display_path(own.path)} (only on {', '.join(others[:3])}: pick one with --eval DIR)"
             if others else f" found (looked in {checkpoint.parent / EVAL_INDEX} and {evaluation_folder(checkpoint)})")
    raise VerifyError(f"no evaluation of {checkpoint}{where}; run 'python EER.py --checkpoint {checkpoint}' first "
                      "to get its EER threshold, or pass --threshold T")


def verify(cfg: dict, checkpoint: Path, enroll: list[Path], test: list[Path], threshold: float | None = None,
           eval_dir: Path | None = None, device=None, out=say) -> dict:
    """Score the enrolment (several recordings: averaged into one) against each test recording and decide
    for each; returns a dict of everything printed (``tests``: one entry per test recording; with a single
    test recording its ``score`` / ``accept`` / ``llr`` are also at the top level)."""
    from svlab.checkpoint import load_checkpoint
    from svlab.embedding import checkpoint_features, embed_files
    from svlab.evaluation import display_path, load_system, with_run_settings
    from svlab.models import model_from_checkpoint
    device = device or "cpu"
    state = load_checkpoint(checkpoint)
    cfg = with_run_settings(cfg, state, checkpoint, log=lambda *a: None)  # the run's own trial list and system
    feat_cfg = checkpoint_features(cfg, state, log=lambda *a: None, cache=False)
    model = model_from_checkpoint(state, device)
    paths = [Path(p) for p in enroll] + [Path(p) for p in test]
    emb, _, _ = embed_files(model, paths, feat_cfg, cfg["test"]["batch_size"], device, policy="error",
                            log=lambda *a: None, desc="audio", max_frames=cfg["test"]["batch_frames"])
    e_emb, t_emb = emb[:len(enroll)], emb[len(enroll):]
    decision = _decision(checkpoint, cfg, state, threshold, eval_dir)

    result = {"checkpoint": str(checkpoint), "enroll": [str(p) for p in enroll], "test": [str(p) for p in test]}
    out(f"checkpoint: {_rel(checkpoint)} ({state.get('tag', 'model')}, epoch {state['epoch']})")
    out(f"enrol: {', '.join(_rel(p) for p in enroll)}"
        + (f" ({len(enroll)} recordings: their embeddings are averaged into one enrolment)" if len(enroll) > 1 else ""))
    opts = fb = None
    if decision is not None:
        path, m, why = decision
        opts, fb, m = load_system(path, checkpoint)
        if threshold is None:
            threshold = float(m["threshold"])
            source = (f"EER threshold of {_rel(path)}: EER {m['eer'] * 100:.2f}% on "
                      f"{display_path(m.get('trials', '?'))}, {opts.label}; {why}")
        else:
            source = f"given with --threshold, applied to the {opts.label} score of {_rel(path)}"
        result.update(system=opts.label, metrics=str(path))
    else:
        source = "given with --threshold (cosine score)"
        result["system"] = "cosine"
    result["threshold"] = threshold
    out(f"threshold: {threshold:.5f} ({source})")
    calibrated = _calibrated(checkpoint, cfg, decision[0] if eval_dir is not None else None)
    tests = []
    for i, path in enumerate(test):
        one = t_emb[i:i + 1]
        if len(test) > 1:
            out(f"test {i + 1}/{len(test)}: {_rel(path)}")
        else:
            out(f"test: {_rel(path)}")
        r = {"file": str(path), "cosine": plain_cosine(e_emb, one)}
        out(f"cosine score: {r['cosine']:.5f}")
        r["score"] = r["cosine"] if opts is None or opts.plain else system_score(opts, fb, e_emb, one)
        if opts is not None and not opts.plain:
            out(f"{opts.label} score: {r['score']:.5f}")
        r["accept"] = bool(r["score"] >= threshold)
        out(f"decision: {'ACCEPT (same speaker)' if r['accept'] else 'REJECT (different speakers)'}  "
            f"[score {r['score']:.5f} {'>=' if r['accept'] else '<'} threshold {threshold:.5f}]")
        if calibrated is not None:
            r.update(_llr_lines(calibrated, e_emb, one, out))
        tests.append(r)
    result["tests"] = tests
    if len(tests) == 1:
        result.update({k: v for k, v in tests[0].items() if k != "file"})
    return result


def _calibrated(checkpoint: Path, cfg: dict, chosen: Path | None):
    """``(metrics.json, options, back-end)`` of the calibrated evaluation to print LLRs with: the one chosen
    with --eval if calibrated, else the latest calibrated one on the run's own trial list; None without one."""
    from svlab.evaluation import TrialListRef, evaluation_entries, load_system
    if chosen is not None:
        candidates = [chosen]
    else:
        own = TrialListRef(config_path_value(cfg, "test.trials"))
        candidates = [p for p, m in evaluation_entries(checkpoint) if own.matches(m)]
    calibrated = [p for p in candidates if _metrics(p).get("calibrated")]
    if not calibrated:
        return None
    opts_c, fb_c, _ = load_system(calibrated[-1], checkpoint)
    return calibrated[-1], opts_c, fb_c


def _llr_lines(calibrated, e_emb: np.ndarray, t_emb: np.ndarray, out) -> dict:
    path, opts_c, fb_c = calibrated
    raw = system_score(opts_c, fb_c, e_emb, t_emb)
    llr = float(fb_c.calibrator.transform(np.array([raw]))[0])
    return {**_llr_report(llr, f"{opts_c.label}, {_rel(path.parent)}", out), "calibrated_metrics": str(path)}


def _llr_report(llr: float, where: str, out) -> dict:
    """The calibrated LLR's lines (what it means, the Bayes decisions at ``P_TARGETS``)."""
    ratio = math.exp(min(max(llr, -700.0), 700.0))
    out(f"calibrated LLR: {llr:+.3f} ({where}): the recordings are "
        + (f"{ratio:.3g} times more likely if they are the same speaker" if llr >= 0 else
           f"{1 / ratio:.3g} times more likely if they are different speakers"))
    decisions = {}
    for p in P_TARGETS:
        bt = metrics.bayes_threshold(p)
        decisions[p] = llr >= bt
        out(f"  Bayes decision if a same-speaker trial has prior probability {p:g} (equal error costs): "
            f"accept when LLR >= {bt:.2f} -> {'ACCEPT' if llr >= bt else 'REJECT'}")
    return {"llr": llr, "bayes_decisions": decisions}


def verify_encoder(enc, enroll: list[Path], test: list[Path], threshold: float | None = None, out=say) -> dict:
    """``verify`` with a ``svlab.encoder.SpeakerEncoder`` (an .onnx model, or the pretrained one): the plain
    cosine score at the model's stored threshold (or ``threshold``); the same dict as ``verify``."""
    emb = enc.embed(list(enroll) + list(test))
    e_emb, t_emb = emb[:len(enroll)], emb[len(enroll):]
    d = enc.decision
    if threshold is not None:
        source = "given with --threshold (cosine score)"
    elif d.threshold is None:
        raise VerifyError(f"{enc.source} stores no decision threshold ({d.source}); pass --threshold T")
    else:
        threshold, source = d.threshold, f"{d.source}; stored in {enc.source.name}"
    info = enc.info
    result = {"checkpoint": str(enc.source), "enroll": [str(p) for p in enroll], "test": [str(p) for p in test],
              "system": "cosine", "threshold": float(threshold)}
    out(f"model: {_rel(enc.source)} ({info.get('tag') or info.get('name')}, epoch {info.get('epoch')}, "
        f"{info.get('backend')})")
    out(f"enrol: {', '.join(_rel(p) for p in enroll)}"
        + (f" ({len(enroll)} recordings: their embeddings are averaged into one enrolment)" if len(enroll) > 1 else ""))
    out(f"threshold: {threshold:.5f} ({source})")
    tests = []
    for i, path in enumerate(test):
        out(f"test {i + 1}/{len(test)}: {_rel(path)}" if len(test) > 1 else f"test: {_rel(path)}")
        r = {"file": str(path), "cosine": enrolment_cosine(e_emb, t_emb[i:i + 1])}
        r["score"], r["accept"] = r["cosine"], bool(r["cosine"] >= threshold)
        out(f"cosine score: {r['score']:.5f}")
        out(f"decision: {'ACCEPT (same speaker)' if r['accept'] else 'REJECT (different speakers)'}  "
            f"[score {r['score']:.5f} {'>=' if r['accept'] else '<'} threshold {threshold:.5f}]")
        if d.calibration:
            llr = float(d.calibration["a"]) * r["score"] + float(d.calibration["b"])
            r.update(_llr_report(llr, f"cosine, {d.calibration.get('source', 'stored calibration')}", out))
        tests.append(r)
    result["tests"] = tests
    if len(tests) == 1:
        result.update({k: v for k, v in tests[0].items() if k != "file"})
    return result


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: run(args))  # error: one line, exit 2; Ctrl-C / SIGTERM: one line, exit 130


def run(args: argparse.Namespace) -> dict:
    if args.enroll or args.test:
        if args.files or not (args.enroll and args.test):
            raise VerifyError("use either two files (tools/verify.py a.wav b.wav) or --enroll X.wav [...] "
                              "--test Z.wav [...]")
        enroll, test = args.enroll, args.test
    else:
        if len(args.files) != 2:
            raise VerifyError(f"expected two recordings (ENROLL TEST), got {len(args.files)}; "
                              "or use --enroll ... --test ...")
        enroll, test = [args.files[0]], [args.files[1]]
    checkpoint, cfg = command_model(args)
    enroll, test = [resolve_path(p, base=Path.cwd()) for p in enroll], [resolve_path(p, base=Path.cwd()) for p in test]
    if checkpoint is None or is_onnx(checkpoint):
        if args.eval:
            raise VerifyError("--eval needs a .pth checkpoint (an .onnx model decides at the threshold stored in it)")
        return verify_encoder(command_encoder(checkpoint, log=say), enroll, test, threshold=args.threshold)
    from svlab.embedding import select_device
    return verify(cfg, checkpoint, enroll, test, threshold=args.threshold,
                  eval_dir=resolve_path(args.eval, base=Path.cwd()) if args.eval else None,
                  device=select_device(args.gpu))


if __name__ == "__main__":
    sys.exit(main())
