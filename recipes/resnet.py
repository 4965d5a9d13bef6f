"""ResNet, ResNeXt and Wide ResNet as torchvision defines them, and pre-activation ResNet (ResNet V2).

* He et al., "Deep Residual Learning for Image Recognition", CVPR 2016 (arXiv 1512.03385), Table 1:
  stages conv2_x..conv5_x (here ``layer1``..``layer4``) of 64/128/256/512 planes; 18 and 34 layers use
  basic blocks (two 3x3 convs), 50/101/152 use bottlenecks (1x1, 3x3, 1x1 with 4x expansion).
  torchvision's variant ("ResNet V1.5") puts a bottleneck's stride-2 on its 3x3 conv, not on the first 1x1.
* Xie et al., "Aggregated Residual Transformations for Deep Neural Networks" (ResNeXt), CVPR 2017
  (arXiv 1611.05431), Table 1: the bottleneck's 3x3 becomes a grouped conv, cardinality x width
  (32x4d: 32 groups of 4 channels at layer1, doubling every stage).
* Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016 (arXiv 1605.07146): torchvision's
  ``wide_resnet50_2``/``wide_resnet101_2`` double the bottleneck's inner width (outer widths unchanged).
* He et al., "Identity Mappings in Deep Residual Networks", ECCV 2016 (arXiv 1603.05027), Fig. 4(e)
  "full pre-activation": every residual unit is BN-ReLU-conv (x2 basic, x3 bottleneck) and the add is
  not followed by a ReLU; Appendix: the split into the shortcut happens after the first activation
  where a projection is needed, and an extra BN-ReLU follows the last unit, before pooling. The stage
  layout is the original ResNet's Table 1. The paper gives no parameter count for the 18/50-layer
  ImageNet models; ours differ from the V1 models only by their BatchNorm layers (< 0.1%).

Block stacks are data (:data:`RESNET_LAYERS`: blocks per stage; :data:`BLOCKS`: block kinds) and
:func:`resnet_body` is the reusable backbone (segmentation recipes import it). Scopes make initializer
names equal to torchvision's state_dict keys (``layer1.0.downsample.1.running_var``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from graphgen.builder import GraphBuilder, Tensor
from graphgen.registry import register

#: Planes (the bottleneck's inner width before the width multiplier) of layer1..layer4, and strides.
STAGE_PLANES = (64, 128, 256, 512)
STAGE_STRIDES = (1, 2, 2, 2)

#: Blocks per stage for each depth (He et al. 2016, Table 1).
RESNET_LAYERS = {
    18: ("basic", [2, 2, 2, 2]),
    34: ("basic", [3, 4, 6, 3]),
    50: ("bottleneck", [3, 4, 6, 3]),
    101: ("bottleneck", [3, 4, 23, 3]),
    152: ("bottleneck", [3, 8, 36, 3]),
}

#: A block function's hook applied to the residual branch after its last BN, before the add
#: (SENet puts its squeeze-and-excitation there).
BranchEnd = Callable[[GraphBuilder, Tensor], Tensor]


def conv_bn(b: GraphBuilder, x: Tensor, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1,
            dilation: int = 1, conv: str = "conv1", bn: str = "bn1", residual_end: bool = False) -> Tensor:
    """A bias-free conv (padding keeps the size at stride 1, like torchvision's conv3x3/conv1x1) then BN."""
    padding = dilation * (kernel_size // 2)
    x = b.conv(x, out_channels, kernel_size, stride=stride, padding=padding, dilation=dilation, groups=groups,
               bias=False, name=conv)
    return b.batch_norm(x, name=bn, residual_end=residual_end)


def _projection(b: GraphBuilder, x: Tensor, out_channels: int, stride: int) -> Tensor:
    """torchvision's ``downsample``: Sequential(conv1x1 with the block's stride, BN)."""
    with b.scope("downsample"):
        return conv_bn(b, x, out_channels, 1, stride, conv="0", bn="1")


def basic_block(b: GraphBuilder, x: Tensor, planes: int, stride: int = 1, downsample: bool = False,
                groups: int = 1, base_width: int = 64, dilation: int = 1,
                branch_end: BranchEnd | None = None) -> Tensor:
    """Two 3x3 conv-BN layers with a ReLU between; identity or projection shortcut; ReLU after the add."""
    if groups != 1 or base_width != 64:
        raise ValueError("the basic block supports only groups=1 and width_per_group=64")
    if dilation > 1:
        raise ValueError("the basic block does not support dilation (as in torchvision): use a bottleneck")
    out = b.relu(conv_bn(b, x, planes, 3, stride, conv="conv1", bn="bn1"), name="relu")
    out = conv_bn(b, out, planes, 3, conv="conv2", bn="bn2", residual_end=True)
    if branch_end is not None:
        out = branch_end(b, out)
    identity = _projection(b, x, planes, stride) if downsample else x
    return b.relu(b.add(out, identity, name="add"), name="relu_out")


def bottleneck(b: GraphBuilder, x: Tensor, planes: int, stride: int = 1, downsample: bool = False,
               groups: int = 1, base_width: int = 64, dilation: int = 1,
               branch_end: BranchEnd | None = None) -> Tensor:
    """1x1 reduce, 3x3 (grouped, strided, dilated), 1x1 expand to 4*planes, each with BN; ReLU after the add.

    The inner width is ``planes * base_width / 64 * groups``: ResNeXt's cardinality x width and Wide
    ResNet's doubled width are both this one formula.
    """
    width = int(planes * (base_width / 64.0)) * groups
    out = b.relu(conv_bn(b, x, width, 1, conv="conv1", bn="bn1"), name="relu")
    out = b.relu(conv_bn(b, out, width, 3, stride, groups, dilation, conv="conv2", bn="bn2"), name="relu_1")
    out = conv_bn(b, out, planes * 4, 1, conv="conv3", bn="bn3", residual_end=True)
    if branch_end is not None:
        out = branch_end(b, out)
    identity = _projection(b, x, planes * 4, stride) if downsample else x
    return b.relu(b.add(out, identity, name="add"), name="relu_out")


def _preact_unit_start(b: GraphBuilder, x: Tensor, out_channels: int, stride: int, downsample: bool):
    """BN-ReLU pre-activation; the shortcut is x itself, or a 1x1 projection of the pre-activated x
    (the paper's Appendix: with a projection, both paths start after the activation)."""
    preact = b.relu(b.batch_norm(x, name="bn1"), name="relu")
    if downsample:
        shortcut = b.conv(preact, out_channels, 1, stride=stride, bias=False, name="downsample")
    else:
        shortcut = x
    return preact, shortcut


def preact_basic_block(b: GraphBuilder, x: Tensor, planes: int, stride: int = 1, downsample: bool = False,
                       groups: int = 1, base_width: int = 64, dilation: int = 1) -> Tensor:
    """Full pre-activation basic unit: BN-ReLU-conv3x3, BN-ReLU-conv3x3, plain add (no ReLU after it)."""
    if groups != 1 or base_width != 64 or dilation != 1:
        raise ValueError("the pre-activation basic block supports only groups=1, width 64 and no dilation")
    out, shortcut = _preact_unit_start(b, x, planes, stride, downsample)
    out = b.conv(out, planes, 3, stride=stride, padding=1, bias=False, name="conv1")
    out = b.relu(b.batch_norm(out, name="bn2"), name="relu_1")
    out = b.conv(out, planes, 3, padding=1, bias=False, name="conv2")
    return b.add(out, shortcut, name="add")


def preact_bottleneck(b: GraphBuilder, x: Tensor, planes: int, stride: int = 1, downsample: bool = False,
                      groups: int = 1, base_width: int = 64, dilation: int = 1) -> Tensor:
    """Full pre-activation bottleneck: BN-ReLU-conv1x1, BN-ReLU-conv3x3 (strided), BN-ReLU-conv1x1, plain add."""
    width = int(planes * (base_width / 64.0)) * groups
    out, shortcut = _preact_unit_start(b, x, planes * 4, stride, downsample)
    out = b.conv(out, width, 1, bias=False, name="conv1")
    out = b.relu(b.batch_norm(out, name="bn2"), name="relu_1")
    out = b.conv(out, width, 3, stride=stride, padding=dilation, dilation=dilation, groups=groups, bias=False,
                 name="conv2")
    out = b.relu(b.batch_norm(out, name="bn3"), name="relu_2")
    out = b.conv(out, planes * 4, 1, bias=False, name="conv3")
    return b.add(out, shortcut, name="add")


@dataclass(frozen=True)
class Block:
    """A residual block kind: its function (called inside the ``layerN.i`` scope) and channel expansion."""

    fn: Callable[..., Tensor]
    expansion: int


BLOCKS = {
    "basic": Block(basic_block, 1),
    "bottleneck": Block(bottleneck, 4),
    "preact_basic": Block(preact_basic_block, 1),
    "preact_bottleneck": Block(preact_bottleneck, 4),
}


def stem(b: GraphBuilder, x: Tensor) -> Tensor:
    """conv1 7x7/2 (64, no bias), bn1, relu, maxpool 3x3/2 pad 1: a quarter of the input size."""
    x = b.relu(conv_bn(b, x, 64, 7, 2, conv="conv1", bn="bn1"), name="relu")
    return b.max_pool(x, 3, 2, padding=1, name="maxpool")


def residual_stages(b: GraphBuilder, x: Tensor, block: str | Block, layers: Sequence[int], groups: int = 1,
                    width_per_group: int = 64,
                    replace_stride_with_dilation: Sequence[bool] = (False, False, False)) -> dict[str, Tensor]:
    """layer1..layer4 of ``layers[i]`` blocks each; returns {"layer1": ..., ..., "layer4": ...}.

    Follows torchvision's ``_make_layer``: the first block of a stage takes the stage's stride and a
    projection shortcut when the stride or the channel count changes; a stage whose stride is replaced
    by dilation multiplies the running dilation by 2 and keeps stride 1, its first block still using the
    *previous* dilation and the others the new one.
    """
    kind = BLOCKS[block] if isinstance(block, str) else block
    if len(layers) != 4:
        raise ValueError(f"layers must give 4 stage depths, got {list(layers)}")
    if len(replace_stride_with_dilation) != 3:
        raise ValueError(f"replace_stride_with_dilation needs 3 values, got {replace_stride_with_dilation!r}")
    dilate_stage = (False, *(bool(v) for v in replace_stride_with_dilation))
    outs = {}
    dilation = 1
    for stage, (planes, depth, stride, dilate) in enumerate(zip(STAGE_PLANES, layers, STAGE_STRIDES, dilate_stage)):
        previous_dilation = dilation
        if dilate:
            dilation *= stride
            stride = 1
        out_channels = planes * kind.expansion
        with b.scope(f"layer{stage + 1}"):
            for i in range(depth):
                with b.scope(i):
                    first = i == 0
                    x = kind.fn(b, x, planes, stride=stride if first else 1,
                                downsample=first and (stride != 1 or x.channels != out_channels),
                                groups=groups, base_width=width_per_group,
                                dilation=previous_dilation if first else dilation)
        outs[f"layer{stage + 1}"] = x
    return outs


def resnet_body(b: GraphBuilder, x: Tensor, block: str, layers: list[int], groups: int = 1,
                width_per_group: int = 64,
                replace_stride_with_dilation=(False, False, False)) -> dict[str, Tensor]:
    """torchvision's ResNet without its head: the backbone that classifiers and segmentation nets share.

    Emits ``conv1``, ``bn1``, ``relu``, ``maxpool`` and ``layer1``..``layer4`` under the *current* scope,
    so their parameters are named like torchvision's (``conv1.weight``, ``layer1.0.conv1.weight``,
    ``layer1.0.downsample.0.weight``), prefixed by any open scope (``backbone.``).

    Args:
        block: ``"basic"`` (ResNet-18/34) or ``"bottleneck"`` (ResNet-50 and deeper, ResNeXt, Wide ResNet).
        layers: blocks in each of the 4 stages, e.g. ``[3, 4, 6, 3]``.
        groups, width_per_group: the bottleneck's cardinality and per-group width (ResNeXt 32x4d:
            32 and 4; Wide ResNet-50-2: 1 and 128). The basic block accepts only 1 and 64.
        replace_stride_with_dilation: for layer2, layer3, layer4: replace the stage's stride 2 with
            dilation, exactly as torchvision's ``_make_layer`` (the first block keeps the previous
            dilation, the others use the doubled one). ``(False, True, True)`` gives output stride 8
            (FCN, DeepLabV3); bottleneck only, as in torchvision.

    Returns:
        ``{"stem": maxpool output (stride 4, 64 channels), "layer1": ..., "layer2": ..., "layer3": ...,
        "layer4": ...}`` (strides 4, 8, 16, 32 without dilation; 64/128/256/512 x expansion channels).
    """
    if block not in ("basic", "bottleneck"):
        raise ValueError(f"block must be 'basic' or 'bottleneck', got {block!r}")
    x = stem(b, x)
    outs = {"stem": x}
    outs.update(residual_stages(b, x, block, layers, groups, width_per_group, replace_stride_with_dilation))
    return outs


def classifier_head(b: GraphBuilder, x: Tensor, num_classes: int) -> Tensor:
    """avgpool (adaptive to 1x1), flatten, fc."""
    x = b.flatten(b.adaptive_avg_pool(x, 1, name="avgpool"), 1, name="flatten")
    return b.linear(x, num_classes, name="fc")


def resnet(b: GraphBuilder, x: Tensor, block: str, layers: list[int], num_classes: int = 1000, groups: int = 1,
           width_per_group: int = 64) -> Tensor:
    """torchvision's ``ResNet``: :func:`resnet_body` then avgpool and fc."""
    feats = resnet_body(b, x, block, layers, groups, width_per_group)
    return classifier_head(b, feats["layer4"], num_classes)


def preact_resnet(b: GraphBuilder, x: Tensor, depth: int, num_classes: int = 1000) -> Tensor:
    """Pre-activation ResNet (ResNet V2): conv1 7x7/2 and maxpool (no BN-ReLU: every unit starts with
    its own), the full pre-activation stages, then the extra ``final_bn``-ReLU, avgpool and fc."""
    kind, layers = RESNET_LAYERS[depth]
    x = b.conv(x, 64, 7, stride=2, padding=3, bias=False, name="conv1")
    x = b.max_pool(x, 3, 2, padding=1, name="maxpool")
    x = residual_stages(b, x, f"preact_{kind}", layers)["layer4"]
    x = b.relu(b.batch_norm(x, name="final_bn"), name="final_relu")
    return classifier_head(b, x, num_classes)


# ------------------------------------------------------------------ torchvision models
_TV = dict(family="resnet", source="torchvision", test_input_size=(64, 64))


@register("resnet18", **_TV)
def resnet18(b: GraphBuilder, x: Tensor, num_classes: int = 1000) -> Tensor:
    """ResNet-18: basic blocks [2, 2, 2, 2] (He et al. 2016, Table 1)."""
    return resnet(b, x, *RESNET_LAYERS[18], num_classes)


@register("resnet34", **_TV)
def resnet34(b: GraphBuilder, x: Tensor, num_classes: int = 1000) -> Tensor:
    """ResNet-34: basic blocks [3, 4, 6, 3] (He et al. 2016, Table 1)."""
    return resnet(b, x, *RESNET_LAYERS[34], num_classes)


@register("resnet50", aliases=("resnet",), **_TV)
def resnet50(b: GraphBuilder, x: Tensor, num_classes: int = 1000) -> Tensor:
    """ResNet-50: bottlenecks [3, 4, 6, 3], stride on the 3x3 (torchvision's V1.5)."""
    return resnet(b, x, *RESNET_LAYERS[50], num_classes)


@register("resnet101", **_TV)
def resnet101(b: GraphBuilder, x: Tensor, num_classes: int = 1000) -> Tensor:
    """ResNet-101: bottlenecks [3, 4, 23, 3]."""
    return resnet(b, x, *RESNET_LAYERS[101], num_classes)


@register("resnet152", **_TV)
def resnet152(b: GraphBuilder, x: Tensor, num_classes: int = 1000) -> Tensor:
    """ResNet-152: bottlenecks [3, 8, 36, 3]."""
    return resnet(b, x, *RESNET_LAYERS[152], num_classes)


@register("resnext50_32x4d", aliases=("resnext50",), **_TV)
def resnext50_32x4d(b: GraphBuilder, x: Tensor, num_classes: int = 1000) -> Tensor:
    """ResNeXt-50 32x4d: ResNet-50 with 32-group 3x3 convs of width 4 (Xie et al. 2017, Table 1)."""
    return resnet(b, x, *RESNET_LAYERS[50], num_classes, groups=32, width_per_group=4)


@register("resnext101_32x8d", **_TV)
def resnext101_32x8d(b: GraphBuilder, x: Tensor, num_classes: int = 1000) -> Tensor:
    """ResNeXt-101 32x8d: ResNet-101 with 32-group 3x3 convs of width 8."""
    return resnet(b, x, *RESNET_LAYERS[101], num_classes, groups=32, width_per_group=8)


@register("resnext101_64x4d", **_TV)
def resnext101_64x4d(b: GraphBuilder, x: Tensor, num_classes: int = 1000) -> Tensor:
    """ResNeXt-101 64x4d: ResNet-101 with 64-group 3x3 convs of width 4."""
    return resnet(b, x, *RESNET_LAYERS[101], num_classes, groups=64, width_per_group=4)


@register("wide_resnet50_2", **_TV)
def wide_resnet50_2(b: GraphBuilder, x: Tensor, num_classes: int = 1000) -> Tensor:
    """Wide ResNet-50-2: ResNet-50 with bottlenecks twice as wide inside (Zagoruyko & Komodakis 2016)."""
    return resnet(b, x, *RESNET_LAYERS[50], num_classes, width_per_group=128)


@register("wide_resnet101_2", **_TV)
def wide_resnet101_2(b: GraphBuilder, x: Tensor, num_classes: int = 1000) -> Tensor:
    """Wide ResNet-101-2: ResNet-101 with bottlenecks twice as wide inside."""
    return resnet(b, x, *RESNET_LAYERS[101], num_classes, width_per_group=128)


# ------------------------------------------------------------- pre-activation (paper)
_PREACT = dict(family="resnet", source="paper: He et al. 2016, Identity Mappings in Deep Residual Networks",
               test_input_size=(64, 64))


@register("preact_resnet18", aliases=("resnet18_v2",), **_PREACT)
def preact_resnet18(b: GraphBuilder, x: Tensor, num_classes: int = 1000) -> Tensor:
    """Pre-activation ResNet-18 (ResNet V2): full pre-activation basic units [2, 2, 2, 2]."""
    return preact_resnet(b, x, 18, num_classes)


@register("preact_resnet50", aliases=("resnet50_v2",), **_PREACT)
def preact_resnet50(b: GraphBuilder, x: Tensor, num_classes: int = 1000) -> Tensor:
    """Pre-activation ResNet-50 (ResNet V2): full pre-activation bottleneck units [3, 4, 6, 3]."""
    return preact_resnet(b, x, 50, num_classes)
