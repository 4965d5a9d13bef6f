"""GoogLeNet / Inception v1 (Szegedy et al., 2014, "Going Deeper with Convolutions",
arXiv 1409.4842), as torchvision defines it, for inference.

The Inception module widths are the paper's Table 1 (#1x1, #3x3 reduce, #3x3,
#5x5 reduce, #5x5, pool proj). Where torchvision differs from the paper we follow
torchvision, so its weights load and its outputs are reproduced:

* every convolution is ``BasicConv2d``: conv without bias, BatchNorm (eps 0.001), ReLU
  (the paper predates BatchNorm), and the paper's two LRN layers in the stem are gone;
* the "5x5" branch uses a 3x3 convolution (a known torchvision bug, pytorch/vision#906;
  the pretrained weights were trained that way);
* max pools use ceil mode, like the original Caffe model;
* no auxiliary classifiers (they only exist in training) and no ``transform_input``
  (the input is expected already normalized).

Initializer names are torchvision's state_dict keys (``inception3a.branch2.1.conv.weight``,
``inception4e.branch4.1.bn.running_var``, ``fc.bias``).
"""

from graphgen.builder import GraphBuilder, Tensor
from graphgen.registry import register


def basic_conv(b: GraphBuilder, x: Tensor, out_channels: int, kernel_size, stride=1, padding=0) -> Tensor:
    """torchvision's BasicConv2d: Conv2d(bias=False) -> BatchNorm2d(eps=0.001) -> ReLU."""
    x = b.conv(x, out_channels, kernel_size, stride=stride, padding=padding, bias=False, name="conv")
    x = b.batch_norm(x, eps=0.001, name="bn")
    return b.relu(x, name="relu")


def inception(b: GraphBuilder, x: Tensor, ch1x1: int, ch3x3red: int, ch3x3: int, ch5x5red: int, ch5x5: int,
              pool_proj: int) -> Tensor:
    """Inception module with dimension reductions (paper Figure 2b): four branches concatenated."""
    with b.scope("branch1"):
        branch1 = basic_conv(b, x, ch1x1, 1)
    with b.scope("branch2"):
        with b.scope(0):
            branch2 = basic_conv(b, x, ch3x3red, 1)
        with b.scope(1):
            branch2 = basic_conv(b, branch2, ch3x3, 3, padding=1)
    with b.scope("branch3"):
        with b.scope(0):
            branch3 = basic_conv(b, x, ch5x5red, 1)
        with b.scope(1):
            # the paper's 5x5; torchvision (and its weights) use 3x3
            branch3 = basic_conv(b, branch3, ch5x5, 3, padding=1)
    with b.scope("branch4"):
        branch4 = b.max_pool(x, 3, 1, padding=1, ceil_mode=True, name="0")
        with b.scope(1):
            branch4 = basic_conv(b, branch4, pool_proj, 1)
    return b.concat([branch1, branch2, branch3, branch4], axis=1, name="concat")


# Table 1 from inception (3a) on, in order: ("inception", name, #1x1, #3x3 reduce, #3x3,
# #5x5 reduce, #5x5, pool proj) or ("maxpool", name, kernel) with stride 2, ceil mode.
GOOGLENET_BODY = [
    ("inception", "inception3a", 64, 96, 128, 16, 32, 32),
    ("inception", "inception3b", 128, 128, 192, 32, 96, 64),
    ("maxpool", "maxpool3", 3),
    ("inception", "inception4a", 192, 96, 208, 16, 48, 64),
    ("inception", "inception4b", 160, 112, 224, 24, 64, 64),
    ("inception", "inception4c", 128, 128, 256, 24, 64, 64),
    ("inception", "inception4d", 112, 144, 288, 32, 64, 64),
    ("inception", "inception4e", 256, 160, 320, 32, 128, 128),
    ("maxpool", "maxpool4", 2),
    ("inception", "inception5a", 256, 160, 320, 32, 128, 128),
    ("inception", "inception5b", 384, 192, 384, 48, 128, 128),
]


@register("googlenet", family="googlenet", test_input_size=(32, 32), aliases=("inception_v1",))
def googlenet(b: GraphBuilder, x: Tensor, num_classes: int = 1000, dropout: float = 0.2) -> Tensor:
    """GoogLeNet (Inception v1): a 22-layer stack of Inception modules (6.6M parameters)."""
    with b.scope("conv1"):
        x = basic_conv(b, x, 64, 7, stride=2, padding=3)
    x = b.max_pool(x, 3, 2, ceil_mode=True, name="maxpool1")
    with b.scope("conv2"):
        x = basic_conv(b, x, 64, 1)
    with b.scope("conv3"):
        x = basic_conv(b, x, 192, 3, padding=1)
    x = b.max_pool(x, 3, 2, ceil_mode=True, name="maxpool2")
    for kind, name, *args in GOOGLENET_BODY:
        if kind == "maxpool":
            x = b.max_pool(x, args[0], 2, ceil_mode=True, name=name)
        else:
            with b.scope(name):
                x = inception(b, x, *args)
    x = b.global_avg_pool(x, name="avgpool")
    x = b.flatten(x, 1, name="flatten")
    x = b.dropout(x, dropout, name="dropout")
    return b.linear(x, num_classes, name="fc")
