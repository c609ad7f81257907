"""The report to hand in (issue 23 item 4): one self-contained report.html, printable, report.pdf
printed by real headless Chromium, and Chinese (--lang zh) that really renders.

One tiny run (2 epochs) is trained and evaluated once; the English report is written into its folder,
the Chinese one (through tools/report.py --lang zh) into a copy. Browser checks skip with a reason where
Chromium or poppler-utils (pdftoppm, pdfimages) is not installed (.ci/run installs both).
"""
from __future__ import annotations

import base64
import html
import json
import os
import re
import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml

import EER
import report
import train
from svlab import chromium, plots
from svlab import report as svreport
from svlab import report_content
from svlab.config import load_config
from svlab.files import WrittenFiles

CJK = re.compile("[\u3000-\u303f\u3400-\u9fff\uff00-\uffef]")
TOFU = "\u0378"  # an unassigned code point: every font draws it as its "no glyph" box
DEJAVU = Path("/usr/share/fonts/truetype/dejavu")  # Latin only: Chinese text becomes boxes


def _need(*tools: str) -> None:
    if chromium.find_browser() is None:
        pytest.skip("Chromium is not installed (apt-get install chromium): the report is not opened in a browser")
    for tool in tools:
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (apt-get install poppler-utils): the PDF is not rendered")


@pytest.fixture(scope="module")
def made(make_config, tmp_path_factory):
    base = tmp_path_factory.mktemp("report_print")
    # validated epochs (svlab/validation.py) print a longer log line and add curves: hold 2 speakers apart
    cfg = make_config(base, {"validation.mode": "on"} if "validation" in load_config() else {})
    printed: list[str] = []
    train.train(cfg, log=lambda *a: printed.append(" ".join(map(str, a))))
    run = base / "runs" / "000"
    EER.evaluate(cfg, run / "checkpoint_002.pth", log=lambda *a: printed.append(" ".join(map(str, a))))
    zh = base / "zh" / "000"
    shutil.copytree(run, zh)
    lines: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        svreport.write_report(run, log=lines.append)
        assert report.main(["--run_dir", str(zh), "--lang", "zh"]) == 0
    return {"run": run, "zh": zh, "cfg": cfg, "printed": printed, "lines": lines,
            "page": (run / "report.html").read_text(encoding="utf-8"),
            "zh_page": (zh / "report.html").read_text(encoding="utf-8"),
            "warnings": [str(w.message) for w in caught]}


def _images(page: str) -> list[dict]:
    """Every <img> of the page: its attributes and the PNG inside it."""
    out = []
    for tag in re.findall(r"<img\b[^>]*>", page):
        attrs = dict(re.findall(r'([\w-]+)="([^"]*)"', tag))
        assert attrs["src"].startswith("data:image/png;base64,"), attrs["src"][:60]
        attrs["png"] = base64.b64decode(attrs["src"].split(",", 1)[1])
        out.append(attrs)
    return out


# --------------------------------------------------------------------------------------------------
# contents
# --------------------------------------------------------------------------------------------------
def test_the_page_holds_what_the_handout_asks_for_and_nothing_outside_it(made):
    page, run = made["page"], made["run"]
    assert page.startswith("<!DOCTYPE html>\n" + svreport.MARKER)
    # self-contained: no file or URL outside the page (pictures are data: URIs)
    assert not re.search(r"""(src|href)=["'](?!data:)""", page) and "<link" not in page and "url(" not in page
    imgs = _images(page)
    assert [i["data-kind"] for i in imgs] == ["curves", "roc", "det", "hist"]
    # the training log lines exactly as train.py printed them (the handout's part; seconds are rounded in the csv)
    shown = html.unescape(re.search(r'<pre class="console">(Train Stage.*?)</pre>', page, re.S).group(1)).splitlines()
    train_lines = [ln for ln in made["printed"] if ln.startswith("Train Stage:")]
    assert len(shown) == len(train_lines) == 2
    assert "validation" not in made["cfg"] or all(" | val EER " in ln for ln in train_lines)
    for ours, theirs in zip(shown, train_lines):
        assert ours.split("s)")[0].rsplit(",", 1)[0] == theirs.split("s)")[0].rsplit(",", 1)[0]
    # the lab's EER line as EER.py printed it
    lab = next(ln for ln in made["printed"] if ln.startswith("Epoch="))
    assert f'<pre class="console lab-line">{html.escape(lab)}</pre>' in page
    # one verification example: a target and a non-target trial at the evaluation's EER threshold
    m = json.loads((run / "eval_002" / "metrics.json").read_text())
    rows = re.search(r'<div class="keep" id="verify">.*?<tbody>(.*?)</tbody>', page, re.S).group(1)
    cells = [re.findall(r"<td[^>]*>(.*?)</td>", r) for r in re.findall(r"<tr>(.*?)</tr>", rows)]
    assert [c[0] for c in cells] == ["target (same speaker)", "non-target (different speakers)"]
    scores = {tuple(ln.split()[:2]): float(ln.split()[2]) for ln in (run / "eval_002" / "scores.txt").read_text().splitlines()}
    for trial, enroll, test, score, recorded, threshold, decision in cells:
        assert float(threshold) == pytest.approx(m["threshold"], abs=1e-5)
        assert float(score) == pytest.approx(scores[(enroll, test)], abs=1e-3) == pytest.approx(float(recorded), abs=1e-3)
        assert decision == ("ACCEPT (same speaker)" if float(score) >= m["threshold"] else "REJECT (different speakers)")
    assert "$ python tools/verify.py " in page and "--checkpoint " in page
    # the configuration the run was trained with, and the sections in order, each on its own printed page
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["embedding_size"] == 16
    assert "embedding_size: 16" in page
    assert [s for s in re.findall(r'<section[^>]*id="(\w+)"', page)] == ["training", "result", "evaluations",
                                                                          "configuration"]
    assert "section { break-before: page; }" in page and ".log, .wide { max-height: none;" in page
    md = (run / "report.md").read_text(encoding="utf-8")
    assert train_lines[0].split("  (")[0] in md and lab in md and "| target (same speaker) |" in md


def test_figures_are_drawn_for_print_with_text_of_at_least_9_pt(made):
    for img in _images(made["page"]):
        width_px, _, dpi = report_content.png_size(img["png"])
        assert dpi == pytest.approx(float(img["data-dpi"]), abs=0.5)
        printed = plots.printed_pt(float(img["data-min-font-pt"]), width_px, dpi, float(img["data-width-mm"]))
        assert printed >= 9.0, (img["data-kind"], printed)
        assert float(img["data-width-mm"]) <= 180  # A4 between the 15 mm margins


# --------------------------------------------------------------------------------------------------
# in the browser, and the PDF
# --------------------------------------------------------------------------------------------------
def test_every_image_decodes_in_chromium(made):
    _need()
    for page in (made["run"] / "report.html", made["zh"] / "report.html"):
        proc = chromium.run_browser(["--virtual-time-budget=5000", "--dump-dom", page.resolve().as_uri()])
        m = re.search(r'<div id="img-check"[^>]*data-loaded="(\d+)"[^>]*data-total="(\d+)"', proc.stdout)
        assert m, f"no image check in the DOM (exit {proc.returncode}): {proc.stderr[-300:]}"
        assert int(m.group(2)) == 4 and m.group(1) == m.group(2), f"{m.group(1)}/{m.group(2)} images decoded"


def test_the_pdf_pages_render_and_print_the_figures_at_their_size(made, tmp_path):
    _need("pdftoppm", "pdfimages")
    pdf = made["run"] / "report.pdf"
    assert pdf.read_bytes()[:5] == b"%PDF-" and WrittenFiles(made["run"], svreport.COMMAND).wrote(pdf)
    assert any(ln.startswith("report: ") and "report.pdf" in ln for ln in made["lines"])
    subprocess.run(["pdftoppm", "-r", "40", "-gray", str(pdf), str(tmp_path / "page")], check=True, timeout=60)
    pages = sorted(tmp_path.glob("page-*.pgm"))
    assert len(pages) >= 4  # one section per page at least
    for p in pages:
        pixels = _pgm(p)
        assert pixels.shape == (468, 331), f"{p.name}: not A4"  # 297 x 210 mm at 40 dpi
        assert (pixels < 160).sum() > 100, f"{p.name} is blank"
    # every figure in the PDF at the resolution it was drawn with: printed at scale 1 (no shrinking)
    listed = subprocess.run(["pdfimages", "-list", str(pdf)], capture_output=True, text=True, timeout=60).stdout
    ppi = [(int(r[3]), float(r[12])) for r in (ln.split() for ln in listed.splitlines()[2:]) if len(r) > 12]
    imgs = _images(made["page"])
    assert len(ppi) == len(imgs)
    for img, (width, x_ppi) in zip(imgs, ppi):
        assert width == report_content.png_size(img["png"])[0]
        scale = float(img["data-dpi"]) / x_ppi
        assert float(img["data-min-font-pt"]) * scale >= 9.0 - 0.1, (img["data-kind"], x_ppi)


def _pgm(path: Path) -> np.ndarray:
    data = path.read_bytes()
    magic, width, height, maxval, pixels = data.split(maxsplit=4)
    assert magic == b"P5" and maxval == b"255"
    return np.frombuffer(pixels[: int(width) * int(height)], np.uint8).reshape(int(height), int(width))


def _title_band(pdf: Path, out: Path) -> np.ndarray:
    """Page 1 from the top margin to 40 mm down (the title and the line under it), at 100 dpi, grey."""
    subprocess.run(["pdftoppm", "-f", "1", "-l", "1", "-r", "100", "-gray", "-y", "59", "-H", "98", "-W", "827",
                    "-x", "0", str(pdf), str(out)], check=True, timeout=60)
    return _pgm(next(out.parent.glob(out.name + "*.pgm")))


def _print(page: Path, pdf: Path, env: dict | None = None) -> None:
    proc = chromium.run_browser([*chromium.PDF_FLAGS, f"--print-to-pdf={pdf}", page.resolve().as_uri()], env=env)
    assert pdf.is_file(), proc.stderr[-300:]


def _glyphs_versus_boxes(page_text: str, folder: Path, env: dict | None = None) -> float:
    """Fraction of the title band's pixels that differ between the page and the same page with every
    Chinese character replaced by a character no font has (drawn as the font's empty box)."""
    folder.mkdir()
    real, boxes = folder / "real.html", folder / "boxes.html"
    real.write_text(page_text, encoding="utf-8")
    boxes.write_text(CJK.sub(TOFU, page_text), encoding="utf-8")
    _print(real, folder / "real.pdf", env)
    _print(boxes, folder / "boxes.pdf", env)
    a, b = _title_band(folder / "real.pdf", folder / "real"), _title_band(folder / "boxes.pdf", folder / "boxes")
    assert (a < 128).mean() > 0.005  # the band holds the title
    return float((np.abs(a.astype(int) - b.astype(int)) > 64).mean())


def test_chinese_headings_render_as_glyphs_not_boxes(made, tmp_path):
    _need("pdftoppm")
    if chromium.cjk_font_installed() is False:
        pytest.skip("no font with Chinese characters (apt-get install fonts-noto-cjk): report.pdf is not made in zh")
    page = made["zh_page"]
    assert '<html lang="zh-CN">' in page and "<h1>声纹识别实验报告：运行 000</h1>" in page and "<h2>2. 验证结果</h2>" in page
    assert (made["zh"] / "report.pdf").is_file()
    differ = _glyphs_versus_boxes(page, tmp_path / "fonts")
    assert differ > 0.01, f"the Chinese title looks like the 'no glyph' boxes ({differ:.4f} of the pixels differ)"
    # the figures got Chinese labels in a font that has them (no missing-glyph warning from matplotlib)
    assert "错误接受率 FAR (%)" in json.dumps(plots.PrintStyle(1, 1, text=svreport.words("zh")["plot"]).text,
                                          ensure_ascii=False)
    assert plots.cjk_font() is not None and "no font with Chinese" not in page
    assert not [w for w in made["warnings"] if "missing from font" in w], made["warnings"]


def test_the_glyph_check_sees_boxes_when_no_chinese_font_is_there(made, tmp_path):
    """The check above fails without a CJK font: with fontconfig shown Latin fonts only, the title and
    the 'no glyph' boxes print alike."""
    _need("pdftoppm")
    if not DEJAVU.is_dir():
        pytest.skip(f"{DEJAVU} not found: no Latin-only font set to hide the CJK fonts with")
    conf = tmp_path / "fonts.conf"
    conf.write_text(f'<?xml version="1.0"?><!DOCTYPE fontconfig SYSTEM "fonts.dtd"><fontconfig><dir>{DEJAVU}</dir>'
                    f"<cachedir>{tmp_path / 'fc-cache'}</cachedir></fontconfig>", encoding="utf-8")
    differ = _glyphs_versus_boxes(made["zh_page"], tmp_path / "no_cjk", env={**os.environ, "FONTCONFIG_FILE": str(conf)})
    assert differ < 0.002, differ


# --------------------------------------------------------------------------------------------------
# without Chromium, files it did not write, confidence intervals
# --------------------------------------------------------------------------------------------------
def test_without_chromium_the_html_alone_said_in_one_line(made, tmp_path, monkeypatch):
    run = tmp_path / "000"
    shutil.copytree(made["run"], run)  # with the report.pdf an earlier report wrote, where Chromium is installed
    earlier = "; the earlier report.pdf is removed" if (run / "report.pdf").exists() else ""
    m_path = run / "eval_002" / "metrics.json"
    m = json.loads(m_path.read_text())
    m.update({"eer_ci95": [m["eer"] * 0.5, m["eer"] * 1.5], "min_dcf_0.01_ci95": [0.25, 0.75]})
    m_path.write_text(json.dumps(m))
    monkeypatch.setattr(chromium, "find_browser", lambda: None)
    lines: list[str] = []
    svreport.write_report(run, log=lines.append)
    assert not (run / "report.pdf").exists()  # the earlier report's PDF would not match the new page
    said = [ln for ln in lines if "report.pdf" in ln]
    assert said == [f"report: no report.pdf (Chromium is not installed{earlier}): "
                    "the HTML alone (print report.html from a browser for a PDF)"]
    page = (run / "report.html").read_text(encoding="utf-8")
    assert "<th>EER 95% CI</th>" in page and "<th>minDCF(0.01) 95% CI</th>" in page
    assert f"[{m['eer'] * 50:.2f}%, {m['eer'] * 150:.2f}%]" in page and "[0.2500, 0.7500]" in page
    # the printing failing is said the same way, and leaves no PDF
    monkeypatch.setattr(chromium, "find_browser", lambda: "/bin/false")
    lines.clear()
    svreport.write_report(run, log=lines.append, lang="en")
    assert any(ln.startswith("report: no report.pdf (Chromium printed no PDF (exit 1") for ln in lines), lines
    assert not (run / "report.pdf").exists() and not list(run.glob(".report.pdf.*"))
    # without Chromium, a report.pdf the report did not write (printed from a browser) is left alone
    monkeypatch.setattr(chromium, "find_browser", lambda: None)
    (run / "report.pdf").write_bytes(b"%PDF-1.4 printed from my browser\n")
    svreport.write_report(run, log=lines.append, pdf=True)
    assert (run / "report.pdf").read_bytes() == b"%PDF-1.4 printed from my browser\n"


def test_report_files_it_did_not_write_are_never_replaced(made, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(chromium, "find_browser", lambda: "/bin/false")  # refused before anything is printed
    run = tmp_path / "000"
    shutil.copytree(made["run"], run, ignore=shutil.ignore_patterns("report.*", "*.pth", WrittenFiles.NAME))
    cases = {"report.html": "<html><body>my own notes</body></html>", "report.md": "# My lab notes\n",
             "report.pdf": "%PDF-1.4 printed by me\n"}
    for name, text in cases.items():
        (run / name).write_text(text, encoding="utf-8")
        assert report.main(["--run_dir", str(run)] + (["--no_pdf"] if name != "report.pdf" else [])) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {run / name} already exists and is not an earlier output of the report")
        assert len(err.splitlines()) == 1 and "move that file away" in err
        assert (run / name).read_text(encoding="utf-8") == text
        assert not {"report.html", "report.md", "report.pdf"} - {name} & {p.name for p in run.iterdir()}
        (run / name).unlink()
    # an older version's report (no marker yet) is recognised by its title and replaced
    (run / "report.html").write_text("<!DOCTYPE html>\n<html><head><title>Speaker verification report: run 000"
                                     "</title><style>#img-check { }</style></head></html>", encoding="utf-8")
    (run / "report.md").write_text("# Speaker verification report: run 000\n", encoding="utf-8")
    assert svreport.is_report_html(run / "report.html") and svreport.is_report_markdown(run / "report.md")
    assert not svreport.is_report_html(made["run"] / "config.yaml")


def test_without_a_font_for_chinese_the_figures_stay_english_and_the_page_says_so(made, monkeypatch):
    zh = svreport.words("zh")
    has_cjk_font = plots.cjk_font() is not None  # this machine's, before it is hidden below
    style = report_content.style_for("det", zh, None)
    assert not CJK.search(str(style.text)) and style.fonts == ()  # English labels: never boxes in a figure
    assert report_content.style_for("det", zh, "Noto Sans CJK SC").text["far"] == "错误接受率 FAR (%)"
    monkeypatch.setattr(plots, "cjk_font", lambda: None)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*missing from font")  # a box drawn for a Chinese character
        page = svreport.render_html(svreport.collect(made["zh"], lang="zh"))
    assert zh["no_cjk_font"] in page and "<h2>1. 训练</h2>" in page
    # the report made with this machine's fonts says so exactly when it has no CJK font
    assert (zh["no_cjk_font"] in made["zh_page"]) != has_cjk_font


def test_printed_size_of_a_figure():
    # a 176 mm figure drawn 176 mm wide prints at scale 1; shown at half the width, its 9 pt text is 4.5 pt
    px = round(176 / 25.4 * 150)
    assert plots.printed_pt(9, px, 150, 176) == pytest.approx(9, rel=1e-3)
    assert plots.printed_pt(9, px, 150, 88) == pytest.approx(4.5, rel=1e-3)
