"""MnasNet (Tan et al., "MnasNet: Platform-Aware Neural Architecture Search for Mobile", CVPR 2019,
arXiv 1807.11626), the B1 variant of the authors' TPU release (no squeeze-and-excitation), as
torchvision defines it (its "version 2" stem, scaled with the depth multiplier).

Depth multipliers 0.5, 0.75, 1.0, 1.3 scale every width before the 1280-wide head with an
asymmetric rounding to multiples of 8 that prefers rounding up. BN momentum is training-only.
torchvision keeps everything in one flat ``layers`` Sequential: 0-7 the stem (3x3/2 conv, then a
depthwise separable conv to 16), 8-13 the inverted residual stacks (``layers.8.0.layers.3.weight``
is the first stack's depthwise conv), 14-16 the 1x1 head; ``classifier.1`` the Linear.
"""

from __future__ import annotations

from graphgen.builder import GraphBuilder, Tensor
from graphgen.registry import register
from recipes.mobilenet import classifier_pool, decode_arch

#: B1 stacks after the stem: MBConv3 / MBConv6 with 3x3 or 5x5 depthwise kernels.
MNASNET_B1 = [
    "ir_r3_k3_s2_e3_c24",
    "ir_r3_k5_s2_e3_c40",
    "ir_r3_k5_s2_e6_c80",
    "ir_r2_k3_s1_e6_c96",
    "ir_r4_k5_s2_e6_c192",
    "ir_r1_k3_s1_e6_c320",
]
_STEM, _STEM_OUT, _HEAD = 32, 16, 1280


def round_to_multiple_of(val: float, divisor: int = 8, round_up_bias: float = 0.9) -> int:
    """Round to a multiple of ``divisor``, going up unless ``val`` is within 10% above the lower
    multiple (83 -> 80, 84 -> 88)."""
    new_val = max(divisor, int(val + divisor / 2) // divisor * divisor)
    return new_val if new_val >= round_up_bias * val else new_val + divisor


def _conv_bn(b: GraphBuilder, x: Tensor, i: int, out: int, kernel: int = 1, stride: int = 1, groups: int = 1,
             relu: bool = True, residual_end: bool = False) -> tuple[Tensor, int]:
    """conv at index i, BN at i+1, ReLU at i+2 of a flat Sequential; returns the next free index."""
    x = b.conv(x, out, kernel, stride, kernel // 2, groups=groups, bias=False, name=str(i))
    x = b.batch_norm(x, name=str(i + 1), residual_end=residual_end)
    if relu:
        return b.relu(x, name=str(i + 2)), i + 3
    return x, i + 2


def inverted_residual(b: GraphBuilder, x: Tensor, out: int, kernel: int, stride: int, expansion: int) -> Tensor:
    """1x1 expand (ReLU) -> kxk depthwise (ReLU) -> 1x1 linear, shortcut when shapes allow."""
    inp = x
    mid = x.channels * expansion
    with b.scope("layers"):
        x, i = _conv_bn(b, x, 0, mid)
        x, i = _conv_bn(b, x, i, mid, kernel, stride, groups=mid)
        x, _ = _conv_bn(b, x, i, out, relu=False, residual_end=stride == 1 and inp.channels == out)
    if stride == 1 and inp.channels == out:
        x = b.add(x, inp, name="add")
    return x


def mnasnet(b: GraphBuilder, x: Tensor, alpha: float, num_classes: int, dropout: float) -> Tensor:
    def depth(c: int) -> int:
        return round_to_multiple_of(c * alpha, 8)

    with b.scope("layers"):
        x, i = _conv_bn(b, x, 0, depth(_STEM), 3, 2)
        # depthwise separable, no shortcut
        x, i = _conv_bn(b, x, i, depth(_STEM), 3, 1, groups=depth(_STEM))
        x, i = _conv_bn(b, x, i, depth(_STEM_OUT), relu=False)
        for st in decode_arch(MNASNET_B1):
            with b.scope(i):
                for j in range(st.repeats):
                    with b.scope(j):
                        x = inverted_residual(b, x, depth(st.out), st.kernel, st.stride if j == 0 else 1,
                                              int(st.expand_ratio))
            i += 1
        x, i = _conv_bn(b, x, i, _HEAD)
    x = classifier_pool(b, x)  # torchvision: x.mean([2, 3])
    with b.scope("classifier"):
        x = b.dropout(x, dropout, name="0")
        return b.linear(x, num_classes, name="1")


def _make(name: str, alpha: float):
    def recipe(b: GraphBuilder, x: Tensor, num_classes: int = 1000, dropout: float = 0.2) -> Tensor:
        return mnasnet(b, x, alpha, num_classes, dropout)

    recipe.__name__ = recipe.__qualname__ = name
    recipe.__doc__ = f"MnasNet-B1 with depth multiplier {alpha}."
    return register(name, family="mnasnet", test_input_size=(32, 32))(recipe)


mnasnet0_5 = _make("mnasnet0_5", 0.5)
mnasnet0_75 = _make("mnasnet0_75", 0.75)
mnasnet1_0 = _make("mnasnet1_0", 1.0)
mnasnet1_3 = _make("mnasnet1_3", 1.3)
