"""Step 2.2 / 第 2.2 步: the x-vector's pooling and final linear layer (``Xvector.__init__``) and its
``forward`` in ``xvector.py``: frame layers -> pooling over the frames -> linear layer to the embedding.

Graded with statistics pooling (``pooling.output_dim`` = 2 x 1500 = 3000), which is complete in the
student version, so this step is graded on its own whatever the state of step 2.1.
"""
import pytest
import torch
import torch.nn as nn

from grading import call, expect_tensor, fail, largest_difference, shape
from pooling import StatisticsPooling
from svlab.lab_steps import message
from xvector import Xvector

STEP = "2.2"
BUILD = "Xvector(StatisticsPooling(1500), in_channels=40, channels=512, stat_channels=1500, embedding_size=512)"


def build() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    pooling = StatisticsPooling(1500)
    model = call(STEP, BUILD, Xvector, pooling, in_channels=40, channels=512, stat_channels=1500, embedding_size=512)
    return model, pooling


def final_layer(model: nn.Module, pooling: nn.Module) -> nn.Linear:
    __tracebackhide__ = True
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    holds_pooling = any(m is pooling for m in model.modules())
    if not linears and not holds_pooling:
        pytest.fail(f"{message(STEP)} (Xvector.__init__ adds neither the pooling nor a linear layer / "
                    "Xvector.__init__ 既没有保存池化层也没有线性层)", pytrace=False)
    if not holds_pooling:
        fail(STEP, "Xvector.__init__ must keep the pooling module it is given (self.pooling = pooling)",
             "Xvector.__init__ 应保存传入的池化模块（self.pooling = pooling）")
    final = [m for m in linears if m.in_features == pooling.output_dim and m.out_features == 512]
    if not final:
        found = ", ".join(f"Linear({m.in_features}, {m.out_features})" for m in linears) or "none"
        en = zh = ""
        if any(m.in_features == 1500 for m in linears):
            en = ": use pooling.output_dim, not stat_channels (statistics pooling gives 2 x 1500 = 3000 values)"
            zh = "：请用 pooling.output_dim 而不是 stat_channels（统计池化输出 2 x 1500 = 3000 维）"
        fail(STEP, "expected a final nn.Linear(pooling.output_dim, embedding_size) = Linear(3000, 512); "
             f"found {found}{en}",
             f"应有最后一层 nn.Linear(pooling.output_dim, embedding_size) = Linear(3000, 512)；实际为 {found}{zh}")
    return final[0]


def test_init_keeps_the_pooling_and_a_final_linear_layer():
    model, pooling = build()
    final_layer(model, pooling)


def test_forward_gives_one_embedding_per_utterance():
    model, pooling = build()
    model.eval()
    x = torch.randn(4, 40, 100)
    seen = []
    pooling.register_forward_hook(lambda module, inputs, output: seen.append(shape(inputs[0])))
    with torch.no_grad():
        out = expect_tensor(STEP, "model(x)", call(STEP, "Xvector(...)(x) for x of shape (4, 40, 100)", model, x))
    if shape(out) != (4, 512):
        fail(STEP, f"for input of shape (4, 40, 100) expected an embedding of shape (4, 512), got {shape(out)}",
             f"输入形状 (4, 40, 100) 时应输出嵌入 (4, 512)，实际得到 {shape(out)}")
    if not seen:
        fail(STEP, "forward does not use the pooling module: frame layers -> self.pooling -> the final linear layer",
             "forward 没有调用池化模块：帧层 -> self.pooling -> 最后的线性层")
    if seen[0] != (4, 1500, 86):
        fail(STEP, f"the pooling got input of shape {seen[0]}; expected the frame layers' output (4, 1500, 86) "
             "(100 - 14 = 86 frames)", f"池化层的输入形状为 {seen[0]}；应为帧层的输出 (4, 1500, 86)（100 - 14 = 86 帧）")
    with torch.no_grad():
        expected = final_layer(model, pooling)(pooling(model.frame_layers(x)))
    if not torch.allclose(out, expected, atol=1e-4, rtol=1e-4):
        diff = largest_difference(out, expected)
        fail(STEP, f"expected final_linear(pooling(frame_layers(x))); largest difference {diff:.3g}",
             f"应为 final_linear(pooling(frame_layers(x)))；最大差值 {diff:.3g}")
