"""Step 2.1 / 第 2.1 步: ``GlobalAveragePooling.forward`` in ``pooling.py``, the mean over the frames.

Input ``(batch, channels, frames)``, e.g. ``(64, 1500, 86)``; output ``(batch, channels)``, ``(64, 1500)``.
"""
import torch

from grading import call, expect_tensor, fail, largest_difference, shape
from pooling import GlobalAveragePooling

STEP = "2.1"
WHAT = "GlobalAveragePooling(1500)(x)"


def shape_hint(x: torch.Tensor, got: tuple) -> tuple[str, str]:
    """The likely slip behind the wrong output shape ``got`` for input ``x`` ``(batch, channels, frames)``."""
    batch, channels, frames = x.shape
    slips = {
        (batch, frames): ("did you average over dimension 1 (the channels) instead of 2 (the frames)?",
                          "是否对第 1 维（通道）而不是第 2 维（帧）求了平均？"),
        (channels, frames): ("did you average over dimension 0 (the batch) instead of 2 (the frames)?",
                             "是否对第 0 维（批）而不是第 2 维（帧）求了平均？"),
        (batch, channels, 1): ("keepdim=True leaves a dimension of size 1: drop it", "keepdim=True 留下了大小为 1 的维度，请去掉"),
        (batch, channels, frames): ("the input came back unchanged: take the mean over dimension 2",
                                    "输入原样返回了：请对第 2 维求平均"),
    }
    return slips.get(got, ("average over the frames, dimension 2", "请对帧（第 2 维）求平均"))


def check_shape(x: torch.Tensor, out: torch.Tensor) -> None:
    __tracebackhide__ = True
    expected = (x.shape[0], x.shape[1])
    if shape(out) != expected:
        en, zh = shape_hint(x, shape(out))
        fail(STEP, f"for input of shape {shape(x)} expected shape {expected}, got {shape(out)}: {en}",
             f"输入形状 {shape(x)} 时应输出 {expected}，实际得到 {shape(out)}：{zh}")


def pooled(x: torch.Tensor) -> torch.Tensor:
    return expect_tensor(STEP, WHAT, call(STEP, WHAT, GlobalAveragePooling(x.shape[1]), x))


def test_output_shape():
    x = torch.randn(64, 1500, 86)
    check_shape(x, pooled(x))


def test_mean_over_frames():
    torch.manual_seed(0)
    x = torch.randn(4, 6, 10) * 3 + 1
    out = pooled(x)
    expected = x.mean(dim=2)
    check_shape(x, out)
    if torch.allclose(out, expected, atol=1e-5):
        return
    if torch.allclose(out, x.sum(dim=2), atol=1e-4):
        en, zh = "you summed over the frames: divide by their number (or use mean)", "你对帧求了和：请除以帧数（或用 mean）"
    elif torch.allclose(out, x.amax(dim=2), atol=1e-5):
        en, zh = "you took the maximum: the lab's pooling is the mean", "你取了最大值：本实验的池化是平均"
    else:
        en, zh = "compute x.mean(dim=2)", "请计算 x.mean(dim=2)"
    diff = largest_difference(out, expected)
    fail(STEP, f"expected the mean over the frames, x.mean(dim=2); largest difference {diff:.3g}: {en}",
         f"应为对帧的平均 x.mean(dim=2)；最大差值 {diff:.3g}：{zh}")
