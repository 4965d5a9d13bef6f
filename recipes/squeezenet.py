"""SqueezeNet (Iandola et al., 2016, arXiv 1602.07360), as torchvision defines it.

``squeezenet1_0`` follows the paper's Table 1; ``squeezenet1_1`` is the v1.1 of the
authors' repository (3x3 first conv, earlier pooling: 2.4x less compute, same accuracy).
Layer indices equal torchvision's ``nn.Sequential`` positions, so initializer names
are its state_dict keys (``features.3.squeeze.weight``).
"""

from graphgen.builder import GraphBuilder, Tensor
from graphgen.registry import register

# Each stack is the `features` Sequential as data: ("conv", out, k, stride), ("relu",),
# ("pool",) = MaxPool 3/2 ceil_mode, ("fire", squeeze, expand1x1, expand3x3).
SQUEEZENET_1_0 = [
    ("conv", 96, 7, 2), ("relu",), ("pool",),
    ("fire", 16, 64, 64), ("fire", 16, 64, 64), ("fire", 32, 128, 128), ("pool",),
    ("fire", 32, 128, 128), ("fire", 48, 192, 192), ("fire", 48, 192, 192), ("fire", 64, 256, 256), ("pool",),
    ("fire", 64, 256, 256),
]
SQUEEZENET_1_1 = [
    ("conv", 64, 3, 2), ("relu",), ("pool",),
    ("fire", 16, 64, 64), ("fire", 16, 64, 64), ("pool",),
    ("fire", 32, 128, 128), ("fire", 32, 128, 128), ("pool",),
    ("fire", 48, 192, 192), ("fire", 48, 192, 192), ("fire", 64, 256, 256), ("fire", 64, 256, 256),
]


def fire(b: GraphBuilder, x: Tensor, squeeze: int, expand1x1: int, expand3x3: int) -> Tensor:
    """Fire module: a 1x1 squeeze, then 1x1 and 3x3 expands concatenated on channels."""
    s = b.relu(b.conv(x, squeeze, 1, name="squeeze"), name="squeeze_activation")
    e1 = b.relu(b.conv(s, expand1x1, 1, name="expand1x1"), name="expand1x1_activation")
    e3 = b.relu(b.conv(s, expand3x3, 3, padding=1, name="expand3x3"), name="expand3x3_activation")
    return b.concat([e1, e3], axis=1, name="concat")


def features(b: GraphBuilder, x: Tensor, stack, fire_block=fire) -> list[Tensor]:
    """Run a `features` stack; returns every layer's output (bypass variants need them)."""
    outs = []
    with b.scope("features"):
        for i, layer in enumerate(stack):
            kind = layer[0]
            with b.scope(i):
                if kind == "conv":
                    x = b.conv(x, layer[1], layer[2], stride=layer[3], name="")
                elif kind == "relu":
                    x = b.relu(x, name="relu")
                elif kind == "pool":
                    x = b.max_pool(x, 3, 2, ceil_mode=True, name="maxpool")
                else:
                    x = fire_block(b, x, *layer[1:])
            outs.append(x)
    return outs


def classifier(b: GraphBuilder, x: Tensor, num_classes: int, dropout: float = 0.5) -> Tensor:
    """Dropout, a 1x1 conv to the classes (normal init, std 0.01), ReLU, global average pool."""
    with b.scope("classifier"):
        x = b.dropout(x, dropout, name="0")
        x = b.conv(x, num_classes, 1, name="1", weight_init="normal", weight_std=0.01)
        x = b.relu(x, name="2")
        x = b.global_avg_pool(x, name="3")
    return b.flatten(x, 1, name="flatten")


@register("squeezenet1_0", family="squeezenet", test_input_size=(64, 64))
def squeezenet1_0(b: GraphBuilder, x: Tensor, num_classes: int = 1000, dropout: float = 0.5) -> Tensor:
    """SqueezeNet 1.0: AlexNet-level accuracy with 50x fewer parameters (paper Table 1)."""
    return classifier(b, features(b, x, SQUEEZENET_1_0)[-1], num_classes, dropout)


@register("squeezenet1_1", family="squeezenet", test_input_size=(64, 64), aliases=("squeezenet",))
def squeezenet1_1(b: GraphBuilder, x: Tensor, num_classes: int = 1000, dropout: float = 0.5) -> Tensor:
    """SqueezeNet 1.1: 2.4x less computation than 1.0 at the same accuracy."""
    return classifier(b, features(b, x, SQUEEZENET_1_1)[-1], num_classes, dropout)
