"""Step 2.4 / 第 2.4 步: ``train()`` in ``train.py``: define the model, the loss and the optimiser; in the
loop, the embeddings, the loss and accuracy, and the backward pass with the optimiser's step.

Graded by training 3 epochs on a tiny synthetic corpus (8 speakers, made here in a temporary folder)
with ECAPA-TDNN, statistics pooling and AM-softmax, which are complete in the student version: this
step is graded on its own, whatever the state of steps 2.1-2.3.
"""
import contextlib
import io

import pytest
import torch

from grading import attempt, fail
from svlab import config, demo_corpus
from svlab.checkpoint import epoch_checkpoint_path, load_checkpoint
from svlab.models import build_model

STEP = "2.4"
EPOCHS = 3
CORPUS = dict(n_train_speakers=8, n_test_speakers=2, utts_per_speaker=4, test_utts_per_speaker=2,
              min_seconds=1.0, max_seconds=1.5)


def quiet(*args, **kwargs) -> None:
    pass


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("step_2_4")
    with contextlib.redirect_stderr(io.StringIO()):
        demo_corpus.generate(base / "corpus", params=CORPUS, files_dir=base / "files", workers=1, log=quiet)
    cfg = config.load_config(None, {
        "data.root": str(base / "corpus"), "data.train_manifest": str(base / "files" / "split_train_set.txt"),
        "features.cache_dir": "", "features.n_mfcc": 20, "features.n_mels": 40,
        "model.name": "ecapa", "model.pooling": "stats", "model.channels": 32, "model.embedding_size": 16,
        "loss.type": "amsoftmax", "train.save_dir": str(base / "runs"), "train.n_folder": "000",
        "train.epochs": EPOCHS, "train.batchsize": 8, "train.crop_frames": 50, "train.lr": 0.001,
        "train.scheduler": "none", "train.keep_freed_memory": False,
    })
    import train
    with contextlib.redirect_stderr(io.StringIO()):  # progress bars: the feedback is what matters here
        return cfg, attempt(STEP, "train.train(cfg)", train.train, cfg, log=quiet)


def test_training_runs_every_epoch(run):
    _, outcome = run
    result = outcome.get()
    history = result.get("history") if isinstance(result, dict) else None
    if not history or len(history) != EPOCHS:
        fail(STEP, f"expected {EPOCHS} epochs of training, got {len(history or [])}",
             f"应训练 {EPOCHS} 个 epoch，实际 {len(history or [])} 个")


def test_loss_decreases(run):
    _, outcome = run
    losses = [round(h["loss"], 3) for h in outcome.get()["history"]]
    if not all(torch.isfinite(torch.tensor(losses))) or losses[-1] >= losses[0]:
        fail(STEP, f"expected the training loss to fall over {EPOCHS} epochs on a tiny corpus; got {losses}: "
             "compute the loss of the batch, then optimizer.zero_grad(), loss.backward(), optimizer.step()",
             f"在小语料上训练 {EPOCHS} 个 epoch 损失应下降；实际为 {losses}："
             "请计算该批的损失，然后 optimizer.zero_grad()、loss.backward()、optimizer.step()")


def test_the_optimiser_updates_the_network_and_the_loss_head(run):
    cfg, outcome = run
    folder = outcome.get()["run_folder"]
    first, last = (load_checkpoint(epoch_checkpoint_path(folder, e)) for e in (1, EPOCHS))
    weights = {name for name, _ in build_model(cfg["model"], cfg["features"]["n_mfcc"]).named_parameters()}
    if all(torch.equal(first["model_state"][k], last["model_state"][k]) for k in weights):
        fail(STEP, f"the network's weights did not change from epoch 1 to {EPOCHS}: call loss.backward() and "
             "optimizer.step() in the loop, with the network's parameters in the optimiser",
             f"从第 1 到第 {EPOCHS} 个 epoch 网络权重没有变化：请在循环中调用 loss.backward() 和 optimizer.step()，"
             "并把网络参数交给优化器")
    if all(torch.equal(first["loss_state"][k], last["loss_state"][k]) for k in first["loss_state"]):
        fail(STEP, "the loss head's weights did not change: give the optimiser the loss head's parameters too "
             "(criterion.parameters())", "损失层的权重没有变化：请把损失层的参数（criterion.parameters()）也交给优化器")
