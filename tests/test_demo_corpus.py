"""The embedded demo corpus: committed manifests match the generator, generation is deterministic."""
from __future__ import annotations

import numpy as np
import soundfile as sf

from svlab import demo_corpus
from svlab.config import FILES_DIR
from svlab.manifests import read_manifest, read_trials


def test_committed_manifests_are_the_generators():
    for name, lines in demo_corpus.manifests(demo_corpus.DEFAULTS).items():
        committed = (FILES_DIR / name).read_text(encoding="utf-8").splitlines()
        assert committed == lines, f"files/{name} differs from demo_corpus.manifests(); run python tools/demo_corpus.py --files files"


def test_default_manifests_shape():
    p = demo_corpus.DEFAULTS
    train = read_manifest(FILES_DIR / "split_train_set.txt")
    test = read_manifest(FILES_DIR / "test_set.txt")
    trials = read_trials(FILES_DIR / "trials.txt")
    assert len({u.speaker for u in train}) == p["n_train_speakers"]
    assert len(train) == p["n_train_speakers"] * p["utts_per_speaker"]
    assert len(test) == p["n_test_speakers"] * p["test_utts_per_speaker"]
    assert not ({u.speaker for u in train} & {u.speaker for u in test})
    n = len(test)
    assert len(trials) == n * (n - 1) // 2
    spk = {u.relpath: u.speaker for u in test}
    assert all(t.label == int(spk[t.enroll] == spk[t.test]) for t in trials)


def test_generation_is_deterministic_and_speakers_differ(tmp_path):
    params = dict(n_train_speakers=2, n_test_speakers=1, utts_per_speaker=2, test_utts_per_speaker=2,
                  min_seconds=1.0, max_seconds=1.2)
    demo_corpus.generate(tmp_path / "a", params, workers=1, log=lambda *a, **k: None)
    demo_corpus.generate(tmp_path / "b", params, workers=1, log=lambda *a, **k: None)
    wav_a, sr = sf.read(tmp_path / "a" / "S0001" / "S0001W0001.wav")
    wav_b, _ = sf.read(tmp_path / "b" / "S0001" / "S0001W0001.wav")
    assert sr == 16000 and 1.0 <= len(wav_a) / sr <= 1.2
    assert np.array_equal(wav_a, wav_b)
    assert demo_corpus.is_complete(tmp_path / "a", params)
    assert not demo_corpus.is_complete(tmp_path / "a", {**params, "seed": 1})
    t1 = demo_corpus.speaker_traits(np.random.default_rng((1, 0)))
    t2 = demo_corpus.speaker_traits(np.random.default_rng((1, 1)))
    assert t1["vtl"] != t2["vtl"] and t1["f0"] != t2["f0"]


def test_an_unwritable_root_is_one_line_naming_the_folder(tmp_path, capsys):
    """tools/demo_corpus.py: a root that cannot be created is one error line (exit 2), not a traceback."""
    import demo_corpus as command  # tools/demo_corpus.py
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder", encoding="utf-8")
    assert command.main(["--root", str(blocker / "corpus"), "--n_train_speakers", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: cannot create the demo corpus folder") and "a_file" in err[0]
