"""Channel probe: does the recording channel alone tell the speakers of a trial list apart? No training.

    python tools/channel_probe.py                                         # config.yaml's test.trials
    python tools/channel_probe.py --config recipes/speech_commands.yaml   # a recipe's trial list
    python tools/channel_probe.py --config recipes/speechocean762.yaml --quantile 0.2 --json probe.json
    svlab channel-probe --set test.trials=files/other_trials.txt

Run it on a new corpus before training, to choose ``features.mean_norm`` and the augmentation. For every
test utterance of the trial list (``test.root``, ``test.test_manifest``, ``test.trials``) it takes the
log mel spectrum (40 bands; the window, hop, n_fft, fmin and fmax of the config's ``features:``), keeps
the quietest frames (``--quantile``, 10 %: background and channel, little voice) and averages them into
one spectrum, less its mean over the bands (the recording level is no channel cue: gain varies). Each
trial is scored by the cosine similarity of its two utterances' spectra, and the EER of those scores
says how much the channel (microphone, room, background) identifies the speaker in this list; the same
with the whole utterance's mean spectrum (speech and channel together) is shown for contrast. E.g. with
``--config recipes/speechocean762.yaml``:

    silence-frame spectrum alone: EER 20.37 % (chance 50 %; the quietest 10 % of each utterance's frames, ...)
    whole-utterance mean log-mel: EER 18.91 % (speech and channel together)

Below 30 %, the channel is a strong speaker cue here: keep ``features.mean_norm: false`` and leave out
channel-changing augmentation (noise, reverberation), unless in the real use enrolment and test come
from different devices. Above 40 %, there is little channel cue, and the defaults lose nothing
(docs/real_speech.md has the Speech Commands finding). ``--json`` writes the numbers. Frames of digital
silence (all-zero samples: their mel power at the fbank front end's floor in every band) are left out
of the quietest frames, as they hold no channel spectrum; an utterance that is digital silence throughout
has none at all, and its trials score 0. Unreadable audio stops it with one line naming the files.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project folder: svlab and the lab's files

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from svlab import metrics  # noqa: E402
from svlab.audio import load_audio  # noqa: E402
from svlab.config import config_path_value, load_config, parse_override, resolve_path  # noqa: E402
from svlab.errors import DataError  # noqa: E402
from svlab.evaluation import read_test_trials  # noqa: E402
from svlab.feature_cache import TEST_AUDIO_FIX  # noqa: E402
from svlab.features import FBANK_LOG_FLOOR, fbank  # noqa: E402
from svlab.files import atomic_write, json_with_keys, refuse_overwrite  # noqa: E402
from svlab.guard import run_command, say  # noqa: E402
from svlab.manifests import MAX_LISTED_PROBLEMS  # noqa: E402

#: Mel bands of the probe's spectrum, whatever the config's front end: enough to show a microphone's or
#: a room's coloration, few enough that each band averages several FFT bins of the quiet frames.
N_MELS = 40
#: Below this EER the quietest frames alone get more than 70 % of the trials right: a cue any network
#: trained on features that keep the channel will learn, and per-utterance mean normalisation removes.
STRONG_CUE_EER = 0.30
#: Above this EER the probe is within a few points of chance (50 %), about the spread of an EER of a few
#: hundred target trials: the channel says little about the speaker in this list.
LITTLE_CUE_EER = 0.40
#: A frame whose log mel power is at most this in every band is digital silence (zero samples, or nearly:
#: the fbank front end's floor; the margin covers float32 logs). Left out of the quietest frames: a
#: recorder that writes zeros says nothing about its microphone, and on Speech Commands (47 of its 200
#: test clips have such frames) keeping them, as a flat spectrum, hid most of the channel cue.
SILENT_LOG = math.log(FBANK_LOG_FLOOR) + 1e-3
#: A channel spectrum whose norm (natural-log units, after its mean over the bands is taken off) is below
#: this is flat (only an utterance that is digital silence throughout gives one): it has no direction, and
#: its cosine scores are 0.
FLAT_NORM = 1e-6
#: What every earlier --json of this command holds: the only existing file --json may replace.
JSON_KEYS = ("silence_eer", "utterance_eer", "quantile", "trials")

VERDICTS = {
    "strong": "the recording channel is a strong speaker cue in this trial list: keep features.mean_norm: false "
              "and leave out channel-changing augmentation (noise, reverberation), unless the enrolment and test "
              "recordings of the real use come from different devices",
    "some": "the recording channel is a weak speaker cue in this trial list: compare features.mean_norm true and "
            "false on the validation speakers before choosing",
    "little": "little channel cue in this trial list: features.mean_norm: true and channel augmentation cost "
              "nothing here",
}


def quantile_arg(text: str) -> float:
    """``--quantile``: a share of the frames, more than 0 and at most 1."""
    try:
        q = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 < q <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not a share of the frames: give a number in (0, 1], e.g. 0.1")
    return q


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Whether the recording channel alone identifies the speakers of a "
                                             "trial list: the EER of the quietest frames' mel spectrum (no model).")
    ap.add_argument("--config", default=None, help="YAML config with the keys to change (default: config.yaml); "
                                                   "its test.root, test.test_manifest, test.trials and features.*")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    ap.add_argument("--quantile", type=quantile_arg, default=0.1,
                    help="share of each utterance's frames, the quietest, averaged into its channel spectrum "
                         "(default: 0.1)")
    ap.add_argument("--json", default=None, metavar="OUT", help="also write the numbers to this JSON file")
    return ap


def spectra(wav: np.ndarray, feat_cfg: dict, quantile: float) -> tuple[np.ndarray, np.ndarray, int]:
    """``(quietest frames' mean log mel spectrum, whole utterance's, frames of digital silence)``; both
    spectra ``(N_MELS,)`` float64 less their mean over the bands. Frames of digital silence (every band at
    the fbank floor) hold no channel spectrum and are not among the quietest frames; the whole utterance's
    spectrum keeps them (the same value in every band: once the mean over the bands is taken off, they only
    scale the spectrum, which the cosine does not see)."""
    logmel = fbank(wav, feat_cfg).astype(np.float64)                 # (N_MELS, frames), floored, no mean norm
    silent = np.all(logmel <= SILENT_LOG, axis=0)
    frames = np.flatnonzero(~silent) if not silent.all() else np.arange(logmel.shape[1])
    energy = np.exp(logmel[:, frames]).sum(axis=0)                   # each frame's mel power
    quiet = frames[np.argsort(energy, kind="stable")[:max(1, math.ceil(quantile * frames.size))]]
    out = [logmel[:, quiet].mean(axis=1), logmel.mean(axis=1)]
    return out[0] - out[0].mean(), out[1] - out[1].mean(), int(silent.sum())


def cosine_scores(vectors: np.ndarray, enroll: np.ndarray, test: np.ndarray) -> np.ndarray:
    """Cosine similarity of rows ``enroll[i]`` and ``test[i]`` of ``vectors``; a flat row scores 0."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    unit = np.where(norms > FLAT_NORM, vectors / np.maximum(norms, FLAT_NORM), 0.0)
    return np.einsum("ij,ij->i", unit[enroll], unit[test])


def verdict(eer: float) -> str:
    """``strong``, ``some`` or ``little``: how much of a speaker cue a silence-frame EER says the channel is."""
    return "strong" if eer < STRONG_CUE_EER else "little" if eer > LITTLE_CUE_EER else "some"


def check_json_out(path: Path, inputs: list) -> None:
    """--json may replace only an earlier probe result, never an input (``svlab.files.refuse_overwrite``)."""
    refuse_overwrite(path, inputs=inputs, flag="--json", command="tools/channel_probe.py",
                     ours=lambda p: json_with_keys(p, JSON_KEYS),
                     recognised_by=f"a JSON object with {', '.join(JSON_KEYS)}")


def probe(cfg: dict, quantile: float) -> dict:
    """The probe's numbers for the config's trial list (reads every test utterance the trials need)."""
    test = read_test_trials(cfg, log=say)
    root = config_path_value(cfg, "test.root")
    feat_cfg = {**cfg["features"], "n_fbank": N_MELS, "mean_norm": False}
    paths = test.audio_paths(root, test.needed)
    silence, whole, problems, silent = [], [], [], 0      # silent: utterances with frames of digital silence
    for path in tqdm(paths, desc="log-mel", unit="utt", leave=False, file=sys.stderr, disable=None):
        try:
            wav = load_audio(path, feat_cfg["sample_rate"], feat_cfg["min_seconds"], feat_cfg["max_seconds"])
        except DataError as e:
            problems.append(str(e))
            continue
        if not problems:                     # after a bad file only reading: the one error names all of them
            s, w, n_silent = spectra(wav, feat_cfg, quantile)
            silence.append(s)
            whole.append(w)
            silent += n_silent > 0
    if problems:
        more = f" (and {len(problems) - MAX_LISTED_PROBLEMS} more)" if len(problems) > MAX_LISTED_PROBLEMS else ""
        raise DataError(f"{len(problems)} unusable audio file(s) of the trial list "
                        f"{test.trials_path}: {'; '.join(problems[:MAX_LISTED_PROBLEMS])}{more}. "
                        f"{TEST_AUDIO_FIX}")
    row = {rel: i for i, rel in enumerate(test.needed)}
    enroll = np.array([row[t.enroll] for t in test.trials])
    tested = np.array([row[t.test] for t in test.trials])
    labels = np.array([t.label for t in test.trials])
    silence, whole = np.stack(silence), np.stack(whole)
    result = {"trials": str(test.trials_path), "trials_id": test.id, "n_trials": len(test.trials),
              "n_target": int(labels.sum()), "n_utterances": len(paths), "quantile": quantile, "n_mels": N_MELS,
              "silent_utterances": silent,
              "flat_utterances": int((np.linalg.norm(silence, axis=1) <= FLAT_NORM).sum()),
              "silence_eer": metrics.compute_eer(cosine_scores(silence, enroll, tested), labels)[0],
              "utterance_eer": metrics.compute_eer(cosine_scores(whole, enroll, tested), labels)[0]}
    result["verdict"] = verdict(result["silence_eer"])
    return result


def report(result: dict) -> None:
    """The probe's paragraph on stdout."""
    say(f"trial list {result['trials']}: {result['n_trials']} trials ({result['n_target']} target), "
        f"{result['n_utterances']} utterances")
    say(f"silence-frame spectrum alone: EER {100 * result['silence_eer']:.2f} % (chance 50 %; the quietest "
        f"{100 * result['quantile']:g} % of each utterance's frames, {result['n_mels']} log-mel bands)")
    say(f"whole-utterance mean log-mel: EER {100 * result['utterance_eer']:.2f} % (speech and channel together)")
    if result["silent_utterances"]:
        say(f"{result['silent_utterances']} utterance(s) have frames of digital silence (all-zero samples), left "
            "out of their quietest frames")
    if result["flat_utterances"]:
        say(f"{result['flat_utterances']} utterance(s) are digital silence throughout: no channel spectrum, their "
            "trials score 0")
    say(f"-> {VERDICTS[result['verdict']]} (strong below {100 * STRONG_CUE_EER:g} %, little above "
        f"{100 * LITTLE_CUE_EER:g} %)")


def run(args: argparse.Namespace) -> dict:
    cfg = load_config(args.config, dict(parse_override(s) for s in args.set))
    out = resolve_path(args.json, base=Path.cwd()) if args.json else None
    inputs = [("the config file", cfg["_config_path"]), ("the trial list (test.trials)",
              config_path_value(cfg, "test.trials")), ("the test manifest (test.test_manifest)",
              config_path_value(cfg, "test.test_manifest"))]
    if out is not None:
        check_json_out(out, inputs)              # before reading every test utterance
    result = probe(cfg, args.quantile)
    report(result)
    if out is not None:
        text = json.dumps(result, indent=1, allow_nan=False) + "\n"
        check_json_out(out, inputs)
        atomic_write(out, lambda tmp: tmp.write_text(text, encoding="utf-8"))
        say(f"numbers written to {out}")
    return result


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: run(args))  # error: one line, exit 2; Ctrl-C / SIGTERM: one line, exit 130


if __name__ == "__main__":
    sys.exit(main())
