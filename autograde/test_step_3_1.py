"""Step 3.1 / 第 3.1 步: in ``EER.py``, ``load_model`` (the checkpoint's network, in eval mode), ``embed``
(one embedding per test utterance, in the dataset's order) and ``cosine_score`` (the cosine similarity
of each trial's two embeddings).

Graded with a tiny ECAPA-TDNN, complete in the student version, so this step is graded on its own.
"""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn

import EER
from dataset import SpkTestDataset
from grading import call, fail, largest_difference, shape
from svlab import config
from svlab.checkpoint import save_checkpoint
from svlab.models import build_model

STEP = "3.1"
CPU = torch.device("cpu")
TINY = {"model.name": "ecapa", "model.pooling": "stats", "model.channels": 32, "model.embedding_size": 16,
        "features.n_mfcc": 20, "features.n_mels": 40}


def tiny_model(seed: int) -> tuple[nn.Module, dict]:
    cfg = config.load_config(None, TINY)
    torch.manual_seed(seed)
    model = build_model(cfg["model"], cfg["features"]["n_mfcc"])
    model.train()
    with torch.no_grad():  # BatchNorm running statistics of their own: eval and train mode then differ
        model(torch.randn(8, 20, 60) * 2 + 1)
    return model.eval(), cfg


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model, cfg = tiny_model(seed=1)
    path = tmp_path_factory.mktemp("step_3_1") / "checkpoint_003.pth"
    save_checkpoint({"epoch": 3, "model_state": model.state_dict(), "config": cfg, "speakers": ["S0001", "S0002"],
                     "tag": "ecapa_stats_amsoftmax"}, path)
    return path, model


def test_load_model_returns_the_checkpoints_network_in_eval_mode(checkpoint):
    path, saved = checkpoint
    result = call(STEP, "load_model(checkpoint, device)", EER.load_model, path, CPU)
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], nn.Module)):
        fail(STEP, "load_model should return (model, state): the network and the checkpoint's contents",
             "load_model 应返回 (model, state)：网络和检查点的内容")
    model, state = result
    if not isinstance(state, dict) or state.get("epoch") != 3:
        fail(STEP, "the second value should be the checkpoint's contents (a dict with 'epoch', 'config', "
             "'model_state', ...), as load_checkpoint returns it",
             "第二个返回值应为检查点的内容（含 'epoch'、'config'、'model_state' 等的字典），即 load_checkpoint 的返回值")
    if model.training:
        fail(STEP, "the model is in training mode: call model.eval() (BatchNorm must use its running statistics)",
             "模型处于训练模式：请调用 model.eval()（BatchNorm 应使用其滑动统计量）")
    loaded = model.state_dict()
    differ = [k for k, v in saved.state_dict().items() if k not in loaded or not torch.equal(loaded[k], v)]
    if differ:
        fail(STEP, f"the model's weights are not the checkpoint's (first: {differ[0]}): load state['model_state']",
             f"模型权重与检查点不同（首个：{differ[0]}）：请加载 state['model_state']")


def test_embed_gives_one_embedding_per_utterance_in_order():
    model, _ = tiny_model(seed=2)
    rng = np.random.default_rng(0)
    lengths = [50, 60, 50, 70, 60, 50]
    dataset = SpkTestDataset.__new__(SpkTestDataset)  # the real class, with features made here instead of read
    dataset.features = [rng.standard_normal((20, n)).astype(np.float32) for n in lengths]
    dataset.utterances = [SimpleNamespace(speaker=f"S{i:04d}", relpath=f"S{i:04d}/u{i}.wav")
                          for i in range(len(lengths))]
    dataset.index = {u.relpath: i for i, u in enumerate(dataset.utterances)}
    emb = np.asarray(call(STEP, "embed(model, dataset, batch_size=2, device)", EER.embed, model, dataset, 2, CPU))
    if shape(emb) != (6, 16):
        fail(STEP, f"for 6 utterances and embedding_size 16 expected shape (6, 16), got {shape(emb)}",
             f"6 条语音、嵌入维度 16 时应得到 (6, 16)，实际得到 {shape(emb)}")
    with torch.no_grad():
        expected = np.stack([model(torch.from_numpy(f)[None])[0].numpy() for f in dataset.features])
    if np.allclose(emb, expected, atol=1e-4, rtol=1e-4):
        return
    matches = [[np.allclose(e, x, atol=1e-4, rtol=1e-4) for x in expected] for e in emb]
    if all(any(row) for row in matches):
        en, zh = ("the rows are out of order: row i must be utterance i of the dataset",
                  "行的顺序不对：第 i 行应是数据集中第 i 条语音的嵌入")
    else:
        en, zh = ("embed each utterance whole (no padding), with the model as given",
                  "请对每条语音整段提取嵌入（不补零），直接使用给定的模型")
    diff = largest_difference(emb, expected)
    fail(STEP, f"row i should equal model(x_i) of utterance i alone; largest difference {diff:.3g}: {en}",
         f"第 i 行应等于单独对第 i 条语音计算的 model(x_i)；最大差值 {diff:.3g}：{zh}")


def test_cosine_score_is_the_cosine_of_each_trials_embeddings():
    rng = np.random.default_rng(0)
    norms = np.array([0.5, 1, 2, 3, 4, 5, 10], dtype=np.float32)[:, None]
    enroll = (rng.standard_normal((7, 16)) * norms).astype(np.float32)
    test = (rng.standard_normal((7, 16)) * norms[::-1]).astype(np.float32)
    test[0] = 3 * enroll[0]  # one pair pointing the same way: cosine 1
    scores = call(STEP, "cosine_score(enroll, test)", EER.cosine_score, enroll.copy(), test.copy())
    scores = np.asarray(scores, dtype=np.float64)
    expected = (enroll * test).sum(1) / (np.linalg.norm(enroll, axis=1) * np.linalg.norm(test, axis=1))
    if shape(scores) != (7,):
        en, zh = "", ""
        if shape(scores) == (7, 7):
            en, zh = (": score each trial's own pair (row i with row i), not every pair",
                      "：只对每个试验自己的一对（第 i 行与第 i 行）打分，不要计算所有组合")
        fail(STEP, f"for 7 trials expected 7 scores, shape (7,), got {shape(scores)}{en}",
             f"7 个试验应得到 7 个分数，形状 (7,)，实际得到 {shape(scores)}{zh}")
    if np.allclose(scores, expected, atol=1e-5):
        return
    if np.allclose(scores, (enroll * test).sum(1), rtol=1e-4):
        en, zh = ("that is the dot product: divide by both embeddings' lengths (or F.normalize them first)",
                  "这是点积：请除以两个嵌入的长度（或先用 F.normalize 归一化）")
    else:
        en, zh = "cosine = (e . t) / (|e| |t|)", "余弦 = (e · t) / (|e| |t|)"
    want, got = [round(float(v), 4) for v in expected], [round(float(v), 4) for v in scores]
    fail(STEP, f"expected the cosines {want}, got {got}: {en}", f"应为余弦 {want}，实际为 {got}：{zh}")
