"""Network in Network (Lin, Chen and Yan, 2013, arXiv 1312.4400): the ImageNet model.

The paper's two ideas, Section 3: the *mlpconv* layer (a convolution followed by a small
multilayer perceptron shared across positions, i.e. 1x1 convolutions, each with ReLU)
and a *global average pooling* head in place of fully connected layers: the last
mlpconv outputs one map per class and their spatial means are the logits.

The paper's experiments (Section 4) are on CIFAR/SVHN/MNIST and give no layer table;
we build the authors' released ImageNet model (``nin_imagenet`` in the Caffe Model Zoo,
4 mlpconv layers, AlexNet-level accuracy with a 29 MB model):

=========  =======================  ==============  ===========
mlpconv    first conv               1x1 MLP layers  then
=========  =======================  ==============  ===========
1          96, 11x11 stride 4       96, 96          maxpool 3/2
2          256, 5x5 pad 2           256, 256        maxpool 3/2
3          384, 3x3 pad 1           384, 384        maxpool 3/2, dropout 0.5
4          1024, 3x3 pad 1          1024, classes   global average pool
=========  =======================  ==============  ===========

7,595,176 parameters at 1000 classes (the paper gives no count; 7.6M fp32 weights
are the released model's 29 MiB).
Pools use Caffe's ceil mode (at 224x224: conv1 54x54, then pools to 27, 13, 6). Names follow a torchvision-like
flat ``features`` Sequential: ``features.0`` is conv1, ``features.2`` cccp1, ... with a
ReLU after every convolution, including the class maps, as in the released model.
"""

from graphgen.builder import GraphBuilder, Tensor
from graphgen.registry import register

# ("mlpconv", kernel, stride, padding, (conv channels, 1x1 channels, 1x1 channels)),
# ("maxpool",) = 3x3/2 ceil mode, ("dropout",). None stands for num_classes.
NIN_IMAGENET = [
    ("mlpconv", 11, 4, 0, (96, 96, 96)), ("maxpool",),
    ("mlpconv", 5, 1, 2, (256, 256, 256)), ("maxpool",),
    ("mlpconv", 3, 1, 1, (384, 384, 384)), ("maxpool",), ("dropout",),
    ("mlpconv", 3, 1, 1, (1024, 1024, None)),
]


def make_layers(stack, num_classes: int) -> list[tuple]:
    """Expand the table into the flat Sequential: conv, ReLU, 1x1, ReLU, 1x1, ReLU per mlpconv."""
    layers = []
    for entry in stack:
        if entry[0] != "mlpconv":
            layers.append(entry)
            continue
        _, k, stride, pad, widths = entry
        widths = [num_classes if w is None else w for w in widths]
        layers += [("conv", widths[0], k, stride, pad), ("relu",)]
        for w in widths[1:]:
            layers += [("conv", w, 1, 1, 0), ("relu",)]
    return layers


@register("nin", family="nin", source="paper: Lin et al. 2013, arXiv 1312.4400 (authors' ImageNet model)",
          test_input_size=(96, 96), aliases=("network_in_network",))
def nin(b: GraphBuilder, x: Tensor, num_classes: int = 1000, dropout: float = 0.5) -> Tensor:
    """Network in Network: four mlpconv layers and a global-average-pooling head (7.6M parameters)."""
    with b.scope("features"):
        for i, layer in enumerate(make_layers(NIN_IMAGENET, num_classes)):
            kind = layer[0]
            with b.scope(i):
                if kind == "conv":
                    _, out, k, stride, pad = layer
                    x = b.conv(x, out, k, stride=stride, padding=pad, name="")
                elif kind == "relu":
                    x = b.relu(x, name="relu")
                elif kind == "maxpool":
                    x = b.max_pool(x, 3, 2, ceil_mode=True, name="maxpool")
                else:
                    x = b.dropout(x, dropout, name="dropout")
    # the class maps' spatial means are the logits
    x = b.global_avg_pool(x, name="avgpool")
    return b.flatten(x, 1, name="flatten")
