"""VGG (Simonyan and Zisserman, 2014, "Very Deep Convolutional Networks for Large-Scale
Image Recognition", arXiv 1409.1556), as torchvision defines it.

The configurations are the columns of the paper's Table 1: A (11 weight layers),
B (13), D (16) and E (19); every convolution is 3x3 with padding 1 and every pooling
a 2x2/2 max pool. The ``_bn`` variants (not in the paper) put a BatchNorm after each
convolution. torchvision adds an AdaptiveAvgPool2d((7, 7)) before the classifier so
any input of at least 32x32 works; at 224x224 it is the identity. Layer indices equal
torchvision's ``nn.Sequential`` positions (a BN shifts them), so initializer names are
its state_dict keys (``features.0.weight``, ``features.1.running_mean``,
``classifier.6.bias``).
"""

from graphgen.builder import GraphBuilder, Tensor
from graphgen.registry import register

# Table 1 columns: an int is a 3x3 conv with that many filters, "M" a 2x2/2 max pool.
VGG_CONFIGS = {
    "A": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "B": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "D": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "E": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
          512, 512, 512, 512, "M"],
}


def make_layers(config, batch_norm: bool) -> list[tuple]:
    """Expand a Table 1 column into the flat `features` Sequential, one entry per module."""
    layers = []
    for v in config:
        if v == "M":
            layers.append(("pool",))
        else:
            layers += [("conv", v)] + ([("bn",)] if batch_norm else []) + [("relu",)]
    return layers


def features(b: GraphBuilder, x: Tensor, layers) -> Tensor:
    with b.scope("features"):
        for i, layer in enumerate(layers):
            kind = layer[0]
            with b.scope(i):
                if kind == "conv":
                    x = b.conv(x, layer[1], 3, padding=1, name="")
                elif kind == "bn":
                    x = b.batch_norm(x, name="")
                elif kind == "relu":
                    x = b.relu(x, name="relu")
                else:
                    x = b.max_pool(x, 2, 2, name="maxpool")
    return x


def classifier(b: GraphBuilder, x: Tensor, num_classes: int, dropout: float) -> Tensor:
    """Linear-ReLU-Dropout twice (4096 wide), then the class Linear; indices as torchvision."""
    with b.scope("classifier"):
        x = b.relu(b.linear(x, 4096, name="0"), name="1")
        x = b.dropout(x, dropout, name="2")
        x = b.relu(b.linear(x, 4096, name="3"), name="4")
        x = b.dropout(x, dropout, name="5")
        return b.linear(x, num_classes, name="6")


def vgg(b: GraphBuilder, x: Tensor, config: str, batch_norm: bool, num_classes: int, dropout: float) -> Tensor:
    x = features(b, x, make_layers(VGG_CONFIGS[config], batch_norm))
    x = b.adaptive_avg_pool(x, (7, 7), name="avgpool")
    x = b.flatten(x, 1, name="flatten")
    return classifier(b, x, num_classes, dropout)


_SMALL = (32, 32)  # torchvision's min_size: five 2x2 pools leave 1x1


@register("vgg11", family="vgg", test_input_size=_SMALL)
def vgg11(b: GraphBuilder, x: Tensor, num_classes: int = 1000, dropout: float = 0.5) -> Tensor:
    """VGG-11 (configuration A): 8 convolutions and 3 fully connected layers."""
    return vgg(b, x, "A", False, num_classes, dropout)


@register("vgg11_bn", family="vgg", test_input_size=_SMALL)
def vgg11_bn(b: GraphBuilder, x: Tensor, num_classes: int = 1000, dropout: float = 0.5) -> Tensor:
    """VGG-11 (configuration A) with BatchNorm after every convolution."""
    return vgg(b, x, "A", True, num_classes, dropout)


@register("vgg13", family="vgg", test_input_size=_SMALL)
def vgg13(b: GraphBuilder, x: Tensor, num_classes: int = 1000, dropout: float = 0.5) -> Tensor:
    """VGG-13 (configuration B): 10 convolutions and 3 fully connected layers."""
    return vgg(b, x, "B", False, num_classes, dropout)


@register("vgg13_bn", family="vgg", test_input_size=_SMALL)
def vgg13_bn(b: GraphBuilder, x: Tensor, num_classes: int = 1000, dropout: float = 0.5) -> Tensor:
    """VGG-13 (configuration B) with BatchNorm after every convolution."""
    return vgg(b, x, "B", True, num_classes, dropout)


@register("vgg16", family="vgg", test_input_size=_SMALL)
def vgg16(b: GraphBuilder, x: Tensor, num_classes: int = 1000, dropout: float = 0.5) -> Tensor:
    """VGG-16 (configuration D): 13 convolutions and 3 fully connected layers."""
    return vgg(b, x, "D", False, num_classes, dropout)


@register("vgg16_bn", family="vgg", test_input_size=_SMALL)
def vgg16_bn(b: GraphBuilder, x: Tensor, num_classes: int = 1000, dropout: float = 0.5) -> Tensor:
    """VGG-16 (configuration D) with BatchNorm after every convolution."""
    return vgg(b, x, "D", True, num_classes, dropout)


@register("vgg19", family="vgg", test_input_size=_SMALL)
def vgg19(b: GraphBuilder, x: Tensor, num_classes: int = 1000, dropout: float = 0.5) -> Tensor:
    """VGG-19 (configuration E): 16 convolutions and 3 fully connected layers."""
    return vgg(b, x, "E", False, num_classes, dropout)


@register("vgg19_bn", family="vgg", test_input_size=_SMALL)
def vgg19_bn(b: GraphBuilder, x: Tensor, num_classes: int = 1000, dropout: float = 0.5) -> Tensor:
    """VGG-19 (configuration E) with BatchNorm after every convolution."""
    return vgg(b, x, "E", True, num_classes, dropout)
