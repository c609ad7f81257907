"""Package a trained checkpoint as a shipped model: its weights, its ONNX export and a model card.

    python tools/package_model.py --checkpoint saved_model/sc_so762/checkpoint_020.pth \\
        --eval saved_model/sc_so762/eval_020 saved_model/sc_so762/eval_020_sc --out svlab/pretrained

This is how ``svlab/pretrained/`` (``SpeakerEncoder.pretrained()``, ``svlab verify --pretrained``) is made
from the run of ``recipes/sc_so762.yaml``. ``--out`` gets three files, each written then renamed:

- ``speaker_encoder.pth``: the checkpoint without its optimiser and scheduler state (a third of the size;
  it can be embedded with and fine-tuned from, not resumed);
- ``speaker_encoder.onnx``: ``tools/export.py``'s export of it (checked against PyTorch), with the threshold;
- ``model_card.json``: what the model is, what it was trained on (corpora and their licences), its EER and
  minDCF(0.01) with 95 % intervals on every ``--eval`` evaluation (``EER.py``'s ``metrics.json``), and the
  decision threshold with where it came from: the EER threshold of the first ``--eval``.

The evaluations must be of this very checkpoint (their ``fingerprint``), so the card never states figures
of another model.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project folder: svlab and the lab's files

from svlab.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from svlab.config import resolve_path  # noqa: E402
from svlab.embedding_files import cli_path  # noqa: E402
from svlab.encoder import MODEL_CARD, PRETRAINED_ONNX, PRETRAINED_PTH  # noqa: E402
from svlab.errors import VerifyError  # noqa: E402
from svlab.backend import checkpoint_fingerprint  # noqa: E402
from svlab.files import atomic_write  # noqa: E402
from svlab.guard import run_command, say  # noqa: E402
from svlab.text import printable  # noqa: E402

RESUME_STATE = ("optimizer_state", "scheduler_state")
LICENCES = {  # corpus folder name under ../shared/data: how its licence is credited on the card
    "speech_commands": "Speech Commands v0.02 (P. Warden, 2018), CC BY 4.0",
    "speechocean762": "speechocean762 (J. Zhang et al., Interspeech 2021), free for commercial and "
                      "non-commercial use; Apache-2.0 on its Hugging Face card",
    "aishell_sample": "AISHELL sample (AISHELL-1 is OpenSLR 33), Apache 2.0",
}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Package a checkpoint as a shipped model: weights, ONNX, model card.")
    ap.add_argument("--checkpoint", required=True, help="the trained checkpoint (.pth)")
    ap.add_argument("--eval", nargs="+", required=True, metavar="DIR",
                    help="EER.py evaluation folders of this checkpoint (metrics.json); the first gives the threshold")
    ap.add_argument("--out", default="svlab/pretrained", help="folder to write the three files to")
    ap.add_argument("--recipe", default="recipes/sc_so762.yaml", help="the recipe that trained it (named on the card)")
    return ap


def evaluation_record(folder: Path, fingerprint: str) -> dict:
    """One evaluation's figures for the card; refuses an evaluation of another checkpoint."""
    path = folder / "metrics.json"
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise VerifyError(f"{printable(path)}: not a readable EER.py evaluation ({e.__class__.__name__}); "
                          "give the folder EER.py printed") from None
    if m.get("fingerprint") != fingerprint:
        raise VerifyError(f"{printable(folder)} evaluated another checkpoint; evaluate this one with EER.py first")
    trials = Path(m["trials"]).resolve()
    return {"trials": f"{trials.parent.name}/{trials.name}", "system": m["system"], "eer": m["eer"],
            "eer_ci95": m.get("eer_ci95"), "min_dcf_0.01": m["min_dcf_0.01"],
            "min_dcf_0.01_ci95": m.get("min_dcf_0.01_ci95"), "n_target": m["n_target"],
            "n_nontarget": m["n_nontarget"], "threshold": m["threshold"]}


def corpora_of(state: dict) -> list[dict]:
    """The training corpora a checkpoint records, each with its licence where known."""
    data = state["config"]["data"]
    corpora = data.get("corpora") or [{"name": Path(data["root"]).name, "root": data["root"]}]
    return [{"name": c["name"], "speakers": c.get("speakers"),
             "licence": LICENCES.get(Path(str(c["root"])).name, "see the corpus")} for c in
            (state.get("corpora") or corpora)]


def card(state: dict, evals: list[dict], recipe: str) -> dict:
    cfg = state["config"]
    first = evals[0]
    return {
        "model": state.get("tag"), "epoch": state["epoch"], "recipe": recipe,
        "network": {k: cfg["model"][k] for k in ("name", "pooling", "channels", "stat_channels", "embedding_size")},
        "loss": {k: cfg["loss"][k] for k in ("type", "scale", "margin")},
        "features": state["features"],
        "training_corpora": corpora_of(state),
        "training_speakers": len(state["speakers"]),
        "evaluations": evals,
        "threshold": first["threshold"],
        "threshold_source": f"EER threshold on {first['trials']} ({first['system']})",
        "good_for": "16 kHz read speech like its training data: English read by Mandarin speakers "
                    "(speechocean762) and single English words (Speech Commands); a demonstration and a baseline",
        "not_for": "security decisions, telephone (8 kHz) or far-field audio, languages and channels unlike "
                   "its training data; it was trained without mean normalisation, so the recording channel "
                   "is part of what it matches: one speaker on two different microphones scores lower. The "
                   "threshold is the EER threshold of the first evaluation: other recordings score on another "
                   "scale, so set your own from a few labelled pairs of them (verify --threshold)",
        "created": time.strftime("%Y-%m-%d"),
    }


def run(args: argparse.Namespace) -> None:
    from svlab.onnx_export import export
    checkpoint, out = cli_path(args.checkpoint), resolve_path(args.out, base=Path.cwd())
    state = load_checkpoint(checkpoint)
    fingerprint = checkpoint_fingerprint(checkpoint)
    evals = [evaluation_record(cli_path(d), fingerprint) for d in args.eval]  # all checked before any write
    out.mkdir(parents=True, exist_ok=True)
    shipped = {k: v for k, v in state.items() if k not in RESUME_STATE}
    save_checkpoint(shipped, out / PRETRAINED_PTH)
    result = export(out / PRETRAINED_PTH, out / PRETRAINED_ONNX, threshold=evals[0]["threshold"], log=say)
    text = json.dumps(card(state, evals, args.recipe), indent=1, ensure_ascii=False) + "\n"
    atomic_write(out / MODEL_CARD, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    for name in (PRETRAINED_PTH, PRETRAINED_ONNX, MODEL_CARD):
        say(f"wrote {out / name} ({(out / name).stat().st_size / 1e6:.1f} MB)")
    say(f"onnxruntime matches PyTorch to {result['parity']:.1e}; threshold {evals[0]['threshold']:.5f}")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
