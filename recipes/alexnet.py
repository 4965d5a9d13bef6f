"""AlexNet (Krizhevsky, Sutskever and Hinton, 2012, "ImageNet Classification with Deep
Convolutional Neural Networks"), as torchvision defines it.

torchvision follows the single-GPU "one weird trick" variant (Krizhevsky 2014, arXiv
1404.5997) rather than the paper's two-tower Figure 2: 64-192-384-256-256 filters, no
local response normalization, no grouped convolutions. Layer indices equal
torchvision's ``nn.Sequential`` positions, so initializer names are its state_dict keys
(``features.0.weight``, ``classifier.6.bias``).
"""

from graphgen.builder import GraphBuilder, Tensor
from graphgen.registry import register

# The `features` Sequential as data: ("conv", out_channels, kernel, stride, padding),
# ("relu",), ("pool",) = MaxPool 3/2 (floor mode, as torchvision).
ALEXNET_FEATURES = [
    ("conv", 64, 11, 4, 2), ("relu",), ("pool",),
    ("conv", 192, 5, 1, 2), ("relu",), ("pool",),
    ("conv", 384, 3, 1, 1), ("relu",),
    ("conv", 256, 3, 1, 1), ("relu",),
    ("conv", 256, 3, 1, 1), ("relu",), ("pool",),
]


def features(b: GraphBuilder, x: Tensor, stack=ALEXNET_FEATURES) -> Tensor:
    with b.scope("features"):
        for i, layer in enumerate(stack):
            kind = layer[0]
            with b.scope(i):
                if kind == "conv":
                    _, out, k, stride, pad = layer
                    x = b.conv(x, out, k, stride=stride, padding=pad, name="")
                elif kind == "relu":
                    x = b.relu(x, name="relu")
                else:
                    x = b.max_pool(x, 3, 2, name="maxpool")
    return x


def classifier(b: GraphBuilder, x: Tensor, num_classes: int, dropout: float) -> Tensor:
    """Dropout-Linear-ReLU twice (4096 wide), then the class Linear; indices as torchvision."""
    with b.scope("classifier"):
        x = b.dropout(x, dropout, name="0")
        x = b.relu(b.linear(x, 4096, name="1"), name="2")
        x = b.dropout(x, dropout, name="3")
        x = b.relu(b.linear(x, 4096, name="4"), name="5")
        return b.linear(x, num_classes, name="6")


@register("alexnet", family="alexnet", test_input_size=(63, 63))
def alexnet(b: GraphBuilder, x: Tensor, num_classes: int = 1000, dropout: float = 0.5) -> Tensor:
    """AlexNet: five convolutions and three fully connected layers (61.1M parameters)."""
    x = features(b, x)
    # AdaptiveAvgPool2d((6, 6)) makes the classifier independent of the input size;
    # at 224x224 the map is already 6x6 and the pool is the identity.
    x = b.adaptive_avg_pool(x, (6, 6), name="avgpool")
    x = b.flatten(x, 1, name="flatten")
    return classifier(b, x, num_classes, dropout)
