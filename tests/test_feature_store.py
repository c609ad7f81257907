"""The on-disk feature store (svlab.feature_store, issue 20): the same features and crops as the in-memory
path, resumed and repaired extraction, invalidation by audio content, other settings or corpora refused
and rebuilt, and each torchrun rank extracting its own shards."""
from __future__ import annotations

import json
import os
import pickle
import socket
import subprocess
import sys
import threading

import kaldiio
import numpy as np
import pytest
import soundfile as sf

import dataset
from conftest import quiet
from svlab import config, feature_cache, feature_store
from svlab.errors import DataError
from svlab.manifests import read_manifest

SHARD = 8  # the tiny corpus's 32 training files: 4 shards


def _cfg(make_config, workdir, extra=None):
    return make_config(workdir, {"features.store_shard_size": SHARD, "validation.mode": "off", **(extra or {})})


def _paths(cfg):
    root = config.config_path_value(cfg, "data.root")
    utts = read_manifest(config.config_path_value(cfg, "data.train_manifest"))
    return [root / u.relpath for u in utts], [u.relpath.rsplit(".", 1)[0].replace("/", "-") for u in utts]


def _store(cfg, log=quiet):
    paths, keys = _paths(cfg)
    return feature_cache.clean_store(paths, keys, cfg["features"], log=log, workers=1)


def _arrays(store):
    return [None if r is None else np.asarray(r[0]) for r in store.refs()]


def test_store_round_trip_equals_in_memory_features_and_is_kaldi_readable(make_config, tmp_path):
    cfg = _cfg(make_config, tmp_path)
    paths, keys = _paths(cfg)
    ref, kept, problems = feature_cache.load_features(paths, {**cfg["features"], "cache_dir": ""}, log=quiet, workers=1)
    store = _store(cfg)
    assert store.complete and store.n_shards == 4 and not store.problems and kept == list(range(len(paths)))
    got = _arrays(store)
    assert [g.tobytes() for g in got] == [r.tobytes() for r in ref]  # bit-identical
    ref0 = store.refs()[3][0]
    assert ref0.shape == ref[3].shape and np.array_equal(ref0[:, 5:17], ref[3][:, 5:17])  # a crop reads just that
    assert pickle.loads(pickle.dumps(ref0)).read().tobytes() == ref[3].tobytes()  # DataLoader workers can take it
    # what Kaldi / ESPnet / WeSpeaker read: the scp of each shard, frames x features
    scp = {}
    for s in range(store.n_shards):
        scp.update(kaldiio.load_scp(str(store.shard_path(s, "scp"))))
    assert list(scp) == keys
    assert all(np.array_equal(scp[k], r.T) for k, r in zip(keys, ref))
    # a dataset built from the store holds no feature arrays, only references
    ds = dataset.SpkTrainDataset(cfg, log=quiet)
    assert all(isinstance(f, feature_store.FeatureRef) for f in ds.features)


def test_interrupted_extraction_continues_where_it_stopped(make_config, tmp_path, monkeypatch):
    cfg = _cfg(make_config, tmp_path)
    real, calls = feature_cache._extract_one, []

    def dies_at_item_20(args):
        calls.append(args[0].name)
        if len(calls) == 20:  # in shard 2 (items 16..23): shards 0 and 1 are done
            raise KeyboardInterrupt
        return real(args)
    monkeypatch.setattr(feature_cache, "_extract_one", dies_at_item_20)
    with pytest.raises(KeyboardInterrupt):
        _store(cfg)
    folder = next((tmp_path / "cache").glob("store_mfcc_*"))
    assert sorted(p.name for p in folder.glob("shard_*.json")) == ["shard_00000.json", "shard_00001.json"]
    assert not list(folder.glob("*.tmp*"))  # the partial shard's archive is removed
    calls.clear()
    monkeypatch.setattr(feature_cache, "_extract_one", lambda args: (calls.append(args[0].name), real(args))[1])
    store = _store(cfg)
    assert len(calls) == 16 and store.complete  # shards 2 and 3 only
    paths, _ = _paths(cfg)
    assert calls == [p.name for p in paths[16:]]
    ref, _, _ = feature_cache.load_features(paths, {**cfg["features"], "cache_dir": ""}, log=quiet, workers=1)
    assert [a.tobytes() for a in _arrays(store)] == [r.tobytes() for r in ref]


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete_ark", "garbage_index"])
def test_damaged_shard_is_named_in_one_line_and_extracted_again(make_config, tmp_path, count_extractions, damage):
    cfg = _cfg(make_config, tmp_path)
    first = _arrays(_store(cfg))
    folder = next((tmp_path / "cache").glob("store_mfcc_*"))
    ark = folder / "shard_00001.ark"
    if damage == "truncate":
        os.truncate(ark, ark.stat().st_size - 100)
    elif damage == "flip":
        data = bytearray(ark.read_bytes())
        data[len(data) // 2] ^= 0x40
        ark.write_bytes(bytes(data))
    elif damage == "delete_ark":
        ark.unlink()
    else:
        (folder / "shard_00001.json").write_text("{not json", encoding="utf-8")
    count_extractions.clear()
    lines = []
    store = _store(cfg, log=lines.append)
    named = [ln for ln in lines if "shard_00001.ark" in ln]
    assert len(named) == 1 and "\n" not in named[0] and "extracting it again" in named[0], lines
    why = {"truncate": "truncated", "flip": "CRC-32", "delete_ark": "missing", "garbage_index": "unusable"}[damage]
    assert why in named[0]
    assert len(count_extractions) == SHARD  # that shard alone
    assert [a.tobytes() for a in _arrays(store)] == [a.tobytes() for a in first]


def test_truncated_shard_met_while_training_is_one_data_error(make_config, tmp_path):
    cfg = _cfg(make_config, tmp_path)
    ds = dataset.SpkTrainDataset(cfg, log=quiet)
    ark = ds.features[0].path
    os.truncate(ark, 50)
    feature_store._forget(ark)
    ds.set_epoch(1)
    with pytest.raises(DataError, match=r"shard_00000\.ark is cut short.*run train.py again"):
        ds[0]


def test_changed_audio_content_invalidates_its_shard(make_config, tmp_path, count_extractions):
    cfg = _cfg(make_config, tmp_path)
    first = _arrays(_store(cfg))
    paths, _ = _paths(cfg)
    victim = paths[27]  # shard 3
    st = victim.stat()
    wav, sr = sf.read(str(victim), dtype="int16")
    sf.write(str(victim), np.ascontiguousarray(wav[::-1]), sr, subtype="PCM_16")  # same size, other content
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))  # and the same modification time
    assert victim.stat().st_size == st.st_size
    count_extractions.clear()
    lines = []
    store = _store(cfg, log=lines.append)
    assert len(count_extractions) == SHARD and victim.name in count_extractions
    assert any("shard_00003.ark" in ln and victim.name in ln and "changed" in ln for ln in lines), lines
    got = _arrays(store)
    assert got[27].tobytes() != first[27].tobytes()
    assert all(got[i].tobytes() == first[i].tobytes() for i in range(len(got)) if i != 27)
    # store_check: size compares sizes and times only: the same edit goes unseen (documented)
    count_extractions.clear()
    sf.write(str(victim), wav, sr, subtype="PCM_16")
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    quick = {**cfg, "features": {**cfg["features"], "store_check": "size"}}
    paths, keys = _paths(quick)
    feature_cache.clean_store(paths, keys, quick["features"], log=quiet, workers=1)
    assert count_extractions == []


def test_store_of_other_settings_or_corpus_is_named_and_rebuilt(make_config, tmp_path, count_extractions):
    cfg = _cfg(make_config, tmp_path)
    store = _store(cfg)
    meta = store.folder / "store.json"
    head = json.loads(meta.read_text())
    head["signature"]["n_mfcc"] = 13  # as if made with other settings (a store folder copied or renamed)
    meta.write_text(json.dumps(head))
    count_extractions.clear()
    lines = []
    rebuilt = _store(cfg, log=lines.append)
    assert len(count_extractions) == 32 and rebuilt.complete
    assert [ln for ln in lines if "other settings (n_mfcc)" in ln and str(store.folder) in ln], lines
    # a shard index from another corpus (copied from the store of another file list)
    other_cfg = _cfg(make_config, tmp_path / "other")
    paths, keys = _paths(other_cfg)
    other = feature_cache.clean_store(paths[:16], keys[:16], other_cfg["features"], log=quiet, workers=1)
    (rebuilt.folder / "shard_00000.json").write_bytes((other.folder / "shard_00000.json").read_bytes())
    count_extractions.clear()
    lines.clear()
    _store(cfg, log=lines.append)
    assert len(count_extractions) == SHARD
    assert [ln for ln in lines if "shard_00000.ark" in ln and "another corpus" in ln], lines


@pytest.mark.parametrize("copies", [0, 1])
def test_training_crops_from_the_store_equal_the_in_memory_ones(make_config, tmp_path, copies):
    extra = {"augment.copies": copies, "augment.spec_augment": bool(copies)}
    ram = dataset.SpkTrainDataset(_cfg(make_config, tmp_path / "ram", {**extra, "features.store": False}), log=quiet)
    disk = dataset.SpkTrainDataset(_cfg(make_config, tmp_path / "disk", extra), log=quiet)
    assert isinstance(disk.features[0], feature_store.FeatureRef) and isinstance(ram.features[0], np.ndarray)
    assert len(disk) == len(ram) == 32 and disk.labels == ram.labels
    if copies:
        assert isinstance(disk.versions[0][1], feature_store.FeatureRef) and len(disk.versions[0]) == 2
        assert list((tmp_path / "disk" / "cache").glob("store_mfcc_aug_*/shard_00000.ark"))
    for epoch in (1, 2, 3):
        ram.set_epoch(epoch)
        disk.set_epoch(epoch)
        for i in range(len(ram)):
            (a, ya), (b, yb) = ram[i], disk[i]
            assert ya == yb and a.numpy().tobytes() == b.numpy().tobytes()


def test_each_rank_extracts_its_own_shards(make_config, tmp_path, count_extractions, monkeypatch):
    """Two ranks as two threads meeting at a barrier, as torchrun's processes do."""
    cfg = _cfg(make_config, tmp_path, {"augment.copies": 1, "augment.noise_types": ["white", "pink"]})
    paths, _ = _paths(cfg)
    wall, errors, augmented = threading.Barrier(2, timeout=60), [], []
    real_augment = feature_cache._augment_one
    monkeypatch.setattr(feature_cache, "_augment_one", lambda args: (augmented.append(args[0]), real_augment(args))[1])

    def rank(r: int) -> None:
        try:
            feature_cache.extract_training_share(cfg, r, 2, barrier=wall.wait, log=quiet)
        except BaseException as e:  # shown by the assert below
            errors.append(e)
            wall.abort()
    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(count_extractions) == sorted(p.name for p in paths)  # every file once, by one of the two
    assert sorted(augmented) == list(range(32))
    folder = next((tmp_path / "cache").glob("store_mfcc_[0-9a-f]*"))
    assert sorted(p.name for p in folder.glob("shard_*.json")) == [f"shard_0000{s}.json" for s in range(4)]
    # rank 0's dataset then finds both stores complete: nothing is extracted or augmented again
    count_extractions.clear()
    monkeypatch.setattr(feature_cache, "_augment_one", lambda args: pytest.fail("augmented again"))
    ds = dataset.SpkTrainDataset(cfg, log=quiet)
    assert count_extractions == [] and len(ds) == 32 and all(len(v) == 2 for v in ds.versions)


def test_shards_of_rank_take_every_world_size_th():
    store = feature_store.Store.__new__(feature_store.Store)
    store.pending = list(range(10))
    assert feature_store.shards_of_rank(store, 0, 3) == [0, 3, 6, 9]
    assert feature_store.shards_of_rank(store, 2, 3) == [2, 5, 8]


def test_partial_archive_of_a_killed_extraction_is_removed(make_config, tmp_path):
    cfg = _cfg(make_config, tmp_path)
    store = _store(cfg)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    killed = store.folder / f"shard_00002.ark.tmp-{host}-{int(dead.stdout)}"  # SIGKILLed mid-shard
    running = store.folder / f"shard_00002.ark.tmp-{host}-{os.getpid()}"     # another rank still writing
    for p in (killed, running):
        p.write_bytes(b"partial")
    _store(cfg)
    assert not killed.exists() and running.exists()


def test_dataloader_workers_read_the_store(make_config, tmp_path):
    from torch.utils.data import DataLoader
    ds = dataset.SpkTrainDataset(_cfg(make_config, tmp_path), log=quiet)
    ds.set_epoch(2)
    batches = {}
    for workers in (0, 2):
        loader = DataLoader(ds, batch_size=8, collate_fn=ds.collate_fn, num_workers=workers)
        batches[workers] = [(x.numpy().tobytes(), y.tolist()) for x, y in loader]
    assert batches[0] == batches[2] and len(batches[0]) == 4
