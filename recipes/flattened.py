"""Flattened convolutional network (Jin, Dundar, Culurciello, "Flattened Convolutional Neural
Networks for Feedforward Acceleration", arXiv 1412.5474, 2014; seed 004
section 9 "flattened convolutions").

A flattened layer replaces one C x k x k 3-D conv with F filters by 1-D convolutions, as in
the paper's Fig. 2: a lateral 1x1 conv across channels (C -> F), then a vertical k x 1 and a
horizontal 1 x k conv, each on one channel (depthwise). The paper cascades l = 2 such
L-V-H stages per layer (chosen by cross-validation), adds a bias after every 1-D conv and
puts no non-linearity inside the layer; the ReLU comes after it. V and H keep the spatial
size (padding k // 2; the paper's "full mode" serves the same purpose for its baseline).

The network around it is ours, not a table of the paper: a small CIFAR-style classifier
for 32x32 inputs and 10 classes. A full 3x3 conv first (three input channels leave little
to flatten), then flattened layers in three resolutions (64, 128, 256 filters) separated by
2x2 max pools, global average pooling and a linear classifier::

    conv3x3(64) | flat(64) | pool | flat(128) flat(128) | pool | flat(256) flat(256) | pool | gap | fc

Names: ``features.<i>`` per entry of :data:`FLATTENED_CIFAR`; a flattened layer holds
``lateral<s>``, ``vertical<s>``, ``horizontal<s>`` for L-V-H stage s; the classifier is ``fc``.
"""

from graphgen.builder import GraphBuilder, Tensor
from graphgen.registry import register

#: ("conv", filters) full 3-D conv + ReLU, ("flat", filters) flattened layer + ReLU, ("pool",) 2x2 max pool.
FLATTENED_CIFAR = (
    ("conv", 64), ("flat", 64), ("pool",),
    ("flat", 128), ("flat", 128), ("pool",),
    ("flat", 256), ("flat", 256), ("pool",),
)


def flattened_conv(b: GraphBuilder, x: Tensor, filters: int, kernel_size: int = 3, stages: int = 2) -> Tensor:
    """``stages`` x (lateral 1x1 -> vertical k x 1 -> horizontal 1 x k), biases, no activation inside."""
    pad = kernel_size // 2
    for s in range(stages):
        x = b.conv(x, filters, 1, name=f"lateral{s}")
        x = b.conv(x, filters, (kernel_size, 1), padding=(pad, 0), groups=filters, name=f"vertical{s}")
        x = b.conv(x, filters, (1, kernel_size), padding=(0, pad), groups=filters, name=f"horizontal{s}")
    return x


@register("flattened", family="flattened", source="paper: Jin et al. 2014 (Flattened CNNs) Fig. 2",
          input_size=(32, 32), test_input_size=(8, 8), num_classes=10)
def flattened(b: GraphBuilder, x: Tensor, num_classes: int = 10, kernel_size: int = 3, lvh_stages: int = 2) -> Tensor:
    """CIFAR-style classifier built from flattened (lateral-vertical-horizontal 1-D) conv layers."""
    with b.scope("features"):
        for i, layer in enumerate(FLATTENED_CIFAR):
            with b.scope(i):
                if layer[0] == "conv":
                    x = b.relu(b.conv(x, layer[1], kernel_size, padding=kernel_size // 2, name=""), name="relu")
                elif layer[0] == "flat":
                    x = b.relu(flattened_conv(b, x, layer[1], kernel_size, lvh_stages), name="relu")
                else:
                    x = b.max_pool(x, 2, 2, name="maxpool")
    x = b.flatten(b.global_avg_pool(x, name="avgpool"), 1, name="flatten")
    return b.linear(x, num_classes, name="fc")
