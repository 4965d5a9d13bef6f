"""EfficientNet B0-B7 (Tan & Le, "EfficientNet: Rethinking Model Scaling for Convolutional Neural
Networks", ICML 2019, arXiv 1905.11946), as torchvision defines them.

The B0 body is the paper's Table 1 (MBConv stages, SE ratio 0.25 of the block *input* width,
SiLU); B1-B7 scale it with compound coefficients (width, depth) from the reference code:
widths make_divisible(c * width, 8), stage depths ceil(n * depth). Dropout grows 0.2 -> 0.5.
BatchNorm eps is 1e-5 for B0-B4 and 1e-3 for B5-B7 (torchvision's B5-B7 weights come from the
TF checkpoints and keep TF's epsilon). Stochastic depth is the identity at inference.
Default input sizes are torchvision's eval crops: 224, 240, 288, 300, 380, 456, 528, 600
(B2: 288, where the paper lists 260).

Names are torchvision's: ``features.<stage>.<block>.block.<i>`` (``features.1.0.block.0.0.weight``
is B0's first depthwise conv), ``classifier.1`` the final Linear.
"""

from __future__ import annotations

import math

from graphgen.builder import GraphBuilder, Tensor
from graphgen.registry import register
from recipes.mobilenet import (MBConvConfig, classifier_pool, conv_norm_act, decode_arch, inverted_residual,
                               make_divisible)

#: Table 1 of the paper, stages 2-8 (stage 1 is the 3x3/2 stem conv to 32, stage 9 the 1x1 head).
EFFICIENTNET_B0 = [
    "ir_r1_k3_s1_e1_c16_se_sw",
    "ir_r2_k3_s2_e6_c24_se_sw",
    "ir_r2_k5_s2_e6_c40_se_sw",
    "ir_r3_k3_s2_e6_c80_se_sw",
    "ir_r3_k5_s1_e6_c112_se_sw",
    "ir_r4_k5_s2_e6_c192_se_sw",
    "ir_r1_k3_s1_e6_c320_se_sw",
]
_STEM = 32

#: name -> (width multiplier, depth multiplier, dropout, BN eps, torchvision eval crop)
VARIANTS = {
    "efficientnet_b0": (1.0, 1.0, 0.2, 1e-5, 224),
    "efficientnet_b1": (1.0, 1.1, 0.2, 1e-5, 240),
    "efficientnet_b2": (1.1, 1.2, 0.3, 1e-5, 288),
    "efficientnet_b3": (1.2, 1.4, 0.3, 1e-5, 300),
    "efficientnet_b4": (1.4, 1.8, 0.4, 1e-5, 380),
    "efficientnet_b5": (1.6, 2.2, 0.4, 1e-3, 456),
    "efficientnet_b6": (1.8, 2.6, 0.5, 1e-3, 528),
    "efficientnet_b7": (2.0, 3.1, 0.5, 1e-3, 600),
}


def stage_configs(width_mult: float, depth_mult: float) -> list[list[MBConvConfig]]:
    """The MBConv stages with resolved widths and depths; only a stage's first block strides."""

    def width(c: int) -> int:
        return make_divisible(c * width_mult, 8)

    stages = []
    in_ch = width(_STEM)
    for st in decode_arch(EFFICIENTNET_B0):
        out_ch = width(st.out)
        blocks = []
        for j in range(int(math.ceil(st.repeats * depth_mult))):
            cin = in_ch if j == 0 else out_ch
            expanded = make_divisible(cin * st.expand_ratio, 8)
            # SE squeezes to a quarter of the block's *input* width (not the expanded one)
            se = max(1, cin // 4) if st.se else 0
            blocks.append(MBConvConfig(cin, expanded, out_ch, st.kernel, st.stride if j == 0 else 1, 1, st.act,
                                       se, "silu", "sigmoid"))
        stages.append(blocks)
        in_ch = out_ch
    return stages


def efficientnet(b: GraphBuilder, x: Tensor, width_mult: float, depth_mult: float, dropout: float, eps: float,
                 num_classes: int) -> Tensor:
    stages = stage_configs(width_mult, depth_mult)
    with b.scope("features"):
        with b.scope(0):
            x = conv_norm_act(b, x, make_divisible(_STEM * width_mult, 8), 3, 2, act="silu", eps=eps)
        for s, blocks in enumerate(stages, start=1):
            for j, cnf in enumerate(blocks):
                with b.scope(s, j):
                    x = inverted_residual(b, x, cnf, eps=eps)
        with b.scope(len(stages) + 1):
            x = conv_norm_act(b, x, 4 * stages[-1][-1].out_channels, 1, act="silu", eps=eps)
    x = classifier_pool(b, x)
    with b.scope("classifier"):
        x = b.dropout(x, dropout, name="0")
        return b.linear(x, num_classes, name="1")


def _make(name: str, doc: str):
    width_mult, depth_mult, default_dropout, eps, size = VARIANTS[name]

    def recipe(b: GraphBuilder, x: Tensor, num_classes: int = 1000, dropout: float = default_dropout) -> Tensor:
        return efficientnet(b, x, width_mult, depth_mult, dropout, eps, num_classes)

    recipe.__name__ = recipe.__qualname__ = name
    recipe.__doc__ = doc
    return register(name, family="efficientnet", input_size=(size, size), test_input_size=(32, 32))(recipe)


efficientnet_b0 = _make("efficientnet_b0", "EfficientNet-B0 (Table 1): the NAS-found MBConv baseline, 224x224.")
efficientnet_b1 = _make("efficientnet_b1", "EfficientNet-B1: width 1.0, depth 1.1, 240x240.")
efficientnet_b2 = _make("efficientnet_b2", "EfficientNet-B2: width 1.1, depth 1.2, 288x288 (torchvision's crop).")
efficientnet_b3 = _make("efficientnet_b3", "EfficientNet-B3: width 1.2, depth 1.4, 300x300.")
efficientnet_b4 = _make("efficientnet_b4", "EfficientNet-B4: width 1.4, depth 1.8, 380x380.")
efficientnet_b5 = _make("efficientnet_b5", "EfficientNet-B5: width 1.6, depth 2.2, 456x456, BN eps 1e-3.")
efficientnet_b6 = _make("efficientnet_b6", "EfficientNet-B6: width 1.8, depth 2.6, 528x528, BN eps 1e-3.")
efficientnet_b7 = _make("efficientnet_b7", "EfficientNet-B7: width 2.0, depth 3.1, 600x600, BN eps 1e-3.")
