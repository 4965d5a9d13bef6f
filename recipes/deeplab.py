"""DeepLab v1, v2, v3 and v3+: atrous convolution for semantic segmentation.

* ``deeplab_v1``: Chen et al., "Semantic Image Segmentation with Deep Convolutional Nets and Fully
  Connected CRFs", ICLR 2015 (arXiv 1412.7062), the DeepLab-LargeFOV model of Table 2 as released
  (Caffe ``DeepLab-LargeFOV/train.prototxt``): VGG16 whose pool4/pool5 keep stride 1 (3x3 pools, the
  first three 3x3/2 with Caffe's ceil mode), conv5 with dilation 2, a 3x3 average pool (pool5a),
  fc6 a 3x3 conv with dilation 12 to 1024 channels, fc7 1x1 to 1024 (ReLU + dropout each), fc8 to the
  classes, then bilinear up-sampling (x8) to the input size. The CRF post-processing is not a layer.
* ``deeplab_v2``: Chen et al., "DeepLab: Semantic Image Segmentation with Deep Convolutional Nets,
  Atrous Convolution, and Fully Connected CRFs", TPAMI 2017 (arXiv 1606.00915), Sec. 3.2 / Fig. 7
  "ASPP-L" on ResNet-101: four parallel 3x3 convolutions with rates 6, 12, 18, 24 straight to the
  classes, summed, on a ResNet-101 with atrous layer3/layer4 (output stride 8). The backbone is
  torchvision's (stride on the 3x3 conv, "V1.5"); the paper's Caffe ResNet strides the first 1x1.
* ``deeplabv3_resnet50/101``, ``deeplabv3_mobilenet_v3_large``: torchvision's
  ``models/segmentation/deeplabv3.py`` (Chen et al., "Rethinking Atrous Convolution", arXiv
  1706.05587): ASPP with a 1x1 branch, rates 12/24/36 and image pooling (256 channels + BN + ReLU
  each), projected to 256, a 3x3 conv, a 1x1 classifier; optional auxiliary FCNHead (``aux_loss``).
* ``deeplab_v3plus``: Chen et al., "Encoder-Decoder with Atrous Separable Convolution", ECCV 2018
  (arXiv 1802.02611), Fig. 2 and 4: DeepLabv3's ASPP (rates 6/12/18 at output stride 16) as encoder;
  decoder: low-level features (stride 4) reduced to 48 channels, concatenated with the x4 up-sampled
  encoder output, two 3x3 convs (256), a 1x1 classifier, x4 up-sampling. ``separable=True`` makes
  the ASPP and decoder 3x3 convs atrous *separable* (depthwise 3x3 + BN + ReLU, pointwise 1x1 + BN +
  ReLU, as the authors' code). ``backbone``: ``"xception"`` = the paper's modified aligned
  Xception-65 (below) or ``"resnet50"`` (torchvision ResNet-50, low-level = layer1).

Modified aligned Xception-65 (paper Sec. 3.2, Fig. 4; the authors' ``xception_65``): entry flow
conv 3x3/2 (32) and 3x3 (64), then three blocks of three separable convs (128, 256, 728 wide, the
last conv of each with stride 2 instead of max pooling, 1x1/2 conv shortcut); middle flow 16 blocks
of three 728-wide separable convs with identity shortcuts; exit flow a (728, 1024, 1024) block with
conv shortcut and a (1536, 1536, 2048) block without shortcut. A separable conv is ReLU, depthwise
3x3, BN, pointwise 1x1, BN (the exit flow's last block instead puts ReLU after each BN). Beyond the
chosen output stride, strides become 1 and later units use dilation (the authors' rule).
"""

from __future__ import annotations

from graphgen.builder import GraphBuilder, Tensor
from graphgen.registry import register
from recipes.fcn import dilated_resnet, fcn_head, segmentation_outputs, vgg16_features
from recipes.mobilenet import mobilenet_v3_features

# ------------------------------------------------------------------------- DeepLab v1


def _largefov_pool(b: GraphBuilder, x: Tensor, stage: int, name: str) -> Tensor:
    """3x3 max pools, stride 2 for pool1-3 and stride 1 for pool4-5 (output stride 8), Caffe's ceil mode."""
    return b.max_pool(x, 3, 2 if stage < 3 else 1, padding=1, ceil_mode=True, name=name)


@register("deeplab_v1", aliases=("deeplab_largefov",), family="deeplab",
          source="paper: Chen et al., DeepLab (LargeFOV), ICLR 2015", input_size=(321, 321),
          test_input_size=(32, 32), num_classes=21)
def deeplab_v1(b: GraphBuilder, x: Tensor, num_classes: int = 21) -> Tensor:
    """DeepLab-LargeFOV: atrous VGG16 (output stride 8), fc6 3x3 rate 12, bilinear x8."""
    h = vgg16_features(b, x, dilations=(1, 1, 1, 1, 2), pool=_largefov_pool)[-1]
    h = b.avg_pool(h, 3, 1, padding=1, name="pool5a")
    h = b.relu(b.conv(h, 1024, 3, padding=12, dilation=12, name="fc6"), name="relu6")
    h = b.dropout(h, 0.5, name="drop6")
    h = b.relu(b.conv(h, 1024, 1, name="fc7"), name="relu7")
    h = b.dropout(h, 0.5, name="drop7")
    h = b.conv(h, num_classes, 1, name="fc8")
    # Caffe's Interp layer maps corner to corner
    return b.resize(h, size=x.spatial, mode="bilinear", align_corners=True, name="upsample")


# ------------------------------------------------------------------------- DeepLab v2

#: ASPP-L atrous rates (TPAMI 2017, Fig. 7)
DEEPLAB_V2_RATES = (6, 12, 18, 24)


@register("deeplab_v2", family="deeplab", source="paper: Chen et al., DeepLab v2, TPAMI 2017",
          input_size=(321, 321), test_input_size=(32, 32), num_classes=21)
def deeplab_v2(b: GraphBuilder, x: Tensor, num_classes: int = 21, rates=DEEPLAB_V2_RATES) -> Tensor:
    """DeepLab v2: dilated ResNet-101 (output stride 8) + ASPP-L (rates 6/12/18/24, summed)."""
    h = dilated_resnet(b, x, [3, 4, 23, 3])["layer4"]
    branches = []
    with b.scope("aspp"):
        for i, rate in enumerate(rates):
            branches.append(b.conv(h, num_classes, 3, padding=rate, dilation=rate, name=str(i)))
    out = branches[0]
    for i, branch in enumerate(branches[1:], 1):
        out = b.add(out, branch, name=f"aspp_sum{i}")
    return b.resize(out, size=x.spatial, mode="bilinear", align_corners=True, name="upsample")


# ------------------------------------------------------------------------- DeepLabv3 (torchvision)


def conv_bn_relu(b: GraphBuilder, x: Tensor, channels: int, kernel_size: int, dilation: int = 1,
                 names=("0", "1", "2")) -> Tensor:
    """Bias-free conv (same padding), BatchNorm, ReLU, named like a torch Sequential."""
    x = b.conv(x, channels, kernel_size, padding=dilation * (kernel_size // 2), dilation=dilation, bias=False,
               name=names[0])
    return b.relu(b.batch_norm(x, name=names[1]), name=names[2])


def separable_conv_bn_relu(b: GraphBuilder, x: Tensor, channels: int, dilation: int = 1) -> Tensor:
    """DeepLabv3+'s atrous separable conv: depthwise 3x3 (rate) + BN + ReLU, pointwise 1x1 + BN + ReLU."""
    x = b.conv(x, x.channels, 3, padding=dilation, dilation=dilation, groups=x.channels, bias=False,
               name="depthwise")
    x = b.relu(b.batch_norm(x, name="depthwise_bn"), name="depthwise_relu")
    x = b.conv(x, channels, 1, bias=False, name="pointwise")
    return b.relu(b.batch_norm(x, name="pointwise_bn"), name="pointwise_relu")


def aspp_pooling(b: GraphBuilder, x: Tensor, channels: int) -> Tensor:
    """Image-level features: global average pool, 1x1 conv + BN + ReLU, bilinear back to x's size."""
    p = b.global_avg_pool(x, name="0")
    p = conv_bn_relu(b, p, channels, 1, names=("1", "2", "3"))
    return b.resize(p, size=x.spatial, mode="bilinear", name="upsample")


def aspp(b: GraphBuilder, x: Tensor, rates, channels: int = 256, separable: bool = False,
         dropout: float = 0.5) -> Tensor:
    """torchvision's ASPP: ``convs.0`` 1x1, ``convs.1..`` 3x3 atrous, ``convs.N`` image pooling,
    concatenated and ``project``-ed to ``channels`` (1x1 + BN + ReLU + dropout)."""
    branches = []
    with b.scope("convs"):
        with b.scope(0):
            branches.append(conv_bn_relu(b, x, channels, 1))
        for i, rate in enumerate(rates, 1):
            with b.scope(i):
                branches.append(separable_conv_bn_relu(b, x, channels, rate) if separable
                                else conv_bn_relu(b, x, channels, 3, rate))
        with b.scope(len(rates) + 1):
            branches.append(aspp_pooling(b, x, channels))
    h = b.concat(branches, axis=1, name="concat")
    with b.scope("project"):
        h = conv_bn_relu(b, h, channels, 1)
        return b.dropout(h, dropout, name="3")


def deeplab_head(b: GraphBuilder, x: Tensor, num_classes: int, rates=(12, 24, 36)) -> Tensor:
    """torchvision's DeepLabHead: ASPP (``0``), 3x3 conv (``1``) + BN (``2``) + ReLU, 1x1 classifier (``4``)."""
    with b.scope(0):
        h = aspp(b, x, rates)
    h = conv_bn_relu(b, h, 256, 3, names=("1", "2", "3"))
    return b.conv(h, num_classes, 1, name="4")


def _deeplabv3(b: GraphBuilder, x: Tensor, out: Tensor, aux_in: Tensor | None, num_classes: int):
    with b.scope("classifier"):
        out = deeplab_head(b, out, num_classes)
    aux = None
    if aux_in is not None:
        with b.scope("aux_classifier"):
            aux = fcn_head(b, aux_in, num_classes)
    return segmentation_outputs(b, x, out, aux)


def _deeplabv3_resnet(b: GraphBuilder, x: Tensor, layers: list[int], num_classes: int, aux_loss: bool):
    feats = dilated_resnet(b, x, layers)
    return _deeplabv3(b, x, feats["layer4"], feats["layer3"] if aux_loss else None, num_classes)


_DEEPLABV3_TV = dict(family="deeplab", source="torchvision", input_size=(520, 520), test_input_size=(32, 32),
                     num_classes=21)


@register("deeplabv3_resnet50", aliases=("deeplab_v3",), **_DEEPLABV3_TV)
def deeplabv3_resnet50(b: GraphBuilder, x: Tensor, num_classes: int = 21, aux_loss: bool = False):
    """DeepLabV3, dilated ResNet-50 (output stride 8) + ASPP (torchvision)."""
    return _deeplabv3_resnet(b, x, [3, 4, 6, 3], num_classes, aux_loss)


@register("deeplabv3_resnet101", **_DEEPLABV3_TV)
def deeplabv3_resnet101(b: GraphBuilder, x: Tensor, num_classes: int = 21, aux_loss: bool = False):
    """DeepLabV3, dilated ResNet-101 (output stride 8) + ASPP (torchvision)."""
    return _deeplabv3_resnet(b, x, [3, 4, 23, 3], num_classes, aux_loss)


#: torchvision's MobileNetV3-Large stage ends (``_is_cn`` blocks): C2 (stride 8, 40 channels) is
#: features[4]; the last layer features[16] (960 channels) is C5 at output stride 16 when dilated.
MOBILENET_V3_LARGE_C2 = 4


def mobilenet_v3_large_backbone(b: GraphBuilder, x: Tensor) -> tuple[Tensor, Tensor]:
    """torchvision's dilated MobileNetV3-Large ``features`` under ``backbone.``: (C2, C5)."""
    with b.scope("backbone"):
        feats = mobilenet_v3_features(b, x, arch="large", dilated=True)
    return feats[MOBILENET_V3_LARGE_C2], feats[-1]


@register("deeplabv3_mobilenet_v3_large", family="deeplab", source="torchvision", input_size=(520, 520),
          test_input_size=(32, 32), num_classes=21)
def deeplabv3_mobilenet_v3_large(b: GraphBuilder, x: Tensor, num_classes: int = 21, aux_loss: bool = False):
    """DeepLabV3 on a dilated MobileNetV3-Large (output stride 16) (torchvision)."""
    c2, c5 = mobilenet_v3_large_backbone(b, x)
    return _deeplabv3(b, x, c5, c2 if aux_loss else None, num_classes)


# ------------------------------------------------------------------------- aligned Xception-65

#: (name, separable conv widths, units, stride, shortcut, ReLU inside the separable convs)
XCEPTION_65 = (
    ("entry_flow", (128, 128, 128), 1, 2, "conv", False),
    ("entry_flow", (256, 256, 256), 1, 2, "conv", False),
    ("entry_flow", (728, 728, 728), 1, 2, "conv", False),
    ("middle_flow", (728, 728, 728), 16, 1, "sum", False),
    ("exit_flow", (728, 1024, 1024), 1, 2, "conv", False),
    ("exit_flow", (1536, 1536, 2048), 1, 1, "none", True),
)


def xception_separable(b: GraphBuilder, x: Tensor, channels: int, stride: int, dilation: int,
                       relu_inside: bool) -> Tensor:
    """[ReLU], depthwise 3x3 (stride, rate), BN, [ReLU], pointwise 1x1, BN, [ReLU]."""
    if not relu_inside:
        x = b.relu(x, name="relu")
    x = b.conv(x, x.channels, 3, stride=stride, padding=dilation, dilation=dilation, groups=x.channels,
               bias=False, name="depthwise")
    x = b.batch_norm(x, name="depthwise_bn")
    if relu_inside:
        x = b.relu(x, name="depthwise_relu")
    x = b.batch_norm(b.conv(x, channels, 1, bias=False, name="pointwise"), name="pointwise_bn")
    if relu_inside:
        x = b.relu(x, name="pointwise_relu")
    return x


def xception_block(b: GraphBuilder, x: Tensor, widths, stride: int, dilation: int, shortcut: str,
                   relu_inside: bool) -> tuple[Tensor, Tensor]:
    """Three separable convs (the last one strided) plus a shortcut; also returns the 2nd conv's output."""
    h, second = x, None
    for i, width in enumerate(widths):
        with b.scope(f"sepconv{i + 1}"):
            h = xception_separable(b, h, width, stride if i == len(widths) - 1 else 1, dilation, relu_inside)
        if i == 1:
            second = h
    if shortcut == "conv":
        s = b.conv(x, widths[-1], 1, stride=stride, bias=False, name="shortcut")
        h = b.add(h, b.batch_norm(s, name="shortcut_bn"), name="add")
    elif shortcut == "sum":
        h = b.add(h, x, name="add")
    return h, second


def aligned_xception(b: GraphBuilder, x: Tensor, output_stride: int = 16) -> tuple[Tensor, Tensor]:
    """Modified aligned Xception-65; returns (encoder features, low-level features at stride 4)."""
    x = b.conv(x, 32, 3, stride=2, padding=1, bias=False, name="conv1")
    x = b.relu(b.batch_norm(x, name="bn1"), name="relu1")
    x = b.relu(b.batch_norm(b.conv(x, 64, 3, padding=1, bias=False, name="conv2"), name="bn2"), name="relu2")
    current_stride, dilation = 2, 1
    low_level = None
    counters: dict[str, int] = {}
    for flow, widths, units, stride, shortcut, relu_inside in XCEPTION_65:
        for _ in range(units):
            index = counters.get(flow, 0)
            counters[flow] = index + 1
            unit_stride, unit_dilation = stride, dilation
            if current_stride == output_stride:  # keep the resolution: dilate the following units instead
                unit_stride = 1
                dilation *= stride
            else:
                current_stride *= stride
            with b.scope(flow, index):
                x, second = xception_block(b, x, widths, unit_stride, unit_dilation, shortcut, relu_inside)
            if flow == "entry_flow" and index == 1:
                low_level = second  # stride 4, 256 channels, before the strided third conv
    return x, low_level


# ------------------------------------------------------------------------- DeepLabv3+


@register("deeplab_v3plus", aliases=("deeplabv3plus",), family="deeplab",
          source="paper: Chen et al., DeepLabv3+, ECCV 2018", input_size=(513, 513), test_input_size=(32, 32),
          num_classes=21)
def deeplab_v3plus(b: GraphBuilder, x: Tensor, num_classes: int = 21, backbone: str = "xception",
                   output_stride: int = 16, separable: bool = True) -> Tensor:
    """DeepLabv3+: ASPP encoder + decoder refining with stride-4 low-level features (Xception-65 or ResNet-50)."""
    if output_stride not in (8, 16):
        raise ValueError(f"output_stride must be 8 or 16, got {output_stride}")
    if backbone == "xception":
        with b.scope("backbone"):
            high, low = aligned_xception(b, x, output_stride)
    elif backbone == "resnet50":
        feats = dilated_resnet(b, x, [3, 4, 6, 3], (False, output_stride == 8, True))
        high, low = feats["layer4"], feats["layer1"]
    else:
        raise ValueError(f"backbone must be 'xception' or 'resnet50', got {backbone!r}")
    rates = (6, 12, 18) if output_stride == 16 else (12, 24, 36)
    with b.scope("aspp"):
        h = aspp(b, high, rates, separable=separable, dropout=0.1)
    with b.scope("decoder"):
        with b.scope("low_level"):
            low = conv_bn_relu(b, low, 48, 1)
        h = b.resize(h, size=low.spatial, mode="bilinear", name="upsample")
        h = b.concat([h, low], axis=1, name="concat")
        for i in range(2):
            with b.scope("fuse", i):
                h = separable_conv_bn_relu(b, h, 256) if separable else conv_bn_relu(b, h, 256, 3)
    h = b.conv(h, num_classes, 1, name="classifier")
    return b.resize(h, size=x.spatial, mode="bilinear", name="upsample")
