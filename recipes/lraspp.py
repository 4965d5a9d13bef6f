"""Lite R-ASPP (Howard et al., "Searching for MobileNetV3", ICCV 2019, arXiv 1905.02244), Sec. 6.4 / Fig. 10,
as torchvision defines it (``models/segmentation/lraspp.py``).

On a dilated MobileNetV3-Large (the last stage at output stride 16 with dilation 2):

* high branch on C5 (features[16], 960 channels): a 1x1 conv to 128 + BN + ReLU, multiplied by a
  squeeze-excite-like gate (global average pool, 1x1 conv to 128, sigmoid), bilinearly up-sampled to
  the stride-8 map, then a 1x1 conv to the classes;
* low branch on C2 (features[4], 40 channels, stride 8): a 1x1 conv to the classes;
* the two are added and bilinearly resized to the input.
"""

from __future__ import annotations

from graphgen.builder import GraphBuilder, Tensor
from graphgen.registry import register
from recipes.deeplab import mobilenet_v3_large_backbone


def lraspp_head(b: GraphBuilder, low: Tensor, high: Tensor, num_classes: int, inter_channels: int = 128) -> Tensor:
    """torchvision's LRASPPHead: ``cbr`` (1x1 conv, BN, ReLU) gated by ``scale``, plus ``low_classifier``."""
    with b.scope("cbr"):
        h = b.conv(high, inter_channels, 1, bias=False, name="0")
        h = b.relu(b.batch_norm(h, name="1"), name="2")
    with b.scope("scale"):
        s = b.global_avg_pool(high, name="0")
        s = b.sigmoid(b.conv(s, inter_channels, 1, bias=False, name="1"), name="2")
    h = b.mul(h, s, name="gate")
    h = b.resize(h, size=low.spatial, mode="bilinear", name="upsample")
    return b.add(b.conv(low, num_classes, 1, name="low_classifier"),
                 b.conv(h, num_classes, 1, name="high_classifier"), name="add")


@register("lraspp_mobilenet_v3_large", aliases=("lraspp",), family="lraspp", source="torchvision",
          input_size=(520, 520), test_input_size=(32, 32), num_classes=21)
def lraspp_mobilenet_v3_large(b: GraphBuilder, x: Tensor, num_classes: int = 21, inter_channels: int = 128) -> Tensor:
    """LR-ASPP on a dilated MobileNetV3-Large (torchvision)."""
    low, high = mobilenet_v3_large_backbone(b, x)
    with b.scope("classifier"):
        out = lraspp_head(b, low, high, num_classes, inter_channels)
    return b.resize(out, size=x.spatial, mode="bilinear", name="upsample_out")
