"""Fault injection, input side (issue 18, items 14-19): whatever a config, a YAML file, an audio header,
a feature cache or a checkpoint claims, the program refuses it in one line naming the file (and key),
before allocating or computing anything, and worker processes never outlive a stopped extraction.

Each test breaks one thing on purpose and checks the message and that nothing heavy ran.
"""
from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from svlab import audio, checkpoint, config, feature_cache, features, manifests, models, process_pool
from svlab.errors import CheckpointError, ConfigError, DataError
from svlab.yaml_files import MAX_YAML_BYTES, load_yaml_text
from conftest import PROJECT, SMALL_MODEL, quiet

SR = 16000
PY = sys.executable


def _tone(seconds: float, sr: int = SR, seed: int = 0) -> np.ndarray:
    t = np.arange(int(round(seconds * sr))) / sr
    noise = 0.01 * np.random.default_rng(seed).standard_normal(t.size)
    return (0.4 * np.sin(2 * np.pi * (200 + 40 * seed) * t) + noise).astype(np.float32)


def _wavs(folder: Path, n: int, seconds: float = 0.3) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        out.append(folder / f"S{i % 8:02d}" / f"u{i:03d}.wav")
        out[-1].parent.mkdir(exist_ok=True)
        sf.write(str(out[-1]), _tone(seconds, seed=i), SR)
    return out


def _feat_cfg(tmp_path: Path, **extra) -> dict:
    return {**config.load_config(None, {"features.n_mfcc": 20})["features"],
            "cache_dir": str(tmp_path / "cache"), **extra}


def _one_line_error(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# =========================================================================== 14. demo manifests, real root
def test_real_root_with_the_demo_manifests_says_so_and_gives_the_command(tmp_path):
    corpus = tmp_path / "AISHELL" / "ALL"
    (corpus / "S0002").mkdir(parents=True)
    sf.write(str(corpus / "S0002" / "BAC009S0002W0122.wav"), _tone(0.3), SR)
    user = tmp_path / "my config.yaml"
    user.write_text(f"data:\n  root: '{corpus}'\ntest:\n  root: '{corpus}'\n", encoding="utf-8")
    cfg = config.load_config(user)   # only the roots changed: the manifests are still the shipped demo's
    with pytest.raises(DataError) as err:
        manifests.check_training_data(cfg)
    msg = str(err.value)
    assert "still lists the demo corpus" in msg and "data.root" in msg and "\n" not in msg
    assert msg.endswith(f"python tools/prepare_data.py --root {corpus} --write_config '{user}'")
    import dataset
    with pytest.raises(DataError) as err:
        dataset.SpkTestDataset(cfg, log=quiet)
    assert "test.root" in str(err.value) and "still lists the demo corpus" in str(err.value)
    assert f"--root {corpus} --write_config" in str(err.value)

    # the shipped config itself edited (no --config): the command writes config.yaml
    cfg = config.load_config(None, {"data.root": str(corpus)})
    with pytest.raises(DataError, match=r"--write_config$"):
        manifests.check_training_data(cfg)


def test_wrong_root_without_the_demo_manifests_keeps_the_plain_question(tmp_path):
    manifest = tmp_path / "train.txt"
    manifest.write_text("A A/one.wav\nB B/two.wav\n", encoding="utf-8")
    empty = tmp_path / "empty"
    empty.mkdir()
    for root, extra in ((tmp_path, ""), (empty, "(the folder holds no files)")):
        cfg = config.load_config(None, {"data.root": str(root), "data.train_manifest": str(manifest)})
        with pytest.raises(DataError) as err:
            manifests.check_training_data(cfg)
        assert "is 'data.root' the right folder?" in str(err.value) and extra in str(err.value)
        assert "demo corpus" not in str(err.value)


# =========================================================================== 15. double quotes, fix texts
@pytest.mark.parametrize("value, why", [
    (r'"F:\DataSet\Aishell\ALL"', "unknown escape character 'D'"),
    (r'"C:\Users\lab\corpus"', "8 hexadecimal"),
    (r'"data\new_corpus"', "line break"),          # valid escapes: \n became a newline, silently
    (r'"data\table"', "tab"),
])
def test_backslashes_in_double_quotes_are_explained_with_the_corrected_line(tmp_path, value, why):
    user = tmp_path / "win.yaml"
    user.write_text(f"train:\n  epochs: 2\ndata:\n  root: {value}\n", encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        config.load_config(user)
    msg = str(err.value)
    assert msg.startswith(f"{user}:4:") and why in msg and "single quotes" in msg and "\n" not in msg
    assert msg.endswith("root: '" + value.strip('"') + "'")
    user.write_text("data:\n  root: 'data\\new_corpus'\n", encoding="utf-8")  # the corrected line reads as written
    assert config.load_config(user)["data"]["root"] == "data\\new_corpus"


def test_audio_problem_fix_names_what_the_caller_can_change(tmp_path, tiny_corpus):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF not audio at all")
    feat = _feat_cfg(tmp_path)
    with pytest.raises(DataError) as err:   # tools/verify.py and tools/extract.py (svlab.embedding.embed_files)
        feature_cache.load_features([bad], feat, log=quiet)
    assert "bad.wav" in str(err.value) and str(err.value).endswith(feature_cache.AUDIO_FIX)
    assert "data.bad_audio" not in str(err.value) and "manifest" not in str(err.value)
    model = models.build_model(config.load_config(None, SMALL_MODEL)["model"], 20)
    from svlab.embedding import embed_files
    with pytest.raises(DataError, match=re.escape(feature_cache.AUDIO_FIX)):
        embed_files(model, [bad], feat, log=quiet)

    import dataset
    test_manifest = tmp_path / "test_set.txt"
    rel = os.path.relpath(bad, tiny_corpus.root)
    test_manifest.write_text(f"S0009 {rel}\n", encoding="utf-8")
    cfg = config.load_config(None, {"test.root": str(tiny_corpus.root), "test.test_manifest": str(test_manifest),
                                    "features.cache_dir": "", **SMALL_MODEL})
    with pytest.raises(DataError) as err:
        dataset.SpkTestDataset(cfg, log=quiet)
    assert str(err.value).endswith(feature_cache.TEST_AUDIO_FIX) and "data.bad_audio" not in str(err.value)
    cfg = config.load_config(None, {"data.root": str(tiny_corpus.root), "data.train_manifest": str(test_manifest),
                                    "features.cache_dir": "", **SMALL_MODEL})
    with pytest.raises(DataError, match="data.bad_audio: skip"):
        feature_cache.load_training_items(cfg, log=quiet)


# =========================================================================== 16. damaged feature caches
def _cached(tmp_path: Path):
    paths = _wavs(tmp_path / "audio", 4)
    feat = _feat_cfg(tmp_path)
    feats, kept, _ = feature_cache.load_features(paths, feat, log=quiet)
    [cache] = list((tmp_path / "cache").glob("mfcc_*.npz"))
    return paths, feat, feats, cache


def _rewrite_member(cache: Path, name: str, payload: bytes) -> None:
    with zipfile.ZipFile(cache) as zf:
        members = {i.filename: zf.read(i) for i in zf.infolist()}
    members[name] = payload
    with zipfile.ZipFile(cache, "w") as zf:
        for member, data in members.items():
            zf.writestr(member, data)


def _npy(array: np.ndarray, shape=None) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(array.dtype),
                                               "fortran_order": False, "shape": shape or array.shape})
    return buf.getvalue() + np.ascontiguousarray(array).tobytes()


@pytest.mark.parametrize("damage", ["truncated", "bit_flip", "flip_behind_the_zip_crc", "header_claims_80_tb",
                                    "older_version", "not_a_zip"])
def test_damaged_feature_cache_is_named_deleted_and_rebuilt(tmp_path, monkeypatch, damage):
    paths, feat, feats, cache = _cached(tmp_path)
    raw = cache.read_bytes()
    with zipfile.ZipFile(cache) as zf:
        data = np.load(io.BytesIO(zf.read("data.npy")))
        start = zf.getinfo("data.npy").header_offset + 30 + len("data.npy") + 200  # inside the array
    if damage == "truncated":
        cache.write_bytes(raw[: len(raw) // 2])
    elif damage == "bit_flip":
        cache.write_bytes(raw[:start] + bytes([raw[start] ^ 0x10]) + raw[start + 1:])
    elif damage == "flip_behind_the_zip_crc":   # the member is rewritten whole: its zip CRC-32 is right again
        changed = data.copy()
        changed.reshape(-1).view(np.uint32)[7] ^= 1 << 20
        _rewrite_member(cache, "data.npy", _npy(changed))
    elif damage == "header_claims_80_tb":
        _rewrite_member(cache, "data.npy", _npy(data, shape=(data.shape[0], 10**12)))
    elif damage == "older_version":            # the same arrays, written before caches had a checksum
        with zipfile.ZipFile(cache) as zf:
            members = {i.filename: zf.read(i) for i in zf.infolist() if i.filename != "checksum.npy"}
        with zipfile.ZipFile(cache, "w") as zf:
            for member, payload in members.items():
                zf.writestr(member, payload)
    else:
        cache.write_bytes(b"\0" * len(raw))
    lines = []
    again, kept, _ = feature_cache.load_features(paths, feat, log=lines.append)
    notes = [ln for ln in lines if "feature cache" in ln]
    assert len(notes) == 1 and str(cache) in notes[0] and "deleted, computing it again" in notes[0], lines
    assert "\n" not in notes[0]
    assert kept == [0, 1, 2, 3] and all(np.array_equal(a, b) for a, b in zip(again, feats))

    def no_extraction(*a, **k):
        raise AssertionError("the rebuilt cache was not used")
    monkeypatch.setattr(feature_cache, "_extract_all", no_extraction)
    lines.clear()
    third, _, _ = feature_cache.load_features(paths, feat, log=lines.append)   # rebuilt, readable again
    assert not lines and all(np.array_equal(a, b) for a, b in zip(third, feats))


def test_damaged_augmented_copy_cache_is_rebuilt(tmp_path):
    paths = _wavs(tmp_path / "audio", 4)
    feat = _feat_cfg(tmp_path, store=False)  # the .npz cache (the store's damage: tests/test_feature_store.py)
    aug = {"copies": 1, "noise_types": ["white"], "reverb_prob": 0.0}
    first = feature_cache.load_training_features(paths, ["A", "A", "B", "B"], feat, aug, log=quiet, workers=1)
    raw = first.cache_file.read_bytes()
    first.cache_file.write_bytes(raw[: len(raw) - 100])
    lines = []
    second = feature_cache.load_training_features(paths, ["A", "A", "B", "B"], feat, aug, log=lines.append,
                                                  workers=1)
    assert any(str(first.cache_file) in ln and "unusable" in ln for ln in lines), lines
    assert all(np.array_equal(a, b) for va, vb in zip(first.versions, second.versions) for a, b in zip(va, vb))
    assert zipfile.is_zipfile(second.cache_file)


# =========================================================================== 18. bounded memory
def _wav_header(sr: int, channels: int, frames: int) -> bytes:
    block = channels * 2
    data = np.random.default_rng(0).integers(-3000, 3000, frames * channels).astype("<i2").tobytes()
    return (b"RIFF" + (36 + len(data)).to_bytes(4, "little") + b"WAVEfmt " + (16).to_bytes(4, "little")
            + (1).to_bytes(2, "little") + channels.to_bytes(2, "little") + sr.to_bytes(4, "little")
            + ((sr * block) & 0xFFFFFFFF).to_bytes(4, "little") + block.to_bytes(2, "little")
            + (16).to_bytes(2, "little") + b"data" + len(data).to_bytes(4, "little") + data)


def test_audio_headers_cannot_make_the_reader_fill_the_memory(tmp_path, monkeypatch):
    crafted = {"one_hertz.wav": (_wav_header(1, 1, 2000), "2000 s long"),
               "many_channels.wav": (_wav_header(SR, 200, 10), "200 channels")}
    for name, (payload, why) in crafted.items():
        (tmp_path / name).write_bytes(payload)
    long_flac = tmp_path / "hour.flac"     # 1 hour of near silence: a few kB on disk, 230 MB decoded
    sf.write(str(long_flac), np.zeros(3600 * 8000, dtype=np.int16), 8000, subtype="PCM_16")
    assert long_flac.stat().st_size < 3_000_000

    def no_decoding(*a, **k):
        raise AssertionError("decoded before the size was checked")
    monkeypatch.setattr(sf.SoundFile, "read", no_decoding)
    import librosa
    monkeypatch.setattr(librosa, "resample", no_decoding)
    for name, (_, why) in crafted.items():
        with pytest.raises(DataError, match=re.escape(why)) as err:
            audio.read_audio(tmp_path / name, SR, max_seconds=600)
        assert str(err.value).startswith(str(tmp_path / name))
    with pytest.raises(DataError, match=r"3600 s long.*features\.max_seconds \(600 s\)"):
        audio.read_audio(long_flac, SR, max_seconds=600)
    # through the feature cache, with the configured limit, one line per file
    monkeypatch.undo()
    feat = _feat_cfg(tmp_path, max_seconds=600, cache_dir="")
    good = _wavs(tmp_path / "good", 1)[0]
    _, kept, problems = feature_cache.load_features([long_flac, good, tmp_path / "one_hertz.wav"], feat,
                                                    policy="skip", log=quiet, workers=1)
    assert kept == [1] and len(problems) == 2 and all("\n" not in p and "max_seconds" in p for p in problems)


def test_a_longer_limit_reads_the_long_file(tmp_path):
    path = tmp_path / "long.wav"
    sf.write(str(path), _tone(700, sr=1000), 1000)
    with pytest.raises(DataError, match="700 s long"):
        audio.read_audio(path, 8000, max_seconds=600)
    assert audio.read_audio(path, 8000, max_seconds=800)[0].size == 700 * 8000
    cfg = config.load_config(None, {"features.max_seconds": 800})
    assert cfg["features"]["max_seconds"] == 800
    with pytest.raises(ConfigError, match=r"features\.max_seconds.*at most 7200"):
        config.load_config(None, {"features.max_seconds": 10**6})


def test_absurd_model_sizes_are_refused_before_allocation(tmp_path):
    big = {"model.channels": 8192, "model.stat_channels": 16384, "model.embedding_size": 8192}
    cfg = config.load_config(None, big)   # each width is under its ceiling; together they are not
    resource = pytest.importorskip("resource")  # POSIX: peak memory of this process
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=r"739,991,552 parameters.*at most 250,000,000"):
        models.build_model(cfg["model"], cfg["features"]["n_mfcc"])
    assert time.perf_counter() - t0 < 5
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 500_000  # kB: nothing allocated
    with pytest.raises(ConfigError, match=r"model\.channels.*at most 8192"):
        config.load_config(None, {"model.channels": 10**9})

    # a checkpoint declares the network: the same check, as a CheckpointError
    small = config.load_config(None, SMALL_MODEL)
    state = {"config": config.public_config(small), "model_state": {}}
    state["config"]["model"]["channels"] = 10**12
    with pytest.raises(CheckpointError, match=r"model\.channels is 1000000000000"):
        models.model_from_checkpoint(state)
    state["config"]["model"]["channels"] = 32
    state["config"]["features"]["n_mfcc"] = 5 * 10**6
    with pytest.raises(CheckpointError, match="parameters"):
        models.model_from_checkpoint(state)


def _laughs(levels: int = 9) -> str:
    lines = ["a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    for i in range(1, levels):
        prev = chr(ord("a") + i - 1)
        lines.append(f"{chr(ord('a') + i)}: &{chr(ord('a') + i)} [{', '.join([f'*{prev}'] * 10)}]")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("text, why", [
    ("augment:\n  noise_types: &x [white]\n" + "".join(f"  n{i}: *x\n" for i in range(150)), "alias references"),
    ("x: &l [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + "".join(f"x{i}: &l{i} [*{'l' if i == 0 else f'l{i - 1}'}, "
                                                        f"*{'l' if i == 0 else f'l{i - 1}'}]\n" for i in range(20)),
     "more than 100000 values"),
    ("train: &t\n  lr: [*t]\n", "contains it"),
    ("train:\n  lr: " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
    ("train:\n  epochs: 1" + "0" * 5000 + "\n", "too many digits"),
])
def test_yaml_that_expands_without_bound_is_refused_in_one_line(tmp_path, text, why):
    user = tmp_path / "bomb.yaml"
    user.write_text(text, encoding="utf-8")
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        config.load_config(user)
    assert time.perf_counter() - t0 < 5
    assert str(err.value).startswith(str(user)) and why in str(err.value) and "\n" not in str(err.value)


def test_every_yaml_reader_has_the_limits(tmp_path):
    with pytest.raises(ConfigError, match="expands to more than"):
        load_yaml_text(_laughs(), "x.yaml")
    with pytest.raises(ConfigError, match="alias references"):  # --set values are YAML too
        config.parse_override("augment.noise_types=[" + ", ".join(["&a x"] + ["*a"] * 150) + "]")
    import experiments
    table = tmp_path / "table.yaml"
    table.write_text(_laughs(), encoding="utf-8")
    with pytest.raises(ConfigError, match="expands to more than"):
        experiments.read_table(table)
    from svlab import corpora_config
    target = tmp_path / "user.yaml"
    target.write_text(_laughs(), encoding="utf-8")
    with pytest.raises(ConfigError, match="expands to more than"):
        corpora_config._refuse_other_files(target, target.read_text(encoding="utf-8"))
    big = tmp_path / "big.yaml"
    big.write_bytes(b"# " + b"x" * MAX_YAML_BYTES + b"\n")
    with pytest.raises(ConfigError, match="too long"):
        config.load_config(big)


def test_error_messages_show_only_an_excerpt_of_a_bad_value(tmp_path):
    user = tmp_path / "long.yaml"
    for text in (f"train:\n  epochs: '{'9' * 100_000}x'\n", f"train:\n  {'e' * 100_000}: 1\n",
                 f"model:\n  name: '{'x' * 100_000}'\n", f"augment:\n  snr_db: [{', '.join(['1'] * 30_000)}]\n",
                 "data:\n  root: '\x1b[2J\x1b[32mACCEPT'\n"):
        user.write_text(text, encoding="utf-8")
        with pytest.raises(ConfigError) as err:
            config.load_config(user)
        assert len(str(err.value)) < 600 and "\x1b" not in str(err.value), str(err.value)[:300]


# =========================================================================== 19. every value validated
@pytest.mark.parametrize("yaml_text, key", [
    ("train:\n  lr: .nan\n", "train.lr"),
    ("train:\n  lr: .inf\n", "train.lr"),
    ("train:\n  lr: 1e999\n", "train.lr"),
    ("train:\n  lr: -0.001\n", "train.lr"),
    ("train:\n  weight_decay: -1e-5\n", "train.weight_decay"),
    ("train:\n  lr:\n", "train.lr"),
    ("train:\n  batchsize: 0\n", "train.batchsize"),
    ("train:\n  n_folder: ''\n", "train.n_folder"),
    ("train:\n  n_folder:\n", "train.n_folder"),
    ("train:\n  gamma: 2.0\n", "train.gamma"),
    ("train:\n  seed: -1\n", "train.seed"),
    ("features:\n  fmin: 8000\n  fmax: 4000\n", "features.fmin"),
    ("features:\n  sample_rate: 8000\n", "features.fmax"),         # 7600 Hz is above 8 kHz's Nyquist
    ("features:\n  win_length_ms: 0\n", "features.win_length_ms"),
    ("features:\n  hop_length_ms: 0\n", "features.hop_length_ms"),
    ("features:\n  n_fft: 256\n", "features.win_length_ms"),        # 25 ms = 400 samples > 256
    ("features:\n  n_fft: 0\n", "features.n_fft"),
    ("features:\n  n_mels: 100000\n  n_mfcc: 40\n", "features.n_mels"),
    ("test:\n  calibration_fraction: 1.5\n", "test.calibration_fraction"),
    ("augment:\n  noise_prob: -0.1\n", "augment.noise_prob"),
    ("augment:\n  snr_db: [5, .inf]\n", "augment.snr_db"),
    ("loss:\n  scale: 0\n", "loss.scale"),
])
def test_config_values_are_checked_with_key_and_file(tmp_path, yaml_text, key):
    user = tmp_path / "values.yaml"
    user.write_text(yaml_text, encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        config.load_config(user)
    msg = str(err.value)
    assert msg.startswith(f"{user}: key '{key}'") and "\n" not in msg, msg


def test_config_that_is_a_folder_or_not_utf8_is_one_line_before_any_work(tmp_path, monkeypatch, capsys):
    import train

    def no_work(*a, **k):
        raise AssertionError("work started before the config was read")
    monkeypatch.setattr(feature_cache, "_extract_all", no_work)
    latin = tmp_path / "latin1.yaml"
    latin.write_bytes("data:\n  root: 'F:/Daten/Übung'\n".encode("latin-1"))
    for path, why in ((tmp_path, "is a folder"), (latin, "not UTF-8")):
        assert train.main(["--config", str(path), "--gpu", "-1"]) == 2
        line = _one_line_error(capsys.readouterr().err)
        assert why in line and str(path) in line


def test_impossible_feature_settings_are_named_once_not_per_file(tmp_path, monkeypatch):
    paths = _wavs(tmp_path / "audio", 3)
    calls = []
    monkeypatch.setattr(feature_cache, "_extract_one", lambda job: calls.append(job))
    # settings from a checkpoint skip load_config's checks: the feature cache checks them itself
    for bad, key in (({"n_fft": 0}, "features.n_fft"), ({"hop_length_ms": -10}, "features.hop_length_ms"),
                     ({"fmin": 9000}, "features.fmin"), ({"sample_rate": 10**9}, "features.sample_rate")):
        with pytest.raises(ConfigError) as err:
            feature_cache.load_features(paths, _feat_cfg(tmp_path, cache_dir="", **bad), log=quiet)
        assert key in str(err.value) and "wav" not in str(err.value)

    def broken(*a, **k):
        raise ValueError("librosa says no")
    monkeypatch.setattr(features, "mfcc", broken)   # a setting the front end itself rejects
    with pytest.raises(ConfigError, match=r"feature settings \(sample_rate=16000.*cannot make MFCCs.*librosa says no"):
        feature_cache.load_features(paths, _feat_cfg(tmp_path, cache_dir=""), log=quiet)
    assert calls == []
    monkeypatch.undo()
    with pytest.raises(ConfigError, match=r"all 3 audio files are refused because of features\.min_seconds"):
        feature_cache.load_features(paths, _feat_cfg(tmp_path, cache_dir="", min_seconds=5.0), log=quiet)


# =========================================================================== 17. workers never outlive a stop
def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status  # a zombie waiting to be reaped has stopped


SLOW_JOB = """
import os, time
MARKS = {marks!r}

def mark():
    open(os.path.join(MARKS, str(os.getpid())), "w").close()

def slow(job):
    mark()
    time.sleep(120)
    return None, "never", (0, 0)
"""


# A job started in the background by a non-interactive shell (as CI may be) inherits SIGINT ignored, and
# Python then leaves it ignored: the child gets Ctrl-C back, as in a terminal.
# The child starts with default Ctrl-C and SIGHUP handling whatever the suite was started with: under nohup
# SIGHUP arrives ignored, and svlab.process_pool rightly leaves an ignored SIGHUP ignored.
RESTORE_CTRL_C = ("import signal\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n"
                  "signal.signal(signal.SIGHUP, signal.SIG_DFL)\n")


def _start(tmp_path: Path, body: str) -> tuple[subprocess.Popen, Path]:
    marks = tmp_path / "marks"
    marks.mkdir()
    (tmp_path / "slowjob.py").write_text(SLOW_JOB.format(marks=str(marks)), encoding="utf-8")
    script = tmp_path / "run.py"
    head = (f"import os, sys, time\nsys.path[:0] = [{str(PROJECT)!r}, {str(tmp_path)!r}]\n"
            "from slowjob import mark, slow\n" + RESTORE_CTRL_C)
    script.write_text(head + textwrap.dedent(body), encoding="utf-8")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.Popen([PY, str(script)], cwd=PROJECT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while len(list(marks.iterdir())) < 2:
        if proc.poll() is not None or time.monotonic() > deadline:
            out, err = proc.communicate(timeout=10) if proc.poll() is not None else ("", "")
            proc.kill()
            pytest.fail(f"the workers never started: {out}\n{err}")
        time.sleep(0.1)
    return proc, marks


def _workers_gone(marks: Path, within: float = 5.0) -> list[int]:
    pids = [int(p.name) for p in marks.iterdir()]
    deadline = time.monotonic() + within
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [p for p in pids if _alive(p)]
    for p in left:
        os.kill(p, signal.SIGKILL)
    return left


def _train_body(tmp_path: Path, command: str) -> str:
    paths = _wavs(tmp_path / "corpus", 64)
    manifest = tmp_path / "list.txt"
    manifest.write_text("".join(f"{p.parent.name} {p.parent.name}/{p.name}\n" for p in paths), encoding="utf-8")
    trials = tmp_path / "trials.txt"
    trials.write_text("".join(f"{paths[i].parent.name}/{paths[i].name} {paths[i + 1].parent.name}/"
                              f"{paths[i + 1].name} {int(i % 8 == 7)}\n" for i in range(63)), encoding="utf-8")
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(f"data:\n  root: '{tmp_path / 'corpus'}'\n  train_manifest: '{manifest}'\n"
                        f"test:\n  root: '{tmp_path / 'corpus'}'\n  test_manifest: '{manifest}'\n  trials: '{trials}'\n"
                        f"features:\n  cache_dir: ''\n  n_mfcc: 20\ntrain:\n  save_dir: '{tmp_path / 'runs'}'\n"
                        f"model:\n  channels: 32\n  embedding_size: 16\n", encoding="utf-8")
    if command == "EER.py":
        cfg = config.load_config(cfg_path)
        ckpt = tmp_path / "model.pth"
        torch.manual_seed(0)
        checkpoint.save_checkpoint({"format": checkpoint.FORMAT, "epoch": 1, "config": config.public_config(cfg),
                                    "model_state": models.build_model(cfg["model"], 20).state_dict(),
                                    "speakers": ["S00", "S01"], "history": [], "tag": "xvector_gap_softmax",
                                    "features": features.feature_signature(cfg["features"])}, ckpt)
        argv = ["EER.py", "--config", str(cfg_path), "--checkpoint", str(ckpt), "--gpu", "-1",
                "--out", str(tmp_path / "eval")]
    else:
        argv = ["train.py", "--config", str(cfg_path), "--gpu", "-1"]
    return f"""
        import runpy
        from svlab import feature_cache
        feature_cache._extract_one = slow
        sys.argv = {argv!r}
        runpy.run_path({command!r}, run_name="__main__")
    """


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("command, sig", [("train.py", signal.SIGTERM), ("train.py", signal.SIGINT),
                                          ("EER.py", signal.SIGTERM)])
def test_stopping_a_command_during_extraction_stops_its_workers(tmp_path, command, sig):
    proc, marks = _start(tmp_path, _train_body(tmp_path, command))
    proc.send_signal(sig)
    try:
        out, err = proc.communicate(timeout=180)  # generous: a loaded CI machine; the workers' end is timed below
    finally:
        proc.kill()
    assert not _workers_gone(marks), "worker processes outlived the stopped command"
    # the command's own handler (svlab.guard: Ctrl-C and SIGTERM alike, exit 130) or, where there is none,
    # svlab.process_pool's (exit 128 + 15): either way one line, no traceback
    assert proc.returncode in (130, 128 + signal.SIGTERM) and "Traceback" not in err, (proc.returncode, err)
    assert "interrupted" in err or "SIGTERM received: feature extraction stopped" in err, err


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; prctl")
@pytest.mark.parametrize("how", ["sigkill", "error", "sighup"])
def test_workers_stop_on_every_other_exit_path(tmp_path, how):
    # only the "error" case fails a job; under a signal every job waits, so the signal cannot lose a race
    body = """
        from svlab import process_pool
        def job(i):
            if i == 0 and FAILS:
                mark()
                time.sleep(3.0)
                raise RuntimeError("job 0 failed")
            return slow(i)
        t0 = time.monotonic()
        try:
            process_pool.run_jobs(job, list(range(64)), 2, "test")
        except Exception as e:
            print(f"{type(e).__name__}: {e} after {time.monotonic() - t0:.0f} s", flush=True)
    """.replace("FAILS", repr(how == "error"))
    proc, marks = _start(tmp_path, body)
    if how != "error":
        proc.send_signal({"sigkill": signal.SIGKILL, "sighup": signal.SIGHUP}[how])
    out, err = proc.communicate(timeout=180)
    assert not _workers_gone(marks), "worker processes outlived the main process"
    if how == "error":
        assert proc.returncode == 0 and "DataError: feature extraction failed (RuntimeError: job 0 failed)" in out
        assert int(re.search(r"after (\d+) s", out).group(1)) < 60, out   # not after the other jobs' 120 s
    elif how == "sighup":
        assert proc.returncode == 128 + signal.SIGHUP and "SIGHUP received" in err


def test_the_pool_still_gives_the_same_results(tmp_path):
    paths = _wavs(tmp_path / "audio", 64, seconds=0.2)
    feat = _feat_cfg(tmp_path, cache_dir="")
    one, _ = feature_cache.extract_features(paths, feat, workers=1)
    pool, _ = feature_cache.extract_features(paths, feat, workers=2)
    assert all(np.array_equal(a, b) for a, b in zip(one, pool))
    assert process_pool.run_jobs(abs, list(range(-70, 0)), 2, "abs") == list(range(70, 0, -1))
