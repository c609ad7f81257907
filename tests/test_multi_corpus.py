"""Several training corpora at once (issue 19.3): ``data.corpora``, speakers kept apart per corpus.

Corpus ``a`` is the tiny corpus; corpus ``b`` holds three of its speakers' files under another root
with the same speaker ids, so the ids collide: they must train as separate classes.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

import EER
import train
from conftest import quiet, tiny_overrides
from svlab.checkpoint import load_checkpoint
from svlab.config import load_config
from svlab.errors import ConfigError, DataError
from svlab.feature_cache import load_training_items
from svlab.manifests import Utterance, check_training_data, overlap_warning


@pytest.fixture(scope="module")
def corpora(tiny_corpus, tmp_path_factory):
    base = tmp_path_factory.mktemp("second_corpus")
    lines = [ln.split() for ln in tiny_corpus.train_manifest.read_text(encoding="utf-8").splitlines() if ln.strip()]
    shared = sorted({spk for spk, _ in lines})[:3]
    kept = [(spk, rel) for spk, rel in lines if spk in shared]
    for _, rel in kept:
        (base / "audio" / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tiny_corpus.root / rel, base / "audio" / rel)
    manifest = base / "train.txt"
    manifest.write_text("".join(f"{spk} {rel}\n" for spk, rel in kept), encoding="utf-8")
    return [{"name": "a", "root": str(tiny_corpus.root), "train_manifest": str(tiny_corpus.train_manifest)},
            {"name": "b", "root": str(base / "audio"), "train_manifest": str(manifest)}], shared, len(kept)


def corpus_config(tiny_corpus, work, corpora, extra=None):
    overrides = tiny_overrides(tiny_corpus, work, {"data.corpora": corpora, **(extra or {})})
    for key in ("data.root", "data.train_manifest"):  # data.corpora replaces them
        overrides.pop(key)
    return load_config(None, overrides)


def test_colliding_speaker_ids_train_as_separate_classes(corpora, tiny_corpus, tmp_path, capsys):
    lists, shared, n_b = corpora
    cfg = corpus_config(tiny_corpus, tmp_path, lists, {"train.epochs": 1})
    utts = check_training_data(cfg)
    assert len(utts) == 32 + n_b
    assert {u.speaker for u in utts} == {f"a:{s}" for s in {u.speaker[2:] for u in utts[:32]}} | {
        f"b:{s}" for s in shared}
    assert all(Path(u.relpath).is_absolute() for u in utts)

    result = train.train(cfg, log=quiet)
    state = load_checkpoint(result["run_folder"] / "checkpoint_001.pth")
    assert len(state["speakers"]) == 8 + 3
    for s in shared:
        assert f"a:{s}" in state["speakers"] and f"b:{s}" in state["speakers"]
    head = state["loss_state"]
    assert next(iter(head.values())).shape[0] == 11  # the softmax head's classes
    assert state["corpora"] == [{**lists[0], "speakers": 8}, {**lists[1], "speakers": 3}]
    assert state["config"]["data"]["corpora"] == lists

    # evaluated like any run; AS-norm's cohort is both corpora's training speakers (11 of them)
    rc = EER.main(["--set", f"train.save_dir={tmp_path / 'runs'}", "--cp_num", "1", "--score_norm", "asnorm",
                   "--out", str(tmp_path / "eval"), "--gpu", "-1", "--set", "test.bootstrap=0"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "training-set embeddings for the back-end: 44 utterances of 11 speakers" in out.out + out.err


def test_overlap_warning_compares_speakers_without_the_corpus_prefix(corpora):
    lists, shared, _ = corpora
    test_utts = [Utterance(shared[0], "x/1.wav", 1), Utterance("S0999", "x/2.wav", 2)]
    note = overlap_warning({"train_manifest": "unused.txt", "corpora": lists}, test_utts)
    assert note.startswith(f"warning: 1 test speaker(s) also appear in the training data {lists[0]['train_manifest']}")
    assert overlap_warning({"corpora": lists}, [Utterance("S0999", "x/2.wav", 2)]) is None


def test_features_are_those_of_each_file(corpora, tiny_corpus, make_config, tmp_path):
    """Both corpora go through the feature cache by absolute path: corpus b's copies get the features of
    the originals, and a second read (from the cache) gives the same arrays."""
    lists, shared, n_b = corpora
    cfg = corpus_config(tiny_corpus, tmp_path, lists)
    items = load_training_items(cfg, log=quiet)
    single = load_training_items(make_config(tmp_path), log=quiet)
    by_rel = {u.relpath: v[0] for u, v in zip(single.utterances, single.versions)}
    for u, v in zip(items.utterances, items.versions):
        root = Path(lists[0 if u.speaker.startswith("a:") else 1]["root"])
        rel = Path(u.relpath).relative_to(root).as_posix()
        np.testing.assert_array_equal(v[0], by_rel[rel])
    again = load_training_items(cfg, log=quiet)
    assert all(np.array_equal(x[0], y[0]) for x, y in zip(items.versions, again.versions))


@pytest.mark.parametrize("change, key", [
    (lambda c: c[1].pop("root"), r"data\.corpora\[1\]\.root' must be a non-empty string"),
    (lambda c: c[0].update(name="a b"), r"data\.corpora\[0\]\.name' is 'a b'"),
    (lambda c: c[1].update(name="a"), r"data\.corpora\[1\]\.name' 'a' names two corpora"),
    (lambda c: c[1].update(rooot="x"), r"unknown key 'data\.corpora\[1\]\.rooot'"),
    (lambda c: c.append("x"), r"data\.corpora\[2\]' must be a mapping"),
])
def test_config_errors_name_the_key(corpora, tiny_corpus, tmp_path, change, key):
    lists = [dict(c) for c in corpora[0]]
    change(lists)
    with pytest.raises(ConfigError, match=key):
        corpus_config(tiny_corpus, tmp_path, lists)


def test_config_file_errors_name_file_and_key(corpora, tiny_corpus, tmp_path):
    lists = corpora[0]
    user = tmp_path / "two.yaml"
    user.write_text(yaml.safe_dump({"data": {"corpora": lists, "root": "x"}}), encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"{user}: key 'data.root' is set beside data.corpora"):
        load_config(user)
    user.write_text(yaml.safe_dump({"data": {"corpora": {"name": "a"}}}), encoding="utf-8")
    with pytest.raises(ConfigError, match=r"key 'data.corpora' is a value, not a section"):
        load_config(user)
    missing = [lists[0], {**lists[1], "root": str(tmp_path / "nowhere")}]
    user.write_text(yaml.safe_dump({"data": {"corpora": missing}}), encoding="utf-8")
    with pytest.raises(DataError, match=rf"data.corpora\[1\].root' = .*nowhere \(set in {user}\) is not a folder"):
        check_training_data(load_config(user))
    twice = [lists[0], {**lists[0], "name": "c"}]
    with pytest.raises(DataError, match="is listed by corpus 'a' and by corpus 'c'"):
        check_training_data(corpus_config(tiny_corpus, tmp_path, twice))


def test_single_corpus_form_is_unchanged(make_config, tmp_path, tiny_corpus):
    assert load_config()["data"]["corpora"] == []
    utts = check_training_data(make_config(tmp_path))
    assert utts[0].speaker == "S0001" and not Path(utts[0].relpath).is_absolute()


def test_recipe_trains_on_both_shared_corpora():
    from svlab.config import PROJECT_ROOT
    cfg = load_config(PROJECT_ROOT / "recipes" / "sc_so762.yaml")
    assert [c["name"] for c in cfg["data"]["corpora"]] == ["sc", "so762"]
    if not (PROJECT_ROOT.parent / "shared" / "data" / "speechocean762").is_dir():
        pytest.skip("../shared/data not found")
    speakers = {u.speaker for u in check_training_data(cfg)}
    assert len(speakers) == 329
    assert sum(s.startswith("sc:") for s in speakers) == 179 and sum(s.startswith("so762:") for s in speakers) == 150
