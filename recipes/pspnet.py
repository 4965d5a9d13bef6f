"""PSPNet (Zhao, Shi, Qi, Wang & Jia, "Pyramid Scene Parsing Network", CVPR 2017, arXiv 1612.01105), Fig. 3.

* A dilated ResNet-50 (layer3/layer4 atrous, output stride 8): torchvision's ResNet-50 under
  ``backbone.`` (the paper's ResNet has a deep 3x3 stem; torchvision's keeps the 7x7 one);
* the pyramid pooling module: the 2048-channel map is average-pooled into 1x1, 2x2, 3x3 and 6x6
  bins (exact adaptive average pooling: PyTorch's bin boundaries, also when the size does not divide),
  each level reduced by a 1x1 conv to 2048/4 = 512 channels + BN + ReLU, bilinearly up-sampled back
  and concatenated with the input map (4096 channels);
* a 3x3 conv to 512 + BN + ReLU, dropout 0.1, a 1x1 classifier, bilinear up-sampling x8 to the input.

Names follow the authors' PyTorch release (``ppm.features.<level>.1`` conv, ``.2`` BN; ``cls.0`` 3x3 conv,
``cls.1`` BN, ``cls.4`` classifier) with ``backbone.`` in front of torchvision's ResNet names. The
auxiliary layer3 head used for training (``aux_loss``) is off by default. Up-sampling maps corners to
corners (``align_corners=True``) like the authors' code.
"""

from __future__ import annotations

from graphgen.builder import GraphBuilder, Tensor
from graphgen.registry import register
from recipes.fcn import dilated_resnet

#: pyramid levels: bins per side (Sec. 3.3)
PSP_BINS = (1, 2, 3, 6)


def pyramid_pooling(b: GraphBuilder, x: Tensor, bins=PSP_BINS) -> Tensor:
    """Pool to each bin count, 1x1 conv to C/len(bins) + BN + ReLU, resize back, concat with x."""
    reduced = x.channels // len(bins)
    levels = [x]
    with b.scope("features"):
        for i, n in enumerate(bins):
            with b.scope(i):
                p = b.adaptive_avg_pool(x, n, name="0")
                p = b.conv(p, reduced, 1, bias=False, name="1")
                p = b.relu(b.batch_norm(p, name="2"), name="3")
                levels.append(b.resize(p, size=x.spatial, mode="bilinear", align_corners=True, name="upsample"))
    return b.concat(levels, axis=1, name="concat")


def psp_classifier(b: GraphBuilder, x: Tensor, channels: int, num_classes: int, dropout: float = 0.1) -> Tensor:
    """3x3 conv (no bias) + BN + ReLU, dropout, 1x1 conv to the classes (torch Sequential indices)."""
    h = b.conv(x, channels, 3, padding=1, bias=False, name="0")
    h = b.relu(b.batch_norm(h, name="1"), name="2")
    h = b.dropout(h, dropout, name="3")
    return b.conv(h, num_classes, 1, name="4")


@register("pspnet", aliases=("pspnet_resnet50",), family="pspnet",
          source="paper: Zhao et al., Pyramid Scene Parsing Network, CVPR 2017", input_size=(473, 473),
          test_input_size=(64, 64), num_classes=21)
def pspnet(b: GraphBuilder, x: Tensor, num_classes: int = 21, bins=PSP_BINS, aux_loss: bool = False):
    """PSPNet: dilated ResNet-50 + pyramid pooling (1/2/3/6 bins); ``aux_loss`` adds the layer3 head."""
    feats = dilated_resnet(b, x, [3, 4, 6, 3])
    with b.scope("ppm"):
        h = pyramid_pooling(b, feats["layer4"], bins)
    with b.scope("cls"):
        h = psp_classifier(b, h, 512, num_classes)
    out = b.resize(h, size=x.spatial, mode="bilinear", align_corners=True, name="upsample_out")
    if not aux_loss:
        return out
    with b.scope("aux"):
        aux = psp_classifier(b, feats["layer3"], 256, num_classes)
    return {"out": out, "aux": b.resize(aux, size=x.spatial, mode="bilinear", align_corners=True,
                                        name="upsample_aux")}
