"""U-Net (Ronneberger, Fischer & Brox, MICCAI 2015, arXiv 1505.04597), the architecture of Fig. 1.

* Contracting path: five levels of two 3x3 convolutions + ReLU, with a 2x2 max pool (stride 2)
  between levels; channels double from ``base_width`` (64) to 16x (1024) at the bottom.
* Expanding path: four steps of a 2x2 "up-convolution" (transposed conv, stride 2) halving the
  channels, concatenation with the contracting path's feature map of the same level, and two 3x3
  convolutions + ReLU.
* Dropout (0.5) at the end of the contracting path (Sec. 3.1), an identity at inference;
* a final 1x1 convolution maps to the classes.

Deviation from the paper, as most re-implementations do: the 3x3 convolutions are *padded*
(padding 1), so the output has the input's size and the skips need no cropping (the paper's
unpadded convs turn a 572x572 tile into a 388x388 map). Sizes that do not divide by 16 work too:
the up-sampling produces exactly the skip's size (the transposed conv adds ``output_padding`` as
torch's ``ConvTranspose2d(output_size=...)`` does; the bilinear variant resizes to the skip's size).

Options: ``base_width``; ``bilinear=True`` replaces each up-convolution by a bilinear resize x2
followed by a 1x1 convolution halving the channels; ``batch_norm=True`` adds BatchNorm after every
3x3 convolution (bias-free convs then), as in many later U-Nets.
"""

from __future__ import annotations

from graphgen.builder import GraphBuilder, Tensor
from graphgen.registry import register

#: contracting levels, as multiples of base_width (64 -> 64, 128, 256, 512, 1024)
UNET_LEVELS = (1, 2, 4, 8, 16)


def double_conv(b: GraphBuilder, x: Tensor, channels: int, batch_norm: bool) -> Tensor:
    """Two (3x3 conv, [BN], ReLU), padded to keep the size."""
    for i in (1, 2):
        x = b.conv(x, channels, 3, padding=1, bias=not batch_norm, name=f"conv{i}")
        if batch_norm:
            x = b.batch_norm(x, name=f"bn{i}")
        x = b.relu(x, name=f"relu{i}")
    return x


def up_step(b: GraphBuilder, x: Tensor, skip: Tensor, channels: int, bilinear: bool, batch_norm: bool) -> Tensor:
    """Up-sample to the skip's size halving the channels, concatenate the skip, double conv."""
    if bilinear:
        x = b.resize(x, size=skip.spatial, mode="bilinear", name="upsample")
        x = b.conv(x, channels, 1, name="upconv")
    else:
        extra = [s - 2 * t for s, t in zip(skip.spatial, x.spatial)]  # 1 where the skip's size is odd
        x = b.conv_transpose(x, channels, 2, stride=2, output_padding=tuple(extra), name="upconv")
    x = b.concat([skip, x], axis=1, name="concat")
    return double_conv(b, x, channels, batch_norm)


@register("unet", family="unet", source="paper: Ronneberger et al., U-Net, MICCAI 2015",
          input_size=(572, 572), test_input_size=(40, 40), num_classes=21)
def unet(b: GraphBuilder, x: Tensor, num_classes: int = 21, base_width: int = 64, bilinear: bool = False,
         batch_norm: bool = False) -> Tensor:
    """U-Net: 4 down / 4 up steps with skip concatenations; padded convs (output size = input size)."""
    skips = []
    with b.scope("down"):
        for level, mult in enumerate(UNET_LEVELS):
            if level:
                x = b.max_pool(x, 2, 2, name=f"pool{level}")
            with b.scope(level):
                x = double_conv(b, x, base_width * mult, batch_norm)
            skips.append(x)
    x = b.dropout(x, 0.5, name="dropout")
    with b.scope("up"):
        for step, mult in enumerate(reversed(UNET_LEVELS[:-1])):
            with b.scope(step):
                x = up_step(b, x, skips[-2 - step], base_width * mult, bilinear, batch_norm)
    return b.conv(x, num_classes, 1, name="classifier")
