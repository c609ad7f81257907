"""Run a results table: named variants of a recipe, each trained and scored for several seeds.

    python tools/experiments.py recipes/speech_commands_ablation.yaml --json results/speech_commands.json
    python tools/experiments.py recipes/speech_commands_ablation.yaml --only best cmn --seeds 0

The table file names a recipe (a ``--config`` for ``train.py``/``EER.py``), the seeds, and the
variants, each a set of config overrides on top of the recipe::

    recipe: recipes/speech_commands.yaml
    seeds: [0, 1, 2]
    score_norm: [none, asnorm]          # EER.py is run once per entry
    seeds_for: {ecapa: [0]}             # optional: fewer seeds for expensive variants
    variants:
      best: {}
      cmn: {features.mean_norm: true}
      ecapa: {model.name: ecapa}
      best_lm: {train.crop_frames: 400}
    finetune:                           # optional: variants that are a second stage of another one
      best_lm: {from: best, recipe: recipes/large_margin_finetune.yaml}

Every (variant, seed) is exactly two commands, which are printed before they run, so any cell of the
table can be reproduced on its own::

    python train.py --config RECIPE --n_folder <prefix>_<variant>_s<seed> --seed <seed> --overwrite --set K=V ...
    python EER.py   --config RECIPE --n_folder <prefix>_<variant>_s<seed> --cp_num <epochs> [--score_norm asnorm] --set K=V ...

(each runs as a process of its own, exactly as printed). A ``finetune`` variant starts from the last
checkpoint of its ``from`` variant's run of the same seed (trained first if it is not there yet) and
gives its own ``recipe`` (the second stage's settings, ``recipes/large_margin_finetune.yaml``); the
rest comes from the source's run (``train.py --finetune_from``, ``svlab.checkpoint.finetune_config``)::

    python train.py --config FT_RECIPE --finetune_from saved_model/<prefix>_<from>_s<seed>/checkpoint_<epochs>.pth \
        --n_folder <prefix>_<variant>_s<seed> --seed <seed> --overwrite --set K=V ...

Its training time is the second stage's own; the source's is in the source's row.

The EER of each run is read back from the ``metrics.json`` that ``EER.py`` wrote, the training time
from ``train_log.csv`` (sum of the epochs' seconds, without feature extraction). A run whose
checkpoint of the last epoch already exists is not trained again unless ``--retrain`` is given (its
evaluation is rerun), so an interrupted table continues where it stopped. Cells run seed by seed
(every variant's first seed, then every variant's second, ...), so a partial table already has a
value in every row; the JSON is rewritten after each cell and merged with what an earlier run of the
same table wrote there.

Output: per variant the median EER over seeds (and every seed's value, min-max spread), the median
training seconds, the overrides and the commands; printed as a Markdown table and written to
``--json``.
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))  # the project folder: svlab

import yaml

from svlab.checkpoint import epoch_checkpoint_path, finetune_config, run_folder, run_location_keys
from svlab.config import CHOICES, load_config, resolve_path
from svlab.errors import ConfigError, LabError
from svlab.evaluation import display_path, evaluation_folder
from svlab.files import atomic_write, json_with_keys, refuse_overwrite
from svlab.scoring_system import scoring_options
from svlab.yaml_files import load_yaml_text


class CellFailed(RuntimeError):
    """train.py or EER.py returned an error for one cell of the table."""


def read_table(path: Path) -> dict:
    """The table file, checked: ``recipe`` (a path), ``seeds`` (ints), ``variants`` (name -> overrides)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"table file not found: {path}")
    try:
        spec = load_yaml_text(path.read_text(encoding="utf-8"), str(path)) or {}  # limits: svlab.yaml_files
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(e).split())[:160]})") from None
    for key in ("recipe", "variants"):
        if key not in spec:
            raise ConfigError(f"{path}: missing key '{key}' (see tools/experiments.py --help)")
    allowed = {"recipe", "seeds", "seeds_for", "variants", "score_norm", "prefix", "finetune"}
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown}; allowed: {', '.join(sorted(allowed))}")
    if not isinstance(spec["variants"], dict) or not spec["variants"]:
        raise ConfigError(f"{path}: 'variants' must map names to override dicts, e.g. best: {{}}")
    for name, overrides in spec["variants"].items():
        if not isinstance(overrides, dict):
            raise ConfigError(f"{path}: variant '{name}' must be a dict of KEY: VALUE overrides, got {overrides!r}")
    spec.setdefault("seeds", [0])
    spec.setdefault("seeds_for", {})
    spec.setdefault("score_norm", ["none"])
    spec.setdefault("prefix", Path(path).stem)
    spec["finetune"] = _read_finetune(spec.get("finetune") or {}, spec["variants"], path)

    def int_list(v) -> bool:
        return isinstance(v, list) and v and all(isinstance(s, int) and not isinstance(s, bool) for s in v)
    if not int_list(spec["seeds"]):
        raise ConfigError(f"{path}: 'seeds' must be a list of integers, got {spec['seeds']!r}")
    for name, seeds in spec["seeds_for"].items():
        if name not in spec["variants"] or not int_list(seeds):
            raise ConfigError(f"{path}: seeds_for: '{name}' must name a variant and list integers, got {seeds!r}")
    for norm in spec["score_norm"]:
        if norm not in CHOICES["test.score_norm"]:
            raise ConfigError(f"{path}: score_norm entries must be {' or '.join(CHOICES['test.score_norm'])}, "
                              f"got {norm!r}")
    return spec


FINETUNE_KEYS = ("from", "recipe")


def _read_finetune(finetune, variants: dict, path: Path) -> dict:
    """The table's ``finetune`` entries, checked: ``VARIANT: {from: SOURCE_VARIANT, recipe: PATH}``."""
    if not isinstance(finetune, dict):
        raise ConfigError(f"{path}: 'finetune' must map variants to {{from: VARIANT, recipe: PATH}}, got {finetune!r}")
    for name, entry in finetune.items():
        where = f"{path}: finetune: '{name}'"
        if name not in variants:
            raise ConfigError(f"{where} must name a variant of the table")
        if not isinstance(entry, dict) or sorted(entry) != sorted(FINETUNE_KEYS):
            raise ConfigError(f"{where} must be {{from: VARIANT, recipe: PATH}}, got {entry!r}")
        if entry["from"] not in variants or entry["from"] == name:
            raise ConfigError(f"{where}: 'from' must name another variant of the table, got {entry['from']!r}")
        if entry["from"] in finetune:
            raise ConfigError(f"{where}: its source '{entry['from']}' is itself a fine-tune; start from a "
                              "variant trained from scratch")
        if not resolve_path(str(entry["recipe"])).is_file():
            raise ConfigError(f"{where}: recipe {entry['recipe']} not found (a path from the project folder)")
    return finetune


def seeds_of(spec: dict, variant: str) -> list[int]:
    """The seeds a variant is run with: its ``seeds_for`` entry, else the table's ``seeds``."""
    return list(spec["seeds_for"].get(variant, spec["seeds"]))


def schedule(spec: dict, names: list[str]) -> list[tuple[str, int]]:
    """``(variant, seed)`` cells in running order: seed-major, so each row gets its first value early."""
    seeds = sorted({s for n in names for s in seeds_of(spec, n)}, key=lambda s: min(
        seeds_of(spec, n).index(s) for n in names if s in seeds_of(spec, n)))
    return [(n, s) for s in seeds for n in names if s in seeds_of(spec, n)]


def _set_args(overrides: dict) -> list[str]:
    out = []
    for key, value in overrides.items():
        text = json.dumps(value) if isinstance(value, (list, bool)) or value is None else str(value)
        out += ["--set", f"{key}={text}"]
    return out


def commands(spec: dict, variant: str, seed: int) -> dict:
    """The ``train.py`` and ``EER.py`` argument lists of one cell, its run folder name and epochs.

    A fine-tune's configuration is complete only once its source's checkpoint exists (what its recipe
    does not give comes from there): until then ``cfg`` and ``epochs`` are its recipe's alone;
    ``source`` is the source cell (train it first) and ``start_from`` the checkpoint it must reach."""
    overrides = spec["variants"][variant]
    folder = f"{spec['prefix']}_{variant}_s{seed}"
    finetune = spec.get("finetune", {}).get(variant)
    recipe = str(finetune["recipe"] if finetune else spec["recipe"])
    start, source, start_from = [], None, None
    keys = {**overrides, "train.n_folder": folder, "train.seed": seed}
    if finetune:
        source = commands(spec, finetune["from"], seed)
        start_from = epoch_checkpoint_path(run_folder(source["cfg"]), source["epochs"])
        start = ["--finetune_from", display_path(start_from)]
        keys["train.finetune_from"] = str(start_from)
    train_args = ["--config", recipe] + start + ["--n_folder", folder, "--seed", str(seed), "--overwrite"] \
        + _set_args(overrides)
    cfg = load_config(resolve_path(recipe), keys)
    if start_from is not None and start_from.is_file():
        cfg, _ = finetune_config(cfg, log=lambda *_: None)
    epochs = cfg["train"]["epochs"]
    # the variant's overrides go to EER.py too: it refuses a config that contradicts the checkpoint
    eval_args = {norm: ["--config", recipe, "--n_folder", folder, "--cp_num", str(epochs)]
                 + ([] if norm == "none" else ["--score_norm", norm])
                 + _set_args({**overrides, **run_location_keys(cfg)})
                 for norm in spec["score_norm"]}
    return {"train": train_args, "eval": eval_args, "folder": folder, "epochs": epochs, "cfg": cfg,
            "source": source, "start_from": start_from}


def _show(script: str, args: list[str]) -> str:
    return " ".join([f"python {script}"] + [a if a and " " not in a and '"' not in a else json.dumps(a)
                                            for a in args])


def run_command(script: str, args: list[str]) -> int:
    """Run ``python <script> <args>`` (a lab command of the project folder) as its own process, its
    output going where this one's goes; returns its exit code."""
    sys.stdout.flush()
    sys.stderr.flush()
    return subprocess.run([sys.executable, str(PROJECT / script), *args]).returncode


def run_cell(spec: dict, variant: str, seed: int, retrain: bool = False, log=print) -> dict:
    """Train (unless already trained) and evaluate one (variant, seed); return its figures. A fine-tune's
    source is trained first where its last checkpoint is missing."""
    c = commands(spec, variant, seed)
    source = c["source"]
    if source is not None and not c["start_from"].is_file():
        log(f"(the source of {variant}, {spec['finetune'][variant]['from']} seed {seed}, is trained first)")
        log(f"$ {_show('train.py', source['train'])}")
        if run_command("train.py", source["train"]) != 0:
            raise CellFailed(f"training {spec['finetune'][variant]['from']} seed {seed}, the source of {variant}, "
                             "failed; see the message above")
        c = commands(spec, variant, seed)  # now complete: the source's settings are known
    folder = run_folder(c["cfg"])
    last = epoch_checkpoint_path(folder, c["epochs"])
    cell = {"variant": variant, "seed": seed, "run_folder": str(folder),
            **({"finetuned_from": str(c["start_from"].parent)} if source is not None else {}),
            "train_command": _show("train.py", c["train"]),
            "eval_commands": {k: _show("EER.py", v) for k, v in c["eval"].items()}}
    t0 = time.perf_counter()
    if retrain or not last.is_file():
        log(f"$ {cell['train_command']}")
        rc = run_command("train.py", c["train"])
        if rc != 0:
            raise CellFailed(f"training {variant} seed {seed} failed (exit code {rc}); see the message above")
    else:
        log(f"(trained already: {last})")
    cell["wall_seconds"] = round(time.perf_counter() - t0, 1)
    with open(folder / "train_log.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    cell["train_seconds"] = round(sum(float(r["seconds"]) for r in rows), 1)
    cell["final_train_acc"] = float(rows[-1]["acc"])
    cell["eer"] = {}
    for norm, args in c["eval"].items():
        log(f"$ {cell['eval_commands'][norm]}")
        if run_command("EER.py", args) != 0:
            raise CellFailed(f"evaluating {variant} seed {seed} ({norm}) failed; see the message above")
        out = evaluation_folder(last, scoring_options(c["cfg"], score_norm=norm))
        with open(out / "metrics.json", encoding="utf-8") as f:
            m = json.load(f)
        cell["eer"][norm] = round(100.0 * m["eer"], 3)
        cell.setdefault("min_dcf_0.01", {})[norm] = round(m["min_dcf_0.01"], 4)
    return cell


def summarize(spec: dict, cells: list[dict]) -> list[dict]:
    """Per variant: median / min / max EER over seeds for each score normalisation, median train time."""
    rows = []
    for variant, overrides in spec["variants"].items():
        mine = [c for c in cells if c["variant"] == variant]
        if not mine:
            continue
        mine = sorted(mine, key=lambda c: c["seed"])
        row = {"variant": variant, "overrides": overrides, "seeds": [c["seed"] for c in mine],
               "train_seconds_median": statistics.median(c["train_seconds"] for c in mine), "eer": {}}
        if variant in spec.get("finetune", {}):
            row["finetune"] = spec["finetune"][variant]
        for norm in spec["score_norm"]:
            values = [c["eer"][norm] for c in mine]
            row["eer"][norm] = {"median": statistics.median(values), "min": min(values), "max": max(values),
                                "per_seed": values}
        rows.append(row)
    return rows


def markdown(spec: dict, rows: list[dict]) -> str:
    norms = spec["score_norm"]
    head = "| variant | overrides | " + " | ".join(f"EER {n} (median, per seed)" for n in norms) + " | train s |"
    lines = [head, "|" + "---|" * (3 + len(norms))]
    for r in rows:
        ov = ", ".join(f"`{k}={json.dumps(v) if isinstance(v, (list, bool)) else v}`" for k, v in r["overrides"].items())
        if "finetune" in r:
            ov = f"fine-tune of {r['finetune']['from']} (`{r['finetune']['recipe']}`)" + (f", {ov}" if ov else "")
        cells = [f"**{r['eer'][n]['median']:.2f} %** ({', '.join(f'{v:.2f}' for v in r['eer'][n]['per_seed'])})"
                 for n in norms]
        lines.append(f"| {r['variant']} | {ov or '(recipe)'} | " + " | ".join(cells)
                     + f" | {r['train_seconds_median']:.0f} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Train and score named variants of a recipe over several seeds "
                                             "(a README results table).")
    ap.add_argument("table", help="YAML table file (recipe, seeds, score_norm, variants)")
    ap.add_argument("--only", nargs="+", default=None, metavar="VARIANT", help="run only these variants")
    ap.add_argument("--seeds", nargs="+", type=int, default=None,
                    help="run only these seeds (of each variant's seeds)")
    ap.add_argument("--retrain", action="store_true", help="train again even where the last checkpoint exists")
    ap.add_argument("--json", default=None, help="write all figures here (default: results/<table name>.json)")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        spec = read_table(resolve_path(args.table, base=Path.cwd()))
        names = args.only or list(spec["variants"])
        unknown = [n for n in names if n not in spec["variants"]]
        if unknown:
            raise ConfigError(f"{args.table}: no variant(s) {unknown}; the table has {list(spec['variants'])}")
        cells_to_run = [(n, s) for n, s in schedule(spec, names) if args.seeds is None or s in args.seeds]
        for name, seed in cells_to_run:  # every cell's config is checked before the first one trains
            commands(spec, name, seed)
        out = Path(args.json) if args.json else resolve_path("results") / f"{Path(args.table).stem}.json"
        out_check = (resolve_path(args.table, base=Path.cwd()), resolve_path(str(spec["recipe"])),
                  "--json" if args.json else "the figures file")
        check_out(out, *out_check)
        cells = _earlier_cells(out, spec)
        for name, seed in cells_to_run:
            print(f"=== {name}, seed {seed} ===", flush=True)
            cell = run_cell(spec, name, seed, retrain=args.retrain)
            cells = [c for c in cells if (c["variant"], c["seed"]) != (name, seed)] + [cell]
            payload = {"table": str(args.table), "recipe": str(spec["recipe"]), "rows": summarize(spec, cells),
                       "cells": cells}
            check_out(out, *out_check)
            atomic_write(out, lambda tmp: tmp.write_text(json.dumps(payload, indent=2), encoding="utf-8"))
    except (LabError, CellFailed) as e:  # a failed cell: train.py / EER.py printed why; earlier cells are saved
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(markdown(spec, summarize(spec, cells)))
    print(f"figures: {out}")
    return 0


OUTPUT_KEYS = ("table", "recipe", "rows", "cells")    # what every earlier output of this command holds


def check_out(out: Path, table: Path, recipe: Path, flag: str = "--json") -> None:
    """The figures file may replace only an earlier output of this command, never the table or recipe."""
    refuse_overwrite(out, inputs=[("the table file", table), ("the table's recipe", recipe)], flag=flag,
                     command="tools/experiments.py", ours=lambda p: json_with_keys(p, OUTPUT_KEYS),
                     recognised_by=f"a JSON object with {', '.join(OUTPUT_KEYS)}")


def _earlier_cells(out: Path, spec: dict) -> list[dict]:
    """Cells an earlier run of this table wrote to ``out`` (for variants and seeds still in the table)."""
    if not out.is_file():
        return []
    try:
        cells = json.loads(out.read_text(encoding="utf-8")).get("cells", [])
    except (OSError, ValueError):
        print(f"note: {out} is not readable JSON; it will be replaced")
        return []
    return [c for c in cells if c.get("variant") in spec["variants"]
            and c.get("seed") in seeds_of(spec, c["variant"])]


if __name__ == "__main__":
    sys.exit(main())
