"""The test side from an on-disk feature store (issue 20.3): ``EER.py``'s test utterances and ``tools/extract.py``'s
list go to a store of their own in ``features.cache_dir``, are read one utterance at a time when embedded and give
the very embeddings, scores and EER of the in-memory path (``features.store: false``); the store is reused by the
next run, re-extracts a changed audio file's shard and a damaged shard (named in one line), and a shard that fails
while it is read, in the main process or in a DataLoader worker, is one line naming it, never a traceback."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import soundfile as sf
import yaml

import EER
import dataset
import extract
import train
from conftest import nest, quiet, tiny_overrides
from svlab import config, embedding, feature_store, kaldi_data
from svlab.errors import DataError

SHARD = 4  # the tiny corpus's 16 test files: 4 shards


@pytest.fixture(scope="module")
def run(tiny_corpus, tmp_path_factory):
    """A checkpoint trained one epoch on the tiny corpus, and a private copy of the test audio (tests edit it)."""
    base = tmp_path_factory.mktemp("test_store")
    test_root = base / "test_audio"
    for line in tiny_corpus.test_manifest.read_text(encoding="utf-8").split("\n"):
        if line.strip():
            rel = line.split()[1]
            (test_root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(tiny_corpus.root / rel, test_root / rel)
    over = tiny_overrides(tiny_corpus, base, {"train.epochs": 1, "validation.mode": "off", "test.root": str(test_root),
                                              "features.store_shard_size": SHARD, "test.bootstrap": 0})
    train.train(config.load_config(None, over), log=quiet)
    return dict(base=base, over=over, test_root=test_root, ckpt=base / "runs" / "000" / "checkpoint_001.pth")


def _config_file(run, workdir, store: bool):
    """A user config of the run's settings, the features cached in ``workdir/cache`` (store on or off)."""
    path = workdir / "cfg.yaml"
    workdir.mkdir(parents=True, exist_ok=True)
    over = {**run["over"], "features.cache_dir": str(workdir / "cache"), "features.store": store}
    path.write_text(yaml.safe_dump(nest(over)), encoding="utf-8")
    return path


def _evaluate(run, workdir, store: bool = True) -> dict:
    out = workdir / "eval"
    assert EER.main(["--config", str(_config_file(run, workdir, store)), "--checkpoint", str(run["ckpt"]),
                     "--out", str(out), "--save_embeddings"]) == 0
    names = (out / "embeddings_index.txt").read_text(encoding="utf-8").split()
    scores = [float(ln.split()[2]) for ln in (out / "scores.txt").read_text().splitlines()]
    return dict(metrics=json.loads((out / "metrics.json").read_text()), names=names, scores=np.array(scores),
                emb=np.load(out / "embeddings.npy"))


def _test_set(run, workdir, log=quiet):
    cfg = config.load_config(_config_file(run, workdir, True))
    return dataset.SpkTestDataset(cfg, log=log)


def _store_folder(workdir):
    return next((workdir / "cache").glob("store_mfcc_*"))


def test_eer_from_the_test_store_equals_the_in_memory_path(run, tmp_path, count_extractions, monkeypatch):
    ram = _evaluate(run, tmp_path / "ram", store=False)
    assert len(count_extractions) == 16 and not list((tmp_path / "ram" / "cache").glob("store_*"))
    count_extractions.clear()
    monkeypatch.setattr(embedding, "load_features", lambda *a, **k: pytest.fail("test features held in RAM"))
    disk = _evaluate(run, tmp_path / "disk")
    assert len(count_extractions) == 16
    assert disk["names"] == ram["names"] and len(disk["names"]) == 16
    np.testing.assert_allclose(disk["emb"], ram["emb"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(disk["scores"], ram["scores"], rtol=0, atol=1e-6)
    for key in ("eer", "threshold", "min_dcf_0.01"):
        assert disk["metrics"][key] == pytest.approx(ram["metrics"][key], abs=1e-6), key
    # the store holds the test list in 4 shards, Kaldi-readable, keyed like training's store
    folder = _store_folder(tmp_path / "disk")
    assert sorted(p.name for p in folder.glob("shard_*.json")) == [f"shard_0000{s}.json" for s in range(4)]
    ds = _test_set(run, tmp_path / "disk")
    assert all(isinstance(f, feature_store.FeatureRef) for f in ds.features)
    assert len(count_extractions) == 16  # the dataset found the store complete


def test_the_dataset_reads_one_utterance_at_a_time_and_batches_from_the_index(run, tmp_path, monkeypatch):
    ram = dataset.SpkTestDataset(config.load_config(_config_file(run, tmp_path / "ram", False)), log=quiet)
    disk = _test_set(run, tmp_path / "disk")
    read = []
    real = feature_store.FeatureRef.read
    monkeypatch.setattr(feature_store.FeatureRef, "read", lambda self, *a: (read.append(self.frames), real(self, *a))[1])
    batches = disk.equal_length_batches(3)
    assert batches == ram.equal_length_batches(3) and read == []  # lengths from the store's index, nothing read
    lengths = [disk.features[b[0]].shape[1] for b in batches]
    assert lengths == sorted(lengths, reverse=True) and any(len(b) > 1 for b in batches)  # longest first
    assert sorted(i for b in batches for i in b) == list(range(16))
    for i in range(len(ram)):
        (a, ka), (b, kb) = ram[i], disk[i]
        assert ka == kb and a.numpy().tobytes() == b.numpy().tobytes()
        assert read == [b.shape[1]]  # this utterance alone, whole
        read.clear()


def test_test_batch_frames_bounds_the_embedding_batches_and_changes_no_score(run, tmp_path, monkeypatch):
    """``test.batch_frames`` (config.yaml) is the frame budget of EER.py's embedding batches; equal-length
    batches are exact, so a budget of one frame (every utterance alone) gives the same scores."""
    sizes = []
    real = dataset.SpkTestDataset.equal_length_batches
    monkeypatch.setattr(dataset.SpkTestDataset, "equal_length_batches",
                        lambda self, n: (sizes.append([len(b) for b in real(self, n)]), real(self, n))[1])
    full = _evaluate(run, tmp_path / "full")
    assert max(sizes[-1]) > 1  # the default budget batches the tiny test set's equal lengths together
    alone = _evaluate({**run, "over": {**run["over"], "test.batch_frames": 1}}, tmp_path / "alone")
    assert set(sizes[-1]) == {1} and len(sizes[-1]) == len(alone["names"])
    assert alone["names"] == full["names"]
    np.testing.assert_allclose(alone["emb"], full["emb"], atol=1e-5)
    np.testing.assert_allclose(alone["scores"], full["scores"], atol=1e-5)


def test_store_is_reused_and_a_changed_test_file_is_extracted_again(run, tmp_path, count_extractions):
    first = _test_set(run, tmp_path)
    before = [np.asarray(f).copy() for f in first.features]
    count_extractions.clear()
    again = _test_set(run, tmp_path)
    assert count_extractions == []  # the second run reads the store
    assert [np.asarray(f).tobytes() for f in again.features] == [b.tobytes() for b in before]

    victim_rel = first.utterances[6].relpath  # shard 1 (items 4..7)
    victim = run["test_root"] / victim_rel
    st = victim.stat()
    wav, sr = sf.read(str(victim), dtype="int16")
    try:
        sf.write(str(victim), np.ascontiguousarray(wav[::-1]), sr, subtype="PCM_16")  # same size, other content
        os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))                        # and the same time
        lines = []
        changed = _test_set(run, tmp_path, log=lines.append)
        assert sorted(count_extractions) == sorted(os.path.basename(u.relpath) for u in first.utterances[4:8])
        assert [ln for ln in lines if "shard_00001.ark" in ln and "changed" in ln and victim.name in ln], lines
        got = [np.asarray(f) for f in changed.features]
        assert got[6].tobytes() != before[6].tobytes()
        assert all(got[i].tobytes() == before[i].tobytes() for i in range(16) if i != 6)
    finally:
        sf.write(str(victim), wav, sr, subtype="PCM_16")  # the module's other tests use the original audio


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_test_shard_is_named_in_one_line_and_extracted_again(run, tmp_path, count_extractions, damage):
    first = [np.asarray(f).tobytes() for f in _test_set(run, tmp_path).features]
    ark = _store_folder(tmp_path) / "shard_00002.ark"
    if damage == "flip":
        data = bytearray(ark.read_bytes())
        data[len(data) // 2] ^= 0x40
        ark.write_bytes(bytes(data))
    else:
        os.truncate(ark, ark.stat().st_size - 100)
    count_extractions.clear()
    lines = []
    ds = _test_set(run, tmp_path, log=lines.append)
    named = [ln for ln in lines if "shard_00002.ark" in ln]
    assert len(named) == 1 and "\n" not in named[0] and "extracting it again" in named[0], lines
    assert len(count_extractions) == SHARD
    assert [np.asarray(f).tobytes() for f in ds.features] == first


def test_a_test_shard_cut_short_while_embedding_is_one_line(run, tmp_path, capsys, monkeypatch):
    """After the start-up check passed it (``EER.py`` embeds in its own process: the error reaches the guard)."""
    _test_set(run, tmp_path)  # the store is complete
    real = dataset.SpkTestDataset.__init__

    def cut_after_check(self, *a, **k):
        real(self, *a, **k)
        os.truncate(self.features[0].path, 40)
    monkeypatch.setattr(dataset.SpkTestDataset, "__init__", cut_after_check)
    capsys.readouterr()
    assert EER.main(["--config", str(_config_file(run, tmp_path, True)), "--checkpoint", str(run["ckpt"]),
                     "--out", str(tmp_path / "eval")]) == 2
    err = capsys.readouterr().err
    errors = [ln for ln in err.replace("\r", "\n").splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "shard_00000.ark is cut short" in errors[0] and "EER.py" in errors[0], err
    assert "Traceback" not in err
    assert not (tmp_path / "eval").exists()


def test_a_shard_cut_short_under_a_dataloader_worker_is_one_line(run, tmp_path, capsys, monkeypatch):
    """train.py with ``train.num_workers: 1``: the worker's ShardReadError reaches the user as its own line,
    not as PyTorch's 'Caught ... in DataLoader worker process 0' and the worker's traceback."""
    cfg_file = _config_file(run, tmp_path, True)
    real = dataset.SpkTrainDataset.set_epoch

    def cut_before_epoch_2(self, epoch):
        real(self, epoch)
        if epoch == 2:  # after the start-up check and one epoch read from the store
            os.truncate(self.features[0].path, 40)
    monkeypatch.setattr(dataset.SpkTrainDataset, "set_epoch", cut_before_epoch_2)
    capsys.readouterr()
    rc = train.main(["--config", str(cfg_file), "--epochs", "2", "--n_folder", "workers", "--set", "train.num_workers=1"])
    err = capsys.readouterr().err
    errors = [ln for ln in err.replace("\r", "\n").splitlines() if ln.startswith("error:")]
    assert rc == 2 and len(errors) == 1 and errors[0].startswith("error: feature store shard "), err
    assert "shard_00000.ark is cut short" in errors[0] and "run train.py again" in errors[0]
    assert "Traceback" not in err and "Caught" not in err and "worker" not in errors[0], err


def test_shard_read_error_keeps_its_message_when_rebuilt_from_a_worker():
    msg = "feature store shard /x/shard_00003.ark is cut short (byte 9 of 99 needed); run train.py again"
    try:
        raise feature_store.ShardReadError(msg)
    except feature_store.ShardReadError:
        from torch._utils import ExceptionWrapper
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(feature_store.ShardReadError) as err:
        wrapped.reraise()
    assert str(err.value) == msg and isinstance(err.value, DataError)


def test_extract_gives_the_same_embeddings_from_the_store_and_reuses_it(run, tmp_path, count_extractions):
    manifest = open(run["over"]["test.test_manifest"], encoding="utf-8").read()
    rels = [ln.split()[1] for ln in manifest.splitlines() if ln.strip()][:6]
    lst = tmp_path / "list.txt"
    lst.write_text("\n".join(rels) + "\n", encoding="utf-8")
    out = {}
    for name, store in (("ram", False), ("disk", True), ("again", True)):
        count_extractions.clear()
        argv = ["--config", str(_config_file(run, tmp_path / ("ram" if name == "ram" else "disk"), store)),
                "--checkpoint", str(run["ckpt"]), "--list", str(lst), "--root", str(run["test_root"]),
                "--out", str(tmp_path / name / "emb.npy")] + (["--kaldi"] if name == "again" else [])
        assert extract.main(argv) == 0
        out[name] = np.load(tmp_path / name / "emb.npy")
        assert len(count_extractions) == (0 if name == "again" else 6), name
    assert out["disk"].tobytes() == out["ram"].tobytes() == out["again"].tobytes() and out["ram"].shape == (6, 16)
    assert not list((tmp_path / "ram" / "cache").glob("*"))  # features.store: false writes no feature files
    assert len(list(_store_folder(tmp_path / "disk").glob("shard_*.ark"))) == 2
    assert (tmp_path / "ram" / "emb_index.txt").read_text().split() == rels
    # --kaldi: the same vectors in Kaldi's xvector.ark/.scp, keyed by the list's entries
    ark = kaldi_data.read_xvectors(tmp_path / "again" / "xvector.scp")
    assert list(ark) == rels and np.stack(list(ark.values())).tobytes() == out["again"].tobytes()
    assert not (tmp_path / "disk" / "xvector.ark").exists()


def test_extract_kaldi_refuses_a_foreign_xvector_ark_before_any_work(run, tmp_path, capsys, count_extractions):
    lst = tmp_path / "list.txt"
    lst.write_text("a b.wav\na_b.wav\n", encoding="utf-8")
    argv = ["--config", str(_config_file(run, tmp_path, True)), "--checkpoint", str(run["ckpt"]), "--list", str(lst),
            "--out", str(tmp_path / "emb.npy"), "--kaldi"]
    assert extract.main(argv) == 2
    assert "both Kaldi key" in capsys.readouterr().err and count_extractions == []
    lst.write_text(f"{run['test_root'] / open(run['over']['test.test_manifest']).read().split()[1]}\n")
    (tmp_path / "xvector.ark").write_bytes(b"someone else's")
    assert extract.main(argv) == 2
    err = capsys.readouterr().err
    assert "xvector.ark" in err and len(err.strip().splitlines()) == 1 and count_extractions == []
    assert (tmp_path / "xvector.ark").read_bytes() == b"someone else's"


def test_store_off_keeps_the_arrays_in_memory(run, tmp_path):
    ds = dataset.SpkTestDataset(config.load_config(_config_file(run, tmp_path, False)), log=quiet)
    assert all(isinstance(f, np.ndarray) for f in ds.features) and len(ds) == 16
    assert not list((tmp_path / "cache").glob("store_*")) and list((tmp_path / "cache").glob("mfcc_*.npz"))


def test_memory_benchmark_test_lists_keep_the_trial_count_and_use_every_copy(tiny_corpus, tmp_path):
    """tools/bench/memory.py's EER.py side: a test list of 3x the utterances (hard links under x0/ x1/ x2/), its
    trials the 1x list's pairs spread over the copies, or (``same_count=False``) every pair in every copy."""
    from bench.memory import scaled_corpus, scaled_trials
    manifest = scaled_corpus(tiny_corpus.root, tiny_corpus.test_manifest, tmp_path, 3, "test")
    assert manifest.name == "test_3x.txt"
    utts = [ln.split()[1] for ln in manifest.read_text().splitlines()]
    assert len(utts) == 48 and all((tmp_path / u).is_file() for u in utts)
    one = [ln.split() for ln in tiny_corpus.trials.read_text().splitlines() if ln.strip()]
    same = [ln.split() for ln in scaled_trials(tiny_corpus.trials, tmp_path, 3).read_text().splitlines()]
    assert len(same) == len(one) == 120
    assert [label for *_, label in same] == [label for *_, label in one]
    assert all(a.split("/")[0] == b.split("/")[0] for a, b, _ in same)  # a pair within one copy
    assert {u for a, b, _ in same for u in (a, b)} == set(utts)          # every copy's utterances embedded
    every = scaled_trials(tiny_corpus.trials, tmp_path, 3, same_count=False).read_text().splitlines()
    assert len(every) == 360


def test_memory_benchmark_runs_each_scale_first_and_cached_and_takes_ratios_against_1x(tmp_path):
    """tools/bench/memory.py's loop shared by train.py's and EER.py's measurements: per scale a first and a cached
    run with the store (and in RAM where asked), the store's size on the first store run, the ratios over 1x."""
    from bench.memory import cache_folder, drop_caches, first_and_cached, rss_ratios
    peaks = {"1x_store_first": 100.0, "1x_store_cached": 80.0, "4x_store_first": 112.0, "4x_store_cached": 84.0,
             "1x_ram_first": 120.0, "1x_ram_cached": 90.0}
    calls, runs = [], {}

    def cache(factor, store):
        return cache_folder(tmp_path, "eer_", factor, store)

    def run_one(store, name):
        calls.append((store, name))
        cache(int(name.split("x")[0]), store).mkdir(exist_ok=True)
        (cache(int(name.split("x")[0]), store) / "shard.ark").write_bytes(b"\0" * 10)
        return {"eer_peak_rss_mb": peaks[name]}
    for factor in (1, 4):
        first_and_cached(runs, factor, factor == 1, cache, "EER.py ", run_one, log=lambda *_: None)
    assert calls == [(True, "1x_store_first"), (True, "1x_store_cached"), (False, "1x_ram_first"),
                     (False, "1x_ram_cached"), (True, "4x_store_first"), (True, "4x_store_cached")]
    assert runs["1x_store_first"]["store_bytes"] == 10 and "store_bytes" not in runs["1x_store_cached"]
    assert "store_bytes" not in runs["1x_ram_first"] and cache(4, True).name == "eer_cache_4x_store"
    assert rss_ratios(runs, (1, 4), "eer_peak_rss_mb", "eer_rss_") == {
        "eer_rss_1x_vs_1x_first": 1.0, "eer_rss_1x_vs_1x_cached": 1.0,
        "eer_rss_4x_vs_1x_first": 1.12, "eer_rss_4x_vs_1x_cached": 1.05}
    drop_caches(cache, 4)
    drop_caches(cache, 1)
    assert not cache(4, True).exists() and cache(1, True).is_dir() and cache(1, False).is_dir()
