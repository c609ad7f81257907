"""The report's words in English and Chinese (``tools/report.py --lang zh``): headings, table columns,
notes and the figures' labels. ``words(lang)`` gives one language's table; a key missing in a language
falls back to English, so the English table is the complete list of keys.

What the commands printed (the ``Train Stage: ...`` and ``Epoch=... EER= ...`` lines, the configuration)
is shown as printed, in English, in both languages.
"""
from __future__ import annotations

EN = {
    "title": "Speaker verification report: run {run}",
    "folder_line": "Run folder {folder}, generated {when}.",
    "training": "Training",
    "log_lines": "Training log as train.py printed it (rebuilt from train_log.csv)",
    "curves": "Training curves",
    "curves_alt": "training loss and accuracy per epoch",
    "epoch_table": "Per epoch (train_log.csv)",
    "no_log": "No train_log.csv in the run folder.",
    "result": "Verification result",
    "lab_line": "The lab's result line, as EER.py printed it, of evaluation {folder} ({system}):",
    "verify": "Verification example",
    "verify_intro": ("Two trials of the run's trial list, scored with the checkpoint and decided at the EER "
                     "threshold of evaluation {folder}, as tools/verify.py does for two recordings:"),
    "verify_columns": ("trial", "enrolment", "test", "score", "EER.py's score (scores.txt)", "threshold",
                       "decision"),
    "target_trial": "target (same speaker)",
    "nontarget_trial": "non-target (different speakers)",
    "accept": "ACCEPT (same speaker)",
    "reject": "REJECT (different speakers)",
    "no_verify": "No verification example: {why}.",
    "evaluations": "Evaluations",
    "trial_list": "Trial list {name}",
    "own": " (the run's own)",
    "no_eval_on_list": "No evaluation on it yet.",
    "compare_note": ("Each table holds the evaluations and the MFCC baseline of one trial list: error rates are "
                     "comparable only on the same trials."),
    "metrics_note": ("EER and its threshold: where false accepts equal false rejects (accept when score >= "
                     "threshold). minDCF: normalised minimum detection cost at target prior 0.01 / 0.001. actDCF "
                     "and Cllr: only for calibrated back-ends (cost at the Bayes threshold; 0 = perfect LLRs)."),
    "ci_note": "95% CI: the 95% confidence interval of the value, from metrics.json.",
    "no_eval": "No evaluation yet: run {command}.",
    "eval_heading": "{folder}: {system}",
    "eval_summary": "EER {eer} on {trials}, minDCF(0.01) {dcf}, checkpoint {checkpoint}",
    "configuration": "Configuration (config.yaml)",
    "no_config": "(no config.yaml)",
    "roc": "ROC", "det": "DET", "hist": "Score histogram",
    "redrawn_from": "{file}, drawn again from its data at its printed size",
    "not_redrawn": "(the evaluation's own picture: {why})",
    "no_cjk_font": ("The figures are labelled in English: no font with Chinese characters was found for them "
                    "(install fonts-noto-cjk)."),
    "eval_columns": ("evaluation", "epoch", "system", "EER", "EER threshold", "minDCF(0.01)", "minDCF(0.001)",
                     "actDCF(0.01)", "Cllr", "target / non-target trials", "trial list"),
    "eer_ci": "EER 95% CI", "dcf_ci": "minDCF(0.01) 95% CI",
    "log_columns": {},
    "panel_loss": "Loss", "axis_loss": "training loss",
    "panel_acc": "Accuracy", "axis_acc": "training accuracy (%)",
    "panel_val_eer_pct": "Validation EER", "axis_val_eer_pct": "validation EER (%)",
    "panel_val_min_dcf": "Validation minDCF", "axis_val_min_dcf": "validation minDCF(0.01)",
    "score_names": {},
    "plot": {},
}

ZH = {
    "title": "声纹识别实验报告：运行 {run}",
    "folder_line": "运行文件夹 {folder}，生成于 {when}。",
    "training": "训练",
    "log_lines": "训练日志（train.py 的输出，由 train_log.csv 重建）",
    "curves": "训练曲线",
    "curves_alt": "每轮的训练损失和准确率",
    "epoch_table": "每轮记录（train_log.csv）",
    "no_log": "运行文件夹中没有 train_log.csv。",
    "result": "验证结果",
    "lab_line": "实验结果行（EER.py 的输出），评估 {folder}（{system}）：",
    "verify": "验证示例",
    "verify_intro": ("从本次运行的试验列表中取两个试验，用检查点打分，并以评估 {folder} 的 EER 阈值判决"
                     "（与 tools/verify.py 对两段录音所做的相同）："),
    "verify_columns": ("试验", "注册语音", "测试语音", "得分", "EER.py 的得分（scores.txt）", "阈值", "判决"),
    "target_trial": "目标试验（同一说话人）",
    "nontarget_trial": "非目标试验（不同说话人）",
    "accept": "接受（同一说话人）",
    "reject": "拒绝（不同说话人）",
    "no_verify": "无验证示例：{why}。",
    "evaluations": "全部评估",
    "trial_list": "试验列表 {name}",
    "own": "（本次运行自己的）",
    "no_eval_on_list": "尚未在此列表上评估。",
    "compare_note": "每个表格列出同一试验列表上的评估及其 MFCC 基线：只有在相同试验上，错误率才可比较。",
    "metrics_note": ("EER 及其阈值：错误接受率等于错误拒绝率之处（得分 ≥ 阈值时接受）。minDCF：目标先验为 "
                     "0.01 / 0.001 时归一化的最小检测代价。actDCF 和 Cllr：仅适用于经过校准的后端"
                     "（贝叶斯阈值处的代价；0 表示完美的对数似然比）。"),
    "ci_note": "95% 置信区间：取自 metrics.json。",
    "no_eval": "尚无评估：请运行 {command}。",
    "eval_heading": "{folder}：{system}",
    "eval_summary": "EER {eer}（试验列表 {trials}），minDCF(0.01) {dcf}，检查点 {checkpoint}",
    "configuration": "配置（config.yaml）",
    "no_config": "（没有 config.yaml）",
    "roc": "ROC 曲线", "det": "DET 曲线", "hist": "得分直方图",
    "redrawn_from": "{file}（按打印尺寸由数据重绘）",
    "not_redrawn": "（评估自带的图片：{why}）",
    "no_cjk_font": "图中标注为英文：未找到含中文字符的字体（请安装 fonts-noto-cjk）。",
    "eval_columns": ("评估", "轮次", "系统", "EER", "EER 阈值", "minDCF(0.01)", "minDCF(0.001)", "actDCF(0.01)",
                     "Cllr", "目标 / 非目标试验数", "试验列表"),
    "eer_ci": "EER 95% 置信区间", "dcf_ci": "minDCF(0.01) 95% 置信区间",
    "log_columns": {"epoch": "轮次", "loss": "损失", "acc": "准确率 (%)", "lr": "学习率", "margin": "间隔",
                    "seconds": "用时 (秒)", "val_eer_pct": "验证 EER (%)", "val_min_dcf": "验证 minDCF",
                    "val_seconds": "验证用时 (秒)"},
    "panel_loss": "损失", "axis_loss": "训练损失",
    "panel_acc": "准确率", "axis_acc": "训练准确率 (%)",
    "panel_val_eer_pct": "验证集 EER", "axis_val_eer_pct": "验证集 EER (%)",
    "panel_val_min_dcf": "验证集 minDCF", "axis_val_min_dcf": "验证集 minDCF(0.01)",
    "score_names": {"cosine score": "余弦得分", "PLDA log-likelihood ratio": "PLDA 对数似然比"},
    # the figures' labels (svlab.plots.TEXT keys)
    "plot": {
        "far": "错误接受率 FAR (%)", "tar": "正确接受率 = 100 - 错误拒绝率 (%)", "frr": "错误拒绝率 FRR (%)",
        "far_eq_frr": "FAR = FRR", "eer_point": "EER = {eer:.2f}%（阈值 {thr:.4f}）", "eer_note": "EER {eer:.2f}%",
        "dcf_point": "minDCF(0.01) = {dcf:.4f}（{thr}）", "threshold": "阈值 {thr:.4f}", "reject_all": "全部拒绝",
        "non_target": "非目标试验（不同说话人），n={n}", "target": "目标试验（同一说话人），n={n}",
        "eer_threshold": "EER 阈值 {thr:.4f}", "score_axis": "{score_name}（得分 ≥ 阈值时接受）",
        "density": "试验密度", "epoch": "轮次",
    },
}

LANGUAGES = {"en": EN, "zh": ZH}
HTML_LANG = {"en": "en", "zh": "zh-CN"}


def words(lang: str) -> dict:
    """The string table of ``lang`` (``"en"`` or ``"zh"``), English where it has no entry."""
    return {**EN, **LANGUAGES[lang]}
