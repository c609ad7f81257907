"""The hand-in report of a training run: ``report.html`` (one self-contained, printable page),
``report.pdf`` (that page printed by headless Chromium, where it is installed) and ``report.md``.

``write_report(run_dir, lang="en")`` gathers (``collect``) what the handout asks for (items 2.5 and
3.2) from the run folder's files and renders it (``render_html``, ``render_markdown``):

1. Training: the log lines as ``train.py`` printed them, the curves and the per-epoch table
   (``train_log.csv``).
2. Verification result: the lab's ``Epoch=30 EER= ... Thres= ...`` line, the ROC with its EER point, the
   DET and the score histogram of the run's main evaluation (its latest epoch on its own trial list, with
   its own scoring system), and one verification example: a target and a non-target trial of that list
   scored with the checkpoint and decided at the evaluation's EER threshold (``svlab.report_content``).
3. Evaluations: one table per trial list (the run's own first, each with the MFCC baseline of that list;
   every row names its trial list; 95% confidence intervals where ``metrics.json`` has them), then the
   figures of every other evaluation.
4. The configuration the run was trained with (``config.yaml``).

The page carries its pictures inside (PNG ``data:`` URIs), so it survives being copied or e-mailed. Its
print styles (A4) print the whole per-epoch table, start each section on a new page and print every
figure at the size it was drawn for (``svlab.plots.PrintStyle``: legend and tick text 9 pt). ``lang="zh"``
gives Chinese headings, labels and figure text (``svlab.report_text``; figures need a CJK font such as
Noto Sans CJK, else their labels stay English, said on the page). Text from the files is escaped
(terminal control characters, HTML). The markdown refers to the evaluation's own pictures by relative path.

An existing ``report.html`` / ``report.md`` is replaced only when it is an earlier report (``MARKER``, or
an older report's title), ``report.pdf`` only when this report wrote it (``svlab.files.WrittenFiles``).

Commands: ``python tools/report.py --n_folder 000 [--lang zh]`` or ``python EER.py --cp_num 30 --report``.
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

from svlab import chromium
from svlab import report_content as content
from svlab.config import load_config, resolve_path
from svlab.errors import LabError, ReportError
from svlab.evaluation import (BASELINE_PREFIX, EVAL_INDEX, EVAL_PREFIX, TrialListRef, display_path,
                              read_evaluation_index)
from svlab.files import WrittenFiles, atomic_write, refuse_overwrite
from svlab.guard import one_line, say
from svlab.report_text import EN, HTML_LANG, LANGUAGES, words
from svlab.text import excerpt, printable

_NUMERIC = re.compile(r"^[-+]?(\d[\d.e+-]*%?|inf|\d+ / \d+)$")
COMMAND = "tools/report.py"  # who wrote report.pdf, in the run folder's WrittenFiles record
MARKER = "<!-- svlab-report: written by tools/report.py (or EER.py --report); running it again replaces this file -->"
CI_KEYS = {"eer": "eer_ci95", "min_dcf_0.01": "min_dcf_0.01_ci95"}  # metrics.json: [low, high]
OWN = EN["own"]
COMPARE_NOTE = EN["compare_note"]
EVAL_COLUMNS = EN["eval_columns"]


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
    found.sort(key=lambda pm: (_epoch(pm[1]), str(pm[0])))
    return found


def _epoch(m: dict) -> int:
    return m.get("epoch") if isinstance(m.get("epoch"), int) else -1


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


def _ci(m: dict, key: str, fmt) -> str:
    ci = m.get(CI_KEYS[key])
    try:
        lo, hi = (float(x) for x in ci)
    except (TypeError, ValueError):
        return ""
    return f"[{fmt(lo)}, {fmt(hi)}]"


def _eval_row(run_dir: Path, path: Path, m: dict, with_ci: bool = False) -> list[str]:
    row = [_relpath(path.parent, run_dir), "" if m.get("epoch") is None else str(m["epoch"]),
           str(m.get("backend", "cosine")), _pct(m.get("eer")), _num(m.get("threshold"), 5),
           _num(m.get("min_dcf_0.01")), _num(m.get("min_dcf_0.001")), _num(m.get("actual_dcf_0.01")),
           _num(m.get("cllr")), f"{m.get('n_target', '')} / {m.get('n_nontarget', '')}", _trials_name(m)]
    if with_ci:  # after EER and after minDCF(0.01)
        row.insert(4, _ci(m, "eer", _pct))
        row.insert(7, _ci(m, "min_dcf_0.01", _num))
    return row


def _columns(w: dict, with_ci: bool) -> list[str]:
    cols = list(w["eval_columns"])
    if with_ci:
        cols.insert(4, w["eer_ci"])
        cols.insert(7, w["dcf_ci"])
    return cols


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
        g["evaluations"].sort(key=lambda pm: (_epoch(pm[1]), str(pm[0])))
    return sorted(tables, key=lambda g: not g["own"])


def _relpath(path: Path, start: Path) -> str:
    try:
        return Path(os.path.relpath(Path(path).resolve(), Path(start).resolve())).as_posix()
    except ValueError:  # another drive (Windows): absolute file URL
        return Path(path).resolve().as_uri()


def _run_config(run_dir: Path) -> dict | None:
    """The configuration the run was trained with (its ``config.yaml`` over the shipped defaults)."""
    if not (Path(run_dir) / "config.yaml").is_file():
        return None
    try:
        return load_config(Path(run_dir) / "config.yaml")
    except (LabError, OSError):
        return None


def main_evaluation(evals: list, own: TrialListRef | None, run_cfg: dict | None) -> tuple[Path, dict] | None:
    """The evaluation the report's result shows: of the latest epoch evaluated on the run's own trial list
    (any list if none), the latest with the run's scoring system (else the latest)."""
    pool = [pm for pm in evals if own is not None and own.matches(pm[1])] or list(evals)
    if not pool:
        return None
    pool = [pm for pm in pool if _epoch(pm[1]) == max(_epoch(m) for _, m in pool)]
    try:
        from svlab.scoring_system import scoring_options
        system = scoring_options(run_cfg).label if run_cfg else "cosine"
    except (LabError, KeyError, TypeError, ValueError):
        system = "cosine"
    same = [pm for pm in pool if pm[1].get("backend", "cosine") == system]
    return (same or pool)[-1]


def _evaluation_part(run_dir: Path, path: Path, m: dict, w: dict, cjk: str | None) -> dict:
    figures, why = content.evaluation_figures(path.parent, m, w, cjk)
    for f in figures:
        f["file"] = _relpath(f["file"], run_dir)
    return {"folder": _relpath(path.parent, run_dir), "m": m, "lab_line": content.lab_line(m), "figures": figures,
            "not_redrawn": why}


def collect(run_dir: Path, trials: Path | None = None, lang: str = "en") -> dict:
    """Everything the report shows, as plain data (``trials``: the trial list to put first instead of the
    run's own, when the user gave one explicitly; ``lang``: the language of the page and its figures)."""
    from svlab.plots import cjk_font
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"run folder not found: {run_dir} (train first, or pass the right --n_folder)")
    w = words(lang)
    cjk = cjk_font() if w["plot"] else None
    columns, log_rows = read_log(run_dir)
    run_cfg = _run_config(run_dir)
    epochs = (run_cfg or {}).get("train", {}).get("epochs")
    evals = find_evaluations(run_dir)
    config_text = (run_dir / "config.yaml").read_text(encoding="utf-8") if (run_dir / "config.yaml").is_file() else ""
    own = TrialListRef(trials) if trials is not None else run_trial_list(run_dir)
    tables = []
    for g in by_trial_list(evals, find_baselines(run_dir), own):
        pms = g["evaluations"] + g["baselines"]
        with_ci = any(m.get(k) is not None for _, m in pms for k in CI_KEYS.values())
        tables.append({"trials": g["trials"], "own": g["own"], "columns": _columns(w, with_ci),
                       "rows": [_eval_row(run_dir, p, m, with_ci) for p, m in pms]})
    main = main_evaluation(evals, own, run_cfg)
    result, verify = None, None
    if main is not None:
        result = _evaluation_part(run_dir, *main, w, cjk)
        try:
            verify = content.verify_example(run_dir, main[0], run_cfg)
        except (LabError, OSError, ValueError, KeyError, RuntimeError) as e:
            verify = excerpt(str(e), 300)
    others = [_evaluation_part(run_dir, p, m, w, cjk) for p, m in evals if main is None or p != main[0]]
    return {
        "run_dir": run_dir, "name": run_dir.name, "lang": lang, "w": w, "cjk_missing": bool(w["plot"]) and not cjk,
        "log_columns": columns, "log_rows": log_rows, "log_lines": content.train_stage_lines(log_rows, epochs),
        "curves": "curves.png" if (run_dir / "curves.png").is_file() else None,
        "curves_figure": content.curves_figure(log_rows, columns, w, cjk),
        "evaluations": [_eval_row(run_dir, p, m) for p, m in evals], "tables": tables,
        "result": result, "verify": verify, "others": others, "config": config_text,
        "ci_method": next((str(m["ci_method"]) for _, m in evals if m.get("eer_ci95") and m.get("ci_method")), ""),
        "generated": _dt.datetime.now().isoformat(timespec="seconds"),
    }


# --------------------------------------------------------------------------------------------------
# markdown
# --------------------------------------------------------------------------------------------------
def _md_table(header, rows) -> str:
    def cell(x):
        return one_line(x).replace("|", "\\|")
    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(x) for x in r) + " |" for r in rows]
    return "\n".join(lines)


def _verify_rows(v: dict, w: dict) -> list[list[str]]:
    return [[w["target_trial"] if r["target"] else w["nontarget_trial"], r["enroll"], r["test"], f"{r['score']:.5f}",
             "" if r["recorded"] is None else f"{r['recorded']:.5f}", f"{v['threshold']:.5f}",
             w["accept"] if r["accept"] else w["reject"]] for r in v["rows"]]


def _log_header(d: dict) -> list[str]:
    return [d["w"]["log_columns"].get(k, k) for k in d["log_columns"]]


def render_markdown(d: dict) -> str:
    w = d["w"]
    out = [f"# {w['title'].format(run=one_line(d['name']))}", "",
           w["folder_line"].format(folder=f"`{one_line(d['run_dir'])}`", when=d["generated"]), "",
           f"## {w['training']}", ""]
    if d["log_lines"]:
        out += [f"{w['log_lines']}:", "", "```", *d["log_lines"], "```", ""]
    if d["curves"]:
        out += [f"![{w['curves_alt']}]({d['curves']})", ""]
    if d["log_rows"]:
        out += [_md_table(_log_header(d), [[_fmt_log(k, r.get(k, "")) for k in d["log_columns"]]
                                           for r in d["log_rows"]]), ""]
    else:
        out += [w["no_log"], ""]
    if d["result"]:
        r = d["result"]
        out += [f"## {w['result']}", "", w["lab_line"].format(folder=r["folder"], system=one_line(r["m"].get("system", ""))),
                "", "```", one_line(r["lab_line"]), "```", ""]
        out += [" ".join(f"![{w[f['kind']]}]({one_line(f['file'])})" for f in r["figures"]), ""]
        out += _md_verify(d)
    out += [f"## {w['evaluations']}", ""]
    for t in d["tables"]:
        out += [f"### {w['trial_list'].format(name='`' + one_line(t['trials']) + '`')}{w['own'] if t['own'] else ''}",
                "", _md_table(t["columns"], t["rows"]) if t["rows"] else w["no_eval_on_list"], ""]
    if d["evaluations"]:
        out += [f"{w['compare_note']} {w['metrics_note']}", ""]
    else:
        out += [w["no_eval"].format(command="`python EER.py --cp_num N`"), ""]
    for e in d["others"]:
        m = e["m"]
        out += [f"### {w['eval_heading'].format(folder=one_line(e['folder']), system=one_line(m.get('system', '')))}",
                "", "```", one_line(e["lab_line"]), "```", "",
                w["eval_summary"].format(eer=_pct(m.get("eer")), trials=f"`{one_line(_trials_name(m))}`",
                                         dcf=_num(m.get("min_dcf_0.01")),
                                         checkpoint=f"`{one_line(Path(str(m.get('checkpoint'))).name)}`"), ""]
        out += [" ".join(f"![{w[f['kind']]}]({one_line(f['file'])})" for f in e["figures"]), ""]
    out += [f"## {w['configuration']}", "", "```yaml", printable(d["config"]).rstrip("\n") or w["no_config"],
            "```", ""]
    return "\n".join(out)


def _md_verify(d: dict) -> list[str]:
    w, v = d["w"], d["verify"]
    out = [f"### {w['verify']}", ""]
    if isinstance(v, dict):
        out += [w["verify_intro"].format(folder=d["result"]["folder"]), "", "```", one_line(v["command"]), "```", "",
                _md_table(w["verify_columns"], _verify_rows(v, w)), ""]
    else:
        out += [w["no_verify"].format(why=one_line(v)), ""]
    return out


# --------------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------------
FONTS = {"en": 'system-ui, -apple-system, "Segoe UI", "Noto Sans", "Microsoft YaHei", sans-serif',
         "zh": '"Noto Sans CJK SC", "Source Han Sans SC", "PingFang SC", "Microsoft YaHei", "Noto Sans SC", '
               '"WenQuanYi Zen Hei", "Noto Sans", sans-serif'}
MONO = 'ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, "Noto Sans Mono CJK SC", monospace'

CSS = """
body { font-family: %(font)s; max-width: 190mm; margin: 2em auto; padding: 0 1em; color: #222; line-height: 1.45; }
code, pre { font-family: %(mono)s; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
th { background: #f0f0f0; } td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.wide { overflow-x: auto; max-width: 100%%; }
.log { max-height: 28em; overflow-y: auto; display: inline-block; }
.pics { display: flex; flex-wrap: wrap; gap: 4mm; } figure { margin: 0 0 1em; max-width: 100%%; }
img.fig { display: block; width: 100%%; height: auto; outline: 1px solid #e4e4e4; }
figcaption { font-size: 0.8em; color: #666; }
pre { background: #f6f6f6; border: 1px solid #e0e0e0; padding: 0.6em 0.9em; overflow-x: auto; }
.note { color: #775; }
#img-check { color: #777; font-size: 0.8em; margin-top: 2em; }
@page { size: A4; margin: 15mm 15mm 16mm;
        @bottom-right { content: counter(page) " / " counter(pages); font-size: 8pt; color: #777; } }
@media print {
  body { max-width: none; margin: 0; padding: 0; font-size: 10pt; }
  section { break-before: page; } section.first { break-before: auto; }
  .log, .wide { max-height: none; overflow: visible; display: block; }
  table { font-size: 8.5pt; max-width: 100%%; } th, td { padding: 0.15em 0.4em; overflow-wrap: anywhere; }
  td.path { min-width: 25mm; }
  thead { display: table-header-group; } tr, figure, pre.console, .keep { break-inside: avoid; }
  h1, h2, h3 { break-after: avoid; }
  pre { white-space: pre-wrap; overflow-wrap: anywhere; overflow: visible; font-size: 8.5pt; }
  #img-check { display: none; }
}
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
    def cell(x: str) -> str:
        cls = ' class="num"' if _NUMERIC.match(x) else ' class="path"' if "/" in x and " " not in x else ""
        return f"<td{cls}>{e(x)}</td>"
    body = "".join("<tr>" + "".join(cell(str(x)) for x in r) + "</tr>" for r in rows)
    wrap = f' class="{cls}"' if cls else ' class="wide"'
    return f"<div{wrap}><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"


def _img(fig: dict, alt: str, w: dict) -> str:
    """A figure with its PNG inside, shown at its printed width (a redrawn figure: the width it was drawn for)."""
    width, _, dpi = content.png_size(fig["png"])
    info = fig.get("info") or {}
    mm = info.get("width_mm") or min(content.FIGURE_MM[fig["kind"]][0], width / (dpi or 120) * 25.4)
    attrs = f' data-min-font-pt="{info["min_font_pt"]:.2f}" data-dpi="{info["dpi"]}"' if info else ""
    caption = w["redrawn_from"].format(file=fig["file"]) if info else w["not_redrawn"].format(why=fig["file"])
    return (f'<figure style="width: {mm:.1f}mm"><img class="fig" src="{content.data_uri(fig["png"])}" '
            f'data-width-mm="{mm:.1f}" data-file="{_h(fig["file"])}" data-kind="{fig["kind"]}"{attrs} alt="{_h(alt)}">'
            f"<figcaption>{_h(caption)}</figcaption></figure>")


def _figures_html(part: dict, w: dict) -> list[str]:
    figs = {f["kind"]: f for f in part["figures"]}
    row = "".join(_img(figs[k], f"{w[k]}: {part['folder']}", w) for k in ("roc", "det") if k in figs)
    out = [f'<div class="pics">{row}</div>'] if row else []
    if "hist" in figs:
        out.append(_img(figs["hist"], f"{w['hist']}: {part['folder']}", w))
    if part["not_redrawn"]:
        out.append(f'<p class="note">{_h(w["not_redrawn"].format(why=part["not_redrawn"]))}</p>')
    return out


def render_html(d: dict) -> str:
    e, w = _h, d["w"]
    title = w["title"].format(run=d["name"])
    parts = ["<!DOCTYPE html>", MARKER, f'<html lang="{HTML_LANG[d["lang"]]}"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>{e(title)}</title>", f"<style>{CSS % {'font': FONTS[d['lang']], 'mono': MONO}}</style></head><body>",
             '<section class="first" id="training">', f"<h1>{e(title)}</h1>",
             "<p>" + w["folder_line"].format(folder=f"<code>{e(str(d['run_dir']))}</code>", when=e(d["generated"]))
             + "</p>", f"<h2>1. {e(w['training'])}</h2>"]
    if d["cjk_missing"]:
        parts.append(f'<p class="note">{e(w["no_cjk_font"])}</p>')
    if d["log_lines"]:
        parts += [f"<h3>{e(w['log_lines'])}</h3>", f'<pre class="console">{e(chr(10).join(d["log_lines"]))}</pre>']
    if d["curves_figure"]:
        fig = {**d["curves_figure"], "file": d["curves"] or "train_log.csv"}
        parts += [f"<h3>{e(w['curves'])}</h3>", _img(fig, w["curves_alt"], w)]
    if d["log_rows"]:
        parts += [f"<h3>{e(w['epoch_table'])}</h3>",
                  _html_table(_log_header(d), [[_fmt_log(k, r.get(k, "")) for k in d["log_columns"]]
                                               for r in d["log_rows"]], cls="log")]
    else:
        parts.append(f"<p>{e(w['no_log'])}</p>")
    parts.append("</section>")
    if d["result"]:
        r = d["result"]
        parts += ['<section id="result">', f"<h2>2. {e(w['result'])}</h2>",
                  f"<p>{e(w['lab_line'].format(folder=r['folder'], system=r['m'].get('system', '')))}</p>",
                  f'<pre class="console lab-line">{e(r["lab_line"])}</pre>', *_figures_html(r, w),
                  f'<div class="keep" id="verify"><h3>{e(w["verify"])}</h3>']
        v = d["verify"]
        if isinstance(v, dict):
            parts += [f"<p>{e(w['verify_intro'].format(folder=r['folder']))}</p>",
                      f'<pre class="console">$ {e(v["command"])}</pre>',
                      _html_table(w["verify_columns"], _verify_rows(v, w))]
        else:
            parts.append(f'<p class="note">{e(w["no_verify"].format(why=v))}</p>')
        parts.append("</div></section>")
    parts += ['<section id="evaluations">', f"<h2>{3 if d['result'] else 2}. {e(w['evaluations'])}</h2>"]
    for t in d["tables"]:
        name = w["trial_list"].format(name=f"<code>{e(t['trials'])}</code>")
        parts.append(f"<h3>{name}{e(w['own']) if t['own'] else ''}</h3>")
        parts.append(_html_table(t["columns"], t["rows"]) if t["rows"] else f"<p>{e(w['no_eval_on_list'])}</p>")
    if d["evaluations"]:
        ci = any(len(t["columns"]) > len(w["eval_columns"]) for t in d["tables"])
        ci_text = f" {w['ci_note']}" + (f" ({d['ci_method']})" if d["ci_method"] else "") if ci else ""
        parts.append(f"<p>{e(w['compare_note'])} {e(w['metrics_note'])}{e(ci_text)}</p>")
    else:
        parts.append(f"<p>{e(w['no_eval']).format(command='<code>python EER.py --cp_num N</code>')}</p>")
    for part in d["others"]:
        m = part["m"]
        parts.append(f"<h3>{e(w['eval_heading'].format(folder=part['folder'], system=m.get('system', '')))}</h3>")
        parts.append(f'<pre class="console lab-line">{e(part["lab_line"])}</pre>')
        parts.append("<p>" + e(w["eval_summary"].format(
            eer=_pct(m.get("eer")), trials=_trials_name(m), dcf=_num(m.get("min_dcf_0.01")),
            checkpoint=Path(str(m.get("checkpoint"))).name)) + "</p>")
        parts += _figures_html(part, w)
    parts += ["</section>", '<section id="configuration">', f"<h2>{4 if d['result'] else 3}. {e(w['configuration'])}</h2>",
              f"<pre>{e(d['config']) or e(w['no_config'])}</pre>", "</section>",
              '<div id="img-check">images: not checked (JavaScript is off)</div>',
              f"<script>{IMG_CHECK_JS}</script>", "</body></html>"]
    return "\n".join(parts) + "\n"


# --------------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------------
def _head(path: Path, n: int = 8192) -> str:
    try:
        with open(path, "rb") as f:
            return f.read(n).decode("utf-8", errors="replace")
    except OSError:
        return ""


def is_report_html(path: Path) -> bool:
    """An earlier report page: it carries ``MARKER`` (or is an older version's report, by its title and check)."""
    head = _head(path)
    return MARKER.split(":")[0] in head or ("<title>Speaker verification report: run " in head and "#img-check" in head)


def is_report_markdown(path: Path) -> bool:
    first = _head(path, 1024).split("\n", 1)[0]
    return any(first.startswith("# " + t["title"].split("{")[0]) for t in LANGUAGES.values())


def write_report(run_dir: Path, log=say, trials: Path | None = None, lang: str = "en",
                 pdf: bool = True) -> tuple[Path, Path]:
    """Write ``report.html``, ``report.pdf`` (``pdf``, with Chromium) and ``report.md`` into ``run_dir``;
    returns the paths of the markdown and the page (``trials``, ``lang``: see ``collect``)."""
    run_dir = Path(run_dir)
    if lang not in LANGUAGES:
        raise ReportError(f"report language {excerpt(lang)}: choose one of {', '.join(LANGUAGES)}")
    md, page, pdf_path = run_dir / "report.md", run_dir / "report.html", run_dir / "report.pdf"
    record = WrittenFiles(run_dir, COMMAND, log=log)
    browser = chromium.find_browser() if pdf else None
    for path, ours, how in ((page, is_report_html, "a report page begins with " + MARKER.split(":")[0]),
                            (md, is_report_markdown, "a report's first line is its title"),
                            (pdf_path, record.wrote, f"a report.pdf is recorded in {WrittenFiles.NAME}")):
        if run_dir.is_dir() and (browser or path != pdf_path):  # a PDF it will not print is not in the way
            refuse_overwrite(path, ours=ours, flag=None, command="the report", recognised_by=how,
                             fix="move that file away (or rename it) and run again")
    d = collect(run_dir, trials, lang)
    atomic_write(page, lambda tmp: tmp.write_text(render_html(d), encoding="utf-8"))
    atomic_write(md, lambda tmp: tmp.write_text(render_markdown(d), encoding="utf-8"))
    wrote = [str(page)]
    if pdf:
        why = _write_pdf(page, pdf_path, record, lang, browser)
        if why is None:
            wrote.append(pdf_path.name)
        else:
            if record.wrote(pdf_path):  # an earlier report's PDF would not match the new page
                pdf_path.unlink()
                why += "; the earlier report.pdf is removed"
            log(f"report: no report.pdf ({why}): the HTML alone (print report.html from a browser for a PDF)")
    log(f"report: {', '.join(wrote)} and {md.name} ({len(d['evaluations'])} evaluation(s), "
        f"{len(d['log_rows'])} epoch(s))")
    return md, page


def _write_pdf(page: Path, pdf_path: Path, record: WrittenFiles, lang: str, browser: str | None) -> str | None:
    """Print ``page`` to ``pdf_path`` with ``browser``; None when done, else why not (one line)."""
    if browser is None:
        return "Chromium is not installed"
    if lang == "zh" and chromium.cjk_font_installed() is False:
        return "no font with Chinese characters is installed (apt-get install fonts-noto-cjk)"
    try:
        record.write(pdf_path, lambda tmp: chromium.print_pdf(page, tmp, browser=browser))
    except ReportError as e:
        return str(e)
    return None
