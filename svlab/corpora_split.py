"""Choosing a corpus's training and test speakers and writing the lab's three manifests.

``prepare`` turns what ``svlab.corpora.detect_layout`` found into ``split_train_set.txt`` and
``test_set.txt`` (``SPEAKER RELPATH``, paths relative to the corpus root with ``/``) and ``trials.txt``
(``ENROLL TEST LABEL``, 1 = same speaker): disjoint, seeded speakers (the official AISHELL-1 test
speakers first), so the same seed gives the same files. ``prepare_eval_only`` writes an evaluation set
from every speaker of another corpus.

The manifests replace only files this command wrote earlier (recorded by content hash in the output
folder's ``.svlab-written.json``) or the demo corpus's own manifests; anything else in the way (a
corpus's own ``trials.txt``, a hand-made list) stops the run before any work, with one line.
"""
from __future__ import annotations

import os
import random
from pathlib import Path

import soundfile as sf

from svlab.config import FILES_DIR
from svlab.corpora import (TEST_NAME, TRAIN_NAME, TRIALS_NAME, detect_layout, extract_pending, relative_posix,
                           resolve_duplicates)
from svlab.corpora_config import config_values
from svlab.errors import PrepareError
from svlab.files import WrittenFiles, refuse_file_as_folder, refuse_overwrite, shown
from svlab.text import printable

# Which official splits test and training speakers are drawn from, in order of preference.
TEST_PREFERENCE = ("test", "dev", "train", "other")
TRAIN_PREFERENCE = ("train", "dev", "other", "test")
ENUMERATE_LIMIT = 5_000_000        # above this many candidate pairs, sample trials without listing them all
MANY_TRIALS = 1_000_000            # warn (suggest --max_trials) above this many trials
LISTED = 20                        # speakers named in messages before "... and N more"
COMMAND = "tools/prepare_data.py"  # who the record of written manifests names


# --------------------------------------------------------------------------- choosing speakers and utterances
def _names(items, limit: int = LISTED) -> str:
    items = [shown(item) for item in items]
    listed = ", ".join(items[:limit])
    return listed + (f" ... and {len(items) - limit} more" if len(items) > limit else "")


def _choose(rng: random.Random, groups: list[list[str]], n: int) -> list[str]:
    """``n`` speakers, taking whole groups in order of preference and a seeded sample of the last one."""
    chosen: list[str] = []
    for group in groups:
        need = n - len(chosen)
        if need <= 0:
            break
        group = sorted(set(group) - set(chosen))
        chosen += group if len(group) <= need else rng.sample(group, need)
    return sorted(chosen)


def _pick_utterances(relpaths: list[str], k: int, seed: int, speaker: str) -> list[str]:
    if k <= 0 or k >= len(relpaths):
        return sorted(relpaths)
    return sorted(random.Random(f"{seed}/{speaker}").sample(sorted(relpaths), k))


def _split_counts(speakers, splits) -> str:
    counts = {}
    for s in speakers:
        counts[splits.get(s) or "other"] = counts.get(splits.get(s) or "other", 0) + 1
    return ", ".join(f"{counts[k]} {k}" for k in ("train", "dev", "test", "other") if k in counts)


def select_speakers(speakers: dict[str, list[str]], splits: dict[str, str], aishell: bool, seed: int,
                    train_speakers: int, need_train: int, test_speakers: int, need_test: int):
    """Seeded, disjoint choice: test speakers first (official test split preferred), then training ones.

    Returns ``(train, test, ok_train, ok_test)``: the chosen speakers (sorted) and the speakers with
    enough utterances for each role.
    """
    ok_train = {s for s, u in speakers.items() if len(u) >= need_train}
    ok_test = {s for s, u in speakers.items() if len(u) >= need_test}
    rng = random.Random(seed)

    def groups(pool, order):
        if not aishell:
            return [sorted(pool)]
        return [[s for s in sorted(pool) if (splits.get(s) or "other") == k] for k in order]
    test = _choose(rng, groups(ok_test, TEST_PREFERENCE), test_speakers)
    train = _choose(rng, groups(ok_train - set(test), TRAIN_PREFERENCE), train_speakers)
    return train, test, ok_train, ok_test


def _suggest(speakers, splits, aishell, seed, train_speakers, need_train, test_speakers, need_test) -> str | None:
    """Flags that would work: fewer utterances per speaker (same speaker counts), else fewer speakers,
    else both."""
    pick = lambda k_train, n_test, k_test: select_speakers(  # noqa: E731
        speakers, splits, aishell, seed, train_speakers, k_train, n_test, k_test)
    k_test = next((k for k in range(need_test, 0, -1) if len(pick(1, test_speakers, k)[1]) == test_speakers), None)
    if k_test is not None:
        k_train = next((k for k in range(need_train, 0, -1)
                        if len(pick(k, test_speakers, k_test)[0]) == train_speakers), None)
        if k_train is not None:
            flags = [f"--utts_per_speaker {k_train}"] if k_train != need_train else []
            flags += [f"--test_utts_per_speaker {k_test}"] if k_test != need_test else []
            if flags:
                return " ".join(flags)
    for k in range(max(need_train, need_test), 0, -1):
        k_train, k_test = min(need_train, k), min(need_test, k)
        n_any = len({s for s, u in speakers.items() if len(u) >= min(k_train, k_test)})
        for n_test in dict.fromkeys((test_speakers, max(min(2, n_any - 1), min(test_speakers, n_any // 5)))):
            if n_test < 1:
                continue
            train, test, _, _ = select_speakers(speakers, splits, aishell, seed, train_speakers, k_train, n_test, k_test)
            if len(test) == n_test and train:
                flags = []
                if len(train) < train_speakers or n_test != test_speakers:
                    flags.append(f"--train_speakers {len(train)}")
                if n_test != test_speakers:
                    flags.append(f"--test_speakers {n_test}")
                if k_train != need_train:
                    flags.append(f"--utts_per_speaker {k_train}")
                if k_test != need_test:
                    flags.append(f"--test_utts_per_speaker {k_test}")
                return " ".join(flags)
    return None


# --------------------------------------------------------------------------- trials
def _pairs_within(blocks: list[tuple[int, int]]):
    for a, b in blocks:
        for i in range(a, b):
            for j in range(i + 1, b):
                yield i, j


def _pairs_across(owner: list[int]):
    n = len(owner)
    for i in range(n):
        for j in range(i + 1, n):
            if owner[i] != owner[j]:
                yield i, j


def _sample_pairs(rng, want, total, enumerate_fn, draw_fn) -> list[tuple[int, int]]:
    if want >= total:
        return list(enumerate_fn())
    if total <= ENUMERATE_LIMIT:
        return rng.sample(list(enumerate_fn()), want)
    chosen: set[tuple[int, int]] = set()
    while len(chosen) < want:
        pair = draw_fn()
        if pair is not None:
            chosen.add(pair)
    return list(chosen)


def trial_pairs(test_speakers: list[str], max_trials: int | None, rng: random.Random):
    """Index pairs ``(i, j, label)`` (i < j) over the test utterances, speakers given per utterance.

    All unordered pairs, or, with ``max_trials``, a seeded sample of at most that many with half
    target and half non-target trials (the rarer class whole when it has fewer). Returns
    ``(iterator, n_target, n_nontarget)``; utterances of one speaker must be contiguous.
    """
    n = len(test_speakers)
    blocks, owner, start = [], [], 0
    for i in range(1, n + 1):
        if i == n or test_speakers[i] != test_speakers[start]:
            blocks.append((start, i))
            start = i
    for b, (a, e) in enumerate(blocks):
        owner += [b] * (e - a)
    n_target = sum((e - a) * (e - a - 1) // 2 for a, e in blocks)
    n_non = n * (n - 1) // 2 - n_target
    if max_trials is None or max_trials >= n_target + n_non:
        def every():
            for i in range(n):
                for j in range(i + 1, n):
                    yield i, j, int(owner[i] == owner[j])
        return every(), n_target, n_non
    want_t = min(n_target, max_trials // 2)
    want_n = min(n_non, max_trials - want_t)
    want_t = min(n_target, max_trials - want_n)

    def draw_target():
        a, e = blocks[rng.randrange(len(blocks))]
        if e - a < 2:
            return None
        i, j = sorted(rng.sample(range(a, e), 2))
        return i, j

    def draw_non():
        i, j = sorted(rng.sample(range(n), 2))
        return (i, j) if owner[i] != owner[j] else None

    targets = _sample_pairs(rng, want_t, n_target, lambda: _pairs_within(blocks), draw_target)
    nons = _sample_pairs(rng, want_n, n_non, lambda: _pairs_across(owner), draw_non)
    pairs = sorted([(i, j, 1) for i, j in targets] + [(i, j, 0) for i, j in nons])
    return iter(pairs), len(targets), len(nons)


# --------------------------------------------------------------------------- the whole preparation
def _printable_log(log):
    """``log`` with every line through ``svlab.text.printable`` (file names and speakers come from outside)."""
    return lambda message: log(printable(message))


def _hours(root: Path, relpaths: list[str], problems: list[str]) -> float:
    """Total duration in hours; files soundfile cannot read are appended to ``problems``."""
    seconds = 0.0
    for rel in relpaths:
        try:
            seconds += sf.info(str(root / rel)).duration
        except Exception as e:  # soundfile raises several types for unreadable files
            problems.append(f"{rel} ({str(e).strip()[:80]})")
    return seconds / 3600.0


def _write_lines(path: Path, lines) -> None:
    """``lines`` with ``\\n`` endings on every system (the same seed gives the same bytes), recorded as
    this command's output in the folder's ``WrittenFiles``."""
    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            for line in lines:
                f.write(line + "\n")
    WrittenFiles(path.parent, COMMAND).write(path, write)


def _is_demo_manifest(path: Path) -> bool:
    """Whether ``path`` holds the demo corpus's manifest of that name (files/ as shipped; any line ends)."""
    from svlab import demo_corpus
    lines = demo_corpus.manifests(demo_corpus.DEFAULTS).get(path.name)
    try:
        return lines is not None and path.stat().st_size < 64 << 20 and \
            path.read_text(encoding="utf-8-sig").splitlines() == lines
    except (OSError, UnicodeDecodeError):
        return False


def check_outputs(out: Path, names, inputs=()) -> None:
    """Refuse (``OutputError``, one line) manifests in ``out`` that would replace an input or a file this
    command did not write (see the module docstring)."""
    out = Path(out)
    refuse_file_as_folder(out)
    record = WrittenFiles(out, COMMAND)
    for name in names:
        refuse_overwrite(out / name, inputs=inputs, ours=lambda p: record.wrote(p) or _is_demo_manifest(p),
                         flag=None, command=COMMAND, recognised_by="written by it and unchanged since, or the "
                         "demo's manifest", fix="pass another --out folder, or move that file away first")


def prepare(root: str | os.PathLike, out: str | os.PathLike = FILES_DIR, *, seed: int = 0,
            train_speakers: int = 300, utts_per_speaker: int = 10, test_speakers: int = 20,
            test_utts_per_speaker: int = 10, max_trials: int | None = None, extract: bool = False,
            dry_run: bool = False, duplicates: str = "stop", inputs=(), log=print) -> dict:
    """Detect the layout under ``root``, choose speakers and utterances, write the three manifests.

    ``utts_per_speaker`` / ``test_utts_per_speaker`` 0 means all utterances of each chosen speaker.
    ``duplicates``: what to do with an utterance found twice (``svlab.corpora.resolve_duplicates``).
    ``inputs``: other paths the manifests may not replace (``svlab.files.refuse_overwrite``).
    Returns a summary dict (layout, chosen speakers, counts, hours, trial counts, warnings, config keys).
    Raises PrepareError (message for the user) when the corpus cannot give what was asked.
    """
    root, out = Path(root), Path(out)
    warnings: list[str] = []
    log = _printable_log(log)

    def warn(msg: str) -> None:
        warnings.append(msg)
        log(f"warning: {msg}")

    outputs = (TRAIN_NAME, TEST_NAME, TRIALS_NAME)
    if not dry_run:
        check_outputs(out, outputs, inputs)         # before any work (and before unpacking anything)
    layout = detect_layout(root)
    extracted: list[Path] = []
    conflicts: list[str] = []
    if layout.pending_archives:
        names = _names([relative_posix(p, root) for p in layout.pending_archives], 5)
        if extract and not dry_run:
            log(f"unpacking {len(layout.pending_archives)} archive(s) next to themselves: {names}")
            for _ in range(3):      # data_aishell.tgz holds wav/SXXXX.tar.gz: unpack those next
                extracted += extract_pending(layout, log, conflicts)
                layout = detect_layout(root)
                if not layout.pending_archives:
                    break
            if conflicts:
                warn(f"{len(conflicts)} archive member(s) not unpacked because a file the unpacking did not "
                     "create was in the way (listed above); those files were kept as they are")
        elif extract:
            log(f"dry run: would unpack {len(layout.pending_archives)} archive(s): {names}")
        elif not layout.speakers:
            raise PrepareError(f"found {len(layout.pending_archives)} archive(s) under {shown(root)} ({names}) but no "
                               "unpacked audio; add --extract to unpack them (next to the archives, safely)")
        else:
            warn(f"{len(layout.pending_archives)} archive(s) not unpacked and ignored: {names}; "
                 "add --extract to unpack and use them")
    if not layout.speakers:
        if dry_run and layout.pending_archives:
            log("dry run: nothing written (the audio is still in archives)")
            return {"layout": layout.kind, "description": layout.description, "dry_run": True,
                    "pending_archives": layout.pending_archives, "warnings": warnings}
        raise PrepareError(f"no speakers found under {shown(root)}: {len(layout.unassigned)} audio file(s) but none "
                           "in a speaker folder or with an AISHELL name; see python tools/prepare_data.py --help "
                           "for the layouts")
    layout = resolve_duplicates(layout, duplicates, log)

    spk_utts = layout.speakers
    splits = layout.splits
    log(f"layout: {layout.kind}: {layout.description}")
    log(f"found: {len(spk_utts)} speakers, {layout.n_utterances} utterances under {shown(root)}"
        + (f" ({_split_counts(spk_utts, splits)} speakers by official split)" if layout.aishell else ""))
    if layout.unassigned:
        warn(f"{len(layout.unassigned)} audio file(s) without a recognisable speaker ignored, "
             f"e.g. {_names(layout.unassigned, 3)}")

    need_train, need_test = max(1, utts_per_speaker), max(1, test_utts_per_speaker)
    choice = (spk_utts, splits, layout.aishell, seed)
    chosen_train, chosen_test, ok_train, ok_test = select_speakers(*choice, train_speakers, need_train,
                                                                   test_speakers, need_test)
    skipped_train = {s: len(u) for s, u in spk_utts.items() if s not in ok_train}
    skipped_test = {s: len(u) for s, u in spk_utts.items() if s not in ok_test}

    def report_skipped(skipped: dict, need: int, role: str) -> None:
        if skipped:
            listed = _names([f"{s} ({n})" for s, n in skipped.items()])
            log(f"skipped for {role}: {len(skipped)} speaker(s) with fewer than {need} utterances: {listed}")

    if skipped_train == skipped_test:
        report_skipped(skipped_train, need_train, "training and test")
    else:
        report_skipped(skipped_train, need_train, "training")
        report_skipped(skipped_test, need_test, "test")

    if len(chosen_test) < test_speakers or not chosen_train:
        n_both = len(ok_train | ok_test)
        listed = f" ({_names(sorted(ok_train | ok_test), 5)})" if n_both else ""
        if need_train == need_test:
            what = (f"asked for {train_speakers} training + {test_speakers} test speakers with >= {need_train} "
                    f"utterances each, but {shown(root)} has only {n_both}{listed}")
        else:
            what = (f"asked for {train_speakers} training speakers with >= {need_train} utterances and "
                    f"{test_speakers} test speakers with >= {need_test}, but {shown(root)} has {len(ok_train)} and "
                    f"{len(ok_test)} such speakers{listed}")
        flags = _suggest(*choice, train_speakers, need_train, test_speakers, need_test)
        hint = (f"run with e.g. {flags}" if flags else
                f"a train/test split needs at least 2 speakers with utterances ({len(spk_utts)} found)")
        raise PrepareError(f"not enough speakers: {what}; {hint}")
    if len(chosen_train) < train_speakers:
        warn(f"only {len(chosen_train)} of the {train_speakers} requested training speakers are available "
             f"(with >= {need_train} utterances, not used for testing); using all of them")

    test_rows = [(s, r) for s in chosen_test for r in _pick_utterances(spk_utts[s], test_utts_per_speaker, seed, s)]
    train_rows = [(s, r) for s in chosen_train for r in _pick_utterances(spk_utts[s], utts_per_speaker, seed, s)]
    assert not set(chosen_test) & set(chosen_train)

    problems: list[str] = []
    train_hours = _hours(root, [r for _, r in train_rows], problems)
    test_hours = _hours(root, [r for _, r in test_rows], problems)
    if problems:
        warn(f"{len(problems)} file(s) soundfile cannot read (training stops on them unless "
             f"data.bad_audio: skip): {_names(problems, 5)}")

    def per(k: int) -> str:
        return "all" if k <= 0 else str(k)

    origin = lambda chosen: f" [{_split_counts(chosen, splits)}]" if layout.aishell else ""  # noqa: E731
    log(f"test:  {len(chosen_test)} speaker(s) x {per(test_utts_per_speaker)} utterances = {len(test_rows)} "
        f"({test_hours:.2f} h){origin(chosen_test)}: {_names(chosen_test)}")
    log(f"train: {len(chosen_train)} speaker(s) x {per(utts_per_speaker)} utterances = {len(train_rows)} "
        f"({train_hours:.2f} h){origin(chosen_train)}: {_names(chosen_train)}")

    log(f"total: {len(train_rows) + len(test_rows)} utterances, {train_hours + test_hours:.2f} h of audio")
    pairs, n_target, n_non = trial_pairs([s for s, _ in test_rows], max_trials, random.Random(f"{seed}/trials"))
    log(f"trials: {n_target + n_non} ({n_target} target, {n_non} non-target)"
        + ("" if max_trials is None else f", at most {max_trials} requested"))
    if n_target == 0:
        warn("no target trials (one utterance per test speaker): use --test_utts_per_speaker 2 or more")
    if n_non == 0:
        warn("no non-target trials (one test speaker): an EER needs both kinds; use --test_speakers 2 or more")
    if n_target + n_non > MANY_TRIALS:
        warn(f"{n_target + n_non} trials is slow to score; consider --max_trials 100000")

    values = config_values(root, out)
    summary = {
        "layout": layout.kind, "description": layout.description, "root": root, "out": out, "seed": seed,
        "train_speakers": chosen_train, "test_speakers": chosen_test,
        "train_utterances": len(train_rows), "test_utterances": len(test_rows),
        "train_hours": train_hours, "test_hours": test_hours,
        "trials": n_target + n_non, "target_trials": n_target, "nontarget_trials": n_non,
        "skipped_train": skipped_train, "skipped_test": skipped_test,
        "extracted": extracted, "pending_archives": layout.pending_archives, "unreadable": problems,
        "extract_conflicts": conflicts, "duplicates_dropped": layout.dropped,
        "warnings": warnings, "config": values, "dry_run": dry_run, "written": [],
    }
    if dry_run:
        log("dry run: nothing written")
        return summary
    check_outputs(out, outputs, inputs)             # again: the work may have taken long
    _write_lines(out / TRAIN_NAME, (f"{s} {r}" for s, r in train_rows))
    _write_lines(out / TEST_NAME, (f"{s} {r}" for s, r in test_rows))
    _write_lines(out / TRIALS_NAME, (f"{test_rows[i][1]} {test_rows[j][1]} {label}" for i, j, label in pairs))
    summary["written"] = [out / TRAIN_NAME, out / TEST_NAME, out / TRIALS_NAME]
    log(f"wrote {', '.join(shown(p) for p in summary['written'])}")
    return summary



def prepare_eval_only(root: Path, out: Path, seed: int = 0, test_utts_per_speaker: int = 0,
                      max_trials: int | None = None, duplicates: str = "stop", inputs=(), log=print) -> dict:
    """An evaluation set from every speaker under ``root``: ``test_set.txt`` and ``trials.txt`` only.

    For scoring a trained model on another corpus (e.g. the AISHELL sample): all speakers are test
    speakers, ``test_utts_per_speaker`` (0 = all) of their utterances in name order, all pairs (or a
    balanced sample of ``max_trials``). ``duplicates``, ``inputs``: as for ``prepare``. Returns
    ``{"speakers", "utterances", "n_target", "n_nontarget"}``.
    """
    log = _printable_log(log)
    root, out = Path(root), Path(out)
    check_outputs(out, (TEST_NAME, TRIALS_NAME), inputs)
    speakers = resolve_duplicates(detect_layout(root), duplicates, log).speakers
    rows = [(spk, rel) for spk in sorted(speakers)
            for rel in sorted(speakers[spk])[: test_utts_per_speaker or None]]
    if len({spk for spk, _ in rows}) < 2:
        raise PrepareError(f"{shown(root)}: an evaluation set needs at least 2 speakers, found {len(speakers)}")
    pairs, n_t, n_n = trial_pairs([spk for spk, _ in rows], max_trials, random.Random(seed))
    out.mkdir(parents=True, exist_ok=True)
    check_outputs(out, (TEST_NAME, TRIALS_NAME), inputs)
    _write_lines(out / TEST_NAME, (f"{spk} {rel}" for spk, rel in rows))
    _write_lines(out / TRIALS_NAME, (f"{rows[i][1]} {rows[j][1]} {lab}" for i, j, lab in pairs))
    log(f"evaluation set: {len(speakers)} speakers, {len(rows)} utterances, {n_t} target / {n_n} non-target "
        f"trials in {shown(out)}; score it with: python EER.py --set test.root={shown(root)} "
        f"--set test.test_manifest={shown(out / TEST_NAME)} --set test.trials={shown(out / TRIALS_NAME)} ...")
    return {"speakers": sorted(speakers), "utterances": len(rows), "n_target": n_t, "n_nontarget": n_n}

