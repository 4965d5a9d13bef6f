"""SqueezeNet 1.0 with bypass connections (Iandola et al., 2016, arXiv 1602.07360, Section 6.2
and Fig. 2 middle/right; seed 000 section 2.3).

* Simple bypass: the input of Fire 3, 5, 7 and 9 (the paper's 1-based numbering: fire2 is
  the first Fire module) is added to its output; those are the Fire modules whose input
  and output channel counts are equal.
* Complex bypass: additionally a 1x1 conv shortcut (with bias, no activation; its output
  channels equal the Fire module's) around Fire 2, 4, 6 and 8, where the channel count
  changes. The paper reports model sizes only (Table 3), not parameter counts: simple
  bypass adds no parameters; complex bypass adds 341,248 here.

The bypass is added after the Fire module's concat (its expand ReLUs), with no ReLU after
the sum, as in Fig. 2. Everything else is torchvision's ``squeezenet1_0`` (the paper's
Table 1 network): the Fire module, the ``features`` layer stack and the classifier come from
:mod:`recipes.squeezenet`, so names stay torchvision's (``features.4.squeeze.weight``); a
complex bypass conv is ``features.<i>.bypass``.
"""

from graphgen.builder import GraphBuilder, Tensor
from graphgen.registry import register
from recipes.squeezenet import SQUEEZENET_1_0, classifier, features, fire

#: Fire modules (paper numbering) with an identity bypass, and with a 1x1 conv bypass.
SIMPLE_BYPASS = (3, 5, 7, 9)
COMPLEX_BYPASS = (2, 4, 6, 8)


def bypass_fire(simple: tuple[int, ...], conv: tuple[int, ...]):
    """A ``fire_block`` for :func:`recipes.squeezenet.features` that adds the paper's bypasses.

    ``features`` calls it once per Fire module, in order, inside that layer's scope; it counts
    them to know the paper's fire number (the first Fire module is fire2).
    """
    count = [1]

    def block(b: GraphBuilder, x: Tensor, squeeze: int, expand1x1: int, expand3x3: int) -> Tensor:
        count[0] += 1
        number = count[0]
        y = fire(b, x, squeeze, expand1x1, expand3x3)
        if number in simple:
            if x.channels != y.channels:
                raise ValueError(f"fire{number}: identity bypass needs equal channels ({x.channels} vs {y.channels})")
            return b.add(y, x, name="bypass_add")
        if number in conv:
            return b.add(y, b.conv(x, y.channels, 1, name="bypass"), name="bypass_add")
        return y

    return block


@register("squeezenet1_0_simple_bypass", family="squeezenet",
          source="paper: Iandola et al. 2016 (SqueezeNet) Fig. 2", test_input_size=(64, 64))
def squeezenet1_0_simple_bypass(b: GraphBuilder, x: Tensor, num_classes: int = 1000, dropout: float = 0.5) -> Tensor:
    """SqueezeNet 1.0 + simple bypass (identity around Fire 3, 5, 7, 9; paper Fig. 2 middle)."""
    out = features(b, x, SQUEEZENET_1_0, fire_block=bypass_fire(SIMPLE_BYPASS, ()))[-1]
    return classifier(b, out, num_classes, dropout)


@register("squeezenet1_0_complex_bypass", family="squeezenet",
          source="paper: Iandola et al. 2016 (SqueezeNet) Fig. 2", test_input_size=(64, 64))
def squeezenet1_0_complex_bypass(b: GraphBuilder, x: Tensor, num_classes: int = 1000, dropout: float = 0.5) -> Tensor:
    """SqueezeNet 1.0 + complex bypass (plus 1x1 conv shortcuts around Fire 2, 4, 6, 8; Fig. 2 right)."""
    out = features(b, x, SQUEEZENET_1_0, fire_block=bypass_fire(SIMPLE_BYPASS, COMPLEX_BYPASS))[-1]
    return classifier(b, out, num_classes, dropout)
