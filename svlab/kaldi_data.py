"""Kaldi data folders in, Kaldi archives out.

A Kaldi data folder works wherever a manifest does (``data.train_manifest``, ``test.test_manifest``,
``validation.manifest``: ``svlab.manifests.read_manifest`` hands a folder to ``read_data_dir``):

    wav.scp    RECORDING_ID PATH          a WAV/FLAC file; relative paths are relative to data.root /
                                          test.root (Kaldi: to the recipe folder)
    utt2spk    UTTERANCE_ID SPEAKER_ID    the utterances, in this order
    spk2utt    SPEAKER_ID UTT1 UTT2 ...   optional; must agree with utt2spk
    segments   UTTERANCE_ID RECORDING_ID START END    optional: each utterance is seconds START..END of a
                                          recording (END -1: to its end); only that range is read

The utterance ids are the utterances' keys, so a Kaldi ``trials`` file (``ENROLL TEST target|nontarget``,
ids of the test folder) is a trial list as it is (``svlab.manifests.read_trials``). A segment's audio is
``PATH#t=START,END`` (``svlab.audio.split_range``). Extended filenames (``sox ... |`` commands, ``-``,
``ark:offset``) are refused with one line: run the command once per file and list the files. Every problem
of a file is reported together, in one ``DataError`` naming the file and the lines.

Embeddings go out as ``xvector.ark`` / ``xvector.scp`` (``write_xvectors``, through ``kaldiio``: float32
vectors, readable by ``kaldiio.load_scp`` and Kaldi's ``copy-vector``/``ivector-*`` tools). Kaldi keys
hold no whitespace: a manifest's relpath with a space is written with ``_`` (``kaldi_key``), in one note.
"""
from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np

from svlab.audio import audio_range
from svlab.errors import DataError
from svlab.feature_store import kaldi_key  # whitespace -> '_': the store's keys and these are the same rule
from svlab.files import atomic_write
from svlab.text import printable

FILES = ("wav.scp", "utt2spk", "spk2utt", "segments")
MAX_LISTED = 20  # problems listed in one message; the rest are counted
XVECTOR_ARK, XVECTOR_SCP = "xvector.ark", "xvector.scp"


def is_data_dir(path) -> bool:
    """True for a folder holding ``wav.scp`` and ``utt2spk``."""
    path = Path(path)
    return (path / "wav.scp").is_file() and (path / "utt2spk").is_file()


def _lines(path: Path) -> list[tuple[int, list[str], str]]:
    """``(line number, fields, rest after the first field)`` of each non-blank line."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{printable(path)}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    out = []
    for n, raw in enumerate(text.splitlines(), start=1):
        fields = raw.split()
        if fields:
            out.append((n, fields, raw.strip()[len(fields[0]):].strip()))
    return out


def _raise(path: Path, problems: list[str], fix: str) -> None:
    if problems:
        more = f" (and {len(problems) - MAX_LISTED} more)" if len(problems) > MAX_LISTED else ""
        raise DataError(f"{printable(path)}: {len(problems)} bad line(s): {'; '.join(problems[:MAX_LISTED])}{more}. "
                        f"{fix}")


def _extended(target: str) -> str | None:
    """Why a wav.scp target is not a plain file name (a Kaldi extended filename), else None."""
    if target.endswith("|"):
        return "a command (ends in '|')"
    if target == "-":
        return "standard input ('-')"
    if re.search(r"\.ark:\d+$", target) or re.match(r"^(ark|scp),?\w*:", target):
        return "an archive entry"
    return None


def read_wav_scp(path: Path) -> dict[str, tuple[str, int]]:
    """``{recording id: (audio path as written, line)}`` of a ``wav.scp``."""
    out, problems = {}, []
    for n, fields, rest in _lines(path):
        if len(fields) < 2:
            problems.append(f"line {n}: expected 'RECORDING_ID PATH', got {fields[0][:60]!r} alone")
            continue
        why = _extended(rest)
        if why:
            problems.append(f"line {n}: {why} is not supported ({rest[:60]!r})")
            continue
        if fields[0] in out:
            problems.append(f"line {n}: {fields[0]} already listed on line {out[fields[0]][1]}")
            continue
        out[fields[0]] = (rest, n)
    _raise(path, problems, "Each line must be 'RECORDING_ID PATH' of a WAV/FLAC file (convert piped or archived "
                           "audio to files once, e.g. with sox or ffmpeg, and list those)")
    return out


def read_utt2spk(path: Path) -> dict[str, tuple[str, int]]:
    """``{utterance id: (speaker id, line)}`` of a ``utt2spk``, in file order."""
    out, problems = {}, []
    for n, fields, _ in _lines(path):
        if len(fields) != 2:
            problems.append(f"line {n}: expected 'UTTERANCE_ID SPEAKER_ID', got {len(fields)} field(s)")
        elif fields[0] in out:
            problems.append(f"line {n}: {fields[0]} already listed on line {out[fields[0]][1]}")
        else:
            out[fields[0]] = (fields[1], n)
    _raise(path, problems, "Each line must be 'UTTERANCE_ID SPEAKER_ID', each utterance listed once")
    if not out:
        raise DataError(f"{printable(path)}: lists no utterances")
    return out


def check_spk2utt(path: Path, utt2spk: dict[str, tuple[str, int]]) -> None:
    """A ``DataError`` naming every line of ``spk2utt`` that disagrees with ``utt2spk`` (and every
    utterance of utt2spk it leaves out)."""
    problems, listed = [], {}
    for n, fields, _ in _lines(path):
        spk = fields[0]
        if len(fields) < 2:
            problems.append(f"line {n}: speaker {spk} has no utterances")
        for utt in fields[1:]:
            if utt in listed:
                problems.append(f"line {n}: {utt} already listed on line {listed[utt]}")
                continue
            listed[utt] = n
            if utt not in utt2spk:
                problems.append(f"line {n}: {utt} is not in utt2spk")
            elif utt2spk[utt][0] != spk:
                problems.append(f"line {n}: {utt} is speaker {spk} here, {utt2spk[utt][0]} in utt2spk line "
                                f"{utt2spk[utt][1]}")
    missing = [u for u in utt2spk if u not in listed]
    if missing:
        problems.append(f"{len(missing)} utterance(s) of utt2spk are missing (e.g. {missing[0]})")
    _raise(path, problems, "spk2utt must list the same utterances as utt2spk (Kaldi: "
                           "utils/utt2spk_to_spk2utt.pl utt2spk > spk2utt)")


def read_segments(path: Path, recordings: dict) -> dict[str, tuple[str, float, float | None, int]]:
    """``{utterance id: (recording id, start s, end s or None, line)}`` of a ``segments`` file; every
    recording must be in ``wav.scp`` (``recordings``)."""
    out, problems = {}, []
    for n, fields, _ in _lines(path):
        if len(fields) != 4:
            problems.append(f"line {n}: expected 'UTTERANCE_ID RECORDING_ID START END', got {len(fields)} field(s)")
            continue
        utt, rec = fields[0], fields[1]
        try:
            start, end = float(fields[2]), float(fields[3])
        except ValueError:
            problems.append(f"line {n}: START and END must be seconds, got {fields[2]!r} {fields[3]!r}")
            continue
        if not (np.isfinite(start) and np.isfinite(end)) or start < 0 or (end != -1 and end <= start):
            problems.append(f"line {n}: {fields[2]}-{fields[3]} is not a time range (0 <= START < END, or END -1)")
        elif rec not in recordings:
            problems.append(f"line {n}: recording {rec} is not in wav.scp")
        elif utt in out:
            problems.append(f"line {n}: {utt} already listed on line {out[utt][3]}")
        else:
            out[utt] = (rec, start, None if end == -1 else end, n)
    _raise(path, problems, "Each line must be 'UTTERANCE_ID RECORDING_ID START_SECONDS END_SECONDS' of a "
                           "recording in wav.scp")
    return out


def read_data_dir(folder) -> list[tuple[str, str, int, str]]:
    """The utterances of a Kaldi data folder, in ``utt2spk`` order: ``(speaker, utterance id, line of
    utt2spk, audio)``, the audio as ``svlab.manifests.Utterance.audio`` takes it (wav.scp's path, with
    the segment's ``#t=`` range). One ``DataError`` for a folder that is not a data folder, and one per
    file for its bad lines (an utterance of utt2spk without audio names its line there)."""
    folder = Path(folder)
    missing = [name for name in ("wav.scp", "utt2spk") if not (folder / name).is_file()]
    if missing:
        raise DataError(f"{printable(folder)} is a folder, not a manifest, and not a Kaldi data folder (no "
                        f"{' or '.join(missing)}); point the key at a manifest file or at a folder with wav.scp "
                        "and utt2spk")
    wavs = read_wav_scp(folder / "wav.scp")
    utt2spk = read_utt2spk(folder / "utt2spk")
    if (folder / "spk2utt").is_file():
        check_spk2utt(folder / "spk2utt", utt2spk)
    segments = read_segments(folder / "segments", wavs) if (folder / "segments").is_file() else None
    out, problems = [], []
    for utt, (spk, n) in utt2spk.items():
        if segments is None:
            if utt not in wavs:
                problems.append(f"line {n}: {utt} is not in wav.scp")
                continue
            out.append((spk, utt, n, wavs[utt][0]))
        elif utt not in segments:
            problems.append(f"line {n}: {utt} is not in segments")
        else:
            rec, start, end, _ = segments[utt]
            out.append((spk, utt, n, str(audio_range(wavs[rec][0], start, end))))
    _raise(folder / "utt2spk", problems, f"Every utterance needs its audio in {'segments' if segments else 'wav.scp'} "
                                         "(Kaldi: utils/fix_data_dir.sh drops the others)")
    return out


# --------------------------------------------------------------------------- out: embeddings
def write_xvectors(folder, emb: np.ndarray, names: list[str], final_folder=None, log=print) -> tuple[Path, Path]:
    """``folder/xvector.ark`` (float32 vectors, Kaldi binary) and ``folder/xvector.scp`` (``KEY ARK:OFFSET``),
    one entry per row of ``emb`` keyed by ``names`` (``kaldi_key``: one note counts the renamed ones;
    two names that become one key are a DataError). The scp names the ark by its absolute path in
    ``final_folder`` (default ``folder``): where it will be once a staged folder is swapped in. Both
    files are written atomically. Returns their paths in ``folder``."""
    folder = Path(folder)
    final = Path(final_folder if final_folder is not None else folder).resolve()
    emb = np.asarray(emb, dtype=np.float32)
    if emb.ndim != 2 or len(emb) != len(names):
        raise ValueError(f"embeddings {emb.shape} do not fit {len(names)} names")
    keys = [kaldi_key(n) for n in names]
    first: dict[str, str] = {}
    for name, key in zip(names, keys):
        if key in first:
            raise DataError(f"{printable(first[key])!r} and {printable(name)!r} are both Kaldi key {key!r} (whitespace "
                            f"becomes '_'); rename one of the files")
        first[key] = name
    renamed = [(n, k) for n, k in zip(names, keys) if n != k]
    if renamed:
        log(f"note: {len(renamed)} name(s) hold whitespace, which Kaldi keys cannot: written with '_' in "
            f"{XVECTOR_ARK} (e.g. {printable(renamed[0][0])!r} -> {printable(renamed[0][1])!r})")
    import kaldiio
    offsets: list[str] = []

    def write_ark(tmp: Path) -> None:
        scp = io.StringIO()
        with open(tmp, "wb") as fh:
            kaldiio.save_ark(fh, {k: emb[i] for i, k in enumerate(keys)}, scp=scp)
        offsets[:] = [line.rsplit(":", 1)[1] for line in scp.getvalue().splitlines()]
    ark, scp_path = folder / XVECTOR_ARK, folder / XVECTOR_SCP
    atomic_write(ark, write_ark)
    text = "".join(f"{k} {final / XVECTOR_ARK}:{o}\n" for k, o in zip(keys, offsets))
    atomic_write(scp_path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return ark, scp_path


def read_xvectors(scp) -> dict[str, np.ndarray]:
    """``{key: float32 vector}`` of an ``xvector.scp`` (through ``kaldiio``), in file order."""
    import kaldiio
    return {k: np.asarray(v, dtype=np.float32) for k, v in kaldiio.load_scp(str(scp)).items()}
