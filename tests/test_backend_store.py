"""The scoring back-end's training-set embeddings (PLDA, AS-norm cohort, centering, calibration) from the
on-disk feature store training wrote (issue 20.3): the very embeddings of the in-memory path, no audio
extracted a second time, features read a batch at a time; ``features.store: false`` keeps the old path."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import quiet
from svlab import embedding, evaluation, feature_cache, feature_store, models
from svlab.config import config_path_value
from svlab.errors import DataError
from svlab.manifests import read_manifest
from svlab.scoring_system import training_data_section, training_embeddings

SHARD = 8  # the tiny corpus's 32 training files: 4 shards


@pytest.fixture(scope="module")
def setup(make_config, tmp_path_factory):
    """A config with the store on, an (untrained, fixed-seed) model, and the store training builds."""
    cfg = make_config(tmp_path_factory.mktemp("backend_store"),
                      {"features.store_shard_size": SHARD, "validation.mode": "off", "test.batch_size": 4})
    torch.manual_seed(0)
    model = models.build_model(cfg["model"], 20).eval()
    feature_cache.load_training_items(cfg, log=quiet)  # what train.py does first: the store is complete
    return cfg, model


def _embedder(cfg, model, store: bool):
    feat_cfg = embedding.checkpoint_features({**cfg, "features": {**cfg["features"], "store": store}},
                                             {"config": cfg}, log=quiet)
    return evaluation.training_embedder(model, feat_cfg, cfg["test"]["batch_size"], "cpu", quiet)


@pytest.mark.parametrize("per_speaker", [0, 2])
def test_store_embeddings_equal_the_in_memory_path_without_extracting_again(setup, count_extractions, monkeypatch,
                                                                            per_speaker):
    cfg, model = setup
    data = training_data_section(cfg, {"config": cfg}, quiet)
    old_emb, old_spk = training_embeddings(data, _embedder(cfg, model, store=False), per_speaker, quiet)
    assert len(count_extractions) == len(old_emb)  # the old path read the audio again (an npz cache of its own)
    count_extractions.clear()

    read = []
    real_read = feature_store.FeatureRef.read

    def counting_read(self, *a, **k):
        read.append(self.frames)
        return real_read(self, *a, **k)
    monkeypatch.setattr(feature_store.FeatureRef, "read", counting_read)
    monkeypatch.setattr(feature_cache, "load_features", lambda *a, **k: pytest.fail("in-memory path used"))
    monkeypatch.setattr(embedding, "load_features", lambda *a, **k: pytest.fail("in-memory path used"))
    new_emb, new_spk = training_embeddings(data, _embedder(cfg, model, store=True), per_speaker, quiet)

    assert count_extractions == []                       # training's store served every utterance
    assert len(read) == len(new_emb)               # each utterance's features read once, whole
    assert new_spk.tolist() == old_spk.tolist()    # the same utterances in the same order
    assert len(new_emb) == (32 if per_speaker == 0 else 2 * len(set(old_spk.tolist())))
    np.testing.assert_allclose(new_emb, old_emb, rtol=0, atol=1e-6)


def test_backend_builds_a_missing_store_as_training_would_and_training_reuses_it(make_config, tmp_path, count_extractions):
    cfg = make_config(tmp_path, {"features.store_shard_size": SHARD, "validation.mode": "off"})
    torch.manual_seed(0)
    model = models.build_model(cfg["model"], 20).eval()
    data = training_data_section(cfg, {"config": cfg}, quiet)
    emb, _ = training_embeddings(data, _embedder(cfg, model, store=True), 0, quiet)
    assert len(count_extractions) == len(emb) == 32
    assert len(list(config_path_value(cfg, "features.cache_dir").glob("store_*/shard_*.ark"))) == 32 // SHARD
    count_extractions.clear()
    items = feature_cache.load_training_items(cfg, log=quiet)  # train.py finds the store complete
    assert count_extractions == [] and len(items.versions) == 32


def test_store_off_keeps_the_in_memory_path(make_config, tmp_path):
    cfg = make_config(tmp_path, {"features.store": False})
    torch.manual_seed(0)
    model = models.build_model(cfg["model"], 20).eval()
    data = training_data_section(cfg, {"config": cfg}, quiet)
    emb, _ = training_embeddings(data, _embedder(cfg, model, store=False), 0, quiet)
    cache = config_path_value(cfg, "features.cache_dir")
    assert len(emb) == 32 and list(cache.glob("store_*")) == [] and len(list(cache.glob("*.npz"))) == 1


def test_an_unusable_training_file_is_named_like_the_in_memory_path(make_config, tmp_path, monkeypatch):
    cfg = make_config(tmp_path, {"features.store_shard_size": SHARD, "validation.mode": "off"})
    torch.manual_seed(0)
    model = models.build_model(cfg["model"], 20).eval()
    data = training_data_section(cfg, {"config": cfg}, quiet)
    feat_cfg = embedding.checkpoint_features(cfg, {"config": cfg}, log=quiet)
    paths, keys = feature_cache.training_store_corpus(read_manifest(config_path_value(cfg, "data.train_manifest")),
                                                      config_path_value(cfg, "data.root"))
    real = feature_cache._extract_one
    bad = paths[5]

    def failing(args):
        return (None, f"{args[0]}: broken", (0, 0)) if args[0] == bad else real(args)
    monkeypatch.setattr(feature_cache, "_extract_one", failing)
    with pytest.raises(DataError) as err:
        training_embeddings(data, _embedder(cfg, model, store=True), 0, quiet)
    assert f"1 unusable audio file(s): {bad}: broken." in str(err.value)
    assert "data.bad_audio: skip" in str(err.value)
    emb, kept, problems = embedding.embed_files(model, paths, feat_cfg, 4, policy="skip", log=quiet,
                                                store_corpus=(paths, keys))
    assert len(emb) == 31 and 5 not in kept and problems == [f"{bad}: broken"]
    sub = [paths[1], paths[7]]  # a subset without the bad file: no problem
    emb2, kept2, problems2 = embedding.embed_files(model, sub, feat_cfg, 4, log=quiet, store_corpus=(paths, keys))
    assert kept2 == [0, 1] and problems2 == []
    np.testing.assert_allclose(emb2, emb[[1, 6]], rtol=0, atol=1e-6)
