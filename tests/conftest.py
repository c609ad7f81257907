"""Shared fixtures: a tiny synthetic corpus (generated once per session) and a config builder.

Everything here is sized for a 2-core machine shared with other people: a few dozen one-second
utterances, a narrow x-vector (channels 32, embedding 16, 20 MFCCs) and one torch thread.
"""
from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

PROJECT = Path(__file__).resolve().parents[1]
for _folder in (PROJECT, PROJECT / "tools"):  # the lab's files and svlab; the other commands, imported by their tests
    if str(_folder) not in sys.path:
        sys.path.insert(0, str(_folder))

from svlab import config  # noqa: E402
from svlab import demo_corpus  # noqa: E402
from svlab import feature_cache  # noqa: E402

torch.set_num_threads(1)

# test_utts_per_speaker keeps the test side as small as the training side (ignored by versions of
# demo_corpus that use utts_per_speaker for both).
TINY_CORPUS = dict(n_train_speakers=8, n_test_speakers=4, utts_per_speaker=4, test_utts_per_speaker=4,
                   min_seconds=1.0, max_seconds=1.5)

SMALL_MODEL = {
    "model.channels": 32,
    "model.embedding_size": 16,
    "features.n_mfcc": 20,
    "features.n_mels": 40,
}


def quiet(*args, **kwargs) -> None:
    """A ``log`` callable that drops everything."""


@pytest.fixture()
def count_extractions(monkeypatch):
    """The files each extraction reads (feature_cache._extract_one: the store's jobs and the npz cache's)."""
    calls = []
    real = feature_cache._extract_one

    def counting(args):
        calls.append(args[0].name)
        return real(args)
    monkeypatch.setattr(feature_cache, "_extract_one", counting)
    return calls


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> SimpleNamespace:
    base = tmp_path_factory.mktemp("tiny_corpus")
    root, files = base / "corpus", base / "files"
    demo_corpus.generate(root, params=TINY_CORPUS, files_dir=files, workers=1, log=quiet)
    return SimpleNamespace(
        root=root,
        files=files,
        train_manifest=files / "split_train_set.txt",
        test_manifest=files / "test_set.txt",
        trials=files / "trials.txt",
    )


def tiny_overrides(corpus: SimpleNamespace, workdir: Path, extra: dict | None = None) -> dict:
    """Dotted-key overrides pointing a config at the tiny corpus and at ``workdir`` for all outputs."""
    overrides = {
        "data.root": str(corpus.root),
        "data.train_manifest": str(corpus.train_manifest),
        "test.root": str(corpus.root),
        "test.test_manifest": str(corpus.test_manifest),
        "test.trials": str(corpus.trials),
        "features.cache_dir": str(Path(workdir) / "cache"),
        "train.save_dir": str(Path(workdir) / "runs"),
        "train.n_folder": "000",
        "train.epochs": 2,
        "train.batchsize": 8,
        "train.crop_frames": 50,
        **SMALL_MODEL,
    }
    overrides.update(extra or {})
    return overrides


def nest(overrides: dict) -> dict:
    """``{"a.b": 1}`` -> ``{"a": {"b": 1}}`` (to write overrides as a user YAML file)."""
    out: dict = {}
    for key, value in overrides.items():
        cur = out
        *parents, last = key.split(".")
        for part in parents:
            cur = cur.setdefault(part, {})
        cur[last] = value
    return out


@pytest.fixture(scope="session")
def make_config(tiny_corpus):
    """``make_config(workdir, extra=None)`` -> full config for the tiny corpus, outputs under ``workdir``."""
    def build(workdir: Path, extra: dict | None = None) -> dict:
        return config.load_config(None, tiny_overrides(tiny_corpus, workdir, extra))
    return build


@pytest.fixture(scope="session")
def write_config_yaml(tiny_corpus):
    """``write_config_yaml(workdir, extra=None)`` -> path of a user YAML with the tiny-corpus settings."""
    def write(workdir: Path, extra: dict | None = None) -> Path:
        path = Path(workdir) / "tiny_config.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(nest(tiny_overrides(tiny_corpus, workdir, extra))), encoding="utf-8")
        return path
    return write
