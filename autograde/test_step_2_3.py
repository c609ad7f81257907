"""Step 2.3 / 第 2.3 步: ``Softmax.forward`` in ``loss.py``: the logits of the linear layer ``self.fc``,
their cross-entropy with the labels, and the top-1 accuracy in percent; returns ``(loss, acc)``."""
import torch
import torch.nn.functional as F

from grading import call, expect_tensor, fail, shape
from loss import Softmax

STEP = "2.3"


def loss_and_accuracy(head: Softmax, x: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    what = f"Softmax{tuple(head.fc.weight.shape[::-1])}(x, label)"
    result = call(STEP, what, head, x, label)
    if not (isinstance(result, tuple) and len(result) == 2):
        fail(STEP, f"{what} should return two values, (loss, acc); got {type(result).__name__}",
             f"{what} 应返回两个值 (loss, acc)；实际得到 {type(result).__name__}")
    return expect_tensor(STEP, "loss", result[0]), result[1]


def test_loss_is_the_cross_entropy_of_the_linear_layer():
    torch.manual_seed(0)
    head = Softmax(16, 10)
    x, label = torch.randn(32, 16), torch.randint(0, 10, (32,))
    loss, _ = loss_and_accuracy(head, x, label)
    logits = head.fc(x)
    expected = F.cross_entropy(logits, label)
    if shape(loss) != ():
        fail(STEP, f"the loss should be one number, the mean over the batch; got shape {shape(loss)}",
             f"损失应为一个数（对批取平均）；实际形状 {shape(loss)}")
    if not torch.allclose(loss, expected, atol=1e-5):
        if torch.allclose(loss, F.cross_entropy(logits.softmax(dim=1), label), atol=1e-5):
            en, zh = ("F.cross_entropy applies the softmax itself: give it the logits, not softmax(logits)",
                      "F.cross_entropy 内部已做 softmax：请传入 logits，而不是 softmax(logits)")
        elif torch.allclose(loss, F.cross_entropy(logits, label, reduction="sum"), atol=1e-4):
            en, zh = "take the mean over the batch (the default), not the sum", "请对批取平均（默认），不要求和"
        elif torch.allclose(loss, F.nll_loss(logits, label), atol=1e-5):
            en, zh = ("nll_loss expects log-probabilities: use F.cross_entropy on the logits",
                      "nll_loss 需要对数概率：请对 logits 用 F.cross_entropy")
        else:
            en, zh = "use the logits of self.fc and F.cross_entropy", "请用 self.fc 的输出 logits 和 F.cross_entropy"
        fail(STEP, f"expected F.cross_entropy(self.fc(x), label) = {expected.item():.4f}, got {loss.item():.4f}: {en}",
             f"应为 F.cross_entropy(self.fc(x), label) = {expected.item():.4f}，实际为 {loss.item():.4f}：{zh}")
    if not loss.requires_grad:
        fail(STEP, "the loss has no gradient: compute it without .item(), .detach() or torch.no_grad()",
             "损失没有梯度：计算时不要用 .item()、.detach() 或 torch.no_grad()")


def test_accuracy_in_percent():
    head = Softmax(3, 3)
    with torch.no_grad():  # logits = x: the predicted class is the largest coordinate
        head.fc.weight.copy_(torch.eye(3))
        head.fc.bias.zero_()
    x = torch.eye(3)[[0, 1, 2, 0, 1, 2, 0, 1]] * 5
    label = torch.tensor([0, 1, 2, 0, 1, 2, 1, 0])  # 6 of 8 right: 75 %
    _, acc = loss_and_accuracy(head, x, label)
    value = float(acc)
    if abs(value - 75.0) < 1e-3:
        return
    if abs(value - 0.75) < 1e-4:
        en, zh = "the accuracy is in percent: multiply by 100", "准确率以百分数表示：请乘以 100"
    elif abs(value - 6) < 1e-4:
        en, zh = "that is the number of right answers: divide by the batch size, times 100", "这是答对的个数：请除以批大小再乘以 100"
    else:
        en, zh = "compare logits.argmax(dim=1) with the labels", "请比较 logits.argmax(dim=1) 与标签"
    fail(STEP, f"expected the accuracy 75.0 (6 of 8 right, in percent), got {value:g}: {en}",
         f"应得到准确率 75.0（8 个中对 6 个，百分数），实际为 {value:g}：{zh}")
