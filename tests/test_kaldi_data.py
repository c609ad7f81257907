"""Kaldi data folders in, Kaldi archives out (issue 20.5, svlab/kaldi_data.py).

The tiny corpus is written as Kaldi data folders (test side once per recording, once as segments of
long recordings made by joining its files); training and evaluation on them give what the manifests
give, embeddings go out as xvector.ark/.scp and come back through kaldiio unchanged.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import kaldiio
import numpy as np
import pytest
import soundfile as sf
import torch
import yaml

import EER
from conftest import nest, quiet, tiny_overrides
from dataset import SpkTrainDataset
from svlab import config, kaldi_data
from svlab.audio import load_audio
from svlab.errors import DataError
from svlab.manifests import read_manifest, read_trials

torch.set_num_threads(1)


def utt_id(relpath: str) -> str:
    return relpath.replace(".wav", "").replace("/", "-")


def write_kaldi_dir(manifest: Path, root: Path, out: Path, segments: bool = False) -> dict[str, str]:
    """A Kaldi data folder of ``manifest`` (absolute paths in wav.scp, or with ``segments``: one long
    recording per speaker, its files joined with 0.25 s of silence between them, and a segments file).
    Returns ``{utterance id: relpath}``."""
    out.mkdir(parents=True, exist_ok=True)
    utts = read_manifest(manifest)
    ids = {utt_id(u.relpath): u.relpath for u in utts}
    (out / "utt2spk").write_text("".join(f"{utt_id(u.relpath)} {u.speaker}\n" for u in utts))
    by_spk: dict[str, list] = {}
    for u in utts:
        by_spk.setdefault(u.speaker, []).append(u)
    (out / "spk2utt").write_text("".join(f"{s} {' '.join(utt_id(u.relpath) for u in us)}\n"
                                         for s, us in by_spk.items()))
    if not segments:
        (out / "wav.scp").write_text("".join(f"{utt_id(u.relpath)} {root / u.relpath}\n" for u in utts))
        return ids
    wav_lines, seg_lines = [], []
    for spk, us in by_spk.items():
        parts, pos, sr = [], 0, 16000
        for u in us:
            x, sr = sf.read(root / u.relpath, dtype="int16")
            gap = np.zeros(sr // 4, np.int16)
            start, end = (pos + len(gap)) / sr, (pos + len(gap) + len(x)) / sr
            seg_lines.append(f"{utt_id(u.relpath)} rec-{spk} {start!r} {end!r}\n")
            parts += [gap, x]
            pos += len(gap) + len(x)
        rec = out / "audio" / f"{spk}.wav"
        rec.parent.mkdir(exist_ok=True)
        sf.write(rec, np.concatenate(parts + [np.zeros(sr // 4, np.int16)]), sr, subtype="PCM_16")
        wav_lines.append(f"rec-{spk} audio/{spk}.wav\n")  # relative: to test.root / data.root
    (out / "wav.scp").write_text("".join(wav_lines))
    (out / "segments").write_text("".join(seg_lines))
    return ids


def write_kaldi_trials(trials: Path, out: Path) -> None:
    out.write_text("".join(f"{utt_id(t.enroll)} {utt_id(t.test)} {'target' if t.label else 'nontarget'}\n"
                           for t in read_trials(trials)))


@pytest.fixture(scope="module")
def kaldi(tiny_corpus, tmp_path_factory):
    """The tiny corpus as Kaldi folders, a run trained for one epoch on the Kaldi training folder."""
    base = tmp_path_factory.mktemp("kaldi")
    c = tiny_corpus
    train_ids = write_kaldi_dir(c.train_manifest, c.root, base / "data" / "train")
    test_ids = write_kaldi_dir(c.test_manifest, c.root, base / "data" / "test")
    seg_ids = write_kaldi_dir(c.test_manifest, c.root, base / "data" / "test_seg", segments=True)
    write_kaldi_trials(c.trials, base / "data" / "test" / "trials")
    manifest_over = tiny_overrides(c, base, {"train.epochs": 1})
    kaldi_over = {**manifest_over, "data.train_manifest": str(base / "data" / "train"),
                  "test.test_manifest": str(base / "data" / "test"),
                  "test.trials": str(base / "data" / "test" / "trials"), "train.n_folder": "kaldi"}
    import train
    train.train(config.load_config(None, kaldi_over), log=quiet)
    files = {}
    for name, over in (("manifest", manifest_over), ("kaldi", kaldi_over)):
        files[name] = base / f"{name}.yaml"
        files[name].write_text(yaml.safe_dump(nest(over)), encoding="utf-8")
    return dict(base=base, ckpt=base / "runs" / "kaldi" / "checkpoint_001.pth", files=files, train_ids=train_ids,
                test_ids=test_ids, seg_ids=seg_ids, manifest_over=manifest_over, kaldi_over=kaldi_over)


def _evaluate(kaldi, name: str, out: Path, *sets: str) -> dict:
    args = ["--config", str(kaldi["files"][name]), "--checkpoint", str(kaldi["ckpt"]), "--out", str(out),
            "--save_embeddings", "--set", "test.bootstrap=0"]
    for s in sets:
        args += ["--set", s]
    assert EER.main(args) == 0
    return json.loads((out / "metrics.json").read_text())


def _embeddings(out: Path) -> dict[str, np.ndarray]:
    names = (out / "embeddings_index.txt").read_text(encoding="utf-8").split()
    return dict(zip(names, np.load(out / "embeddings.npy")))


def test_a_kaldi_training_folder_gives_the_manifests_training_items(kaldi):
    by_manifest = SpkTrainDataset(config.load_config(None, kaldi["manifest_over"]), log=quiet)
    by_kaldi = SpkTrainDataset(config.load_config(None, kaldi["kaldi_over"]), log=quiet)
    assert [kaldi["train_ids"][u.relpath] for u in by_kaldi.utterances] == [u.relpath for u in by_manifest.utterances]
    assert by_kaldi.labels == by_manifest.labels and by_kaldi.speakers == by_manifest.speakers
    for a, b in zip(by_kaldi.features, by_manifest.features):
        np.testing.assert_array_equal(a, b)
    by_kaldi.set_epoch(3), by_manifest.set_epoch(3)
    np.testing.assert_array_equal(by_kaldi[5][0].numpy(), by_manifest[5][0].numpy())


@pytest.mark.parametrize("folder", ["test", "test_seg"])
def test_evaluating_on_a_kaldi_folder_gives_the_manifests_eer_and_embeddings(kaldi, folder):
    """Same checkpoint, same utterances: the Kaldi folder (files, or segments of joined recordings) and
    trials file give the manifest's embeddings and EER; xvector.ark/.scp hold the same vectors."""
    base = kaldi["base"]
    ref_out, k_out = base / "eval_manifest", base / f"eval_{folder}"
    if not (ref_out / "metrics.json").is_file():
        _evaluate(kaldi, "manifest", ref_out)
    ref = json.loads((ref_out / "metrics.json").read_text())
    got = _evaluate(kaldi, "kaldi", k_out, f"test.test_manifest={base / 'data' / folder}",
                    f"test.root={base / 'data' / folder}")
    assert got["eer"] == ref["eer"] and got["min_dcf_0.01"] == ref["min_dcf_0.01"]
    ids = kaldi["seg_ids"] if folder == "test_seg" else kaldi["test_ids"]
    ref_emb, k_emb = _embeddings(ref_out), _embeddings(k_out)
    assert len(k_emb) == len(ref_emb) == 16
    for key, e in k_emb.items():
        np.testing.assert_allclose(e, ref_emb[ids[key]], rtol=0, atol=1e-6)
    ark = kaldi_data.read_xvectors(k_out / "xvector.scp")
    assert list(ark) == list(k_emb)
    for key, e in ark.items():
        np.testing.assert_array_equal(e, k_emb[key])
    scores = [line.split()[:2] for line in (k_out / "scores.txt").read_text().splitlines()]
    assert scores[0] == (base / "data" / "test" / "trials").read_text().split()[:2]


def test_segments_read_exactly_their_samples(tmp_path):
    sr = 16000
    rec = (np.arange(3 * sr) % 2000 - 1000).astype(np.int16)
    sf.write(tmp_path / "rec.wav", rec, sr, subtype="PCM_16")
    d = tmp_path / "d"
    d.mkdir()
    (d / "wav.scp").write_text(f"r1 {tmp_path / 'rec.wav'}\n")
    (d / "segments").write_text("u1 r1 0.5 1.25\nu2 r1 2.0 -1\nu3 r1 0 0.0625\n")
    (d / "utt2spk").write_text("u1 A\nu2 A\nu3 B\n")
    utts = {u.relpath: u for u in read_manifest(d)}
    assert [u.speaker for u in utts.values()] == ["A", "A", "B"]
    for utt, (a, b) in {"u1": (8000, 20000), "u2": (32000, 48000), "u3": (0, 1000)}.items():
        got = load_audio(utts[utt].path(tmp_path), sr)
        np.testing.assert_array_equal(got, rec[a:b].astype(np.float32) / 32768)


def test_kaldi_trials_labels_and_ids(tmp_path):
    p = tmp_path / "trials"
    p.write_text("u1 u2 target\nu1 u3 nontarget\n\nu2 u3 nontarget\n")
    trials = read_trials(p)
    assert [(t.enroll, t.test, t.label, t.line) for t in trials] == [("u1", "u2", 1, 1), ("u1", "u3", 0, 2),
                                                                     ("u2", "u3", 0, 4)]
    p.write_text("u1 u2 target\nu1 u3 impostor\n")
    with pytest.raises(DataError, match=r"trials: 1 bad line\(s\): line 2: label must be"):
        read_trials(p)


def _folder(tmp_path, **files) -> Path:
    d = tmp_path / "k"
    d.mkdir(exist_ok=True)
    for name, text in {"wav.scp": "a /x/a.wav\nb /x/b.wav\n", "utt2spk": "a S1\nb S2\n", **files}.items():
        if text is not None:
            (d / name.replace("_scp", ".scp")).write_text(text)
    return d


@pytest.mark.parametrize("files, message", [
    (dict(utt2spk="a S1\nb S2\nc S2\n"), r"k/utt2spk: 1 bad line\(s\): line 3: c is not in wav.scp\."),
    (dict(wav_scp="a /x/a.wav\nb sox /x/b.sph -t wav - |\n"),
     r"k/wav.scp: 1 bad line\(s\): line 2: a command \(ends in '\|'\) is not supported"),
    (dict(wav_scp="a -\nb /x/b.wav\n"), r"wav.scp: 1 bad line\(s\): line 1: standard input"),
    (dict(wav_scp="a /x/a.wav\nb /x/feats.ark:123\n"), r"line 2: an archive entry is not supported"),
    (dict(segments="a r1 0 1.5\nb r1 2.0 1.0\n", wav_scp="r1 /x/r.wav\n"),
     r"k/segments: 1 bad line\(s\): line 2: 2.0-1.0 is not a time range"),
    (dict(segments="a r1 0 1.5\nb r2 zero 1\n", wav_scp="r1 /x/r.wav\n"), r"segments: .*line 2: START and END must"),
    (dict(segments="a r1 0 1.5\nb r9 0 1\n", wav_scp="r1 /x/r.wav\n"), r"line 2: recording r9 is not in wav.scp"),
    (dict(spk2utt="S1 a\nS1 b\n"), r"k/spk2utt: 1 bad line\(s\): line 2: b is speaker S1 here, S2 in utt2spk line 2"),
    (dict(utt2spk="a S1 extra\nb S2\n"), r"utt2spk: 1 bad line\(s\): line 1: expected 'UTTERANCE_ID SPEAKER_ID'"),
    (dict(utt2spk=None), r"k is a folder, not a manifest, and not a Kaldi data folder \(no utt2spk\)"),
])
def test_bad_kaldi_folders_give_one_line_naming_file_and_line(tmp_path, files, message):
    d = _folder(tmp_path, **files)
    with pytest.raises(DataError, match=message) as e:
        read_manifest(d)
    assert "\n" not in str(e.value)


def test_a_segment_outside_its_recording_is_one_line(tmp_path):
    sf.write(tmp_path / "r.wav", np.full(16000, 1000, np.int16), 16000, subtype="PCM_16")
    d = _folder(tmp_path, wav_scp=f"r {tmp_path / 'r.wav'}\n", segments="a r 0.5 4.0\nb r 0 0.5\n")
    utt = read_manifest(d)[0]
    with pytest.raises(DataError, match=r"r.wav#t=0.5,4.0: the time range 0.5-4 s is not within the recording "
                                        r"\(1.00 s long\)"):
        load_audio(utt.path(tmp_path), 16000)


def test_xvector_ark_round_trip_through_kaldiio(tmp_path):
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((3, 5)).astype(np.float32)
    notes = []
    ark, scp = kaldi_data.write_xvectors(tmp_path / "stage", emb, ["S1/a.wav", "S1/b c.wav", "u3"],
                                         final_folder=tmp_path / "final", log=notes.append)
    assert notes and "1 name(s) hold whitespace" in notes[0] and "'S1/b_c.wav'" in notes[0]
    lines = scp.read_text().splitlines()
    assert [ln.split()[0] for ln in lines] == ["S1/a.wav", "S1/b_c.wav", "u3"]
    assert all(ln.split()[1].startswith(f"{(tmp_path / 'final').resolve()}/xvector.ark:") for ln in lines)
    # Kaldi's binary Vector<float>: key, space, "\0B", "FV ", the size as a 4-byte int, the floats
    assert ark.read_bytes().startswith(b"S1/a.wav \0BFV \x04" + struct.pack("<i", 5) + emb[0].tobytes())
    (tmp_path / "stage").rename(tmp_path / "final")  # the staged folder swapped in
    back = kaldiio.load_scp(str(tmp_path / "final" / "xvector.scp"))
    for i, key in enumerate(["S1/a.wav", "S1/b_c.wav", "u3"]):
        assert back[key].dtype == np.float32 and back[key].shape == (5,)
        np.testing.assert_array_equal(back[key], emb[i])
    assert dict(kaldiio.load_ark(str(tmp_path / "final" / "xvector.ark"))).keys() == back.keys()
    with pytest.raises(DataError, match="are both Kaldi key 'a_b'"):
        kaldi_data.write_xvectors(tmp_path / "x", emb[:2], ["a b", "a\tb"], log=quiet)
