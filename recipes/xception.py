"""Xception (Chollet, "Xception: Deep Learning with Depthwise Separable Convolutions",
CVPR 2017, arXiv 1610.02357), Fig. 5: entry flow, middle flow (8 repeats), exit flow.

Every SeparableConv is a depthwise 3x3 followed by a pointwise 1x1, both without bias and
with no non-linearity in between (the paper found one hurts), then BatchNorm.
Strided blocks add a 1x1 stride-2 conv + BN shortcut; identity blocks (middle flow) add
their input. 22,855,952 parameters (Table 3) with a 1000-way classifier.

Layout and state_dict names follow the PyTorch port of the Keras model
(Cadene's ``pretrainedmodels`` / timm ``legacy_xception``): ``conv1``/``bn1``,
``conv2``/``bn2``, ``block1`` ... ``block12`` each with ``skip``/``skipbn`` and a
``rep`` Sequential whose SeparableConv2d modules hold ``conv1`` (depthwise) and
``pointwise``, then ``conv3``/``bn3``, ``conv4``/``bn4`` and ``fc``. Padding follows the
paper's Keras/TensorFlow "same" rule: the 3x3 stride-2 max pools pad only the bottom/right
row on even inputs (the PyTorch port pads both sides, which changes values on even sizes
such as 74 at the default 299 input). The output is logits (Keras appends a softmax).
"""

from graphgen.builder import GraphBuilder, Tensor
from graphgen.registry import register

#: (in, out, separable convs, stride, starts with ReLU, grows channels in the first conv)
#: for block1..block12: entry flow blocks 1-3, middle flow 4-11, exit flow block 12.
XCEPTION_BLOCKS = (
    [(64, 128, 2, 2, False, True), (128, 256, 2, 2, True, True), (256, 728, 2, 2, True, True)]
    + [(728, 728, 3, 1, True, True)] * 8
    + [(728, 1024, 2, 2, True, False)]
)


def tf_same_pads(size_hw, kernel: int, stride: int) -> tuple[int, int, int, int]:
    """TensorFlow "SAME" padding (top, left, bottom, right): the odd pixel goes bottom/right."""
    pads = []
    for n in size_hw:
        out = -(-n // stride)
        pads.append(max((out - 1) * stride + kernel - n, 0))
    return (pads[0] // 2, pads[1] // 2, pads[0] - pads[0] // 2, pads[1] - pads[1] // 2)


def separable_conv(b: GraphBuilder, x: Tensor, out_channels: int, name: str) -> Tensor:
    """Depthwise 3x3 then pointwise 1x1, no bias (SeparableConv2d: ``conv1`` + ``pointwise``)."""
    with b.scope(name):
        x = b.conv(x, x.channels, 3, 1, 1, groups=x.channels, bias=False, name="conv1")
        return b.conv(x, out_channels, 1, bias=False, name="pointwise")


def block(b: GraphBuilder, x: Tensor, in_channels: int, out_channels: int, reps: int, stride: int,
          start_with_relu: bool, grow_first: bool) -> Tensor:
    """Xception module: ``reps`` x (ReLU, SeparableConv, BN), optional max pool, plus a shortcut."""
    widths = [out_channels] * reps if grow_first else [in_channels] * (reps - 1) + [out_channels]
    y = x
    index = 0  # position in the `rep` Sequential (ReLU modules take a slot too)
    for i, width in enumerate(widths):
        if i > 0 or start_with_relu:
            y = b.relu(y, name=f"rep.{index}")
            index += 1
        y = separable_conv(b, y, width, f"rep.{index}")
        y = b.batch_norm(y, name=f"rep.{index + 1}")
        index += 2
    if stride != 1:
        y = b.max_pool(y, 3, stride, tf_same_pads(y.spatial, 3, stride), name=f"rep.{index}")
    if out_channels != in_channels or stride != 1:
        shortcut = b.conv(x, out_channels, 1, stride, bias=False, name="skip")
        shortcut = b.batch_norm(shortcut, name="skipbn")
    else:
        shortcut = x
    return b.add(y, shortcut, name="add")


@register("xception", family="xception", source="paper: Chollet 2017 (Xception) Fig. 5",
          input_size=(299, 299), test_input_size=(64, 64))
def xception(b: GraphBuilder, x: Tensor, num_classes: int = 1000) -> Tensor:
    """Xception: Inception modules replaced by depthwise separable convolutions (paper Fig. 5)."""
    # entry flow stem: two unpadded ("valid") 3x3 convs
    x = b.relu(b.batch_norm(b.conv(x, 32, 3, 2, 0, bias=False, name="conv1"), name="bn1"), name="relu1")
    x = b.relu(b.batch_norm(b.conv(x, 64, 3, 1, 0, bias=False, name="conv2"), name="bn2"), name="relu2")
    for i, cfg in enumerate(XCEPTION_BLOCKS, start=1):
        with b.scope(f"block{i}"):
            x = block(b, x, *cfg)
    # exit flow tail
    x = b.relu(b.batch_norm(separable_conv(b, x, 1536, "conv3"), name="bn3"), name="relu3")
    x = b.relu(b.batch_norm(separable_conv(b, x, 2048, "conv4"), name="bn4"), name="relu4")
    x = b.flatten(b.global_avg_pool(x, name="global_pool"), 1, name="flatten")
    return b.linear(x, num_classes, name="fc")
