"""The model shipped in svlab/pretrained/ (issue 22.4): it loads with no training, its two runtimes agree,
its card states the figures of this very file, and it tells apart speakers of a corpus it never saw.

Made by ``python tools/package_model.py`` from the run of ``recipes/sc_so762.yaml`` (README, "Pretrained
model"); the real-speech checks need ``../shared/data`` and skip without it.
"""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

import package_model
from conftest import PROJECT
from svlab.backend import checkpoint_fingerprint
from svlab.encoder import MODEL_CARD, PRETRAINED_DIR, PRETRAINED_ONNX, PRETRAINED_PTH, SpeakerEncoder
from svlab.metrics import compute_eer
from test_encoder import tiny_run

SHARED = PROJECT.parent / "shared" / "data"
AISHELL = SHARED / "aishell_sample" / "AISHELL_Sample_data"


@pytest.fixture(scope="module")
def card() -> dict:
    return json.loads((PRETRAINED_DIR / MODEL_CARD).read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def encoder() -> SpeakerEncoder:
    return SpeakerEncoder.pretrained(log=lambda msg: None)


def test_card_describes_the_shipped_file_and_credits_its_corpora(card, encoder):
    assert (PRETRAINED_DIR / PRETRAINED_PTH).stat().st_size < 8e6  # "a few MB": no optimiser state
    assert encoder.info["backend"] == "pytorch" and encoder.embedding_size == card["network"]["embedding_size"]
    trials = {e["trials"] for e in card["evaluations"]}
    assert {"speechocean762/trials.txt", "speech_commands/trials.txt"} <= trials
    for e in card["evaluations"]:
        assert 0 < e["eer"] < 0.5 and e["eer_ci95"][0] <= e["eer"] <= e["eer_ci95"][1]
    assert card["threshold"] == card["evaluations"][0]["threshold"] == encoder.decision.threshold
    assert card["evaluations"][0]["trials"] in encoder.decision.source
    licences = " ".join(c["licence"] for c in card["training_corpora"])
    assert "CC BY 4.0" in licences and "speechocean762" in licences
    # the ONNX export carries the same threshold, and both files hold the same network
    onnx = SpeakerEncoder.from_checkpoint(PRETRAINED_DIR / PRETRAINED_ONNX, log=lambda msg: None)
    assert onnx.decision.threshold == pytest.approx(card["threshold"])
    assert checkpoint_fingerprint(PRETRAINED_DIR / PRETRAINED_PTH)  # readable with weights_only=True


def test_pytorch_and_onnxruntime_give_the_same_embeddings(encoder):
    onnx = SpeakerEncoder.from_checkpoint(PRETRAINED_DIR / PRETRAINED_ONNX, log=lambda msg: None)
    rng = np.random.default_rng(0)
    t = np.arange(16000 * 3) / 16000
    waves = [0.1 * np.sin(2 * np.pi * 180 * t[:n]) + 0.01 * rng.standard_normal(n) for n in (16000, 28000, 48000)]
    for wave in waves:
        a, b = encoder.embed(wave, sample_rate=16000), onnx.embed(wave, sample_rate=16000)
        assert np.abs(a / np.linalg.norm(a) - b / np.linalg.norm(b)).max() <= 1e-4


@pytest.mark.skipif(not AISHELL.is_dir(), reason="../shared/data/aishell_sample is not beside the project")
def test_it_separates_speakers_of_a_corpus_it_never_trained_on(encoder):
    """All 780 pairs of the 40 AISHELL sample utterances (Mandarin, 2 speakers; not in its training data).
    The no-training baseline (mean + std of raw MFCCs) has an EER of 23.75 % on them (docs/real_speech.md)."""
    files = sorted(AISHELL.glob("*.wav"))
    assert len(files) == 40
    emb = encoder.embed([str(f) for f in files])
    emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    speaker = [f.name[6:11] for f in files]
    pairs = list(itertools.combinations(range(len(files)), 2))
    scores = np.array([emb[i] @ emb[j] for i, j in pairs])
    labels = np.array([speaker[i] == speaker[j] for i, j in pairs], dtype=int)
    eer, _ = compute_eer(scores, labels)
    assert eer < 0.15, f"EER {eer:.3f} on the AISHELL sample"
    verdict = encoder.verify(str(files[0]), str(files[1]))  # one speaker (S0150), two utterances
    assert verdict.score == pytest.approx(float(emb[0] @ emb[1]), abs=1e-5)


def test_package_model_ships_a_run_that_pretrained_loads(tiny_corpus, tmp_path, capsys):
    """tools/package_model.py: weights without optimiser state, the ONNX export and a card whose threshold
    is the first evaluation's; an evaluation of another checkpoint is refused before anything is written."""
    _, ckpt, _ = tiny_run(tiny_corpus, tmp_path / "a")
    _, other, _ = tiny_run(tiny_corpus, tmp_path / "b", {"train.seed": 1})
    out = tmp_path / "shipped"
    capsys.readouterr()
    assert package_model.main(["--checkpoint", str(ckpt), "--eval", str(other.parent / "eval_030"),
                               "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "evaluated another checkpoint" in err and not out.exists()
    assert package_model.main(["--checkpoint", str(ckpt), "--eval", str(ckpt.parent / "eval_030"),
                               "--out", str(out)]) == 0
    state = torch_load(out / PRETRAINED_PTH)
    assert "optimizer_state" not in state and "model_state" in state
    shipped = json.loads((out / MODEL_CARD).read_text(encoding="utf-8"))
    metrics = json.loads((ckpt.parent / "eval_030" / "metrics.json").read_text(encoding="utf-8"))
    assert shipped["threshold"] == metrics["threshold"] and shipped["evaluations"][0]["eer"] == metrics["eer"]
    original = SpeakerEncoder.from_checkpoint(ckpt, log=lambda msg: None)
    for enc in (SpeakerEncoder.pretrained(folder=out, log=lambda msg: None),
                SpeakerEncoder.from_checkpoint(out / PRETRAINED_ONNX, log=lambda msg: None)):
        assert enc.decision.threshold == pytest.approx(metrics["threshold"])
        wav = sorted(tiny_corpus.root.rglob("*.wav"))[0]
        a, b = original.embed(wav), enc.embed(wav)
        assert np.abs(a - b).max() <= 1e-4 * np.abs(a).max()


def torch_load(path):
    import torch
    return torch.load(path, weights_only=True)
