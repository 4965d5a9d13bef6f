"""Fully Convolutional Networks (Long, Shelhamer & Darrell, CVPR 2015, arXiv 1411.4038).

``fcn32s``, ``fcn16s`` and ``fcn8s`` are the paper's VGG16 nets (Sec. 3-4, Fig. 3, Table 2) as the
authors released them (Caffe ``voc-fcn32s/16s/8s``):

* VGG16's 13 convolutions with conv1_1 padded by 100, so that any input survives fc6's 7x7 window,
  and Caffe's ceil-mode 2x2 pooling;
* fc6 and fc7 "convolutionalized": a 7x7 conv to 4096 channels and a 1x1 conv to 4096, each with
  ReLU and dropout, then ``score_fr``, a 1x1 conv to the classes (stride 32). Option ``fc_channels``
  narrows fc6/fc7 (DeepLab-LargeFOV's trick, 1024): fc6 alone holds 103M of FCN's 134M parameters;
* skips: 1x1 score layers on pool4 (FCN-16s) and pool3 (FCN-8s), each *cropped* to the 2x upsampled
  coarser prediction and added to it;
* upsampling by transposed convolutions without bias initialised to bilinear interpolation
  (2x: kernel 4 stride 2; final 8x/16x/32x: kernel 16/32/64), and a last crop to the input size.
  Crop offsets are those Caffe derives for this geometry: 19 (32s), 5 then 27 (16s), 5, 9 then 31 (8s).

Names: the backbone keeps torchvision's ``vgg16`` names (``features.0.weight`` ... ``features.28``) so
ImageNet VGG16 weights load; the head uses the paper's layer names (``fc6``, ``score_pool4``, ``upscore2``).

``fcn_resnet50`` / ``fcn_resnet101`` are torchvision's ``models/segmentation/fcn.py``: ResNet with
dilated layer3/layer4 (output stride 8), ``FCNHead`` (3x3 conv to in/4 channels, BN, ReLU, dropout,
1x1 conv), bilinear resize to the input; an optional auxiliary FCNHead on layer3 (``aux_loss``).
``vgg16_features``, ``fcn_head`` and ``segmentation_outputs`` are shared with SegNet, DeepLab and PSPNet.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from graphgen.builder import GraphBuilder, Tensor
from graphgen.registry import register
from recipes.resnet import resnet_body

#: torchvision's VGG16 ("D") features as five stages of 3x3 conv widths; each stage ends in a pool.
VGG16_STAGES = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))

#: Poolings hook: pool(b, x, stage_index, name) -> Tensor. Default: torchvision's 2x2/2 max pool.
Pool = Callable[[GraphBuilder, Tensor, int, str], Tensor]


def max_pool_2x2(b: GraphBuilder, x: Tensor, stage: int, name: str) -> Tensor:
    return b.max_pool(x, 2, 2, name=name)


def max_pool_2x2_ceil(b: GraphBuilder, x: Tensor, stage: int, name: str) -> Tensor:
    """Caffe's pooling rounds the output size up."""
    return b.max_pool(x, 2, 2, ceil_mode=True, name=name)


def vgg16_features(b: GraphBuilder, x: Tensor, *, batch_norm: bool = False, first_padding: int = 1,
                   dilations=(1, 1, 1, 1, 1), pool: Pool = max_pool_2x2) -> list[Tensor]:
    """torchvision's ``vgg16`` / ``vgg16_bn`` ``features``: 13 3x3 convs (+BN) + ReLU in five stages.

    Emits ``features.<i>`` at torchvision's Sequential indices and returns the five stages' pooled
    outputs. ``first_padding`` pads conv1_1 (FCN: 100); ``dilations`` gives each stage's conv dilation
    (DeepLab's atrous stage 5); ``pool`` replaces the pooling layer (DeepLab's 3x3 pools, SegNet's
    pooling with indices).
    """
    outs = []
    i = 0
    with b.scope("features"):
        for stage, widths in enumerate(VGG16_STAGES):
            d = dilations[stage]
            for j, width in enumerate(widths):
                pad = first_padding if (stage, j) == (0, 0) else d
                x = b.conv(x, width, 3, padding=pad, dilation=d, name=str(i))
                i += 1
                if batch_norm:
                    x = b.batch_norm(x, name=str(i))
                    i += 1
                x = b.relu(x, name=str(i))
                i += 1
            x = pool(b, x, stage, str(i))
            i += 1
            outs.append(x)
    return outs


def bilinear_kernel(channels: int, kernel_size: int) -> np.ndarray:
    """ConvTranspose weight [C, C, k, k] that upsamples each channel bilinearly (FCN's initialisation)."""
    factor = (kernel_size + 1) // 2
    center = factor - 1 if kernel_size % 2 == 1 else factor - 0.5
    og = np.arange(kernel_size)
    filt1d = 1 - np.abs(og - center) / factor
    w = np.zeros((channels, channels, kernel_size, kernel_size), np.float32)
    w[np.arange(channels), np.arange(channels)] = np.outer(filt1d, filt1d)
    return w


def upsample_bilinear_init(b: GraphBuilder, x: Tensor, factor: int, name: str) -> Tensor:
    """nn.ConvTranspose2d(C, C, 2f, stride f, bias=False) with weights initialised to bilinear upsampling.

    The builder's conv_transpose always seeds Kaiming weights, so the bilinear initial value is set
    here through the generic param/_emit path (a given checkpoint still replaces it).
    """
    k = 2 * factor
    c = x.channels
    with b.scope(name):
        w = b.param("weight", (c, c, k, k), bilinear_kernel(c, k))
    out_hw = [(s - 1) * factor + k for s in x.spatial]
    return b._emit("ConvTranspose", [x.name, w], name, (x.shape[0], c, *out_hw), kernel_shape=[k, k],
                   strides=[factor, factor], pads=[0, 0, 0, 0], dilations=[1, 1], group=1)


def crop(b: GraphBuilder, x: Tensor, offset: int, size, name: str) -> Tensor:
    """Caffe's Crop layer: a window of ``size`` starting ``offset`` pixels in on both spatial axes."""
    h, w = size
    if x.shape[2] < offset + h or x.shape[3] < offset + w:
        raise ValueError(f"{name}: cannot crop {h}x{w} at offset {offset} from {x.shape[2]}x{x.shape[3]}")
    return b.slice(x, [offset, offset], [offset + h, offset + w], [2, 3], name=name)


def _fcn_vgg16(b: GraphBuilder, x: Tensor, num_classes: int, stride: int, fc_channels: int = 4096) -> Tensor:
    """FCN-32s/16s/8s: VGG16 + convolutionalized fc6/fc7, fused with pool4 (16s) and pool3 (8s)."""
    size = x.spatial
    pools = vgg16_features(b, x, first_padding=100, pool=max_pool_2x2_ceil)
    h = b.relu(b.conv(pools[4], fc_channels, 7, name="fc6"), name="relu6")
    h = b.dropout(h, 0.5, name="drop6")
    h = b.relu(b.conv(h, fc_channels, 1, name="fc7"), name="relu7")
    h = b.dropout(h, 0.5, name="drop7")
    h = b.conv(h, num_classes, 1, name="score_fr")
    if stride == 32:
        return crop(b, upsample_bilinear_init(b, h, 32, "upscore"), 19, size, "score")
    h = upsample_bilinear_init(b, h, 2, "upscore2")
    pool4 = b.conv(pools[3], num_classes, 1, name="score_pool4")
    h = b.add(h, crop(b, pool4, 5, h.spatial, "score_pool4c"), name="fuse_pool4")
    if stride == 16:
        return crop(b, upsample_bilinear_init(b, h, 16, "upscore16"), 27, size, "score")
    h = upsample_bilinear_init(b, h, 2, "upscore_pool4")
    pool3 = b.conv(pools[2], num_classes, 1, name="score_pool3")
    h = b.add(h, crop(b, pool3, 9, h.spatial, "score_pool3c"), name="fuse_pool3")
    return crop(b, upsample_bilinear_init(b, h, 8, "upscore8"), 31, size, "score")


_FCN_VGG = dict(family="fcn", source="paper: Long et al., Fully Convolutional Networks, CVPR 2015",
                input_size=(500, 500), test_input_size=(32, 32), num_classes=21)


@register("fcn32s", **_FCN_VGG)
def fcn32s(b: GraphBuilder, x: Tensor, num_classes: int = 21, fc_channels: int = 4096) -> Tensor:
    """FCN-32s (VGG16): single-stream, 32x upsampled prediction."""
    return _fcn_vgg16(b, x, num_classes, 32, fc_channels)


@register("fcn16s", **_FCN_VGG)
def fcn16s(b: GraphBuilder, x: Tensor, num_classes: int = 21, fc_channels: int = 4096) -> Tensor:
    """FCN-16s (VGG16): fc7 prediction fused with a pool4 skip, 16x upsampled."""
    return _fcn_vgg16(b, x, num_classes, 16, fc_channels)


@register("fcn8s", aliases=("fcn",), **_FCN_VGG)
def fcn8s(b: GraphBuilder, x: Tensor, num_classes: int = 21, fc_channels: int = 4096) -> Tensor:
    """FCN-8s (VGG16): fused with pool4 and pool3 skips, 8x upsampled."""
    return _fcn_vgg16(b, x, num_classes, 8, fc_channels)


# ---------------------------------------------------------------- torchvision


def fcn_head(b: GraphBuilder, x: Tensor, num_classes: int) -> Tensor:
    """torchvision's FCNHead: 3x3 conv to in/4 channels (no bias), BN, ReLU, Dropout(0.1), 1x1 conv."""
    h = b.conv(x, x.channels // 4, 3, padding=1, bias=False, name="0")
    h = b.relu(b.batch_norm(h, name="1"), name="2")
    h = b.dropout(h, 0.1, name="3")
    return b.conv(h, num_classes, 1, name="4")


def segmentation_outputs(b: GraphBuilder, x: Tensor, out: Tensor, aux: Tensor | None = None):
    """torchvision's _SimpleSegmentationModel tail: bilinear resize (align_corners=False) to the input.

    Returns the prediction alone, or ``{"out": ..., "aux": ...}`` when an auxiliary head is present.
    """
    out = b.resize(out, size=x.spatial, mode="bilinear", name="upsample_out")
    if aux is None:
        return out
    return {"out": out, "aux": b.resize(aux, size=x.spatial, mode="bilinear", name="upsample_aux")}


def dilated_resnet(b: GraphBuilder, x: Tensor, layers: list[int],
                   replace_stride_with_dilation=(False, True, True)) -> dict[str, Tensor]:
    """torchvision's segmentation backbone: ResNet (bottleneck) under ``backbone.``, output stride 8."""
    with b.scope("backbone"):
        return resnet_body(b, x, "bottleneck", layers, replace_stride_with_dilation=replace_stride_with_dilation)


def _fcn_resnet(b: GraphBuilder, x: Tensor, layers: list[int], num_classes: int, aux_loss: bool):
    feats = dilated_resnet(b, x, layers)
    with b.scope("classifier"):
        out = fcn_head(b, feats["layer4"], num_classes)
    aux = None
    if aux_loss:
        with b.scope("aux_classifier"):
            aux = fcn_head(b, feats["layer3"], num_classes)
    return segmentation_outputs(b, x, out, aux)


_FCN_TV = dict(family="fcn", source="torchvision", input_size=(520, 520), test_input_size=(32, 32), num_classes=21)


@register("fcn_resnet50", **_FCN_TV)
def fcn_resnet50(b: GraphBuilder, x: Tensor, num_classes: int = 21, aux_loss: bool = False):
    """FCN with a dilated ResNet-50 backbone (torchvision); ``aux_loss`` adds the layer3 head."""
    return _fcn_resnet(b, x, [3, 4, 6, 3], num_classes, aux_loss)


@register("fcn_resnet101", **_FCN_TV)
def fcn_resnet101(b: GraphBuilder, x: Tensor, num_classes: int = 21, aux_loss: bool = False):
    """FCN with a dilated ResNet-101 backbone (torchvision); ``aux_loss`` adds the layer3 head."""
    return _fcn_resnet(b, x, [3, 4, 23, 3], num_classes, aux_loss)
