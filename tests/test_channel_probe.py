"""``tools/channel_probe.py``: the EER of the quietest frames' spectrum says whether the channel identifies
the speaker. Tiny synthetic corpora (8 speakers x 4 one-second clips): every clip is the same loud
"speech" signal over a quiet background; only the background's colour may differ between speakers.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf

import channel_probe
from svlab.features import FBANK_LOG_FLOOR

SR = 16000
SPEAKERS, CLIPS = 8, 4


def coloured(rng: np.random.Generator, gains: np.ndarray, n: int) -> np.ndarray:
    """White noise of ``n`` samples through a fixed filter: ``gains`` (dB) at evenly spaced frequencies."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    curve = np.interp(np.linspace(0, 1, spectrum.size), np.linspace(0, 1, gains.size), gains)
    return np.fft.irfft(spectrum * 10 ** (curve / 20), n)


def write_corpus(folder, distinct_backgrounds: bool) -> list[str]:
    """Clips, manifest and every pair as a trial; the ``--set`` options that point the probe at them."""
    rng = np.random.default_rng(7)
    shared = rng.uniform(-15, 15, 12)
    speech = np.zeros(SR)
    speech[SR // 4:3 * SR // 4] = coloured(np.random.default_rng(1), rng.uniform(-10, 10, 12), SR // 2)
    speech *= 0.3 / np.abs(speech).max()                        # one "speech" signal, the same in every clip
    rels, lines = [], []
    for s in range(SPEAKERS):
        gains = rng.uniform(-15, 15, 12) if distinct_backgrounds else shared
        for c in range(CLIPS):
            background = coloured(rng, gains, SR)
            level = 0.003 * 10 ** rng.uniform(-0.5, 0.5)       # the gain varies: no cue in the level
            rel = f"spk{s}/clip{c}.wav"
            (folder / f"spk{s}").mkdir(parents=True, exist_ok=True)
            sf.write(folder / rel, (speech + level * background / background.std()).astype(np.float32), SR)
            rels.append(rel)
            lines.append(f"spk{s} {rel}")
    (folder / "test.txt").write_text("\n".join(lines) + "\n")
    trials = [f"{a} {b} {int(a.split('/')[0] == b.split('/')[0])}" for i, a in enumerate(rels) for b in rels[i + 1:]]
    (folder / "trials.txt").write_text("\n".join(trials) + "\n")
    return ["--set", f"test.root={folder}", "--set", f"test.test_manifest={folder / 'test.txt'}",
            "--set", f"test.trials={folder / 'trials.txt'}"]


def probe(capsys, args) -> tuple[int, str, str]:
    rc = channel_probe.main(args)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_a_background_per_speaker_is_found_and_a_shared_one_is_not(tmp_path, capsys):
    rc, out, err = probe(capsys, write_corpus(tmp_path / "own", distinct_backgrounds=True))
    assert rc == 0, err
    assert "496 trials (48 target), 32 utterances" in out
    eer = float(out.split("silence-frame spectrum alone: EER ")[1].split(" %")[0])
    assert eer < 15, out
    assert "strong speaker cue" in out and "keep features.mean_norm: false" in out

    rc, out, err = probe(capsys, write_corpus(tmp_path / "shared", distinct_backgrounds=False))
    assert rc == 0, err
    eer = float(out.split("silence-frame spectrum alone: EER ")[1].split(" %")[0])
    assert eer > 30, out
    # the whole utterance is the same speech over the same background: no cue there either
    assert float(out.split("whole-utterance mean log-mel: EER ")[1].split(" %")[0]) > 30, out


def test_unreadable_audio_is_one_line_naming_the_file(tmp_path, capsys):
    args = write_corpus(tmp_path, distinct_backgrounds=True)
    (tmp_path / "spk3" / "clip2.wav").write_bytes(b"not audio at all" * 10)
    rc, out, err = probe(capsys, args)
    assert rc == 2
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: 1 unusable audio file(s)") and "spk3/clip2.wav: not a readable WAV/FLAC" in err
    assert "silence-frame" not in out


def test_json_writes_the_numbers_and_replaces_only_its_own(tmp_path, capsys):
    args = write_corpus(tmp_path / "corpus", distinct_backgrounds=True)
    out_file = tmp_path / "probe.json"
    rc, out, err = probe(capsys, [*args, "--quantile", "0.2", "--json", str(out_file)])
    assert rc == 0, err
    data = json.loads(out_file.read_text())
    assert (data["n_trials"], data["n_target"], data["n_utterances"], data["quantile"]) == (496, 48, 32, 0.2)
    assert f"spectrum alone: EER {100 * data['silence_eer']:.2f} %" in out
    assert f"mean log-mel: EER {100 * data['utterance_eer']:.2f} %" in out
    assert data["verdict"] == "strong" and 0 <= data["silence_eer"] < 0.15
    assert probe(capsys, [*args, "--json", str(out_file)])[0] == 0          # its own earlier output: replaced
    assert json.loads(out_file.read_text())["quantile"] == 0.1
    trials = tmp_path / "corpus" / "trials.txt"
    before = trials.read_bytes()
    rc, out, err = probe(capsys, [*args, "--json", str(trials)])          # an input: refused before any work
    assert rc == 2 and "never replaces an input" in err and trials.read_bytes() == before


def test_digital_silence_is_left_out_and_a_silent_utterance_scores_zero():
    feat = {"sample_rate": SR, "win_length_ms": 25, "hop_length_ms": 10, "n_fft": 512, "fmin": 20, "fmax": 7600,
            "n_fbank": channel_probe.N_MELS, "mean_norm": False}
    rng = np.random.default_rng(0)
    noise = coloured(rng, rng.uniform(-15, 15, 12), SR).astype(np.float32) * 0.01
    padded = np.concatenate([np.zeros(SR // 2, np.float32), noise])           # half a second of zeros first
    alone, _, none = channel_probe.spectra(noise, feat, 0.1)
    with_zeros, whole, n_silent = channel_probe.spectra(padded, feat, 0.1)
    assert none == 0 and n_silent >= 45                                       # ~50 frames of 10 ms are zeros
    assert np.all(np.isfinite(with_zeros)) and np.all(np.isfinite(whole))
    cos = with_zeros @ alone / np.linalg.norm(with_zeros) / np.linalg.norm(alone)
    assert cos > 0.95                                                         # the noise's colour, not the zeros
    # below the floor everywhere: no channel spectrum, and its trials score 0 (not NaN)
    flat, _, _ = channel_probe.spectra(noise * np.float32(1e-7), feat, 0.1)
    assert np.linalg.norm(flat) <= channel_probe.FLAT_NORM
    assert FBANK_LOG_FLOOR == 1e-10
    scores = channel_probe.cosine_scores(np.stack([flat, alone, alone]), np.array([0, 1]), np.array([1, 2]))
    assert scores[0] == 0.0 and scores[1] == pytest.approx(1.0)


def test_quantile_outside_0_1_is_a_usage_error(capsys):
    for bad in ("0", "1.5", "ten"):
        with pytest.raises(SystemExit) as e:
            channel_probe.build_parser().parse_args(["--quantile", bad])
        assert e.value.code == 2
        assert "--quantile" in capsys.readouterr().err


def test_svlab_channel_probe_runs_the_tool(tmp_path, capsys):
    from svlab import cli
    assert cli.main(["channel-probe", *write_corpus(tmp_path, distinct_backgrounds=True)]) == 0
    assert "silence-frame spectrum alone: EER 0.00 %" in capsys.readouterr().out
    assert cli.main(["channel-probe", "--quantile", "2"]) == 2
    assert "usage: svlab channel-probe" in capsys.readouterr().err
