"""Inception v3 (Szegedy et al., 2015, "Rethinking the Inception Architecture for Computer
Vision", arXiv 1512.00567), as torchvision defines it, for inference.

The network follows the paper's Table 1 (stem of 3x3 convolutions, 3x Inception modules
of Figure 5 at 35x35, a grid reduction, 4x modules of Figure 6 with factorized 7x7 at
17x17, a grid reduction, 2x modules of Figure 7 at 8x8), with the exact widths of the
released TensorFlow model that torchvision ports (``Mixed_5b`` ... ``Mixed_7c``). Every
convolution is ``BasicConv2d`` (conv without bias, BatchNorm eps 0.001, ReLU). The
auxiliary classifier exists only in training and is left out, as is ``transform_input``:
23,834,568 parameters (torchvision's 27,161,264 counts the auxiliary head). Default
input 299x299; initializer names are torchvision's state_dict keys
(``Mixed_6b.branch7x7_2.conv.weight``, ``fc.bias``).
"""

from graphgen.builder import GraphBuilder, Tensor
from graphgen.registry import register

from recipes.googlenet import basic_conv


def conv(b: GraphBuilder, x: Tensor, name: str, out_channels: int, kernel_size, stride=1, padding=0) -> Tensor:
    with b.scope(name):
        return basic_conv(b, x, out_channels, kernel_size, stride, padding)


def avg_pool_3x3(b: GraphBuilder, x: Tensor) -> Tensor:
    """F.avg_pool2d(kernel 3, stride 1, padding 1): the padding zeros count in the mean."""
    return b.avg_pool(x, 3, 1, padding=1, count_include_pad=True, name="avg_pool")


def inception_a(b: GraphBuilder, x: Tensor, pool_features: int) -> Tensor:
    """35x35 module (Figure 5): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""
    branch1x1 = conv(b, x, "branch1x1", 64, 1)
    branch5x5 = conv(b, x, "branch5x5_1", 48, 1)
    branch5x5 = conv(b, branch5x5, "branch5x5_2", 64, 5, padding=2)
    branch3x3dbl = conv(b, x, "branch3x3dbl_1", 64, 1)
    branch3x3dbl = conv(b, branch3x3dbl, "branch3x3dbl_2", 96, 3, padding=1)
    branch3x3dbl = conv(b, branch3x3dbl, "branch3x3dbl_3", 96, 3, padding=1)
    branch_pool = conv(b, avg_pool_3x3(b, x), "branch_pool", pool_features, 1)
    return b.concat([branch1x1, branch5x5, branch3x3dbl, branch_pool], axis=1, name="concat")


def inception_b(b: GraphBuilder, x: Tensor) -> Tensor:
    """35x35 -> 17x17 grid reduction (Figure 10): stride-2 3x3 | 1x1-3x3-3x3/2 | maxpool/2."""
    branch3x3 = conv(b, x, "branch3x3", 384, 3, stride=2)
    branch3x3dbl = conv(b, x, "branch3x3dbl_1", 64, 1)
    branch3x3dbl = conv(b, branch3x3dbl, "branch3x3dbl_2", 96, 3, padding=1)
    branch3x3dbl = conv(b, branch3x3dbl, "branch3x3dbl_3", 96, 3, stride=2)
    branch_pool = b.max_pool(x, 3, 2, name="max_pool")
    return b.concat([branch3x3, branch3x3dbl, branch_pool], axis=1, name="concat")


def inception_c(b: GraphBuilder, x: Tensor, channels_7x7: int) -> Tensor:
    """17x17 module (Figure 6): 7x7 convolutions factorized into 1x7 and 7x1."""
    c7 = channels_7x7
    row, col = ((1, 7), (0, 3)), ((7, 1), (3, 0))  # (kernel, padding) pairs
    branch1x1 = conv(b, x, "branch1x1", 192, 1)
    branch7x7 = conv(b, x, "branch7x7_1", c7, 1)
    branch7x7 = conv(b, branch7x7, "branch7x7_2", c7, row[0], padding=row[1])
    branch7x7 = conv(b, branch7x7, "branch7x7_3", 192, col[0], padding=col[1])
    branch7x7dbl = conv(b, x, "branch7x7dbl_1", c7, 1)
    for i, (out, (k, p)) in enumerate([(c7, col), (c7, row), (c7, col), (192, row)], start=2):
        branch7x7dbl = conv(b, branch7x7dbl, f"branch7x7dbl_{i}", out, k, padding=p)
    branch_pool = conv(b, avg_pool_3x3(b, x), "branch_pool", 192, 1)
    return b.concat([branch1x1, branch7x7, branch7x7dbl, branch_pool], axis=1, name="concat")


def inception_d(b: GraphBuilder, x: Tensor) -> Tensor:
    """17x17 -> 8x8 grid reduction: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""
    branch3x3 = conv(b, x, "branch3x3_1", 192, 1)
    branch3x3 = conv(b, branch3x3, "branch3x3_2", 320, 3, stride=2)
    branch7x7x3 = conv(b, x, "branch7x7x3_1", 192, 1)
    branch7x7x3 = conv(b, branch7x7x3, "branch7x7x3_2", 192, (1, 7), padding=(0, 3))
    branch7x7x3 = conv(b, branch7x7x3, "branch7x7x3_3", 192, (7, 1), padding=(3, 0))
    branch7x7x3 = conv(b, branch7x7x3, "branch7x7x3_4", 192, 3, stride=2)
    branch_pool = b.max_pool(x, 3, 2, name="max_pool")
    return b.concat([branch3x3, branch7x7x3, branch_pool], axis=1, name="concat")


def inception_e(b: GraphBuilder, x: Tensor) -> Tensor:
    """8x8 module (Figure 7): expanded filter banks, 3x3 split into parallel 1x3 and 3x1."""
    branch1x1 = conv(b, x, "branch1x1", 320, 1)

    branch3x3 = conv(b, x, "branch3x3_1", 384, 1)
    branch3x3 = b.concat([conv(b, branch3x3, "branch3x3_2a", 384, (1, 3), padding=(0, 1)),
                          conv(b, branch3x3, "branch3x3_2b", 384, (3, 1), padding=(1, 0))],
                         axis=1, name="branch3x3_concat")

    branch3x3dbl = conv(b, x, "branch3x3dbl_1", 448, 1)
    branch3x3dbl = conv(b, branch3x3dbl, "branch3x3dbl_2", 384, 3, padding=1)
    branch3x3dbl = b.concat([conv(b, branch3x3dbl, "branch3x3dbl_3a", 384, (1, 3), padding=(0, 1)),
                             conv(b, branch3x3dbl, "branch3x3dbl_3b", 384, (3, 1), padding=(1, 0))],
                            axis=1, name="branch3x3dbl_concat")

    branch_pool = conv(b, avg_pool_3x3(b, x), "branch_pool", 192, 1)
    return b.concat([branch1x1, branch3x3, branch3x3dbl, branch_pool], axis=1, name="concat")


# Stem, as (name, out_channels, kernel, stride, padding) convolutions and "maxpool" (3x3/2).
STEM = [
    ("Conv2d_1a_3x3", 32, 3, 2, 0),
    ("Conv2d_2a_3x3", 32, 3, 1, 0),
    ("Conv2d_2b_3x3", 64, 3, 1, 1),
    ("maxpool1",),
    ("Conv2d_3b_1x1", 80, 1, 1, 0),
    ("Conv2d_4a_3x3", 192, 3, 1, 0),
    ("maxpool2",),
]

# The Inception modules in order: (name, block, keyword arguments).
MIXED = [
    ("Mixed_5b", inception_a, dict(pool_features=32)),
    ("Mixed_5c", inception_a, dict(pool_features=64)),
    ("Mixed_5d", inception_a, dict(pool_features=64)),
    ("Mixed_6a", inception_b, {}),
    ("Mixed_6b", inception_c, dict(channels_7x7=128)),
    ("Mixed_6c", inception_c, dict(channels_7x7=160)),
    ("Mixed_6d", inception_c, dict(channels_7x7=160)),
    ("Mixed_6e", inception_c, dict(channels_7x7=192)),
    ("Mixed_7a", inception_d, {}),
    ("Mixed_7b", inception_e, {}),
    ("Mixed_7c", inception_e, {}),
]


@register("inception_v3", family="inception", input_size=(299, 299), test_input_size=(75, 75))
def inception_v3(b: GraphBuilder, x: Tensor, num_classes: int = 1000, dropout: float = 0.5) -> Tensor:
    """Inception v3: factorized convolutions and grid-size reductions (23.8M parameters without aux head)."""
    for name, *spec in STEM:
        if spec:
            x = conv(b, x, name, *spec)
        else:
            x = b.max_pool(x, 3, 2, name=name)
    for name, block, kwargs in MIXED:
        with b.scope(name):
            x = block(b, x, **kwargs)
    x = b.global_avg_pool(x, name="avgpool")
    x = b.dropout(x, dropout, name="dropout")
    x = b.flatten(x, 1, name="flatten")
    return b.linear(x, num_classes, name="fc")
