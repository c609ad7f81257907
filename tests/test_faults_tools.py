"""Faults injected into the tools that write files the user names (issue 18, items 5, 8, 9 and 12).

- unpacking (``prepare_data.py --extract``) never replaces a file it did not create;
- no command replaces one of its inputs or a file it did not write (``svlab.files.refuse_overwrite``):
  ``extract.py --out``, ``prepare_data.py --out`` / ``--write_config``, ``benchmark.py`` /
  ``tdnn_formulations.py`` / ``experiments.py`` ``--json``;
- a folder holding a corpus twice is found out (``prepare_data.py --duplicates``);
- file names from outside are printed escaped.

Fixture corpora are a few 0.05 s files in tmp_path; nothing here trains or embeds.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf

import benchmark
import experiments
import extract
import prepare_data
import tdnn_formulations
from svlab import corpora, corpora_config, corpora_split
from svlab.config import FILES_DIR, PROJECT_ROOT
from svlab.corpora import TEST_NAME, TRAIN_NAME, TRIALS_NAME
from svlab.embedding import write_embeddings
from svlab.errors import OutputError, PrepareError
from svlab.files import WrittenFiles, refuse_overwrite
from svlab.manifests import read_manifest, read_trials

SR = 16000
ESC = "\x1b"
PREPARE_SMALL = ["--train_speakers", "2", "--test_speakers", "2", "--utts_per_speaker", "2",
                 "--test_utts_per_speaker", "2"]


def wav_bytes(seed: int = 0, samples: int = 800) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.random.default_rng(seed).uniform(-0.3, 0.3, samples).astype(np.float32), SR, format="WAV")
    return buf.getvalue()


def write_audio(path: Path, seed: int = 0, samples: int = 800) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(wav_bytes(seed, samples))
    return path


def aishell_name(spk: str, n: int) -> str:
    return f"BAC009{spk}W{121 + n:04d}.wav"


def make_tar(path: Path, members: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def speaker_members(spk: str, split: str = "train", utts: int = 3) -> dict[str, bytes]:
    return {f"{split}/{spk}/{aishell_name(spk, n)}": wav_bytes(n) for n in range(utts)}


def quiet_run(root, out, log=None, **kwargs) -> dict:
    lines = [] if log is None else log
    return corpora_split.prepare(root, out, log=lines.append, **kwargs)


# --------------------------------------------------------------------------- 5. unpacking never replaces
def test_extract_keeps_the_archive_a_sibling_archive_and_a_user_file(tmp_path):
    wav = tmp_path / "corpus" / "wav"
    sibling = make_tar(wav / "S0003.tar.gz", speaker_members("S0003"))
    notes = wav / "notes.txt"
    notes.parent.mkdir(parents=True, exist_ok=True)
    notes.write_text("my notes\n", encoding="utf-8")
    evil = {**speaker_members("S0002"), "S0002.tar.gz": b"not the archive", "S0003.tar.gz": b"not the sibling",
            "notes.txt": b"overwritten"}
    archive = make_tar(wav / "S0002.tar.gz", evil)
    before = {p: p.read_bytes() for p in (archive, sibling, notes)}
    log: list[str] = []
    summary = quiet_run(tmp_path / "corpus", tmp_path / "out", log, extract=True, train_speakers=1,
                        test_speakers=1, utts_per_speaker=2, test_utts_per_speaker=2)
    assert {p: p.read_bytes() for p in (archive, sibling, notes)} == before
    assert (wav / "train" / "S0002" / aishell_name("S0002", 0)).is_file()          # the real members did come
    assert sorted(summary["extract_conflicts"]) == ["wav/S0002.tar.gz: S0002.tar.gz", "wav/S0002.tar.gz: S0003.tar.gz",
                                                    "wav/S0002.tar.gz: notes.txt"]
    listed = [line.strip() for line in log if line.startswith("    ")]
    assert sorted(listed) == ["wav/S0002.tar.gz", "wav/S0003.tar.gz", "wav/notes.txt"]     # one line each
    assert any("3 member(s) not unpacked" in line for line in log)
    assert any("3 archive member(s) not unpacked" in w for w in summary["warnings"])


def test_extract_replaces_only_what_the_same_archive_created(tmp_path):
    dest = tmp_path / "wav"
    a = make_tar(tmp_path / "a.tar.gz", {"x/one.wav": b"a-one", "x/two.wav": b"a-two"})
    assert corpora.safe_extract(a, dest) == 2
    conflicts: list[str] = []
    assert corpora.safe_extract(a, dest, conflicts) == 2 and conflicts == []       # again (interrupted run)
    os.utime(dest / "x" / "two.wav", ns=(1, 1))                                     # the user changed it since
    (dest / "x" / "two.wav").write_bytes(b"user's")
    b = make_tar(tmp_path / "b.tar.gz", {"x/one.wav": b"b-one", "x/three.wav": b"b-three"})
    assert corpora.safe_extract(a, dest, conflicts) == 1 and conflicts == ["x/two.wav"]
    conflicts.clear()
    assert corpora.safe_extract(b, dest, conflicts) == 1 and conflicts == ["x/one.wav"]   # a's file, not b's
    assert (dest / "x" / "one.wav").read_bytes() == b"a-one"
    assert (dest / "x" / "two.wav").read_bytes() == b"user's" and (dest / "x" / "three.wav").read_bytes() == b"b-three"


def test_extract_conflicts_with_folders_records_and_old_temp_names(tmp_path):
    dest = tmp_path / "wav"
    dest.mkdir()
    (dest / "train").write_text("a file where the archive has a folder")
    keep = dest / ".extract-a.tar.gz.tmp" / "mine.txt"                    # the name the old code deleted
    keep.parent.mkdir()
    keep.write_text("kept")
    a = make_tar(tmp_path / "a.tar.gz", {"train/S0002/x.wav": b"x", "ok/y.wav": b"y",
                                         f"{corpora.EXTRACTED_RECORD}/b.tar.gz.json": b'{"files": {}}'})
    conflicts: list[str] = []
    assert corpora.safe_extract(a, dest, conflicts) == 1
    assert sorted(conflicts) == [f"{corpora.EXTRACTED_RECORD}/b.tar.gz.json", "train/S0002/x.wav"]
    assert (dest / "train").read_text() == "a file where the archive has a folder" and keep.read_text() == "kept"
    assert not (dest / corpora.EXTRACTED_RECORD / "b.tar.gz.json").exists()
    assert not [p for p in dest.iterdir() if p.name.startswith(".extract-a.tar.gz.") and p.name != keep.parent.name]


def test_extract_without_hard_links_still_never_replaces(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise PermissionError(1, "Operation not permitted")
    monkeypatch.setattr(corpora.os, "link", no_links)
    dest = tmp_path / "wav"
    (dest / "x").mkdir(parents=True)
    (dest / "x" / "taken.wav").write_bytes(b"user")
    a = make_tar(tmp_path / "a.tar.gz", {"x/taken.wav": b"archive", "x/free.wav": b"free"})
    conflicts: list[str] = []
    assert corpora.safe_extract(a, dest, conflicts) == 1 and conflicts == ["x/taken.wav"]
    assert (dest / "x" / "taken.wav").read_bytes() == b"user" and (dest / "x" / "free.wav").read_bytes() == b"free"


def test_extract_lists_twenty_conflicts_then_a_count(tmp_path):
    wav = tmp_path / "corpus" / "wav"
    members = speaker_members("S0002")
    for n in range(25):
        (wav / f"user{n:02d}.txt").parent.mkdir(parents=True, exist_ok=True)
        (wav / f"user{n:02d}.txt").write_text("mine")
        members[f"user{n:02d}.txt"] = b"theirs"
    members[f"{ESC}[2J.txt"] = b"x"
    (wav / f"{ESC}[2J.txt").write_text("mine")
    make_tar(wav / "S0002.tar.gz", members)
    make_tar(wav / "S0764.tar.gz", speaker_members("S0764", "test"))
    log: list[str] = []
    quiet_run(tmp_path / "corpus", tmp_path / "out", log, extract=True, train_speakers=1, test_speakers=1,
              utts_per_speaker=2, test_utts_per_speaker=2)
    listed = [line for line in log if line.startswith("    ")]
    assert len(listed) == 21 and listed[-1].strip() == "... and 6 more"
    assert all((wav / f"user{n:02d}.txt").read_text() == "mine" for n in range(25))
    assert not any(ESC in line for line in log) and any("\\x1b[2J.txt" in line for line in log)


# --------------------------------------------------------------------------- 8. never replacing an input
def test_refuse_overwrite_inputs_links_folders_and_foreign_files(tmp_path):
    src = tmp_path / "list.txt"
    src.write_text("a.wav\n")
    sym, hard = tmp_path / "sym.txt", tmp_path / "hard.txt"
    sym.symlink_to(src)
    os.link(src, hard)
    for target in (src, sym, hard):
        with pytest.raises(OutputError, match="is the list.*an output never replaces an input"):
            refuse_overwrite(target, inputs=[("the list", src)], ours=lambda p: True)
    with pytest.raises(OutputError, match="is a folder"):
        refuse_overwrite(tmp_path)
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(OutputError, match="symbolic link"):
        refuse_overwrite(dangling, ours=lambda p: True)
    with pytest.raises(OutputError, match="not an earlier output of X .because.; choose another"):
        refuse_overwrite(src, command="X", recognised_by="because")
    with pytest.raises(OutputError, match="list.txt is a file, not a folder"):
        refuse_overwrite(src / "emb.npy")
    refuse_overwrite(src, ours=lambda p: True)                         # an earlier output may go
    refuse_overwrite(tmp_path / "new.npy", inputs=[src])               # a new file is fine


@pytest.fixture()
def extract_inputs(tmp_path):
    audio = write_audio(tmp_path / "a.wav")
    lst = tmp_path / "list.txt"
    lst.write_text("a.wav\n", encoding="utf-8")
    return tmp_path, lst, audio


def _extract(tmp_path, lst, out, capsys):
    argv = ["--checkpoint", str(tmp_path / "no_such.pth"), "--list", str(lst), "--out", str(out)]
    rc = extract.main(argv)
    return rc, capsys.readouterr().err.strip()


@pytest.mark.parametrize("target", ["list", "symlink", "hardlink", "audio", "config", "manifest", "index_is_list"])
def test_extract_refuses_every_input_and_foreign_file_before_any_work(extract_inputs, capsys, target):
    tmp_path, lst, audio = extract_inputs
    out = {"list": lst, "audio": audio, "symlink": tmp_path / "link.npy", "hardlink": tmp_path / "hard.npy",
           "config": tmp_path / "config.yaml", "manifest": tmp_path / "test_set.txt",
           "index_is_list": tmp_path / "emb.npy"}[target]
    if target == "symlink":
        out.symlink_to(lst)
    elif target == "hardlink":
        os.link(lst, out)
    elif target in ("config", "manifest"):
        shutil.copy(PROJECT_ROOT / ("config.yaml" if target == "config" else "files/test_set.txt"), out)
    elif target == "index_is_list":
        lst = lst.rename(tmp_path / "emb_index.txt")
    before = {p: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    rc, err = _extract(tmp_path, lst, out, capsys)
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert "checkpoint" not in err.split(";")[0] or target == "list"              # refused before loading it
    assert ("never replaces an input" in err) == (target in ("list", "symlink", "hardlink", "audio",
                                                             "index_is_list"))
    assert {p: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before


def test_extract_may_replace_its_own_earlier_output(extract_inputs, capsys):
    tmp_path, lst, _ = extract_inputs
    out = tmp_path / "emb.npy"
    write_embeddings(out, np.ones((1, 4), np.float32), ["a.wav"])
    assert extract.earlier_output(out)
    rc, err = _extract(tmp_path, lst, out, capsys)
    assert rc == 2 and "no_such.pth" in err and "--out" not in err                  # got past the check
    np.save(out, np.ones((1, 4), np.int64))                                          # not what extract writes
    assert not extract.earlier_output(out)
    (tmp_path / "emb_index.txt").write_text("a.wav\nb.wav\n")
    np.save(out, np.ones((1, 4), np.float32))                                        # rows != index lines
    assert not extract.earlier_output(out)


def _no_work(*args, **kwargs):
    raise AssertionError("the work started before the output was checked")


def test_json_outputs_refuse_foreign_files_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(benchmark, "Bench", _no_work)
    monkeypatch.setattr(tdnn_formulations, "cpu_runtime", SimpleNamespace(warm_up_vector_math=_no_work,
                                                                          keep_freed_memory=_no_work))
    cfg = tmp_path / "config.yaml"
    shutil.copy(PROJECT_ROOT / "config.yaml", cfg)
    before = cfg.read_bytes()
    for main in (benchmark.main, tdnn_formulations.main):
        assert main(["--json", str(cfg)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "already exists and is not an earlier output" in err, err
    assert cfg.read_bytes() == before
    earlier = tmp_path / "bench.json"
    earlier.write_text(json.dumps({k: 1 for k in benchmark.JSON_KEYS}))
    benchmark.check_json_out(earlier)                                              # its own: fine
    truncated = tmp_path / "t.json"
    truncated.write_text('{"formulations": {')
    with pytest.raises(OutputError):
        tdnn_formulations.check_json_out(truncated)


def test_experiments_output_never_replaces_the_table_or_a_foreign_file(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(experiments, "run_cell", _no_work)
    table = tmp_path / "t.yaml"
    table.write_text("recipe: recipes/demo.yaml\nseeds: [0]\nvariants:\n  base: {}\n", encoding="utf-8")
    before = table.read_bytes()
    assert experiments.main([str(table), "--json", str(table)]) == 2
    assert "the table file" in capsys.readouterr().err and table.read_bytes() == before
    other = tmp_path / "notes.json"
    other.write_text("{not json")
    assert experiments.main([str(table), "--json", str(other)]) == 2
    err = capsys.readouterr().err
    assert "not an earlier output of tools/experiments.py" in err and other.read_text() == "{not json"
    for committed in (PROJECT_ROOT / "results").glob("*.json"):
        if "cells" in json.loads(committed.read_text(encoding="utf-8")):
            experiments.check_out(committed, table, PROJECT_ROOT / "recipes" / "demo.yaml")   # earlier outputs


@pytest.fixture()
def small_corpus(tmp_path) -> Path:
    root = tmp_path / "corpus"
    for spk in ("S0002", "S0003", "S0764", "S0765"):
        for n in range(3):
            write_audio(root / spk / aishell_name(spk, n), seed=n)
    return root


def test_prepare_refuses_the_corpus_own_files_and_hand_made_lists(small_corpus, tmp_path, capsys):
    own = small_corpus / TRIALS_NAME
    own.write_text("the corpus's own trial list\n")
    rc = prepare_data.main(["--root", str(small_corpus), "--out", str(small_corpus), *PREPARE_SMALL])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "trials.txt already exists" in err and "--out" in err
    assert own.read_text() == "the corpus's own trial list\n"
    assert not (small_corpus / TRAIN_NAME).exists()                                # nothing written at all
    out = tmp_path / "out"
    assert prepare_data.main(["--root", str(small_corpus), "--out", str(out), *PREPARE_SMALL]) == 0
    first = (out / TRIALS_NAME).read_bytes()
    assert prepare_data.main(["--root", str(small_corpus), "--out", str(out), *PREPARE_SMALL, "--seed", "1"]) == 0
    (out / TEST_NAME).write_text((out / TEST_NAME).read_text() + "S0002 extra.wav\n")  # edited by hand
    capsys.readouterr()
    assert prepare_data.main(["--root", str(small_corpus), "--out", str(out), *PREPARE_SMALL]) == 2
    assert "test_set.txt already exists" in capsys.readouterr().err
    assert (out / TEST_NAME).read_text().endswith("S0002 extra.wav\n") and (out / TRIALS_NAME).read_bytes() != first


def test_prepare_replaces_the_demo_manifests_and_its_interrupted_writes(small_corpus, tmp_path):
    out = tmp_path / "files"
    out.mkdir()
    for name in (TRAIN_NAME, TEST_NAME, TRIALS_NAME):                           # as shipped, CRLF after a checkout
        (out / name).write_bytes((FILES_DIR / name).read_bytes().replace(b"\n", b"\r\n"))
    quiet_run(small_corpus, out, train_speakers=2, test_speakers=2, utts_per_speaker=2, test_utts_per_speaker=2)
    assert {u.speaker for u in read_manifest(out / TEST_NAME)} <= {"S0764", "S0765", "S0002", "S0003"}
    record = WrittenFiles(out, corpora_split.COMMAND)
    old = (out / TRIALS_NAME).read_bytes()

    def crash(tmp):
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        record.write(out / TRIALS_NAME, crash)
    assert (out / TRIALS_NAME).read_bytes() == old and record.wrote(out / TRIALS_NAME)


def test_prepare_write_config_never_edits_a_manifest_or_other_file(small_corpus, tmp_path, capsys):
    out = tmp_path / "out"
    for target in (out / TRAIN_NAME, tmp_path / "list.json"):
        if target.suffix == ".json":
            target.write_text('{"name": "not a config"}')
        rc = prepare_data.main(["--root", str(small_corpus), "--out", str(out), *PREPARE_SMALL,
                                "--write_config", str(target)])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1 and "--write_config" in err, err
    assert (tmp_path / "list.json").read_text() == '{"name": "not a config"}'
    assert not (out / TRAIN_NAME).exists()
    linked = tmp_path / "link.yaml"
    real = tmp_path / "real.yaml"
    real.write_text("train:\n  epochs: 3\n")
    linked.symlink_to(real)
    corpora_config.write_config(linked, corpora_config.config_values(small_corpus, out))
    assert linked.is_symlink() and "data:" in real.read_text()                   # the link stays a link


def test_prepare_out_that_is_a_file_and_eval_only_outputs(small_corpus, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert prepare_data.main(["--root", str(small_corpus), "--out", str(a_file), *PREPARE_SMALL]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err and a_file.read_text() == "x"
    own = small_corpus / TEST_NAME
    own.write_text("S0002 S0002/x.wav\n")
    assert prepare_data.main(["--root", str(small_corpus), "--eval_only", "--out", str(small_corpus)]) == 2
    assert "test_set.txt already exists" in capsys.readouterr().err and own.read_text() == "S0002 S0002/x.wav\n"


# --------------------------------------------------------------------------- 12. a corpus twice under --root
@pytest.fixture()
def two_copies(tmp_path) -> Path:
    """``data_aishell/wav/{train,test}/SXXXX`` and the handout's ``ALL/SXXXX``: the same files twice."""
    base = tmp_path / "Aishell"
    for spk, split in (("S0002", "train"), ("S0003", "train"), ("S0004", "train"), ("S0764", "test"),
                       ("S0765", "test")):
        for n in range(4):
            write_audio(base / "data_aishell" / "wav" / split / spk / aishell_name(spk, n), seed=n)
    shutil.copytree(base / "data_aishell" / "wav" / "train", base / "ALL")
    shutil.copytree(base / "data_aishell" / "wav" / "test", base / "ALL", dirs_exist_ok=True)
    return base


def test_two_copies_of_aishell_stop_naming_the_folders(two_copies, tmp_path, capsys):
    out = tmp_path / "out"
    rc = prepare_data.main(["--root", str(two_copies), "--out", str(out), *PREPARE_SMALL])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "20 utterance(s) found more than once" in err and "ALL/ and data_aishell/ (20)" in err
    assert f"--root ({two_copies / 'ALL'} or {two_copies / 'data_aishell'})" in err
    assert "--duplicates keep_first" in err and not out.exists()
    assert "--duplicates" in prepare_data.build_parser().format_help()


def test_two_copies_keep_first_puts_each_utterance_in_once(two_copies, tmp_path):
    log: list[str] = []
    summary = quiet_run(two_copies, tmp_path / "out", log, duplicates="keep_first", train_speakers=3,
                        test_speakers=2, utts_per_speaker=0, test_utts_per_speaker=0)
    kept_line = [line for line in log if "found more than once" in line]
    assert len(kept_line) == 1 and "kept the copies in ALL/ (20), left out those in data_aishell/ (20)" in kept_line[0]
    train, test = read_manifest(tmp_path / "out" / TRAIN_NAME), read_manifest(tmp_path / "out" / TEST_NAME)
    stems = [Path(u.relpath).stem for u in train + test]
    assert len(stems) == len(set(stems)) == 20 and all(u.relpath.startswith("ALL/") for u in train + test)
    trials = read_trials(tmp_path / "out" / TRIALS_NAME)
    assert all(Path(t.enroll).stem != Path(t.test).stem for t in trials)
    assert len(summary["duplicates_dropped"]) == 20 and summary["test_speakers"] == ["S0764", "S0765"]


def test_two_copies_of_a_generic_corpus_are_found_by_content(tmp_path):
    root = tmp_path / "corpora"
    for spk in ("anna", "bert", "carl"):
        for n in range(3):
            write_audio(root / "copyA" / spk / "s1" / f"{n:03d}.wav", seed=hash((spk, n)) % 1000)
    shutil.copytree(root / "copyA", root / "copyB")
    layout = corpora.detect_layout(root)
    assert len(layout.duplicates) == 9 and {d.reason for d in layout.duplicates} == {"content"}
    with pytest.raises(PrepareError, match="copyA/ and copyB/ .9."):
        corpora.resolve_duplicates(layout, "stop")
    kept = corpora.resolve_duplicates(layout, "keep_first", log=lambda *_: None)
    assert sorted(kept.speakers) == ["anna", "bert", "carl"] and kept.n_utterances == 9


def test_same_names_of_different_recordings_are_not_duplicates(tmp_path):
    root = tmp_path / "corpus"
    for s, spk in enumerate(("anna", "bert", "carl")):
        for n in range(3):
            write_audio(root / spk / "read" / f"{n:03d}.wav", seed=10 * s + n)     # same names and sizes
    layout = corpora.detect_layout(root)
    assert layout.duplicates == [] and sorted(layout.speakers) == ["anna", "bert", "carl"]
    summary = quiet_run(root, tmp_path / "out", train_speakers=1, test_speakers=2, utts_per_speaker=3,
                        test_utts_per_speaker=3)
    assert summary["duplicates_dropped"] == []


def test_eval_only_stops_on_two_copies_too(two_copies, tmp_path, capsys):
    assert prepare_data.main(["--root", str(two_copies), "--eval_only", "--out", str(tmp_path / "ev")]) == 2
    assert "found more than once" in capsys.readouterr().err
    assert prepare_data.main(["--root", str(two_copies), "--eval_only", "--out", str(tmp_path / "ev"),
                              "--duplicates", "keep_first"]) == 0
    assert len(read_manifest(tmp_path / "ev" / TEST_NAME)) == 20


# --------------------------------------------------------------------------- 9. names printed escaped
def test_file_names_with_escapes_are_printed_escaped(tmp_path, capsys):
    root = tmp_path / "corpus"
    for spk in ("anna", f"{ESC}[2Jbert", "carl"):
        for n in range(3):
            write_audio(root / spk / f"{spk}-{n}.wav", seed=n)
    write_audio(root / f"{ESC}[32mACCEPT.wav")                       # unassigned: listed in a warning
    assert prepare_data.main(["--root", str(root), "--out", str(tmp_path / "out"), "--train_speakers", "1",
                              "--test_speakers", "2", "--utts_per_speaker", "2", "--test_utts_per_speaker", "2"]) == 0
    captured = capsys.readouterr()
    assert ESC not in captured.out + captured.err and "\\x1b[2Jbert" in captured.out
    bad_list = tmp_path / f"{ESC}[2Jlist.txt"
    assert extract.main(["--list", str(bad_list), "--out", str(tmp_path / "e.npy")]) == 2
    err = capsys.readouterr().err
    assert ESC not in err and "\\x1b[2Jlist.txt" in err
