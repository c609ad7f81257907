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
from svlab.config import ConfigError


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
