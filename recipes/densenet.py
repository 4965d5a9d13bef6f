"""DenseNet-BC (Huang et al., "Densely Connected Convolutional Networks", CVPR 2017, arXiv 1608.06993),
as torchvision defines it.

Table 1 of the paper: a 7x7/2 conv and 3x3/2 max pool, four dense blocks of 6/12/24/16 (121),
6/12/32/32 (169), 6/12/48/32 (201) or 6/12/36/24 (161, growth 48) layers, with transitions (BN-ReLU,
1x1 conv halving the channels, 2x2 average pool) between them, then BN-ReLU, global average pool and
the classifier. Every dense layer is BN-ReLU-conv1x1 (bottleneck to ``bn_size * k`` = 4k channels) then
BN-ReLU-conv3x3 (k new channels) applied to the concatenation of all earlier feature maps of its block
(Section 3, "Bottleneck layers", the pre-activation order).

Names equal torchvision's state_dict keys (``features.denseblock1.denselayer1.norm1.weight``,
``features.transition1.conv.weight``, ``features.norm5.running_var``, ``classifier.weight``).
torchvision's ``memory_efficient`` (gradient checkpointing) has no effect on inference and is omitted.
"""

from __future__ import annotations

from graphgen.builder import GraphBuilder, Tensor
from graphgen.registry import register

#: (growth rate k, layers per dense block, channels of the first conv) for each torchvision model.
DENSENET_CONFIGS = {
    121: (32, (6, 12, 24, 16), 64),
    161: (48, (6, 12, 36, 24), 96),
    169: (32, (6, 12, 32, 32), 64),
    201: (32, (6, 12, 48, 32), 64),
}


def bn_relu_conv(b: GraphBuilder, x: Tensor, out_channels: int, kernel_size: int, norm: str, relu: str,
                 conv: str) -> Tensor:
    """DenseNet's pre-activation composite function: BN, ReLU, then a bias-free conv."""
    x = b.relu(b.batch_norm(x, name=norm), name=relu)
    return b.conv(x, out_channels, kernel_size, padding=kernel_size // 2, bias=False, name=conv)


def dense_layer(b: GraphBuilder, x: Tensor, growth_rate: int, bn_size: int, drop_rate: float = 0.0) -> Tensor:
    """Bottleneck dense layer: BN-ReLU-conv1x1 to bn_size*k channels, BN-ReLU-conv3x3 to k new channels."""
    y = bn_relu_conv(b, x, bn_size * growth_rate, 1, "norm1", "relu1", "conv1")
    y = bn_relu_conv(b, y, growth_rate, 3, "norm2", "relu2", "conv2")
    if drop_rate > 0:
        y = b.dropout(y, drop_rate, name="dropout")
    return y


def dense_block(b: GraphBuilder, x: Tensor, num_layers: int, growth_rate: int, bn_size: int,
                drop_rate: float = 0.0) -> Tensor:
    """``num_layers`` dense layers, each fed the concatenation of the block input and all earlier outputs.

    The running concatenation (append each new map to the previous concat) equals torchvision's
    ``torch.cat(all features so far)`` channel for channel, with one two-input Concat per layer.
    """
    features = x
    for i in range(num_layers):
        with b.scope(f"denselayer{i + 1}"):
            new = dense_layer(b, features, growth_rate, bn_size, drop_rate)
            features = b.concat([features, new], axis=1, name="concat")
    return features


def transition(b: GraphBuilder, x: Tensor, out_channels: int) -> Tensor:
    """Between blocks: BN-ReLU-conv1x1 (compression to half the channels), then 2x2/2 average pool."""
    x = bn_relu_conv(b, x, out_channels, 1, "norm", "relu", "conv")
    return b.avg_pool(x, 2, 2, name="pool")


def densenet_features(b: GraphBuilder, x: Tensor, growth_rate: int, block_config, num_init_features: int,
                      bn_size: int = 4, drop_rate: float = 0.0) -> Tensor:
    """torchvision's ``features`` Sequential: conv0/norm0/relu0/pool0, dense blocks, transitions, norm5."""
    with b.scope("features"):
        x = b.conv(x, num_init_features, 7, stride=2, padding=3, bias=False, name="conv0")
        x = b.relu(b.batch_norm(x, name="norm0"), name="relu0")
        x = b.max_pool(x, 3, 2, padding=1, name="pool0")
        for i, num_layers in enumerate(block_config):
            with b.scope(f"denseblock{i + 1}"):
                x = dense_block(b, x, num_layers, growth_rate, bn_size, drop_rate)
            if i != len(block_config) - 1:
                with b.scope(f"transition{i + 1}"):
                    x = transition(b, x, x.channels // 2)
        return b.batch_norm(x, name="norm5")


def densenet(b: GraphBuilder, x: Tensor, depth: int, num_classes: int = 1000, drop_rate: float = 0.0) -> Tensor:
    """Features, then ReLU, global average pool, flatten and the linear ``classifier``."""
    growth_rate, block_config, num_init_features = DENSENET_CONFIGS[depth]
    x = densenet_features(b, x, growth_rate, block_config, num_init_features, drop_rate=drop_rate)
    x = b.global_avg_pool(b.relu(x, name="relu"), name="avgpool")
    return b.linear(b.flatten(x, 1, name="flatten"), num_classes, name="classifier")


_TV = dict(family="densenet", source="torchvision", test_input_size=(64, 64))


@register("densenet121", aliases=("densenet",), **_TV)
def densenet121(b: GraphBuilder, x: Tensor, num_classes: int = 1000, drop_rate: float = 0.0) -> Tensor:
    """DenseNet-121 (BC, k=32): dense blocks of 6, 12, 24, 16 layers (Huang et al. 2017, Table 1)."""
    return densenet(b, x, 121, num_classes, drop_rate)


@register("densenet161", **_TV)
def densenet161(b: GraphBuilder, x: Tensor, num_classes: int = 1000, drop_rate: float = 0.0) -> Tensor:
    """DenseNet-161 (BC, k=48, 96 initial channels): dense blocks of 6, 12, 36, 24 layers."""
    return densenet(b, x, 161, num_classes, drop_rate)


@register("densenet169", **_TV)
def densenet169(b: GraphBuilder, x: Tensor, num_classes: int = 1000, drop_rate: float = 0.0) -> Tensor:
    """DenseNet-169 (BC, k=32): dense blocks of 6, 12, 32, 32 layers (Huang et al. 2017, Table 1)."""
    return densenet(b, x, 169, num_classes, drop_rate)


@register("densenet201", **_TV)
def densenet201(b: GraphBuilder, x: Tensor, num_classes: int = 1000, drop_rate: float = 0.0) -> Tensor:
    """DenseNet-201 (BC, k=32): dense blocks of 6, 12, 48, 32 layers (Huang et al. 2017, Table 1)."""
    return densenet(b, x, 201, num_classes, drop_rate)
