"""SPP-net (He, Zhang, Ren and Sun, 2014, "Spatial Pyramid Pooling in Deep Convolutional
Networks for Visual Recognition", ECCV 2014 / TPAMI 2015, arXiv 1406.4729).

A spatial pyramid pooling layer between the last convolution and the first fully
connected layer max-pools the feature map into a fixed number of bins per pyramid level
and concatenates them, so the fc layers see a fixed-length vector whatever the input
size: the same weights run at several scales (Section 2.3, multi-size training).

The trunk is the paper's ZF-5 (Table 1; the authors' released ``Zeiler_conv5``
definition for the exact paddings):

=====  =========================  =================================  ==========
layer  filters                    then                               map at 224
=====  =========================  =================================  ==========
conv1  96, 7x7 stride 2, pad 1    ReLU, LRN, max pool 3/2            110 -> 55
conv2  256, 5x5 stride 2          ReLU, LRN, max pool 3/2            26 -> 13
conv3  384, 3x3 pad 1             ReLU                               13
conv4  384, 3x3 pad 1             ReLU                               13
conv5  256, 3x3 pad 1             ReLU                               13
spp    levels 1x1, 2x2, 4x4       flatten, concat: 21 x 256 = 5376
fc6    4096                       ReLU, dropout
fc7    4096                       ReLU, dropout
fc8    classes
=====  =========================  =================================  ==========

The pyramid is the paper's 3-level {4x4, 2x2, 1x1} (Figure 3), concatenated coarsest
first as in the authors' model. Each level is an *exact* adaptive max pool (PyTorch's
bin rule: bin i covers [floor(i*a/n), ceil((i+1)*a/n)) of an a-wide map); the paper
computes one pooling window ceil(a/n) and stride floor(a/n) per level, which can leave
the last rows out; the two agree whenever n divides a. Pools use Caffe's ceil mode.
The LRN is Caffe's WITHIN_CHANNEL form used by the released ZF-5 (local size 3,
alpha 5e-5, beta 0.75): ``x / (1 + alpha * mean_3x3(x^2)) ^ beta``.
46,628,968 parameters at 1000 classes, at every input size (the paper gives no count).
Initializer names are the authors' layer names: ``conv1.weight`` ... ``fc8.bias``.
"""

import numpy as np

from graphgen.builder import GraphBuilder, Tensor
from graphgen.registry import register

# ZF-5: (name, out_channels, kernel, stride, padding, LRN + max pool after the ReLU)
ZF5 = [
    ("conv1", 96, 7, 2, 1, True),
    ("conv2", 256, 5, 2, 0, True),
    ("conv3", 384, 3, 1, 1, False),
    ("conv4", 384, 3, 1, 1, False),
    ("conv5", 256, 3, 1, 1, False),
]


def lrn_within_channel(b: GraphBuilder, x: Tensor, size: int = 3, alpha: float = 5e-5, beta: float = 0.75,
                       name: str = "norm") -> Tensor:
    """Caffe's LRN with norm_region WITHIN_CHANNEL: x * (1 + alpha * avg_{size x size}(x^2)) ^ -beta.

    ONNX's LRN normalizes across channels only, so this is spelled out in elementary ops;
    Caffe's average pool divides by the full window, zero padding included.
    """
    squared = b.mul(x, x, name=f"{name}_square")
    mean = b.avg_pool(squared, size, 1, padding=(size - 1) // 2, count_include_pad=True, name=f"{name}_mean")
    base = b.add(b.mul(mean, np.float32(alpha), name=f"{name}_scale"), np.float32(1.0), name=f"{name}_shift")
    factor = _pow(b, base, -beta, name=f"{name}_pow")
    return b.mul(x, factor, name=name)


def _pow(b: GraphBuilder, x: Tensor, exponent: float, name: str) -> Tensor:
    """Elementwise x ** exponent (ONNX Pow with a scalar exponent); the builder has no pow op."""
    return b._emit("Pow", [x.name, b.const(np.float32(exponent), "exponent")], name, x.shape)


def spatial_pyramid_pool(b: GraphBuilder, x: Tensor, levels=(1, 2, 4), name: str = "spp") -> Tensor:
    """Max-pool into n x n bins for each level n, flatten each, concatenate: (N, C * sum(n^2))."""
    pooled = []
    for n in levels:
        p = b.adaptive_max_pool(x, (n, n), name=f"{name}_{n}x{n}")
        pooled.append(b.flatten(p, 1, name=f"{name}_{n}x{n}_flatten"))
    return b.concat(pooled, axis=1, name=name)


@register("sppnet", family="sppnet", source="paper: He et al. 2014, arXiv 1406.4729, ZF-5 (Table 1)",
          test_input_size=(100, 100), aliases=("spp_net",))
def sppnet(b: GraphBuilder, x: Tensor, num_classes: int = 1000, dropout: float = 0.5,
           levels: tuple = (1, 2, 4)) -> Tensor:
    """SPP-net (ZF-5): spatial pyramid pooling lets one set of fc weights take any input size."""
    for name, out, k, stride, pad, lrn_and_pool in ZF5:
        x = b.relu(b.conv(x, out, k, stride=stride, padding=pad, name=name), name=f"relu{name[-1]}")
        if lrn_and_pool:
            x = lrn_within_channel(b, x, name=f"norm{name[-1]}")
            x = b.max_pool(x, 3, 2, ceil_mode=True, name=f"pool{name[-1]}")
    x = spatial_pyramid_pool(b, x, levels, name="spp")
    x = b.dropout(b.relu(b.linear(x, 4096, name="fc6"), name="relu6"), dropout, name="drop6")
    x = b.dropout(b.relu(b.linear(x, 4096, name="fc7"), name="relu7"), dropout, name="drop7")
    return b.linear(x, num_classes, name="fc8")
