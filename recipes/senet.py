"""Squeeze-and-Excitation ResNet and ResNeXt (Hu, Shen & Sun, "Squeeze-and-Excitation Networks",
CVPR 2018, arXiv 1709.01507).

Table 1 of the paper: SE-ResNet-50 and SE-ResNeXt-50 (32x4d) are ResNet-50 / ResNeXt-50 whose every
bottleneck ends with an SE block: global average pool, fc to C/16, ReLU, fc back to C, sigmoid, and a
channel-wise rescale of the residual branch after its last BN, before the identity add (Fig. 3,
reduction ratio r = 16, Section 6.1). The fcs are 1x1 convs with bias on the pooled 1x1 map, the same
numbers as a Linear. SE-ResNet-50 has 28.09M parameters (the paper's ~28.1M: ResNet-50's 25.56M plus
2.53M for the SE blocks).

The residual body is :mod:`recipes.resnet`'s (torchvision's layout: the stride on the 3x3 conv; the
paper's Caffe models stride the first 1x1, which moves no parameter). State_dict keys are torchvision's
plus ``layerN.i.se.fc1`` / ``se.fc2`` (the naming of timm's ``seresnet50``).
"""

from __future__ import annotations

from functools import partial

from graphgen.builder import GraphBuilder, Tensor
from graphgen.registry import register
from recipes.resnet import RESNET_LAYERS, Block, bottleneck, classifier_head, residual_stages, stem

#: Reduction ratio r of the excitation's bottleneck (paper Section 6.1).
SE_REDUCTION = 16


def squeeze_excitation(b: GraphBuilder, x: Tensor, reduction: int = SE_REDUCTION) -> Tensor:
    """SE block: squeeze (global average pool), excite (fc-ReLU-fc-sigmoid), rescale x per channel."""
    with b.scope("se"):
        s = b.global_avg_pool(x, name="squeeze")
        s = b.relu(b.conv(s, x.channels // reduction, 1, name="fc1"), name="relu")
        s = b.sigmoid(b.conv(s, x.channels, 1, name="fc2"), name="gate")
        return b.mul(x, s, name="scale")


#: The bottleneck with SE on its residual branch (SE after bn3, before the add).
SE_BOTTLENECK = Block(partial(bottleneck, branch_end=squeeze_excitation), 4)


def se_resnet(b: GraphBuilder, x: Tensor, layers: list[int], num_classes: int = 1000, groups: int = 1,
              width_per_group: int = 64) -> Tensor:
    """The ResNet stem, SE-bottleneck stages, avgpool and fc."""
    x = residual_stages(b, stem(b, x), SE_BOTTLENECK, layers, groups, width_per_group)["layer4"]
    return classifier_head(b, x, num_classes)


_SE = dict(family="senet", source="paper: Hu et al. 2018, Squeeze-and-Excitation Networks, Table 1",
           test_input_size=(64, 64))


@register("se_resnet50", aliases=("seresnet50",), **_SE)
def se_resnet50(b: GraphBuilder, x: Tensor, num_classes: int = 1000) -> Tensor:
    """SE-ResNet-50: ResNet-50 with an SE block (r=16) in every bottleneck (paper Table 1, middle)."""
    return se_resnet(b, x, RESNET_LAYERS[50][1], num_classes)


@register("se_resnext50_32x4d", aliases=("seresnext50_32x4d",), **_SE)
def se_resnext50_32x4d(b: GraphBuilder, x: Tensor, num_classes: int = 1000) -> Tensor:
    """SE-ResNeXt-50 (32x4d): ResNeXt-50 with an SE block (r=16) in every bottleneck (paper Table 1, right)."""
    return se_resnet(b, x, RESNET_LAYERS[50][1], num_classes, groups=32, width_per_group=4)
