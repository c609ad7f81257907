"""experiments.py: table files, the running order, and a two-variant table end to end on the tiny corpus
(train.py and EER.py run as processes, figures read back from the files they wrote)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

import experiments
from conftest import nest, tiny_overrides
from svlab import config
from svlab.checkpoint import load_checkpoint
from svlab.config import ConfigError


LM = "recipes/large_margin_finetune.yaml"


def _write(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


@pytest.mark.parametrize("table,message", [
    ({"variants": {"a": {}}}, "missing key 'recipe'"),
    ({"recipe": "r.yaml", "variants": {"a": {}}, "seed": [0]}, "unknown key(s) ['seed']"),
    ({"recipe": "r.yaml", "variants": {"a": 3}}, "variant 'a' must be a dict"),
    ({"recipe": "r.yaml", "variants": {"a": {}}, "seeds": [0, "1"]}, "'seeds' must be a list of integers"),
    ({"recipe": "r.yaml", "variants": {"a": {}}, "seeds_for": {"b": [0]}}, "seeds_for: 'b' must name a variant"),
    ({"recipe": "r.yaml", "variants": {"a": {}}, "score_norm": ["znorm"]}, "none or asnorm"),
    ({"recipe": "r.yaml", "variants": {"a": {}}, "finetune": {"b": {"from": "a", "recipe": LM}}},
     "finetune: 'b' must name a variant"),
    ({"recipe": "r.yaml", "variants": {"a": {}, "b": {}}, "finetune": {"b": {"from": "c", "recipe": LM}}},
     "'from' must name another variant"),
    ({"recipe": "r.yaml", "variants": {"a": {}, "b": {}}, "finetune": {"b": {"from": "a"}}},
     "must be {from: VARIANT, recipe: PATH}"),
    ({"recipe": "r.yaml", "variants": {"a": {}, "b": {}}, "finetune": {"b": {"from": "a", "recipe": "no/such.yaml"}}},
     "recipe no/such.yaml not found"),
    ({"recipe": "r.yaml", "variants": {"a": {}, "b": {}, "c": {}},
      "finetune": {"b": {"from": "a", "recipe": LM}, "c": {"from": "b", "recipe": LM}}}, "is itself a fine-tune"),
])
def test_bad_tables_are_refused_with_the_reason(tmp_path, table, message):
    with pytest.raises(ConfigError) as e:
        experiments.read_table(_write(tmp_path / "t.yaml", table))
    assert message in str(e.value) and "t.yaml" in str(e.value)


def test_cells_run_seed_by_seed_with_fewer_seeds_where_asked(tmp_path):
    spec = experiments.read_table(_write(tmp_path / "t.yaml", {
        "recipe": "r.yaml", "seeds": [0, 1, 2], "seeds_for": {"slow": [0]},
        "variants": {"a": {}, "slow": {"model.name": "ecapa"}, "b": {"train.lr": 0.01}}}))
    assert experiments.schedule(spec, ["a", "slow", "b"]) == [
        ("a", 0), ("slow", 0), ("b", 0), ("a", 1), ("b", 1), ("a", 2), ("b", 2)]
    assert spec["prefix"] == "t" and spec["score_norm"] == ["none"]


def test_summary_and_markdown_report_median_and_every_seed():
    spec = {"variants": {"a": {"train.lr": 0.01}}, "score_norm": ["none"]}
    cells = [{"variant": "a", "seed": s, "train_seconds": t, "eer": {"none": e}}
             for s, t, e in [(2, 30.0, 7.0), (0, 10.0, 5.0), (1, 20.0, 9.0)]]
    row, = experiments.summarize(spec, cells)
    assert row["seeds"] == [0, 1, 2] and row["eer"]["none"] == {"median": 7.0, "min": 5.0, "max": 9.0,
                                                                 "per_seed": [5.0, 9.0, 7.0]}
    assert row["train_seconds_median"] == 20.0
    text = experiments.markdown(spec, [row])
    assert "| a | `train.lr=0.01` | **7.00 %** (5.00, 9.00, 7.00) | 20 |" in text


def test_table_end_to_end_on_the_tiny_corpus(tiny_corpus, tmp_path, capsys):
    # the recipe sets model.pooling, which a variant changes: EER.py must get the variant's value too
    recipe = _write(tmp_path / "recipe.yaml", nest(tiny_overrides(tiny_corpus, tmp_path, {
        "train.epochs": 1, "model.pooling": "gap"})))
    table = _write(tmp_path / "tiny_table.yaml", {
        "recipe": str(recipe), "seeds": [0], "score_norm": ["none", "asnorm"],
        "variants": {"base": {}, "stats_nocmn": {"model.pooling": "stats", "features.mean_norm": False}}})
    out = tmp_path / "figures.json"
    assert experiments.main([str(table), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "python train.py --config" in printed and "--set features.mean_norm=false" in printed
    result = json.loads(out.read_text(encoding="utf-8"))
    assert [c["variant"] for c in result["cells"]] == ["base", "stats_nocmn"]
    for cell in result["cells"]:
        folder = Path(cell["run_folder"])
        assert folder.name == f"tiny_table_{cell['variant']}_s0"
        for norm, suffix in (("none", ""), ("asnorm", "_asnorm")):
            m = json.loads((folder / f"eval_001{suffix}" / "metrics.json").read_text(encoding="utf-8"))
            assert cell["eer"][norm] == pytest.approx(100 * m["eer"], abs=1e-3)
        with open(folder / "train_log.csv", newline="", encoding="utf-8") as f:
            assert cell["train_seconds"] == pytest.approx(sum(float(r["seconds"]) for r in csv.DictReader(f)), abs=0.1)
    row = {r["variant"]: r for r in result["rows"]}["base"]
    assert row["eer"]["none"]["median"] == result["cells"][0]["eer"]["none"]
    # a second run of one variant trains nothing again and keeps the other variant's cell
    ckpt = Path(result["cells"][0]["run_folder"]) / "checkpoint_001.pth"
    stamp = ckpt.stat().st_mtime_ns
    assert experiments.main([str(table), "--json", str(out), "--only", "base"]) == 0
    assert "(trained already:" in capsys.readouterr().out
    assert ckpt.stat().st_mtime_ns == stamp
    again = json.loads(out.read_text(encoding="utf-8"))
    assert sorted(c["variant"] for c in again["cells"]) == ["base", "stats_nocmn"]


def test_a_finetune_variant_trains_its_source_first_then_continues_from_its_last_checkpoint(
        tiny_corpus, tmp_path, capsys):
    recipe = _write(tmp_path / "recipe.yaml", nest(tiny_overrides(tiny_corpus, tmp_path, {
        "train.epochs": 2, "loss.type": "amsoftmax"})))
    # the second stage's recipe gives only what changes; the data, batch size, ... are the source's
    second = _write(tmp_path / "second.yaml", {"loss": {"margin": 0.3, "margin_warmup_epochs": 0},
                                               "train": {"epochs": 1, "lr": 0.0001}})
    table = _write(tmp_path / "t.yaml", {
        "recipe": str(recipe), "variants": {"base": {}, "base_lm": {"train.crop_frames": 80}},
        "finetune": {"base_lm": {"from": "base", "recipe": str(second)}}})
    out = tmp_path / "f.json"
    assert experiments.main([str(table), "--json", str(out), "--only", "base_lm"]) == 0
    printed = capsys.readouterr().out
    source = (tmp_path / "runs" / "t_base_s0").resolve()
    assert "(the source of base_lm, base seed 0, is trained first)" in printed
    assert f"--finetune_from {source / 'checkpoint_002.pth'} --n_folder t_base_lm_s0" in printed
    result = json.loads(out.read_text(encoding="utf-8"))
    cell, = result["cells"]
    assert cell["finetuned_from"] == str(source) and result["rows"][0]["finetune"]["from"] == "base"
    folder = Path(cell["run_folder"])
    state = load_checkpoint(folder / "checkpoint_001.pth")   # the second stage's epochs count from 1
    assert state["finetuned_from"]["checkpoint"] == str(source / "checkpoint_002.pth")
    assert state["config"]["loss"]["margin"] == 0.3 and state["config"]["train"]["crop_frames"] == 80
    assert state["config"]["train"]["batchsize"] == 8 and state["config"]["data"]["root"] == str(tiny_corpus.root)
    m = json.loads((folder / "eval_001" / "metrics.json").read_text(encoding="utf-8"))
    assert cell["eer"]["none"] == pytest.approx(100 * m["eer"], abs=1e-3)
    # run again: neither stage is trained again
    stamps = [p.stat().st_mtime_ns for p in (source / "checkpoint_002.pth", folder / "checkpoint_001.pth")]
    assert experiments.main([str(table), "--json", str(out), "--only", "base_lm"]) == 0
    assert "is trained first" not in capsys.readouterr().out
    assert [p.stat().st_mtime_ns for p in (source / "checkpoint_002.pth", folder / "checkpoint_001.pth")] == stamps


def test_a_failing_cell_stops_the_table_with_one_error_line(tiny_corpus, tmp_path, capsys):
    recipe = _write(tmp_path / "recipe.yaml", nest(tiny_overrides(tiny_corpus, tmp_path, {"train.epochs": 1})))
    # the manifest names a missing file: train.py refuses it before any training
    bad = tmp_path / "bad_manifest.txt"
    bad.write_text("S1 no/such/file.wav\n", encoding="utf-8")
    table = _write(tmp_path / "t.yaml", {"recipe": str(recipe), "variants": {
        "broken": {"data.train_manifest": str(bad)}}})
    assert experiments.main([str(table), "--json", str(tmp_path / "f.json")]) == 2
    err = capsys.readouterr().err
    assert "error: training broken seed 0 failed (exit code 2)" in err and "Traceback" not in err


def test_unknown_variant_is_an_error(tmp_path, capsys):
    table = _write(tmp_path / "t.yaml", {"recipe": "recipes/speech_commands.yaml", "variants": {"a": {}}})
    assert experiments.main([str(table), "--only", "b"]) == 2
    assert "no variant(s) ['b']" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["speech_commands_ablation", "speechocean762_ablation",
                                  "speech_commands_new_corpus", "demo_table",
                                  "precision_demo", "precision_speech_commands"])
def test_shipped_tables_are_valid_and_every_cell_config_loads(name):
    spec = experiments.read_table(config.PROJECT_ROOT / "recipes" / f"{name}.yaml")
    for variant, seed in experiments.schedule(spec, list(spec["variants"])):
        cell = experiments.commands(spec, variant, seed)  # loads and validates the cell's config
        assert cell["folder"] == f"{spec['prefix']}_{variant}_s{seed}"
        assert cell["cfg"]["train"]["seed"] == seed
        if variant in spec["finetune"]:  # the second stage starts from its source's last checkpoint
            source = experiments.commands(spec, spec["finetune"][variant]["from"], seed)
            start = cell["train"][cell["train"].index("--finetune_from") + 1]
            assert start == f"saved_model/{source['folder']}/checkpoint_{source['epochs']:03d}.pth"
