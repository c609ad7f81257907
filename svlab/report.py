"""The hand-in report of a training run: ``report.md`` and ``report.html`` in the run folder.

``write_report(run_dir)`` gathers (``collect``) the training curves (``curves.png``), the per-epoch log
(``train_log.csv``), every evaluation found (``eval_*/metrics.json`` in the run folder, evaluations
recorded in ``evaluations.json`` elsewhere, and the MFCC baselines), the ROC / DET / score histogram
pictures of each evaluation and the configuration the run was trained with (``config.yaml``), and
renders them (``render_markdown``, ``render_html``). Evaluations are compared like with like: one
table per trial list (the run's own first, from its ``config.yaml``), each with the baseline of that
trial list, and every row names its trial list. Text from the files is escaped (terminal control
characters in the markdown, HTML in the page). Pictures are
referenced by relative path, so keep the report inside the run folder (or copy the folder as a
whole). ``report.html`` is a single UTF-8 page, readable in any browser.

Commands: ``python tools/report.py --n_folder 000`` or ``python EER.py --cp_num 30 --report``.
"""
from __future__ import annotations

import csv
import datetime as _dt
import html
import json
import os
import re
from pathlib import Path

import yaml

from svlab.guard import one_line, say
from svlab.config import resolve_path
from svlab.errors import LabError, ReportError
from svlab.evaluation import (BASELINE_PREFIX, EVAL_INDEX, EVAL_PREFIX, PLOTS as PLOT_FILES, TrialListRef,
                              display_path, read_evaluation_index)
from svlab.files import atomic_write
from svlab.text import printable

_NUMERIC = re.compile(r"^[-+]?(\d[\d.e+-]*%?|inf|\d+ / \d+)$")
PLOTS = (("roc", "ROC"), ("det", "DET"), ("hist", "Score histogram"))


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def find_evaluations(run_dir: Path) -> list[tuple[Path, dict]]:
    """``(metrics.json path, metrics)`` of every evaluation of this run, sorted by epoch then folder."""
    run_dir = Path(run_dir)
    paths = sorted(run_dir.glob(f"{EVAL_PREFIX}*/metrics.json"))
    index = read_evaluation_index(run_dir / EVAL_INDEX)
    for entries in index.values():
        for e in entries if isinstance(entries, list) else []:
            p = Path(e.get("metrics", ""))
            p = p if p.is_absolute() else run_dir / p
            if p.is_file():
                paths.append(p)
    found, seen = [], set()
    for p in paths:
        key = p.resolve()
        m = _read_json(p)
        if key in seen or m is None or "eer" not in m:
            continue
        seen.add(key)
        found.append((p, m))
    found.sort(key=lambda pm: (pm[1].get("epoch") if pm[1].get("epoch") is not None else -1, str(pm[0])))
    return found


def find_baselines(run_dir: Path) -> list[tuple[Path, dict]]:
    """MFCC-baseline evaluations next to the run folder (``<save_dir>/baseline*/metrics.json``), of
    every trial list (``by_trial_list`` sorts them out)."""
    out = []
    for p in sorted(Path(run_dir).parent.glob(f"{BASELINE_PREFIX}*/metrics.json")):
        m = _read_json(p)
        if m is not None and "eer" in m:
            out.append((p, m))
    return out


def read_log(run_dir: Path) -> tuple[list[str], list[dict]]:
    path = Path(run_dir) / "train_log.csv"
    if not path.is_file():
        return [], []
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return (list(rows[0].keys()) if rows else []), rows


def _fmt_log(key: str, value: str) -> str:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return value or ""
    if key == "epoch":
        return str(int(v))
    if key == "lr":
        return f"{v:.2e}"
    if key == "acc":
        return f"{v:.2f}"
    if key == "seconds":
        return f"{v:.1f}"
    return f"{v:.4f}"


def _pct(v) -> str:
    return "" if v is None else f"{float(v) * 100:.2f}%"


def _num(v, digits: int = 4) -> str:
    if v is None:
        return ""
    v = float(v)
    return "inf" if v == float("inf") else f"{v:.{digits}f}"


OWN = " (the run's own)"
COMPARE_NOTE = ("Each table holds the evaluations and the MFCC baseline of one trial list: error rates are "
                "comparable only on the same trials.")
EVAL_COLUMNS = ("evaluation", "epoch", "system", "EER", "EER threshold", "minDCF(0.01)", "minDCF(0.001)",
                "actDCF(0.01)", "Cllr", "target / non-target trials", "trial list")


def _eval_row(run_dir: Path, path: Path, m: dict) -> list[str]:
    return [_relpath(path.parent, run_dir), "" if m.get("epoch") is None else str(m["epoch"]),
            str(m.get("backend", "cosine")), _pct(m.get("eer")), _num(m.get("threshold"), 5),
            _num(m.get("min_dcf_0.01")), _num(m.get("min_dcf_0.001")), _num(m.get("actual_dcf_0.01")),
            _num(m.get("cllr")), f"{m.get('n_target', '')} / {m.get('n_nontarget', '')}", _trials_name(m)]


def _trials_name(m: dict) -> str:
    return display_path(m["trials"]) if m.get("trials") else "(not recorded)"


def run_trial_list(run_dir: Path) -> TrialListRef | None:
    """The run's own test trial list, from the ``config.yaml`` it was trained with (None if unknown)."""
    try:
        cfg = yaml.safe_load((Path(run_dir) / "config.yaml").read_text(encoding="utf-8"))
        return TrialListRef(resolve_path(cfg["test"]["trials"]))
    except (OSError, ValueError, yaml.YAMLError, LabError, KeyError, TypeError):
        return None


def by_trial_list(evals: list, baselines: list, own: TrialListRef | None) -> list[dict]:
    """One comparison table per trial list: ``{"trials", "own", "evaluations", "baselines"}``, the run's
    own trial list first; a trial list is identified by its content (``trials_id``), else by its path.
    Baselines of a trial list this run was not evaluated on are left out (nothing to compare them with)."""
    groups: dict[str, dict] = {}
    by_path: dict[str, str] = {}
    tagged = [("evaluations", pm) for pm in evals] + [("baselines", pm) for pm in baselines]
    tagged.sort(key=lambda t: not t[1][1].get("trials_id"))  # content ids first: older files join by path
    for kind, (p, m) in tagged:
        path = os.path.normcase(str(m.get("trials", "")))
        key = m.get("trials_id") or by_path.get(path) or f"path:{path}"
        by_path.setdefault(path, key)
        g = groups.setdefault(key, {"trials": _trials_name(m), "own": False, "evaluations": [], "baselines": []})
        g[kind].append((p, m))
        g["own"] = g["own"] or (own is not None and own.matches(m))
    tables = [g for g in groups.values() if g["evaluations"] or g["own"]]
    for g in tables:
        g["evaluations"].sort(key=lambda pm: (pm[1].get("epoch") if pm[1].get("epoch") is not None else -1,
                                              str(pm[0])))
    return sorted(tables, key=lambda g: not g["own"])


def _relpath(path: Path, start: Path) -> str:
    try:
        return Path(os.path.relpath(Path(path).resolve(), Path(start).resolve())).as_posix()
    except ValueError:  # another drive (Windows): absolute file URL
        return Path(path).resolve().as_uri()


def collect(run_dir: Path, trials: Path | None = None) -> dict:
    """Everything the report shows, as plain data (``trials``: the trial list to put first instead of the
    run's own, when the user gave one explicitly)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"run folder not found: {run_dir} (train first, or pass the right --n_folder)")
    columns, log_rows = read_log(run_dir)
    evals = find_evaluations(run_dir)
    config_text = (run_dir / "config.yaml").read_text(encoding="utf-8") if (run_dir / "config.yaml").is_file() else ""
    pictures = []
    for path, m in evals:
        plots = m.get("plots") or PLOT_FILES
        pics = [(title, _relpath(path.parent / plots[k], run_dir)) for k, title in PLOTS
                if k in plots and (path.parent / plots[k]).is_file()]
        if pics:
            pictures.append((_relpath(path.parent, run_dir), m, pics))
    own = TrialListRef(trials) if trials is not None else run_trial_list(run_dir)
    tables = [{"trials": g["trials"], "own": g["own"],
               "rows": [_eval_row(run_dir, p, m) for p, m in g["evaluations"] + g["baselines"]]}
              for g in by_trial_list(evals, find_baselines(run_dir), own)]
    return {
        "run_dir": run_dir, "name": run_dir.name, "log_columns": columns, "log_rows": log_rows,
        "curves": "curves.png" if (run_dir / "curves.png").is_file() else None,
        "evaluations": [_eval_row(run_dir, p, m) for p, m in evals], "tables": tables,
        "pictures": pictures, "config": config_text,
        "generated": _dt.datetime.now().isoformat(timespec="seconds"),
    }


def _md_table(header, rows) -> str:
    def cell(x):
        return one_line(x).replace("|", "\\|")
    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(x) for x in r) + " |" for r in rows]
    return "\n".join(lines)


def render_markdown(d: dict) -> str:
    out = [f"# Speaker verification report: run {one_line(d['name'])}", "",
           f"Run folder `{one_line(d['run_dir'])}`, generated {d['generated']}.", "", "## Training", ""]
    if d["curves"]:
        out += [f"![training curves]({d['curves']})", ""]
    if d["log_rows"]:
        out += [_md_table(d["log_columns"], [[_fmt_log(k, r.get(k, "")) for k in d["log_columns"]]
                                             for r in d["log_rows"]]), ""]
    else:
        out += ["No train_log.csv in the run folder.", ""]
    out += ["## Evaluations", ""]
    for t in d["tables"]:
        out += [f"### Trial list `{one_line(t['trials'])}`{OWN if t['own'] else ''}", "",
                _md_table(EVAL_COLUMNS, t["rows"]) if t["rows"] else "No evaluation on it yet.", ""]
    if d["evaluations"]:
        out += [f"{COMPARE_NOTE} EER and its threshold: where false accepts equal false rejects (accept when score "
                ">= threshold). minDCF: normalised minimum detection cost at target prior 0.01 / 0.001. actDCF and "
                "Cllr: only for calibrated back-ends (cost at the Bayes threshold; 0 = perfect LLRs).", ""]
    else:
        out += ["No evaluation yet: run `python EER.py --cp_num N`.", ""]
    for folder, m, pics in d["pictures"]:
        out += [f"### {one_line(folder)}: {one_line(m.get('system', ''))}", "",
                f"EER {_pct(m.get('eer'))} on `{one_line(_trials_name(m))}`, minDCF(0.01) "
                f"{_num(m.get('min_dcf_0.01'))}, checkpoint `{one_line(Path(str(m.get('checkpoint'))).name)}`", ""]
        out += [" ".join(f"![{title}]({one_line(src)})" for title, src in pics), ""]
    out += ["## Configuration (config.yaml)", "", "```yaml", printable(d["config"]).rstrip("\n") or "(no config.yaml)",
            "```", ""]
    return "\n".join(out)


CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", "Noto Sans", "Microsoft YaHei", sans-serif;
       max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222; line-height: 1.45; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
th { background: #f0f0f0; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.wide { overflow-x: auto; max-width: 100%; }
.log { max-height: 28em; overflow-y: auto; display: inline-block; }
.pics { display: flex; flex-wrap: wrap; gap: 1em; } .pics figure { margin: 0; }
.pics img { max-width: 380px; border: 1px solid #ddd; } img.curves { max-width: 100%; }
pre { background: #f7f7f7; padding: 1em; overflow-x: auto; }
#img-check { color: #777; font-size: 0.8em; margin-top: 2em; }
"""

IMG_CHECK_JS = """
window.addEventListener('load', function () {
  var imgs = document.images, ok = 0;
  for (var i = 0; i < imgs.length; i++) { if (imgs[i].complete && imgs[i].naturalWidth > 0) ok++; }
  var d = document.getElementById('img-check');
  d.setAttribute('data-loaded', ok);
  d.setAttribute('data-total', imgs.length);
  d.textContent = 'images loaded: ' + ok + '/' + imgs.length;
});
"""


def _h(text: object) -> str:
    """Text for the page: terminal control characters shown escaped, then HTML-escaped."""
    return html.escape(printable(str(text)))


def _html_table(header, rows, cls: str = "") -> str:
    e = _h
    head = "".join(f"<th>{e(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f'<td class="num">{e(str(x))}</td>' if _NUMERIC.match(str(x))
                                     else f"<td>{e(str(x))}</td>" for x in r) + "</tr>" for r in rows)
    wrap = f' class="{cls}"' if cls else ' class="wide"'
    return f"<div{wrap}><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"


def render_html(d: dict) -> str:
    e = _h
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>Speaker verification report: run {e(d['name'])}</title>", f"<style>{CSS}</style></head><body>",
             f"<h1>Speaker verification report: run {e(d['name'])}</h1>",
             f"<p>Run folder <code>{e(str(d['run_dir']))}</code>, generated {e(d['generated'])}.</p>",
             "<h2>Training</h2>"]
    if d["curves"]:
        parts.append(f'<img class="curves" src="{e(d["curves"])}" alt="training loss and accuracy per epoch">')
    if d["log_rows"]:
        parts.append(_html_table(d["log_columns"], [[_fmt_log(k, r.get(k, "")) for k in d["log_columns"]]
                                                    for r in d["log_rows"]], cls="log"))
    else:
        parts.append("<p>No train_log.csv in the run folder.</p>")
    parts.append("<h2>Evaluations</h2>")
    for t in d["tables"]:
        parts.append(f"<h3>Trial list <code>{e(t['trials'])}</code>{OWN if t['own'] else ''}</h3>")
        parts.append(_html_table(EVAL_COLUMNS, t["rows"]) if t["rows"] else "<p>No evaluation on it yet.</p>")
    if d["evaluations"]:
        parts.append(f"<p>{e(COMPARE_NOTE)} EER and its threshold: where false accepts equal false rejects (accept "
                     "when score &ge; threshold). minDCF: normalised minimum detection cost at target prior 0.01 / "
                     "0.001. actDCF and Cllr: only for calibrated back-ends (cost at the Bayes threshold; 0 = perfect "
                     "LLRs).</p>")
    else:
        parts.append("<p>No evaluation yet: run <code>python EER.py --cp_num N</code>.</p>")
    for folder, m, pics in d["pictures"]:
        parts.append(f"<h3>{e(folder)}: {e(str(m.get('system', '')))}</h3>")
        parts.append(f"<p>EER {e(_pct(m.get('eer')))} on <code>{e(_trials_name(m))}</code>, minDCF(0.01) "
                     f"{e(_num(m.get('min_dcf_0.01')))}, checkpoint "
                     f"<code>{e(Path(str(m.get('checkpoint'))).name)}</code></p>")
        figs = "".join(f'<figure><img src="{e(src)}" alt="{e(title)} of {e(folder)}">'
                       f"<figcaption>{e(title)}</figcaption></figure>" for title, src in pics)
        parts.append(f'<div class="pics">{figs}</div>')
    parts.append("<h2>Configuration (config.yaml)</h2>")
    parts.append(f"<pre>{e(d['config']) or '(no config.yaml)'}</pre>")
    parts.append('<div id="img-check">images: not checked (JavaScript is off)</div>')
    parts.append(f"<script>{IMG_CHECK_JS}</script>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_report(run_dir: Path, log=say, trials: Path | None = None) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.html`` into ``run_dir``; returns their paths (``trials``: see ``collect``)."""
    run_dir = Path(run_dir)
    d = collect(run_dir, trials)
    md, page = run_dir / "report.md", run_dir / "report.html"
    atomic_write(md, lambda tmp: tmp.write_text(render_markdown(d), encoding="utf-8"))
    atomic_write(page, lambda tmp: tmp.write_text(render_html(d), encoding="utf-8"))
    log(f"report: {page} and {md.name} ({len(d['evaluations'])} evaluation(s), {len(d['log_rows'])} epoch(s))")
    return md, page
