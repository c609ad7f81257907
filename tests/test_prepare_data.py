"""tools/prepare_data.py and svlab.corpora*: layout detection, speaker choice, manifests,
trials, archives and config editing.

Fixture corpora are tiny (0.05 s of noise per file) and live in tmp_path; the shared real-speech data
(../shared/data) is only read, and those tests skip when it is absent.
"""
from __future__ import annotations

import io
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import yaml

import prepare_data
from svlab import config, corpora, corpora_config, corpora_split
from svlab.corpora import TEST_NAME, TRAIN_NAME, TRIALS_NAME
from svlab.errors import PrepareError
from svlab.manifests import read_manifest, read_trials

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SR = 16000


def write_audio(path: Path, seconds: float = 0.05, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    noise = np.random.default_rng(seed).uniform(-0.3, 0.3, int(SR * seconds)).astype(np.float32)
    sf.write(str(path), noise, SR, format="FLAC" if path.suffix == ".flac" else "WAV")


def aishell_name(spk: str, n: int) -> str:
    return f"BAC009{spk}W{121 + n:04d}.wav"


def make_release(base: Path, train=("S0002", "S0003", "S0004", "S0005", "S0006", "S0007"),
                 dev=("S0724", "S0725"), test=("S0764", "S0765", "S0766"), utts: int = 4) -> Path:
    """``base/data_aishell/wav/{train,dev,test}/SXXXX/*.wav`` plus a transcript, like AISHELL-1."""
    wav = base / "data_aishell" / "wav"
    for split, speakers in (("train", train), ("dev", dev), ("test", test)):
        for spk in speakers:
            for n in range(utts):
                write_audio(wav / split / spk / aishell_name(spk, n), seed=n)
    transcript = base / "data_aishell" / "transcript" / "aishell_transcript_v0.8.txt"
    transcript.parent.mkdir(parents=True)
    transcript.write_text("BAC009S0002W0121 而 对 楼市 成交 抑制 作用 最 大 的 限 购\n", encoding="utf-8")
    return base


def make_speaker_archive(wav_dir: Path, spk: str, split: str, utts: int = 4) -> Path:
    """``wav_dir/SXXXX.tar.gz`` holding ``<split>/SXXXX/BAC009SXXXXW....wav`` (AISHELL-1's shipped archives)."""
    wav_dir.mkdir(parents=True, exist_ok=True)
    archive = wav_dir / f"{spk}.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        for n in range(utts):
            buf = io.BytesIO()
            sf.write(buf, np.random.default_rng(n).uniform(-0.3, 0.3, 800).astype(np.float32), SR, format="WAV")
            info = tarfile.TarInfo(f"{split}/{spk}/{aishell_name(spk, n)}")
            info.size = buf.tell()
            buf.seek(0)
            tf.addfile(info, buf)
    return archive


def make_speaker_folders(root: Path, speakers, utts: int = 4) -> Path:
    for spk in speakers:
        for n in range(utts):
            write_audio(root / spk / aishell_name(spk, n), seed=n)
    return root


def make_generic(root: Path, counts: dict[str, int]) -> Path:
    """``root/<speaker>/<session>/*.flac``, utterances spread over two session folders."""
    for spk, count in counts.items():
        for n in range(count):
            write_audio(root / spk / f"session{n % 2}" / f"{spk}-{n:03d}.flac", seed=n)
    return root


def run(root, out, log=None, **kwargs) -> dict:
    lines = [] if log is None else log
    return corpora_split.prepare(root, out, log=lines.append, **kwargs)


def read_outputs(out: Path):
    return (read_manifest(out / TRAIN_NAME), read_manifest(out / TEST_NAME), read_trials(out / TRIALS_NAME))


def check_outputs(root: Path, out: Path) -> tuple[dict, dict]:
    """Every invariant of the three files; returns (train, test) as {speaker: [relpath]}."""
    train, test, trials = read_outputs(out)
    for utt in train + test:
        assert "\\" not in utt.relpath and not Path(utt.relpath).is_absolute()
        assert (root / utt.relpath).is_file(), utt.relpath
    train_spk = {u.speaker for u in train}
    test_spk = {u.speaker for u in test}
    assert not train_spk & test_spk
    speaker_of = {u.relpath: u.speaker for u in test}
    seen = set()
    for t in trials:
        assert t.enroll in speaker_of and t.test in speaker_of and t.enroll != t.test
        assert t.label == int(speaker_of[t.enroll] == speaker_of[t.test])
        key = frozenset((t.enroll, t.test))
        assert key not in seen
        seen.add(key)
    group = lambda utts: {s: [u.relpath for u in utts if u.speaker == s] for s in {u.speaker for u in utts}}  # noqa: E731
    return group(train), group(test)


# --------------------------------------------------------------------------- AISHELL-1 release layout
@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    return make_release(tmp_path_factory.mktemp("release"))


@pytest.mark.parametrize("sub", ["", "data_aishell", "data_aishell/wav"])
def test_release_layout_from_any_of_its_roots(release, tmp_path, sub):
    root = release / sub if sub else release
    layout = corpora.detect_layout(root)
    assert layout.kind == "aishell1-release"
    assert len(layout.speakers) == 11 and layout.n_utterances == 44
    assert layout.splits["S0764"] == "test" and layout.splits["S0724"] == "dev" and layout.splits["S0002"] == "train"
    assert corpora.collect(root) == layout.speakers
    summary = run(root, tmp_path, train_speakers=4, utts_per_speaker=3, test_speakers=3, test_utts_per_speaker=2)
    train, test = check_outputs(root, tmp_path)
    assert sorted(test) == ["S0764", "S0765", "S0766"]                 # the official test speakers
    assert set(train) <= {"S0002", "S0003", "S0004", "S0005", "S0006", "S0007"} and len(train) == 4
    assert all(len(v) == 3 for v in train.values()) and all(len(v) == 2 for v in test.values())
    assert summary["target_trials"] == 3 and summary["nontarget_trials"] == 12     # 6 utts: C(6,2)=15
    prefix = {"": "data_aishell/wav/", "data_aishell": "wav/", "data_aishell/wav": ""}[sub]
    assert all(p.startswith(prefix + "train/") for v in train.values() for p in v)


def test_release_fills_from_dev_when_a_split_runs_short(release, tmp_path):
    summary = run(release, tmp_path, train_speakers=7, utts_per_speaker=2, test_speakers=4, test_utts_per_speaker=2)
    train, test = check_outputs(release, tmp_path)
    assert {"S0764", "S0765", "S0766"} < set(test) and len(test) == 4
    extra_test = (set(test) - {"S0764", "S0765", "S0766"}).pop()
    assert extra_test in {"S0724", "S0725"}                            # dev before train
    assert len(train) == 7 and set(train) >= {"S0002", "S0003", "S0004", "S0005", "S0006", "S0007"}
    assert summary["train_hours"] > 0 and summary["test_hours"] > 0


def test_all_utterances_with_zero(release, tmp_path):
    summary = run(release, tmp_path, train_speakers=6, utts_per_speaker=0, test_speakers=3, test_utts_per_speaker=0)
    train, test = check_outputs(release, tmp_path)
    assert summary["train_utterances"] == 24 and all(len(v) == 4 for v in train.values())
    assert summary["trials"] == 12 * 11 // 2


# --------------------------------------------------------------------------- archives (AISHELL-1 as downloaded)
def make_archive_corpus(base: Path) -> Path:
    wav = base / "data_aishell" / "wav"
    for spk in ("S0002", "S0003", "S0004"):
        make_speaker_archive(wav, spk, "train")
    for spk in ("S0764", "S0765"):
        make_speaker_archive(wav, spk, "test")
    return base


def test_archives_need_extract(tmp_path, capsys):
    root = make_archive_corpus(tmp_path / "corpus")
    layout = corpora.detect_layout(root)
    assert layout.kind == "aishell1-archives" and len(layout.pending_archives) == 5
    out = tmp_path / "out"
    rc = prepare_data.main(["--root", str(root), "--out", str(out), "--train_speakers", "2", "--test_speakers", "2"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "--extract" in err and len(err.splitlines()) == 1
    assert not out.exists() and not (root / "data_aishell" / "wav" / "train").exists()


def test_archives_with_extract(tmp_path):
    root = make_archive_corpus(tmp_path / "corpus")
    out = tmp_path / "out"
    dry = run(root, out, extract=True, dry_run=True, train_speakers=2, test_speakers=2, utts_per_speaker=2,
              test_utts_per_speaker=2)
    assert dry["dry_run"] and not out.exists() and not (root / "data_aishell" / "wav" / "train").exists()
    summary = run(root, out, extract=True, train_speakers=3, test_speakers=2, utts_per_speaker=2,
                  test_utts_per_speaker=3)
    assert summary["layout"] == "aishell1-release" and len(summary["extracted"]) == 5
    assert (root / "data_aishell/wav/train/S0002" / aishell_name("S0002", 0)).is_file()
    assert (root / "data_aishell/wav/S0002.tar.gz").is_file()               # archives are kept
    train, test = check_outputs(root, out)
    assert sorted(test) == ["S0764", "S0765"] and sorted(train) == ["S0002", "S0003", "S0004"]
    hidden = [p.name for p in (root / "data_aishell" / "wav").iterdir() if p.name.startswith(".")]
    assert hidden == [corpora.EXTRACTED_RECORD]                              # the record, no temp left
    assert len(list((root / "data_aishell" / "wav" / corpora.EXTRACTED_RECORD).iterdir())) == 5
    again = run(root, tmp_path / "out2", extract=True, train_speakers=3, test_speakers=2, utts_per_speaker=2,
                test_utts_per_speaker=3)
    assert again["extracted"] == []                                         # nothing left to unpack


def test_openslr_download_unpacks_in_two_rounds(tmp_path):
    """OpenSLR's data_aishell.tgz holds data_aishell/wav/SXXXX.tar.gz: both levels are unpacked."""
    staging = make_archive_corpus(tmp_path / "staging")
    download = tmp_path / "download"
    download.mkdir()
    with tarfile.open(download / "data_aishell.tgz", "w:gz") as tf:
        tf.add(staging / "data_aishell", arcname="data_aishell")
    (download / "resource_aishell.tgz").write_bytes(b"not needed")    # lexicon: never unpacked
    assert corpora.detect_layout(download).kind == "aishell1-archives"
    summary = run(download, tmp_path / "out", extract=True, train_speakers=3, test_speakers=2,
                  utts_per_speaker=2, test_utts_per_speaker=2)
    assert summary["layout"] == "aishell1-release" and len(summary["extracted"]) == 6
    train, test = check_outputs(download, tmp_path / "out")
    assert sorted(test) == ["S0764", "S0765"]
    assert all(p.startswith("data_aishell/wav/train/") for v in train.values() for p in v)


def test_partly_unpacked_archives_are_reported(tmp_path):
    root = make_release(tmp_path / "corpus", train=("S0002", "S0003"), dev=(), test=("S0764", "S0765"))
    make_speaker_archive(root / "data_aishell" / "wav", "S0010", "train")
    log: list[str] = []
    summary = run(root, tmp_path / "out", log=log, train_speakers=2, test_speakers=2, utts_per_speaker=2,
                  test_utts_per_speaker=2)
    assert any("S0010.tar.gz" in w and "--extract" in w for w in summary["warnings"])
    assert "S0010" not in summary["train_speakers"]


def test_extraction_refuses_paths_outside(tmp_path):
    wav = tmp_path / "corpus" / "wav"
    wav.mkdir(parents=True)
    archive = wav / "S0002.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        data = b"RIFF"
        info = tarfile.TarInfo("../../escaped.wav")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    with pytest.raises(PrepareError, match="outside"):
        corpora_split.prepare(tmp_path / "corpus", tmp_path / "out", extract=True, log=lambda *_: None)
    assert not (tmp_path / "escaped.wav").exists() and not (tmp_path / "corpus" / "escaped.wav").exists()


def test_extraction_skips_links(tmp_path):
    archive = tmp_path / "S0002.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        link = tarfile.TarInfo("train/S0002/link.wav")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        tf.addfile(link)
        data = b"x" * 10
        info = tarfile.TarInfo("train/S0002/BAC009S0002W0121.wav")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    dest = tmp_path / "dest"
    dest.mkdir()
    assert corpora.safe_extract(archive, dest) == 1
    assert not (dest / "train/S0002/link.wav").exists() and (dest / "train/S0002/BAC009S0002W0121.wav").is_file()


# --------------------------------------------------------------------------- the handout's ALL/SXXXX layout
def test_speaker_folders_prefer_official_test_speakers(tmp_path):
    root = make_speaker_folders(tmp_path / "ALL", ["S0002", "S0003", "S0004", "S0005", "S0006", "S0764", "S0800"])
    layout = corpora.detect_layout(root)
    assert layout.kind == "aishell-speaker-folders"
    for seed in (0, 1, 2):
        out = tmp_path / f"out{seed}"
        run(root, out, seed=seed, train_speakers=5, test_speakers=2, utts_per_speaker=3, test_utts_per_speaker=3)
        train, test = check_outputs(root, out)
        assert sorted(test) == ["S0764", "S0800"]
        assert sorted(train) == ["S0002", "S0003", "S0004", "S0005", "S0006"]


def test_speaker_folders_without_official_test_speakers(tmp_path):
    root = make_speaker_folders(tmp_path / "ALL", [f"S{n:04d}" for n in range(2, 10)])
    summary = run(root, tmp_path / "out", train_speakers=6, test_speakers=2, utts_per_speaker=2, test_utts_per_speaker=2)
    train, test = check_outputs(root, tmp_path / "out")
    assert len(test) == 2 and len(train) == 6 and summary["layout"] == "aishell-speaker-folders"


# --------------------------------------------------------------------------- flat AISHELL-named folder
def test_flat_aishell_names(tmp_path):
    root = tmp_path / "sample"
    for spk in ("S0150", "S0252", "S0300"):
        for n in range(5):
            write_audio(root / "AISHELL_Sample_data" / aishell_name(spk, n), seed=n)
            (root / "AISHELL_Sample_data" / aishell_name(spk, n)).with_suffix(".txt").write_text("文本\n", encoding="utf-8")
    layout = corpora.detect_layout(root)
    assert layout.kind == "aishell-flat" and sorted(layout.speakers) == ["S0150", "S0252", "S0300"]
    run(root, tmp_path / "out", train_speakers=1, test_speakers=2, utts_per_speaker=5, test_utts_per_speaker=3)
    train, test = check_outputs(root, tmp_path / "out")
    assert len(train) == 1 and len(test) == 2
    assert all(p.startswith("AISHELL_Sample_data/") for v in train.values() for p in v)


# --------------------------------------------------------------------------- generic nested corpus
@pytest.fixture(scope="module")
def generic(tmp_path_factory) -> Path:
    counts = {f"spk{i:02d}": 6 for i in range(8)} | {"short1": 2, "short2": 3}
    root = make_generic(tmp_path_factory.mktemp("generic") / "corpus", counts)
    write_audio(root / "stray.flac")              # directly in root: no speaker
    return root


def test_generic_layout_counts_and_skips(generic, tmp_path):
    layout = corpora.detect_layout(generic)
    assert layout.kind == "generic" and len(layout.speakers) == 10 and layout.unassigned == ["stray.flac"]
    assert all(p.endswith(".flac") and p.count("/") == 2 for v in layout.speakers.values() for p in v)
    log: list[str] = []
    summary = run(generic, tmp_path, log=log, train_speakers=5, test_speakers=3, utts_per_speaker=4,
                  test_utts_per_speaker=4)
    train, test = check_outputs(generic, tmp_path)
    assert len(train) == 5 and len(test) == 3 and not {"short1", "short2"} & (set(train) | set(test))
    assert summary["skipped_train"] == {"short1": 2, "short2": 3}
    skipped = [line for line in log if line.startswith("skipped")]
    assert skipped and "2 speaker(s)" in skipped[0] and "short1 (2)" in skipped[0] and "short2 (3)" in skipped[0]
    assert summary["train_utterances"] == 20 and summary["test_utterances"] == 12
    assert summary["target_trials"] == 3 * 6 and summary["nontarget_trials"] == 66 - 18
    assert any("stray.flac" in w for w in summary["warnings"])


def test_same_seed_same_files_other_seed_differs(generic, tmp_path):
    def files(seed, name):
        run(generic, tmp_path / name, seed=seed, train_speakers=4, test_speakers=3, utts_per_speaker=3,
            test_utts_per_speaker=3)
        return [(tmp_path / name / f).read_bytes() for f in (TRAIN_NAME, TEST_NAME, TRIALS_NAME)]
    assert files(0, "a") == files(0, "b")
    assert files(0, "a") != files(1, "c")


def test_max_trials_is_balanced_and_seeded(generic, tmp_path):
    kwargs = dict(train_speakers=4, test_speakers=3, utts_per_speaker=4, test_utts_per_speaker=6)
    summary = run(generic, tmp_path / "a", max_trials=20, **kwargs)
    _, _, trials = read_outputs(tmp_path / "a")
    check_outputs(generic, tmp_path / "a")
    assert Counter(t.label for t in trials) == {1: 10, 0: 10}
    assert summary["target_trials"] == 10 and summary["nontarget_trials"] == 10
    run(generic, tmp_path / "b", max_trials=20, **kwargs)
    assert (tmp_path / "a" / TRIALS_NAME).read_bytes() == (tmp_path / "b" / TRIALS_NAME).read_bytes()
    # 45 target pairs exist (3 x C(6,2)); asking for 100 takes them all and fills with non-targets
    run(generic, tmp_path / "c", max_trials=100, **kwargs)
    _, _, trials = read_outputs(tmp_path / "c")
    assert Counter(t.label for t in trials) == {1: 45, 0: 55}


def test_trial_sampling_without_enumeration(monkeypatch):
    monkeypatch.setattr(corpora_split, "ENUMERATE_LIMIT", 0)
    import random
    speakers = [s for s in "abcd" for _ in range(5)]
    pairs, n_t, n_n = corpora_split.trial_pairs(speakers, 30, random.Random(0))
    pairs = list(pairs)
    assert (n_t, n_n) == (15, 15) and len(set((i, j) for i, j, _ in pairs)) == 30
    assert all(i < j and label == int(speakers[i] == speakers[j]) for i, j, label in pairs)


# --------------------------------------------------------------------------- command line and errors
def test_cli_too_few_speakers_exits_2_with_flags(generic, tmp_path, capsys):
    rc = prepare_data.main(["--root", str(generic), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "300 training + 20 test" in err
    assert err.endswith("run with e.g. --train_speakers 6 --test_speakers 2 --utts_per_speaker 6 "
                        "--test_utts_per_speaker 6")
    assert not (tmp_path / "out").exists()
    rc = prepare_data.main(["--root", str(generic), "--train_speakers", "3", "--test_speakers", "2",
                            "--utts_per_speaker", "3"])
    err = capsys.readouterr().err.strip()             # only the test side is short of utterances
    assert rc == 2 and err.endswith("run with e.g. --test_utts_per_speaker 6") and "2 test speakers with >= 10" in err


def test_cli_windows_separators_dry_run_and_printed_keys(generic, tmp_path, capsys):
    out = tmp_path / "out"
    rc = prepare_data.main(["--root", str(generic).replace("/", "\\"), "--out", str(out), "--train_speakers", "4",
                  "--test_speakers", "2", "--utts_per_speaker", "3", "--test_utts_per_speaker", "3", "--dry_run"])
    text = capsys.readouterr().out
    assert rc == 0 and not out.exists() and "dry run" in text
    snippet = yaml.safe_load(text[text.index("data:"):])
    assert snippet["data"]["root"] == str(generic) and snippet["test"]["trials"] == str(out / TRIALS_NAME)


def test_cli_rejects_bad_numbers(generic, capsys):
    with pytest.raises(SystemExit) as e:
        prepare_data.main(["--root", str(generic), "--utts_per_speaker", "-1"])
    assert e.value.code == 2


def test_missing_root_and_empty_root(tmp_path, capsys):
    assert prepare_data.main(["--root", str(tmp_path / "nope")]) == 2
    assert "not a folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert prepare_data.main(["--root", str(tmp_path / "empty")]) == 2
    assert "no .wav or .flac" in capsys.readouterr().err


# --------------------------------------------------------------------------- --write_config
def test_write_config_edits_only_the_data_keys(generic, tmp_path, capsys):
    cfg_copy = tmp_path / "config.yaml"
    original = config.DEFAULT_CONFIG.read_text(encoding="utf-8")
    cfg_copy.write_text(original, encoding="utf-8")
    out = tmp_path / "files"
    rc = prepare_data.main(["--root", str(generic), "--out", str(out), "--train_speakers", "4", "--test_speakers", "2",
                  "--utts_per_speaker", "3", "--test_utts_per_speaker", "3", "--write_config", str(cfg_copy)])
    assert rc == 0
    new = cfg_copy.read_text(encoding="utf-8")
    old_lines, new_lines = original.splitlines(), new.splitlines()
    assert len(old_lines) == len(new_lines)
    changed = [(a, b) for a, b in zip(old_lines, new_lines) if a != b]
    assert len(changed) == 5
    for a, b in changed:                          # same key, same comment
        assert a.split(":")[0] == b.split(":")[0]
        assert ("#" in a) == ("#" in b) and (a[a.index("#"):] == b[b.index("#"):] if "#" in a else True)
    assert [line for line in old_lines if line.lstrip().startswith("#")] == \
        [line for line in new_lines if line.lstrip().startswith("#")]
    old_flat, new_flat = config.flatten(yaml.safe_load(original)), config.flatten(yaml.safe_load(new))
    expected = {"data.root": str(generic), "data.train_manifest": str(out / TRAIN_NAME),
                "test.root": str(generic), "test.test_manifest": str(out / TEST_NAME),
                "test.trials": str(out / TRIALS_NAME)}
    assert new_flat == {**old_flat, **expected}
    cfg = config.load_config(cfg_copy)
    assert config.config_path_value(cfg, "test.trials") == out / TRIALS_NAME


def test_write_config_keeps_crlf_bom_and_adds_missing_keys(tmp_path):
    path = tmp_path / "user.yaml"
    path.write_bytes(b"\xef\xbb\xbf# my settings\r\ndata:\r\n  root: old   # where\r\ntrain:\r\n  epochs: 3\r\n")
    values = corpora_config.config_values(tmp_path / "corpus dir", tmp_path / "it's files")
    corpora_config.write_config(path, values)
    raw = path.read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf# my settings\r\n") and b"\n" not in raw.replace(b"\r\n", b"")
    text = raw.decode("utf-8-sig")
    assert "# where" in text
    data = yaml.safe_load(text)
    assert data["train"] == {"epochs": 3}
    assert data["data"]["root"] == str(tmp_path / "corpus dir")
    assert data["test"]["trials"] == str(tmp_path / "it's files" / TRIALS_NAME)
    assert config.load_config(path)["data"]["train_manifest"] == str(tmp_path / "it's files" / TRAIN_NAME)


def test_write_config_refuses_what_it_cannot_edit_safely(tmp_path):
    path = tmp_path / "flow.yaml"
    path.write_text("data: {root: x, bad_audio: skip}\n", encoding="utf-8")
    with pytest.raises(PrepareError):
        corpora_config.write_config(path, corpora_config.config_values(tmp_path, tmp_path))
    assert path.read_text(encoding="utf-8") == "data: {root: x, bad_audio: skip}\n"


def test_write_config_creates_a_user_config(tmp_path):
    path = tmp_path / "mine.yaml"
    corpora_config.write_config(path, corpora_config.config_values(tmp_path / "c", tmp_path / "f"))
    cfg = config.load_config(path)
    assert cfg["test"]["root"] == str(tmp_path / "c") and cfg["features"]["n_mfcc"] == 40


def test_config_values_inside_project_are_relative():
    values = corpora_config.config_values(config.PROJECT_ROOT / "data" / "demo_corpus", config.FILES_DIR)
    assert values["data.root"] == "data/demo_corpus" and values["test.trials"] == "files/trials.txt"


# --------------------------------------------------------------------------- recipes
@pytest.mark.parametrize("name", ["demo", "aishell1_lab", "aishell1_full", "speech_commands", "speechocean762",
                                  "new_corpus"])
def test_recipes_load(name):
    path = config.PROJECT_ROOT / "recipes" / f"{name}.yaml"
    cfg = config.load_config(path)
    assert cfg["_config_path"] == str(path)


def test_speech_commands_recipe_points_at_shared_data():
    cfg = config.load_config(config.PROJECT_ROOT / "recipes" / "speech_commands.yaml")
    assert cfg["data"]["root"] == "../shared/data/speech_commands" and cfg["train"]["n_folder"] == "sc"
    if not (SHARED / "speech_commands").is_dir():
        pytest.skip(f"shared data not found at {SHARED / 'speech_commands'}")
    assert config.config_path_value(cfg, "test.trials").is_file()


# --------------------------------------------------------------------------- real data from ../shared/data
def test_aishell_sample(tmp_path, capsys):
    root = SHARED / "aishell_sample"
    if not root.is_dir():
        pytest.skip(f"shared AISHELL sample not found at {root}")
    summary = run(root, tmp_path, train_speakers=1, test_speakers=1, utts_per_speaker=10)
    assert summary["layout"] == "aishell-flat"
    train, test = check_outputs(root, tmp_path)
    assert sorted(set(train) | set(test)) == ["S0150", "S0252"]
    assert summary["train_utterances"] == 10 and summary["test_utterances"] == 10
    assert summary["target_trials"] == 45 and summary["nontarget_trials"] == 0
    assert any("non-target" in w for w in summary["warnings"])
    assert 0 < summary["train_hours"] < 0.02
    rc = prepare_data.main(["--root", str(root), "--out", str(tmp_path / "defaults")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "--train_speakers 1 --test_speakers 1" in err


def test_speech_commands_generic(tmp_path):
    root = SHARED / "speech_commands" / "wav"
    if not root.is_dir():
        pytest.skip(f"shared Speech Commands data not found at {root}")
    summary = run(root, tmp_path, train_speakers=20, test_speakers=5, utts_per_speaker=5, test_utts_per_speaker=5)
    assert summary["layout"] == "generic"
    train, test = check_outputs(root, tmp_path)
    assert len(train) == 20 and len(test) == 5
    assert summary["trials"] == 25 * 24 // 2 and summary["target_trials"] == 5 * 10
    assert summary["skipped_train"] and all(n < 5 for n in summary["skipped_train"].values())


def test_too_few_training_speakers_uses_what_is_there(generic, tmp_path):
    summary = run(generic, tmp_path, train_speakers=50, test_speakers=2, utts_per_speaker=3, test_utts_per_speaker=3)
    train, test = check_outputs(generic, tmp_path)
    assert len(test) == 2 and len(train) == 7                 # 10 speakers, short1 has 2 < 3, 2 test
    assert any("only 7 of the 50 requested training speakers" in w for w in summary["warnings"])


def test_eval_only_all_pairs_of_every_speaker(tmp_path):
    sample = SHARED / "aishell_sample"
    if not sample.is_dir():
        pytest.skip(f"real-speech sample not found at {sample} (../shared/data is absent)")
    out = tmp_path / "eval"
    assert prepare_data.main(["--root", str(sample), "--eval_only", "--test_utts_per_speaker", "0",
                             "--out", str(out)]) == 0
    test = read_manifest(out / "test_set.txt")
    trials = read_trials(out / "trials.txt")
    assert {u.speaker for u in test} == {"S0150", "S0252"} and len(test) == 40
    assert len(trials) == 40 * 39 // 2
    spk = {u.relpath: u.speaker for u in test}
    assert sum(t.label for t in trials) == 2 * (20 * 19 // 2)
    assert all(t.label == int(spk[t.enroll] == spk[t.test]) for t in trials)
    assert all((sample / u.relpath).is_file() for u in test)


def test_eval_only_needs_its_own_out_folder(tmp_path, capsys):
    root = tmp_path / "c"
    for spk in ("a", "b"):
        (root / spk).mkdir(parents=True)
        sf.write(root / spk / "x.wav", np.zeros(1600, dtype=np.float32), 16000)
    assert prepare_data.main(["--root", str(root), "--eval_only"]) == 2
    assert "--eval_only needs --out" in capsys.readouterr().err
