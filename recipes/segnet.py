"""SegNet (Badrinarayanan, Kendall & Cipolla, TPAMI 2017, arXiv 1511.00561), Fig. 2 / Sec. 3.

* Encoder: the 13 convolutions of VGG16 with batch normalization (torchvision's ``vgg16_bn``
  ``features``, same names, so ImageNet weights load), each stage closed by a 2x2/2 max pooling
  that also returns the *indices* of the maxima;
* decoder: mirror image of the encoder. Each stage up-samples with the pooling indices of its
  encoder stage (MaxUnpool: every value goes back to where its max came from, zeros elsewhere), then
  3x3 convolutions + BN + ReLU whose widths mirror the encoder (512,512,512 | 512,512,256 |
  256,256,128 | 128,64 | 64);
* a last 3x3 convolution to the classes (the soft-max of the paper is left to the caller).

Emitted as real ONNX ``MaxPool`` (2 outputs) and ``MaxUnpool`` nodes. Pooling rounds down like
torch's (the authors' Caffe rounded up, pooling a last odd row/column on its own); where a pre-pool
size is odd the unpool gets an explicit ``output_shape`` (torch's ``max_unpool2d(output_size=...)``),
so the output always has the input's size.
TVM cannot import MaxPool's Indices output: ``graphgen.compile.fix_maxunpool`` rewrites the pairs.
"""

from __future__ import annotations

import numpy as np

from graphgen.builder import GraphBuilder, Tensor
from graphgen.registry import register
from recipes.fcn import VGG16_STAGES, vgg16_features

#: decoder stages, deepest first: the encoder's widths mirrored (each stage ends at the next one's width)
SEGNET_DECODER = ((512, 512, 512), (512, 512, 256), (256, 256, 128), (128, 64), (64,))


def max_pool_with_indices(b: GraphBuilder, x: Tensor, name: str) -> tuple[Tensor, Tensor]:
    """nn.MaxPool2d(2, 2, return_indices=True): ONNX MaxPool with its Indices output."""
    n, c, h, w = x.shape
    shape = (n, c, h // 2, w // 2)
    values, indices = b._emit("MaxPool", [x.name], name, None, n_outputs=2, shapes=[shape, shape],
                              kernel_shape=[2, 2], strides=[2, 2])
    return values, Tensor(indices.name, shape, np.dtype(np.int64))


def max_unpool(b: GraphBuilder, x: Tensor, indices: Tensor, size, name: str) -> Tensor:
    """nn.MaxUnpool2d(2, 2)(x, indices, output_size=size): ONNX MaxUnpool (output_shape only when odd)."""
    n, c, h, w = x.shape
    ins = [x.name, indices.name]
    if tuple(size) != (2 * h, 2 * w):
        ins.append(b.const(np.asarray([n, c, *size], np.int64), "output_shape"))
    return b._emit("MaxUnpool", ins, name, (n, c, *size), kernel_shape=[2, 2], strides=[2, 2])


def segnet_encoder(b: GraphBuilder, x: Tensor) -> tuple[Tensor, list[tuple[Tensor, tuple[int, int]]]]:
    """VGG16-BN features; returns the last pooled map and, per stage, (indices, pre-pool size)."""
    records = []

    def pool(b: GraphBuilder, x: Tensor, stage: int, name: str) -> Tensor:
        values, indices = max_pool_with_indices(b, x, name)
        records.append((indices, x.spatial))
        return values

    pooled = vgg16_features(b, x, batch_norm=True, pool=pool)
    return pooled[-1], records


@register("segnet", family="segnet", source="paper: Badrinarayanan et al., SegNet, TPAMI 2017",
          input_size=(360, 480), test_input_size=(48, 40), num_classes=21)
def segnet(b: GraphBuilder, x: Tensor, num_classes: int = 21) -> Tensor:
    """SegNet: VGG16-BN encoder, decoder up-sampling with the encoder's max-pooling indices."""
    assert len(SEGNET_DECODER) == len(VGG16_STAGES)
    x, records = segnet_encoder(b, x)
    with b.scope("decoder"):
        for stage, widths in enumerate(SEGNET_DECODER):
            indices, size = records[-1 - stage]
            with b.scope(stage):
                x = max_unpool(b, x, indices, size, name="unpool")
                i = 0
                for width in widths:
                    x = b.conv(x, width, 3, padding=1, name=str(i))
                    x = b.batch_norm(x, name=str(i + 1))
                    x = b.relu(x, name=str(i + 2))
                    i += 3
    return b.conv(x, num_classes, 3, padding=1, name="classifier")
