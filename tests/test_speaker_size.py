"""--speaker_size (the lab's flag) is checked against the speakers of the training manifest."""
from __future__ import annotations

import pytest

import train
from svlab.config import ConfigError


def _quiet(*args, **kwargs):
    pass


def test_speaker_size_mismatch_is_refused(make_config, tmp_path, tiny_corpus):
    n = len({line.split()[0] for line in tiny_corpus.train_manifest.read_text().splitlines() if line.strip()})
    with pytest.raises(ConfigError, match=f"has {n} speakers"):
        train.train(make_config(tmp_path, {"train.epochs": 1}), speaker_size=n + 1, log=_quiet)


def test_speaker_size_counts_manifest_speakers_not_speed_copies(make_config, tmp_path, tiny_corpus):
    n = len({line.split()[0] for line in tiny_corpus.train_manifest.read_text().splitlines() if line.strip()})
    cfg = make_config(tmp_path, {"train.epochs": 1, "augment.copies": 1, "augment.speed_as_new_speakers": True})
    result = train.train(cfg, speaker_size=n, log=_quiet)
    assert result["history"] and len(result["history"]) == 1
