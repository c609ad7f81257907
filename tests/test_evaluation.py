"""Evaluation end to end on one tiny trained run: EER.py outputs, the lab's printed line and the
evaluation index, AS-norm / PLDA / calibration back-ends, embeddings export (EER.py, tools/extract.py),
tools/verify.py and the report (svlab/report.py, tools/report.py).

One tiny run (8 training speakers, 1 epoch of a 32-channel x-vector) is trained once for the module.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml

import EER
import extract
import report
import verify
from scoring_reference import brute_eer, naive_asnorm
from svlab import config, demo_corpus, metrics
from svlab.report import write_report

torch.set_num_threads(1)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# the lab's prefix exactly as the handout shows it, then the trial list the EER is of (issue 18)
LAB_LINE = re.compile(r"^Epoch=(\d+|-) EER= \d+\.\d\d Thres= -?\d+\.\d{5} \(trials: \S.*\)$")


def _silent(*args, **kwargs) -> None:
    pass


# ==================================================================================================
# Fixture: tiny corpus + tiny trained run (once per module)
# ==================================================================================================
@pytest.fixture(scope="module")
def evrun(tmp_path_factory):
    base = tmp_path_factory.mktemp("evaluation_run")
    params = dict(n_train_speakers=8, n_test_speakers=4, utts_per_speaker=4, min_seconds=1.0, max_seconds=1.5)
    if "test_utts_per_speaker" in demo_corpus.DEFAULTS:
        params["test_utts_per_speaker"] = 4
    demo_corpus.generate(base / "corpus", params=params, files_dir=base / "files", workers=1, log=_silent)
    overrides = {
        "data.root": str(base / "corpus"), "data.train_manifest": str(base / "files" / "split_train_set.txt"),
        "test.root": str(base / "corpus"), "test.test_manifest": str(base / "files" / "test_set.txt"),
        "test.trials": str(base / "files" / "trials.txt"),
        "train.save_dir": str(base / "runs"), "train.n_folder": "001", "features.cache_dir": str(base / "cache"),
        "model.channels": 32, "model.embedding_size": 16, "features.n_mfcc": 20, "train.epochs": 1,
        "train.batchsize": 8, "train.crop_frames": 50,
        "test.model_path": str(base / "runs" / "001" / "checkpoint_001.pth"),
    }
    cfg = config.load_config(None, overrides)
    import train
    train.train(cfg, log=_silent)
    nested: dict = {}
    for key, value in overrides.items():
        section, name = key.split(".")
        nested.setdefault(section, {})[name] = value
    cfg_file = base / "eval_config.yaml"
    cfg_file.write_text(yaml.safe_dump(nested), encoding="utf-8")
    run_dir = base / "runs" / "001"
    return dict(base=base, cfg=cfg, cfg_file=cfg_file, run_dir=run_dir, ckpt=run_dir / "checkpoint_001.pth",
                corpus=base / "corpus", files=base / "files")


def _eer_main(evrun, *args) -> int:
    return EER.main(["--config", str(evrun["cfg_file"]), "--checkpoint", str(evrun["ckpt"]), *args])


def _read_scores(path: Path) -> dict:
    out = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        a, b, s = line.split()
        out[(a, b)] = float(s)
    return out


def _read_trials(path: Path) -> list[tuple[str, str, int]]:
    return [(a, b, int(lab)) for a, b, lab in (ln.split() for ln in Path(path).read_text().splitlines() if ln.strip())]


def _is_png(path: Path) -> bool:
    return Path(path).is_file() and Path(path).read_bytes()[:8] == PNG_MAGIC and Path(path).stat().st_size > 2000


# ==================================================================================================
# EER.py end to end
# ==================================================================================================
def test_eer_default_outputs_lab_line_and_index(evrun):
    lines = []
    res = EER.evaluate(evrun["cfg"], evrun["ckpt"], log=lines.append)
    out = evrun["run_dir"] / "eval_001"
    assert Path(res["out_dir"]) == out
    assert any(LAB_LINE.match(ln) for ln in lines), lines
    m = json.loads((out / "metrics.json").read_text())
    for key in ("eer", "threshold", "n_target", "n_nontarget", "checkpoint", "min_dcf_0.01",
                "min_dcf_0.01_threshold", "min_dcf_0.001", "min_dcf_0.001_threshold"):
        assert key in m, key
    assert m["checkpoint"] == str(evrun["ckpt"]) and m["backend"] == "cosine"
    for name in ("roc.png", "det.png", "hist.png"):
        assert _is_png(out / name), name
    # metrics.json agrees with an independent recomputation from scores.txt + the trial list
    scores = _read_scores(out / "scores.txt")
    trials = _read_trials(evrun["files"] / "trials.txt")
    s = np.array([scores[(a, b)] for a, b, _ in trials])
    lab = np.array([t[2] for t in trials])
    assert m["eer"] == pytest.approx(brute_eer(s, lab), abs=2e-6)
    assert (m["n_target"], m["n_nontarget"]) == (int(lab.sum()), int((lab == 0).sum()))
    index = json.loads((evrun["run_dir"] / "evaluations.json").read_text())
    assert index["checkpoint_001.pth"][-1]["metrics"] == "eval_001/metrics.json"
    # still callable with the original positional signature (baseline too)
    base = EER.evaluate(evrun["cfg"], None, evrun["base"] / "baseline_out", None, _silent, True)
    assert (evrun["base"] / "baseline_out" / "det.png").is_file() and base["epoch"] is None


def test_save_embeddings_and_extract_agree(evrun, tmp_path):
    out = tmp_path / "ev"
    assert _eer_main(evrun, "--out", str(out), "--save_embeddings") == 0
    emb = np.load(out / "embeddings.npy")
    rows = (out / "embeddings_index.txt").read_text(encoding="utf-8").splitlines()
    assert emb.dtype == np.float32 and emb.shape == (len(rows), 16) and len(set(rows)) == len(rows)
    # scores.txt are the cosines of these embeddings
    scores = _read_scores(out / "scores.txt")
    idx = {r: i for i, r in enumerate(rows)}
    (a, b), s = next(iter(scores.items()))
    ea, eb = emb[idx[a]], emb[idx[b]]
    assert s == pytest.approx(float(ea @ eb / np.linalg.norm(ea) / np.linalg.norm(eb)), abs=1e-5)
    # extract.py: relative (to --root) and absolute entries, plus a stereo 44.1 kHz copy
    wav, sr = sf.read(evrun["corpus"] / rows[0], dtype="float32")
    import librosa
    stereo = np.stack([librosa.resample(wav, orig_sr=sr, target_sr=44100)] * 2, axis=1)
    sf.write(tmp_path / "stereo44k.wav", stereo, 44100)
    lst = tmp_path / "list.txt"
    lst.write_text(f"# comment\n{rows[0]}\n{evrun['corpus'] / rows[1]}\n\n{tmp_path / 'stereo44k.wav'}\n")
    assert extract.main(["--config", str(evrun["cfg_file"]), "--checkpoint", str(evrun["ckpt"]), "--list", str(lst),
                         "--root", str(evrun["corpus"]), "--out", str(tmp_path / "x" / "emb.npy")]) == 0
    got = np.load(tmp_path / "x" / "emb.npy")
    names = (tmp_path / "x" / "emb_index.txt").read_text().splitlines()
    assert got.dtype == np.float32 and got.shape == (3, 16) and names[0] == rows[0]
    np.testing.assert_allclose(got[0], emb[0], atol=1e-5)
    np.testing.assert_allclose(got[1], emb[1], atol=1e-5)
    cos = float(got[2] @ got[0] / np.linalg.norm(got[2]) / np.linalg.norm(got[0]))
    assert np.all(np.isfinite(got[2])) and cos > 0.8, cos
    # errors: missing list, missing audio
    assert extract.main(["--checkpoint", str(evrun["ckpt"]), "--list", str(tmp_path / "nope.txt"),
                         "--out", str(tmp_path / "e.npy")]) == 2
    (tmp_path / "bad.txt").write_text("missing.wav\n")
    assert extract.main(["--config", str(evrun["cfg_file"]), "--checkpoint", str(evrun["ckpt"]),
                         "--list", str(tmp_path / "bad.txt"), "--out", str(tmp_path / "e.npy")]) == 2


def test_asnorm_in_eer_matches_manual_normalisation(evrun, tmp_path):
    out = tmp_path / "asn"
    assert _eer_main(evrun, "--out", str(out), "--score_norm", "asnorm", "--asnorm_top_n", "3",
                     "--save_embeddings") == 0
    m = json.loads((out / "metrics.json").read_text())
    assert (m["backend"], m["score_norm"], m["asnorm_top_n"]) == ("cosine+asnorm", "asnorm", 3)
    with np.load(out / "cohort.npz") as z:
        cohort = z["cohort"]
        meta = json.loads(str(z["meta"]))
    assert cohort.shape == (8, 16) and len(meta["speakers"]) == 8       # one mean per training speaker
    emb = np.load(out / "embeddings.npy")
    rows = (out / "embeddings_index.txt").read_text().splitlines()
    idx = {r: i for i, r in enumerate(rows)}
    scores = _read_scores(out / "scores.txt")
    pairs = list(scores)[:25]
    a = [idx[p[0]] for p in pairs]
    b = [idx[p[1]] for p in pairs]
    np.testing.assert_allclose([scores[p] for p in pairs], naive_asnorm(emb, cohort, a, b, 3), rtol=1e-3, atol=1e-3)
    # the cohort really is the training speakers' mean (length-normalised) embeddings
    state = torch.load(evrun["ckpt"], weights_only=True)
    assert meta["speakers"] == state["speakers"]


def test_plda_calibration_backend_reuse_and_retrain(evrun, tmp_path):
    out = tmp_path / "plda"
    logs: list[str] = []
    res = EER.evaluate(evrun["cfg"], evrun["ckpt"], out, log=logs.append, backend="plda", calibrate=True)
    assert (out / "backend.npz").is_file() and not any("reusing" in ln for ln in logs)
    m = json.loads((out / "metrics.json").read_text())
    assert m["backend"] == "plda+calibrated" and m["calibrated"] is True
    info = m["backend_info"]
    assert info["fit_speakers"] + info["held_out_speakers"] == 8 and info["held_out_speakers"] >= 2
    assert m["bayes_llr_threshold_0.01"] == pytest.approx(np.log(99))
    # actual DCF and Cllr recomputed from the written LLRs
    llr = _read_scores(out / "scores_llr.txt")
    trials = _read_trials(evrun["files"] / "trials.txt")
    x = np.array([llr[(a, b)] for a, b, _ in trials])
    lab = np.array([t[2] for t in trials])
    far = np.mean(x[lab == 0] >= np.log(99))
    frr = np.mean(x[lab == 1] < np.log(99))
    assert m["actual_dcf_0.01"] == pytest.approx((0.01 * frr + 0.99 * far) / 0.01, abs=1e-3)
    assert m["cllr"] == pytest.approx(metrics.cllr(x, lab), abs=1e-3)
    assert m["min_dcf_0.01"] <= m["actual_dcf_0.01"] + 1e-9
    # scores.txt are PLDA LLRs of the fit-speaker PLDA saved in backend.npz
    from svlab import backend
    plda, cal, _ = backend.load_backend(out / "backend.npz", None)
    assert plda is not None and cal is not None
    # second run reuses, --retrain_backend refits; results identical (deterministic)
    logs.clear()
    res2 = EER.evaluate(evrun["cfg"], evrun["ckpt"], out, log=logs.append, backend="plda", calibrate=True)
    assert any("reusing" in ln for ln in logs) and res2["eer"] == pytest.approx(res["eer"])
    logs.clear()
    res3 = EER.evaluate(evrun["cfg"], evrun["ckpt"], out, log=logs.append, backend="plda", calibrate=True,
                        retrain_backend=True)
    assert not any("reusing" in ln for ln in logs) and res3["eer"] == pytest.approx(res["eer"])
    # a back-end saved with other settings is not reused
    logs.clear()
    cfg_lda = config.load_config(evrun["cfg_file"], {"test.plda_lda_dim": 4})
    EER.evaluate(cfg_lda, evrun["ckpt"], out, log=logs.append, backend="plda", calibrate=True)
    assert any("other settings" in ln for ln in logs)
    # default folder name of the system
    r = EER.evaluate(evrun["cfg"], evrun["ckpt"], log=_silent, backend="plda", center=True, score_norm="asnorm")
    assert Path(r["out_dir"]).name == "eval_001_plda_center_asnorm"
    assert json.loads((Path(r["out_dir"]) / "metrics.json").read_text())["center"] is True
    # PLDA after LDA scores differently: its own folder, recorded, so the plain PLDA evaluation is kept
    r_lda = EER.evaluate(cfg_lda, evrun["ckpt"], log=_silent, backend="plda")
    r_plain = EER.evaluate(evrun["cfg"], evrun["ckpt"], log=_silent, backend="plda")
    assert (Path(r_lda["out_dir"]).name, Path(r_plain["out_dir"]).name) == ("eval_001_plda_lda4", "eval_001_plda")
    m_lda = json.loads((Path(r_lda["out_dir"]) / "metrics.json").read_text())
    assert (m_lda["plda_lda_dim"], m_lda["backend"]) == (4, "plda(lda 4)")
    from svlab.evaluation import load_system
    assert load_system(Path(r_lda["out_dir"]) / "metrics.json", evrun["ckpt"])[0].lda_dim == 4


def test_eer_main_user_errors(evrun, capsys):
    assert _eer_main(evrun, "--set", "test.backend=lda") == 2
    assert "error:" in capsys.readouterr().err
    assert EER.main(["--config", str(evrun["cfg_file"]), "--checkpoint", str(evrun["base"] / "no.pth")]) == 2
    assert "error: checkpoint not found" in capsys.readouterr().err
    assert _eer_main(evrun, "--set", "test.asnorm_top_n=0", "--score_norm", "asnorm") == 2
    assert "asnorm_top_n" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        _eer_main(evrun, "--backend", "svm")
    assert e.value.code == 2


# ==================================================================================================
# tools/verify.py
# ==================================================================================================
def _verify(evrun, *args) -> int:
    return verify.main(["--config", str(evrun["cfg_file"]), *args])


def test_verify_needs_an_evaluation_or_threshold(evrun, tmp_path, capsys):
    lonely = tmp_path / "lonely" / "checkpoint_001.pth"
    lonely.parent.mkdir()
    shutil.copyfile(evrun["ckpt"], lonely)
    wav = evrun["corpus"] / "S0009" / "S0009W0001.wav"
    assert _verify(evrun, str(wav), str(wav), "--checkpoint", str(lonely)) == 2
    err = capsys.readouterr().err
    assert "error: no evaluation of" in err and "--threshold" in err and "EER.py" in err
    assert _verify(evrun, str(wav), str(wav), "--checkpoint", str(lonely), "--threshold", "0.5") == 0
    out = capsys.readouterr().out
    assert "cosine score: 1.00000" in out and "ACCEPT" in out
    assert _verify(evrun, str(wav), str(wav), "--checkpoint", str(lonely), "--threshold", "1.5") == 0
    assert "REJECT" in capsys.readouterr().out
    assert _verify(evrun, str(wav), "--checkpoint", str(lonely)) == 2             # one file only
    assert _verify(evrun, str(wav), str(evrun["base"] / "missing.wav"), "--checkpoint", str(lonely),
                   "--threshold", "0") == 2
    assert "not found" in capsys.readouterr().err


def test_verify_uses_last_evaluation_even_with_out(evrun, tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere"
    assert _eer_main(evrun, "--out", str(elsewhere)) == 0
    m = json.loads((elsewhere / "metrics.json").read_text())
    capsys.readouterr()
    a = evrun["corpus"] / "S0009" / "S0009W0001.wav"
    b = evrun["corpus"] / "S0010" / "S0010W0002.wav"
    res = verify.verify(evrun["cfg"], evrun["ckpt"], [a], [b], out=_silent)
    assert res["threshold"] == pytest.approx(m["threshold"]) and res["metrics"] == str(elsewhere / "metrics.json")
    assert res["accept"] == (res["score"] >= m["threshold"]) and res["system"] == "cosine"
    # the final-name copy of the checkpoint finds the same evaluation (same file fingerprint)
    final = evrun["run_dir"] / "xvector_gap_softmax_checkpoint.pth"
    assert verify.verify(evrun["cfg"], final, [a], [b], out=_silent)["metrics"] == str(elsewhere / "metrics.json")
    # enrolment with several recordings: mean of the length-normalised embeddings
    c = evrun["corpus"] / "S0009" / "S0009W0002.wav"
    res2 = verify.verify(evrun["cfg"], evrun["ckpt"], [a, c], [b], out=_silent)
    state = torch.load(evrun["ckpt"], weights_only=True)
    from svlab.embedding import checkpoint_features, embed_files
    from svlab.models import model_from_checkpoint
    feat = checkpoint_features(evrun["cfg"], state, _silent, cache=False)
    e, _, _ = embed_files(model_from_checkpoint(state), [a, c, b], feat, log=_silent)
    e = e / np.linalg.norm(e, axis=1, keepdims=True)
    en = e[:2].mean(axis=0)
    assert res2["score"] == pytest.approx(float(en @ e[2] / np.linalg.norm(en)), abs=1e-5)
    # any sample rate, stereo: an 8 kHz stereo copy of a is accepted as itself
    wav, sr = sf.read(a, dtype="float32")
    import librosa
    low = librosa.resample(wav, orig_sr=sr, target_sr=8000)
    sf.write(tmp_path / "a8k.wav", np.stack([low, low], axis=1), 8000)
    assert _verify(evrun, str(a), str(tmp_path / "a8k.wav"), "--checkpoint", str(evrun["ckpt"])) == 0
    assert re.search(r"cosine score: 0\.\d+", capsys.readouterr().out)
    # CLI enrol/test form
    assert _verify(evrun, "--enroll", str(a), str(c), "--test", str(b), "--checkpoint", str(evrun["ckpt"])) == 0
    out = capsys.readouterr().out
    assert "threshold:" in out and ("ACCEPT" in out or "REJECT" in out)


def test_verify_prints_calibrated_llr(evrun, tmp_path, capsys):
    cal_dir = tmp_path / "cal"
    assert _eer_main(evrun, "--out", str(cal_dir), "--calibrate") == 0
    m = json.loads((cal_dir / "metrics.json").read_text())
    capsys.readouterr()
    a = evrun["corpus"] / "S0009" / "S0009W0001.wav"
    b = evrun["corpus"] / "S0009" / "S0009W0003.wav"
    lines: list[str] = []
    res = verify.verify(evrun["cfg"], evrun["ckpt"], [a], [b], out=lines.append)
    assert res["llr"] == pytest.approx(m["calibration"]["a"] * res["cosine"] + m["calibration"]["b"], abs=1e-4)
    text = "\n".join(lines)
    assert "calibrated LLR" in text and "Bayes decision" in text and "4.60" in text
    assert res["bayes_decisions"][0.01] == (res["llr"] >= np.log(99))
    # the decision follows the last evaluation (cosine+calibrated): cosine score vs its EER threshold
    assert res["threshold"] == pytest.approx(m["threshold"])
    # a PLDA evaluation chosen with --eval: the decision uses the PLDA score and that threshold
    plda_dir = tmp_path / "plda"
    assert _eer_main(evrun, "--out", str(plda_dir), "--backend", "plda") == 0
    mp = json.loads((plda_dir / "metrics.json").read_text())
    res_p = verify.verify(evrun["cfg"], evrun["ckpt"], [a], [b], eval_dir=plda_dir, out=_silent)
    assert res_p["system"] == "plda" and res_p["threshold"] == pytest.approx(mp["threshold"])
    scores = _read_scores(plda_dir / "scores.txt")
    ra, rb = "S0009/S0009W0001.wav", "S0009/S0009W0003.wav"
    if (ra, rb) in scores:
        assert res_p["score"] == pytest.approx(scores[(ra, rb)], abs=1e-3)


# ==================================================================================================
# the report: svlab/report.py, tools/report.py
# ==================================================================================================
def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def test_report_markdown_html_and_images(evrun, tmp_path):
    EER.evaluate(evrun["cfg"], evrun["ckpt"], log=_silent)                  # eval_001
    res = EER.evaluate(evrun["cfg"], evrun["ckpt"], log=_silent, score_norm="asnorm", report=True)
    run = evrun["run_dir"]
    assert Path(res["report"]) == run / "report.html"
    assert report.main(["--run_dir", str(run)]) == 0
    md = (run / "report.md").read_text(encoding="utf-8")
    page = (run / "report.html").read_text(encoding="utf-8")
    assert "curves.png" in md and "| eval_001 |" in md and "eval_001_asnorm" in md
    assert "```yaml" in md and "embedding_size: 16" in md
    assert '<meta charset="utf-8">' in page and 'id="img-check"' in page
    srcs = re.findall(r'<img[^>]+data-file="([^"]+)"', page)  # the file each embedded picture shows
    assert "curves.png" in srcs and "eval_001/det.png" in srcs and "eval_001_asnorm/hist.png" in srcs
    for src in srcs:
        assert not src.startswith("/") and (run / src).is_file(), src
    # the per-epoch log table and the evaluation row with the EER from metrics.json
    m = json.loads((run / "eval_001" / "metrics.json").read_text())
    assert f"{m['eer'] * 100:.2f}%" in page and "<th>loss</th>" in page
    # --n_folder form
    assert report.main(["--config", str(evrun["cfg_file"]), "--n_folder", "001"]) == 0
    assert report.main(["--config", str(evrun["cfg_file"]), "--n_folder", "999"]) == 2


def test_report_images_load_in_headless_chromium(evrun, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium); report.html not opened in a browser")
    EER.evaluate(evrun["cfg"], evrun["ckpt"], log=_silent)
    _, page = write_report(evrun["run_dir"], log=_silent)
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'prof'}",
           "--virtual-time-budget=5000", "--dump-dom", page.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    m = re.search(r'<div id="img-check"[^>]*data-loaded="(\d+)"[^>]*data-total="(\d+)"', proc.stdout)
    assert m, f"no image check in the DOM (rc {proc.returncode}): {proc.stderr[-500:]}"
    loaded, total = int(m.group(1)), int(m.group(2))
    assert total >= 4 and loaded == total, f"{loaded}/{total} images loaded"
